#!/usr/bin/env bash
# RLHF against contrastive training (docs/results/rl_vs_contrastive/protocol.md): GRPO,
# DAPO, online MIO, the K-way JS group loss and online DPO on the same rollout budget;
# every final model and the base on 1000 test problems, 8 samples each (pass@k, k = 1..8)
# and greedy. Resumable: rerun after a stop.
#   bash launch/rl_study.sh                 # everything
#   STEP=train|pass8|base bash launch/rl_study.sh
#   PREF_LR=2e-6 PREF_BETA=0.5 bash ...    # Study B's chosen cell for the preference arms
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-workdirs/rl_study}
STEP=${STEP:-all}
PREF_LR=${PREF_LR:-5e-6}
PREF_BETA=${PREF_BETA:-0.1}
TASK_CONFIG='{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}'
COMMON=(--task=basic_arithmetic "--task_config=$TASK_CONFIG" --test_examples=1000
        --max_new_tokens=96 --select_seeds=0 --test_seeds=0,1,2
        --set=log.progress_bar=False --out="$OUT/runs")
PASS8=(--split=test --seed=0 --task=basic_arithmetic "--task_config=$TASK_CONFIG"
       --num_examples=1000 --max_new_tokens=96 --samples=8 --pass_k=8 --temperature=0.8
       --top_p=0.95 --batch_size=64)
mkdir -p "$OUT"
if [[ $STEP == all || $STEP == train ]]; then
  # GRPO and DAPO: the learning rate chosen on validation (loss.beta is unused by the
  # policy-gradient rounds: 0.1 only names the cell)
  $PY -m mio_jax.sweep --config=configs/grpo.py --methods=grpo,dapo \
      --learning_rates=2e-6,5e-6 --betas=0.1 "${COMMON[@]}" --table=rl
  # the preference arms at Study B's chosen cell (or the config's defaults)
  $PY -m mio_jax.sweep --config=configs/online.py --methods=mio,js_multi,dpo \
      --learning_rates="$PREF_LR" --betas="$PREF_BETA" "${COMMON[@]}" --table=contrastive
fi
if [[ $STEP == all || $STEP == pass8 ]]; then
  for run in "$OUT"/runs/*_lr*_beta*/*_seed*/; do
    [[ -f $run/sweep_test.json && ! -f $run/test_eval_pass8.json ]] || continue
    $PY -m mio_jax.evaluate --model="$run/hf_export" "${PASS8[@]}" \
        --out="$run/test_eval_pass8.json"
  done
fi
if [[ $STEP == all || $STEP == base ]]; then
  [[ -f $OUT/base_test_eval_pass8.json ]] || $PY -m mio_jax.evaluate --model=smollm2 \
      "${PASS8[@]}" --out="$OUT/base_test_eval_pass8.json"
fi
