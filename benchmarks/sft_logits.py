"""SFT step time: transformers' full-sequence loss against sft.py's response-only LM head, side by side in one run.
Tiny GPT-NeoX (hidden 64, 2 layers) with the real Pythia vocabulary, on real TL;DR posts from ../shared/data.
Run: python benchmarks/sft_logits.py"""

import json
import os
import sys
import time

import torch
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sft  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared")
tokenizer = AutoTokenizer.from_pretrained(f"{SHARED}/tokenizers/pythia")
tokenizer.eos_token, tokenizer.pad_token = "<|endoftext|>", "<|padding|>"
rows = [json.loads(line) for line in open(f"{SHARED}/data/tldr/sft_posts_dev.jsonl")][:64]
examples = [(sft.tldr_query(tokenizer, r, 512)[0], sft.response_ids(tokenizer, r["summary"])[:53]) for r in rows]
torch.manual_seed(0)
model = GPTNeoXForCausalLM(
    GPTNeoXConfig(
        vocab_size=50304, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, pad_token_id=1
    )
)
batch_size, steps = 8, 4


def step(loss_fn):
    start = time.perf_counter()
    for i in range(steps):
        input_ids, attention_mask, labels = sft.collate(examples[i * batch_size : (i + 1) * batch_size], 1, "cpu")
        loss_fn(input_ids, attention_mask, labels).backward()
    return (time.perf_counter() - start) / steps


full = lambda ids, mask, labels: model(input_ids=ids, attention_mask=mask, labels=labels).loss  # noqa: E731
ours = lambda ids, mask, labels: sft.response_loss(model, ids, mask, labels)  # noqa: E731
step(ours), step(full)  # warm-up
t_full, t_ours = step(full), step(ours)
print(
    f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch_size}, mean query "
    f"{sum(len(q) for q, _ in examples) / len(examples):.0f} tokens"
)
print(f"full-sequence logits: {t_full:.3f} s/step; response-only logits: {t_ours:.3f} s/step; speed-up {t_full / t_ours:.1f}x")
