# The reward model of RLHF: a Bradley-Terry model trained on the preference pairs of the offline dataset (OpenAI's TL;DR
# comparisons, --task tldr, or Anthropic HH, --task hh), from the SFT model with a scalar head:
#
#   loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected)),  r read at each response's last token (its EOS)
#
# Then the N+ normalisation: a constant shift makes the mean reward of the reference responses 0, folded into the
# weights where the architecture allows it. Docs: README.md#reward_modelpy
import contextlib
import datetime
import glob
import inspect
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import huggingface_hub
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dist_state  # full state dicts on rank 0, under FSDP or not
import torch.nn.functional as F
import transformers
import tyro
from datasets import load_dataset
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DynamicCache

transformers.logging.set_verbosity_error()  # its load reports flag a new value or reward head, which is expected
transformers.logging.disable_progress_bar()


@dataclass
class Args:
    # ---- models and data ----
    task: Literal["tldr", "hh"] = "tldr"  # tldr: OpenAI's TL;DR comparisons; hh: Anthropic HH chosen/rejected transcripts
    sft_model_path: str = "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr"  # the model the reward model starts from
    dataset_name: Optional[str] = None  # preference pairs: Hub id, folder or json/jsonl (default: DEFAULTS)
    dataset_config: Optional[str] = None  # Hub config of the dataset (default: DEFAULTS)
    train_split: str = "train"  # split to train on (datasets slicing works: `train[:80%]`; a single file has only `train`)
    eval_split: Optional[str] = None  # held-out split of the eval accuracy (default: DEFAULTS)
    norm_dataset_name: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"  # TL;DR: references whose mean reward is 0
    max_norm_samples: int = 4096  # responses used by the normalisation (HH: the training pairs' chosen responses)
    query_length: int = 512  # max prompt tokens: a TL;DR post is cut back at its last newline, an HH prompt keeps its end
    response_length: Optional[int] = None  # max response tokens, EOS included; longer pairs are skipped (default: DEFAULTS)
    max_train_samples: Optional[int] = None  # use N training pairs, evenly spaced over the split (debugging)
    max_eval_samples: Optional[int] = 2000  # use N eval pairs, evenly spaced over the split
    # ---- optimisation ----
    lr: float = 3e-6  # learning rate (cosine schedule to 0)
    eps: float = 1e-5  # AdamW epsilon
    num_train_epochs: int = 1  # passes over the training pairs
    batch_size: int = 64  # pairs per optimizer step, over all processes
    eval_every: int = 100  # eval accuracy every N optimizer steps and at the end (0: at the end only)
    # ---- the run ----
    exp_name: str = "reward"  # name of this experiment (part of the run name)
    run_name: Optional[str] = None  # log, config, checkpoints: runs/{run_name} (default: {task}__{exp}__{seed}__{time})
    seed: int = 1  # seed of the experiment (and of the head's init)
    output_dir: str = "models/reward"  # where the reward model and tokenizer are saved
    # ---- memory and speed ----
    local_micro_batch_size: int = 8  # pairs per forward/backward pass and process; batches accumulate them
    cuda: bool = True  # use CUDA when available (bf16 autocast there); CPU otherwise
    dtype: Literal["float32", "bfloat16"] = "float32"  # trained weights' dtype, whatever the checkpoint stores
    fsdp: bool = False  # under torchrun, shard the weights, gradients and AdamW state (FSDP2)
    # ---- logging and checkpoints ----
    track: bool = False  # log to Weights & Biases (needs `wandb`)
    tensorboard: bool = False  # log to TensorBoard under runs/{run_name} (needs `tensorboard`)
    save_every: int = 100  # write a checkpoint every N optimizer steps (0: never)
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep
    resume_from: Optional[str] = None  # `auto`, a run folder or a checkpoint file (README: Checkpoints and resume)
    # ---- computed from the flags above (not flags) ----
    num_updates: tyro.conf.Suppress[int] = 0
    gradient_accumulation_steps: tyro.conf.Suppress[int] = 0


DEFAULTS = {  # --task -> (dataset, config, eval split, response length)
    "tldr": ("openai/summarize_from_feedback", "comparisons", "validation", 53),
    "hh": ("Anthropic/hh-rlhf", None, "test", 128),
}


# ---- the reward model: Bradley-Terry on each pair, the prompt encoded once -------------------------------------------
def pad_right(sequences, pad_id: int, device):
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences], device=device)


def get_reward(model, input_ids, pad_id: int):
    """The scalar reward of each sequence, read at its last non-pad token (the EOS): transformers' own pooling, with
    config.pad_token_id = pad_id."""
    attention_mask = (input_ids != pad_id).long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # correct with left padding too
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.squeeze(-1)


def bt_loss(chosen_rewards, rejected_rewards):
    """Bradley-Terry: -log sigmoid(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def pair_rewards(model, pairs, pad_id: int, device, share_prompt: bool = True):
    """(chosen rewards, rejected rewards) of a micro-batch. A pair's two sequences share their prompt, so the prompt is
    encoded once (its keys and values cached), then both responses run on it: the rewards and gradients of encoding
    prompt + response twice (tested), for half the tokens on TL;DR. Under FSDP (share_prompt False) whole sequences
    run in one pass: FSDP2 frees a layer's gathered weights after its first backward, which the prompt's graph needs."""
    if not share_prompt:
        rewards = get_reward(
            model, pad_right([q + c for q, c, _ in pairs] + [q + r for q, _, r in pairs], pad_id, device), pad_id
        )
        return rewards[: len(pairs)], rewards[len(pairs) :]
    width = max(len(q) for q, _, _ in pairs)
    prompts = torch.tensor([[pad_id] * (width - len(q)) + q for q, _, _ in pairs], device=device)  # left-padded
    prompt_mask = (prompts != pad_id).long()
    cache = DynamicCache(config=model.config)
    cache_arg = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}  # 5.24's
    prompt_positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    model(input_ids=prompts, attention_mask=prompt_mask, position_ids=prompt_positions, use_cache=True, **cache_arg)
    cache.batch_repeat_interleave(2)  # the prompt of pair 0 twice, then that of pair 1 twice, ...
    responses = pad_right([x for _, c, r in pairs for x in (c, r)], pad_id, device)  # chosen 0, rejected 0, chosen 1, ...
    attention_mask = torch.cat((prompt_mask.repeat_interleave(2, 0), (responses != pad_id).long()), 1)
    position_ids = prompt_mask.sum(1, keepdim=True).repeat_interleave(2, 0) + torch.arange(responses.shape[1], device=device)
    # the reward is read at each response's last non-pad token (its EOS), as get_reward reads it in the whole sequence
    rewards = model(input_ids=responses, attention_mask=attention_mask, position_ids=position_ids, **cache_arg).logits
    return rewards[0::2, 0], rewards[1::2, 0]


def fold_bias(weights: dict, prefix: str, bias: float):
    """Adds `bias` to every reward inside the weights (a state dict), so that plain transformers (and TRL) load a
    normalised model. No sequence-classification head has a bias, so shift the final norm's bias along the head's
    direction: score(h + d) = score(h) + w.d, and d = bias * w / |w|^2 gives exactly `bias`. Returns False, changing
    nothing, where the final norm has no bias (Llama's RMSNorm): no weight can add a constant there."""
    norms = [f"{prefix}.{name}.bias" for name in ("final_layer_norm", "ln_f", "norm") if f"{prefix}.{name}.bias" in weights]
    if len(norms) != 1:
        return False
    w = weights["score.weight"][0].double()  # in float64: the dot product does not depend on where the weights lie
    weights[norms[0]] += (bias * w / w.dot(w)).to(weights[norms[0]].dtype)
    return True


# ---- the training loop ------------------------------------------------------------------------------------------------
def train(args, run, log, train_pairs, eval_pairs, model, pad_id, checkpoint):
    rank, world, device = run
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, eps=args.eps)
    start = 1
    if checkpoint:
        restore(model, optimizer, checkpoint)
        start = checkpoint["update"] + 1
        print(f"resumed from {args.resume_from} at update {start}")
    generator = torch.Generator().manual_seed(args.seed)  # the data order, a function of the seed: resume-safe
    order = torch.cat([torch.randperm(len(train_pairs), generator=generator) for _ in range(args.num_train_epochs)])
    start_time, share = clock(device), args.batch_size // world
    for update in progress(start, args.num_updates, rank):
        # cosine decay to 0, no warmup (transformers' get_cosine_schedule_with_warmup, to the last bit)
        optimizer.param_groups[0]["lr"] = args.lr * (0.5 * (1.0 + math.cos(math.pi * ((update - 1) / args.num_updates))))
        batch = [train_pairs[i] for i in order[(update - 1) * args.batch_size : update * args.batch_size]]
        batch = batch[rank * share : (rank + 1) * share]  # this process's share of the batch (all of it in one process)
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, accuracy: means over the whole batch
        for micro, mb in enumerate(range(0, share, args.local_micro_batch_size)):
            with autocast:
                chosen, rejected = pair_rewards(
                    model, batch[mb : mb + args.local_micro_batch_size], pad_id, device, not args.fsdp
                )
            loss = bt_loss(chosen.float(), rejected.float())
            sync_gradients([model], args.fsdp, last=micro == args.gradient_accumulation_steps - 1)
            (loss / args.gradient_accumulation_steps).backward()
            sums += torch.stack([loss.detach().double(), (chosen > rejected).float().mean().double()]) / (
                args.gradient_accumulation_steps * world
            )
        average_gradients(model.parameters(), args.fsdp)  # distributed: the whole batch's gradient on every process
        loss_sum, accuracy = all_sum(sums).tolist()  # one wait for the GPU an update
        if not math.isfinite(loss_sum):
            raise SystemExit(f"non-finite loss {loss_sum} at update {update}; lower --lr or check the data")
        optimizer.step()
        optimizer.zero_grad()
        metrics = {"update": update, "loss": loss_sum, "accuracy": accuracy, "lr": optimizer.param_groups[0]["lr"]}
        metrics["pairs_per_s"] = (update - start + 1) * args.batch_size / (clock(device) - start_time)
        if (args.eval_every and update % args.eval_every == 0) or update == args.num_updates:
            metrics["eval_accuracy"], metrics["eval_loss"] = evaluate(
                model, eval_pairs, args, pad_id, device, autocast, rank, world
            )
        log_metrics(metrics, *log)
        if args.save_every and update % args.save_every == 0 and update < args.num_updates:
            save_checkpoint(args, update, model, optimizer)  # the raw model: the normalisation runs once, at the end
    return model


@torch.no_grad()
def evaluate(model, pairs, args: Args, pad_id: int, device, autocast, rank: int = 0, world: int = 1):
    """(accuracy, mean loss) over the eval pairs (each process takes a contiguous share of them)."""
    model.eval()
    share = -(-len(pairs) // world)
    mine = pairs[rank * share : (rank + 1) * share]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # correct pairs, summed loss
    for start in range(0, share, args.local_micro_batch_size):  # as many passes on every process (FSDP's are collective)
        chunk = mine[start : start + args.local_micro_batch_size]
        with autocast:
            chosen, rejected = pair_rewards(
                model, chunk or pairs[:1], pad_id, device, not args.fsdp
            )  # a stand-in, past the share
        loss = bt_loss(chosen.float(), rejected.float()).double() * len(chosen)
        total += torch.stack([(chosen > rejected).sum().double(), loss]) * bool(chunk)
    model.train()
    correct, loss = all_sum(total).tolist()
    return correct / len(pairs), loss / len(pairs)


@torch.no_grad()
def normalise(model, sequences, args: Args, pad_id: int, device, rank: int, world: int):
    """N+ normalisation: the shift that makes the mean reward of the reference responses 0. Each process scores a
    contiguous share and every process gets every reward (the same numbers, in the same order, as one process)."""
    model.eval()
    mb = args.local_micro_batch_size  # a share of whole micro-batches, each holding the rows it holds in one process:
    share = -(-len(sequences) // (world * mb)) * mb  # every result is the one-process one, to the last bit
    mine, rewards = sequences[rank * share : (rank + 1) * share], torch.zeros(share, device=device)
    for start in range(0, share, mb):  # as many passes on every process (FSDP's are collective)
        chunk = mine[start : start + mb]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            scores = get_reward(model, pad_right(chunk or sequences[:1], pad_id, device), pad_id).float()  # a stand-in
        rewards[start : start + len(chunk)] = scores[: len(chunk)]
    rewards = gather(rewards)[: len(sequences)]
    print(f"normalisation: mean reward of {len(rewards)} reference responses was {rewards.mean().item():.4f} (std "
          f"{rewards.std().item():.4f})")  # fmt: skip
    return -rewards.mean().item()


def main():
    args = tyro.cli(Args)
    check_flags(args)
    run = rank, world, device = init_distributed(args)  # (0, 1, cuda or cpu) in one process
    args, checkpoint = resume(args, args.task) if args.resume_from else (args, None)  # the flags from the run's checkpoint
    default_dataset, default_config, default_eval, default_length = DEFAULTS[args.task]
    if args.dataset_name is None:
        args.dataset_name, args.dataset_config = default_dataset, default_config
    args.eval_split, args.response_length = args.eval_split or default_eval, args.response_length or default_length
    args.gradient_accumulation_steps = args.batch_size // (args.local_micro_batch_size * world)  # per process
    check_flags(args, world)
    check_hub([args.sft_model_path, args.dataset_name] + ([args.norm_dataset_name] if args.task == "tldr" else []))
    tokenizer = load_tokenizer(args.sft_model_path, "right")
    train_pairs = build_pairs(args, tokenizer, args.train_split, args.max_train_samples)
    eval_pairs = build_pairs(args, tokenizer, args.eval_split, args.max_eval_samples)
    args.num_updates = args.num_train_epochs * len(train_pairs) // args.batch_size
    if args.num_updates == 0:
        raise SystemExit(f"{len(train_pairs)} pairs are fewer than one batch of {args.batch_size}")
    log = start_run(args, args.task, checkpoint["update"] + 1 if checkpoint else 1)
    print(f"dtypes: trained weights {args.dtype}, bf16 autocast {'on' if device.type == 'cuda' else 'off'} ({device})")
    torch.manual_seed(args.seed)  # the head's init
    model = from_pretrained(
        AutoModelForSequenceClassification, args.sft_model_path, tokenizer, num_labels=1, dtype=getattr(torch, args.dtype)
    )
    torch.nn.init.normal_(model.score.weight, std=1 / np.sqrt(model.score.weight.shape[1] + 1))  # N+ head init
    model = train(
        args, run, log, train_pairs, eval_pairs, place(model, device, args.fsdp).train(), tokenizer.pad_token_id, checkpoint
    )
    shift = normalise(
        model, normalisation_sequences(args, tokenizer, train_pairs), args, tokenizer.pad_token_id, device, rank, world
    )
    weights = dist_state.get_model_state_dict(
        model, options=dist_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if rank == 0:  # the shift itself, and whether it lives in the weights; our scripts add it when it does not
        model.config.reward_bias, model.config.reward_bias_in_weights = (
            shift,
            fold_bias(weights, model.base_model_prefix, shift),
        )
        where = "folded into the final norm's bias: plain transformers gives normalised rewards"
        if not model.config.reward_bias_in_weights:
            where = "kept in config.reward_bias (the final norm has no bias): our scripts add it, transformers does not"
        print(f"normalisation: a shift of {shift:.4f} is {where}")
    save_model(args, model, tokenizer, weights)


# ======================================================================================================================
# Appendix: the machinery. Data; models; flag checks; torchrun and FSDP; checkpoints and resume; the run and its log.
# ======================================================================================================================
TLDR_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
HH_TAG = "\n\nAssistant:"
SCHEMAS = {"tldr": {"info": dict, "summaries": list, "choice": int}, "hh": {"chosen": str, "rejected": str}}


def build_pairs(args: Args, tokenizer, split: str, limit: Optional[int]):
    """(prompt ids, chosen ids, rejected ids) triples; unusable rows are skipped and counted."""
    name, schema = args.dataset_name, SCHEMAS[args.task]
    ds = load_rows(name, split, schema, args.dataset_config)
    keep = range(len(ds)) if not limit or limit >= len(ds) else [i * len(ds) // limit for i in range(limit)]
    ds = ds.select(keep)  # evenly spaced: HH's splits are their subsets one after another (harmless-base first)
    keys = (
        "rows query_truncated dropped_query_too_long dropped_empty_response dropped_identical_pair dropped_response_too_long "
    )
    pairs, counts = [], dict.fromkeys((keys + "dropped_no_shared_prompt dropped_cnndm").split(), 0) | {"rows": len(ds)}
    for i, row in zip(keep, ds):  # i: the row's index in the split, as errors name it
        check_row(row, i, schema, f"{name} ({split})")
        if args.task == "tldr":
            texts, missing = comparison_texts(row, i, f"{name} ({split})"), "dropped_cnndm"
            query = tldr_query(tokenizer, texts[0], args.query_length) if texts else None
            missing = missing if texts is None else "dropped_query_too_long"
        else:
            texts, missing = hh_split(row["chosen"], row["rejected"]), "dropped_no_shared_prompt"
            query = hh_prompt(tokenizer, texts[0], args.query_length) if texts else None
        if query is None:
            counts[missing] += 1
            continue
        counts["query_truncated"] += query[1]
        (chosen, rejected), ids = texts[1:], [response_ids(tokenizer, t) for t in texts[1:]]
        if not chosen.strip() or not rejected.strip():
            counts["dropped_empty_response"] += 1
        elif chosen.strip() == rejected.strip():  # carries no preference
            counts["dropped_identical_pair"] += 1
        elif max(map(len, ids)) > args.response_length:  # a cut response would lose its EOS
            counts["dropped_response_too_long"] += 1
        else:
            pairs.append((query[0], *ids))
    print(f"{name} ({split}): {len(pairs)} pairs kept; {counts}")
    if not pairs:
        raise SystemExit(f"no usable pair in {name} ({split}); see the counts above")
    return pairs


def normalisation_sequences(args: Args, tokenizer, train_pairs):
    """The responses whose mean reward becomes 0: SFT reference summaries (tldr) or chosen responses (hh), evenly spaced
    over the split (HH's is its subsets one after another, harmless-base first; a split's order is never a sample)."""
    if args.task == "hh":
        n = min(args.max_norm_samples, len(train_pairs))
        return [q + c for q, c, _ in (train_pairs[i * len(train_pairs) // n] for i in range(n))]
    schema = {"subreddit": str, "title": str, "post": str, "summary": str}
    ds = load_rows(args.norm_dataset_name, "train", schema)
    sequences, n = [], min(args.max_norm_samples, len(ds))
    keep = [i * len(ds) // n for i in range(n)]
    for i, row in zip(keep, ds.select(keep)):  # i: the row's index in the split, as errors name it
        check_row(row, i, schema, f"{args.norm_dataset_name} (train)")
        if (query := tldr_query(tokenizer, row, args.query_length)) is not None and row["summary"].strip():
            sequences.append(query[0] + response_ids(tokenizer, row["summary"]))
    return sequences


def comparison_texts(row: dict, i: int, source: str):
    """TL;DR comparison -> (post fields, chosen text, rejected text); None for the CNN/DailyMail rows (an article and its
    title, no post) of openai/summarize_from_feedback's validation split (the N+ code drops them too)."""
    info = row["info"]
    if info.get("article") is not None and info.get("post") is None:
        return None
    for key in ("post", "title", "subreddit"):
        if not isinstance(info.get(key), str):
            raise SystemExit(f"{source} row {i}, column 'info.{key}': expected str, got {type(info.get(key)).__name__}")
    texts = [s.get("text") if isinstance(s, dict) else None for s in row["summaries"]]
    if len(texts) != 2 or not all(isinstance(t, str) for t in texts) or row["choice"] not in (0, 1):
        raise SystemExit(f"{source} row {i}, column 'summaries'/'choice': expected two {{'text': str}} and choice 0 or 1")
    return info, texts[row["choice"]], texts[1 - row["choice"]]


def load_rows(name: str, split: str, schema: dict, config: Optional[str] = None):
    """A Hub id, a local folder or a json/jsonl file (its one split is `train`), its columns checked against the schema."""
    file = name.endswith((".json", ".jsonl"))
    try:
        ds = load_dataset("json", data_files={"train": name}, split=split) if file else load_dataset(name, config, split=split)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"could not read split '{split}' of {name}: {e}")
    except Exception as e:  # connection errors come in many types, from requests, httpx and huggingface_hub
        if file or os.path.exists(name):
            raise
        raise SystemExit(f"Could not load the dataset '{name}' from the Hugging Face Hub ({type(e).__name__}: {e}). "
            f"Offline, point --dataset-name at a folder or json/jsonl file with columns {list(schema)}") from None  # fmt: skip
    if missing := [c for c in schema if c not in ds.column_names]:
        raise SystemExit(f"{name} (split {split}) lacks column(s) {missing}; expected the schema {list(schema)}, "
            f"found {ds.column_names}")  # fmt: skip
    if extra := [c for c in ds.column_names if c not in schema]:
        print(f"note: {name} has extra column(s) {extra}, which are not used")
    return ds.select_columns(list(schema))


def check_row(row: dict, i: int, schema: dict, source: str):
    if bad := next((c for c, kind in schema.items() if not isinstance(row[c], kind)), None):
        raise SystemExit(f"{source} row {i}, column '{bad}': expected {schema[bad].__name__}, got {type(row[bad]).__name__}")


def encode(tokenizer, text: str, special: bool = True):
    """A data text's ids, a special token's string in it (`<|endoftext|>` in a post) kept as text; `special` adds the
    tokenizer's own special tokens (Llama's BOS): prompts get them, responses do not."""
    return tokenizer.encode(text, add_special_tokens=special, split_special_tokens=True)


def tldr_query(tokenizer, row: dict, query_length: int):
    """OpenAI's TL;DR query. A post that does not fit is cut as the N+ code cut it (tldr_dataset.py, process_query): at
    its last newline, again and again, then one character at a time. Returns (ids, whether cut); None if nothing fits."""
    post, truncated = row["post"], False
    while len(ids := encode(tokenizer, TLDR_FORMAT.format_map(row | {"post": post}))) > query_length:
        if not post:
            return None
        post, truncated = post[: post.rfind("\n")], True  # with no newline left rfind is -1: the last character goes
    return ids, truncated


def hh_split(chosen: str, rejected: str):
    """The prompt is the transcript up to and including the last '\\n\\nAssistant:' that chosen and rejected share."""
    end = os.path.commonprefix([chosen, rejected]).rfind(HH_TAG)
    return None if end < 0 else (chosen[: end + len(HH_TAG)], chosen[end + len(HH_TAG) :], rejected[end + len(HH_TAG) :])


def hh_prompt(tokenizer, prompt: str, query_length: int):
    """HH prompt ids: a long conversation keeps its end (left truncation) and the tokenizer's leading special tokens
    (Llama's BOS). Returns (ids, whether the prompt was truncated)."""
    head = tokenizer.encode("")  # what the tokenizer puts before any text: [BOS], or nothing
    ids = encode(tokenizer, prompt, special=False)
    cut = max(0, len(head) + len(ids) - query_length)
    return head + ids[cut:], cut > 0


def response_ids(tokenizer, text: str):
    """A response: one leading space, then the EOS token (appended as an id, never as text)."""
    return encode(tokenizer, " " + text.strip(), special=False) + [tokenizer.eos_token_id]


def from_pretrained(cls, path: str, tokenizer=None, **kwargs):
    """cls.from_pretrained with a clear offline error; a model also gets room for the pad token, and no dropout (N+)."""
    try:
        if tokenizer is not None:  # a model, built with no dropout (N+): every dropout rate of its config at 0, since
            rates = transformers.AutoConfig.from_pretrained(path).to_dict().items()  # some layers read it as a float (OPT)
            kwargs |= {k: 0.0 for k, v in rates if "drop" in k and isinstance(v, float)} | {"output_loading_info": True}
        loaded = cls.from_pretrained(path, **kwargs)
    except OSError as e:
        if os.path.exists(path):
            raise
        raise SystemExit(f"Could not load '{path}' ({e}). Offline, point the model flags (--sft-model-path, ...) at local "
            "folders saved with save_pretrained (sft.py and reward_model.py write them).") from None  # fmt: skip
    if tokenizer is None:
        return loaded  # the tokenizer
    model, missing = loaded[0], sorted(loaded[1]["missing_keys"])
    if missing:
        print(f"{path}: {', '.join(missing[:4])}{' ...' * (len(missing) > 4)} initialised from scratch, not in the checkpoint")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def load_tokenizer(path: str, padding_side: str = "left"):
    tokenizer = from_pretrained(AutoTokenizer, path, padding_side=padding_side)
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"the tokenizer of {path} has no EOS token; set `eos_token` in its tokenizer_config.json")
    if tokenizer.encode("a")[-1] == tokenizer.eos_token_id:  # Llama's add_eos_token: every prompt would end in an EOS
        raise SystemExit(f"the tokenizer of {path} appends an EOS to every text; save it without (the scripts end responses)")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # with pad = EOS, masking the padding would mask the EOS
    return tokenizer


def save_model(args, model, tokenizer, weights=None):
    """The final model, a save_pretrained folder: every process helps gather the weights, rank 0 writes them."""
    options = dist_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = dist_state.get_model_state_dict(model, options=options) if weights is None else weights
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.save_pretrained(args.output_dir, state_dict=weights)
        tokenizer.save_pretrained(args.output_dir)
        print(f"saved the model and tokenizer to {args.output_dir}")
    if dist.is_initialized():  # none closes its connections while another still uses them
        dist.barrier()
        dist.destroy_process_group()


# ---- flags, checked before anything is loaded ----
FLAG_RULES = {
    "> 0": "lr eps batch_size local_micro_batch_size query_length response_length num_train_epochs keep_checkpoints "
    "max_train_samples max_eval_samples max_norm_samples",
    ">= 0": "eval_every save_every",
}
RESUMABLE = "resume_from save_every keep_checkpoints eval_every output_dir fsdp"  # may change on resume
COMPUTED = "num_updates gradient_accumulation_steps"  # filled in by main()
CHECKS = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0}


def check_flags(args, world: Optional[int] = None):
    """A flag out of its FLAG_RULES range is refused; with `world`, a batch that does not split over the processes too."""
    for must, names in FLAG_RULES.items():
        for name in names.split():
            if (value := getattr(args, name)) is not None and not CHECKS[must](value):
                raise SystemExit(f"--{name.replace('_', '-')} {value}: must be {must}")
    parts, chunk = getattr(args, "num_mini_batches", 1), getattr(args, "local_rollout_forward_batch_size", 1)
    if world and (args.batch_size % (args.local_micro_batch_size * world * parts) or args.batch_size % (chunk * world)):
        raise SystemExit(f"--batch-size {args.batch_size} must split into --num-mini-batches minibatches of whole "
            f"--local-micro-batch-size x {world} processes, and of --local-rollout-forward-batch-size x {world}")  # fmt: skip
    if world and args.fsdp and (not dist.is_initialized() or getattr(args, "use_lora", False)):
        raise SystemExit(f"--fsdp shards the trained weights across torchrun's processes (torchrun ... {sys.argv[0]} --fsdp); "
                         "not with --use-lora, where the adapters alone train")  # fmt: skip


def check_hub(paths):
    """Fails in seconds, not after a minute of retries, when a Hub id is asked for and the Hub cannot be reached."""
    remote = [p for p in dict.fromkeys(paths) if p and not os.path.exists(p) and not p.endswith((".json", ".jsonl"))]
    if remote and not huggingface_hub.constants.HF_HUB_OFFLINE:
        try:
            huggingface_hub.get_session().head(endpoint := huggingface_hub.constants.ENDPOINT, timeout=5)  # any answer will do
        except Exception as e:  # no answer: offline, a firewall, a wrong HF_ENDPOINT
            raise SystemExit(f"{', '.join(remote)}: not on this machine, and the Hugging Face Hub ({endpoint}) cannot be "
                f"reached ({type(e).__name__}: {e}). Offline, point these flags at local folders or json/jsonl files, or "
                "set HF_HUB_OFFLINE=1 to use what the Hub cache already holds.")  # fmt: skip


# ---- torchrun and FSDP2: each function is a no-op in one process ----
def init_distributed(args):
    """(rank, processes, device); under torchrun the process group: NCCL between GPUs, gloo between CPU processes."""
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    cuda = args.cuda and torch.cuda.is_available()
    # LOCAL_RANK's GPU, modulo the visible ones: a scheduler may show each process its own GPU alone
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if "RANK" in os.environ:
        if cuda:
            torch.cuda.set_device(device)
        # rank 0 alone writes a checkpoint (24 GB for PPO at 1B) while the others wait: NCCL's 10 minutes are too short
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
        if rank > 0:  # one console: rank 0 prints (errors, on stderr, come from every rank)
            sys.stdout = open(os.devnull, "w")
    return rank, world, device


def on_rank0(fn):
    """fn() run by rank 0 alone, its result (or its SystemExit) sent to every process: another node's disk may differ."""
    box = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except SystemExit as e:
            box = [("exit", str(e))]
    if dist.is_initialized():
        dist.broadcast_object_list(box, 0)
    if box[0][0] == "exit":
        raise SystemExit(box[0][1])
    return box[0][1]


def gather(tensor):
    """Every process's rows, concatenated in rank order: each process rolls out its share, and all get the whole batch."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_sum(tensor):
    """The sum of a tensor over all processes."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def average_gradients(params, fsdp: bool, bucket_bytes: int = 2**25):
    """DDP written out: the mean of the processes' gradients, one all-reduce per 32 MB bucket (FSDP reduced its own)."""
    if not dist.is_initialized() or fsdp:
        return
    grads, bucket, size = [p.grad for p in params if p.grad is not None], [], 0
    for i, grad in enumerate(grads):
        bucket, size = bucket + [grad], size + grad.numel() * grad.element_size()
        if size >= bucket_bytes or i == len(grads) - 1 or grads[i + 1].dtype != grad.dtype:
            flat = torch.cat([g.flatten() for g in bucket])
            dist.all_reduce(flat)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(part.view_as(g) / dist.get_world_size())
            bucket, size = [], 0


def sync_gradients(models, fsdp: bool, last: bool):
    """FSDP reduce-scatters the gradients at the last micro-batch of a minibatch only, not at every one."""
    for model in models if fsdp else ():
        model.set_requires_gradient_sync(last)


def place(model, device, fsdp: bool):
    """The model on the device, or FSDP2 on a mesh of the script's device, sharded on the CPU, each decoder layer a unit."""
    if not fsdp:
        return model.to(device)
    mesh = dist.init_device_mesh(device.type, (dist.get_world_size(),))
    cuda = device.type == "cuda"  # on a GPU the gathered weights are bf16 and the gradients are reduced in fp32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    units = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]  # the decoder layers
    for unit in units + [model]:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    held, total = sum(p.to_local().numel() for p in model.parameters()), sum(p.numel() for p in model.parameters())
    print(f"FSDP: {type(model).__name__} in {len(units) + 1} units; this process holds {held:,} of its {total:,} parameters")
    return model


# ---- checkpoints: one file, on the CPU, written by rank 0 and made current by one rename ----
def save_checkpoint(args, update: int, model, optimizer, **counters):
    """The trained weights (LoRA: the adapters), AdamW state, counters and flags, in rank 0's CPU memory, then one file."""
    options = dist_state.StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights, optimizer_state = dist_state.get_state_dict(model, optimizer, options=options)  # FSDP: every process takes part
    if dist.is_initialized() and dist.get_rank() > 0:
        return
    folder = f"runs/{args.run_name}/checkpoints"
    os.makedirs(folder, exist_ok=True)
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}  # a tied one too
    weights = {name: tensor for name, tensor in weights.items() if name not in frozen}  # torch lists it once, keeps it
    state = {"model": weights, "optimizer": optimizer_state, "update": update, "config": asdict(args), **counters}
    torch.save(state, f"{folder}/incomplete.pt")
    os.replace(f"{folder}/incomplete.pt", f"{folder}/update_{update:07d}.pt")  # a kill at any instant leaves a whole one
    for old in sorted(glob.glob(f"{folder}/update_*.pt"))[: -args.keep_checkpoints]:
        os.remove(old)
    print(f"checkpoint written to {folder}/update_{update:07d}.pt (resume with --resume-from auto)")


def restore(model, optimizer, checkpoint):
    """A checkpoint's weights and AdamW state into the models, sent from rank 0 (under FSDP each keeps its shard)."""
    options = dist_state.StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized(), strict=False)
    dist_state.set_model_state_dict(model, checkpoint.pop("model", {}), options=options)  # popped: no copy kept alive
    dist_state.set_optimizer_state_dict(model, optimizer, checkpoint.pop("optimizer", {}), options=options)


def resume(args, task: str):
    """--resume-from: rank 0 reads the checkpoint; the command line is parsed over the run's saved flags. (args, checkpoint)"""
    tensors = {}

    def read(where=args.resume_from.rstrip("/")):
        if where == "auto":  # the newest run of this task, experiment and seed that holds a checkpoint
            runs = sorted(glob.glob(f"runs/{task}__{args.exp_name}__{args.seed}__*"), key=lambda r: int(r.rsplit("__", 1)[1]))
            if not (where := next((r for r in reversed(runs) if glob.glob(f"{r}/checkpoints/update_*.pt")), None)):
                return print("--resume-from auto: no checkpoint of this run under runs/, starting a new run")
        candidates = [where] if os.path.isfile(where) else sorted(glob.glob(f"{where}/checkpoints/update_*.pt"), reverse=True)
        for path in candidates:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and numbers: no code runs
            except Exception as e:  # noqa: BLE001 (any damage: name it and try the previous checkpoint)
                print(f"WARNING: checkpoint {path} does not load ({type(e).__name__}: {str(e)[:300]}); trying the one before")
                continue
            tensors.update(model=state.pop("model"), optimizer=state.pop("optimizer"))
            return path, state
        if candidates or not os.path.exists(f"{where}/args.json"):
            raise SystemExit(f"--resume-from {where}: no checkpoint loads (of {candidates}), no args.json to start again from")
        print(f"--resume-from {where}: no checkpoint yet; the run starts again with the flags of {where}/args.json")
        return where, {"config": json.load(open(f"{where}/args.json"))}  # a run stopped before its first checkpoint

    if (found := on_rank0(read)) is None:
        return Args(**{**asdict(args), "resume_from": None}), None
    (path, counters), flag, resumable = found, lambda k: "--" + k.replace("_", "-"), RESUMABLE.split()
    given, saved = tyro.cli(Args, default=Args(**counters["config"])), counters["config"]  # the saved flags, and new ones
    if clash := [f"{flag(k)} {v} (saved: {saved[k]})" for k, v in vars(given).items() if k not in resumable and v != saved[k]]:
        raise SystemExit(f"--resume-from {args.resume_from}: the run was started with other flags: {'; '.join(clash)}. Only "
                         f"{', '.join(map(flag, resumable))} may change on resume.")  # fmt: skip
    given.resume_from = path
    check_flags(given)
    return given, ({**counters, **tensors} if "update" in counters else None)


# ---- the run folder and its log ----
def start_run(args, task: str, start: int):
    """Rank 0 names the run, writes args.json and opens metrics.jsonl (cut to the resumed update). (log, W&B, TensorBoard)"""

    def begin():
        if args.run_name and not args.resume_from and os.path.exists(f"runs/{args.run_name}/metrics.jsonl"):
            raise SystemExit(f"runs/{args.run_name} holds a run already: choose another --run-name, or --resume-from it")
        name = args.run_name or f"{task}__{args.exp_name}__{args.seed}__{int(time.time())}"
        for folder in (args.output_dir, f"runs/{name}"):
            with contextlib.suppress(OSError):
                os.makedirs(folder, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                raise SystemExit(f"cannot write to {folder}")
        config = asdict(args) | {"run_name": name, "resume_from": None}
        default, quiet = asdict(Args()) | {"run_name": name}, COMPUTED.split()  # the run line lists the changed flags
        changed = [f"--{k.replace('_', '-')} {v}" for k, v in config.items() if k not in quiet and v != default[k]]
        print(f"run {name}: {' '.join(changed) or 'the default flags'} (every flag: runs/{name}/args.json)")
        path, kept = f"runs/{name}/metrics.jsonl", []
        for line in open(path) if start > 1 and os.path.exists(path) else []:
            try:
                kept += [line] if json.loads(line)["update"] < start else []
            except json.JSONDecodeError:  # a line cut by the kill
                break
        for file, text in ((f"runs/{name}/args.json", json.dumps(config, indent=1)), (path, "".join(kept))):
            with open(f"{file}.tmp", "w") as f:
                f.write(text)
            os.replace(f"{file}.tmp", file)
        return name

    args.run_name = on_rank0(begin)
    if dist.is_initialized() and dist.get_rank() > 0:
        return open(os.devnull, "w"), None, None
    tracker = writer = None
    if args.track:
        import wandb  # only imported when asked for

        tracker = wandb.init(project="drpo", name=args.run_name, config=asdict(args), resume="allow", id=args.run_name)
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        writer = SummaryWriter(f"runs/{args.run_name}")
    return open(f"runs/{args.run_name}/metrics.jsonl", "a"), tracker, writer


def log_metrics(metrics: dict, log, tracker=None, writer=None):
    """The console, metrics.jsonl, W&B and TensorBoard; the tensor values read from the device in one transfer."""
    if tensors := [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]:
        metrics |= dict(zip(tensors, torch.stack([metrics[k].double() for k in tensors]).tolist()))
    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    log.write(json.dumps(metrics) + "\n")
    log.flush()
    step = metrics.get("episodes", metrics["update"])
    if tracker is not None:
        tracker.log(metrics, step=step)
    for k, v in metrics.items() if writer is not None else ():
        writer.add_scalar(k, v, step)


def progress(start: int, end: int, rank: int):
    """The updates start..end, with a progress bar and an ETA on a terminal (none in a log file, nor on other ranks)."""
    return tqdm(range(start, end + 1), initial=start - 1, total=end, unit="update", disable=rank or not sys.stderr.isatty())


def clock(device):
    """time.time(), once the GPU has done the work queued so far (else a phase's time would be that of its queueing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


if __name__ == "__main__":
    main()
