# PPO for RLHF with the N+ implementation details (Huang et al. 2024, arXiv 2403.17031), on TL;DR: the baseline of DR-PO
# (Chang et al. 2024, arXiv 2404.08495), and drpo_tldr.py without the reset (PPO on HH: drpo_hh.py --reset-prob 0). Every
# episode starts from the prompt: the policy samples response_length tokens (the EOS trick: the response is cut after its
# first EOS), the reward model scores it, a per-token KL penalty keeps the policy near the SFT policy, and PPO updates
# the policy and a value model on the batch. One episode, response_length 8:
#
#   tokens  SUBREDDIT: r/pets ... TL;DR: | my  cat  is  sick  ,  vet  <eos> | <pad>
#           the prompt                   | what the policy writes           | after the EOS
#   mask    -                            | 1   1    1   1     1  1    1     | 0
#   reward  -kl_coef * (logp - ref_logp) on each token of the mask; the reward model's score of the response on the EOS
# Docs: README.md#ppo_baselinepy
import contextlib
import datetime
import glob
import json
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
    # ---- models and data ----
    sft_model_path: str = "cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr"  # policy and reference init
    reward_model_path: str = "cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr"  # reward model
    value_model_path: Optional[str] = None  # value model init (default: the reward model; a causal LM gets a new head)
    reward_fn: Optional[str] = None  # `file.py:function` scoring (prompts, responses) lists of str; replaces the reward model
    dataset_name: str = "vwxyzjn/summarize_from_feedback_tldr_3_filtered"  # prompts: Hub id, folder or json/jsonl
    dataset_config: Optional[str] = None  # Hub config of the dataset
    train_split: str = "train"  # split whose prompts are rolled out
    query_length: int = 512  # max prompt tokens: a longer post is cut back at its last newline
    response_length: int = 53  # tokens per episode
    # ---- PPO and the N+ details ----
    total_episodes: int = 1_000_000  # episodes (sampled responses) in the whole run
    batch_size: int = 512  # episodes per update, over all processes
    num_mini_batches: int = 1  # minibatches per PPO epoch (one optimizer step each)
    num_ppo_epochs: int = 4  # passes over each batch of episodes
    temperature: float = 0.7  # sampling temperature, applied to the logits in every log-prob too
    lr: float = 3e-6  # learning rate of the policy and the value model
    anneal_lr: bool = True  # anneal the learning rate linearly to 0
    eps: float = 1e-5  # AdamW epsilon
    max_grad_norm: Optional[float] = None  # clip each step's gradient norm (None: no clipping, as the authors and N+)
    kl_coef: float = 0.05  # coefficient of the per-token KL penalty -kl_coef * (logp - ref_logp)
    adaptive_kl: bool = False  # adapt kl_coef towards --target-kl (Ziegler et al. 2019)
    target_kl: float = 6.0  # target KL per episode of the adaptive controller
    kl_horizon: int = 10000  # horizon (episodes) of the adaptive controller
    gamma: float = 1.0  # discount factor
    gae_lambda: float = 0.95  # GAE lambda
    whiten_rewards: bool = True  # per-token rewards scaled to unit variance (mean kept) before GAE, as DR-PO's runs
    cliprange: float = 0.2  # PPO policy clip range
    cliprange_value: float = 0.2  # value clip range
    vf_coef: float = 0.1  # value loss coefficient
    missing_eos_penalty: Optional[float] = -1.0  # score of a response with no EOS, replacing its reward (None: keep it)
    eval_every: int = 0  # every N updates, score greedy responses to --eval-prompts spread prompts (0: never)
    eval_prompts: int = 64  # how many prompts the periodic evaluation uses
    early_stop_score: Optional[float] = None  # stop (and save) once the evaluation's mean score reaches this value
    # ---- the run ----
    exp_name: str = "ppo"  # name of this experiment (part of the run name)
    run_name: Optional[str] = None  # log, config, checkpoints: runs/{run_name} (default: tldr__{exp}__{seed}__{time})
    seed: int = 1  # seed of the experiment
    output_dir: str = "models/ppo"  # where the final policy and tokenizer are saved
    # ---- memory and speed: batch splits, dtypes, LoRA, FSDP ----
    local_rollout_forward_batch_size: int = 64  # episodes per generate/forward call of the rollout, per process
    local_micro_batch_size: int = 8  # episodes per forward/backward pass and process; minibatches accumulate them
    cuda: bool = True  # use CUDA when available (bf16 autocast there); CPU otherwise
    dtype: Literal["float32", "bfloat16"] = "float32"  # trained weights' dtype, whatever the checkpoint stores
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # reference and reward model (auto: bf16 on CUDA)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass to save memory
    use_lora: bool = False  # train LoRA adapters on the policy (needs `peft`); the reference is the adapter off
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA alpha
    lora_target_modules: str = "all-linear"  # layers with adapters: `all-linear` or names, comma-separated
    lora_value: bool = False  # with --use-lora, adapters on the value model too, its backbone and head frozen
    fsdp: bool = False  # under torchrun, shard the trained models' weights, gradients and AdamW state (FSDP2)
    # ---- logging and checkpoints ----
    print_sample_every: int = 10  # print sample episodes every N updates
    track: bool = False  # log to Weights & Biases (needs `wandb`)
    tensorboard: bool = False  # log to TensorBoard under runs/{run_name} (needs `tensorboard`)
    save_every: int = 50  # write a checkpoint every N updates (0: never)
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep
    resume_from: Optional[str] = None  # `auto`, a run folder or a checkpoint file (README: Checkpoints and resume)
    # ---- computed from the flags above (not flags) ----
    num_updates: tyro.conf.Suppress[int] = 0
    minibatch_size: tyro.conf.Suppress[int] = 0
    gradient_accumulation_steps: tyro.conf.Suppress[int] = 0


# ---- the rollout: the policy writes a response to each prompt ------------------------------------------------------
def generate_responses(policy, queries, response_length: int, pad_id: int, **generation):
    """The response_length tokens the policy writes after each left-padded prompt, (rows, response_length)."""
    new, mask = response_length, (queries != pad_id).long()
    out = policy.generate(queries, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad_id,
        synced_gpus=False, **generation)  # no collective a token (the FSDP default): the policy is gathered  # fmt: skip
    return out[:, queries.shape[1] :]


# ---- PPO for language models, with the N+ implementation details -----------------------------------------------------
def forward(model, query_responses, pad_id: int, **kwargs):
    """A forward pass on left-padded sequences: padding masked out, position ids counted from the first real token."""
    attention_mask = query_responses != pad_id
    position_ids = attention_mask.cumsum(1) - attention_mask.long()
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


def response_logprobs(model, query_responses, responses, pad_id: int, temperature: float, non_tokens):
    """Log-probs of the response tokens, (batch, response_length), under the sampling distribution: temperature, and
    probability 0 for the non-tokens. The LM head runs on the response positions alone (logits_to_keep)."""
    logits = forward(model, query_responses, pad_id, logits_to_keep=responses.shape[1] + 1).logits[:, :-1]
    logits = logits.float() / (temperature + 1e-7)
    logits[..., non_tokens] = float("-inf")  # generate() suppresses them too (suppress_tokens)
    return torch.gather(logits.log_softmax(-1), 2, responses.unsqueeze(-1)).squeeze(-1)


def token_scores(model, query_responses, pad_id: int):
    """The scalar head of a sequence classifier at every position, (batch, seq_len), captured by a hook: the model's own
    forward (the one FSDP shards) returns the last token's score alone."""
    scores = []
    with model.score.register_forward_hook(lambda module, inputs, output: scores.append(output)):  # removed on exit
        forward(model, query_responses, pad_id)
    return scores[0].squeeze(-1).float()


def first_true_indices(bools):
    """Index of the first True of each row, or the row length when there is none (argmax returns the first maximum)."""
    return torch.where(bools.any(-1), bools.int().argmax(-1), bools.shape[-1])


def truncate_response(responses, eos_id: int, pad_id: int):
    """The EOS trick: keep each response up to and including its first EOS, pad the rest."""
    idxs = torch.arange(responses.shape[1], device=responses.device)
    return torch.masked_fill(responses, idxs > first_true_indices(responses == eos_id).unsqueeze(-1), pad_id)


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


def per_token_rewards(scores, logprobs, ref_logprobs, mask, sequence_lengths, kl_coef: float):
    """k1 KL penalty on every response token, plus the sequence score at the last real token (the EOS)."""
    kl = (logprobs - ref_logprobs) * mask
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(scores), device=scores.device), sequence_lengths] += scores
    return rewards, kl, non_score_reward


def masked_mean(values, mask):
    """Mean over the mask; 0, not NaN, when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values, mask):
    """Unbiased variance over the mask (Bessel's correction; N+ and the authors whiten with the biased one: README)."""
    n = mask.sum()
    return masked_mean((values - masked_mean(values, mask)) ** 2, mask) * n / (n - 1).clamp(min=1)


def whiten(values, mask, shift_mean: bool = True):
    whitened = (values - masked_mean(values, mask)) * torch.rsqrt(masked_var(values, mask) + 1e-8)
    return whitened if shift_mean else whitened + masked_mean(values, mask)


def compute_gae(rewards, values, gamma: float, lam: float):
    """Generalized advantage estimation, (batch, response_length); rewards and values after the EOS are 0, as is the
    value after the last token."""
    advantages, lastgaelam, length = torch.zeros_like(rewards), 0, rewards.shape[1]
    for t in reversed(range(length)):
        nextvalues = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        advantages[:, t] = lastgaelam = delta + gamma * lam * lastgaelam
    return advantages, advantages + values


PPO_STATS = ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "ratio")


def ppo_losses(new_logprobs, old_logprobs, advantages, vpred, old_values, returns, mask, cliprange, cliprange_value):
    """Clipped policy loss and clipped value loss, averaged over the masked tokens; their PPO_STATS as one tensor."""
    vpredclipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    vf_losses = torch.max((vpred - returns) ** 2, (vpredclipped - returns) ** 2)
    vf_loss = 0.5 * masked_mean(vf_losses, mask)
    logratio = (new_logprobs - old_logprobs) * mask
    ratio = torch.exp(logratio)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        pairs = ((pg_losses2, pg_losses), (vf_losses, (vpred - returns) ** 2))  # the clip bites where the first is larger
        clipfrac, vf_clipfrac = (masked_mean((clipped > plain).float(), mask) for clipped, plain in pairs)
        stats = [0.5 * masked_mean(logratio**2, mask), clipfrac, pg_loss, vf_loss, vf_clipfrac, masked_mean(ratio, mask)]
    return pg_loss, vf_loss, torch.stack(stats)


def adaptive_kl_coef(kl_coef: float, current_kl: float, n_episodes: int, target: float, horizon: int):
    """Ziegler et al.'s proportional controller: nudge kl_coef so the KL moves towards the target."""
    proportional_error = np.clip(current_kl / target - 1, -0.2, 0.2)
    return float(kl_coef * (1 + proportional_error * n_episodes / horizon))  # a float: checkpoints hold plain numbers


# ---- the training loop ------------------------------------------------------------------------------------------------
def train(args, run, log, tokenizer, queries, models, reward_fn, checkpoint):
    rank, world, device = run
    policy, ref_policy, value_model, reward_model = models
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    non_tokens = non_token_ids(tokenizer, policy.get_input_embeddings().num_embeddings, device)  # never sampled
    suppress = non_tokens.tolist()  # for generate(), which reads a device tensor back to the host one id at a time
    sampling = dict(temperature=args.temperature + 1e-7, top_k=0, top_p=1.0, do_sample=True, suppress_tokens=suppress)
    as_sampled = (pad_id, args.temperature, non_tokens)  # log-probs under the sampling distribution
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    reference = policy.disable_adapter if args.use_lora else contextlib.nullcontext  # LoRA: the policy, adapter off
    trained = torch.nn.ModuleDict({"policy": policy, "value": value_model})  # what the optimizer trains, checkpoints hold
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, eps=args.eps)
    kl_coef, start = args.kl_coef, 1
    if checkpoint:
        restore(trained, optimizer, checkpoint)
        kl_coef, start = checkpoint["kl_coef"], checkpoint["update"] + 1
        print(f"resumed from {args.resume_from} at update {start}")
    start_time = clock(device)
    for update in progress(start, args.num_updates, rank):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (update - 1.0) / args.num_updates) * args.lr
        # 1. The batch: the prompts of this update
        t0 = clock(device)
        batch_queries = [queries[i] for i in batch_indices(update, args.batch_size, len(queries), args.seed)]
        query_batch = left_pad(batch_queries, pad_id).to(device)  # (batch, context_length)
        context_length = query_batch.shape[1]
        mine = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)  # this process's share
        # 2. Rollout: the policy writes each response; the log-probs of the policy and the reference, the values
        responses, logprobs, ref_logprobs, values = [], [], [], []
        with torch.no_grad(), autocast, gathered(policy):  # FSDP: the policy gathered once for the whole rollout
            for i in range(mine.start, mine.stop, args.local_rollout_forward_batch_size):
                chunk = slice(i, i + args.local_rollout_forward_batch_size)
                # the seed of a chunk is its place in the batch: 2 processes roll out the episodes of 1 process
                torch.manual_seed(int(np.random.default_rng([args.seed, update, i]).integers(2**62)))
                response = generate_responses(policy, query_batch[chunk], args.response_length, pad_id, **sampling)
                query_response = torch.cat((query_batch[chunk], response), 1)
                logprobs.append(response_logprobs(policy, query_response, response, *as_sampled))
                with reference():
                    ref_logprobs.append(response_logprobs(ref_policy, query_response, response, *as_sampled))
                values.append(token_scores(value_model, query_response, pad_id)[:, context_length - 1 : -1])
                responses.append(response)
            t1 = clock(device)
            # 3. Score: the EOS trick, the reward model on the response cut after its EOS, the missing-EOS penalty. Then
            # every process gets the whole batch: every statistic below is the whole batch's.
            scored = score_responses(reward_model, reward_fn, tokenizer, batch_queries[mine], query_batch[mine],
                torch.cat(responses), args.missing_eos_penalty, args.local_rollout_forward_batch_size)  # fmt: skip
            responses, logprobs, ref_logprobs, values = (
                gather(torch.cat(x)) for x in (responses, logprobs, ref_logprobs, values)
            )
            postprocessed, raw_scores, scores = (gather(x) for x in scored)
            sequence_lengths = first_true_indices(postprocessed == pad_id) - 1  # index of the last real token (the EOS)
            t2 = clock(device)
            # 4. Rewards and advantages; everything after the EOS is masked out
            mask = (torch.arange(args.response_length, device=device) <= sequence_lengths.unsqueeze(1)).float()
            logprobs, ref_logprobs, values = logprobs * mask, ref_logprobs * mask, values * mask
            rewards, kl, non_score_reward = per_token_rewards(scores, logprobs, ref_logprobs, mask, sequence_lengths, kl_coef)
            if args.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False) * mask
            advantages, returns = compute_gae(rewards, values, args.gamma, args.gae_lambda)
            advantages = whiten(advantages, mask) * mask
        # 5. PPO: num_ppo_epochs passes over the batch; a minibatch is one optimizer step, accumulated from micro-batches
        stats, finite = [], torch.ones((), dtype=torch.bool, device=device)
        for ppo_epoch in range(args.num_ppo_epochs):
            order = np.random.default_rng([args.seed, update, ppo_epoch]).permutation(args.batch_size)
            order = torch.from_numpy(order).to(device)
            for mb_start in range(0, args.batch_size, args.minibatch_size):
                # each process takes a contiguous part of the minibatch: the same micro-batches as one process, shared out
                part = mb_start + rank * args.minibatch_size // world
                for micro, mi in enumerate(range(part, part + args.minibatch_size // world, args.local_micro_batch_size)):
                    idx = order[mi : mi + args.local_micro_batch_size]
                    mb_query_responses = torch.cat((query_batch[idx], responses[idx]), 1)
                    with autocast:
                        new_logprobs = response_logprobs(policy, mb_query_responses, responses[idx], *as_sampled)
                        vpred = token_scores(value_model, mb_query_responses, pad_id)[:, context_length - 1 : -1]
                    pg_loss, vf_loss, mb_stats = ppo_losses(new_logprobs, logprobs[idx], advantages[idx], vpred, values[idx],
                        returns[idx], mask[idx], args.cliprange, args.cliprange_value)  # fmt: skip
                    loss = pg_loss + args.vf_coef * vf_loss
                    finite &= torch.isfinite(loss)
                    sync_gradients((policy, value_model), args.fsdp, last=micro == args.gradient_accumulation_steps - 1)
                    (loss / args.gradient_accumulation_steps).backward()
                    stats.append(mb_stats)
                average_gradients(params, args.fsdp)  # distributed: the minibatch's mean gradient on every process
                if args.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
        t3 = clock(device)
        # every micro-batch's statistics, of every process (rank 0's first micro-batch is the first of all)
        stats = dict(zip(PPO_STATS, gather(torch.stack(stats).double()).T))
        if not (gather(finite.view(1)).all() & torch.isfinite(scores).all()):  # once an update, every process alike
            raise SystemExit(f"non-finite loss or score at update {update}: lower --lr, or check the models or --reward-fn")
        mean_kl = kl.sum(1).mean().item()
        if args.adaptive_kl:
            kl_coef = adaptive_kl_coef(kl_coef, mean_kl, args.batch_size, args.target_kl, args.kl_horizon)
        # 6. Evaluate (greedy, from the prompt alone), log, checkpoint
        evaluating = args.eval_every and update % args.eval_every == 0
        eval_score = evaluating and evaluate(args, device, models, reward_fn, tokenizer, queries, suppress, autocast)
        episodes, non_score = update * args.batch_size, non_score_reward.sum(1).mean().double()
        metrics = {
            "update": update, "episodes": episodes, "objective/kl": mean_kl,
            "objective/entropy": (-logprobs).sum(1).mean(),  # sampled-token estimate, over the policy's tokens
            "objective/scores": scores.mean(), "objective/raw_scores": raw_scores.mean(),
            "objective/non_score_reward": non_score, "objective/rlhf_reward": scores.mean().double() + non_score,
            "objective/kl_coef": kl_coef, "policy/approxkl": stats["approxkl"].mean(),
            "policy/clipfrac": stats["clipfrac"].mean(), "policy/first_approxkl": stats["approxkl"][0],
            "policy/first_ratio": stats["ratio"][0], "loss/policy": stats["pg_loss"].mean(),
            "loss/value": stats["vf_loss"].mean(), "val/clipfrac": stats["vf_clipfrac"].mean(),
            "val/ratio": stats["ratio"].mean(), "val/eos_fraction": (postprocessed == eos_id).any(-1).float().mean(),
            "val/response_length": (sequence_lengths + 1).float().mean(), "lr": optimizer.param_groups[0]["lr"],
            "episodes_per_s": (episodes - (start - 1) * args.batch_size) / (t3 - start_time),  # since the start or resume
            "episodes_per_s_update": args.batch_size / (t3 - t0), "time/rollout": t1 - t0, "time/scoring": t2 - t1,
            "time/update": t3 - t2, "peak_memory_gb": peak_memory_gb(device),
        }  # fmt: skip
        log_metrics(metrics | ({"eval/score": eval_score} if evaluating else {}), *log)
        if args.print_sample_every and update % args.print_sample_every == 0:
            print_samples(tokenizer, batch_queries, postprocessed, scores)
        if evaluating and args.early_stop_score is not None and eval_score >= args.early_stop_score:
            print(f"eval/score {eval_score:.4g} >= --early-stop-score {args.early_stop_score}: stopping at update {update}")
            break
        if args.save_every and update % args.save_every == 0 and update < args.num_updates:
            save_checkpoint(args, update, trained, optimizer, kl_coef=kl_coef)
    return policy


@torch.no_grad()
def evaluate(args, device, models, reward_fn, tokenizer, queries, suppress, autocast):
    """Mean score of greedy responses from the prompt alone to --eval-prompts training prompts spread over the data (HH's
    are its subsets in turn). Every process computes it (under FSDP all gather the policy); rank 0's decides the early stop."""
    prompts = queries[:: max(1, len(queries) // args.eval_prompts)][: args.eval_prompts]  # evenly spaced
    pad_id, (policy, _, _, reward_model) = tokenizer.pad_token_id, models
    with autocast, gathered(policy):
        batch = left_pad(prompts, pad_id).to(device)
        greedy = dict(do_sample=False, suppress_tokens=suppress)
        responses = generate_responses(policy, batch, args.response_length, pad_id, **greedy)
        scored = score_responses(reward_model, reward_fn, tokenizer, prompts, batch, responses, args.missing_eos_penalty,
                                 args.local_rollout_forward_batch_size)  # fmt: skip
    return on_rank0(lambda: scored[2].mean().item())


def print_samples(tokenizer, prompts_ids, postprocessed, scores, n: int = 4):
    """The first episodes of the batch: score, the prompt's end and the response."""
    print(f"{'score':>7} | query (end) | response")
    for i in range(min(n, len(prompts_ids))):
        query = tokenizer.decode(prompts_ids[i][-40:]).replace("\n", "\\n")
        print(f"{scores[i].item():7.3f} | ...{query} | {tokenizer.decode(postprocessed[i], skip_special_tokens=True)!r}")


def main():
    args = tyro.cli(Args)
    check_flags(args)
    run = rank, world, device = init_distributed(args)  # (0, 1, cuda or cpu) in one process
    args, checkpoint = resume(args, "tldr") if args.resume_from else (args, None)  # the flags from the run's checkpoint
    args.value_model_path = args.value_model_path or args.reward_model_path
    args.num_updates = args.total_episodes // args.batch_size
    args.minibatch_size = args.batch_size // args.num_mini_batches
    args.gradient_accumulation_steps = args.minibatch_size // (args.local_micro_batch_size * world)  # per process
    check_flags(args, world)
    if args.num_updates == 0:
        raise SystemExit("--total-episodes is smaller than --batch-size: no update would run")
    reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None  # a rule-based reward replaces the model
    log = start_run(args, "tldr", checkpoint["update"] + 1 if checkpoint else 1)
    check_hub([args.sft_model_path, args.value_model_path, args.dataset_name, None if reward_fn else args.reward_model_path])
    tokenizer = load_tokenizer(args.sft_model_path)
    queries = build_queries(args, tokenizer)
    torch.manual_seed(args.seed)  # a new value head's init
    models = load_models(args, tokenizer, device)
    policy = train(args, run, log, tokenizer, queries, models, reward_fn, checkpoint)
    policy.generation_config.eos_token_id = tokenizer.eos_token_id  # the EOS trick was for training only
    save_model(args, policy.merge_and_unload() if args.use_lora else policy, tokenizer)


# ======================================================================================================================
# Appendix: the machinery. Data; models; flag checks; torchrun and FSDP; checkpoints and resume; the run and its log.
# ======================================================================================================================
TLDR_FORMAT = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
SCHEMA = {"subreddit": str, "title": str, "post": str}


def build_queries(args: Args, tokenizer):
    """Prompt token ids for the rollouts; unusable rows are skipped and counted."""
    name, split, schema = args.dataset_name, args.train_split, SCHEMA
    ds = load_rows(name, split, schema, args.dataset_config)
    queries, counts = [], dict.fromkeys("rows query_truncated dropped_query_too_long".split(), 0) | {"rows": len(ds)}
    for i, row in enumerate(ds):
        check_row(row, i, schema, f"{name} ({split})")
        query = tldr_query(tokenizer, row, args.query_length)
        if query is None:
            counts["dropped_query_too_long"] += 1
            continue
        counts["query_truncated"] += query[1]
        queries.append(query[0])
    print(f"{name} ({split}): {len(queries)} prompts kept; {counts}")
    if not queries:
        raise SystemExit(f"no usable prompt in {name} ({split}); see the counts above")
    return queries


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
    """(policy, reference, value model, reward model): the trained ones sharded (FSDP) before they leave the CPU."""
    auto, on = ("bfloat16", "on") if device.type == "cuda" else ("float32", "off")  # bf16 is slow on a CPU
    frozen = auto if args.frozen_dtype == "auto" else args.frozen_dtype  # resolved here: the run's flags keep `auto`
    print(f"dtypes: trained weights {args.dtype}, frozen models {frozen}, bf16 autocast {on} ({device})")
    lm, rm, trained = AutoModelForCausalLM, AutoModelForSequenceClassification, args.dtype
    policy = from_pretrained(lm, args.sft_model_path, tokenizer, dtype=getattr(torch, trained))
    policy.generation_config = GenerationConfig()  # the EOS trick (no EOS stops a sample), none of the checkpoint's settings
    value_model = from_pretrained(rm, args.value_model_path, tokenizer, num_labels=1, dtype=getattr(torch, trained))
    reward_model = None
    if not args.reward_fn:
        reward_model = from_pretrained(rm, args.reward_model_path, tokenizer, num_labels=1, dtype=getattr(torch, frozen))
    ref_policy = None if args.use_lora else from_pretrained(lm, args.sft_model_path, tokenizer, dtype=getattr(torch, frozen))
    if args.use_lora:
        from peft import LoraConfig, get_peft_model, inject_adapter_in_model  # only imported when asked for

        targets = args.lora_target_modules if args.lora_target_modules == "all-linear" else args.lora_target_modules.split(",")
        lora = dict(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets)
        policy = get_peft_model(policy, LoraConfig(**lora))  # it writes the policy's module names into the config
        if args.lora_value:  # adapters in place: the value model stays a sequence classifier that token_scores reads
            value_model = inject_adapter_in_model(LoraConfig(**lora, exclude_modules=["score"]), value_model)
            for name, param in value_model.named_parameters():  # the adapters alone train, in fp32 as peft makes the policy's
                param.requires_grad = "lora_" in name
                param.data = param.data.float() if param.requires_grad else param.data  # in bf16 small steps are lost
        policy.print_trainable_parameters()
    for model, adapters in ((policy, args.use_lora), (value_model, args.use_lora and args.lora_value)):
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            if adapters:
                model.enable_input_require_grads()
        place(model, device, args.fsdp).train()  # FSDP: each process keeps 1/processes of the weights and AdamW state
    for model in filter(None, (reward_model, ref_policy)):
        model.to(device).eval().requires_grad_(False)
    return policy, ref_policy or policy, value_model, reward_model


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
    "total_episodes local_rollout_forward_batch_size num_mini_batches num_ppo_epochs max_grad_norm target_kl kl_horizon "
    "cliprange cliprange_value lora_r eval_prompts",
    ">= 0": "save_every print_sample_every kl_coef vf_coef eval_every",
    "in [0, 1]": "gamma gae_lambda",
}
RESUMABLE = "resume_from total_episodes save_every keep_checkpoints print_sample_every output_dir fsdp"  # may change on resume
COMPUTED = "num_updates minibatch_size gradient_accumulation_steps"  # filled in by main()
CHECKS = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1}


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
