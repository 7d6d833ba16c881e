#!/usr/bin/env bash
# The GPU check of the train step, prepared to run in one go on a single H100/H200
# (every part: about 12 minutes, and up to 5 for the rollouts): cuDNN attention ==
# written-out attention, then the train-step benchmark in bfloat16 compute (float32 master
# weights and Adam) for a Llama-3.2-1B-shaped model and the SmolLM2-135M shape (random
# weights; speed does not depend on their values), then RL rollouts of the embedded model.
# Logs and JSON go to $OUT (default: docs/benchmarks/YYYY-MM-DD/gpu,
# today's dated folder; see docs/benchmarks/README.md).
#
#   bash benchmarks/gpu_check.sh            # every part
#   bash benchmarks/gpu_check.sh attention llama1b_8x1024   # some parts
# Parts: attention llama1b llama1b_4x1024 llama1b_8x1024 profile headline8 chunks8 sweep8
# layers8 notriton8 smollm2 gemma3_1b moe rollouts (each writes a .log, most also a .json).
#
# Where mio_jax's dependencies are not installed (a bare accelerator image), put their
# wheels in .whl/ first; they are installed into /tmp/site without touching the system.
# Where mio_jax itself is not installed, this checkout is put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/benchmarks/$(date +%F)/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  rm -rf /tmp/site
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
if ! $PY -P -c "import importlib.util as u, sys; sys.exit(u.find_spec('mio_jax') is None)"; then
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
  --format=csv,noheader | tee "$OUT/machine.txt"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/machine.txt"

want() { [ -z "$PARTS" ] || [[ " $PARTS " == *" $1 "* ]]; }
PARTS="$*"
FAILED=""
# part NAME LOG SECONDS SCRIPT ARGS...: when NAME is wanted, runs `$PY SCRIPT ARGS` for at
# most SECONDS, its output also in $OUT/LOG.log; a failing part is reported at the end.
part() {
  local name=$1 log=$2 secs=$3
  shift 3
  want "$name" || return 0
  timeout "$secs" $PY "$@" 2>&1 | tee "$OUT/$log.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || FAILED="$FAILED $name(exit $rc)"
}
B=benchmarks/train_step.py
common="--dtype=bfloat16 --param_dtype=float32 --steps=5 --warmup=1"
part attention attention_check 200 benchmarks/attention_check.py --model=smollm2_shape \
  --pairs=4 --seq_len=512
# ~1B, 2 pairs x 1024 tokens (4 sequences, 4096 tokens a step): both references,
# written-out vs fused attention.
part llama1b llama1b 150 $B --model=llama1b --pairs=2 --seq_len=1024 $common \
  --reference=frozen,precomputed --attention=xla,cudnn --json="$OUT/llama1b.json"
# ~1B, 4 and 8 pairs x 1024 tokens: fused attention only (the written-out scores of 8
# or 16 sequences do not fit beside the frozen reference without remat).
for P in 4 8; do
  part llama1b_${P}x1024 llama1b_${P}x1024 150 $B --model=llama1b --pairs=$P --seq_len=1024 \
    $common --reference=frozen,precomputed --attention=cudnn --json="$OUT/llama1b_${P}x1024.json"
done
# Where the 1B step's time goes: timer breakdown + device kernels of one traced step, by
# kind (4 pairs: the pieces' extra gradient and Adam copies do not fit beside 8).
part profile profile_llama1b 240 benchmarks/profile_step.py --model=llama1b --pairs=4 \
  --seq_len=1024 --dtype=bfloat16 --param_dtype=float32 --attention=cudnn --rounds=3 --top=30 \
  --hlo="$OUT/profile_llama1b_hlo.txt.gz" --json="$OUT/profile_llama1b.json"
# ~1B, 8 pairs x 1024 tokens: both references x both layouts x both projections.
part headline8 llama1b_8x1024_all 240 $B --model=llama1b --pairs=8 --seq_len=1024 $common \
  --reference=frozen,precomputed --layout=unshared,shared --proj=full,completion \
  --attention=cudnn --json="$OUT/llama1b_8x1024_all.json"
# ~1B, 8 pairs x 1024 tokens, frozen: vocabulary chunk and layer loop.
part chunks8 llama1b_8x1024_chunks 180 $B --model=llama1b --pairs=8 --seq_len=1024 $common \
  --reference=frozen --chunk_size=8192,32768 --layers=scan,unroll --attention=cudnn
# ~1B, 8 pairs x 1024 tokens, frozen reference: what the shared prompt and the
# completion-only projection each give; then lax.scan vs unrolled layers; then the same
# step with XLA's Triton GEMMs off (cuBLAS for every matmul).
part sweep8 llama1b_8x1024_layouts 240 $B --model=llama1b --pairs=8 --seq_len=1024 $common \
  --reference=frozen --layout=unshared,shared --proj=full,completion --attention=cudnn \
  --json="$OUT/llama1b_8x1024_layouts.json"
part layers8 llama1b_8x1024_layers 180 $B --model=llama1b --pairs=8 --seq_len=1024 $common \
  --reference=frozen --layers=scan,unroll --attention=cudnn
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
  part notriton8 llama1b_8x1024_notriton 180 $B --model=llama1b --pairs=8 --seq_len=1024 \
  $common --reference=frozen --layout=unshared,shared --proj=full,completion --attention=cudnn \
  --json="$OUT/llama1b_8x1024_notriton.json"
# SmolLM2-135M shape, 8 pairs x 1024 tokens, fused attention: layouts and projection.
part smollm2 smollm2 120 $B --model=smollm2_shape --pairs=8 --seq_len=1024 $common \
  --reference=precomputed --layout=unshared,shared --proj=full,completion \
  --attention=cudnn --json="$OUT/smollm2.json"
# The new families: Gemma-3-1B's shape (sliding + global layers) with the written-out and
# the fused attention, and a 4-layer, 64-expert Qwen3-MoE (grouped matmuls, dropless).
part gemma3_1b gemma3_1b 200 $B --model=gemma3_1b --pairs=4 --seq_len=1024 $common \
  --reference=precomputed --attention=xla,cudnn --json="$OUT/gemma3_1b.json"
part moe qwen3_moe_4l 200 $B --model=qwen3_moe_4l --pairs=4 --seq_len=1024 $common \
  --reference=precomputed --attention=cudnn --json="$OUT/qwen3_moe_4l.json"
# RL rollouts of the embedded SmolLM2-135M-Instruct (float32 from its GGUF): today's static
# sampler (bisection cut), the static sampler with the candidate cut, and generate_groups,
# G = 8 and 16 answers of 16 prompts (docs/benchmarks/README.md section 8b on the CPU).
part rollouts rollouts 300 benchmarks/generate.py --rollouts=8,16 --prompts=16 \
  --max-new-tokens=96 --repeats=2 --json="$OUT/rollouts.json"
if [ -n "$FAILED" ]; then
  echo "failed parts:$FAILED (logs in $OUT)"
  exit 1
fi
echo "all wanted parts passed (logs in $OUT)"
