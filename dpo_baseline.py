# Direct Preference Optimization (Rafailov et al. 2023) on TL;DR or HH, the offline baseline of DR-PO.
# Docs: README.md#dpo_baselinepy
import contextlib
import glob
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro
from datasets import load_dataset
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()  # its load reports flag a new value or reward head, which is expected
transformers_logging.disable_progress_bar()


@dataclass
class Args:
    # ---- the run ----
    exp_name: str = "dpo"
    """name of this experiment (part of the run name)"""
    run_name: Optional[str] = None
    """name of the run: its log, config and checkpoints go to runs/{run_name} (default: {task}__{exp_name}__{seed}__{unix
    time})"""
    seed: int = 1
    """seed of the experiment"""
    cuda: bool = True
    """use CUDA when available (bf16 autocast there); CPU otherwise"""

    # ---- models and data ----
    task: Literal["tldr", "hh"] = "tldr"
    """tldr: OpenAI's TL;DR comparisons; hh: Anthropic HH chosen/rejected transcripts"""
    sft_model_path: Optional[str] = None
    """policy and reference init (default: cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr for tldr, models/sft_hh for hh)"""
    dataset_name: Optional[str] = None
    """Hub id, local folder or json/jsonl file of preference pairs (default: openai/summarize_from_feedback for tldr,
    Anthropic/hh-rlhf for hh)"""
    dataset_config: Optional[str] = None
    """Hub config of the dataset (default: `comparisons` for openai/summarize_from_feedback)"""
    train_split: str = "train"
    """split to train on (datasets slicing works: `train[:80%]`; a single file has only `train`)"""
    eval_split: Optional[str] = None
    """held-out split for the implicit-reward accuracy (default: `validation` for tldr, `test` for hh)"""
    query_length: int = 512
    """max prompt tokens: TL;DR posts are cut back at their last newline, HH prompts keep their end"""
    response_length: Optional[int] = None
    """max response tokens, EOS included; longer pairs are skipped and counted (default: 53 tldr, 128 hh)"""
    max_train_samples: Optional[int] = None
    """use only the first N training pairs (debugging)"""
    max_eval_samples: Optional[int] = 1000
    """use only the first N eval pairs"""
    ref_cache_dir: str = "cache/ref_logprobs"
    """where the reference log-probs are cached, keyed by the reference model, the data and the tokenisation"""

    # ---- the loss ----
    beta: float = 0.05
    """DPO's beta: the strength of the implicit KL constraint (0.05 as in the authors' TL;DR DPO)"""
    label_smoothing: float = 0.0
    """conservative DPO (Mitchell 2023): the assumed probability that a label is flipped"""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's loss; ipo: IPO's squared loss (Azar et al. 2023)"""
    rpo_alpha: float = 0.0
    """RPO (Pang et al. 2024; TRL's rpo_alpha): add rpo_alpha * the chosen responses' per-token NLL to the loss, which
    keeps their likelihood from falling (DPO's likelihood displacement); 0: plain DPO"""

    # ---- optimisation and batch sizes ----
    lr: float = 3e-6
    """learning rate (cosine schedule to 0)"""
    eps: float = 1e-5
    """AdamW epsilon"""
    max_grad_norm: Optional[float] = None
    """clip the gradient norm of each optimizer step (None: no clipping, as the authors' and the N+ code)"""
    num_train_epochs: int = 1
    """passes over the training pairs"""
    batch_size: int = 64
    """pairs per optimizer step, over all processes (under torchrun each takes batch_size / processes of them)"""
    local_micro_batch_size: int = 8
    """pairs per forward pass and process (chosen and rejected share it); batch_size / (this x processes) is the gradient
    accumulation"""

    # ---- evaluation ----
    eval_every: int = 100
    """eval accuracy every N optimizer steps (and at the end)"""

    # ---- memory: dtypes, LoRA, gradient checkpointing, FSDP ----
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the trained policy, whatever the checkpoint stores: Pythia is stored in fp16, where AdamW's second moment
    underflows. bfloat16 halves its memory and loses small updates; bf16 autocast runs on CUDA either way"""
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the frozen reference; auto: bfloat16 on CUDA (no fp32 copy needed), float32 on CPU"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    use_lora: bool = False
    """train LoRA adapters (needs `peft`); the reference log-probs come from the cache either way"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA alpha"""
    fsdp: bool = False
    """under torchrun, shard the policy's weights, gradients and AdamW state across the processes (FSDP2), for a model
    that does not fit one GPU; checkpoints and the final model are saved whole, as without it"""

    # ---- logging and checkpoints ----
    track: bool = False
    """log to Weights & Biases (needs `wandb`)"""
    save_every: int = 100
    """write a checkpoint every N optimizer steps (0: never), to runs/{run_name}/checkpoints/update_N"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep (older ones are deleted once a new one is complete)"""
    resume_from: Optional[str] = None
    """`auto`: the newest checkpoint of the newest run under runs/ with this --task, --exp-name and --seed (a new run
    when there is none); a run folder runs/{run_name}: its newest checkpoint; or one checkpoint folder. The run's flags
    come from the checkpoint; only those in RESUMABLE may be given anew"""
    output_dir: str = "models/dpo"
    """where the policy and tokenizer are saved"""

    # ---- computed at run time from the flags above (not flags; saved with the config) ----
    gradient_accumulation_steps: tyro.conf.Suppress[int] = 0
    num_updates: tyro.conf.Suppress[int] = 0


COMPUTED = ("gradient_accumulation_steps", "num_updates")  # fields the script fills in, saved with the config
PROBABILITY, POSITIVE, NON_NEGATIVE = (
    (lambda v: 0 <= v <= 1, "in [0, 1]"),
    (lambda v: v > 0, "> 0"),
    (lambda v: v >= 0, ">= 0"),
)
FLAG_RULES = {
    "lr": POSITIVE,
    "eps": POSITIVE,
    "batch_size": POSITIVE,
    "local_micro_batch_size": POSITIVE,
    "query_length": POSITIVE,
    "response_length": POSITIVE,
    "num_train_epochs": POSITIVE,
    "keep_checkpoints": POSITIVE,
    "max_train_samples": POSITIVE,
    "max_eval_samples": POSITIVE,
    "beta": POSITIVE,
    "max_grad_norm": POSITIVE,
    "lora_r": POSITIVE,
    "eval_every": NON_NEGATIVE,
    "save_every": NON_NEGATIVE,
    "rpo_alpha": NON_NEGATIVE,
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
}


DEFAULT_MODELS = {"tldr": "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr", "hh": "models/sft_hh"}
DEFAULT_DATASETS = {"tldr": ("openai/summarize_from_feedback", "comparisons"), "hh": ("Anthropic/hh-rlhf", None)}
DEFAULT_RESPONSE_LENGTH = {"tldr": 53, "hh": 128}
SCHEMAS = {"tldr": {"info": dict, "summaries": list, "choice": int}, "hh": {"chosen": str, "rejected": str}}
TLDR_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
HH_TAG = "\n\nAssistant:"


def load_rows(name: str, split: str, schema: dict, config: Optional[str] = None):
    """A Hub id, a local folder or a json/jsonl file, always through `datasets.load_dataset`; checks the columns."""
    try:
        if name.endswith((".json", ".jsonl")):  # one file is one split, named `train`
            if not os.path.exists(name):
                raise FileNotFoundError(f"dataset file {name} does not exist")
            ds = load_dataset("json", data_files={"train": name}, split=split)
        else:
            ds = load_dataset(name, config, split=split)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"could not read split '{split}' of {name}: {e}")
    except Exception as e:  # connection errors come in many types, from requests, httpx and huggingface_hub
        if os.path.exists(name):
            raise
        raise SystemExit(
            f"Could not load the dataset '{name}' from the Hugging Face Hub ({type(e).__name__}: {e}). If this machine is "
            "offline, point --dataset-name at a local folder (holding train.jsonl, validation.jsonl, ...) or at a "
            f"json/jsonl file with the same columns ({', '.join(schema)}); `python tiny_world.py` writes such files."
        ) from None
    missing = [c for c in schema if c not in ds.column_names]
    if missing:
        raise SystemExit(
            f"{name} (split {split}) lacks column(s) {missing}; expected the schema {list(schema)}, found {ds.column_names}"
        )
    extra = [c for c in ds.column_names if c not in schema]
    if extra:
        print(f"note: {name} has extra column(s) {extra}, which are not used")
    return ds.select_columns(list(schema))


def check_row(row: dict, i: int, schema: dict, source: str):
    for column, kind in schema.items():
        if not isinstance(row[column], kind):
            raise SystemExit(
                f"{source} row {i}, column '{column}': expected {kind.__name__}, got {type(row[column]).__name__}"
            )


def encode(tokenizer, text: str, special: bool = True):
    """Token ids of a data text. A special token's string inside the text (a Reddit post can hold `<|endoftext|>`)
    is encoded as plain text, never as that token. `special` adds the tokenizer's own special tokens (Llama's BOS):
    prompts get them; responses and pieces of text do not."""
    return tokenizer.encode(text, add_special_tokens=special, split_special_tokens=True)


def tldr_query(tokenizer, row: dict, query_length: int):
    """OpenAI's TL;DR query. A post that does not fit is cut exactly as the N+ code cut it for the public SFT and
    reward checkpoints (summarize_from_feedback_details/tldr_dataset.py, process_query): at its last newline (that
    newline and what follows go, nothing is stripped), again and again, and once no newline is left, one character at
    a time. Returns (token ids, whether the post was truncated); None when even an empty post does not fit."""
    post, truncated = row["post"], False
    while True:
        ids = encode(tokenizer, TLDR_FORMAT.format(subreddit=row["subreddit"], title=row["title"], post=post))
        if len(ids) <= query_length:
            return ids, truncated
        if not post:
            return None
        truncated = True
        post = post[: post.rfind("\n")]  # with no newline left rfind is -1: the last character goes


def hh_split(chosen: str, rejected: str):
    """The prompt is the transcript up to and including the last '\\n\\nAssistant:' that chosen and rejected share."""
    end = os.path.commonprefix([chosen, rejected]).rfind(HH_TAG)
    if end < 0:
        return None
    end += len(HH_TAG)
    return chosen[:end], chosen[end:], rejected[end:]


def hh_prompt(tokenizer, prompt: str, query_length: int):
    """HH prompt ids: a long conversation keeps its end (left truncation) and the tokenizer's leading special tokens
    (Llama's BOS). Returns (ids, whether the prompt was truncated)."""
    head = tokenizer.encode("")  # what the tokenizer puts before any text: [BOS], or nothing
    ids = encode(tokenizer, prompt, special=False)
    cut = max(0, len(head) + len(ids) - query_length)
    return head + ids[cut:], cut > 0


def response_ids(tokenizer, text: str):
    """A response gets one leading space and the EOS token (the EOS is appended as an id, never as text)."""
    return encode(tokenizer, " " + text.strip(), special=False) + [tokenizer.eos_token_id]


def load_tokenizer(path: str):
    tokenizer = from_pretrained(AutoTokenizer, path, padding_side="right")
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"the tokenizer of {path} has no EOS token; set `eos_token` in its tokenizer_config.json")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # a dedicated pad token: with pad = EOS, masking the padding would also mask the real EOS
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def comparison_texts(row: dict, i: int, source: str):
    """TL;DR comparison row -> (query fields, chosen text, rejected text); None for a CNN/DailyMail row, which
    openai/summarize_from_feedback mixes into its validation split (the N+ code drops them too). A malformed TL;DR row
    stops the run with a clear error."""
    if row["info"].get("article") is not None and all(row["info"].get(k) is None for k in ("post", "title", "subreddit")):
        # a CNN/DailyMail comparison (batches batch0_cnndm, cnndm0, cnndm2 of the validation split): an article, no post
        return None
    for key in ("post", "title", "subreddit"):
        if not isinstance(row["info"].get(key), str):
            raise SystemExit(f"{source} row {i}, column 'info.{key}': expected str, got {type(row['info'].get(key)).__name__}")
    texts = [s.get("text") if isinstance(s, dict) else None for s in row["summaries"]]
    if len(texts) != 2 or not all(isinstance(t, str) for t in texts) or row["choice"] not in (0, 1):
        raise SystemExit(f"{source} row {i}, column 'summaries'/'choice': expected two {{'text': str}} and choice 0 or 1")
    return row["info"], texts[row["choice"]], texts[1 - row["choice"]]


def build_pairs(args: Args, tokenizer, split: str, limit: Optional[int]):
    """(query ids, chosen ids, rejected ids) triples; unusable rows are skipped and counted."""
    name, schema = args.dataset_name, SCHEMAS[args.task]
    ds = load_rows(name, split, schema, args.dataset_config)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    pairs, counts = (
        [],
        {
            "rows": len(ds),
            "query_truncated": 0,
            "dropped_query_too_long": 0,
            "dropped_empty_response": 0,
            "dropped_identical_pair": 0,
            "dropped_response_too_long": 0,
            "dropped_no_shared_prompt": 0,
            "dropped_cnndm": 0,
        },
    )
    for i, row in enumerate(ds):
        check_row(row, i, schema, f"{name} ({split})")
        if args.task == "tldr":
            texts = comparison_texts(row, i, f"{name} ({split})")
            if texts is None:
                counts["dropped_cnndm"] += 1
                continue
            info, chosen, rejected = texts
            query = tldr_query(tokenizer, info, args.query_length)
            if query is None:
                counts["dropped_query_too_long"] += 1
                continue
            query_ids, truncated = query
        else:
            split_ = hh_split(row["chosen"], row["rejected"])
            if split_ is None:
                counts["dropped_no_shared_prompt"] += 1
                continue
            (query_ids, truncated), chosen, rejected = hh_prompt(tokenizer, split_[0], args.query_length), split_[1], split_[2]
        counts["query_truncated"] += truncated
        if not chosen.strip() or not rejected.strip():
            counts["dropped_empty_response"] += 1
            continue
        if chosen.strip() == rejected.strip():  # carries no preference
            counts["dropped_identical_pair"] += 1
            continue
        chosen_ids, rejected_ids = response_ids(tokenizer, chosen), response_ids(tokenizer, rejected)
        if max(len(chosen_ids), len(rejected_ids)) > args.response_length:  # a cut response would lose its EOS
            counts["dropped_response_too_long"] += 1
            continue
        pairs.append((query_ids, chosen_ids, rejected_ids))
    print(f"{name} ({split}): {len(pairs)} pairs kept; {counts}")
    if not pairs:
        raise SystemExit(f"no usable pair in {name} ({split}); see the counts above")
    return pairs


def from_pretrained(cls, path: str, **kwargs):
    """cls.from_pretrained, with a clear message when the Hub cannot be reached; for a model, the weights its checkpoint
    lacks (a new value or reward head: expected) are named in one line instead of transformers' load report."""
    try:
        if cls is AutoTokenizer:
            return cls.from_pretrained(path, **kwargs)
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except OSError as e:
        if os.path.exists(path):
            raise
        raise SystemExit(
            f"Could not load '{path}' ({e}). If this machine is offline, point --sft-model-path at a local "
            "folder saved with save_pretrained (sft.py writes one)."
        ) from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        print(
            f"{path}: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} initialised from scratch (not in the "
            "checkpoint)"
        )
    return model


def left_pad(sequences, pad_id: int, width: int = 0):
    """A (rows, max(width, longest)) tensor of token lists, padded on the left."""
    width = max(width, max(len(s) for s in sequences))
    return torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])


def sequence_logprobs(model, pairs, pad_id: int, device):
    """Summed log-probs of the chosen and the rejected responses of a micro-batch, in one forward pass.
    The sequences are left-padded, so every response token lies in the last K positions (K = the longest
    response): the LM head runs on those alone (logits_to_keep), never on the prompt. Prompt and padding
    tokens inside that window are masked out. Returns (chosen (n,), rejected (n,))."""
    sequences = [q + c for q, c, _ in pairs] + [q + r for q, _, r in pairs]
    lengths = torch.tensor([len(c) for _, c, _ in pairs] + [len(r) for _, _, r in pairs], device=device)
    input_ids = left_pad(sequences, pad_id).to(device)
    k = int(lengths.max())
    attention_mask = input_ids != pad_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    logits = model(
        input_ids=input_ids.masked_fill(~attention_mask, 0),
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=k + 1,
    ).logits[:, :-1]  # (2n, k, vocab): predictions of the last k tokens
    targets = input_ids[:, -k:]
    response_mask = torch.arange(k, device=device).unsqueeze(0) >= (k - lengths).unsqueeze(1)  # (2n, k)
    logps = torch.gather(logits.float().log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    summed = (logps * response_mask).sum(1)
    return summed[: len(pairs)], summed[len(pairs) :]


def dpo_loss(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    rpo_alpha: float = 0.0,
    chosen_lengths=None,
):
    """DPO: -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))), with conservative label smoothing, or IPO's
    (h - 1 / (2 beta))^2; RPO adds rpo_alpha * the chosen responses' NLL per token (chosen_lengths: their token
    counts). Returns (mean loss, implicit chosen rewards, implicit rejected rewards)."""
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    if rpo_alpha:
        losses = losses + rpo_alpha * -policy_chosen / chosen_lengths
    return losses.mean(), beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def hub_revision(model_id: str):
    """The commit a Hub id resolves to now (online), or in the local Hub cache (offline): the folder its config.json
    lies in is snapshots/<commit>. None when it cannot be resolved (the model cannot be loaded either, then)."""
    from huggingface_hub import hf_hub_download  # comes with transformers

    try:
        return os.path.basename(os.path.dirname(hf_hub_download(model_id, "config.json")))
    except Exception:
        return None


def cache_key(model_path: str, settings: str, pairs_by_split: dict):
    """Hash of the reference model (a local folder: its files' names, sizes and times; a Hub id: the commit it resolves
    to, so that a model updated on the Hub is another model), of the settings it runs with (dtype, device) and of the
    exact token ids of every pair: a change to the model, its precision, the data or the tokenisation misses the cache."""
    h = hashlib.sha256(f"{model_path}|{settings}".encode())
    if os.path.isdir(model_path):
        for name in sorted(os.listdir(model_path)):
            stat = os.stat(os.path.join(model_path, name))
            h.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        h.update(f"revision:{hub_revision(model_path)}".encode())
    for split, pairs in sorted(pairs_by_split.items()):
        h.update(split.encode())
        h.update(json.dumps(pairs).encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def all_logprobs(model, pairs, args: Args, pad_id: int, device, autocast, rank: int = 0, world: int = 1):
    """Summed log-probs of every pair's chosen and rejected response: (chosen (n,), rejected (n,)). Under torchrun each
    process computes a contiguous share and every process gets the whole (all_gather)."""
    model.eval()
    share = -(-len(pairs) // world)
    mine = pairs[rank * share : (rank + 1) * share]
    logps = torch.zeros(share, 2, device=device)  # the last share may be shorter: its tail stays 0 and is cut below
    for start in range(0, share, args.local_micro_batch_size):  # as many passes on every process (FSDP's are collective)
        chunk = mine[start : start + args.local_micro_batch_size]
        with autocast:
            c, r = sequence_logprobs(model, chunk or pairs[:1], pad_id, device)  # a stand-in when the share ran out
        logps[start : start + len(chunk)] = torch.stack([c, r], 1).float()[: len(chunk)]
    model.train()
    if world > 1:
        parts = [torch.empty_like(logps) for _ in range(world)]
        dist.all_gather(parts, logps)
        logps = torch.cat(parts)
    logps = logps[: len(pairs)].cpu()
    return logps[:, 0], logps[:, 1]


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def rng_states():
    """Every RNG state, as tensors, numbers and strings only (so that state.pt loads with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- distributed (torchrun): each function is a no-op in one process, where a reader can skip them ----
def init_distributed(args):
    """(rank, number of processes, device). Under torchrun every process trains the same model on its share of each
    batch: NCCL between GPUs, gloo between CPU processes. A rank that dies stops the job (torchrun ends the others)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and args.cuda
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if "RANK" in os.environ:  # launched by torchrun (any number of processes)
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        if rank > 0:  # one console: rank 0 prints (errors, on stderr, come from every rank)
            sys.stdout = open(os.devnull, "w")
    return rank, world, device


def all_sum(tensor):
    """The sum of a tensor over all processes, in place."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def average_gradients(params):
    """Each process holds the gradient of the mean loss over its share of the batch; their average is the gradient of
    the mean over the whole batch. What DDP does during the backward pass, written out in one loop: no wrapper between
    the reader and the model."""
    if dist.is_initialized():
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


def shard(model):
    """FSDP2 (torch.distributed.fsdp.fully_shard): each decoder layer is a unit, gathered for its forward and backward
    passes and freed after; the rest (embeddings, final norm, head) is the root unit. Gradients are averaged across the
    processes, as average_gradients does without FSDP."""
    from torch.distributed.fsdp import fully_shard

    units = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]  # the decoder layers
    for unit in units + [model]:
        fully_shard(unit)
    held = sum(p.to_local().numel() for p in model.parameters())
    print(
        f"FSDP: {type(model).__name__} in {len(units) + 1} units; this process holds {held:,} of its "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )


@contextlib.contextmanager
def gathered(model):
    """FSDP: the whole model on every process for a generate() call, gathered once and not at every decode step (the
    trap of trl#1726), then sharded again: one full copy of the weights for that time. A no-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # FSDP's default: the root stays gathered
            unit.reshard()


def full_state(model, optimizer):
    """(model state, optimizer state) with whole tensors: what a checkpoint holds, the same files with FSDP or without.
    Under FSDP every process must call it, as each sharded tensor (a DTensor) is gathered from all of them."""

    def whole(tensor):
        return tensor.full_tensor().cpu() if hasattr(tensor, "full_tensor") else tensor

    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = {i: {k: whole(v) for k, v in s.items()} for i, s in optimizer_state["state"].items()}
    return {k: whole(v) for k, v in model.state_dict().items()}, optimizer_state


def load_optimizer_state(optimizer, state):
    """A checkpoint's optimizer state (full_state's) into the optimizer; with FSDP each process keeps its shard of it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, s in state["state"].items():
        if hasattr(params[i], "device_mesh"):  # a sharded parameter: shard its moments alike
            from torch.distributed.tensor import distribute_tensor

            state["state"][i] = {
                k: distribute_tensor(v.to(params[i].device), params[i].device_mesh, params[i].placements)
                if v.shape == params[i].shape
                else v
                for k, v in s.items()
            }
    optimizer.load_state_dict(state)


def broadcast(value):
    """Rank 0's value of a Python object (e.g. a run name that holds the start time) on every process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


# ---- checkpoints: written whole, made current by one rename; a resumed run is the run it continues ----
RESUMABLE = {"resume_from", "save_every", "keep_checkpoints", "eval_every", "output_dir", "fsdp"}


def save_checkpoint(run_dir: str, update: int, keep: int, write):
    """write(folder) fills a temporary folder; one atomic rename then makes it checkpoint `update`. A kill at any
    instant leaves the previous complete checkpoint; the oldest beyond `keep` are deleted only after the rename."""
    folder, tmp = f"{run_dir}/checkpoints/update_{update:07d}", f"{run_dir}/checkpoints/incomplete"
    shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)  # a damaged checkpoint of this update, passed over when resuming
    os.replace(tmp, folder)
    for old in sorted(glob.glob(f"{run_dir}/checkpoints/update_*"))[:-keep]:
        shutil.rmtree(old)
    return folder


def checkpoint_candidates(args):
    """Checkpoint folders that --resume-from points to, newest first."""
    where = args.resume_from.rstrip("/")
    if where == "auto":
        runs = sorted(glob.glob(f"runs/{args.task}__{args.exp_name}__{args.seed}__*"), key=lambda r: int(r.rsplit("__", 1)[1]))
        return next(
            (found for run in reversed(runs) if (found := sorted(glob.glob(f"{run}/checkpoints/update_*"), reverse=True))), []
        )
    if os.path.isdir(f"{where}/checkpoints") or os.path.exists(f"{where}/args.json"):  # a run folder
        return sorted(glob.glob(f"{where}/checkpoints/update_*"), reverse=True)
    if os.path.isdir(where):  # one checkpoint, then the older ones beside it
        return [where] + sorted((c for c in glob.glob(f"{os.path.dirname(where)}/update_*") if c < where), reverse=True)
    raise SystemExit(f"--resume-from {where}: no such folder")


def load_checkpoint(candidates):
    """The newest checkpoint that loads: (folder, state). One that does not (a missing or truncated file, a state.pt
    holding anything but tensors and numbers) is named and passed over. Nothing is unpickled but plain data."""
    from safetensors import safe_open

    for folder in candidates:
        try:
            state = torch.load(f"{folder}/state.pt", weights_only=True)  # runs no code, whatever the file holds
            weights = sorted(
                os.path.basename(f) for f in glob.glob(f"{folder}/*.safetensors")
            )  # one file, or a large model's shards
            for name in ["lora.pt"] if state["config"]["use_lora"] else ["config.json"] + (weights or ["model.safetensors"]):
                if not os.path.exists(f"{folder}/{name}"):
                    raise FileNotFoundError(f"{name} is missing")
                if name.endswith(".safetensors"):
                    with safe_open(f"{folder}/{name}", "pt"):  # checks the header against the file's size
                        pass
                elif name.endswith(".pt"):
                    torch.load(f"{folder}/{name}", weights_only=True)
            return folder, state
        except Exception as e:  # noqa: BLE001 (any damage: name it and try the previous checkpoint)
            print(f"WARNING: checkpoint {folder} does not load ({type(e).__name__}: {str(e)[:300]}); trying the previous one")
    raise SystemExit(f"--resume-from: no checkpoint loads among {candidates}")


def given_flags():
    """The Args fields the command line sets explicitly (--no-x sets x)."""
    names = {a.split("=")[0][2:].replace("-", "_") for a in sys.argv[1:] if a.startswith("--")}
    return {n for n in names | {n[3:] for n in names if n.startswith("no_")} if n in Args.__dataclass_fields__}


def resume_config(args):
    """(args, checkpoint state) for --resume-from: the run's flags, from its checkpoint (or, for a run stopped before its
    first checkpoint, from its args.json: it starts again), with the RESUMABLE ones given anew. A flag given with
    another value than the saved one is refused here, before any model is loaded."""
    candidates = checkpoint_candidates(args)
    config_file = f"{args.resume_from.rstrip('/')}/args.json"
    if candidates:
        folder, state = load_checkpoint(candidates)
        saved = state["config"]
    elif os.path.exists(config_file):
        folder, state, saved = None, None, json.load(open(config_file))
        print(f"--resume-from {args.resume_from}: no checkpoint yet; the run starts again with the flags of {config_file}")
    else:  # --resume-from auto with nothing to resume: a new run
        print("--resume-from auto: no checkpoint of this run under runs/, starting a new run")
        args.resume_from = None
        return args, None
    given = given_flags()
    clash = [
        f"--{k.replace('_', '-')} {getattr(args, k)} (saved: {saved[k]})"
        for k in sorted(given - RESUMABLE)
        if getattr(args, k) != saved[k]
    ]
    if clash:
        raise SystemExit(
            f"--resume-from {args.resume_from}: the run was started with other flags: {'; '.join(clash)}. Only "
            f"{', '.join('--' + k.replace('_', '-') for k in sorted(RESUMABLE))} may change on resume."
        )
    return Args(**{**saved, **{k: getattr(args, k) for k in given & RESUMABLE}, "resume_from": folder}), state


def writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise SystemExit(f"cannot write to {folder}: {e}")


def check_flags(args, rules):
    """Refuse a flag out of its range before anything is loaded, naming it. rules: {field: (test, what it must be)}."""
    for name, (ok, must) in rules.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise SystemExit(f"--{name.replace('_', '-')} {value}: must be {must}")


def check_hub(paths):
    """Fail in seconds, not after minutes of retries, when a Hub id is asked for and the Hub cannot be reached."""
    remote = list(dict.fromkeys(p for p in paths if p and not os.path.exists(p) and not p.endswith((".json", ".jsonl"))))
    if not remote or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=5).close()
    except urllib.error.HTTPError:  # an answer, even an error status: the Hub is there
        pass
    except OSError as e:  # no answer: offline, a firewall, a wrong HF_ENDPOINT
        raise SystemExit(
            f"{', '.join(remote)}: not on this machine, and the Hugging Face Hub ({endpoint}) cannot be reached "
            f"({getattr(e, 'reason', e)}). Offline, point these flags at local folders or json/jsonl files, or set "
            "HF_HUB_OFFLINE=1 to use what the Hub cache already holds."
        )


def save_config(args):
    """The run's whole config in runs/{run_name}/args.json (what --resume-from reads back); the console gets the flags
    that differ from their defaults."""
    config, path = asdict(args), f"runs/{args.run_name}/args.json"
    with open(f"{path}.tmp", "w") as f:
        json.dump(config, f, indent=1)
    os.replace(f"{path}.tmp", path)
    changed = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in config.items()
        if k not in COMPUTED and k != "run_name" and v != Args.__dataclass_fields__[k].default
    ]
    print(f"run {args.run_name}: {' '.join(changed) or 'the default flags'} (every flag: {path})")


if __name__ == "__main__":
    args = tyro.cli(Args)
    checkpoint = None
    if args.resume_from:  # the run's flags come from its checkpoint
        args, checkpoint = resume_config(args)
    args.sft_model_path = args.sft_model_path or DEFAULT_MODELS[args.task]
    if args.dataset_name is None:
        args.dataset_name, args.dataset_config = DEFAULT_DATASETS[args.task]
    args.response_length = args.response_length or DEFAULT_RESPONSE_LENGTH[args.task]
    args.eval_split = args.eval_split or {"tldr": "validation", "hh": "test"}[args.task]
    check_flags(args, FLAG_RULES)
    check_hub([args.sft_model_path, args.dataset_name])
    rank, world, device = init_distributed(args)  # under torchrun; (0, 1, cuda or cpu) in one process
    if args.fsdp and not dist.is_initialized():
        raise SystemExit(
            "--fsdp shards the policy across the processes of torchrun: torchrun --nproc_per_node N dpo_baseline.py --fsdp ..."
        )
    if args.fsdp and args.use_lora:
        raise SystemExit(
            "--fsdp with --use-lora is not supported: with LoRA only the adapters train, and the frozen base fits one GPU"
        )
    if args.batch_size % (args.local_micro_batch_size * world):
        raise SystemExit(f"--batch-size must be a multiple of --local-micro-batch-size x processes ({world})")
    args.gradient_accumulation_steps = args.batch_size // (args.local_micro_batch_size * world)
    if not args.run_name:
        args.run_name = broadcast(f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}")
    elif checkpoint is None and "run_name" in given_flags() and os.path.exists(f"runs/{args.run_name}/metrics.jsonl"):
        raise SystemExit(
            f"runs/{args.run_name} holds a run already: choose another --run-name, or --resume-from runs/{args.run_name}"
        )
    writable(args.output_dir)  # fail now, not after hours of training
    writable(f"runs/{args.run_name}")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if args.frozen_dtype == "auto":  # a frozen model needs no fp32 copy on a GPU; on a CPU bf16 is slow
        args.frozen_dtype = "bfloat16" if device.type == "cuda" else "float32"
    print(
        f"dtypes: policy {args.dtype} (trained), reference {args.frozen_dtype} (frozen), "
        f"bf16 autocast {'on' if device.type == 'cuda' else 'off'} ({device.type}, {world} process{'es' if world > 1 else ''})"
    )

    tokenizer = load_tokenizer(args.sft_model_path)
    pad_id = tokenizer.pad_token_id
    train_pairs = build_pairs(args, tokenizer, args.train_split, args.max_train_samples)
    eval_pairs = build_pairs(args, tokenizer, args.eval_split, args.max_eval_samples)
    args.num_updates = args.num_train_epochs * len(train_pairs) // args.batch_size
    if args.num_updates == 0:
        raise SystemExit(f"{len(train_pairs)} pairs are fewer than one batch of {args.batch_size}")
    if rank == 0:
        save_config(args)

    # ---- reference log-probs: computed once, cached on disk; a cache hit never loads the reference model ----
    key = cache_key(args.sft_model_path, f"{args.frozen_dtype}|{device.type}", {"train": train_pairs, "eval": eval_pairs})
    cache_file = f"{args.ref_cache_dir}/{key}.pt"
    if broadcast(os.path.exists(cache_file)):  # rank 0 decides: it alone writes the cache
        ref = torch.load(cache_file)
        print(f"reference log-probs from the cache {cache_file}; the reference model is not loaded")
    else:
        ref_model = from_pretrained(AutoModelForCausalLM, args.sft_model_path, dtype=getattr(torch, args.frozen_dtype)).to(
            device
        )
        if len(tokenizer) > ref_model.get_input_embeddings().num_embeddings:
            ref_model.resize_token_embeddings(len(tokenizer))
        start = time.time()
        # under torchrun each process computes a share and all get the whole: the reference runs once, not once a process
        ref = {
            "train": all_logprobs(ref_model, train_pairs, args, pad_id, device, autocast, rank, world),
            "eval": all_logprobs(ref_model, eval_pairs, args, pad_id, device, autocast, rank, world),
        }
        del ref_model
        if rank == 0:
            os.makedirs(args.ref_cache_dir, exist_ok=True)
            torch.save(ref, cache_file + ".tmp")
            os.replace(cache_file + ".tmp", cache_file)  # a crash never leaves a half-written cache
        print(f"computed the reference log-probs in {time.time() - start:.1f}s; cached in {cache_file}")

    policy = from_pretrained(
        AutoModelForCausalLM,
        args.resume_from if checkpoint and not args.use_lora else args.sft_model_path,
        dtype=getattr(torch, args.dtype),
    )
    if len(tokenizer) > policy.get_input_embeddings().num_embeddings:
        policy.resize_token_embeddings(len(tokenizer))
    policy.config.pad_token_id = pad_id
    for module in policy.modules():  # dropout off (N+ detail)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if args.use_lora:
        from peft import LoraConfig, get_peft_model  # only imported when asked for

        policy = get_peft_model(
            policy, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
        )
        if checkpoint:
            policy.load_state_dict(torch.load(f"{args.resume_from}/lora.pt", weights_only=True), strict=False)
        policy.print_trainable_parameters()
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        if args.use_lora:
            policy.enable_input_require_grads()
    policy = policy.to(device).train()
    if args.fsdp:  # each process keeps 1/processes of the policy's weights, gradients and AdamW state
        shard(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, eps=args.eps)
    # cosine decay to 0, no warmup: transformers' get_cosine_schedule_with_warmup to the last bit, without the seconds its
    # import costs at start-up
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * (step / args.num_updates)))
    )
    start_update = 1
    if checkpoint:
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_states(checkpoint["rng"])
        start_update = checkpoint["update"] + 1
        print(f"resumed from {args.resume_from} at step {start_update}")
    log_path = f"runs/{args.run_name}/metrics.jsonl"
    if checkpoint and os.path.exists(log_path) and rank == 0:  # each step logged once: drop what followed the checkpoint
        kept = []
        for line in open(log_path):
            try:
                if json.loads(line)["update"] < start_update:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by the kill
                break
        with open(f"{log_path}.tmp", "w") as f:
            f.writelines(kept)
        os.replace(f"{log_path}.tmp", log_path)
    log = open(log_path if rank == 0 else os.devnull, "a" if checkpoint else "w")  # rank 0 writes the log
    if args.track and rank == 0:
        import wandb  # only imported when asked for

        wandb.init(project="drpo", name=args.run_name, config=asdict(args), resume="allow", id=args.run_name)

    generator = torch.Generator().manual_seed(args.seed)  # the data order is a function of the seed: resume-safe
    order = torch.cat([torch.randperm(len(train_pairs), generator=generator) for _ in range(args.num_train_epochs)])
    start_time = time.time()
    # a progress bar with an ETA on a terminal (none in a log file, nor on other processes than rank 0)
    progress = tqdm(
        range(start_update, args.num_updates + 1),
        initial=start_update - 1,
        total=args.num_updates,
        unit="update",
        disable=rank > 0 or not sys.stderr.isatty(),
    )
    for update in progress:
        idx = order[(update - 1) * args.batch_size : update * args.batch_size]
        share = args.batch_size // world  # this process's share of the batch (all of it in one process)
        idx = idx[rank * share : (rank + 1) * share]
        micro_batches = args.gradient_accumulation_steps * world  # in the whole batch: each mean loss weighs 1 / this
        stats = {
            k: 0.0
            for k in (
                "loss",
                "rewards/chosen",
                "rewards/rejected",
                "rewards/accuracies",
                "rewards/margins",
                "logps/chosen",
                "logps/rejected",
            )
        }
        for start in range(0, share, args.local_micro_batch_size):
            mb = idx[start : start + args.local_micro_batch_size]
            with autocast:
                logp_c, logp_r = sequence_logprobs(policy, [train_pairs[i] for i in mb], pad_id, device)
            loss, reward_c, reward_r = dpo_loss(
                logp_c,
                logp_r,
                ref["train"][0][mb].to(device),
                ref["train"][1][mb].to(device),
                args.beta,
                args.label_smoothing,
                args.loss_type,
                args.rpo_alpha,
                torch.tensor([len(train_pairs[i][1]) for i in mb], device=device),
            )
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss {loss.item()} at step {update}; lower --lr or check the data")
            (loss / args.gradient_accumulation_steps).backward()  # averaged over the processes below
            for k, v in (
                ("loss", loss.detach()),
                ("rewards/chosen", reward_c.mean()),
                ("rewards/rejected", reward_r.mean()),
                ("rewards/accuracies", (reward_c > reward_r).float().mean()),
                ("rewards/margins", (reward_c - reward_r).mean()),
                ("logps/chosen", logp_c.detach().mean()),
                ("logps/rejected", logp_r.detach().mean()),
            ):
                stats[k] += v.item() / micro_batches
        if not args.fsdp:  # (FSDP has averaged the gradient shards already)
            average_gradients(params)  # distributed: the gradient of the whole batch on every process
        stats = dict(zip(stats, all_sum(torch.tensor(list(stats.values()), dtype=torch.float64, device=device)).tolist()))
        if args.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        metrics = {
            "update": update,
            **stats,
            "lr": scheduler.get_last_lr()[0],
            "pairs_per_s": (update - start_update + 1) * args.batch_size / (time.time() - start_time),
            "peak_memory_gb": peak_memory_gb(device),
        }
        if update % args.eval_every == 0 or update == args.num_updates:
            logp_c, logp_r = all_logprobs(policy, eval_pairs, args, pad_id, device, autocast, rank, world)
            reward_margin = (logp_c - ref["eval"][0]) - (logp_r - ref["eval"][1])
            metrics["eval/rewards/accuracies"] = (reward_margin > 0).float().mean().item()
            metrics["eval/rewards/margins"] = args.beta * reward_margin.mean().item()
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        log.write(json.dumps(metrics) + "\n")
        log.flush()
        if args.track and rank == 0:
            wandb.log(metrics, step=update)

        # ---- checkpoint: policy (or its adapter), optimizer, schedule, RNG states and step index ----
        if args.save_every and update % args.save_every == 0 and update < args.num_updates:
            weights, optimizer_state = full_state(policy, optimizer)  # FSDP: every process takes part in gathering them

            def write(folder):
                os.makedirs(folder)
                if args.use_lora:  # the base stays the SFT model: only the adapter is saved
                    torch.save({k: v for k, v in weights.items() if "lora_" in k}, f"{folder}/lora.pt")
                else:
                    policy.save_pretrained(folder, state_dict=weights)
                tokenizer.save_pretrained(folder)
                time.sleep(float(os.environ.get("SLOW_SAVE_S", 0)))  # a test hook: widens the window a kill can land in
                # the data order is a function of the seed, so the step index is enough to continue it
                torch.save(
                    {
                        "optimizer": optimizer_state,
                        "scheduler": scheduler.state_dict(),
                        "rng": rng_states(),
                        "update": update,
                        "config": asdict(args),
                    },
                    f"{folder}/state.pt",
                )

            if rank == 0:  # one writer
                folder = save_checkpoint(f"runs/{args.run_name}", update, args.keep_checkpoints, write)
                print(f"checkpoint written to {folder} (resume with --resume-from {folder}, or --resume-from auto)")

    final = policy.merge_and_unload() if args.use_lora else policy
    weights, _ = full_state(final, optimizer)
    if rank == 0:  # a standard save_pretrained folder, which loads on one device, with FSDP or without
        final.save_pretrained(args.output_dir, state_dict=weights)
        tokenizer.save_pretrained(args.output_dir)
        print(f"saved the policy and tokenizer to {args.output_dir}")
    if dist.is_initialized():  # every process leaves together: none closes its connections while another still uses them
        dist.barrier()
        dist.destroy_process_group()
