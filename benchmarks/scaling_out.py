"""One process against torchrun with two (data parallel, and FSDP2), side by side in one run on this machine's CPUs
(gloo): throughput, and the peak memory of the largest process, for sft.py on a Pythia-70m-shaped model (random
weights: hidden 512, 6 layers, 8 heads, the real 50k Pythia vocabulary, real TL;DR posts from ../shared/data) and
for the RL scripts on the tiny world. Two cores: one process gets both threads, two processes one each.
Run: python benchmarks/scaling_out.py [OUT]   (OUT: a scratch folder, default /tmp/scaling_out)"""

import json
import os
import re
import subprocess
import sys
import time

import torch
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
OUT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "/tmp/scaling_out")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
LAUNCHES = {
    "1 process (2 threads)": ([sys.executable], [], "2"),
    "torchrun, 2 processes (1 thread each)": (TORCHRUN, [], "1"),
    "torchrun, 2 processes, --fsdp": (TORCHRUN, ["--fsdp"], "1"),
}


def run(name, launcher, script, flags, threads, cwd):
    """Runs the script under /usr/bin/time; returns (the last metrics line, peak RSS in GB of its largest process,
    FSDP's 'this process holds' lines, wall seconds)."""
    os.makedirs(cwd, exist_ok=True)
    start = time.time()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "MAXRSS %M", *launcher, f"{ROOT}/{script}", *map(str, flags)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": threads},
    )
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"{name} {script} failed:\n{proc.stdout[-3000:]}")
    runs = sorted(os.listdir(f"{cwd}/runs"), key=lambda r: int(r.rsplit("__", 1)[1]))
    last = json.loads(open(f"{cwd}/runs/{runs[-1]}/metrics.jsonl").readlines()[-1])
    rss = int(re.findall(r"MAXRSS (\d+)", proc.stdout)[-1]) / 2**20
    return last, rss, re.findall(r"FSDP: .*", proc.stdout), wall


def pythia_70m_shape():
    folder = f"{OUT}/pythia70m"
    if not os.path.exists(f"{folder}/config.json"):
        tokenizer = AutoTokenizer.from_pretrained(f"{SHARED}/tokenizers/pythia")
        tokenizer.eos_token, tokenizer.pad_token = "<|endoftext|>", "<|padding|>"
        torch.manual_seed(0)
        GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=50304,
                hidden_size=512,
                num_hidden_layers=6,
                num_attention_heads=8,
                intermediate_size=2048,
                eos_token_id=0,
                bos_token_id=0,
                pad_token_id=1,
                tie_word_embeddings=False,
            )
        ).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} cores")
    model = pythia_70m_shape()
    # the SFT rows of the real TL;DR data, as a one-file dataset in the Hub schema
    rows = [json.loads(x) for x in open(f"{SHARED}/data/tldr/sft_posts_dev.jsonl")]
    data = f"{OUT}/tldr_sft.jsonl"
    with open(data, "w") as f:
        f.writelines(json.dumps({k: r[k] for k in ("subreddit", "title", "post", "summary")}) + "\n" for r in rows[:80])
    sft_flags = [
        "--base-model",
        model,
        "--dataset-name",
        data,
        "--eval-split",
        "train[:8]",
        "--batch-size",
        8,
        "--local-micro-batch-size",
        4,
        "--max-train-samples",
        16,
        "--eval-every",
        100,
        "--save-every",
        0,
        "--response-length",
        53,
        "--lr",
        1e-5,
    ]
    world = f"{OUT}/tiny"
    if not os.path.exists(f"{world}/sft/config.json"):
        subprocess.run(
            [sys.executable, f"{ROOT}/tiny_world.py", "--out", world, "--tokenizer", "bpe"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            [
                sys.executable,
                f"{ROOT}/sft.py",
                "--base-model",
                f"{world}/base",
                "--dataset-name",
                f"{world}/tldr_sft",
                "--output-dir",
                f"{world}/sft",
                "--lr",
                "1e-3",
                "--num-train-epochs",
                "2",
                "--batch-size",
                "32",
                "--local-micro-batch-size",
                "32",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=world,
        )
    rl_flags = [
        "--sft-model-path",
        f"{world}/sft",
        "--value-model-path",
        f"{world}/sft",
        "--reward-fn",
        f"{ROOT}/tiny_world.py:gold_reward",
        "--response-length",
        8,
        "--batch-size",
        64,
        "--local-rollout-forward-batch-size",
        32,
        "--local-micro-batch-size",
        8,
        "--total-episodes",
        4 * 64,
        "--print-sample-every",
        0,
        "--save-every",
        0,
    ]
    results = []
    for script, flags, rate, shape in (
        (
            "sft.py",
            sft_flags,
            "tokens_per_s",
            "Pythia-70m shape (70M parameters, vocab 50304), 16 real TL;DR posts, batch 8, 2 updates",
        ),
        (
            "ppo_baseline.py",
            [*rl_flags, "--dataset-name", f"{world}/tldr_sft"],
            "episodes_per_s",
            "tiny world model, batch 64, 8 tokens, 4 updates",
        ),
        (
            "drpo_tldr.py",
            [*rl_flags, "--dataset-name", f"{world}/tldr_comparisons", "--reset-source", "chosen"],
            "episodes_per_s",
            "tiny world model, batch 64, 8 tokens, 4 updates",
        ),
    ):
        for name, (launcher, extra, threads) in LAUNCHES.items():
            last, rss, held, wall = run(
                name,
                launcher,
                script,
                [*flags, *extra, "--output-dir", f"{OUT}/out"],
                threads,
                f"{OUT}/{script}_{len(results)}",
            )
            results.append(
                {
                    "script": script,
                    "shape": shape,
                    "launch": name,
                    rate: last[rate],
                    "peak_rss_gb": rss,
                    "wall_s": wall,
                    "loss_or_score": last.get("loss", last.get("objective/scores")),
                    "fsdp": held,
                }
            )
            print(json.dumps(results[-1]), flush=True)
    with open(f"{OUT}/results.json", "w") as f:
        json.dump(results, f, indent=1)
