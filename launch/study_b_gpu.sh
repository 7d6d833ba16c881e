#!/usr/bin/env bash
# Study B at GPU scale (docs/results/study_b/protocol.md, the same rules): 3x the prompts
# per round (192) and 2x the rounds (12), so 3x the pairs per step (48), at the chosen
# cells' learning rates and betas of the CPU study (or the published defaults before it
# has chosen), 5 seeds, every final model and the base on 1000 test problems. One script for
# a lent GPU; resumable like launch/study_b.sh.
#   OUT=/tmp/study_b_gpu bash launch/study_b_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-workdirs/study_b_gpu}
SEEDS=${SEEDS:-0,1,2,3,4}
LR=${LR:-5e-6}
BETA=${BETA:-0.1}
TASK_CONFIG='{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}'
SCALE=(--set=online.rounds=12 --set=online.prompts_per_round=192 --set=train.batch_size=48
       --set=online.sample_batch_size=512 --set=eval.reasoning_batch_size=256
       --set=log.progress_bar=False)
for method in mio dpo rpo sft; do
  $PY -m mio_jax.sweep --config=configs/online.py --methods=$method \
      --learning_rates="$LR" --betas="$BETA" --select_seeds=0 --test_seeds="$SEEDS" \
      --task=basic_arithmetic "--task_config=$TASK_CONFIG" --test_examples=1000 \
      --max_new_tokens=96 "${SCALE[@]}" --out="$OUT/runs" --table="$method"
done
[[ -f $OUT/base_test_eval.json ]] || $PY -m mio_jax.evaluate --model=smollm2 --split=test \
    --seed=0 --task=basic_arithmetic "--task_config=$TASK_CONFIG" --num_examples=1000 \
    --max_new_tokens=96 --batch_size=256 --out="$OUT/base_test_eval.json"
RUNS=()
for cell in "$OUT"/runs/*_lr*_beta*/; do RUNS+=("--runs=$cell"); done
$PY -m mio_jax.compare "${RUNS[@]}" --eval=test_eval.json --base="$OUT/base_test_eval.json" \
    --baseline=base --out="$OUT/greedy_vs_base.json"
