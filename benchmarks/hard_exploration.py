"""The hard-exploration experiment: gold reward against episodes for PPO (reset_prob 0), DR-PO (0.5) and
reset_prob 1 with h_min 1 and 0, on the tiny world's password task, 3 seeds each, 300 updates of 64 episodes.
Success is measured from the prompt alone (greedy, no reset) every 10 updates. Two runs at a time, one thread
each. Writes docs/hard_exploration.png (needs matplotlib, a benchmark-only dependency) and prints a table.
Run: python benchmarks/hard_exploration.py
More seeds or fewer arms: SEEDS=1,2,3,4,5,6 ARMS="DR-PO" python benchmarks/hard_exploration.py (ARMS: a substring of
the arm names; the plot is written only when every arm runs). UPDATES=500 sets the number of updates. PLOT_ONLY=1 reads
the runs already in $OUT (default /tmp/hard_exploration) and redraws the table and the plot without running."""

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT", "/tmp/hard_exploration")
ARMS = {
    "PPO (reset_prob 0)": ["--reset-prob", "0"],
    "DR-PO reset_prob 0.5": ["--reset-prob", "0.5"],
    "reset_prob 1, h_min 1": ["--reset-prob", "1"],
    "reset_prob 1, h_min 0": ["--reset-prob", "1", "--reset-min-prefix", "0"],
}
ARMS = {k: v for k, v in ARMS.items() if os.environ.get("ARMS", "") in k}
SEEDS = [int(s) for s in os.environ.get("SEEDS", "1,2,3").split(",")]
UPDATES = int(os.environ.get("UPDATES", 300))


def newest(pattern):
    """The newest run's file of a glob over runs/{task}__{exp}__{seed}__{time}/: by its time, a number (a rerun into the
    same folder leaves the older runs there)."""
    return max(glob.glob(pattern), key=lambda f: int(f.rsplit("__", 1)[1].split("/")[0]))


def sh(*cmd, **kw):
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


PLOT_ONLY = os.environ.get("PLOT_ONLY") == "1"
os.makedirs(OUT, exist_ok=True)
if not PLOT_ONLY:
    sh(sys.executable, f"{ROOT}/tiny_world.py", "--out", f"{OUT}/world", "--tokenizer", "bpe")
pw = f"{OUT}/world/password"
if not PLOT_ONLY:
    sh(
        sys.executable,
        f"{ROOT}/sft.py",
        "--base-model",
        f"{pw}/base",
        "--dataset-name",
        f"{pw}/tldr_sft",
        "--eval-split",
        "train[:5%]",
        "--output-dir",
        f"{pw}/sft",
        "--lr",
        "1e-3",
        "--num-train-epochs",
        "3",
        "--batch-size",
        "32",
        "--local-micro-batch-size",
        "32",
        "--response-length",
        "8",
        cwd=OUT,
    )
common = [
    "--sft-model-path",
    f"{pw}/sft",
    "--value-model-path",
    f"{pw}/sft",
    "--dataset-name",
    f"{pw}/tldr_comparisons",
    "--reward-fn",
    f"{ROOT}/tiny_world.py:password_reward",
    "--response-length",
    "8",
    "--batch-size",
    "64",
    "--local-rollout-forward-batch-size",
    "64",
    "--local-micro-batch-size",
    "32",
    "--num-mini-batches",
    "2",
    "--lr",
    "1e-3",
    "--kl-coef",
    "0.01",
    "--temperature",
    "1",
    "--reset-source",
    "chosen",
    "--max-grad-norm",
    "1",
    "--no-whiten-rewards",
    "--total-episodes",
    str(UPDATES * 64),
    "--eval-every",
    "10",
    "--eval-prompts",
    "1",
    "--print-sample-every",
    "0",
    "--save-every",
    "0",
]
jobs = [] if PLOT_ONLY else [(arm, seed) for arm in ARMS for seed in SEEDS]
for i in range(0, len(jobs), 2):
    procs = []
    for arm, seed in jobs[i : i + 2]:
        name = f"{arm.split()[0]}_{ARMS[arm][1]}_{ARMS[arm][-1]}_{seed}".replace(" ", "")
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    f"{ROOT}/drpo_tldr.py",
                    *ARMS[arm],
                    *common,
                    "--seed",
                    str(seed),
                    "--exp-name",
                    name,
                    "--output-dir",
                    f"{OUT}/model_{name}",
                ],
                cwd=OUT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        )
    for p in procs:
        p.wait()

curves = {}
for arm in ARMS:
    for seed in SEEDS:
        name = f"{arm.split()[0]}_{ARMS[arm][1]}_{ARMS[arm][-1]}_{seed}".replace(" ", "")
        rows = [json.loads(x) for x in open(newest(f"{OUT}/runs/*__{name}__*/metrics.jsonl"))]
        curves[arm, seed] = [(r["episodes"], r["eval/score"]) for r in rows if "eval/score" in r]
print("| setting | seeds solved (greedy success from the prompt >= 0.9 at the end) | first update at >= 0.9, per seed |")
print("|---|---|---|")
for arm in ARMS:
    firsts = [next((e // 64 for e, s in curves[arm, seed] if s >= 0.9), None) for seed in SEEDS]
    solved = sum(curves[arm, seed][-1][1] >= 0.9 for seed in SEEDS)
    print(f"| {arm} | {solved}/{len(SEEDS)} | {', '.join('never' if f is None else str(f) for f in firsts)} |")
if len(ARMS) < 4:
    sys.exit("not every arm ran: no plot")
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit("matplotlib is not installed: no plot (pip install matplotlib)")
fig, ax = plt.subplots(figsize=(7, 4))
for color, arm in zip(["tab:gray", "tab:blue", "tab:red", "tab:green"], ARMS):
    for k, seed in enumerate(SEEDS):
        e, s = zip(*curves[arm, seed])
        ax.plot(e, [v + 0.015 * (k - 1) for v in s], color=color, alpha=0.8, label=arm if k == 0 else None)
ax.set_xlabel("episodes")
ax.set_ylabel("gold reward from the prompt (greedy)")
ax.set_title(f"Hard exploration: a 6-word password (p ~ e^-17 under SFT), {len(SEEDS)} seeds")
ax.legend(loc="center right")
os.makedirs(f"{ROOT}/docs", exist_ok=True)
fig.tight_layout()
fig.savefig(f"{ROOT}/docs/hard_exploration.png", dpi=120)
print(f"wrote {ROOT}/docs/hard_exploration.png")
