#!/usr/bin/env bash
# DR-PO against PPO, side by side in one run: the same models, prompts, batch and response length, interleaved
# twice so that machine noise hits every arm alike. Needs the tiny world (bash demo.sh writes tiny/).
# Summary: python benchmarks/summarize_speed.py /tmp/drpo_speed/runs/*/metrics.jsonl
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${W:-$ROOT/tiny}
OUT=/tmp/drpo_speed; rm -rf $OUT; mkdir -p $OUT; cd $OUT
FLAGS="--sft-model-path $W/sft --reward-model-path $W/rm --dataset-name $W/tldr_sft --response-length 8 --total-episodes 640
  --batch-size 64 --local-rollout-forward-batch-size 16 --local-micro-batch-size 16 --num-mini-batches 2 --lr 1e-3
  --print-sample-every 0 --save-every 0 --output-dir $OUT/model --max-grad-norm 1 --no-whiten-rewards"
for rep in 1 2; do
  python $ROOT/ppo_baseline.py --exp-name ppo_$rep $FLAGS > /dev/null 2>&1
  python $ROOT/drpo_tldr.py --exp-name drpo0.5_$rep --reset-prob 0.5 --reset-source sft_reference $FLAGS > /dev/null 2>&1
  python $ROOT/drpo_tldr.py --exp-name drpo1.0_$rep --reset-prob 1.0 --reset-source sft_reference $FLAGS > /dev/null 2>&1
done
python $ROOT/benchmarks/summarize_speed.py runs/*/metrics.jsonl
python - <<'PY'
import glob, json
def per_update(pattern):
    rows = [r for f in glob.glob(f"runs/*{pattern}*/metrics.jsonl") for r in [json.loads(x) for x in open(f)][1:]]
    return sum(r["time/rollout"] + r["time/scoring"] + r["time/update"] for r in rows) / len(rows), \
           sum(r["time/rollout"] for r in rows) / len(rows)
ppo, ppo_roll = per_update("__ppo_")
for arm in ("drpo0.5", "drpo1.0"):
    t, roll = per_update(f"__{arm}_")
    print(f"{arm}: {t:.3f} s/update vs PPO {ppo:.3f}: ratio {t / ppo:.3f} (rollout alone {roll / ppo_roll:.3f})")
PY
