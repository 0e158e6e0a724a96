#!/usr/bin/env bash
# REBEL against PPO at equal generations, side by side in one run: the demo's models, prompts and settings (64
# generations an update: PPO's batch of 64 episodes, REBEL's 32 pairs), 10 updates each, interleaved twice so that
# machine noise hits both alike. Needs the tiny world (bash demo.sh writes tiny/). Prints generations/s per phase and
# the peak RSS of each run.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${W:-$ROOT/tiny}
OUT=/tmp/rebel_speed; rm -rf $OUT; mkdir -p $OUT; cd $OUT
FLAGS="--sft-model-path $W/sft --reward-model-path $W/rm --dataset-name $W/tldr_sft --response-length 8 --total-episodes 640
  --num-mini-batches 2 --lr 1e-3 --kl-coef 0.05 --max-grad-norm 1 --print-sample-every 0 --save-every 0 --output-dir $OUT/model"
for rep in 1 2; do
  /usr/bin/time -f "ppo_$rep MAXRSS %M" python $ROOT/ppo_baseline.py --exp-name ppo_$rep $FLAGS --batch-size 64 \
    --local-rollout-forward-batch-size 64 --local-micro-batch-size 16 --no-whiten-rewards > /dev/null 2>> rss.txt
  /usr/bin/time -f "rebel_$rep MAXRSS %M" python $ROOT/rebel.py --exp-name rebel_$rep $FLAGS --batch-size 32 \
    --local-rollout-forward-batch-size 32 --local-micro-batch-size 8 > /dev/null 2>> rss.txt
done
python - <<'PY'
import glob, json, re
rss = {m.group(1): int(m.group(2)) / 2**20 for m in re.finditer(r"(\w+) MAXRSS (\d+)", open("rss.txt").read())}
def per_update(arm):
    rows = [r for f in glob.glob(f"runs/*__{arm}_*__*/metrics.jsonl") for r in [json.loads(x) for x in open(f)][1:]]
    return {k: sum(r[f"time/{k}"] for r in rows) / len(rows) for k in ("rollout", "scoring", "update")}
ppo, rebel = per_update("ppo"), per_update("rebel")
for name, t in (("PPO", ppo), ("REBEL", rebel)):
    total = sum(t.values())
    print(f"{name}: {64 / total:.1f} generations/s ({total:.3f} s/update: rollout {t['rollout']:.3f}, scoring "
          f"{t['scoring']:.3f}, update {t['update']:.3f}); ratio to PPO {sum(ppo.values()) / total:.3f}x")
print("peak RSS (GB):", {k: round(v, 3) for k, v in sorted(rss.items())})
PY
