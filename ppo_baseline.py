# PPO for RLHF with the N+ implementation details (TL;DR or HH). Docs: README.md#ppo_baselinepy
import contextlib
import glob
import importlib.util
import json
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
import tyro
from datasets import load_dataset
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as transformers_logging

transformers_logging.set_verbosity_error()  # its load reports flag a new value or reward head, which is expected
transformers_logging.disable_progress_bar()


@dataclass
class Args:
    # ---- the run ----
    exp_name: str = "ppo"
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
    """tldr: Reddit TL;DR posts; hh: Anthropic HH conversations"""
    sft_model_path: Optional[str] = None
    """policy and reference init (default: cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr for tldr, models/sft_hh for hh)"""
    reward_model_path: Optional[str] = None
    """reward model (default: cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr for tldr, models/reward_hh for hh)"""
    value_model_path: Optional[str] = None
    """value model init (default: the reward model; with --reward-fn any causal LM folder works, with a new head)"""
    reward_fn: Optional[str] = None
    """`path/to/file.py:function` taking (prompts, responses) lists of str and returning floats; replaces the reward model"""
    dataset_name: Optional[str] = None
    """prompts: Hub id, folder or json/jsonl (default: vwxyzjn/summarize_from_feedback_tldr_3_filtered for tldr,
    Anthropic/hh-rlhf for hh)"""
    train_split: str = "train"
    """split whose prompts are rolled out"""
    query_length: int = 512
    """max prompt tokens: TL;DR posts are cut back at their last newline, HH prompts keep their end"""
    response_length: Optional[int] = None
    """tokens generated per episode (default: 53 tldr, 128 hh)"""

    # ---- batch sizes ----
    total_episodes: int = 1_000_000
    """episodes (sampled responses) in the whole run"""
    batch_size: int = 512
    """episodes per update, over all processes (under torchrun each rolls out batch_size / processes of them)"""
    local_rollout_forward_batch_size: int = 64
    """episodes per generate/forward call during the rollout, per process"""
    num_mini_batches: int = 1
    """minibatches per PPO epoch (one optimizer step each)"""
    local_micro_batch_size: int = 8
    """episodes per forward/backward pass and process; a minibatch is accumulated from these"""
    num_ppo_epochs: int = 4
    """passes over each batch of episodes"""

    # ---- PPO and the N+ details ----
    temperature: float = 0.7
    """sampling temperature, applied to the logits in every log-prob computation too"""
    lr: float = 3e-6
    """learning rate of the policy and the value model"""
    anneal_lr: bool = True
    """anneal the learning rate linearly to 0"""
    eps: float = 1e-5
    """AdamW epsilon"""
    max_grad_norm: Optional[float] = None
    """clip the gradient norm of each optimizer step (None: no clipping, as the authors' and the N+ code)"""
    kl_coef: float = 0.05
    """coefficient of the per-token KL penalty -kl_coef * (logp - ref_logp)"""
    adaptive_kl: bool = False
    """adapt kl_coef towards --target-kl (Ziegler et al. 2019)"""
    target_kl: float = 6.0
    """target KL (per episode, summed over tokens) of the adaptive controller"""
    kl_horizon: int = 10000
    """horizon (episodes) of the adaptive controller"""
    gamma: float = 1.0
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    whiten_rewards: bool = True
    """whiten the per-token rewards (no mean shift) before GAE, as the paper's PPO and DR-PO runs (the N+ code does not)"""
    cliprange: float = 0.2
    """PPO policy clip range"""
    cliprange_value: float = 0.2
    """value clip range"""
    vf_coef: float = 0.1
    """value loss coefficient"""
    missing_eos_penalty: Optional[float] = -1.0
    """score given to a response with no EOS, replacing its reward (None: keep the score)"""

    # ---- evaluation ----
    eval_every: int = 0
    """every N updates, score greedy responses to the first --eval-prompts prompts (as drpo_tldr.py does); 0: never"""
    eval_prompts: int = 64
    """how many prompts the periodic evaluation uses"""
    early_stop_score: Optional[float] = None
    """stop (and save) once the periodic evaluation's mean score reaches this value"""

    # ---- memory: dtypes, LoRA, gradient checkpointing, FSDP ----
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the trained weights (policy, value model), whatever the checkpoint stores: Pythia is stored in fp16, where
    AdamW's second moment underflows. bfloat16 halves their memory and loses small updates; bf16 autocast runs on CUDA
    either way"""
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the frozen models (reference policy, reward model); auto: bfloat16 on CUDA (no fp32 copy needed), float32 on
    CPU"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass to save memory"""
    use_lora: bool = False
    """train LoRA adapters on the policy (needs `peft`); the reference is the policy with the adapter off"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA alpha"""
    lora_target_modules: str = "all-linear"
    """layers that get adapters: `all-linear` (every linear layer but the LM head) or names, comma-separated (the
    authors': query_key_value)"""
    lora_value: bool = False
    """with --use-lora, adapters on the value model too, its backbone and head frozen (the authors' setup); otherwise the
    value model is trained in full"""
    fsdp: bool = False
    """under torchrun, shard the policy's and the value model's weights, gradients and AdamW state across the processes
    (FSDP2), for models that do not fit one GPU; checkpoints and the final policy are saved whole, as without it"""

    # ---- logging and checkpoints ----
    track: bool = False
    """log to Weights & Biases (needs `wandb`)"""
    tensorboard: bool = False
    """log to TensorBoard under runs/{run_name} (needs `tensorboard`)"""
    print_sample_every: int = 10
    """print a table of sample query / response / score every N updates"""
    save_every: int = 50
    """write a checkpoint every N updates (0: never), to runs/{run_name}/checkpoints/update_N"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep (older ones are deleted once a new one is complete)"""
    resume_from: Optional[str] = None
    """`auto`: the newest checkpoint of the newest run under runs/ with this --task, --exp-name and --seed (a new run
    when there is none); a run folder runs/{run_name}: its newest checkpoint; or one checkpoint folder. The run's flags
    come from the checkpoint; only those in RESUMABLE may be given anew (--total-episodes extends a run)"""
    output_dir: str = "models/ppo"
    """where the final policy and tokenizer are saved"""

    # ---- computed at run time from the flags above (not flags; saved with the config) ----
    num_updates: tyro.conf.Suppress[int] = 0
    minibatch_size: tyro.conf.Suppress[int] = 0
    gradient_accumulation_steps: tyro.conf.Suppress[int] = 0


COMPUTED = (
    "num_updates",
    "minibatch_size",
    "gradient_accumulation_steps",
)  # fields the script fills in, saved with the config
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
    "keep_checkpoints": POSITIVE,
    "temperature": POSITIVE,
    "total_episodes": POSITIVE,
    "local_rollout_forward_batch_size": POSITIVE,
    "num_mini_batches": POSITIVE,
    "num_ppo_epochs": POSITIVE,
    "max_grad_norm": POSITIVE,
    "target_kl": POSITIVE,
    "kl_horizon": POSITIVE,
    "cliprange": POSITIVE,
    "cliprange_value": POSITIVE,
    "lora_r": POSITIVE,
    "eval_prompts": POSITIVE,
    "eval_every": NON_NEGATIVE,
    "save_every": NON_NEGATIVE,
    "print_sample_every": NON_NEGATIVE,
    "kl_coef": NON_NEGATIVE,
    "vf_coef": NON_NEGATIVE,
    "gamma": PROBABILITY,
    "gae_lambda": PROBABILITY,
}


DEFAULT_MODELS = {
    "tldr": ("cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr", "cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr"),
    "hh": ("models/sft_hh", "models/reward_hh"),
}
DEFAULT_DATASETS = {"tldr": "vwxyzjn/summarize_from_feedback_tldr_3_filtered", "hh": "Anthropic/hh-rlhf"}
DEFAULT_RESPONSE_LENGTH = {"tldr": 53, "hh": 128}
SCHEMAS = {"tldr": {"subreddit": str, "title": str, "post": str}, "hh": {"chosen": str, "rejected": str}}
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


def build_queries(args: Args, tokenizer):
    """Prompt token ids for the rollouts; unusable rows are skipped and counted."""
    name, schema = args.dataset_name, SCHEMAS[args.task]
    ds = load_rows(name, args.train_split, schema)
    queries, counts = [], {"rows": len(ds), "query_truncated": 0, "dropped_query_too_long": 0, "dropped_no_shared_prompt": 0}
    for i, row in enumerate(ds):
        check_row(row, i, schema, f"{name} ({args.train_split})")
        if args.task == "tldr":
            query = tldr_query(tokenizer, row, args.query_length)
            if query is None:
                counts["dropped_query_too_long"] += 1
                continue
            ids, truncated = query
        else:
            split = hh_split(row["chosen"], row["rejected"])
            if split is None:
                counts["dropped_no_shared_prompt"] += 1
                continue
            ids, truncated = hh_prompt(tokenizer, split[0], args.query_length)
        counts["query_truncated"] += truncated
        queries.append(ids)
    print(f"{name} ({args.train_split}): {len(queries)} prompts kept; {counts}")
    if not queries:
        raise SystemExit(f"no usable prompt in {name} ({args.train_split}); see the counts above")
    return queries


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
            f"Could not load '{path}' ({e}). If this machine is offline, point --sft-model-path, "
            "--reward-model-path and --dataset-name at local folders (sft.py and reward_model.py write them)."
        ) from None
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        print(
            f"{path}: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} initialised from scratch (not in the "
            "checkpoint)"
        )
    return model


def load_tokenizer(path: str):
    tokenizer = from_pretrained(AutoTokenizer, path, padding_side="left")
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"the tokenizer of {path} has no EOS token; set `eos_token` in its tokenizer_config.json")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # a dedicated pad token: with pad = EOS, masking the padding would also mask the real EOS
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def load_reward_fn(spec: str):
    """`path/to/file.py:function` -> the function."""
    path, _, name = spec.rpartition(":")
    if not os.path.isfile(path):
        raise SystemExit(f"--reward-fn {spec}: no file {path!r} (expected path/to/file.py:function)")
    module_spec = importlib.util.spec_from_file_location("reward_fn_module", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        raise SystemExit(f"--reward-fn {spec}: {path} has no function {name!r}")
    return getattr(module, name)


def batch_indices(update: int, batch_size: int, n: int, seed: int):
    """Prompt indices of an update: consecutive slices of a fresh permutation per pass over the data. A pure function
    of the update index, so a resumed run continues at the right place in the data."""
    positions = np.arange((update - 1) * batch_size, update * batch_size)
    epochs = positions // n
    perms = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(epochs)}
    return [int(perms[e][p % n]) for e, p in zip(epochs, positions)]


def left_pad(sequences, pad_id: int, width: int = 0):
    """A (rows, max(width, longest)) tensor of token lists, padded on the left."""
    width = max(width, max(len(s) for s in sequences))
    return torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])


def non_token_ids(tokenizer, vocab_size: int):
    """Ids the policy must never write. The pad token: the code reads it as padding, so a sampled one would end the
    response unseen, untrained and unpenalised (an absorbing action). And the embedding rows past the tokenizer's
    vocabulary, which no text encodes to (Pythia-1B: 50304 rows, 50281 tokens)."""
    return [tokenizer.pad_token_id] + list(range(len(tokenizer), vocab_size))


def first_true_indices(bools, dtype=torch.long):
    """Index of the first True of each row, or the row length when there is none."""
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).type(dtype) + torch.arange(row_len, dtype=dtype, device=bools.device)
    return torch.min(zero_or_index, dim=-1).values


def truncate_response(responses, eos_id: int, pad_id: int):
    """The EOS trick: keep each response up to and including its first EOS, pad the rest."""
    trunc_idxs = first_true_indices(responses == eos_id).unsqueeze(-1)
    idxs = torch.arange(responses.shape[1], device=responses.device).view(1, -1)
    return torch.masked_fill(responses, idxs > trunc_idxs, pad_id)


def forward(model, query_responses, pad_id: int, **kwargs):
    """A forward pass on left-padded sequences: padding masked out, position ids counted from the first real token."""
    attention_mask = query_responses != pad_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


def response_logprobs(model, query_responses, responses, pad_id: int, temperature: float, non_tokens):
    """Log-probs of the response tokens, (batch, response_length). The LM head runs only on the response positions
    (logits_to_keep); the temperature divides the logits and the non-tokens get probability 0, exactly as in sampling."""
    logits = forward(model, query_responses, pad_id, logits_to_keep=responses.shape[1] + 1).logits[:, :-1]
    logits = logits.float() / (temperature + 1e-7)
    logits[..., non_tokens] = float("-inf")  # generate() suppresses them too (suppress_tokens)
    return torch.gather(logits.log_softmax(-1), 2, responses.unsqueeze(-1)).squeeze(-1)


def token_scores(model, query_responses, pad_id: int):
    """The scalar head of a sequence-classification model at every position, (batch, seq_len). The model's own forward
    pass runs (the one FSDP shards), which returns the last token's score alone: the head's output at every position is
    read on the way, by a forward hook."""
    scores = []
    hook = model.score.register_forward_hook(lambda module, inputs, output: scores.append(output))
    try:
        forward(model, query_responses, pad_id)
    finally:
        hook.remove()
    return scores[0].squeeze(-1).float()


def reward_offset(reward_model):
    """reward_model.py folds its normalisation into the weights where the architecture allows it (a final norm with a
    bias: GPT-NeoX, GPT-2); otherwise (Llama's RMSNorm) the shift is kept in config.reward_bias, to be added here."""
    return 0.0 if getattr(reward_model.config, "reward_bias_in_weights", True) else reward_model.config.reward_bias


def last_token_index(input_ids, pad_id: int):
    """Index of the last non-pad token of each row, the same rule as transformers' sequence classification."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def penalize_missing_eos(scores, responses, eos_id: int, penalty: Optional[float]):
    """N+: a response with no EOS gets a fixed low score instead of its reward. Only the response is checked: an EOS
    inside the prompt does not count."""
    if penalty is None:
        return scores
    return torch.where((responses == eos_id).any(-1), scores, torch.full_like(scores, penalty))


def get_scores(reward_model, reward_fn, tokenizer, prompts_ids, query_batch, postprocessed, chunk_size: int):
    """Sequence scores of the truncated responses: the reward model at the last real token, or --reward-fn on text."""
    if reward_fn is None:
        query_responses = torch.cat((query_batch, postprocessed), 1)
        return torch.cat(
            [
                token_scores(reward_model, chunk, tokenizer.pad_token_id)
                .gather(1, last_token_index(chunk, tokenizer.pad_token_id).unsqueeze(1))
                .squeeze(1)
                + reward_offset(reward_model)
                for chunk in query_responses.split(chunk_size)
            ]
        )
    texts = tokenizer.batch_decode(postprocessed, skip_special_tokens=True)
    scores = reward_fn(tokenizer.batch_decode(prompts_ids), texts)
    if len(scores) != len(texts):
        raise SystemExit(f"--reward-fn returned {len(scores)} scores for {len(texts)} responses")
    return torch.tensor(scores, dtype=torch.float, device=postprocessed.device)


def generate_responses(policy, queries, response_length: int, pad_id: int, **generation):
    """The response_length tokens the policy writes after each left-padded prompt, (rows, response_length)."""
    out = policy.generate(
        input_ids=queries,
        attention_mask=(queries != pad_id).long(),
        max_new_tokens=response_length,
        min_new_tokens=response_length,
        pad_token_id=pad_id,
        **generation,
    )
    return out[:, queries.shape[1] :]


def score_responses(reward_model, reward_fn, tokenizer, prompts_ids, query_batch, responses, penalty, chunk_size: int):
    """The EOS trick, then the score: each response is cut after its first EOS, scored with its prompt (reward model or
    --reward-fn), and one without EOS gets the penalty instead. Returns (cut responses, raw scores, scores)."""
    postprocessed = truncate_response(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
    raw_scores = get_scores(reward_model, reward_fn, tokenizer, prompts_ids, query_batch, postprocessed, chunk_size)
    return postprocessed, raw_scores, penalize_missing_eos(raw_scores, postprocessed, tokenizer.eos_token_id, penalty)


def print_samples(tokenizer, prompts_ids, postprocessed, scores, n: int = 4):
    """The first episodes of the batch: score, the prompt's end and the response."""
    print(f"{'score':>7} | query (end) | response")
    for i in range(min(n, len(prompts_ids))):
        query = tokenizer.decode(prompts_ids[i][-40:]).replace("\n", "\\n")
        print(f"{scores[i].item():7.3f} | ...{query} | {tokenizer.decode(postprocessed[i], skip_special_tokens=True)!r}")


def log_metrics(metrics: dict, log, tracker=None, writer=None):
    """One line on the console, one json line in runs/{run_name}/metrics.jsonl; W&B and TensorBoard when asked for."""
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    log.write(json.dumps(metrics) + "\n")
    log.flush()
    if tracker is not None:
        tracker.log(metrics, step=metrics["episodes"])
    if writer is not None:
        for k, v in metrics.items():
            writer.add_scalar(k, v, metrics["episodes"])


def masked_mean(values, mask):
    """Mean over the mask; 0, not NaN, when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values, mask):
    """Unbiased variance over the mask (Bessel's correction, as the N+ code); 0 for fewer than two tokens."""
    centered = values - masked_mean(values, mask)
    n = mask.sum()
    return masked_mean(centered**2, mask) * n / (n - 1).clamp(min=1)


def whiten(values, mask, shift_mean: bool = True):
    whitened = (values - masked_mean(values, mask)) * torch.rsqrt(masked_var(values, mask) + 1e-8)
    return whitened if shift_mean else whitened + masked_mean(values, mask)


def compute_gae(rewards, values, gamma: float, lam: float):
    """Generalized advantage estimation over the response, (batch, response_length). Values and rewards after the
    EOS are zero, so the padding adds nothing; the value after the last token is 0."""
    lastgaelam, advantages_reversed = 0, []
    length = rewards.shape[1]
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def per_token_rewards(scores, logprobs, ref_logprobs, mask, sequence_lengths, kl_coef: float):
    """k1 KL penalty on every response token, plus the sequence score at the last real token (the EOS)."""
    kl = (logprobs - ref_logprobs) * mask
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(scores), device=scores.device), sequence_lengths] += scores
    return rewards, kl, non_score_reward


def ppo_losses(
    new_logprobs, old_logprobs, advantages, vpred, old_values, returns, mask, cliprange: float, cliprange_value: float
):
    """Clipped policy loss and clipped value loss, averaged over the masked tokens; plus their statistics."""
    vpredclipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses = torch.max((vpred - returns) ** 2, (vpredclipped - returns) ** 2)
    vf_loss = 0.5 * masked_mean(vf_losses, mask)
    logratio = (new_logprobs - old_logprobs) * mask
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(logratio**2, mask).item(),
            "clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask).item(),
            "pg_loss": pg_loss.item(),
            "vf_loss": vf_loss.item(),
            "vf_clipfrac": masked_mean((vf_losses > (vpred - returns) ** 2).float(), mask).item(),
            "ratio": masked_mean(ratio, mask).item(),
        }
    return pg_loss, vf_loss, stats


def adaptive_kl_coef(kl_coef: float, current_kl: float, n_episodes: int, target: float, horizon: int):
    """Ziegler et al.'s proportional controller: nudge kl_coef so the KL moves towards the target."""
    proportional_error = np.clip(current_kl / target - 1, -0.2, 0.2)
    return kl_coef * (1 + proportional_error * n_episodes / horizon)


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


def gather(tensor):
    """Every process's rows, concatenated in rank order: each process rolls out its share, and all get the whole batch."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


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
RESUMABLE = {"resume_from", "total_episodes", "save_every", "keep_checkpoints", "print_sample_every", "output_dir", "fsdp"}


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
            lora = state["config"]["use_lora"]
            needed = ["lora.pt"] if lora else ["config.json"]
            needed += ["value_lora.pt"] if lora and state["config"]["lora_value"] else ["value/config.json"]
            shards = [
                os.path.relpath(f, folder) for f in glob.glob(f"{folder}/**/*.safetensors", recursive=True)
            ]  # sharded or not
            for part in ([] if lora else ["."]) + ([] if lora and state["config"]["lora_value"] else ["value"]):
                if not any(os.path.dirname(f) == part.strip(".") for f in shards):
                    raise FileNotFoundError(f"no weights (*.safetensors) in {part}")
            for name in needed + shards:
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
    default_sft, default_rm = DEFAULT_MODELS[args.task]
    args.sft_model_path = args.sft_model_path or default_sft
    args.reward_model_path = args.reward_model_path or default_rm
    args.value_model_path = args.value_model_path or args.reward_model_path
    args.dataset_name = args.dataset_name or DEFAULT_DATASETS[args.task]
    args.response_length = args.response_length or DEFAULT_RESPONSE_LENGTH[args.task]
    args.num_updates = args.total_episodes // args.batch_size
    args.minibatch_size = args.batch_size // args.num_mini_batches
    check_flags(args, FLAG_RULES)
    rank, world, device = init_distributed(args)  # under torchrun; (0, 1, cuda or cpu) in one process
    if args.fsdp and not dist.is_initialized():
        raise SystemExit(
            "--fsdp shards the models across the processes of torchrun: torchrun --nproc_per_node N ppo_baseline.py --fsdp ..."
        )
    if args.fsdp and args.use_lora:
        raise SystemExit(
            "--fsdp with --use-lora is not supported: with LoRA only the adapters train, and the frozen base fits one GPU"
        )
    args.gradient_accumulation_steps = args.minibatch_size // (args.local_micro_batch_size * world)  # per process
    if args.batch_size % args.num_mini_batches or args.minibatch_size % (args.local_micro_batch_size * world):
        raise SystemExit(
            f"--batch-size must split into --num-mini-batches minibatches of whole --local-micro-batch-size x "
            f"processes ({world})"
        )
    if args.batch_size % (args.local_rollout_forward_batch_size * world):
        raise SystemExit(f"--batch-size must be a multiple of --local-rollout-forward-batch-size x processes ({world})")
    if args.num_updates == 0:
        raise SystemExit("--total-episodes is smaller than --batch-size: no update would run")
    if not args.run_name:
        args.run_name = broadcast(f"{args.task}__{args.exp_name}__{args.seed}__{int(time.time())}")
    elif checkpoint is None and "run_name" in given_flags() and os.path.exists(f"runs/{args.run_name}/metrics.jsonl"):
        raise SystemExit(
            f"runs/{args.run_name} holds a run already: choose another --run-name, or --resume-from runs/{args.run_name}"
        )
    writable(args.output_dir)  # fail now, not after hours of training
    writable(f"runs/{args.run_name}")
    if rank == 0:
        save_config(args)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if args.frozen_dtype == "auto":  # frozen models need no fp32 copy on a GPU; on a CPU bf16 is slow
        args.frozen_dtype = "bfloat16" if device.type == "cuda" else "float32"
    print(
        f"dtypes: policy and value model {args.dtype} (trained), reference and reward model {args.frozen_dtype} (frozen), "
        f"bf16 autocast {'on' if device.type == 'cuda' else 'off'} ({device.type}, {world} process{'es' if world > 1 else ''})"
    )

    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None  # a rule-based reward replaces the reward model
    check_hub(
        [args.sft_model_path, args.value_model_path, args.dataset_name] + ([] if args.reward_fn else [args.reward_model_path])
    )

    # ---- models: policy and reference from the SFT model, value from the reward model, reward model frozen ----
    tokenizer = load_tokenizer(args.sft_model_path)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    queries = build_queries(args, tokenizer)
    policy_path = (
        args.resume_from if args.resume_from and not args.use_lora else args.sft_model_path
    )  # LoRA keeps the base frozen
    policy = from_pretrained(AutoModelForCausalLM, policy_path, dtype=getattr(torch, args.dtype))
    value_path = (
        f"{args.resume_from}/value" if args.resume_from and not (args.use_lora and args.lora_value) else args.value_model_path
    )
    value_model = from_pretrained(
        AutoModelForSequenceClassification, value_path, num_labels=1, dtype=getattr(torch, args.dtype)
    )
    reward_model = (
        None
        if reward_fn
        else from_pretrained(
            AutoModelForSequenceClassification, args.reward_model_path, num_labels=1, dtype=getattr(torch, args.frozen_dtype)
        )
    )
    # the reference policy: the SFT model, frozen; with LoRA no second copy, the policy with its adapter switched off
    ref_policy = (
        None
        if args.use_lora
        else from_pretrained(AutoModelForCausalLM, args.sft_model_path, dtype=getattr(torch, args.frozen_dtype))
    )
    for model in (policy, ref_policy, value_model, reward_model):
        if model is None:
            continue
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = pad_id  # a sequence classifier's forward needs it (it reads the last non-pad token)
        for module in model.modules():  # dropout off everywhere (N+ detail)
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    non_tokens = non_token_ids(tokenizer, policy.get_input_embeddings().num_embeddings)  # never sampled, probability 0
    if args.use_lora:
        from peft import LoraConfig, get_peft_model, inject_adapter_in_model  # only imported when asked for

        targets = args.lora_target_modules if args.lora_target_modules == "all-linear" else args.lora_target_modules.split(",")
        lora_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets)
        policy = ref_policy = get_peft_model(policy, lora_config)
        if args.lora_value:  # adapters put in place: the value model stays a sequence classifier that token_scores reads
            value_model = inject_adapter_in_model(lora_config, value_model)
            for name, param in value_model.named_parameters():
                param.requires_grad = "lora_" in name
        if args.resume_from:
            policy.load_state_dict(torch.load(f"{args.resume_from}/lora.pt"), strict=False)
            if args.lora_value:
                value_model.load_state_dict(torch.load(f"{args.resume_from}/value_lora.pt"), strict=False)
        policy.print_trainable_parameters()
    reference = policy.disable_adapter if args.use_lora else contextlib.nullcontext  # around every reference pass
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        value_model.gradient_checkpointing_enable()
        if args.use_lora:
            policy.enable_input_require_grads()
        if args.use_lora and args.lora_value:
            value_model.enable_input_require_grads()
    policy.generation_config.eos_token_id = None  # the EOS trick: sample all response_length tokens, truncate after
    policy.generation_config.bos_token_id = None
    sampling = dict(temperature=args.temperature + 1e-7, top_k=0, top_p=1.0, do_sample=True, suppress_tokens=non_tokens)
    policy, value_model = policy.to(device).train(), value_model.to(device).train()
    # the frozen models (with LoRA the reference is the policy itself, which trains)
    for model in (ref_policy, reward_model) if not args.use_lora else (reward_model,):
        if model is not None:
            model.to(device).eval().requires_grad_(False)
    if args.fsdp:  # each process keeps 1/processes of the trained weights, gradients and AdamW state
        shard(policy)
        shard(value_model)
    trained = torch.nn.ModuleDict({"policy": policy, "value": value_model})  # what one optimizer trains, and checkpoints hold
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, eps=args.eps)
    kl_coef, start_update = args.kl_coef, 1
    if checkpoint:
        load_optimizer_state(optimizer, checkpoint["optimizer"])
        set_rng_states(checkpoint["rng"])
        kl_coef, start_update = checkpoint["kl_coef"], checkpoint["update"] + 1
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
    tracker = writer = None
    if args.track and rank == 0:
        import wandb  # only imported when asked for

        tracker = wandb.init(project="drpo", name=args.run_name, config=asdict(args), resume="allow", id=args.run_name)
    if args.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        writer = SummaryWriter(f"runs/{args.run_name}")
    start_time, episodes_at_start = time.time(), (start_update - 1) * args.batch_size

    # a progress bar with an ETA on a terminal (none in a log file, nor on other processes than rank 0)
    progress = tqdm(
        range(start_update, args.num_updates + 1),
        initial=start_update - 1,
        total=args.num_updates,
        unit="update",
        disable=rank > 0 or not sys.stderr.isatty(),
    )
    for update in progress:
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (update - 1.0) / args.num_updates) * args.lr
        # ---- rollout: sample response_length tokens for each prompt of the batch ----
        t0 = time.time()
        batch_queries = [queries[i] for i in batch_indices(update, args.batch_size, len(queries), args.seed)]
        query_batch = left_pad(batch_queries, pad_id).to(device)  # (batch, context_length)
        context_length = query_batch.shape[1]
        share = args.batch_size // world
        mine = slice(rank * share, (rank + 1) * share)  # this process's episodes (all of them in one process)
        responses, logprobs, ref_logprobs, values = [], [], [], []
        with torch.no_grad(), autocast, gathered(policy):  # FSDP: the policy gathered once for the whole rollout
            for i in range(mine.start, mine.stop, args.local_rollout_forward_batch_size):
                chunk = slice(i, i + args.local_rollout_forward_batch_size)
                # the samples of a chunk are a function of the seed and the chunk's place in the batch, whatever the
                # number of processes: a run on 2 processes rolls out the episodes of a run on 1
                torch.manual_seed(int(np.random.default_rng([args.seed, update, i]).integers(2**62)))
                response = generate_responses(policy, query_batch[chunk], args.response_length, pad_id, **sampling)
                query_response = torch.cat((query_batch[chunk], response), 1)
                logprobs.append(response_logprobs(policy, query_response, response, pad_id, args.temperature, non_tokens))
                with reference():
                    ref_logprobs.append(
                        response_logprobs(ref_policy, query_response, response, pad_id, args.temperature, non_tokens)
                    )
                values.append(token_scores(value_model, query_response, pad_id)[:, context_length - 1 : -1])
                responses.append(response)
            rollout_time = time.time() - t0

            # ---- scoring: the reward model (or --reward-fn) on the truncated response ----
            t0 = time.time()
            scored = score_responses(
                reward_model,
                reward_fn,
                tokenizer,
                batch_queries[mine],
                query_batch[mine],
                torch.cat(responses),
                args.missing_eos_penalty,
                args.local_rollout_forward_batch_size,
            )  # each process its share
            # distributed: every process gets the whole batch, so that every statistic below is one of the whole batch
            responses, logprobs, ref_logprobs, values = (
                gather(torch.cat(x)) for x in (responses, logprobs, ref_logprobs, values)
            )
            postprocessed, raw_scores, scores = (gather(x) for x in scored)
            sequence_lengths = first_true_indices(postprocessed == pad_id) - 1  # index of the last real token (the EOS)
            scoring_time = time.time() - t0

            # ---- rewards and advantages; everything after the EOS is masked out ----
            t0 = time.time()
            response_idxs = torch.arange(args.response_length, device=device).repeat(args.batch_size, 1)
            mask = (response_idxs <= sequence_lengths.unsqueeze(1)).float()  # (batch, response_length)
            logprobs, ref_logprobs, values = logprobs * mask, ref_logprobs * mask, values * mask
            rewards, kl, non_score_reward = per_token_rewards(scores, logprobs, ref_logprobs, mask, sequence_lengths, kl_coef)
            if args.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False) * mask
            advantages, returns = compute_gae(rewards, values, args.gamma, args.gae_lambda)
            advantages = whiten(advantages, mask) * mask
        if not torch.isfinite(scores).all():
            raise SystemExit(f"non-finite scores at update {update}: check the reward model or --reward-fn")

        # ---- PPO update: num_ppo_epochs passes, minibatches accumulated from micro-batches ----
        stats = {k: [] for k in ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "ratio")}
        for ppo_epoch in range(args.num_ppo_epochs):
            order = torch.from_numpy(np.random.default_rng([args.seed, update, ppo_epoch]).permutation(args.batch_size)).to(
                device
            )
            for mb_start in range(0, args.batch_size, args.minibatch_size):
                # each process takes a contiguous part of the minibatch: the same micro-batches as one process, shared out
                part = mb_start + rank * args.minibatch_size // world
                for mi in range(part, part + args.minibatch_size // world, args.local_micro_batch_size):
                    idx = order[mi : mi + args.local_micro_batch_size]
                    mb_mask = mask[idx]
                    mb_query_responses = torch.cat((query_batch[idx], responses[idx]), 1)
                    with autocast:
                        new_logprobs = response_logprobs(
                            policy, mb_query_responses, responses[idx], pad_id, args.temperature, non_tokens
                        )
                        vpred = token_scores(value_model, mb_query_responses, pad_id)[:, context_length - 1 : -1]
                    pg_loss, vf_loss, mb_stats = ppo_losses(
                        new_logprobs,
                        logprobs[idx],
                        advantages[idx],
                        vpred,
                        values[idx],
                        returns[idx],
                        mb_mask,
                        args.cliprange,
                        args.cliprange_value,
                    )
                    loss = pg_loss + args.vf_coef * vf_loss
                    if not torch.isfinite(loss):
                        raise SystemExit(
                            f"non-finite loss at update {update}, PPO epoch {ppo_epoch}: lower --lr or check the models"
                        )
                    (loss / args.gradient_accumulation_steps).backward()  # averaged over the processes below
                    for k, v in mb_stats.items():
                        stats[k].append(v)
                if not args.fsdp:  # (FSDP has averaged the gradient shards already)
                    average_gradients(params)  # distributed: the minibatch's gradient on every process
                if args.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        update_time = time.time() - t0
        # distributed: every micro-batch's statistics, of every process (rank 0's first micro-batch is the first of all)
        stats = dict(zip(stats, gather(torch.tensor(list(stats.values()), dtype=torch.float64, device=device).T).T.tolist()))
        mean_kl = kl.sum(1).mean().item()
        if args.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, mean_kl, args.batch_size, args.target_kl, args.kl_horizon)

        # ---- evaluation: greedy responses to the first --eval-prompts prompts, scored as in training ----
        eval_score = None
        if args.eval_every and update % args.eval_every == 0:  # every process evaluates: all of them take the same early stop
            with torch.no_grad(), autocast, gathered(policy):
                eval_batch = left_pad(queries[: args.eval_prompts], pad_id).to(device)
                eval_responses = generate_responses(
                    policy, eval_batch, args.response_length, pad_id, do_sample=False, suppress_tokens=non_tokens
                )
                eval_score = (
                    score_responses(
                        reward_model,
                        reward_fn,
                        tokenizer,
                        queries[: args.eval_prompts],
                        eval_batch,
                        eval_responses,
                        args.missing_eos_penalty,
                        args.local_rollout_forward_batch_size,
                    )[2]
                    .mean()
                    .item()
                )

        # ---- logging ----
        episodes = update * args.batch_size
        non_score = non_score_reward.sum(1).mean().item()
        metrics = {
            "update": update,
            "episodes": episodes,
            "objective/kl": mean_kl,
            "objective/entropy": (-logprobs).sum(1).mean().item(),  # sampled-token estimate, summed over the response
            "objective/scores": scores.mean().item(),
            "objective/raw_scores": raw_scores.mean().item(),
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": scores.mean().item() + non_score,
            "objective/kl_coef": kl_coef,
            "policy/approxkl": float(np.mean(stats["approxkl"])),
            "policy/clipfrac": float(np.mean(stats["clipfrac"])),
            "policy/first_approxkl": stats["approxkl"][0],
            "policy/first_ratio": stats["ratio"][0],
            "loss/policy": float(np.mean(stats["pg_loss"])),
            "loss/value": float(np.mean(stats["vf_loss"])),
            "val/clipfrac": float(np.mean(stats["vf_clipfrac"])),
            "val/ratio": float(np.mean(stats["ratio"])),
            "val/eos_fraction": (postprocessed == eos_id).any(-1).float().mean().item(),
            "val/response_length": (sequence_lengths + 1).float().mean().item(),
            "lr": optimizer.param_groups[0]["lr"],
            "episodes_per_s": (episodes - episodes_at_start) / (time.time() - start_time),  # since the start (or resume)
            "episodes_per_s_update": args.batch_size / (rollout_time + scoring_time + update_time),  # this update's
            "time/rollout": rollout_time,
            "time/scoring": scoring_time,
            "time/update": update_time,
            "peak_memory_gb": peak_memory_gb(device),
        }
        if eval_score is not None:
            metrics["eval/score"] = eval_score
        log_metrics(metrics, log, tracker, writer)
        if args.print_sample_every and update % args.print_sample_every == 0:
            print_samples(tokenizer, batch_queries, postprocessed, scores)

        # ---- checkpoint: models, optimizer, RNG states, update index and KL controller ----
        if args.save_every and update % args.save_every == 0 and update < args.num_updates:
            weights, optimizer_state = full_state(trained, optimizer)  # FSDP: every process takes part in gathering them

            def write(folder):
                os.makedirs(folder)
                if args.use_lora:  # the base stays the SFT model: only the adapter is saved
                    torch.save(
                        {k[7:]: v for k, v in weights.items() if k.startswith("policy.") and "lora_" in k}, f"{folder}/lora.pt"
                    )
                else:
                    policy.save_pretrained(
                        folder, state_dict={k[7:]: v for k, v in weights.items() if k.startswith("policy.")}
                    )
                if args.use_lora and args.lora_value:
                    torch.save(
                        {k[6:]: v for k, v in weights.items() if k.startswith("value.") and "lora_" in k},
                        f"{folder}/value_lora.pt",
                    )
                else:
                    value_model.save_pretrained(
                        f"{folder}/value", state_dict={k[6:]: v for k, v in weights.items() if k.startswith("value.")}
                    )
                tokenizer.save_pretrained(folder)
                time.sleep(float(os.environ.get("SLOW_SAVE_S", 0)))  # a test hook: widens the window a kill can land in
                # the data position is a pure function of the update index (batch_indices), so the index is enough
                torch.save(
                    {
                        "optimizer": optimizer_state,
                        "rng": rng_states(),
                        "update": update,
                        "kl_coef": kl_coef,
                        "config": asdict(args),
                    },
                    f"{folder}/state.pt",
                )

            if rank == 0:  # one writer
                folder = save_checkpoint(f"runs/{args.run_name}", update, args.keep_checkpoints, write)
                print(f"checkpoint written to {folder} (resume with --resume-from {folder}, or --resume-from auto)")
        if eval_score is not None and args.early_stop_score is not None and eval_score >= args.early_stop_score:
            print(f"eval/score {eval_score:.4g} >= --early-stop-score {args.early_stop_score}: stopping at update {update}")
            break

    final = policy.merge_and_unload() if args.use_lora else policy
    weights, _ = full_state(final, optimizer)
    if rank == 0:  # a standard save_pretrained folder, which loads on one device, with FSDP or without
        final.generation_config.eos_token_id = eos_id
        final.save_pretrained(args.output_dir, state_dict=weights)
        tokenizer.save_pretrained(args.output_dir)
        print(f"saved the policy and tokenizer to {args.output_dir}")
    if dist.is_initialized():  # every process leaves together: none closes its connections while another still uses them
        dist.barrier()
        dist.destroy_process_group()
