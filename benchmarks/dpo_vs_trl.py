"""pairs/s of dpo_baseline.py against TRL's DPOTrainer, side by side in one run: the same tiny GPT-NeoX with the
real Pythia vocabulary (tiny/sft from `bash demo.sh`), the same 64 real TL;DR pairs (../shared/data), batch 8,
at most 384 tokens, fp32 on CPU, 1 epoch. Both times include the reference log-probs (TRL computes them at every
step; dpo_baseline.py once, before training). TRL is a benchmark-only dependency: run this with a Python that has
`trl` installed (python -m venv --system-site-packages /tmp/trlenv && /tmp/trlenv/bin/pip install trl).
Run: /tmp/trlenv/bin/python benchmarks/dpo_vs_trl.py"""
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dpo_baseline  # noqa: E402

N, BATCH = 64, 8
DATA = f"{ROOT}/../shared/data/tldr/comparisons_gpt4_dev.jsonl"
MODEL = f"{ROOT}/tiny/sft"
work = tempfile.mkdtemp()

# ---- ours, in a subprocess, so that its peak memory is its own ----
start = time.time()
proc = subprocess.run([sys.executable, f"{ROOT}/dpo_baseline.py", "--sft-model-path", MODEL, "--dataset-name", DATA,
                       "--train-split", f"train[:{N}]", "--eval-split", "train[:8]", "--batch-size", str(BATCH),
                       "--local-micro-batch-size", str(BATCH), "--query-length", "331", "--response-length", "53",
                       "--eval-every", "1000", "--save-every", "0", "--max-grad-norm", "1", "--output-dir", f"{work}/ours"],  # as TRL
                      cwd=work, capture_output=True, text=True)
assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
ref_time = float(re.search(r"computed the reference log-probs in ([\d.]+)s", proc.stdout).group(1))
last = [line for line in proc.stdout.splitlines() if line.startswith("update=")][-1]
train_pairs_per_s = float(re.search(r"pairs_per_s=([\d.e+]+)", last).group(1))
ours_mem = float(re.search(r"peak_memory_gb=([\d.e+]+)", last).group(1))
ours_total = ref_time + N / train_pairs_per_s

# ---- TRL, in this process ----
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

tokenizer = dpo_baseline.load_tokenizer(MODEL)
rows = [json.loads(line) for line in open(DATA)][:N]
ds = Dataset.from_list([{"prompt": dpo_baseline.TLDR_FORMAT.format(**r["info"]), "chosen": r["summaries"][r["choice"]]["text"],
                         "rejected": r["summaries"][1 - r["choice"]]["text"]} for r in rows])
config = DPOConfig(output_dir=f"{work}/trl", per_device_train_batch_size=BATCH, max_length=384, beta=0.05, learning_rate=3e-6,
                   num_train_epochs=1, report_to="none", logging_steps=1, save_strategy="no", use_cpu=True, bf16=False)
trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(MODEL), args=config, train_dataset=ds, processing_class=tokenizer)
start = time.time()
trainer.train()
trl_total = time.time() - start
trl_pairs = len(trainer.train_dataset)  # TRL drops pairs whose prompt alone fills max_length
trl_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
import trl  # noqa: E402

print(f"torch {torch.__version__}, trl {trl.__version__}, {torch.get_num_threads()} threads; {N} pairs, batch {BATCH}")
print(f"dpo_baseline.py: {N / ours_total:.2f} pairs/s (reference pass {ref_time:.1f}s + training at {train_pairs_per_s:.2f} pairs/s), "
      f"peak RSS {ours_mem:.2f} GB")
print(f"TRL DPOTrainer: {trl_pairs / trl_total:.2f} pairs/s on the {trl_pairs} pairs it kept, peak RSS {trl_mem:.2f} GB "
      "(this process, which also tokenised the data)")
print(f"ratio: {(N / ours_total) / (trl_pairs / trl_total):.1f}x TRL's throughput")
