# Supervised fine-tuning for RLHF (TL;DR summaries or HH chosen responses). Docs: README.md#sftpy
import contextlib
import glob
import json
import math
import os
import random
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
    exp_name: str = "sft"
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
    """tldr: Reddit TL;DR summaries; hh: Anthropic HH chosen responses"""
    base_model: str = "EleutherAI/pythia-1b-deduped"
    """the model to fine-tune: a Hub id or a local folder"""
    dataset_name: Optional[str] = None
    """Hub id, local folder or json/jsonl file (default: vwxyzjn/summarize_from_feedback_tldr_3_filtered for tldr,
    Anthropic/hh-rlhf for hh)"""
    train_split: str = "train"
    """split to train on (datasets slicing works: `train[:90%]`; a single file has only `train`)"""
    eval_split: Optional[str] = None
    """split for the eval loss (default: `validation` for tldr, `test` for hh)"""
    query_length: int = 512
    """max prompt tokens: TL;DR posts are cut back at their last newline, HH prompts keep their end"""
    response_length: Optional[int] = None
    """max response tokens, EOS included; longer references are skipped and counted (default: 53 tldr, 128 hh)"""
    max_train_samples: Optional[int] = None
    """use only the first N training rows (debugging)"""
    max_eval_samples: Optional[int] = 1000
    """use only the first N eval rows"""

    # ---- optimisation and batch sizes ----
    lr: float = 3e-6
    """learning rate (cosine schedule to 0)"""
    eps: float = 1e-5
    """AdamW epsilon"""
    num_train_epochs: int = 1
    """passes over the training data"""
    batch_size: int = 128
    """examples per optimizer step, over all processes (under torchrun each takes batch_size / processes of them)"""
    local_micro_batch_size: int = 16
    """examples per forward pass and process; batch_size / (local_micro_batch_size x processes) is the gradient accumulation"""

    # ---- evaluation ----
    eval_every: int = 100
    """eval loss every N optimizer steps (and at the end)"""

    # ---- memory: dtypes, LoRA, gradient checkpointing, FSDP ----
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the trained weights, whatever the checkpoint stores: Pythia is stored in fp16, where AdamW's second moment
    underflows. bfloat16 halves their memory and loses small updates; bf16 autocast runs on CUDA either way"""
    fsdp: bool = False
    """under torchrun, shard the weights, gradients and AdamW state across the processes (FSDP2), for a model that does
    not fit one GPU; checkpoints and the final model are saved whole, as without it"""

    # ---- logging and checkpoints ----
    save_every: int = 100
    """write a checkpoint every N optimizer steps (0: never), to runs/{run_name}/checkpoints/update_N"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep (older ones are deleted once a new one is complete)"""
    resume_from: Optional[str] = None
    """`auto`: the newest checkpoint of the newest run under runs/ with this --task, --exp-name and --seed (a new run
    when there is none); a run folder runs/{run_name}: its newest checkpoint; or one checkpoint folder. The run's flags
    come from the checkpoint; only those in RESUMABLE may be given anew"""
    output_dir: str = "models/sft"
    """where the fine-tuned model and tokenizer are saved"""

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
    "eval_every": NON_NEGATIVE,
    "save_every": NON_NEGATIVE,
}


DEFAULT_DATASETS = {"tldr": "vwxyzjn/summarize_from_feedback_tldr_3_filtered", "hh": "Anthropic/hh-rlhf"}
DEFAULT_RESPONSE_LENGTH = {"tldr": 53, "hh": 128}
SCHEMAS = {"tldr": {"subreddit": str, "title": str, "post": str, "summary": str}, "hh": {"chosen": str, "rejected": str}}
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


def build_examples(args: Args, tokenizer, split: str, limit: Optional[int]):
    """(query ids, response ids) pairs; rows that cannot be used are skipped and counted."""
    name = args.dataset_name
    schema = SCHEMAS[args.task]
    ds = load_rows(name, split, schema)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    examples, counts = (
        [],
        {
            "rows": len(ds),
            "query_truncated": 0,
            "dropped_query_too_long": 0,
            "dropped_empty_response": 0,
            "dropped_response_too_long": 0,
            "dropped_no_shared_prompt": 0,
        },
    )
    for i, row in enumerate(ds):
        check_row(row, i, schema, f"{name} ({split})")
        if args.task == "tldr":
            query = tldr_query(tokenizer, row, args.query_length)
            if query is None:
                counts["dropped_query_too_long"] += 1
                continue
            query_ids, truncated = query
            response = row["summary"]
        else:
            split_ = hh_split(row["chosen"], row["rejected"])
            if split_ is None:
                counts["dropped_no_shared_prompt"] += 1
                continue
            (query_ids, truncated), response = hh_prompt(tokenizer, split_[0], args.query_length), split_[1]
        counts["query_truncated"] += truncated
        if not response.strip():
            counts["dropped_empty_response"] += 1
            continue
        ids = response_ids(tokenizer, response)
        if len(ids) > args.response_length:  # a cut reference would teach the model to never stop
            counts["dropped_response_too_long"] += 1
            continue
        examples.append((query_ids, ids))
    print(f"{name} ({split}): {len(examples)} examples kept; {counts}")
    if not examples:
        raise SystemExit(f"no usable example in {name} ({split}); see the counts above")
    return examples


def collate(examples, pad_id: int, device):
    """Left-padded query+response, so that every response ends at the last position; labels are -100 on the query and
    the padding (loss on the response only)."""
    width = max(len(q) + len(r) for q, r in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (q, r) in enumerate(examples):
        input_ids[i, width - len(q) - len(r) :] = torch.tensor(q + r)
        labels[i, width - len(r) :] = torch.tensor(r)
    return input_ids.to(device), (input_ids != pad_id).long().to(device), labels.to(device)


def response_loss(model, input_ids, attention_mask, labels):
    """Mean next-token cross-entropy over response tokens. With left padding every response lies in the last k positions
    (k: the longest response of the batch), so the LM head runs on those alone (logits_to_keep): full-vocabulary logits
    over the query would cost most of the time and memory and never be used. The model's own forward pass (not its
    trunk and head apart) is what FSDP shards."""
    k = int((labels != -100).sum(1).max())
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # counted from each row's first real token
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=k + 1).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, -k:].flatten(), ignore_index=-100)


def disable_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@torch.no_grad()
def evaluate(model, examples, args: Args, pad_id: int, device, autocast, rank: int = 0, world: int = 1):
    """Mean loss per response token over the eval examples (each process takes a contiguous share of them)."""
    model.eval()
    share = -(-len(examples) // world)
    eval_examples_head, examples = examples[:1], examples[rank * share : (rank + 1) * share]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, token count
    for start in range(0, share, args.local_micro_batch_size):  # as many passes on every process (FSDP's are collective)
        chunk = examples[start : start + args.local_micro_batch_size]
        input_ids, attention_mask, labels = collate(chunk or eval_examples_head, pad_id, device)
        with autocast:
            loss = response_loss(model, input_ids, attention_mask, labels)
        n = (labels != -100).sum() * bool(chunk)  # a stand-in pass, on a process whose share has run out, counts 0
        total += torch.stack([loss.double() * n, n.double()])
    model.train()
    total = all_sum(total)
    return (total[0] / total[1]).item()


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
            f"Could not load '{path}' ({e}). If this machine is offline, point --base-model at a local folder "
            "saved with save_pretrained (`python tiny_world.py` writes one to tiny/base)."
        ) from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        print(
            f"{path}: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} initialised from scratch (not in the "
            "checkpoint)"
        )
    return model


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
            for name in ["config.json"] + (weights or ["model.safetensors"]):
                if not os.path.exists(f"{folder}/{name}"):
                    raise FileNotFoundError(f"{name} is missing")
                if name.endswith(".safetensors"):
                    with safe_open(f"{folder}/{name}", "pt"):  # checks the header against the file's size
                        pass
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
    args.dataset_name = args.dataset_name or DEFAULT_DATASETS[args.task]
    args.response_length = args.response_length or DEFAULT_RESPONSE_LENGTH[args.task]
    args.eval_split = args.eval_split or {"tldr": "validation", "hh": "test"}[args.task]
    check_flags(args, FLAG_RULES)
    check_hub([args.base_model, args.dataset_name])
    rank, world, device = init_distributed(args)  # under torchrun; (0, 1, cuda or cpu) in one process
    if args.fsdp and not dist.is_initialized():
        raise SystemExit(
            "--fsdp shards the model across the processes of torchrun: torchrun --nproc_per_node N sft.py --fsdp ..."
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
    print(
        f"dtypes: trained weights {args.dtype}, bf16 autocast {'on' if device.type == 'cuda' else 'off'} ({device.type}, "
        f"{world} process{'es' if world > 1 else ''})"
    )

    tokenizer = load_tokenizer(args.base_model)
    train_examples = build_examples(args, tokenizer, args.train_split, args.max_train_samples)
    eval_examples = build_examples(args, tokenizer, args.eval_split, args.max_eval_samples)
    args.num_updates = args.num_train_epochs * len(train_examples) // args.batch_size
    if args.num_updates == 0:
        raise SystemExit(f"{len(train_examples)} examples are fewer than one batch of {args.batch_size}")
    if rank == 0:
        save_config(args)

    model = from_pretrained(AutoModelForCausalLM, args.resume_from or args.base_model, dtype=getattr(torch, args.dtype)).to(
        device
    )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    disable_dropout(model)  # RLHF fine-tuning runs with dropout off (N+ detail)
    model.train()
    if args.fsdp:  # each process keeps 1/processes of the weights, gradients and AdamW state
        shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.eps)
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
        print(f"resumed from {args.resume_from} at update {start_update}")
    log_path = f"runs/{args.run_name}/metrics.jsonl"
    if checkpoint and os.path.exists(log_path) and rank == 0:  # each update logged once: drop what followed the checkpoint
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

    generator = torch.Generator().manual_seed(args.seed)  # the data order is a function of the seed: resume-safe
    order = torch.cat([torch.randperm(len(train_examples), generator=generator) for _ in range(args.num_train_epochs)])
    start_time, tokens_seen = time.time(), 0
    # a progress bar with an ETA on a terminal (none in a log file, nor on other processes than rank 0)
    progress = tqdm(
        range(start_update, args.num_updates + 1),
        initial=start_update - 1,
        total=args.num_updates,
        unit="update",
        disable=rank > 0 or not sys.stderr.isatty(),
    )
    for update in progress:
        batch = [train_examples[i] for i in order[(update - 1) * args.batch_size : update * args.batch_size]]
        share = args.batch_size // world  # this process's share of the batch (all of it in one process)
        batch = batch[rank * share : (rank + 1) * share]
        # every micro-batch's mean loss weighs 1 / (micro-batches in the whole batch): the objective of any process count
        micro_batches = args.gradient_accumulation_steps * world
        sums = torch.zeros(2, dtype=torch.float64)  # loss, tokens
        for start in range(0, share, args.local_micro_batch_size):
            input_ids, attention_mask, labels = collate(
                batch[start : start + args.local_micro_batch_size], tokenizer.pad_token_id, device
            )
            with autocast:
                loss = response_loss(model, input_ids, attention_mask, labels)
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss {loss.item()} at update {update}; lower --lr or check the data")
            (loss / args.gradient_accumulation_steps).backward()  # averaged over the processes below
            sums += torch.tensor([loss.item() / micro_batches, attention_mask.sum().item()], dtype=torch.float64)
        if not args.fsdp:  # (FSDP has averaged the gradient shards already)
            average_gradients(model.parameters())  # distributed: the gradient of the whole batch on every process
        loss_sum, tokens = all_sum(sums.to(device)).tolist()
        tokens_seen += tokens
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        metrics = {
            "update": update,
            "loss": loss_sum,
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": tokens_seen / (time.time() - start_time),
        }
        if update % args.eval_every == 0 or update == args.num_updates:
            metrics["eval_loss"] = evaluate(model, eval_examples, args, tokenizer.pad_token_id, device, autocast, rank, world)
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        log.write(json.dumps(metrics) + "\n")
        log.flush()

        # ---- checkpoint: model, optimizer, schedule, RNG states and update index (the data order is a function of both) ----
        if args.save_every and update % args.save_every == 0 and update < args.num_updates:
            weights, optimizer_state = full_state(model, optimizer)  # FSDP: every process takes part in gathering them

            def write(folder):
                model.save_pretrained(folder, state_dict=weights)
                tokenizer.save_pretrained(folder)
                time.sleep(float(os.environ.get("SLOW_SAVE_S", 0)))  # a test hook: widens the window a kill can land in
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

    model.eval()
    # never write the pad token, nor an embedding row past the tokenizer (no text encodes to it), as the RL scripts
    non_tokens = [tokenizer.pad_token_id] + list(range(len(tokenizer), model.get_input_embeddings().num_embeddings))
    with gathered(model):  # FSDP: the weights gathered once for generate(); every process generates, rank 0 prints
        for query_ids, reference in eval_examples[:3]:  # a glance at what the model learnt
            out = model.generate(
                torch.tensor([query_ids], device=device),
                max_new_tokens=args.response_length,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                suppress_tokens=non_tokens,
            )
            print(
                f"--- query: ...{tokenizer.decode(query_ids[-60:])!r}\n    sample: "
                f"{tokenizer.decode(out[0, len(query_ids) :], skip_special_tokens=True)!r}"
                f"\n    reference: {tokenizer.decode(reference, skip_special_tokens=True)!r}"
            )
    weights, _ = full_state(model, optimizer)
    if rank == 0:  # a standard save_pretrained folder, which loads on one device, with FSDP or without
        model.save_pretrained(args.output_dir, state_dict=weights)
        tokenizer.save_pretrained(args.output_dir)
        print(f"saved the SFT model and tokenizer to {args.output_dir}")
    if dist.is_initialized():  # every process leaves together: none closes its connections while another still uses them
        dist.barrier()
        dist.destroy_process_group()
