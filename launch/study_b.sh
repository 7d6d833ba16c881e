#!/usr/bin/env bash
# Study B (docs/results/study_b/protocol.md): online MIO, DPO, DPO + NLL and SFT in the
# published regime, each method's (learning rate, beta) chosen on validation, the chosen
# cells at 3 seeds, every final model and the base on 1000 test problems. Resumable: rerun
# the same command after a stop (finished runs and evaluations are kept).
#   bash launch/study_b.sh            # everything
#   STEP=select|sampled|base|report bash launch/study_b.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-workdirs/study_b}
DOCS=docs/results/study_b
STEP=${STEP:-all}
TASK_CONFIG='{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}'
TEST=(--task=basic_arithmetic "--task_config=$TASK_CONFIG" --test_examples=1000
      --max_new_tokens=96 --test_seeds=0,1,2 --select_seeds=0
      --set=log.progress_bar=False)
SAMPLED=(--split=test --seed=0 --task=basic_arithmetic "--task_config=$TASK_CONFIG"
         --num_examples=1000 --max_new_tokens=96 --samples=4 --temperature=0.8 --top_p=0.95
         --batch_size=64)
mkdir -p "$OUT"

if [[ $STEP == all || $STEP == select ]]; then
  # the grid on validation (seed 0), the chosen cell at seeds 0-2, its greedy test evals
  $PY -m mio_jax.sweep --config=configs/online.py --methods=mio,dpo,rpo \
      --learning_rates=2e-6,5e-6 --betas=0.1,0.5 "${TEST[@]}" --out="$OUT/runs" \
      --table=preference
  $PY -m mio_jax.sweep --config=configs/online.py --methods=sft \
      --learning_rates=2e-6,5e-6 --betas=0.1 "${TEST[@]}" --out="$OUT/runs" --table=sft
fi
chosen_runs() {  # every run folder of every chosen cell
  $PY - "$OUT/runs" <<'PYEOF'
import glob, json, os, sys
out = sys.argv[1]
for table in ("preference.json", "sft.json"):
    for c in json.load(open(os.path.join(out, table)))["chosen"].values():
        for run in sorted(glob.glob(os.path.join(out, c["cell"], "*_seed*"))):
            if os.path.isdir(run):
                print(run)
PYEOF
}
if [[ $STEP == all || $STEP == sampled ]]; then  # sampled pass@1 of every chosen run
  for run in $(chosen_runs); do
    [[ -f $run/test_eval_sampled.json ]] && continue
    $PY -m mio_jax.evaluate --model="$run/hf_export" "${SAMPLED[@]}" \
        --out="$run/test_eval_sampled.json"
  done
fi
if [[ $STEP == all || $STEP == base ]]; then  # the base model, greedy and sampled
  BASE_FLAGS=(--split=test --seed=0 --task=basic_arithmetic "--task_config=$TASK_CONFIG"
              --num_examples=1000 --max_new_tokens=96 --batch_size=64)
  [[ -f $OUT/base_test_eval.json ]] || $PY -m mio_jax.evaluate --model=smollm2 \
      "${BASE_FLAGS[@]}" --out="$OUT/base_test_eval.json"
  [[ -f $OUT/base_test_eval_sampled.json ]] || $PY -m mio_jax.evaluate --model=smollm2 \
      "${SAMPLED[@]}" --out="$OUT/base_test_eval_sampled.json"
fi
if [[ $STEP == all || $STEP == report ]]; then
  mkdir -p "$DOCS"
  RUNS=()
  for table in preference sft; do
    for cell in $($PY -c "import json,sys; print(' '.join(c['cell'] for c in json.load(open(sys.argv[1]))['chosen'].values()))" "$OUT/runs/$table.json"); do
      RUNS+=("--runs=$OUT/runs/$cell")
    done
  done
  $PY -m mio_jax.compare "${RUNS[@]}" --eval=test_eval.json --base="$OUT/base_test_eval.json" \
      --baseline=base --out="$DOCS/greedy_vs_base.json" | tee "$DOCS/greedy_vs_base.txt"
  $PY -m mio_jax.compare "${RUNS[@]}" --eval=test_eval_sampled.json \
      --base="$OUT/base_test_eval_sampled.json" --baseline=base \
      --out="$DOCS/sampled_vs_base.json" | tee "$DOCS/sampled_vs_base.txt"
  $PY -m mio_jax.compare "${RUNS[@]}" --eval=test_eval.json --baseline=dpo \
      --out="$DOCS/greedy_vs_dpo.json" | tee "$DOCS/greedy_vs_dpo.txt"
fi
