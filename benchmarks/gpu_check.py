"""Issue 27's GPU check, one prepared script of at most 8 minutes (--budget-s 450 from its start skips the runs that would
end past it; all seven estimated at 8-9 minutes on one H100/H200, not yet timed on one): DR-PO and PPO at Pythia-1B
shapes, each run plain, under `torchrun --nproc_per_node 1` (NCCL) and under torchrun with --fsdp, and a DR-PO run
killed (SIGKILL) just after its checkpoint and resumed with --resume-from auto; the most wanted runs first. The final
weights of the resumed run and of DR-PO under torchrun are compared with the plain DR-PO run's (the latter is the same
maths: on a GPU its difference is the noise floor of non-deterministic kernels). One table: episodes/s (updates after
the first; the killed run: its own updates), peak reserved GPU memory, the largest |policy/first_ratio - 1| (bf16
autocast: not exactly 1), the process's wall time. The first process on a fresh GPU has run slower (BENCHMARKS.md):
compare DR-PO with PPO on the later rows.

The models have Pythia-1B's shapes (hidden 2048, 16 layers, 50,304 embeddings) and random weights stored in fp16, as
the Hub stores Pythia (the machine has no Hub). The tokenizer and prompts: the real Pythia tokenizer and TL;DR posts of
--shared when it is there (`--reset-source sft_reference`: the reference summaries are the reset states), otherwise
the tiny world's (short prompts: the speed is then a lower bound on the real prompts' cost).
Results go to --report (default $OUT, else --work): gpu_check.md and gpu_check.jsonl, written after every run, so a run
cut short by a time limit still reports what it finished. Models, checkpoints and runs go to --work.
On the device tool's machine: bash benchmarks/gpu_prepare.sh here first (the wheels it lacks, the real prompts), then
the one command that prints. Run: python benchmarks/gpu_check.py [--runs ppo,drpo,...] [--updates 3] [--batch-size 64]
CPU smoke test: python benchmarks/gpu_check.py --hidden-size 64 --layers 2 --batch-size 16 --extra "--query-length 64
--response-length 8 --local-rollout-forward-batch-size 16 --local-micro-batch-size 8\""""

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = "drpo,drpo-kill,drpo-fsdp,drpo-torchrun1,ppo,ppo-fsdp,ppo-torchrun1"  # the most wanted first
parser = argparse.ArgumentParser()
parser.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
parser.add_argument("--work", default="/tmp/gpu_check")
parser.add_argument("--report", default=os.environ.get("OUT"))
parser.add_argument("--runs", default=RUNS, help=f"any of {RUNS}; drpo-kill compares with drpo when both run")
parser.add_argument("--updates", type=int, default=3)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--hidden-size", type=int, default=2048, help="2048 and 16 layers: Pythia-1B; smaller for a smoke test")
parser.add_argument("--layers", type=int, default=16)
parser.add_argument("--extra", default="", help="more flags for every run")
parser.add_argument("--budget-s", type=float, default=450, help="skip a run that would end this many seconds after the start")
args, began = parser.parse_args(), time.time()  # the budget counts the models' making too
args.work, args.shared = os.path.abspath(args.work), os.path.abspath(args.shared)  # the runs' folder is --work
args.report = os.path.abspath(args.report or args.work)
os.makedirs(args.work, exist_ok=True)
os.makedirs(args.report, exist_ok=True)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification  # noqa: E402

# ---- the tokenizer, the prompts, the models ----
real = os.path.isdir(f"{args.shared}/tokenizers/pythia")
if real:
    tokenizer, prompts = (
        AutoTokenizer.from_pretrained(f"{args.shared}/tokenizers/pythia"),
        f"{args.shared}/data/tldr/sft_posts_dev.jsonl",
    )
    tokenizer.eos_token, tokenizer.pad_token = "<|endoftext|>", "<|padding|>"
else:
    if not os.path.isdir(f"{args.work}/world/base"):
        subprocess.run([sys.executable, f"{ROOT}/tiny_world.py", "--out", f"{args.work}/world"], check=True)
    tokenizer, prompts = AutoTokenizer.from_pretrained(f"{args.work}/world/base"), f"{args.work}/world/tldr_sft"
if not os.path.exists(f"{args.work}/rm/config.json"):
    config = GPTNeoXConfig(  # EleutherAI/pythia-1b-deduped's config.json (at the default size)
        vocab_size=50304, hidden_size=args.hidden_size, num_hidden_layers=args.layers, num_attention_heads=8,
        intermediate_size=4 * args.hidden_size, rotary_pct=0.25, max_position_embeddings=2048,
        use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, num_labels=1,
    )  # fmt: skip
    torch.manual_seed(0)
    for name, cls in (("policy", GPTNeoXForCausalLM), ("rm", GPTNeoXForSequenceClassification)):
        model = cls(config).half()  # stored as the Hub stores Pythia
        model.save_pretrained(f"{args.work}/{name}")
        tokenizer.save_pretrained(f"{args.work}/{name}")
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters", flush=True)
        del model

# ---- the runs ----
common = ["--sft-model-path", f"{args.work}/policy", "--reward-model-path", f"{args.work}/rm", "--dataset-name", prompts,
          "--batch-size", str(args.batch_size), "--total-episodes", str(args.updates * args.batch_size),
          "--print-sample-every", "0", "--save-every", "0", *args.extra.split()]  # fmt: skip
torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
drpo = ["drpo_tldr.py", "--reset-prob", "0.5", "--reset-source", "sft_reference"]
launch = {
    "ppo": [sys.executable, "ppo_baseline.py"],
    "drpo": [sys.executable, *drpo],
    "ppo-torchrun1": [*torchrun, "ppo_baseline.py"],
    "drpo-torchrun1": [*torchrun, *drpo],
    "ppo-fsdp": [*torchrun, "ppo_baseline.py", "--fsdp"],
    "drpo-fsdp": [*torchrun, *drpo, "--fsdp"],
    "drpo-kill": [sys.executable, *drpo],  # the same flags as drpo, and a checkpoint before the last update
}


def command(name, *more):
    script = next(i for i, c in enumerate(launch[name]) if c.endswith(".py"))
    cmd = launch[name][:script] + [f"{ROOT}/{launch[name][script]}"] + launch[name][script + 1 :]
    return cmd + common + ["--exp-name", f"gc_{name}", "--output-dir", f"{args.work}/models/{name}", *more]


def newest_metrics(name):
    runs = glob.glob(f"{args.work}/runs/*__gc_{name}__*/metrics.jsonl")
    return [json.loads(line) for line in open(max(runs, key=lambda p: int(p.split("__")[-1].split("/")[0])))]


def weights(name):
    return {k: v for f in sorted(glob.glob(f"{args.work}/models/{name}/*.safetensors")) for k, v in load_file(f).items()}


def compare(name, row):
    """The final weights against the plain DR-PO run's: drpo-kill (resume) and drpo-torchrun1 (the same maths in a
    process group of one: on a GPU, the noise floor of non-deterministic kernels such as attention's backward)."""
    done = next((r for r in results if r["run"] == "drpo"), {})
    if name in ("drpo-kill", "drpo-torchrun1") and "episodes_per_s" in done and glob.glob(f"{args.work}/models/drpo/*"):
        straight, other = weights("drpo"), weights(name)
        diff = [(straight[k].float() - other[k].float()).abs().max().item() for k in straight]
        row["max_weight_diff_vs_drpo"] = max(diff, default=None)
        row["bitwise_equal_to_drpo"] = bool(straight) and all(torch.equal(straight[k], other[k]) for k in straight)


results, report = [], open(f"{args.report}/gpu_check.jsonl", "a")
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU: a smoke test)"
for name in args.runs.split(","):
    for old in glob.glob(f"{args.work}/runs/*__gc_{name}__*") if name == "drpo-kill" else ():
        shutil.rmtree(old)  # a rerun's: its checkpoint would stop the new run at once, and auto would resume it
    start, row = time.time(), {"run": name}
    walls = [r["wall_s"] for r in results if "wall_s" in r and r["run"] != "drpo-kill"]  # a kill run is two processes
    need = max(walls, default=0) * (2.5 if name == "drpo-kill" else 1.0)
    if start - began + need > args.budget_s:  # a run cut by the caller's time limit would report nothing
        row["skipped"] = f"--budget-s {args.budget_s}: {start - began:.0f} s spent, about {need:.0f} s needed"
    elif name != "drpo-kill":
        proc = subprocess.run(command(name), cwd=args.work, capture_output=True, text=True)
    else:  # killed once the checkpoint of update updates - 1 is in place, then resumed with the same command
        every = ["--save-every", str(args.updates - 1), "--keep-checkpoints", "1"]
        with open(f"{args.work}/killed_run.log", "w") as log:
            killed = subprocess.Popen(command(name, *every), cwd=args.work, stdout=log, stderr=subprocess.STDOUT)
            mark = f"{args.work}/runs/*__gc_{name}__*/checkpoints/update_{args.updates - 1:07d}.pt"
            while not glob.glob(mark) and killed.poll() is None:
                time.sleep(0.2)
            killed.send_signal(signal.SIGKILL)
            row["killed_before_end"] = killed.wait() == -signal.SIGKILL
        row["checkpoint_gb"] = round(sum(os.path.getsize(p) for p in glob.glob(mark)) / 2**30, 2)
        proc = subprocess.run(command(name, *every, "--resume-from", "auto"), cwd=args.work, capture_output=True, text=True)
        row["resumed"] = f"at update {args.updates}" in proc.stdout
    if "skipped" not in row:
        row["wall_s"] = round(time.time() - start, 1)
    if "skipped" not in row and proc.returncode != 0:
        row["error"] = (proc.stdout + proc.stderr)[-1500:]
    elif "skipped" not in row:
        metrics = newest_metrics(name)
        # after the first update (warm-up); the killed run: its own updates only, not the resumed process's first
        later = [m for m in metrics if m["update"] > 1 and (name != "drpo-kill" or m["update"] < args.updates)]
        row |= {
            "episodes_per_s": round(sum(m["episodes_per_s_update"] for m in later or metrics) / len(later or metrics), 2),
            "peak_memory_gb": round(max(m["peak_memory_gb"] for m in metrics), 2),
            "max_first_ratio_error": max(abs(m["policy/first_ratio"] - 1) for m in metrics),
            "updates_logged": [m["update"] for m in metrics],
        }
        compare(name, row)
    for done in (n for n in os.listdir(f"{args.work}/models") if n != "drpo") if os.path.isdir(f"{args.work}/models") else ():
        shutil.rmtree(f"{args.work}/models/{done}")  # 4 GB a final model at 1B: keep the disk free
    results.append(row)
    report.write(json.dumps(row | {"device": device}) + "\n")
    report.flush()
    print(json.dumps(row), flush=True)
    table = [f"{device}; batch {args.batch_size}, {args.updates} updates a run, {'real' if real else 'tiny-world'} "
             f"prompts, {args.extra or 'the default flags'}", "",
             "| run | episodes/s | peak reserved memory | max abs(first_ratio - 1) | wall time | notes |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        notes = r.get("error", "")[-200:].replace("\n", " ") or ", ".join(
            f"{k} {r[k]}" for k in ("killed_before_end", "resumed", "checkpoint_gb", "bitwise_equal_to_drpo",
                                    "max_weight_diff_vs_drpo") if k in r)  # fmt: skip
        if "episodes_per_s" in r:
            table.append(f"| {r['run']} | {r['episodes_per_s']} | {r['peak_memory_gb']} GB | "
                         f"{r['max_first_ratio_error']:.3g} | {r['wall_s']} s | {notes} |")  # fmt: skip
        else:
            table.append(f"| {r['run']} | - | - | - | {r.get('wall_s', '-')} s | {r.get('skipped') or 'failed: ' + notes} |")
    open(f"{args.report}/gpu_check.md", "w").write("\n".join(table) + "\n")
print("\n".join(table))
