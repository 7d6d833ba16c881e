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
time O(1) in depth), vocabulary chunk 8192, sequences of 2048 tokens, mesh
``(data=1, fsdp=N, tensor=1)``, and the per-device micro-batch of the paper configs
(``batch_size / (fsdp * grad_accum_steps)`` of the named hardware layout, e.g. h100x8:
128 pairs / 8 GPUs / 16 micro-batches = 1 pair), whatever N the mesh is simulated at.
The frozen reference keeps a second copy of the weights in the bfloat16 compute dtype
(``mio_jax.reference.frozen_params``, sharded like the params); the precomputed reference
keeps none.

``--platform=cpu`` (the default) is XLA:CPU's buffer assignment for the SPMD-partitioned
program, a stand-in: GPU and TPU compilers fuse and schedule differently.
``--platform=tpu`` compiles for the hardware's REAL topology with libtpu's TPU compiler on
this machine (``mio_jax.aot``: v5p-64 = ``v5p:4x4x2``, v4-64 = ``v4:4x4x2`` megacore,
v6e-32 = ``v6e:4x8``; launch/setup.sh installs libtpu into .venv/libtpu), so its figures
are the chips' own memory analysis.

  D=docs/benchmarks/$(date +%F)   # current results live in dated folders (docs/benchmarks/README.md)
  python benchmarks/aot_memory.py --runs=h100x8@8,v5p-64@64,v5p-64@256,v4-64@32 \\
      --out=$D/aot_memory.md --json=$D/aot_memory.json
  python benchmarks/aot_memory.py --platform=tpu --runs=v5p-64,v4-64,v6e-32 \
      --out=$D/aot_memory_tpu.md --json=$D/aot_memory_tpu.json
  # smoke test: one model, one reference, one mesh (seconds)
  python benchmarks/aot_memory.py --runs=h100x8@8 --models=llama3_8b --references=precomputed
"""

from __future__ import annotations

import argparse
import json
import os
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
}
LIMITS_GB = {"H100 80GB": 80.0, "TPU v5p 95GB": 95.0, "TPU v4 32GB": 32.0}
def _compile_one(model: str, hardware: str, n: int, reference: str, remat: str | None,
                 seq_len: int | None, platform: str = "cpu") -> dict:
    """Lowers + compiles the step for ``configs/paper.py:model,mio,hardware`` on N devices
    (``platform="tpu"``: the hardware's real TPU topology and compiler)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mio_jax import config as mio_config
    from mio_jax import layouts, models, optim, train, train_step
    from mio_jax import reference as reference_lib
    from mio_jax import sharding as sharding_lib

    c = mio_config.resolve(mio_config.load(f"{PAPER_CONFIG}:{model},mio,{hardware}"))
    micro_pairs = c.train.batch_size // (c.mesh.shape[1] * c.train.grad_accum_steps)
    L = seq_len or c.data.max_length
    remat = remat or c.model.remat_policy
    cfg = models.ModelConfig.from_hf(HF_CONFIGS[model], dtype=c.model.dtype,
                                     param_dtype=c.model.param_dtype, remat_policy=remat,
                                     scan_layers=c.model.scan_layers)
    devices = aot.topology_devices(hardware) if platform == "tpu" else None
    if devices is not None:
        n = len(devices)
    mesh = sharding_lib.make_mesh((1, n, 1), c.mesh.axes, devices=devices)
    rules = sharding_lib.DEFAULT_RULES
    abstract_model = nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0), rules=rules))
    graphdef, p_state, o_state = nnx.split(abstract_model, nnx.Param, ...)
    p_specs = sharding_lib.state_partition_specs(p_state, rules, mesh)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                            sharding=NamedSharding(mesh, s)),
                          nnx.to_pure_dict(p_state), p_specs)
    other = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                        sharding=NamedSharding(mesh, P())),
                         nnx.to_pure_dict(o_state))
    tx, schedule = optim.from_config(c.optim, 1000)
    state_sh = sharding_lib.named(mesh, train_step.state_specs(tx, params, p_specs))
    abstract = jax.eval_shape(lambda p: train_step.init_state(p, tx), params)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, state_sh)
    B = micro_pairs * n * c.train.grad_accum_steps
    data_sh = sharding_lib.batch_sharding(mesh)

    def field(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=data_sh)

    batch = layouts.PreferenceBatch(
        **{f: field((B, 2, L), jnp.int32) for f in layouts.TOKEN_FIELDS},
        weights=field((B,), jnp.float32), valid=field((B, 2), jnp.bool_),
        example_id=field((B,), jnp.int32),
        ref_logps=field((B, 2), jnp.float32) if reference == "precomputed" else None)
    ref_params = jax.tree.map(  # the trainer's frozen reference: compute-dtype weights
        lambda x: jax.ShapeDtypeStruct(x.shape, reference_lib.frozen_dtype(x.dtype, cfg.dtype),
                                       sharding=x.sharding), params)
    consts = train_step.StepConsts(other, ref_params if reference == "frozen" else None)
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
    arg, out, tmp, alias = (int(getattr(m, f"{k}_size_in_bytes")) for k in
                            ("argument", "output", "temp", "alias"))
    n_params = sum(int(x.size) for x in jax.tree.leaves(params))
    return dict(model=model, hardware=hardware, devices=n, reference=reference, remat=remat,
                platform=platform, device_kind=mesh.devices.flat[0].device_kind,
                seq_len=L, pairs_per_device_micro=micro_pairs,
                grad_accum=c.train.grad_accum_steps, params_b=n_params / 1e9,
                argument_gb=arg / 1e9, output_gb=out / 1e9, temp_gb=tmp / 1e9,
                alias_gb=alias / 1e9, peak_gb=(arg + out + tmp - alias) / 1e9,
                compile_s=compile_s)


def _worker(a) -> None:
    for model in a.models.split(","):
        for reference in a.references.split(","):
            try:
                row = _compile_one(model, a.hardware, a.n, reference, a.remat or None,
                                   a.seq_len or None, a.platform)
            except Exception as e:  # noqa: BLE001 - reported in the table, run goes on
                row = dict(model=model, hardware=a.hardware, devices=a.n, reference=reference,
                           error=f"{type(e).__name__}: {str(e)[:300]}")
            print("ROW " + json.dumps(row), flush=True)


def _table(rows) -> str:
    cols = ["model", "devices", "config", "compiled for", "reference", "pairs/dev/micro",
            "args GB", "temp GB", "peak GB/device", "fits H100 80GB", "fits v5p 95GB",
            "fits v4/v6e 32GB", "compile s"]
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['devices']} | {r['hardware']} | "
                       f"{r.get('platform', 'cpu')} | {r['reference']} | error: {r['error']} |")
            continue
        fits = ["yes" if r["peak_gb"] <= lim else "NO" for lim in LIMITS_GB.values()]
        target = (r.get("device_kind", "") if r.get("platform") == "tpu"
                  else "XLA:CPU stand-in")
        out.append(f"| {r['model']} | {r['devices']} | {r['hardware']} | {target} | "
                   f"{r['reference']} | {r['pairs_per_device_micro']} | "
                   f"{r['argument_gb']:.1f} | {r['temp_gb']:.1f} | {r['peak_gb']:.1f} | "
                   f"{fits[0]} | {fits[1]} | {fits[2]} | {r['compile_s']:.0f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", default="h100x8@8,v5p-64@64,v5p-64@256,v4-64@32",
                   help="HARDWARE@N list: the configs/paper.py hardware layout (per-device "
                        "micro-batch, accumulation, remat) on a simulated fsdp mesh of N devices")
    p.add_argument("--models", default=",".join(HF_CONFIGS))
    p.add_argument("--references", default="frozen,precomputed")
    p.add_argument("--remat", default="", help="override the config's remat policy")
    p.add_argument("--seq_len", type=int, default=0, help="override data.max_length")
    p.add_argument("--out", default="", help="write the markdown table here (current results: "
                   "docs/benchmarks/YYYY-MM-DD/aot_memory.md)")
    p.add_argument("--json", default="", help="write the rows as JSON here")
    p.add_argument("--timeout", type=int, default=3000, help="seconds per mesh size")
    p.add_argument("--platform", default="cpu", choices=("cpu", "tpu"),
                   help="cpu: N simulated CPU devices stand in for the chips; tpu: the "
                        f"hardware's real topology ({', '.join(aot.TPU_TOPOLOGIES)}) compiled by "
                        "libtpu's TPU compiler on this machine (N is then the chip count)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--hardware", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return _worker(a)
    rows = []
    for run in a.runs.split(","):
        hardware, _, n = run.partition("@")
        if a.platform == "tpu":
            n = 0  # the worker counts the topology's chips
            env = aot.tpu_env()
        else:
            n = int(n)
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--n={n}",
               f"--platform={a.platform}",
               f"--hardware={hardware}", f"--models={a.models}",
               f"--references={a.references}", f"--remat={a.remat}", f"--seq_len={a.seq_len}"]
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
        flags = [f"--{k}={v}" for k, v in (("runs", a.runs), ("models", a.models),
                                            ("references", a.references), ("remat", a.remat),
                                            ("seq_len", a.seq_len), ("platform", a.platform))
                 if v and v != p.get_default(k)]
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w", encoding="utf-8") as f:
            f.write("# AOT per-device memory of the train step (generated)\n\n"
                    f"Command: `python benchmarks/aot_memory.py {' '.join(flags)}`\n\n"
                    + table + "\n")
    _common.dump_json(a.json, rows)


if __name__ == "__main__":
    main()
