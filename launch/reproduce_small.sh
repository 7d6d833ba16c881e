#!/usr/bin/env bash
# Issue 6: small-scale reproduction of MIO vs DPO on the embedded default (SmolLM2-135M-Instruct,
# on-policy pairs on easy reasoning-gym arithmetic), about an hour on 2 CPU cores.
#
#   launch/reproduce_small.sh                       # every stage
#   launch/reproduce_small.sh train eval report     # resume from a stage (the others' outputs kept)
#
# Stages: pairs (sample + verify on-policy K-way rows), base_eval (held-out accuracy of the
# untrained model), methods (for each method of configs/reproduce_small.py:METHODS: train, then
# held-out accuracy; the same as the stages train and eval but method by method, so a run cut
# short keeps whole methods), long (the methods of $LONG_METHODS trained for $LONG_STEPS steps
# instead of 30 with each seed of $LONG_SEEDS, into runs/<method>_long[_seed<s>], then evaluated), seeds (the methods of $SEED_METHODS
# again with each data-order seed of $EXTRA_SEEDS, into runs/<method>_seed<s>, then evaluated),
# report (figures, results table and metrics into docs/results/small).
# Work files go to $REPRO_OUT (default workdirs/reproduce_small, git-ignored); only small outputs
# are copied to docs/results/small. METHODS="mio dpo" limits the methods; EVAL_N sets the held-out
# problems per task; LONG_STEPS / LONG_METHODS / LONG_SEEDS set the long stage, EXTRA_SEEDS="1 2" and
# SEED_METHODS="mio dpo" the seeds stage.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=.venv/bin/python
OUT=${REPRO_OUT:-workdirs/reproduce_small}
RESULTS=docs/results/small
METHODS=${METHODS:-"mio dpo rpo js_multi infonce"}
EVAL_N=${EVAL_N:-50}
EXTRA_SEEDS=${EXTRA_SEEDS:-"1"}
SEED_METHODS=${SEED_METHODS:-"mio dpo"}
LONG_STEPS=${LONG_STEPS:-60}
LONG_METHODS=${LONG_METHODS:-"mio dpo"}
LONG_SEEDS=${LONG_SEEDS:-"0 1"}
GROUPS_FILE=$OUT/pairs/groups.jsonl.gz
STAGES=${*:-pairs base_eval methods long seeds report}
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
    --num_examples="$EVAL_N" --seed=0 --max_new_tokens=80 --batch_size="$EVAL_N" --out="$OUT/eval/$1.json"
}

train() {  # train METHOD [NAME [FLAGS...]]: workdir runs/NAME (default METHOD)
  local method=$1 name=${2:-$1}
  shift; shift || true
  rm -rf "$OUT/runs/$name"
  timed "train_$name" $PY -m mio_jax.main --config="configs/reproduce_small.py:$method" \
    --workdir="$OUT/runs/$name" --config.data.train_path="$GROUPS_FILE" \
    --config.data.eval_path="$GROUPS_FILE" "$@"
  rm -rf "$OUT/runs/$name/checkpoints" "$OUT/runs/$name/reference_cache"  # 1.4 GB; keep the export
}

for stage in $STAGES; do
  echo "=== stage $stage ($(date -u +%H:%M:%S))"
  case $stage in
    pairs)
      timed pairs $PY -m mio_jax.pairs --config=configs/reproduce_pairs.py --out="$GROUPS_FILE" ;;
    base_eval)
      evaluate base "$($PY -c 'from mio_jax.models import smollm2_gguf_path; print(smollm2_gguf_path())')" ;;
    train)
      for m in $METHODS; do train "$m"; done ;;
    methods)
      for m in $METHODS; do train "$m"; evaluate "$m" "$OUT/runs/$m/hf_export"; done ;;
    seeds)
      for s in $EXTRA_SEEDS; do for m in $SEED_METHODS; do
        train "$m" "${m}_seed$s" --config.seed="$s"; evaluate "${m}_seed$s" "$OUT/runs/${m}_seed$s/hf_export"
      done; done ;;
    long)
      for s in $LONG_SEEDS; do for m in $LONG_METHODS; do
        name=${m}_long; [ "$s" = 0 ] || name=${m}_long_seed$s
        train "$m" "$name" --config.train.steps="$LONG_STEPS" --config.seed="$s"
        evaluate "$name" "$OUT/runs/$name/hf_export"
      done; done ;;
    eval)
      for m in $METHODS; do evaluate "$m" "$OUT/runs/$m/hf_export"; done ;;
    report)
      $PY scripts/reproduce_small_report.py --out_dir="$OUT" --results="$RESULTS" --methods="$METHODS" ;;
    *) echo "unknown stage $stage (pairs base_eval methods long seeds train eval report)" >&2; exit 2 ;;
  esac
done
echo "=== done ($(date -u +%H:%M:%S))"
