# Training curves from the metrics.jsonl of one or more runs, as README.md's metric tables describe them.
#   python plot_runs.py runs/tldr__drpo__1__1700000000 runs/tldr__ppo__1__1700000000 --out curves.png
# RL runs (ppo_baseline.py, drpo_*.py): reward-model score (DR-PO: reset and non-reset episodes apart), KL to the reference,
# the RLHF reward, the greedy eval score; SFT, reward model, DPO: their losses and accuracies. Needs matplotlib.
import argparse
import json
import os

# (panel title, metrics drawn in it); a panel appears when some run logged one of its metrics
PANELS = [
    ("reward-model score", ["objective/scores", "reset/scores", "no_reset/scores"]),
    ("KL to the reference (nats per response)", ["objective/kl", "reset/kl", "no_reset/kl"]),
    ("RLHF reward (score - KL penalty)", ["objective/rlhf_reward"]),
    ("greedy eval score, from the prompt", ["eval/score"]),
    ("loss", ["loss", "eval_loss"]),
    ("accuracy", ["accuracy", "eval_accuracy", "rewards/accuracies", "eval/rewards/accuracies"]),
    ("DPO implicit reward margin", ["rewards/margins", "eval/rewards/margins"]),
]
STYLES = ["-", "--", ":", "-."]


def read_log(run: str):
    path = run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file (give a run folder runs/{{run_name}} or its metrics.jsonl)")
    rows = []
    for i, line in enumerate(open(path)):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run can be cut
            print(f"{path} line {i + 1}: not json, skipped")
    return rows


def main():
    parser = argparse.ArgumentParser(description="training curves from metrics.jsonl")
    parser.add_argument("runs", nargs="+", help="run folders (runs/{run_name}) or metrics.jsonl files")
    parser.add_argument("--out", default="curves.png", help="the image to write")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot_runs.py needs matplotlib: pip install matplotlib") from None
    logs = {os.path.basename(r.rstrip("/")).removesuffix(".jsonl"): read_log(r) for r in args.runs}
    panels = [(title, keys) for title, keys in PANELS if any(k in row for rows in logs.values() for row in rows for k in keys)]
    if not panels:
        raise SystemExit("none of the plotted metrics is in these logs")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for colour, (name, rows) in enumerate(logs.items()):
            x_key = "episodes" if rows and "episodes" in rows[0] else "update"
            for style, key in zip(STYLES, keys):
                points = [(row[x_key], row[key]) for row in rows if key in row]
                if points:
                    ax.plot(*zip(*points), style, color=f"C{colour}", label=f"{name}: {key}")
            ax.set_xlabel(x_key)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}: {', '.join(title for title, _ in panels)}")


if __name__ == "__main__":
    main()
