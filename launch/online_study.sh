#!/usr/bin/env bash
# Issue 16: online MIO vs online DPO (beta_DPO = beta_MIO / 2) vs DPO + NLL (rpo) on the
# embedded SmolLM2-135M-Instruct, several seeds each, every run `configs/online.py:<method>`
# (rounds of sample -> verify -> pair -> train with the policy itself), then the report into
# docs/results/online/.
#
#   launch/online_study.sh                 # every run, then the report
#   METHODS="mio dpo" SEEDS="0 1" launch/online_study.sh
#   launch/online_study.sh report          # the report alone, from the runs on disk
#
# Runs go to $STUDY_OUT/<method>_seed<k> (default workdirs/online_study, git-ignored); a run
# that stopped resumes where it stopped (rerun the same command). EVAL_N held-out problems
# per evaluation (default 300: Wilson intervals of about +-5 points), ROUNDS rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=.venv/bin/python
OUT=${STUDY_OUT:-workdirs/online_study}
METHODS=${METHODS:-"mio dpo rpo"}
SEEDS=${SEEDS:-"0 1 2"}
EVAL_N=${EVAL_N:-300}
ROUNDS=${ROUNDS:-6}
STAGES=${*:-runs report}
mkdir -p "$OUT"
if [[ " $STAGES " == *" runs "* ]]; then
  for m in $METHODS; do
    for s in $SEEDS; do
      start=$(date +%s)
      $PY -m mio_jax.main --config="configs/online.py:$m" --workdir="$OUT/${m}_seed$s" \
        --config.seed="$s" --config.online.rounds="$ROUNDS" \
        --config.eval.reasoning_examples="$EVAL_N" --config.log.progress_bar=False
      printf '%s_seed%s\t%s\n' "$m" "$s" "$(( $(date +%s) - start ))" >> "$OUT/wall_times.tsv"
    done
  done
fi
if [[ " $STAGES " == *" report "* ]]; then
  $PY launch/online_report.py --runs="$OUT" --out=docs/results/online
fi
