#!/usr/bin/env bash
# The offline demo: build the tiny world, then run the RLHF pipeline on it, on CPU, with no network.
# Every step is an ordinary script run with its flags pointed at local files; see README.md.
set -euo pipefail
cd "$(dirname "$0")"
W=${W:-tiny}            # where the tiny world and its models go
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# Every CPU kernel library pinned (ATen and oneDNN to their AVX2 code, MKL to its COMPATIBLE branch, the one it keeps
# the same on Intel and AMD: its AVX2 branch is Intel's alone), so that x86-64 machines with AVX2 compute the same
# floats: an RL run turns a last-bit difference into other samples, and the README's numbers are this run's.
export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2} MKL_CBWR=${MKL_CBWR:-COMPATIBLE} ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
# the tiny world's recipe, next to its high learning rates: clip the gradient norm at 1 and do not whiten the rewards
# (the defaults follow the paper's runs: no clipping, whitened rewards)
TINY_RL="--max-grad-norm 1 --no-whiten-rewards"
STAGES=11; STAGE=0
stage() {  # a header with the time since the start: [4/9] PPO (1m12s)
  STAGE=$((STAGE + 1)); echo; echo "[$STAGE/$STAGES] $1 ($((SECONDS / 60))m$((SECONDS % 60))s)"
}

stage "the tiny world: prompts, SFT data, preference pairs, a base model"
# the BPE tokenizer (at most 512 tokens: 508) trained on the world's text (the default): the same world on every machine
python tiny_world.py --out $W --tokenizer bpe
stage "SFT"
python sft.py --base-model $W/base --dataset-name $W/tldr_sft --output-dir $W/sft \
  --lr 1e-3 --num-train-epochs 6 --batch-size 32 --local-micro-batch-size 32 --eval-every 100
stage "reward model"
python reward_model.py --sft-model-path $W/sft --dataset-name $W/tldr_comparisons --norm-dataset-name $W/tldr_sft \
  --output-dir $W/rm --lr 1e-3 --num-train-epochs 2 --batch-size 32 --local-micro-batch-size 32 --eval-every 50
stage "PPO"
python ppo_baseline.py --sft-model-path $W/sft --reward-model-path $W/rm --dataset-name $W/tldr_sft --output-dir $W/ppo \
  --response-length 8 --total-episodes 1280 --batch-size 64 --local-rollout-forward-batch-size 64 \
  --local-micro-batch-size 16 --num-mini-batches 2 --lr 1e-3 --kl-coef 0.05 --print-sample-every 10 $TINY_RL
stage "DR-PO (--reset-prob 0.5)"
python drpo_tldr.py --reset-prob 0.5 --sft-model-path $W/sft --reward-model-path $W/rm --dataset-name $W/tldr_comparisons \
  --reset-source chosen --output-dir $W/drpo --response-length 8 --total-episodes 1280 --batch-size 64 \
  --local-rollout-forward-batch-size 64 --local-micro-batch-size 16 --num-mini-batches 2 --lr 1e-3 --kl-coef 0.05 \
  --print-sample-every 10 $TINY_RL
stage "REBEL (the same generations as PPO: 20 updates of 32 pairs)"
python rebel.py --sft-model-path $W/sft --reward-model-path $W/rm --dataset-name $W/tldr_sft --output-dir $W/rebel \
  --response-length 8 --total-episodes 1280 --batch-size 32 --local-rollout-forward-batch-size 32 \
  --local-micro-batch-size 8 --num-mini-batches 2 --lr 1e-3 --kl-coef 0.05 --print-sample-every 10 --max-grad-norm 1
stage "online DPO (OAIF: 2 responses to each of 16 prompts an iteration, labelled by the reward model, one DPO step)"
python online_dpo.py --sft-model-path $W/sft --reward-model-path $W/rm --dataset-name $W/tldr_sft --output-dir $W/online_dpo \
  --response-length 8 --total-episodes 1280 --prompts-per-iteration 16 --batch-size 16 --local-rollout-forward-batch-size 16 \
  --local-micro-batch-size 16 --lr 1e-3 --beta 0.2 --temperature 0.7 --print-sample-every 10
stage "DPO"
python dpo_baseline.py --sft-model-path $W/sft --dataset-name $W/tldr_comparisons --output-dir $W/dpo \
  --lr 3e-4 --beta 0.1 --batch-size 32 --local-micro-batch-size 16 --eval-every 20 --max-grad-norm 1

stage "results on 200 held-out tiny-world prompts (sampled at temperature 0.7)"
python benchmarks/demo_report.py --world $W --policies sft=$W/sft ppo=$W/ppo drpo=$W/drpo rebel=$W/rebel online_dpo=$W/online_dpo dpo=$W/dpo \
  | tee $W/report.txt

stage "the DPO task (bland/: SFT's greedy answer is a bland one; the pairs prefer specific ones): SFT, DPO, results"
python sft.py --base-model $W/base --dataset-name $W/bland/tldr_sft --output-dir $W/bland/sft \
  --lr 1e-3 --num-train-epochs 6 --batch-size 32 --local-micro-batch-size 32 --eval-every 100
python dpo_baseline.py --sft-model-path $W/bland/sft --dataset-name $W/bland/tldr_comparisons --output-dir $W/bland/dpo \
  --lr 3e-4 --beta 0.1 --batch-size 32 --local-micro-batch-size 16 --eval-every 20 --max-grad-norm 1
python benchmarks/demo_report.py --world $W/bland --policies sft=$W/bland/sft dpo=$W/bland/dpo | tee $W/bland/report.txt

stage "win rates against the reference summaries: reward-model judge, then the tiny SFT model as an hf judge"
for J in "rm $W/rm" "hf $W/sft"; do
  set -- $J
  python eval_winrate.py --model-paths $W/sft $W/ppo $W/drpo $W/rebel $W/online_dpo $W/dpo --dataset-name $W/tldr_sft --split validation \
    --num-examples 200 --response-length 8 --judge $1 --judge-model $2 --output-dir $W/eval_$1 --cache-file $W/eval_$1/cache.jsonl
done

echo; python benchmarks/readme_demo.py --world $W || true  # the README's demo numbers against this run's
echo; echo "done in $((SECONDS / 60))m$((SECONDS % 60))s. Where everything went:"
echo "  $W/                the tiny world and its models: base, sft, rm, ppo, drpo, rebel, online_dpo, dpo, bland/sft, bland/dpo"
echo "  runs/<run_name>/   each run's metrics.jsonl and args.json (curves: python plot_runs.py runs/<run_name>)"
echo "  $W/eval_rm, $W/eval_hf   the win rates: summary.json, and every judgement per policy (jsonl, csv)"
