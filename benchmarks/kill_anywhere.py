"""Kill anywhere, lose at most one checkpoint interval: the long variant of the test suite's fault injection.

For each of the nine training scripts, on the tiny world: a straight run, then the same run SIGKILLed KILLS times and
resumed with `--resume-from auto` after each kill (tests/conftest.py, kill_and_resume: every other kill lands while a
checkpoint is being written, held open between the written file and its rename by tests/slow_save.py; the others at a
random moment 1-3 updates past the checkpoint the process resumed from). The harness asserts after each kill that the newest
complete checkpoint is still there. A run has recovered when it then finishes and its final model and log equal the
straight run's bit for bit (times aside). Prints the Markdown table of BENCHMARKS.md and keeps it in $OUT/report.json.
Run: python benchmarks/kill_anywhere.py        (KILLS=6, SEED=0, OUT=/tmp/kill_anywhere; about 20 minutes on 2 cores)
     SCRIPTS=rebel.py,online_dpo.py python benchmarks/kill_anywhere.py   those alone, added to $OUT/report.json
     REPORT_ONLY=1 python benchmarks/kill_anywhere.py   prints the table from $OUT/report.json."""

import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
OUT = os.environ.get("OUT", "/tmp/kill_anywhere")
KILLS, SEED = int(os.environ.get("KILLS", 6)), int(os.environ.get("SEED", 0))
UPDATES, SAVE_EVERY = 12, 2
SCRIPTS = ["sft.py", "reward_model.py", "dpo_baseline.py", "ppo_baseline.py", "drpo_tldr.py", "drpo_hh.py"]
SCRIPTS += ["rebel.py", "online_dpo.py", "hypo.py"]  # SCRIPTS=rebel.py,hypo.py runs those alone
RL = [
    "--response-length",
    8,
    "--batch-size",
    32,
    "--local-rollout-forward-batch-size",
    32,
    "--local-micro-batch-size",
    16,
    "--num-mini-batches",
    2,
    "--lr",
    3e-4,
    "--kl-coef",
    0.01,
    "--print-sample-every",
    0,
    "--max-grad-norm",
    1.0,
    "--no-whiten-rewards",
    "--total-episodes",
    32 * UPDATES,
]
OFFLINE = [
    "--lr",
    1e-3,
    "--batch-size",
    32,
    "--local-micro-batch-size",
    16,
    "--max-train-samples",
    32 * UPDATES,
    "--max-eval-samples",
    32,
    "--eval-every",
    3,
]


def flags(script, w):
    if script == "sft.py":
        return ["--base-model", f"{w}/base", "--dataset-name", f"{w}/tldr_sft", *OFFLINE]
    if script == "reward_model.py":
        return [
            "--sft-model-path",
            f"{w}/sft",
            "--dataset-name",
            f"{w}/tldr_comparisons",
            "--norm-dataset-name",
            f"{w}/tldr_sft",
            "--max-norm-samples",
            64,
            *OFFLINE,
        ]
    if script == "dpo_baseline.py":
        return ["--sft-model-path", f"{w}/sft", "--dataset-name", f"{w}/tldr_comparisons", "--beta", 0.1, *OFFLINE]
    rl = ["--sft-model-path", f"{w}/sft", "--reward-model-path", f"{w}/rm", *RL]
    if script == "ppo_baseline.py":
        return [*rl, "--dataset-name", f"{w}/tldr_sft"]
    if script == "drpo_tldr.py":
        return [*rl, "--dataset-name", f"{w}/tldr_comparisons", "--reset-source", "chosen"]
    if script == "drpo_hh.py":  # HH only
        return [*rl, "--dataset-name", f"{w}/hh"]
    reset = ["--dataset-name", f"{w}/tldr_comparisons", "--reset-source", "chosen", "--reset-prob", 0.5]
    if script == "rebel.py":  # 16 pairs an update: 32 generations, as the others' 32 episodes
        return [*rl, *reset, "--batch-size", 16, "--local-rollout-forward-batch-size", 16, "--local-micro-batch-size", 8]
    if script == "online_dpo.py":  # 16 prompts, 2 responses each: 32 generations an update, in 2 steps of 8 pairs
        online = ["--prompts-per-iteration", 16, "--batch-size", 8, "--local-rollout-forward-batch-size", 8]
        online += ["--local-micro-batch-size", 4, "--lr", 3e-4, "--print-sample-every", 0, "--total-episodes", 32 * UPDATES]
        return [*rl[:4], *reset, "--response-length", 8, *online]
    return [*flags("dpo_baseline.py", w), "--kl-weight", 0.5, "--response-length", 8]  # hypo.py: DPO's, plus the online KL


def same_run(script, a, b):
    """The final models and the logs (times aside) of two run folders are equal, bit for bit."""
    import torch
    from conftest import newest_run, untimed
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if script == "reward_model.py" else AutoModelForCausalLM
    ma, mb = (cls.from_pretrained(f"{d}/out").state_dict() for d in (a, b))
    la, lb = ([json.loads(x) for x in open(f"{newest_run(d)}/metrics.jsonl")] for d in (a, b))
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma) and untimed(la) == untimed(lb)


def main():
    from conftest import kill_and_resume

    w, py = f"{OUT}/world", sys.executable
    if not os.path.exists(f"{w}/rm"):
        for cmd in (
            ["tiny_world.py", "--out", w, "--tokenizer", "bpe", "--n-train", 2000, "--n-eval", 200],
            [
                "sft.py",
                "--base-model",
                f"{w}/base",
                "--dataset-name",
                f"{w}/tldr_sft",
                "--output-dir",
                f"{w}/sft",
                "--lr",
                1e-3,
                "--num-train-epochs",
                6,
                "--batch-size",
                32,
                "--local-micro-batch-size",
                32,
                "--eval-every",
                100,
            ],
            [
                "reward_model.py",
                "--sft-model-path",
                f"{w}/sft",
                "--dataset-name",
                f"{w}/tldr_comparisons",
                "--norm-dataset-name",
                f"{w}/tldr_sft",
                "--output-dir",
                f"{w}/rm",
                "--lr",
                1e-3,
                "--num-train-epochs",
                2,
                "--batch-size",
                32,
                "--local-micro-batch-size",
                32,
                "--eval-every",
                50,
            ],
        ):
            subprocess.run([py, f"{ROOT}/{cmd[0]}", *map(str, cmd[1:])], check=True, cwd=OUT, stdout=subprocess.DEVNULL)
    report = json.load(open(f"{OUT}/report.json")) if os.path.exists(f"{OUT}/report.json") else []  # a run cut short goes on
    for i, script in enumerate(SCRIPTS):
        if any(r["script"] == script for r in report) or script not in os.environ.get("SCRIPTS", script).split(","):
            continue
        d, f = (
            f"{OUT}/{script[:-3]}",
            [*flags(script, w), "--save-every", SAVE_EVERY, "--keep-checkpoints", 1, "--output-dir", "out"],
        )
        for sub in ("straight", "killed"):
            shutil.rmtree(f"{d}/{sub}", ignore_errors=True)
            os.makedirs(f"{d}/{sub}")
        start = time.time()
        subprocess.run(
            [py, f"{ROOT}/{script}", *map(str, f)],
            check=True,
            cwd=f"{d}/straight",
            stdout=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            kills, error = (
                kill_and_resume(script, f, f"{d}/killed", seed=SEED + i, updates=UPDATES, save_every=SAVE_EVERY, kills=KILLS),
                None,
            )
            recovered = same_run(script, f"{d}/straight", f"{d}/killed")
        except AssertionError as e:  # the harness found a kill that left no usable checkpoint, or a run that did not finish
            kills, error, recovered = [], str(e)[-500:], False
        report.append(
            {
                "script": script,
                "updates": UPDATES,
                "save_every": SAVE_EVERY,
                "kills": kills,
                "recovered": recovered,
                "error": error,
                "seconds": round(time.time() - start),
            }
        )
        print(report[-1], flush=True)
        with open(f"{OUT}/report.json", "w") as fh:
            json.dump(report, fh, indent=1)


def table():
    report = json.load(open(f"{OUT}/report.json"))
    print(
        "| script | updates (checkpoint every) | kills | during a save | recovered, bit for bit | updates lost per kill: "
        "mean, max |"
    )
    print("|---|---|---|---|---|---|")
    for r in report:
        lost = [k["lost"] for k in r["kills"]]
        print(
            f"| `{r['script']}` | {r['updates']} ({r['save_every']}) | {len(lost)} | "
            f"{sum(k['during_save'] for k in r['kills'])} | "
            f"{'yes' if r['recovered'] else 'NO: ' + str(r['error'])} | {sum(lost) / max(len(lost), 1):.2f}, "
            f"{max(lost, default=0)} |"
        )
    total = [k for r in report for k in r["kills"]]
    print(
        f"\n{len(total)} kills, {sum(k['during_save'] for k in total)} during a save; {sum(r['recovered'] for r in report)} "
        "of "
        f"{len(report)} runs recovered; {sum(r['seconds'] for r in report) / 60:.1f} min"
    )


if __name__ == "__main__":
    if not os.environ.get("REPORT_ONLY"):
        os.makedirs(OUT, exist_ok=True)
        main()
    table()
