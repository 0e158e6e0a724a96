"""Summarises the speed of any RL run (ppo_baseline.py, drpo_tldr.py, drpo_hh.py) from its metrics.jsonl: episodes/s
and the share of time in rollout, scoring and update, averaged over the updates after the first (warm-up).
Usage: python benchmarks/summarize_speed.py runs/*/metrics.jsonl"""

import json
import sys

for path in sys.argv[1:]:
    rows = [json.loads(line) for line in open(path)][1:]
    parts = {k: sum(r[f"time/{k}"] for r in rows) for k in ("rollout", "scoring", "update")}
    total = sum(parts.values())
    print(
        f"{path}: {len(rows)} updates, episodes/s {rows[-1]['episodes_per_s']:.2f}, "
        + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in parts.items())
        + f", peak memory {rows[-1]['peak_memory_gb']:.2f} GB"
    )
