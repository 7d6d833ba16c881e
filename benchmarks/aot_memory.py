"""Per-device memory of the REAL train step at 7-8B scale, compiled ahead of time.

The trainer's own step (``mio_jax.train_step.train_step``, jitted with the state and
batch shardings ``mio_jax.train`` uses, state donated) is lowered with abstract,
shape-only inputs (``jax.ShapeDtypeStruct`` carrying NamedShardings: nothing is
allocated) and compiled for a simulated mesh of N CPU devices
(``--xla_force_host_platform_device_count=N``; one subprocess per N since the device
count is fixed when JAX starts). ``compiled.memory_analysis()`` gives the per-device
argument, output, temporary and aliased bytes; the peak estimate is
``arguments + outputs + temporaries - aliased`` (donated state aliases its output).

Settings are those of ``configs/paper.py``: bfloat16 compute, float32 master weights
and Adam state, the layout's remat policy, scanned layers (compile
time O(1) in depth), vocabulary chunk 8192, the config's sequence length, mesh
``(data=1, fsdp=N, tensor=1)``, and the per-device micro-batch of the paper configs
(``batch_size / (fsdp * grad_accum_steps)`` of the named hardware layout, e.g. h100x8:
128 pairs / 8 GPUs / 16 micro-batches = 1 pair), whatever N the mesh is simulated at.

``--modes`` picks the tuning (``configs/paper.py:MODEL,mio,HARDWARE[,lora|qlora]``):

- ``full``: every weight trains (128 pairs x 2048 tokens a step). The frozen reference
  keeps a second copy of the weights in the bfloat16 compute dtype
  (``mio_jax.models.frozen.frozen_params``, sharded like the params); the precomputed
  reference keeps none.
- ``lora``: the trainable state is the adapters alone (rank 16, alpha 32, all seven linear
  rows; float32, Adam moments float32); the frozen base is abstract bfloat16 arrays in
  ``StepConsts.other``, sharded by their logical axes. Reference ``frozen`` is ``base``
  (the same base with the adapters off, no second copy) or ``precomputed``. 8 pairs x
  1024 tokens a step on the LoRA layouts h100x1, h200x1, v5p-8.
- ``qlora``: as lora, with the base's seven linear rows stored as NF4
  ``quant.QuantizedWeight``s (blocks of 64, float32 scales) and the embeddings, norms and
  output matrix in bfloat16; also on gpu24gb.

Rows report the trainable parameters, the stored bytes per weight (the float32 masters in
full mode, the frozen base with LoRA), the peak against the device memory of the layout
(``HARDWARE[...]["device_gb"]`` in configs/paper.py) and whether it fits. A combination
configs/paper.py refuses (e.g. full fine-tuning on gpu24gb) shows as an error row.

``--platform=cpu`` (the default) is XLA:CPU's buffer assignment for the SPMD-partitioned
program, a stand-in: GPU and TPU compilers fuse and schedule differently. XLA:CPU widens
bfloat16 dots to float32 and, left alone, hoists that widening of the layer-stacked
weights out of the scanned layer loop: a float32 copy of every bfloat16 weight, which
GPU and TPU compiles never make (33 GB more on one device for a bf16 Llama-3-8B LoRA
base). The CPU compiles therefore run with ``--cpu_xla_flags`` (default: loop-invariant
code motion off). With it the v5p-8 LoRA row matches libtpu's own figure (31.0 vs 30.9
GB), QLoRA comes to 30.6 vs 28.6 (XLA:CPU leaves the NF4 code book's broadcasts
unfused) and v5p-64 full fine-tuning to 40.4 GB against the TPU compiler's 43.5 (61.5
without the flag); ``--cpu_xla_flags=`` restores XLA:CPU's own pipeline, which the
2026-11-27 tables used.
``--platform=tpu`` compiles for the hardware's REAL topology with libtpu's TPU compiler on
this machine (``mio_jax.aot``: v5p-64 = ``v5p:4x4x2``, v5p-8 = ``v5p:2x2x1``, v4-64 =
``v4:4x4x2`` megacore, v6e-32 = ``v6e:4x8``; launch/setup.sh installs libtpu into
.venv/libtpu), so its figures are the chips' own memory analysis. GPU layouts have no
such compiler here: their rows are CPU stand-ins (compiled with the written-out attention;
the GPU configs run cuDNN's, which stores less).

  D=docs/benchmarks/$(date +%F)  # results live in dated folders (docs/benchmarks/README.md)
  python benchmarks/aot_memory.py --runs=h100x8@8,v5p-64@64,v5p-64@256,v4-64@32 \\
      --out=$D/aot_memory.md --json=$D/aot_memory.json
  python benchmarks/aot_memory.py --platform=tpu --runs=v5p-64,v4-64,v6e-32 \\
      --out=$D/aot_memory_tpu.md --json=$D/aot_memory_tpu.json
  # LoRA / QLoRA at 8 pairs x 1024 tokens (one device each; v5p-8 on 4)
  python benchmarks/aot_memory.py --runs=h100x1,h200x1,gpu24gb,v5p-8 --modes=lora,qlora \\
      --references=frozen,precomputed --out=$D/aot_memory_lora.md --json=$D/aot_memory_lora.json
  python benchmarks/aot_memory.py --platform=tpu --runs=v5p-8 --modes=lora,qlora \\
      --references=frozen,precomputed --out=$D/aot_memory_lora_tpu.md \\
      --json=$D/aot_memory_lora_tpu.json
  # smoke test: one model, one reference, one mesh (seconds)
  python benchmarks/aot_memory.py --runs=h100x8@8 --models=llama3_8b --references=precomputed
  python benchmarks/aot_memory.py --runs=h100x1@1 --models=llama3_8b --modes=lora,qlora \\
      --references=base
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

from mio_jax import aot

if __package__:  # python -m benchmarks.aot_memory
    from . import _common
else:  # python benchmarks/aot_memory.py (this folder is sys.path[0])
    import _common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAPER_CONFIG = os.path.join(ROOT, "configs", "paper.py")

# Hugging Face config.json fields of the paper-scale models (public configs).
HF_CONFIGS = {
    "llama3_8b": {  # meta-llama/Meta-Llama-3-8B-Instruct
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128009},
    "mistral_7b": {  # mistralai/Mistral-7B-Instruct-v0.2
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2},
    "qwen2.5_7b": {  # Qwen/Qwen2.5-7B-Instruct
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
        "use_sliding_window": False, "sliding_window": 131072, "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151645},
    "gemma3_12b": {  # google/gemma-3-12b-it, its text_config (transformers 4 layout)
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": 262208, "hidden_size": 3840, "intermediate_size": 15360,
        "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 256, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 1024,
        "sliding_window_pattern": 6, "max_position_embeddings": 131072,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": [1, 106]},
    "gemma3_27b": {  # google/gemma-3-27b-it, its text_config (transformers 4 layout)
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": 262208, "hidden_size": 5376, "intermediate_size": 21504,
        "num_hidden_layers": 62, "num_attention_heads": 32, "num_key_value_heads": 16,
        "head_dim": 128, "query_pre_attn_scalar": 168, "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 1024,
        "sliding_window_pattern": 6, "max_position_embeddings": 131072,
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": [1, 106]},
    "qwen3_30b_a3b": {  # Qwen/Qwen3-30B-A3B
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
        "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 40960, "use_sliding_window": False,
        "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 151643,
        "eos_token_id": 151645},
}
MODES = ("full", "lora", "qlora")
# XLA:CPU has no bfloat16 dot: it widens bf16 operands to f32, and its loop-invariant code
# motion then hoists the widening of the scanned, layer-stacked weights out of the layer
# loop, i.e. float32 copies of the layer weights that no GPU or TPU compile makes (~33 GB
# for a bf16 8B LoRA base on one device; ~13 GB a device in the h100x8 full rows).
CPU_XLA_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def _abstract_base(o_state, cfg, kind: str, mesh, rules):
    """The frozen LoRA base as abstract arrays, stored as ``lora_decoder.load`` leaves it: every
    weight in the compute dtype, sharded by its logical axes; with ``kind`` int8 / nf4 the
    seven stacked linear rows are ``quant.QuantizedWeight``s of abstract fields (HF layout,
    blocks of ``gcd(in, 64)`` as ``quant.quantize_base`` picks), each field sharded as
    ``quant.place_quantized`` shards the concrete ones."""
    import math

    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from mio_jax.models import frozen
    from mio_jax import sharding as sharding_lib
    from mio_jax.models import lora as lora_lib
    from mio_jax.models import quant
    from mio_jax.models.weights import weight_specs

    specs = sharding_lib.state_partition_specs(o_state, rules, mesh)
    base = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, frozen.frozen_dtype(x.dtype, cfg.dtype),
                                          sharding=NamedSharding(mesh, s)),
        nnx.to_pure_dict(o_state), specs)
    if kind == "none":
        return base
    # Fills quant's cached NF4 code book here, on the host: first built while tracing under
    # a mesh of compile-only TPU devices, qwix's table constant would land on one of them.
    quant.quantize(jax.numpy.ones((1, 64), jax.numpy.float32), kind).dequantize()
    layers = dict(base["layers"])
    for spec in weight_specs(cfg):
        name = spec.path[-1]
        if not spec.stacked or name not in lora_lib.ROW_TO_PEFT:
            continue
        block = math.gcd(spec.hf_shape(cfg)[1], 64)
        qw = jax.eval_shape(lambda w, spec=spec, block=block: quant.quantize(
            jax.vmap(spec.to_hf)(w), kind, block_size=block), layers[name])
        out_group, in_group = spec.hf_axes
        axes = quant.field_logical_axes(qw.kind, out_axis=out_group[0], in_axis=in_group[0],
                                        lead_axes=("layers",))
        layers[name] = qw.replace(fields={
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(
                mesh, sharding_lib.logical_to_spec(axes[k], rules, mesh, v.shape)))
            for k, v in qw.fields.items()})
    return dict(base, layers=layers)


def _stored(tree) -> tuple[int, int]:
    """``(weights, bytes)`` of a pytree of abstract arrays, a quantized weight counted as
    the elements it stands for and the bytes it is stored in."""
    import jax
    import numpy as np

    from mio_jax.models import quant

    n = b = 0
    for x in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, quant.QuantizedWeight)):
        if isinstance(x, quant.QuantizedWeight):
            n, b = n + int(np.prod(x.shape)), b + int(x.nbytes)
        else:
            n, b = n + int(x.size), b + int(x.size) * np.dtype(x.dtype).itemsize
    return n, b


def _compile_one(model: str, hardware: str, n: int, reference: str, remat: str | None,
                 seq_len: int | None, platform: str = "cpu", mode: str = "full",
                 grad_accum: int | None = None, attention: str | None = None) -> dict:
    """Lowers + compiles the step for ``configs/paper.py:model,mio,hardware[,mode]`` on N
    devices (``platform="tpu"``: the hardware's real TPU topology and compiler).

    ``mode`` "full" trains every weight (float32 masters in the state); "lora" / "qlora"
    train the adapters alone (float32, Adam moments float32) over a frozen base in
    ``StepConsts.other`` (bfloat16, or NF4 linear rows), the reference being the base
    ("base") or precomputed."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mio_jax import config as mio_config
    from mio_jax import layouts, models, optim, train, train_step
    from mio_jax.models import frozen
    from mio_jax import sharding as sharding_lib
    from mio_jax.models import lora

    arg = f"{model},mio,{hardware}" + ("" if mode == "full" else f",{mode}")
    c = mio_config.load(f"{PAPER_CONFIG}:{arg}")
    if grad_accum:
        c.train.grad_accum_steps = grad_accum
    if remat:
        c.model.remat_policy = remat
    if attention:
        c.model.attention = attention
    c = mio_config.resolve(c)
    axes = dict(zip(c.mesh.axes, c.mesh.shape))
    ep = axes.get("expert", 1)  # a mixture's expert axis (configs/paper.py:MIXTURES)
    fsdp, accum = axes["fsdp"] * ep, c.train.grad_accum_steps
    micro_pairs = c.train.batch_size // (fsdp * accum)
    if micro_pairs < 1 or c.train.batch_size % (fsdp * accum):
        raise ValueError(f"{c.train.batch_size} pairs a step do not split into {accum} "
                         f"micro-batches over {fsdp} devices")
    L = seq_len or c.data.max_length
    # The step compiles splash attention where it targets TPU chips; cuDNN's fused
    # attention has no compiler here, so GPU rows use the written-out attention.
    compiled_attention = ("splash" if c.model.attention == "splash" and platform == "tpu"
                          else "xla")
    cfg = models.ModelConfig.from_hf(HF_CONFIGS[model], dtype=c.model.dtype,
                                     param_dtype=c.model.param_dtype,
                                     remat_policy=c.model.remat_policy,
                                     scan_layers=c.model.scan_layers,
                                     attention=compiled_attention)
    lora = lora.spec_from_config(c, cfg.num_hidden_layers)
    cfg = dataclasses.replace(cfg, lora=lora)
    rules = sharding_lib.DEFAULT_RULES
    # Built and split before the mesh is set (nnx's abstract init would read the logical
    # axis names as mesh axes inside it).
    abstract_model = nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0), rules=rules))
    trainable = nnx.Param if lora is None else nnx.LoRAParam
    graphdef, p_state, o_state = nnx.split(abstract_model, trainable, ...)
    devices = aot.topology_devices(hardware) if platform == "tpu" else None
    if devices is not None:
        n = len(devices)
    ep = min(ep, n)
    shape = (1, n // ep, 1, ep) if "expert" in axes else (1, n, 1)
    mesh = sharding_lib.make_mesh(shape, c.mesh.axes, devices=devices)
    p_specs = sharding_lib.state_partition_specs(p_state, rules, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                            sharding=NamedSharding(mesh, s)),
                          nnx.to_pure_dict(p_state), p_specs)
    if lora is None:
        other = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                            sharding=NamedSharding(mesh, P())),
                             nnx.to_pure_dict(o_state))
    else:
        other = _abstract_base(o_state, cfg, c.model.lora.quantize, mesh, rules)
    tx, schedule = optim.from_config(c.optim, 1000)
    state_sh = sharding_lib.named(mesh, train_step.state_specs(tx, params, p_specs))
    abstract = jax.eval_shape(lambda p: train_step.init_state(p, tx), params)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, state_sh)
    B = micro_pairs * n * accum
    data_sh = sharding_lib.batch_sharding(mesh)

    def field(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=data_sh)

    batch = layouts.PreferenceBatch(
        **{f: field((B, 2, L), jnp.int32) for f in layouts.TOKEN_FIELDS},
        weights=field((B,), jnp.float32), valid=field((B, 2), jnp.bool_),
        example_id=field((B,), jnp.int32),
        ref_logps=field((B, 2), jnp.float32) if reference == "precomputed" else None)
    ref_params = None
    if reference == "frozen":  # the trainer's frozen reference: compute-dtype weights
        ref_params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, frozen.frozen_dtype(x.dtype, cfg.dtype),
                                           sharding=x.sharding), params)
    consts = train_step.StepConsts(other, ref_params)
    step_cfg = dataclasses.replace(train.step_config(c), reference=reference)
    fn = _common.jit_train_step(
        graphdef, tx, step_cfg, schedule,
        in_shardings=(state_sh, data_sh, jax.tree.map(lambda x: x.sharding, consts)),
        out_shardings=(state_sh, None))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = fn.lower(state, batch, consts).compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    arg_b, out, tmp, alias = (int(getattr(m, f"{k}_size_in_bytes")) for k in
                              ("argument", "output", "temp", "alias"))
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    n_w, b_w = _stored(params if lora is None else other)
    limit = mio_config.load_module(PAPER_CONFIG).HARDWARE[hardware]["device_gb"]
    peak = (arg_b + out + tmp - alias) / 1e9
    return dict(model=model, mode=mode, hardware=hardware, devices=n, reference=reference,
                remat=c.model.remat_policy, attention=compiled_attention, platform=platform,
                device_kind=mesh.devices.flat[0].device_kind, seq_len=L, pairs_per_step=B,
                pairs_per_device_micro=micro_pairs, grad_accum=accum,
                params_b=n_params / 1e9, trainable_params=n_params,
                weights_bytes_per_param=b_w / n_w, weights_gb=b_w / 1e9,
                argument_gb=arg_b / 1e9, output_gb=out / 1e9, temp_gb=tmp / 1e9,
                alias_gb=alias / 1e9, peak_gb=peak, limit_gb=limit, fits=peak <= limit,
                compile_s=compile_s, xla_flags=os.environ.get("XLA_FLAGS", ""))


def _references(mode: str, wanted: str) -> list[str]:
    """The references of ``wanted`` that ``mode`` runs: with LoRA, "frozen" is the base
    with the adapters off ("base"); without, there is no base to fall back to."""
    out = []
    for r in wanted.split(","):
        r = ("base" if r == "frozen" else r) if mode != "full" else r
        if r == "base" and mode == "full":
            print("skipped: reference 'base' needs --modes=lora or qlora", file=sys.stderr)
        elif r not in out:
            out.append(r)
    return out


def _worker(a) -> None:
    for mode in a.modes.split(","):
        for model in a.models.split(","):
            for reference, attention in [(r, t) for r in _references(mode, a.references)
                                         for t in a.attention.split(",")]:
                try:
                    row = _compile_one(model, a.hardware, a.n, reference, a.remat or None,
                                       a.seq_len or None, a.platform, mode,
                                       a.grad_accum or None, attention or None)
                except Exception as e:  # noqa: BLE001 - reported in the table, run goes on
                    row = dict(model=model, mode=mode, hardware=a.hardware, devices=a.n,
                               reference=reference, platform=a.platform,
                               attention=attention or "layout's",
                               error=f"{type(e).__name__}: {str(e)[:500]}")
                print("ROW " + json.dumps(row), flush=True)


def _table(rows) -> str:
    cols = ["model", "mode", "devices", "config", "compiled for", "reference",
            "pairs x tokens/step", "pairs/dev/micro", "accum", "remat", "attention",
            "trainable params",
            "weights B/param", "args GB", "temp GB", "peak GB/device", "device GB", "fits",
            "compile s"]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        head = (f"| {r['model']} | {r.get('mode', 'full')} | {r['devices']} | "
                f"{r['hardware']} |")
        if "error" in r:
            error = r["error"].replace("|", "/")  # a pipe would split the table's cell
            out.append(f"{head} {r.get('platform', 'cpu')} | {r['reference']} | "
                       f"attention {r.get('attention', '?')}: error: {error} |")
            continue
        target = (r.get("device_kind", "") if r.get("platform") == "tpu"
                  else "XLA:CPU stand-in")
        n = r["trainable_params"]
        out.append(f"{head} {target} | {r['reference']} | "
                   f"{r['pairs_per_step']} x {r['seq_len']} | {r['pairs_per_device_micro']} | "
                   f"{r['grad_accum']} | {r['remat']} | {r.get('attention', 'xla')} | "
                   f"{f'{n / 1e9:.2f} B' if n >= 1e9 else f'{n / 1e6:.1f} M'} | "
                   f"{r['weights_bytes_per_param']:.2f} | {r['argument_gb']:.1f} | "
                   f"{r['temp_gb']:.1f} | {r['peak_gb']:.1f} | {r['limit_gb']:.0f} | "
                   f"{'yes' if r['fits'] else 'NO'} | {r['compile_s']:.0f} |")
    return "\n".join(out)


def _layout_devices(hardware: str) -> int:
    """Devices of the configs/paper.py layout ``hardware`` (its mesh's size)."""
    import math

    from mio_jax import config as mio_config

    return math.prod(mio_config.load_module(PAPER_CONFIG).HARDWARE[hardware]["mesh"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", default="h100x8@8,v5p-64@64,v5p-64@256,v4-64@32",
                   help="HARDWARE[@N] list: the configs/paper.py hardware layout (per-device "
                        "micro-batch, accumulation, remat) on a simulated fsdp mesh of N devices "
                        "(default: the layout's own device count)")
    p.add_argument("--modes", default="full",
                   help="comma-separated full | lora | qlora: configs/paper.py's "
                        "MODEL,mio,HARDWARE[,lora|qlora]")
    p.add_argument("--models", default=",".join(HF_CONFIGS))
    p.add_argument("--references", default="frozen,precomputed")
    p.add_argument("--remat", default="", help="override the config's remat policy")
    p.add_argument("--seq_len", type=int, default=0, help="override data.max_length")
    p.add_argument("--grad_accum", type=int, default=0,
                   help="override train.grad_accum_steps (micro-batches a step)")
    p.add_argument("--attention", default="",
                   help="comma-separated model.attention values, one row each (xla, cudnn, "
                        "splash); default: the layout's")
    p.add_argument("--out", default="", help="write the markdown table here (current results: "
                   "docs/benchmarks/YYYY-MM-DD/aot_memory.md)")
    p.add_argument("--json", default="", help="write the rows as JSON here")
    p.add_argument("--timeout", type=int, default=3000, help="seconds per mesh size")
    p.add_argument("--platform", default="cpu", choices=("cpu", "tpu"),
                   help="cpu: N simulated CPU devices stand in for the chips; tpu: the "
                        f"hardware's real topology ({', '.join(aot.TPU_TOPOLOGIES)}) compiled by "
                        "libtpu's TPU compiler on this machine (N is then the chip count)")
    p.add_argument("--cpu_xla_flags", default=CPU_XLA_FLAGS,
                   help="XLA_FLAGS of the --platform=cpu compiles (beside the device count); "
                        "the default keeps XLA:CPU from hoisting float32 copies of bf16 weights "
                        "out of the layer loop; '' restores XLA:CPU's own pipeline")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--hardware", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    bad = [m for m in a.modes.split(",") if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    if a.worker:
        return _worker(a)
    rows = []
    for run in a.runs.split(","):
        hardware, _, n = run.partition("@")
        if a.platform == "tpu":
            n = 0  # the worker counts the topology's chips
            env = aot.tpu_env()
        else:
            n = int(n) if n else _layout_devices(hardware)
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={n} "
                                 f"{a.cpu_xla_flags}")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--n={n}",
               f"--platform={a.platform}",
               f"--hardware={hardware}", f"--models={a.models}",
               f"--references={a.references}", f"--remat={a.remat}", f"--seq_len={a.seq_len}",
               f"--modes={a.modes}", f"--grad_accum={a.grad_accum}",
               f"--attention={a.attention}"]
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
            lines = res.stdout.splitlines()
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            lines = out.splitlines()
            print(f"{run}: timed out after {a.timeout} s", file=sys.stderr)
        got = [json.loads(line[4:]) for line in lines if line.startswith("ROW ")]
        rows += got
        print(f"{run} ({a.platform}): {len(got)} rows in {time.perf_counter() - t0:.0f} s",
              flush=True)
        print(_table(got), flush=True)
    table = _table(rows)
    print("\n" + table)
    if a.out:
        keys = ("runs", "modes", "models", "references", "remat", "seq_len", "grad_accum",
                "attention",
                "platform", "cpu_xla_flags")
        flags = [f"--{k}={shlex.quote(str(getattr(a, k)))}" for k in keys
                 if getattr(a, k) != p.get_default(k)]
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("# AOT per-device memory of the train step (generated)\n\n"
                    f"Command: `python benchmarks/aot_memory.py {' '.join(flags)}`\n\n"
                    + table + "\n")
    _common.dump_json(a.json, rows)


if __name__ == "__main__":
    main()
