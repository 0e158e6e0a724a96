"""The hard-exploration experiment with a learned reward model instead of the gold rule: a reward model trained on
near-miss pairs (the password against the password with one or two words changed, or cut short) scores the
rollouts; success is still judged by the gold rule, on the greedy answer from the prompt alone after training.
DR-PO (reset_prob 0.5) against PPO (0), the seeds below, 300 updates of 64 episodes, two runs at a time, one thread
each. Reported in BENCHMARKS.md, never asserted (a learned reward can be hacked).
Run: python benchmarks/hard_exploration_rm.py (after python benchmarks/hard_exploration.py, which builds the world)"""

import glob
import json
import os
import random
import subprocess
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tiny_world  # noqa: E402

OUT = os.environ.get("OUT", "/tmp/hard_exploration")
SEEDS = [int(s) for s in os.environ.get("SEEDS", "2,6").split(",")]


def newest(pattern):
    """The newest run's file of a glob over runs/{task}__{exp}__{seed}__{time}/: by its time, a number (a rerun into the
    same folder leaves the older runs there)."""
    return max(glob.glob(pattern), key=lambda f: int(f.rsplit("__", 1)[1].split("/")[0]))


pw = f"{OUT}/world/password"
assert os.path.exists(f"{pw}/sft"), "run benchmarks/hard_exploration.py first"

rng = random.Random(0)
password = tiny_world.PASSWORD.split()
os.makedirs(f"{OUT}/rm_data", exist_ok=True)
for split, n in (("train", 2000), ("validation", 200)):
    with open(f"{OUT}/rm_data/{split}.jsonl", "w") as f:
        for i in range(n):
            near = list(password)
            if rng.random() < 0.5:  # one or two words changed
                for j in rng.sample(range(6), rng.randint(1, 2)):
                    near[j] = rng.choice([w for w in tiny_world.PASSWORD_VOCAB if w != password[j]])
            else:  # cut short
                near = near[: rng.randint(1, 5)]
            choice = rng.randint(0, 1)
            texts = [" " + " ".join(near)] * 2
            texts[choice] = " " + tiny_world.PASSWORD
            info = {
                "id": f"rm-{i}",
                "subreddit": "password",
                "title": "what is the password ?",
                "post": "tell me the password",
            }
            f.write(
                json.dumps({"info": info, "summaries": [{"text": t, "policy": "tiny"} for t in texts], "choice": choice})
                + "\n"
            )

quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=OUT)
subprocess.run(
    [
        sys.executable,
        f"{ROOT}/reward_model.py",
        "--sft-model-path",
        f"{pw}/sft",
        "--dataset-name",
        f"{OUT}/rm_data",
        "--norm-dataset-name",
        f"{pw}/tldr_sft",
        "--output-dir",
        f"{OUT}/rm_password",
        "--response-length",
        "8",
        "--lr",
        "1e-3",
        "--num-train-epochs",
        "2",
        "--batch-size",
        "32",
        "--local-micro-batch-size",
        "32",
        "--exp-name",
        "rm_password",
    ],
    check=True,
    **quiet,
)
rm_log = [json.loads(x) for x in open(newest(f"{OUT}/runs/*__rm_password__*/metrics.jsonl"))]
print(
    f"reward model: held-out accuracy {[m for m in rm_log if 'eval_accuracy' in m][-1]['eval_accuracy']:.3f} on near-miss "
    "pairs"
)

common = [
    "--sft-model-path",
    f"{pw}/sft",
    "--reward-model-path",
    f"{OUT}/rm_password",
    "--dataset-name",
    f"{pw}/tldr_comparisons",
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
    str(300 * 64),
    "--print-sample-every",
    "0",
    "--save-every",
    "0",
]
jobs = [(p, seed) for seed in SEEDS for p in ("0.5", "0")]
for i in range(0, len(jobs), 2):
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                f"{ROOT}/drpo_tldr.py",
                "--reset-prob",
                p,
                *common,
                "--seed",
                str(seed),
                "--exp-name",
                f"rm_{p}_{seed}",
                "--output-dir",
                f"{OUT}/rm_model_{p}_{seed}",
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            **quiet,
        )
        for p, seed in jobs[i : i + 2]
    ]
    for proc in procs:
        assert proc.wait() == 0

tokenizer = AutoTokenizer.from_pretrained(f"{pw}/sft", padding_side="left")
prompt = "SUBREDDIT: r/password\n\nTITLE: what is the password ?\n\nPOST: tell me the password\n\nTL;DR:"
print("| arm | seed | greedy answer from the prompt | gold | RM score of the last batch (mean) |")
print("|---|---|---|---|---|")
for p, seed in jobs:
    model = AutoModelForCausalLM.from_pretrained(f"{OUT}/rm_model_{p}_{seed}").eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    answer = tokenizer.decode(
        model.generate(
            ids,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=[tokenizer.pad_token_id],
        )[0, ids.shape[1] :],
        skip_special_tokens=True,
    )
    gold = tiny_world.password_reward([prompt], [answer])[0]
    log = [json.loads(x) for x in open(newest(f"{OUT}/runs/*__rm_{p}_{seed}__*/metrics.jsonl"))]
    print(
        f"| {'PPO' if p == '0' else 'DR-PO ' + p} | {seed} | `{answer.strip()}` | {gold:.0f} | "
        f"{log[-1]['objective/raw_scores']:.2f} |"
    )
