#!/usr/bin/env bash
# Reward-model eval accuracy on the real ../shared/data slices, with a tiny random-init GPT-NeoX
# (Pythia tokenizer) trained on the first 80% of each file and evaluated on the last 20%.
# Needs ../shared: the base model is the tiny world's, built here with the real Pythia tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
D=../shared/data
W=${W:-/tmp/rm_real_world}
python tiny_world.py --out $W --tokenizer ../shared/tokenizers/pythia --no-password --no-bland
EPOCHS=${EPOCHS:-4}
python reward_model.py --task hh --sft-model-path $W/base --dataset-name $D/hh/harmless_base_test_dev.jsonl \
  --train-split "train[:80%]" --eval-split "train[80%:]" --query-length 512 --response-length 128 \
  --lr 3e-4 --num-train-epochs $EPOCHS --batch-size 32 --local-micro-batch-size 8 --eval-every 40 --output-dir /tmp/rm_real_hh
python reward_model.py --task tldr --sft-model-path $W/base --dataset-name $D/tldr/comparisons_gpt4_dev.jsonl \
  --train-split "train[:80%]" --eval-split "train[80%:]" --norm-dataset-name $D/tldr/sft_posts_dev.jsonl \
  --lr 3e-4 --num-train-epochs $EPOCHS --batch-size 32 --local-micro-batch-size 8 --eval-every 15 --output-dir /tmp/rm_real_tldr
