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
# per evaluation (default 300: Wilson intervals of about +-5 points), ROUNDS rounds, the
# held-out eval every EVAL_EVERY rounds (default: at the end). The base model's held-out
# eval is the same for every run (greedy, the same problems), so only the first run makes
# it (at its start, copied to $OUT/base_eval.json) and the others skip it. Compiled
# programs are kept in $OUT/jax_cache, so the runs after the first skip most compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || launch/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=.venv/bin/python
OUT=${STUDY_OUT:-workdirs/online_study}
METHODS=${METHODS:-"mio dpo rpo"}
SEEDS=${SEEDS:-"0 1 2"}
EVAL_N=${EVAL_N:-300}
ROUNDS=${ROUNDS:-4}
EVAL_EVERY=${EVAL_EVERY:-$ROUNDS}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$PWD/$OUT/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-1}
STAGES=${*:-runs report}
# The recipe this study ran (configs/online.py has since moved to the published regime):
# 32 prompts x 4 samples per round, 4 steps of 2 rows, learning rate 2e-5, the initial
# model as the reference, gradient-matched betas (DPO's and DPO + NLL's half of MIO's 0.1).
declare -A BETA=([mio]=0.1 [dpo]=0.05 [rpo]=0.05 [js_multi]=0.1 [infonce]=0.05)
STUDY_RECIPE=(--config.online.prompts_per_round=32 --config.online.samples_per_prompt=4
              --config.online.steps_per_round=4 --config.train.batch_size=2
              --config.optim.learning_rate=2e-5 --config.online.reference=initial
              --config.online.sampler=static)
mkdir -p "$OUT"
if [[ " $STAGES " == *" runs "* ]]; then
  for m in $METHODS; do
    for s in $SEEDS; do
      run="$OUT/${m}_seed$s"
      if [ -f "$run/online/round_$(printf %04d $((ROUNDS - 1)))/done.json" ]; then
        continue                         # finished earlier
      fi
      at_start=True
      [ -f "$OUT/base_eval.json" ] && at_start=False
      start=$(date +%s)
      $PY -m mio_jax.main --config="configs/online.py:$m" --workdir="$run" \
        --config.seed="$s" --config.online.rounds="$ROUNDS" \
        --config.online.eval_every_rounds="$EVAL_EVERY" --config.eval.at_start="$at_start" \
        --config.eval.reasoning_examples="$EVAL_N" --config.log.progress_bar=False \
        "${STUDY_RECIPE[@]}" --config.loss.beta="${BETA[$m]}"
      if [ "$at_start" = True ]; then
        cp "$run/reasoning_eval/step_0.json" "$OUT/base_eval.json"
      fi
      printf '%s_seed%s\t%s\n' "$m" "$s" "$(( $(date +%s) - start ))" >> "$OUT/wall_times.tsv"
    done
  done
fi
if [[ " $STAGES " == *" report "* ]]; then
  $PY scripts/online_report.py --runs="$OUT" --out=docs/results/online
fi
