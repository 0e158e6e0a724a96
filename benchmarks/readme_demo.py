"""The README's demo results, from the files a fresh `bash demo.sh` writes: the two tables of benchmarks/demo_report.py
(tiny/report.txt, tiny/bland/report.txt) and the reward-model judge's win rates (tiny/eval_rm/summary.json).
  python benchmarks/readme_demo.py            # compare: exit 1 and show each difference when the README is stale
  python benchmarks/readme_demo.py --write    # put the fresh numbers into README.md"""

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "policy      RM score  gold win rate vs reference  KL to SFT  greedy gold"


def table(path):
    lines = open(path).read().splitlines()
    start = lines.index(HEADER)  # the table follows the header, one row per policy, until a blank line or the end
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith("["):
            break
        rows.append(line)
    return "\n".join([HEADER, *rows])


def judge_sentence(path, world):
    models = json.load(open(path))["models"]
    s = {name: models[f"{world}/{name}"] for name in ("sft", "ppo", "drpo", "rebel", "online_dpo", "dpo")}
    lo, hi = s["sft"]["ci95"]
    return (
        f"With the reward-model judge the win rates are SFT {s['sft']['win_rate']:.3f} [{lo:.3f}, {hi:.3f}], "
        f"PPO {s['ppo']['win_rate']:.3f}, DR-PO {s['drpo']['win_rate']:.3f},\nREBEL {s['rebel']['win_rate']:.3f}, "
        f"online DPO {s['online_dpo']['win_rate']:.3f}, "
        f"DPO {s['dpo']['win_rate']:.3f}:"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", default="tiny")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    readme_path = f"{ROOT}/README.md"
    readme = open(readme_path).read()
    blocks = re.findall(rf"```\n({re.escape(HEADER)}\n.*?)\n```", readme, re.S)
    sentence = re.search(r"With the reward-model judge the win rates are .*?DPO [\d.]+:", readme, re.S)
    assert len(blocks) == 2 and sentence, "README.md: the demo's two tables and the reward-model judge sentence not found"
    fresh = [
        table(f"{args.world}/report.txt"),
        table(f"{args.world}/bland/report.txt"),
        judge_sentence(f"{args.world}/eval_rm/summary.json", args.world),
    ]
    stale = [(old, new) for old, new in zip([*blocks, sentence.group(0)], fresh) if old != new]
    if args.write:
        for old, new in stale:
            readme = readme.replace(old, new, 1)
        open(readme_path, "w").write(readme)
        print(f"README.md: {len(stale)} of 3 demo results updated")
        return
    for old, new in stale:
        print(f"README.md has:\n{old}\na fresh demo gives:\n{new}\n")
    print(
        "README.md's demo results match the fresh demo"
        if not stale
        else f"{len(stale)} of 3 demo results are stale: python benchmarks/readme_demo.py --write"
    )
    sys.exit(1 if stale else 0)


if __name__ == "__main__":
    main()
