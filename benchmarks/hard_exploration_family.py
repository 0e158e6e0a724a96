"""Where DR-PO's advantage holds: the hard-exploration task over a family of passwords, DR-PO (reset_prob 0.5)
against PPO (reset_prob 0), as benchmarks/hard_exploration.py runs them, and REBEL with and without the reset (ARMS=
"PPO,DR-PO 0.5,REBEL,REBEL 0.5"; REBEL at PPO's generations, 32 pairs an update), for password lengths 3, 6, 9 and
vocabularies of 16 and 64 words (`tiny_world.py --password-length L --password-vocab V`). The SFT answers are random
words, 1 to L of them, so SFT writes the password with probability about V^-L / L; the chosen responses of the
comparisons are always the password. Greedy success from the prompt (1 when the greedy answer is the password) is
evaluated every 10 updates; a run is solved when it reaches 0.9, and stops there (`--early-stop-score 0.9`, as the
test does); unsolved runs go the full UPDATES.
Two runs at a time, one thread each. Prints a Markdown table; the runs stay in $OUT.
Run: python benchmarks/hard_exploration_family.py   (SEEDS=1,2,3,4 LENGTHS=3,6,9 VOCABS=16,64 UPDATES=300 OUT=/tmp/hx_family;
CELLS=3x16,6x16 instead of LENGTHS and VOCABS)
REPORT_ONLY=1 redraws the table from $OUT; a run into the same $OUT skips the cells and runs it already holds."""

import concurrent.futures
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT", "/tmp/hx_family")
SEEDS = [int(s) for s in os.environ.get("SEEDS", "1,2,3,4").split(",")]
LENGTHS = [int(s) for s in os.environ.get("LENGTHS", "3,6,9").split(",")]
VOCABS = [int(s) for s in os.environ.get("VOCABS", "16,64").split(",")]
UPDATES = int(os.environ.get("UPDATES", 300))


def newest(pattern):
    """The newest run's file of a glob over runs/{task}__{exp}__{seed}__{time}/: by its time, a number (a rerun into the
    same folder leaves the older runs there)."""
    return max(glob.glob(pattern), key=lambda f: int(f.rsplit("__", 1)[1].split("/")[0]))


ALL_ARMS = {"PPO": ("drpo_tldr.py", "0"), "DR-PO 0.5": ("drpo_tldr.py", "0.5"), "REBEL": ("rebel.py", "0")}
ALL_ARMS["REBEL 0.5"] = ("rebel.py", "0.5")  # REBEL with DR-PO's reset; REBEL at PPO's generations: 32 pairs an update
# online DPO at PPO's generations, labelled by the password rule (a pair only where one of the two solves): OAIF, 2
# responses to 32 prompts an iteration (64 generations: one "update"); iterative DPO, 4 responses to 160 prompts (640
# generations: 10 updates), the best against the worst, 2 epochs; each evaluated every 640 generations
ALL_ARMS |= {"online DPO": ("online_dpo.py", "0"), "online DPO 0.5": ("online_dpo.py", "0.5")}
ALL_ARMS |= {"iterative DPO": ("iterative", "0"), "iterative DPO 0.5": ("iterative", "0.5")}
ARMS = {arm: ALL_ARMS[arm] for arm in os.environ.get("ARMS", "PPO,DR-PO 0.5").split(",")}
CELLS = [(length, vocab) for length in LENGTHS for vocab in VOCABS]
if os.environ.get("CELLS"):  # e.g. CELLS=3x16,3x64,6x16: these cells only
    CELLS = [tuple(int(n) for n in cell.split("x")) for cell in os.environ["CELLS"].split(",")]
# one thread, the CPU kernels pinned to AVX2 (ATen and oneDNN as demo.sh; MKL to its AVX2 branch, not demo.sh's
# COMPATIBLE: BENCHMARKS.md's figures were measured so): the same trajectories on any Intel x86 machine with AVX2
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cell_dir(length, vocab):
    return f"{OUT}/L{length}_V{vocab}"


def prepare(length, vocab):
    """The cell's world and its SFT policy (3 epochs of random answers, as benchmarks/hard_exploration.py)."""
    d = cell_dir(length, vocab)
    if os.path.exists(f"{d}/password/sft/config.json"):  # prepared by an earlier run into the same $OUT
        return
    run = dict(check=True, cwd=OUT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    subprocess.run(
        [
            sys.executable,
            f"{ROOT}/tiny_world.py",
            "--out",
            d,
            "--tokenizer",
            "bpe",
            "--no-bland",
            "--password-length",
            str(length),
            "--password-vocab",
            str(vocab),
        ],
        **run,
    )
    subprocess.run(
        [
            sys.executable,
            f"{ROOT}/sft.py",
            "--base-model",
            f"{d}/password/base",
            "--dataset-name",
            f"{d}/password/tldr_sft",
            "--eval-split",
            "train[:5%]",
            "--output-dir",
            f"{d}/password/sft",
            "--lr",
            "1e-3",
            "--num-train-epochs",
            "3",
            "--batch-size",
            "32",
            "--local-micro-batch-size",
            "32",
            "--response-length",
            str(length + 2),
            "--exp-name",
            f"sft_L{length}_V{vocab}",
        ],
        **run,
    )


def train(length, vocab, arm, seed):
    """One DR-PO / PPO / REBEL / online DPO run; it stops once solved. Returns its (update, greedy success) evaluations."""
    pw = f"{cell_dir(length, vocab)}/password"
    name = f"L{length}_V{vocab}_{arm.replace(' ', '')}_{seed}"
    if os.path.exists(f"{OUT}/evals/{name}.json"):  # run by an earlier run into the same $OUT
        return json.load(open(f"{OUT}/evals/{name}.json"))
    script, reset = ARMS[arm]
    rl = [*("--batch-size", 64, "--local-rollout-forward-batch-size", 64, "--local-micro-batch-size", 32)]
    rl += [*("--num-mini-batches", 2, "--kl-coef", 0.01, "--no-whiten-rewards", "--eval-every", 10)]
    own = [*rl, "--value-model-path", f"{pw}/sft"]
    if script == "rebel.py":  # 32 pairs: PPO's 64 generations an update, in one generate call; micro-batches of 16 pairs
        own = [*rl, "--batch-size", 32, "--local-micro-batch-size", 16, "--local-rollout-forward-batch-size", 32]
    if script == "online_dpo.py":
        own = [*("--prompts-per-iteration", 32, "--batch-size", 32, "--local-rollout-forward-batch-size", 32)]
        own += [*("--local-micro-batch-size", 16, "--beta", 0.2, "--eval-every", 10)]
    if script == "iterative":
        script, own = "online_dpo.py", ["--num-generations", 4, "--pair-selection", "max_min", "--num-epochs", 2]
        own += [*("--prompts-per-iteration", 160, "--batch-size", 32, "--local-rollout-forward-batch-size", 32)]
        own += [*("--local-micro-batch-size", 16, "--beta", 0.2, "--eval-every", 1)]
    cmd = [
        sys.executable,
        f"{ROOT}/{script}",
        *("--reset-prob", reset, "--sft-model-path", f"{pw}/sft", "--dataset-name", f"{pw}/tldr_comparisons"),
        *("--reward-fn", f"{ROOT}/tiny_world.py:password_reward", "--response-length", length + 2, "--lr", "1e-3"),
        *("--temperature", 1, "--reset-source", "chosen", "--max-grad-norm", 1, "--total-episodes", UPDATES * 64),
        *("--eval-prompts", 1, "--early-stop-score", 0.9, "--print-sample-every", 0, "--save-every", 0, "--seed", seed),
        *("--exp-name", name, "--output-dir", f"{OUT}/models/{name}"),
        *own,
    ]
    cmd = [str(c) for c in cmd]
    with open(f"{OUT}/logs/{name}.txt", "w") as log:
        subprocess.run(cmd, check=True, cwd=OUT, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    evals = read_evals(name)
    json.dump(evals, open(f"{OUT}/evals/{name}.json", "w"))
    return evals


def read_evals(name):
    rows = [json.loads(line) for line in open(newest(f"{OUT}/runs/*__{name}__*/metrics.jsonl"))]
    return [(r["episodes"] // 64, r["eval/score"]) for r in rows if "eval/score" in r]


def first_success(evals):
    """The first update whose greedy success reaches 0.9, or None."""
    return next((update for update, score in evals if score >= 0.9), None)


def report():
    print(
        f"\n{len(SEEDS)} seeds per cell, at most {UPDATES} updates of 64 episodes; solved = greedy success from the prompt "
        ">= 0.9 "
        "(evaluated every 10 updates); median over seeds, an unsolved seed counting as never\n"
    )
    print(
        "| password length | vocabulary | SFT writes it (about) | "
        + " | ".join(f"{arm}: seeds solved | {arm}: median update | {arm}: first update per seed" for arm in ARMS)
        + " |"
    )
    print("|---|---|---" + "|---|---|---" * len(ARMS) + "|")
    for length, vocab in CELLS:
        cells = []
        for arm in ARMS:
            firsts = [
                first_success(json.load(open(f"{OUT}/evals/L{length}_V{vocab}_{arm.replace(' ', '')}_{seed}.json")))
                for seed in SEEDS
            ]
            ordered = sorted(math.inf if f is None else f for f in firsts)
            median = statistics.median(ordered)
            cells.append(
                (
                    f"{sum(f is not None for f in firsts)}/{len(SEEDS)}",
                    "never" if median == math.inf else f"{median:g}",
                    ", ".join("never" if f is None else str(f) for f in firsts),
                )
            )
        log_p = -(length * math.log(vocab) + math.log(length))
        print(f"| {length} | {vocab} | e^{log_p:.0f} | " + " | ".join(" | ".join(c) for c in cells) + " |")


if __name__ == "__main__":
    start = time.time()
    if os.environ.get("REPORT_ONLY") != "1":
        for sub in ("logs", "evals", "models"):
            os.makedirs(f"{OUT}/{sub}", exist_ok=True)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda c: prepare(*c), CELLS))
            jobs = [(length, vocab, arm, seed) for length, vocab in CELLS for arm in ARMS for seed in SEEDS]
            list(pool.map(lambda j: train(*j), jobs))
        print(f"{len(jobs)} runs in {(time.time() - start) / 60:.1f} minutes")
    report()
