"""The demo's results table: each policy against the SFT policy on the tiny world's held-out prompts.
Usage: python benchmarks/demo_report.py --world tiny --policies sft=tiny/sft ppo=tiny/ppo
Columns: mean reward-model score of sampled responses ("-" when the world has no rm/); gold win rate against the
SFT reference summary (the tiny world's rule, ties count half); KL(policy || SFT) per response, estimated on the
samples; the mean gold score of greedy answers."""

import argparse
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as transformers_logging

transformers_logging.disable_progress_bar()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tiny_world  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--world", default="tiny")
parser.add_argument("--policies", nargs="+", default=["sft=tiny/sft"])
parser.add_argument("--n", type=int, default=200)
parser.add_argument("--response-length", type=int, default=8)
parser.add_argument("--temperature", type=float, default=0.7)
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(f"{args.world}/sft", padding_side="left")
pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
rows = [json.loads(line) for line in open(f"{args.world}/tldr_sft/validation.jsonl")][: args.n]
prompts = [f"SUBREDDIT: r/{r['subreddit']}\n\nTITLE: {r['title']}\n\nPOST: {r['post']}\n\nTL;DR:" for r in rows]
references = [" " + r["summary"] for r in rows]
batch = tokenizer(prompts, return_tensors="pt", padding=True)
width = batch.input_ids.shape[1]
reward_model = (
    AutoModelForSequenceClassification.from_pretrained(f"{args.world}/rm").eval()
    if os.path.isdir(f"{args.world}/rm")
    else None
)
sft = AutoModelForCausalLM.from_pretrained(f"{args.world}/sft").eval()


def logprob_sum(model, sequences):
    mask = sequences != pad
    logits = model(
        input_ids=sequences.masked_fill(~mask, 0), attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
    ).logits
    logp = (
        (logits[:, width - 1 : -1] / args.temperature)
        .log_softmax(-1)
        .gather(2, sequences[:, width:].unsqueeze(-1))
        .squeeze(-1)
    )
    return (logp * mask[:, width:]).sum(1)


print(f"{'policy':<10} {'RM score':>9} {'gold win rate vs reference':>27} {'KL to SFT':>10} {'greedy gold':>12}")
for spec in args.policies:
    name, path = spec.split("=")
    policy = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.generate(
            **batch,
            max_new_tokens=args.response_length,
            do_sample=True,
            temperature=args.temperature,
            top_k=0,
            pad_token_id=pad,
            eos_token_id=eos,
            suppress_tokens=[pad],
        )  # the pad token is never written
        out = torch.cat([out, torch.full((len(out), width + args.response_length - out.shape[1]), pad)], 1)
        responses = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        mask = out != pad
        score = "-"
        if reward_model is not None:
            scores = reward_model.score(
                reward_model.base_model(
                    input_ids=out.masked_fill(~mask, 0), attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)
                ).last_hidden_state
            )[:, :, 0]
            score = f"{scores.gather(1, (torch.arange(out.shape[1]) * mask).argmax(1, keepdim=True))[:, 0].mean().item():.3f}"
        kl = (logprob_sum(policy, out) - logprob_sum(sft, out)).mean().item()
        greedy = policy.generate(
            **batch,
            max_new_tokens=args.response_length,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
            suppress_tokens=[pad],
        )
    greedy_gold = sum(
        tiny_world.gold_reward(prompts, tokenizer.batch_decode(greedy[:, width:], skip_special_tokens=True))
    ) / len(prompts)
    gold = tiny_world.gold_reward(prompts, responses)
    gold_ref = tiny_world.gold_reward(prompts, references)
    win = sum((g > r) + 0.5 * (g == r) for g, r in zip(gold, gold_ref)) / len(gold)
    print(f"{name:<10} {score:>9} {win:>27.3f} {kl:>10.3f} {greedy_gold:>12.3f}")
