#!/usr/bin/env bash
# Issue 6: small-scale reproduction of MIO vs DPO on the embedded default (SmolLM2-135M-Instruct,
# on-policy pairs on easy reasoning-gym arithmetic), about an hour on 2 CPU cores.
#
#   launch/reproduce_small.sh                       # every stage
#   launch/reproduce_small.sh train eval report     # resume from a stage (the others' outputs kept)
#
# Stages: pairs (sample + verify on-policy K-way rows), base_eval (held-out accuracy of the
# untrained model), train (each method of configs/reproduce_small.py:METHODS), eval (held-out
# accuracy after each method), report (figures, results table and metrics into docs/results/small).
# Work files go to $REPRO_OUT (default workdirs/reproduce_small, git-ignored); only small outputs
# are copied to docs/results/small. METHODS="mio dpo" limits the methods; EVAL_N sets the held-out
# problems per task.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=.venv/bin/python
OUT=${REPRO_OUT:-workdirs/reproduce_small}
RESULTS=docs/results/small
METHODS=${METHODS:-"mio dpo rpo js_multi infonce"}
EVAL_N=${EVAL_N:-40}
GROUPS_FILE=$OUT/pairs/groups.jsonl.gz
STAGES=${*:-pairs base_eval train eval report}
TASK_CONFIG=$($PY -c 'import json, runpy; print(json.dumps(runpy.run_path("configs/reproduce_pairs.py")["TASK_CONFIG"]))')
TASKS=$($PY -c 'import runpy; print(" ".join("--task=" + t for t in runpy.run_path("configs/reproduce_pairs.py")["TASKS"].split(",")))')
mkdir -p "$OUT/eval" "$OUT/runs" "$RESULTS"

timed() {  # timed NAME CMD...: runs CMD, appends "NAME<TAB>seconds" to $OUT/wall_times.tsv
  local name=$1; shift
  local t0; t0=$(date +%s)
  "$@"
  echo -e "$name\t$(( $(date +%s) - t0 ))" >> "$OUT/wall_times.tsv"
}

evaluate() {  # evaluate NAME MODEL
  timed "eval_$1" $PY -m mio_jax.evaluate --model="$2" $TASKS --task_config="$TASK_CONFIG" \
    --num_examples="$EVAL_N" --seed=0 --max_new_tokens=80 --batch_size=40 --out="$OUT/eval/$1.json"
}

for stage in $STAGES; do
  echo "=== stage $stage ($(date -u +%H:%M:%S))"
  case $stage in
    pairs)
      timed pairs $PY -m mio_jax.pairs --config=configs/reproduce_pairs.py --out="$GROUPS_FILE" ;;
    base_eval)
      evaluate base "$($PY -c 'from mio_jax.models import smollm2_gguf_path; print(smollm2_gguf_path())')" ;;
    train)
      for m in $METHODS; do
        rm -rf "$OUT/runs/$m"
        timed "train_$m" $PY -m mio_jax.main --config="configs/reproduce_small.py:$m" \
          --workdir="$OUT/runs/$m" --config.data.train_path="$GROUPS_FILE" \
          --config.data.eval_path="$GROUPS_FILE"
        rm -rf "$OUT/runs/$m/checkpoints"   # 1.4 GB each; the exported model is kept for eval
      done ;;
    eval)
      for m in $METHODS; do evaluate "$m" "$OUT/runs/$m/hf_export"; done ;;
    report)
      $PY launch/reproduce_small_report.py --out_dir="$OUT" --results="$RESULTS" --methods="$METHODS" ;;
    *) echo "unknown stage $stage (pairs base_eval train eval report)" >&2; exit 2 ;;
  esac
done
echo "=== done ($(date -u +%H:%M:%S))"
