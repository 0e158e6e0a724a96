#!/usr/bin/env bash
# Prepares issue 27's GPU check for the device tool's H200 machine, which reaches no package registry and has, as
# /work/.library/device/KINDS.md lists it, torch 2.11 and transformers 5.17 but no tyro and no datasets. This writes,
# under .gpu/ (ignored by git, carried by the call): the wheels of the versions CI tests that it lacks or holds too old
# (transformers >= 5.20 is required), and the real Pythia tokenizer and TL;DR posts from ../shared (which does not
# travel) so that the check runs on real prompts. About 19 MB; the device tool carries at most 64 MiB.
# Then one device call, at most 8 minutes of work (--budget-s 450 counts from the script's start):
#   run(command=<the line printed at the end>, carry=[".gpu"], timeout_s=540)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$ROOT/../shared}
rm -rf "$ROOT/.gpu" && mkdir -p "$ROOT/.gpu/whl" "$ROOT/.gpu/shared/tokenizers" "$ROOT/.gpu/shared/data/tldr"
# the versions of this machine's tested install, but transformers 5.24.0: 5.25 needs huggingface_hub >= 2.4 and the
# device image holds 1.33 (5.24 needs >= 1.31); pip matches one manylinux tag exactly, so several are named
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$ROOT/.gpu/whl" \
  transformers==5.24.0 datasets==5.2.0 tyro==1.0.17 dill==0.4.1 multiprocess==0.70.19 docstring_parser==0.18.0 \
  typeguard==4.6.1 regex==2026.5.9 fsspec==2026.9.0  # a failed download stops the script (set -e)
if [ -d "$SHARED/tokenizers/pythia" ]; then
  cp -r "$SHARED/tokenizers/pythia" "$ROOT/.gpu/shared/tokenizers/"
  cp "$SHARED/data/tldr/sft_posts_dev.jsonl" "$ROOT/.gpu/shared/data/tldr/"
fi
du -sh "$ROOT/.gpu"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site" \
  ".gpu/whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && nvidia-smi -L && python3 -c 'import torch," \
  "transformers, datasets, pyarrow; print(torch.__version__, transformers.__version__, datasets.__version__," \
  "pyarrow.__version__)' && python3 benchmarks/gpu_check.py --shared .gpu/shared --budget-s 450"
