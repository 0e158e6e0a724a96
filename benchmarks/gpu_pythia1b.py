"""DR-PO against PPO at Pythia-1B size on one GPU: episodes/s, time per update and peak GPU memory, side by side in
one run. The policy and the reward model have the shape of EleutherAI/pythia-1b-deduped (hidden 2048, 16 layers,
50k vocabulary) but random weights, because the machine that ran this cannot reach the Hub; speed and memory depend
on the shapes, not the weights (the EOS trick makes every response response_length tokens long). They are stored in
fp16, as the Hub stores Pythia (the scripts train fp32 master weights). Prompts and reset states are the real TL;DR
posts and reference summaries of ../shared/data (--reset-source sft_reference, so that both arms roll out the same
prompts). An arm `ppo:float32` runs with --frozen-dtype float32 (reference and reward model in fp32; the default on
CUDA is bf16), to measure what the bf16 frozen models save.
An arm `rebel` runs rebel.py at equal generations: --batch-size / 2 prompts, two responses each.
Run: python benchmarks/gpu_pythia1b.py [--shared ../shared] [--updates 4] [--batch-size 128] [--arms ppo,ppo:float32]
Smaller, on a CPU: --hidden-size 768 --layers 12 (Pythia-160m) --extra "--query-length 128 --response-length 16"."""

import argparse
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser()
parser.add_argument("--shared", default=os.path.join(ROOT, "..", "shared"))
parser.add_argument("--out", default="/tmp/gpu_pythia1b")
parser.add_argument("--updates", type=int, default=4)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--arms", default="ppo,0.5,1.0,ppo,0.5,1.0", help="run in this order; repeats interleave the arms")
parser.add_argument("--hidden-size", type=int, default=2048, help="2048 and 16 layers: Pythia-1B; smaller for a smoke test")
parser.add_argument("--layers", type=int, default=16)
parser.add_argument("--extra", default="", help='more flags for every run, e.g. "--num-ppo-epochs 1"')
args = parser.parse_args()
args.shared, args.out = os.path.abspath(args.shared), os.path.abspath(args.out)

import torch  # noqa: E402
from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification  # noqa: E402

os.makedirs(args.out, exist_ok=True)
if not os.path.exists(f"{args.out}/policy/config.json"):
    tokenizer = AutoTokenizer.from_pretrained(f"{args.shared}/tokenizers/pythia")
    tokenizer.eos_token, tokenizer.pad_token = "<|endoftext|>", "<|padding|>"
    # EleutherAI/pythia-1b-deduped's config.json (at the default size)
    config = GPTNeoXConfig(
        vocab_size=50304,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        intermediate_size=4 * args.hidden_size,
        rotary_pct=0.25,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        num_labels=1,
    )
    torch.manual_seed(0)
    for name, cls in (("policy", GPTNeoXForCausalLM), ("rm", GPTNeoXForSequenceClassification)):
        model = cls(config).half()  # stored as the Hub stores Pythia
        model.save_pretrained(f"{args.out}/{name}")
        tokenizer.save_pretrained(f"{args.out}/{name}")
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f}B parameters", flush=True)
        del model

common = [
    "--sft-model-path",
    f"{args.out}/policy",
    "--reward-model-path",
    f"{args.out}/rm",
    "--dataset-name",
    f"{args.shared}/data/tldr/sft_posts_dev.jsonl",
    "--batch-size",
    str(args.batch_size),
    "--total-episodes",
    str(args.updates * args.batch_size),
    "--local-rollout-forward-batch-size",
    "64",
    "--local-micro-batch-size",
    "8",
    "--print-sample-every",
    "0",
    "--save-every",
    "0",
    "--output-dir",
    f"{args.out}/trained",
    *args.extra.split(),
]
arms = {
    "ppo": [sys.executable, f"{ROOT}/ppo_baseline.py"],
    "0.5": [sys.executable, f"{ROOT}/drpo_tldr.py", "--reset-prob", "0.5", "--reset-source", "sft_reference"],
    "1.0": [sys.executable, f"{ROOT}/drpo_tldr.py", "--reset-prob", "1.0", "--reset-source", "sft_reference"],
}
# REBEL at equal generations: half as many prompts a batch, two responses each, micro-batches of half as many pairs
chunk = int(common[len(common) - common[::-1].index("--local-rollout-forward-batch-size")])  # PPO's (the last given)
rebel = ["--batch-size", str(args.batch_size // 2), "--local-micro-batch-size", "4"]
rebel += ["--local-rollout-forward-batch-size", str(max(1, chunk // 2))]  # pairs: the same generations a generate call
order = args.arms.split(",")
for k, arm in enumerate(order):
    print(f"running {arm}", flush=True)
    script, _, frozen = arm.partition(":")  # `ppo:float32`: the frozen models in fp32
    subprocess.run(
        (arms[script] if script != "rebel" else [sys.executable, f"{ROOT}/rebel.py"])
        + common
        + (rebel if script == "rebel" else [])
        + (["--frozen-dtype", frozen] if frozen else [])
        + ["--exp-name", f"gpu_{arm.replace(':', '-')}_{k}"],
        cwd=args.out,
        check=True,
    )

print(
    f"\n{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; batch {args.batch_size}, "
    f"{args.extra or 'default flags'}, "
    f"updates 2-{args.updates} (the first is warm-up)"
)
print(
    "| arm | episodes/s | s/update | rollout | scoring | update | mean h | peak memory (GPU reserved; on CPU the process's "
    "RSS) |\n"
    "|---|---|---|---|---|---|---|---|"
)
base = None
for arm in dict.fromkeys(order):  # every run of the arm, updates after the first
    runs = [
        max(
            glob.glob(f"{args.out}/runs/*__gpu_{a.replace(':', '-')}_{k}__*/metrics.jsonl"),
            key=lambda p: int(p.split("__")[-1].split("/")[0]),
        )  # the newest run: a rerun must not report an older one
        for k, a in enumerate(order)
        if a == arm
    ]
    rows = [json.loads(line) for path in runs for line in open(path).readlines()[1:]]
    t = {k: sum(r[f"time/{k}"] for r in rows) / len(rows) for k in ("rollout", "scoring", "update")}
    per_update = sum(t.values())
    base = base or per_update
    script, _, frozen = arm.partition(":")
    name = {"ppo": "PPO", "rebel": "REBEL"}.get(script, "DR-PO " + script) + (f", frozen {frozen}" if frozen else "")
    print(
        f"| {name} | {args.batch_size / per_update:.2f} | {per_update:.2f} "
        f"({per_update / base:.3f}x) | {t['rollout']:.2f} | {t['scoring']:.2f} | {t['update']:.2f} | "
        f"{sum(r.get('reset/mean_h', 0) for r in rows) / len(rows):.1f} | {rows[-1]['peak_memory_gb']:.2f} GB |"
    )
