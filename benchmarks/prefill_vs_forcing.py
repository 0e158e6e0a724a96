"""Reset by prefill (drpo_tldr.py) against a teacher-forced reset done the authors' way: generate from the prompt
and force the prefix through a logits processor, one decode step per forced token. Side by side in one run, on the
same batch of reset episodes: real TL;DR comparisons (../shared/data) and a tiny SFT model with the Pythia vocabulary
(BENCHMARKS.md's figure), or any SFT folder. This re-implementation lives here only, never in the scripts.
  python tiny_world.py --out tiny_pythia --tokenizer ../shared/tokenizers/pythia    # then demo.sh's SFT command on it
  python benchmarks/prefill_vs_forcing.py tiny_pythia/sft                            # default: tiny/sft (BPE world)"""

import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import drpo_tldr  # noqa: E402

R, BATCH, CHUNK, REPEATS = 53, 64, 16, 3
SFT = sys.argv[1] if len(sys.argv) > 1 else f"{ROOT}/tiny/sft"
tokenizer = AutoTokenizer.from_pretrained(SFT)
model = AutoModelForCausalLM.from_pretrained(SFT).eval()
model.generation_config.eos_token_id = None  # the EOS trick, as in the scripts
pad = tokenizer.pad_token_id
rows = [json.loads(line) for line in open(f"{ROOT}/../shared/data/tldr/comparisons_gpt4_dev.jsonl")][:BATCH]
queries = [drpo_tldr.tldr_query(tokenizer, r["info"], 512)[0] for r in rows]
reset_responses = [drpo_tldr.response_ids(tokenizer, r["summaries"][r["choice"]]["text"]) for r in rows]
states, h, _ = drpo_tldr.reset_states(queries, reset_responses, 1.0, 1, R, torch.Generator().manual_seed(0))
sampling = dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, pad_token_id=pad, suppress_tokens=[pad])  # as the scripts


class ForcePrefix(LogitsProcessor):
    """The authors' way: while row i is within its prefix, every score but the prefix token is -inf."""

    def __init__(self, prefixes, start):
        self.forced = torch.full((len(prefixes), R), -1)
        for i, p in enumerate(prefixes):
            self.forced[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        self.start = start

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.start
        if t < R:
            col = self.forced[:, t]
            rows = col >= 0
            scores[rows] = float("-inf")
            scores[rows, col[rows]] = 0.0
        return scores


def ours():  # as drpo_tldr.py: chunks in order of h, each left-padded to its own width
    order = torch.argsort(h, stable=True)
    for i in range(0, BATCH, CHUNK):
        idx = order[i : i + CHUNK].tolist()
        state = drpo_tldr.left_pad([states[j] for j in idx], pad)
        n = R - int(h[idx].min())
        model.generate(input_ids=state, attention_mask=(state != pad).long(), max_new_tokens=n, min_new_tokens=n, **sampling)


def forced():
    batch = drpo_tldr.left_pad(queries, pad)
    for i in range(0, BATCH, CHUNK):
        q = batch[i : i + CHUNK]
        processor = ForcePrefix([reset_responses[j][: int(h[j])] for j in range(i, i + CHUNK)], q.shape[1])
        model.generate(
            input_ids=q,
            attention_mask=(q != pad).long(),
            max_new_tokens=R,
            min_new_tokens=R,
            logits_processor=LogitsProcessorList([processor]),
            **sampling,
        )


with torch.no_grad():
    ours(), forced()  # warm-up
    times = {"prefill (ours)": [], "teacher forcing (authors')": []}
    for _ in range(REPEATS):
        for name, fn in (("prefill (ours)", ours), ("teacher forcing (authors')", forced)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
t_ours, t_forced = (min(v) for v in times.values())
print(
    f"{BATCH} reset episodes (p=1, mean h {h.float().mean():.1f} of length {sum(map(len, reset_responses)) / BATCH:.1f}), "
    f"response_length {R}, chunks of {CHUNK}, torch {torch.__version__}, {torch.get_num_threads()} threads"
)
print(
    f"prefill: {t_ours:.2f} s; teacher forcing: {t_forced:.2f} s; prefill is {t_forced / t_ours:.2f}x faster (best of "
    f"{REPEATS})"
)
