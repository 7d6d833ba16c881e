#!/usr/bin/env bash
# Study A (docs/results/study_a/protocol.md): the pair set, the equal-beta arms, the tuned-beta
# selection, every run at 4 seeds, the report. Resumable: rerun the same command after a stop
# (finished pieces are kept, an interrupted run resumes from its checkpoints).
#   bash launch/study_a.sh            # everything
#   STEP=pairs|equal|tuned|report bash launch/study_a.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-workdirs/study_a}
DATA=docs/results/study_a/data
STEP=${STEP:-all}
TASK_CONFIG='{"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}'
# the test split's evaluation of each chosen run (secondary outcome)
TEST=(--task=basic_arithmetic "--task_config=$TASK_CONFIG" --test_examples=300
      --max_new_tokens=96 --test_seeds=0,1,2,3)
mkdir -p "$OUT"

if [[ $STEP == all || $STEP == pairs ]] && [[ ! -f $DATA/train_pairs.jsonl ]]; then
  $PY -m mio_jax.pairs --tasks=basic_arithmetic "--task_config=$TASK_CONFIG" --num_prompts=100 \
      --seed=0 --num_samples=8 --temperature=0.8 --top_p=0.95 --max_new_tokens=96 \
      --batch_size=16 --mode=length_matched --out="$OUT/pairs_all.jsonl"
  $PY scripts/study_a_split.py "$OUT/pairs_all.jsonl" "$DATA"
fi
if [[ $STEP == all || $STEP == equal ]]; then  # every method at beta 0.1, every seed
  # the confirmatory pair first, then the controls (DPO + NLL, SFT)
  $PY -m mio_jax.sweep --config=configs/study_a.py --methods=mio,dpo \
      --learning_rates=5e-6 --betas=0.1 --select_seeds=0 "${TEST[@]}" --out="$OUT/runs" \
      --table=confirmatory
  $PY -m mio_jax.sweep --config=configs/study_a.py --methods=rpo,sft \
      --learning_rates=5e-6 --betas=0.1 --select_seeds=0 "${TEST[@]}" --out="$OUT/runs" \
      --table=controls
fi
if [[ $STEP == all || $STEP == tuned ]]; then  # MIO and DPO: beta 0.1 or 0.5 on validation
  $PY -m mio_jax.sweep --config=configs/study_a.py --methods=mio,dpo \
      --learning_rates=5e-6 --betas=0.1,0.5 --select_seeds=0 "${TEST[@]}" --out="$OUT/runs" \
      --table=tuned
fi
if [[ $STEP == all || $STEP == report ]]; then
  $PY scripts/study_a_report.py --runs="$OUT/runs" --out=docs/results/study_a
fi
