# Online and iterative DPO on TL;DR or Anthropic HH, with DR-PO's dataset reset as a flag. Each iteration the policy
# writes K responses to each of a set of prompts, the reward model (or --reward-fn) scores them, two of each prompt's
# K become a labelled pair (the better one chosen, a tie dropped), and DPO trains on those pairs:
#
#   loss = -log sigmoid(beta * ((logp(y_w) - ref_logp(y_w)) - (logp(y_l) - ref_logp(y_l))))
#
# OAIF (Guo et al. 2024, arXiv 2402.04792; TRL's OnlineDPOTrainer), the defaults: K 2, one batch of prompts an
# iteration, one DPO step on it. Iterative DPO (GSHF, Xiong et al. 2024, arXiv 2312.11456; RLHFlow/Online-RLHF): K 4 to
# 8, the best against the worst, thousands of prompts an iteration, DPO epochs over their pairs, the previous iterate as
# the reference. With --reset-prob, all K responses of a reset prompt start from one state of the offline data, the
# prompt and the first h tokens of a good response; the pair's log-probs leave that prefix out, as they leave the prompt:
#
#   state                            | y_w (the better of two)            | y_l
#   SUBREDDIT: ... TL;DR: my  cat    | hates  the  new  dog  <eos>        | is  fine  <eos>
# Docs: README.md#online_dpopy
import contextlib
import datetime
import glob
import json
import math
import os
import resource
import runpy
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
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig

transformers.logging.set_verbosity_error()  # its load reports flag a new value or reward head, which is expected
transformers.logging.disable_progress_bar()


@dataclass
class Args:
    # ---- online DPO: the pairs and the loss ----
    num_generations: int = 2  # K, responses per prompt (OAIF and TRL: 2; GSHF's rejection sampling: 4 to 8)
    pair_selection: Literal["first_two", "max_min", "max_random"] = "first_two"  # which two of the K form the pair (README)
    prompts_per_iteration: Optional[int] = None  # prompts sampled per iteration (default: --batch-size, OAIF's one step)
    num_epochs: int = 1  # DPO passes over each iteration's pairs (RLHFlow's iterative DPO: 2)
    reference: Literal["initial", "previous"] = "initial"  # DPO's reference: the SFT model, or the iteration's first policy
    beta: float = 0.1  # DPO's beta (TRL's online DPO recipe for TL;DR)
    label_smoothing: float = 0.0  # conservative DPO: the assumed probability that a label is flipped (RLHFlow: 0.1)
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO's loss; ipo: IPO's squared loss
    # ---- DR-PO's reset ----
    reset_prob: float = 0.0  # probability that a prompt's K responses start from a state of the offline dataset
    reset_min_prefix: int = 1  # h_min, the shortest reset prefix; h is uniform in {h_min, ..., len(reset response) - 1}
    reset_source: Literal["sft_reference", "chosen"] = "sft_reference"  # TL;DR: reset to the SFT reference or the chosen
    # ---- models and data ----
    task: Literal["tldr", "hh"] = "tldr"  # tldr: Reddit TL;DR posts; hh: Anthropic HH conversations
    sft_model_path: Optional[str] = None  # policy and reference init (default: DEFAULTS)
    reward_model_path: Optional[str] = None  # the labeller: a reward model (default: DEFAULTS)
    reward_fn: Optional[str] = None  # `file.py:function` scoring (prompts, responses) lists of str; replaces the reward model
    dataset_name: Optional[str] = None  # prompts and reset states: Hub id, folder or json/jsonl (default: DATASETS)
    dataset_config: Optional[str] = None  # Hub config of the dataset (default: DATASETS)
    train_split: str = "train"  # split whose prompts are rolled out
    query_length: int = 512  # max prompt tokens: a TL;DR post is cut back at its last newline, an HH prompt keeps its end
    response_length: Optional[int] = None  # tokens per response, a reset prefix included (default: DEFAULTS)
    # ---- the optimisation ----
    total_episodes: int = 700_000  # generations in the whole run: TRL's recipe, 3 passes over 116,722 prompts, 2 each
    batch_size: int = 128  # labelled pairs per optimizer step, over all processes (TRL: 8 x 2 accumulated x 8 GPUs)
    temperature: float = 0.9  # sampling temperature (TRL's); the loss's log-probs are the model's own, at temperature 1
    lr: float = 5e-7  # learning rate (TRL's)
    anneal_lr: bool = True  # anneal the learning rate linearly to 0 over the iterations
    eps: float = 1e-5  # AdamW epsilon
    max_grad_norm: Optional[float] = 1.0  # clip each step's gradient norm (TRL's Trainer: 1.0; None: no clipping)
    missing_eos_penalty: Optional[float] = -1.0  # score of a response with no EOS, replacing its score (None: keep it)
    eval_every: int = 0  # every N iterations, score greedy responses from the prompt alone on --eval-prompts prompts
    eval_prompts: int = 64  # how many prompts the periodic evaluation uses
    early_stop_score: Optional[float] = None  # stop (and save) once the evaluation's mean score reaches this value
    # ---- the run ----
    exp_name: str = "online_dpo"  # name of this experiment (part of the run name)
    run_name: Optional[str] = None  # log, config, checkpoints: runs/{run_name} (default: {task}__{exp}__{seed}__{time})
    seed: int = 1  # seed of the experiment
    output_dir: str = "models/online_dpo"  # where the final policy and tokenizer are saved
    # ---- memory and speed: batch splits, dtypes, LoRA, FSDP ----
    local_rollout_forward_batch_size: int = 32  # prompts per generate call and process (K responses each)
    local_micro_batch_size: int = 8  # pairs per forward/backward pass and process; a step accumulates them
    cuda: bool = True  # use CUDA when available (bf16 autocast there); CPU otherwise
    dtype: Literal["float32", "bfloat16"] = "float32"  # trained weights' dtype, whatever the checkpoint stores
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # reference and reward model (auto: bf16 on CUDA)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass to save memory
    use_lora: bool = False  # train LoRA adapters (needs `peft`); the initial reference is the adapter off
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA alpha
    lora_target_modules: str = "all-linear"  # layers with adapters: `all-linear` or names, comma-separated
    fsdp: bool = False  # under torchrun, shard the policy's weights, gradients and AdamW state (FSDP2)
    # ---- logging and checkpoints ----
    print_sample_every: int = 10  # print sample pairs every N iterations
    track: bool = False  # log to Weights & Biases (needs `wandb`)
    tensorboard: bool = False  # log to TensorBoard under runs/{run_name} (needs `tensorboard`)
    save_every: int = 50  # write a checkpoint every N iterations (0: never)
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep
    resume_from: Optional[str] = None  # `auto`, a run folder or a checkpoint file (README: Checkpoints and resume)
    # ---- computed from the flags above (not flags) ----
    num_updates: tyro.conf.Suppress[int] = 0


DEFAULTS = {  # --task -> (SFT model, reward model, response length); sft.py and reward_model.py write the HH ones
    "tldr": ("cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr", "cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr", 53),
    "hh": ("models/sft_hh", "models/reward_hh", 128),
}
DATASETS = {  # where the prompts and reset states come from -> the default dataset and config
    "sft_reference": ("vwxyzjn/summarize_from_feedback_tldr_3_filtered", None),
    "chosen": ("openai/summarize_from_feedback", "comparisons"),
    "hh": ("Anthropic/hh-rlhf", None),
}


# ---- online DPO: the labelled pairs and DPO's loss --------------------------------------------------------------------
def select_pairs(scores, mode: str):
    """Which two of each prompt's K responses make its pair, from their scores (prompts, K): (chosen, rejected), indices
    in 0..K-1, and kept, (prompts,) bool: False where the two scores are equal, a tie that is dropped (not ordered by
    index). first_two (OAIF): responses 0 and 1. max_min (GSHF): the best against the worst. max_random: the best
    against the first of the others, as RLHFlow's code: a uniformly random other of untied scores, never a tied one."""
    rows = torch.arange(len(scores))
    if mode == "first_two":
        a, b = torch.zeros_like(rows), torch.ones_like(rows)
    elif mode == "max_min":
        a, b = scores.argmax(1), scores.argmin(1)  # the first best and the first worst
    else:
        a = scores.argmax(1)
        b = (a == 0).long()  # response 1 when the best is response 0, else response 0
    a_wins = scores[rows, a] > scores[rows, b]
    chosen, rejected = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    return chosen, rejected, scores[rows, a] != scores[rows, b]


def labelled_pairs(states, responses, h, ends, chosen, rejected, kept, k: int):
    """DPO's pairs, (state, chosen response, rejected response) token lists, one per kept prompt. The state is the prompt
    and, after a reset, the prefix: part of the state, so that DPO's log-probs leave it out as they leave out the prompt.
    A response is what the policy wrote, from position h up to and including its EOS (`ends`: the last real token)."""
    pairs = []
    for p in kept.nonzero()[:, 0].tolist():
        written = [responses[r, h[p] : ends[r] + 1].tolist() for r in (p * k + chosen[p], p * k + rejected[p])]
        pairs.append((states[p], *written))
    return pairs


def sequence_logprobs(model, pairs, pad_id: int, device):
    """Summed log-probs of the chosen and the rejected responses of a micro-batch, in one forward pass: (chosen (n,),
    rejected (n,)). The sequences are left-padded, so every response token lies in the last K positions (K: the longest
    response) and the LM head runs on those alone (logits_to_keep); prompt and padding tokens there are masked out."""
    sequences = [q + c for q, c, _ in pairs] + [q + r for q, _, r in pairs]
    lengths = torch.tensor([len(c) for _, c, _ in pairs] + [len(r) for _, _, r in pairs], device=device)
    input_ids = left_pad(sequences, pad_id).to(device)
    k = int(lengths.max())
    attention_mask = input_ids != pad_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    logits = model(input_ids=input_ids.masked_fill(~attention_mask, 0), attention_mask=attention_mask,
                   position_ids=position_ids, logits_to_keep=k + 1).logits[:, :-1]  # fmt: skip
    targets = input_ids[:, -k:]
    response_mask = torch.arange(k, device=device).unsqueeze(0) >= (k - lengths).unsqueeze(1)  # (2n, k)
    logps = torch.gather(logits.float().log_softmax(-1), 2, targets.unsqueeze(-1)).squeeze(-1)
    summed = (logps * response_mask).sum(1)
    return summed[: len(pairs)], summed[len(pairs) :]


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid", rpo_alpha: float = 0.0, chosen_lengths=None):  # fmt: skip
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


def reset_states(queries, reset_responses, reset_prob: float, h_min: int, response_length: int, generator):
    """DR-PO's reset: with probability reset_prob an episode starts at prompt + reset_response[:h] (the ids of a good
    response, EOS included), h uniform in {h_min, ..., min(len(reset_response), response_length) - 1}: the prefix never
    holds the EOS and the policy writes at least one token. Returns the states (token lists), h and reset, (batch,)."""
    coins, uniforms = torch.rand(2, len(queries), generator=generator)  # both drawn for every episode: a fixed stream
    h_max = torch.tensor([min(len(c) - 1, response_length - 1) for c in reset_responses])
    reset = (coins < reset_prob) & (h_max >= h_min)
    h = torch.where(reset, h_min + (uniforms * (h_max - h_min + 1).clamp(min=1)).long(), 0)
    states = [q + c[:n] for q, c, n in zip(queries, reset_responses, h.tolist())]
    return states, h, reset


def generate_responses(policy, states, h, response_length: int, pad_id: int, **generation):
    """Each row's whole response, (rows, response_length): the reset prefix (its state's last h tokens, never generated),
    then the response_length - h tokens the policy writes (no EOS stops it: the EOS trick). One call samples
    response_length - min(h) tokens for every row; a row with a longer prefix drops its extra ones."""
    new, mask = response_length - int(h.min()), (states != pad_id).long()
    out = policy.generate(states, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad_id,
        synced_gpus=False, **generation)  # no collective a token (the FSDP default): the policy is gathered  # fmt: skip
    return out.gather(1, (states.shape[1] - h).unsqueeze(1) + torch.arange(response_length, device=states.device))


# ---- the rollout's pieces (PPO's, the N+ details) ---------------------------------------------------------------------
def first_true_indices(bools):
    """Index of the first True of each row, or the row length when there is none (argmax returns the first maximum)."""
    return torch.where(bools.any(-1), bools.int().argmax(-1), bools.shape[-1])


def truncate_response(responses, eos_id: int, pad_id: int):
    """The EOS trick: keep each response up to and including its first EOS, pad the rest."""
    idxs = torch.arange(responses.shape[1], device=responses.device)
    return torch.masked_fill(responses, idxs > first_true_indices(responses == eos_id).unsqueeze(-1), pad_id)


def forward(model, query_responses, pad_id: int, **kwargs):
    """A forward pass on left-padded sequences: padding masked out, position ids counted from the first real token."""
    attention_mask = query_responses != pad_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


def token_scores(model, query_responses, pad_id: int):
    """The scalar head of a sequence classifier at every position, (batch, seq_len), captured by a hook: the model's own
    forward (the one FSDP shards) returns the last token's score alone."""
    scores = []
    with model.score.register_forward_hook(lambda module, inputs, output: scores.append(output)):  # removed on exit
        forward(model, query_responses, pad_id)
    return scores[0].squeeze(-1).float()


def last_token_index(input_ids, pad_id: int):
    """Index of the last non-pad token of each row, the same rule as transformers' sequence classification."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * (input_ids != pad_id)).argmax(-1)


def penalize_missing_eos(scores, responses, eos_id: int, penalty: Optional[float]):
    """N+: a response with no EOS gets a fixed low score instead of its reward (an EOS in the prompt does not count)."""
    return scores if penalty is None else torch.where((responses == eos_id).any(-1), scores, penalty)


def score_responses(reward_model, reward_fn, tokenizer, prompts_ids, query_batch, responses, penalty, chunk_size: int):
    """The EOS trick, then each response's score: the reward model at the last real token (plus any shift reward_model.py
    could not fold into the weights) or --reward-fn on the text; the missing-EOS penalty. (cut responses, raw, scores)"""
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    postprocessed = truncate_response(responses, eos_id, pad_id)
    if reward_fn is None:
        chunks = torch.cat((query_batch, postprocessed), 1).split(chunk_size)
        raw = torch.cat(
            [token_scores(reward_model, x, pad_id).gather(1, last_token_index(x, pad_id)[:, None])[:, 0] for x in chunks]
        )
        raw += 0.0 if getattr(reward_model.config, "reward_bias_in_weights", True) else reward_model.config.reward_bias
    else:
        prompts, texts = (tokenizer.batch_decode(x, skip_special_tokens=True) for x in (prompts_ids, postprocessed))  # no BOS
        raw = torch.tensor(reward_fn(prompts, texts), dtype=torch.float, device=responses.device)
        if len(raw) != len(texts):
            raise SystemExit(f"--reward-fn returned {len(raw)} scores for {len(texts)} responses")
    return postprocessed, raw, penalize_missing_eos(raw, postprocessed, eos_id, penalty)


# ---- the training loop ------------------------------------------------------------------------------------------------
STATS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def train(args, run, log, tokenizer, queries, reset_responses, models, reward_fn, checkpoint):
    rank, world, device = run
    policy, ref_policy, reward_model = models
    pad_id, eos_id, k = tokenizer.pad_token_id, tokenizer.eos_token_id, args.num_generations
    non_tokens = non_token_ids(tokenizer, policy.get_input_embeddings().num_embeddings, device)  # never sampled
    suppress = non_tokens.tolist()  # for generate(), which reads a device tensor back to the host one id at a time
    sampling = dict(temperature=args.temperature + 1e-7, top_k=0, top_p=1.0, do_sample=True, suppress_tokens=suppress)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    reference = policy.disable_adapter if args.use_lora else contextlib.nullcontext  # LoRA: the policy, adapter off
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, eps=args.eps)
    reset_generator = torch.Generator().manual_seed(args.seed)  # DR-PO's coin flips have a stream of their own
    start, prompts, generations = 1, args.prompts_per_iteration, args.prompts_per_iteration * k
    if checkpoint:
        restore(policy, optimizer, checkpoint)
        reset_generator.set_state(checkpoint["reset_rng"])
        start = checkpoint["update"] + 1
        print(f"resumed from {args.resume_from} at iteration {start}")
    start_time = clock(device)
    for update in progress(start, args.num_updates, rank):  # one iteration: sample, label, then DPO on the pairs
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (update - 1.0) / args.num_updates) * args.lr
        # 1. The iteration's prompts, and DR-PO's reset: with probability reset_prob a prompt's K responses all start
        # from the prompt and the first h tokens of a good response of the offline data. One state for the K: only then
        # are their scores comparable, and the pair's preference is about what the policy wrote after the same prefix.
        t0 = clock(device)
        batch = batch_indices(update, prompts, len(queries), args.seed)
        states, h, reset = reset_states([queries[i] for i in batch], [reset_responses[i] for i in batch],
            args.reset_prob, args.reset_min_prefix, args.response_length, reset_generator)  # fmt: skip
        by_h = torch.argsort(h, stable=True).tolist()  # prompts of similar h in one generate call, which then stops early
        batch, states, h, reset = [batch[i] for i in by_h], [states[i] for i in by_h], h[by_h], reset[by_h]
        # the K responses of prompt p are rows p * K to p * K + K - 1, from the same state: (prompts * K, ...) from here on
        batch_queries = [queries[i] for i in batch for _ in range(k)]
        query_batch = left_pad(batch_queries, pad_id).to(device)  # the prompts alone
        row_h = h.repeat_interleave(k).to(device)
        mine = slice(rank * generations // world, (rank + 1) * generations // world)  # this process's share, whole prompts
        # 2. Rollout: the policy writes K responses to each state
        responses, chunk_rows = [], k * args.local_rollout_forward_batch_size
        with torch.no_grad(), autocast, gathered(policy):  # FSDP: the policy gathered once for the whole rollout
            for i in range(mine.start, mine.stop, chunk_rows):
                # the seed of a chunk is its place in the batch: 2 processes roll out the generations of 1 process
                torch.manual_seed(int(np.random.default_rng([args.seed, update, i]).integers(2**62)))
                chunk = [states[row // k] for row in range(i, min(i + chunk_rows, mine.stop))]
                state = left_pad(chunk, pad_id, width=query_batch.shape[1]).to(device)  # never narrower than the prompts
                responses.append(generate_responses(policy, state, row_h[i : i + chunk_rows], args.response_length, pad_id,
                                                    **sampling))  # fmt: skip
            t1 = clock(device)
            # 3. Label: the EOS trick, the reward model on the whole response (a reset prefix included), the missing-EOS
            # penalty; every process gets every score. Then each prompt's pair, a tie dropped.
            scored = score_responses(reward_model, reward_fn, tokenizer, batch_queries[mine], query_batch[mine],
                torch.cat(responses), args.missing_eos_penalty, chunk_rows)  # fmt: skip
            postprocessed, raw_scores, scores = (gather(x) for x in scored)
            ends = (first_true_indices(postprocessed == pad_id) - 1).tolist()  # index of the last real token (the EOS)
            chosen, rejected, kept = select_pairs(scores.view(prompts, k).cpu(), args.pair_selection)
            pairs = labelled_pairs(states, postprocessed.cpu(), h.tolist(), ends, chosen, rejected, kept, k)
            t2 = clock(device)
        # 4. The pairs' log-probs under the policy as it is and under the SFT model (the initial reference): the
        # reference of the loss is one or the other, and their difference is the samples' KL to SFT. all_logprobs enters
        # autocast itself: entered again inside its own region, an autocast object stays on after the region ends
        with torch.no_grad(), gathered(policy):
            now = all_logprobs(policy, pairs, args, pad_id, device, autocast, rank, world)
            with reference():
                initial = all_logprobs(ref_policy, pairs, args, pad_id, device, autocast, rank, world)
        ref_c, ref_r = initial if args.reference == "initial" else now
        # 5. DPO on the pairs: num_epochs passes, minibatches of batch_size pairs (one optimizer step each; the last may
        # be smaller), each process a contiguous share of a minibatch, in micro-batches
        n, sums, first = len(pairs), torch.zeros(len(STATS) + 1, dtype=torch.float64, device=device), None
        for epoch in range(args.num_epochs):
            order = np.random.default_rng([args.seed, update, epoch]).permutation(n).tolist()
            for mb_start in range(0, n, args.batch_size):
                minibatch = order[mb_start : mb_start + args.batch_size]
                share = -(-len(minibatch) // world)
                part, steps = minibatch[rank * share : (rank + 1) * share], -(-share // args.local_micro_batch_size)
                for micro in range(steps):  # as many passes on every process (FSDP's are collective)
                    rows = part[micro * args.local_micro_batch_size : (micro + 1) * args.local_micro_batch_size]
                    used = rows or minibatch[:1]  # a stand-in of weight 0 when this process's share ran out
                    with autocast:
                        logp_c, logp_r = sequence_logprobs(policy, [pairs[i] for i in used], pad_id, device)
                    loss, reward_c, reward_r = dpo_loss(logp_c, logp_r, ref_c[used].to(device), ref_r[used].to(device),
                        args.beta, args.label_smoothing, args.loss_type)  # fmt: skip
                    sync_gradients([policy], args.fsdp, last=micro == steps - 1)
                    # each pair weighs 1 / len(minibatch); the processes' gradients are then averaged
                    (loss * len(rows) * world / len(minibatch)).backward()
                    stats = [loss.detach(), reward_c.mean(), reward_r.mean(), (reward_c > reward_r).float().mean(),
                             (reward_c - reward_r).mean(), logp_c.detach().mean(), logp_r.detach().mean()]  # fmt: skip
                    sums += len(rows) * torch.cat([torch.stack(stats).double(), torch.ones(1, device=device)])
                first = first if first is not None else sums[0].clone() / len(minibatch)  # before the first step
                average_gradients(params, args.fsdp)  # distributed: the minibatch's mean gradient on every process
                if args.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        t3 = clock(device)
        sums = all_sum(torch.cat([sums, first.view(1) if first is not None else torch.zeros(1, device=device)]).double())
        if not (math.isfinite(sums.sum().item()) and torch.isfinite(scores).all()):  # one wait for the GPU an iteration
            raise SystemExit(f"non-finite loss or score at iteration {update}: lower --lr, or check the models or --reward-fn")
        # 6. Evaluate (greedy, from the prompt alone: resets are for training only), log, checkpoint
        evaluating = args.eval_every and update % args.eval_every == 0
        eval_score = evaluating and evaluate(args, device, models, reward_fn, tokenizer, queries, suppress, autocast)
        episodes, pair_scores = update * generations, scores.view(prompts, k).cpu()[kept]
        metrics = {
            "update": update, "episodes": episodes, "objective/scores": scores.mean(),
            "objective/raw_scores": raw_scores.mean(), "online/pairs": n, "online/ties_dropped": prompts - n,
            "val/eos_fraction": (postprocessed == eos_id).any(-1).float().mean(),
            "val/response_length": (torch.tensor(ends) + 1).float().mean(), "lr": optimizer.param_groups[0]["lr"],
            "episodes_per_s": (episodes - (start - 1) * generations) / (t3 - start_time),  # since the start or resume
            "episodes_per_s_update": generations / (t3 - t0), "time/rollout": t1 - t0, "time/scoring": t2 - t1,
            "time/update": t3 - t2, "peak_memory_gb": peak_memory_gb(device), "reset/fraction": reset.float().mean(),
        }  # fmt: skip
        if n:
            rows = torch.arange(n)
            chosen_scores, rejected_scores = pair_scores[rows, chosen[kept]], pair_scores[rows, rejected[kept]]
            metrics |= dict(zip(STATS, (sums[: len(STATS)] / sums[len(STATS)]).tolist())) | {
                "first_loss": sums[-1], "objective/kl": torch.cat([now[0] - initial[0], now[1] - initial[1]]).mean(),
                "online/chosen_scores": chosen_scores.mean(), "online/rejected_scores": rejected_scores.mean(),
                "online/score_gap": (chosen_scores - rejected_scores).mean(),
            }  # fmt: skip
        for name, group in (("reset", reset), ("no_reset", ~reset)):  # DR-PO's two kinds of prompt, apart
            if group.any():
                metrics[f"{name}/scores"] = scores.view(prompts, k)[group.to(device)].mean()
        if reset.any():
            metrics["reset/mean_h"] = h[reset].float().mean()
        log_metrics(metrics | ({"eval/score": eval_score} if evaluating else {}), *log)
        if args.print_sample_every and update % args.print_sample_every == 0:
            print_samples(tokenizer, pairs, pair_scores, chosen[kept], rejected[kept])
        if evaluating and args.early_stop_score is not None and eval_score >= args.early_stop_score:
            print(f"eval/score {eval_score:.4g} >= --early-stop-score {args.early_stop_score}: stopping at iteration {update}")
            break
        if args.save_every and update % args.save_every == 0 and update < args.num_updates:
            save_checkpoint(args, update, policy, optimizer, reset_rng=reset_generator.get_state())
    return policy


def all_logprobs(model, pairs, args: Args, pad_id: int, device, autocast, rank: int = 0, world: int = 1):
    """Summed log-probs of every pair's chosen and rejected response: (chosen (n,), rejected (n,)). Under torchrun each
    process computes a contiguous share and every process gets the whole."""
    training = model.training  # restored at the end: a frozen reference stays in eval mode
    model.eval()
    mb = args.local_micro_batch_size  # a share of whole micro-batches, each holding the rows it holds in one process:
    share = -(-len(pairs) // (world * mb)) * mb  # every result is the one-process one, to the last bit
    mine = pairs[rank * share : (rank + 1) * share]
    logps = torch.zeros(share, 2, device=device)  # the last share may be shorter: its tail stays 0 and is cut below
    for start in range(0, share, mb):  # as many passes on every process (FSDP's are collective)
        chunk = mine[start : start + mb]
        with autocast:
            c, r = sequence_logprobs(model, chunk or pairs[:1], pad_id, device)  # a stand-in when the share ran out
        logps[start : start + len(chunk)] = torch.stack([c, r], 1).float()[: len(chunk)]
    model.train(training)
    logps = gather(logps)[: len(pairs)].cpu()
    return logps[:, 0], logps[:, 1]


def evaluate(args, device, models, reward_fn, tokenizer, queries, suppress, autocast):
    """Mean score of greedy responses, from the prompt alone, to --eval-prompts prompts spread over the data (HH's are its
    subsets in turn). Every process computes it (under FSDP all gather the policy); rank 0's decides the early stop."""
    prompts = queries[:: max(1, len(queries) // args.eval_prompts)][: args.eval_prompts]  # evenly spaced
    pad_id, (policy, _, reward_model) = tokenizer.pad_token_id, models
    with autocast, gathered(policy):
        batch, no_reset = left_pad(prompts, pad_id).to(device), torch.zeros(len(prompts), dtype=torch.long, device=device)
        responses = generate_responses(
            policy, batch, no_reset, args.response_length, pad_id, do_sample=False, suppress_tokens=suppress
        )
        chunk = args.local_rollout_forward_batch_size
        scored = score_responses(
            reward_model, reward_fn, tokenizer, prompts, batch, responses, args.missing_eos_penalty, chunk
        )
    return on_rank0(lambda: scored[2].mean().item())


def print_samples(tokenizer, pairs, pair_scores, chosen, rejected, n: int = 2):
    """A few labelled pairs: the state's end (a reset prefix included), the chosen and the rejected response, scored."""
    print(f"{'score':>7} | state (end) | chosen, then rejected")
    for p, (state, better, worse) in enumerate(pairs[:n]):
        print(f"{'':>7} | ...{tokenizer.decode(state[-40:])!r}")
        for label, ids, score in (
            ("chosen", better, pair_scores[p, chosen[p]]),
            ("rejected", worse, pair_scores[p, rejected[p]]),
        ):
            print(f"{score.item():7.3f} | {label:>8}: {tokenizer.decode(ids, skip_special_tokens=True)!r}")


def main():
    args = tyro.cli(Args)
    check_flags(args)
    run = rank, world, device = init_distributed(args)  # (0, 1, cuda or cpu) in one process
    args, checkpoint = resume(args, args.task) if args.resume_from else (args, None)  # the flags from the run's checkpoint
    default_sft, default_reward, default_length = DEFAULTS[args.task]
    args.sft_model_path, args.reward_model_path = args.sft_model_path or default_sft, args.reward_model_path or default_reward
    args.response_length = args.response_length or default_length
    if args.dataset_name is None:
        args.dataset_name, args.dataset_config = DATASETS[args.reset_source if args.task == "tldr" else "hh"]
    if args.reset_prob == 1 and args.reset_min_prefix >= 1:
        print("WARNING: --reset-prob 1 with --reset-min-prefix >= 1: every response starts after at least one token of the "
              "dataset, so the policy is never trained on the first response token. See README.md.")  # fmt: skip
    args.prompts_per_iteration = args.prompts_per_iteration or args.batch_size
    args.num_updates = args.total_episodes // (args.prompts_per_iteration * args.num_generations)
    check_flags(args, world)
    if args.num_updates == 0:
        raise SystemExit("--total-episodes is smaller than --num-generations responses to --prompts-per-iteration prompts: "
                         "no iteration would run")  # fmt: skip
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None  # a rule-based labeller replaces the model
    log = start_run(args, args.task, checkpoint["update"] + 1 if checkpoint else 1)
    check_hub([args.sft_model_path, args.dataset_name, None if reward_fn else args.reward_model_path])
    tokenizer = load_tokenizer(args.sft_model_path)
    queries, reset_responses = build_episodes(args, tokenizer)
    models = load_models(args, tokenizer, device)
    policy = train(args, run, log, tokenizer, queries, reset_responses, models, reward_fn, checkpoint)
    policy.generation_config.eos_token_id = tokenizer.eos_token_id  # the EOS trick was for training only
    save_model(args, policy.merge_and_unload() if args.use_lora else policy, tokenizer)


# ======================================================================================================================
# Appendix: the machinery. Data; models; flag checks; torchrun and FSDP; checkpoints and resume; the run and its log.
# ======================================================================================================================
TLDR_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
HH_TAG = "\n\nAssistant:"
SCHEMAS = {
    "sft_reference": {"subreddit": str, "title": str, "post": str, "summary": str},
    "chosen": {"info": dict, "summaries": list, "choice": int},
    "hh": {"chosen": str, "rejected": str},
}


def build_episodes(args: Args, tokenizer):
    """(prompt ids, reset response ids incl. EOS): the prompts to roll out and the offline states to reset to. A row
    whose response is empty, or longer than an episode, keeps its prompt and is never reset (counted)."""
    name, split, source = args.dataset_name, args.train_split, args.reset_source if args.task == "tldr" else "hh"
    ds = load_rows(name, split, SCHEMAS[source], args.dataset_config)
    keys = "rows query_truncated dropped_query_too_long dropped_cnndm dropped_no_shared_prompt empty_response_never_reset "
    queries, reset_responses, counts = [], [], dict.fromkeys((keys + "long_response_never_reset").split(), 0)
    for i, row in enumerate(ds):
        check_row(row, i, SCHEMAS[source], f"{name} ({split})")
        if source == "hh":
            texts, missing = hh_split(row["chosen"], row["rejected"]), "dropped_no_shared_prompt"
            query = hh_prompt(tokenizer, texts[0], args.query_length) if texts else None
        else:
            texts = comparison_texts(row, i, name) if source == "chosen" else (row, row["summary"])
            query = tldr_query(tokenizer, texts[0], args.query_length) if texts else None
            missing = "dropped_cnndm" if texts is None else "dropped_query_too_long"
        counts["rows"] += 1
        if query is None:
            counts[missing] += 1
            continue
        ids = response_ids(tokenizer, texts[1]) if texts[1].strip() else []
        counts["query_truncated"] += query[1]
        counts["empty_response_never_reset"] += not ids
        counts["long_response_never_reset"] += len(ids) > args.response_length
        queries.append(query[0])
        reset_responses.append(ids if len(ids) <= args.response_length else [])
    print(f"{name} ({split}): {len(queries)} prompts kept; {counts}")
    if not queries:
        raise SystemExit(f"no usable prompt in {name} ({split}); see the counts above")
    return queries, reset_responses


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


def batch_indices(update: int, batch_size: int, n: int, seed: int):
    """Prompt indices of an update: slices of a fresh permutation per pass over the data, a function of the update."""
    positions = np.arange((update - 1) * batch_size, update * batch_size)
    perms = {e: np.random.default_rng([seed, int(e)]).permutation(n) for e in np.unique(positions // n)}
    return [int(perms[p // n][p % n]) for p in positions]


def left_pad(sequences, pad_id: int, width: int = 0):
    width = max(width, max(len(s) for s in sequences))  # (rows, max(width, longest))
    return torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])


def load_models(args, tokenizer, device):
    """(policy, reference, reward model); no value model. The policy is sharded (FSDP) before it leaves the CPU; the
    frozen models need no fp32 copy on a GPU. With LoRA the reference is the policy with its adapter off."""
    auto, on = ("bfloat16", "on") if device.type == "cuda" else ("float32", "off")  # bf16 is slow on a CPU
    frozen = auto if args.frozen_dtype == "auto" else args.frozen_dtype  # resolved here: the run's flags keep `auto`
    print(f"dtypes: trained weights {args.dtype}, frozen models {frozen}, bf16 autocast {on} ({device})")
    lm, frozen = AutoModelForCausalLM, getattr(torch, frozen)
    policy = from_pretrained(lm, args.sft_model_path, tokenizer, dtype=getattr(torch, args.dtype))
    policy.generation_config = GenerationConfig()  # the EOS trick (no EOS stops a sample), none of the checkpoint's settings
    reward_model = ref_policy = None
    if not args.reward_fn:
        reward_model = from_pretrained(
            AutoModelForSequenceClassification, args.reward_model_path, tokenizer, num_labels=1, dtype=frozen
        )
    if not args.use_lora:
        ref_policy = from_pretrained(lm, args.sft_model_path, tokenizer, dtype=frozen)
    else:
        from peft import LoraConfig, get_peft_model  # only imported when asked for

        targets = args.lora_target_modules if args.lora_target_modules == "all-linear" else args.lora_target_modules.split(",")
        policy = get_peft_model(
            policy, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets)
        )
        policy.print_trainable_parameters()
    if args.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        if args.use_lora:
            policy.enable_input_require_grads()
    place(policy, device, args.fsdp).train()  # FSDP: each process keeps 1/processes of the weights and AdamW state
    for model in filter(None, (reward_model, ref_policy)):
        model.to(device).eval().requires_grad_(False)
    return policy, ref_policy or policy, reward_model


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


def non_token_ids(tokenizer, vocab_size: int, device=None):
    """Ids never to be written: the pad token (read as padding) and the embedding rows past the tokenizer's vocabulary."""
    return torch.tensor([tokenizer.pad_token_id] + list(range(len(tokenizer), vocab_size)), device=device)


def load_reward_fn(spec: str):
    path, _, name = spec.rpartition(":")  # path/to/file.py:function
    if not os.path.isfile(path):
        raise SystemExit(f"--reward-fn {spec}: no file {path!r} (expected path/to/file.py:function)")
    if not callable(function := runpy.run_path(path).get(name)):
        raise SystemExit(f"--reward-fn {spec}: {path} has no function {name!r}")
    return function


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
    "> 0": "lr eps batch_size local_micro_batch_size query_length response_length keep_checkpoints temperature "
    "total_episodes local_rollout_forward_batch_size num_epochs max_grad_norm lora_r eval_prompts beta prompts_per_iteration",
    ">= 2": "num_generations",
    ">= 0": "save_every print_sample_every eval_every reset_min_prefix",
    "in [0, 1]": "reset_prob",
    "in [0, 0.5)": "label_smoothing",
}
RESUMABLE = "resume_from total_episodes save_every keep_checkpoints print_sample_every output_dir fsdp"  # may change on resume
COMPUTED = "num_updates"  # filled in by main()
CHECKS = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 2": lambda v: v >= 2,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 0.5)": lambda v: 0 <= v < 0.5,
}


def check_flags(args, world: Optional[int] = None):
    """A flag out of its range (FLAG_RULES) is refused, named; with `world`, prompts that do not split into whole rollout
    chunks on every process too (the pairs, whose number ties make vary, need not split evenly)."""
    for must, names in FLAG_RULES.items():
        for name in names.split():
            if (value := getattr(args, name)) is not None and not CHECKS[must](value):
                raise SystemExit(f"--{name.replace('_', '-')} {value}: must be {must}")
    if world and args.prompts_per_iteration % (args.local_rollout_forward_batch_size * world):  # (pairs: any number)
        raise SystemExit(f"--prompts-per-iteration {args.prompts_per_iteration} must split into whole "
                         f"--local-rollout-forward-batch-size x {world} processes")  # fmt: skip
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


@contextlib.contextmanager
def gathered(model):
    """FSDP: the whole policy gathered once for generate(), not at every decode step (trl#1726); a no-op without FSDP."""
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


def peak_memory_gb(device):
    """GPU: the peak memory the caching allocator reserved (what the device had to hold); CPU: the peak RSS in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports the RSS in KiB


if __name__ == "__main__":
    main()
