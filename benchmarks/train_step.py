"""Times the full DPO/MIO optimizer step of the trainer (``mio_jax.train_step.train_step``).

One step = policy forward + backward on chosen and rejected, the reference forward
(frozen) or precomputed reference log-probs, and the AdamW update, jitted exactly as
``mio_jax.train`` does (state donated). Every variant (the product of --reference,
--layout, --proj, --remat and --attention) runs in ONE process on the same weights and data,
alternating step by step (round-robin, rotated each round), so a shared, noisy
machine slows them alike; medians and ratios to the first variant are printed.

FLOPs are counted as the UNSHARED layout needs, for every variant: policy 6N per
real token of chosen + rejected plus causal attention 6 * layers * d_attn * L, the
frozen reference 2N + 2 * layers * d_attn * L per token when it runs
(``mio_jax.metrics.step_flops``). A layout that does less work (shared prompt,
completion-only projection) therefore shows a higher "effective" FLOP/s and MFU.
MFU is against the measured jax matmul peak of this device in the compute dtype on
CPU, and the vendor dense bf16 peak on GPU/TPU (H100: 989 TFLOP/s); on an accelerator
the measured 8192^3 matmul peak of the same run is printed beside it.

  python benchmarks/train_step.py --model=smollm2 --pairs=2 --seq_len=128 \\
      --reference=frozen,precomputed --layout=unshared,shared --proj=full,completion
  # GRPO rollout groups (DAPO's loss, old-policy table): 4 prompts x 8 answers
  python benchmarks/train_step.py --rollouts=8 --pairs=4 --seq_len=192 --prompt_frac=0.33 \
      --layout=unshared,shared --reference=none
  # GPU (bf16 compute, fp32 master weights), a Llama-3.2-1B-shaped random model:
  python benchmarks/train_step.py --model=llama1b --dtype=bfloat16 --param_dtype=float32 \\
      --pairs=8 --seq_len=1024 --reference=frozen,precomputed --attention=cudnn

A variant that fails to compile or run (e.g. out of device memory) is reported in the
table and the others are still timed; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

if __package__:  # python -m benchmarks.train_step
    from . import _common
else:  # python benchmarks/train_step.py (this folder is sys.path[0])
    import _common


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    _common.add_model_args(p, model="smollm2", pairs=2, seq_len=128)
    p.add_argument("--prompt_frac", type=float, default=0.5)
    p.add_argument("--rollouts", type=int, default=0, help="G > 0: time a GRPO step (DAPO's "
                   "loss) on --pairs prompts with G answers each, answer lengths spread over "
                   "1/4 .. 1 of the completion budget, instead of a preference step")
    p.add_argument("--loss", default="mio")
    p.add_argument("--reference", default="frozen", help="comma list: frozen,precomputed,none")
    p.add_argument("--layout", default="unshared", help="comma list: unshared,shared")
    p.add_argument("--proj", default="full", help="comma list: full,completion "
                   "(output projection on every position / on completion positions only)")
    p.add_argument("--remat", default="none", help="comma list of remat policies")
    p.add_argument("--attention", default="xla", help="comma list: xla,cudnn (model attention)")
    p.add_argument("--layers", default="scan", help="comma list: scan,unroll (lax.scan over "
                   "the layer stack, or one traced block per layer)")
    p.add_argument("--chunk_size", default="8192", help="comma list: vocabulary rows per "
                   "chunk of the output projection")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    p.add_argument("--json", default="", help="also write the results here")
    return p.parse_args(argv)


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def main(argv=None):
    a = _args(argv)
    import jax
    import numpy as np
    import optax

    from mio_jax import metrics, train_step
    from mio_jax.models import frozen
    from mio_jax.data import shared_prompt

    print(f"machine: {_common.machine()}", flush=True)
    peak0, peak_how = _common.peak_flops(a.dtype)
    remats, attns, loops = a.remat.split(","), a.attention.split(","), a.layers.split(",")
    _, params, other, mcfg = _common.build_model(
        a.model, dtype=a.dtype, param_dtype=a.param_dtype, remat_policy=remats[0],
        attention=attns[0])
    graphdefs = {(r, at, lp): _common.graphdef_for(mcfg, remat_policy=r, attention=at,
                                                    scan_layers=lp == "scan")
                 for r in remats for at in attns for lp in loops}
    fm = metrics.flop_model(mcfg)
    if a.rollouts:
        unshared, shared = _common.synthetic_rollouts(a.pairs, a.rollouts, a.seq_len,
                                                      a.prompt_frac, mcfg.vocab_size)
    else:
        unshared = _common.synthetic_pairs(a.pairs, a.seq_len, a.prompt_frac, mcfg.vocab_size)
        shared = shared_prompt.to_shared_prompt(unshared, multiple=16)
    batches = {"unshared": unshared, "shared": shared}
    tokens = float(np.sum(unshared.attention_mask != 0))
    completion = float(np.sum(unshared.loss_mask != 0))
    print(f"model {a.model}: N={fm.matmul_params / 1e6:.1f}M matmul params, "
          f"{mcfg.num_hidden_layers} layers; batch {a.pairs} pairs x {a.seq_len} tokens, {tokens:.0f} real tokens "
          f"({completion:.0f} completion); shared rows [{a.pairs}, {shared.input_ids.shape[1]}]",
          flush=True)

    tx = optax.adamw(1e-6)
    state = _common.init_state(params, tx)
    ref_params = frozen.frozen_params(params, a.dtype)  # as train.py
    chunks = [int(c) for c in a.chunk_size.split(",")]
    base_cfg = train_step.StepConfig(loss_name=a.loss, beta=0.1, chunk_size=chunks[0],
                                     lengths=False)
    # Precomputed reference log-probs, written-out attention (runs on every backend).
    ref_gd = _common.graphdef_for(mcfg, attention="xla")
    ref_logps = None if a.rollouts else jax.jit(
        lambda rp, o, b: train_step.reference_logps(ref_gd, rp, o, b, base_cfg))(
        ref_params, other, unshared)

    variants = []
    for ref, lay, proj, rem, att, lp, chunk in itertools.product(
            a.reference.split(","), a.layout.split(","), a.proj.split(","), remats, attns, loops,
            chunks):
        cfg = train_step.StepConfig(
            loss_name=a.loss, beta=0.1, chunk_size=chunk, reference=ref, lengths=False,
            max_tokens_fraction=(None if proj == "full"
                                 else _common.completion_fraction(batches[lay])),
            **({"policy_loss": "dapo", "policy_hparams": (("beta", 0.0), ("epsilon", 0.2))}
               if a.rollouts else {}))
        batch = batches[lay]
        if ref == "precomputed" and not a.rollouts:
            batch = batch.replace(ref_logps=ref_logps)
        batch = jax.device_put(batch)
        consts = train_step.StepConsts(other, ref_params if ref == "frozen" else None)
        fn = _common.jit_train_step(graphdefs[rem, att, lp], tx, cfg, 1e-6)
        name = f"ref={ref} layout={lay} proj={proj} remat={rem}" + (
            f" attention={att}" if len(attns) > 1 or att != "xla" else "") + (
            f" layers={lp}" if len(loops) > 1 or lp != "scan" else "") + (
            f" chunk={chunk}" if len(chunks) > 1 else "")
        t0 = time.perf_counter()
        try:
            compiled = fn.lower(state, batch, consts).compile()
        except Exception as e:  # report and go on with the other variants
            error = _first_line(e)
            print(f"{name} failed to compile: {error}", flush=True)
            variants.append(dict(name=name, error=error, times=[]))
            continue
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        flops = metrics.step_flops(fm, tokens=tokens, seq_len=a.seq_len,
                                   reference_runs=ref == "frozen")
        variants.append(dict(name=name, fn=compiled, batch=batch, consts=consts, times=[],
                             compile_s=compile_s, flops=flops,
                             temp_mb=getattr(mem, "temp_size_in_bytes", 0) / 2**20,
                             loss=[]))
        G = 2**30
        print(f"compiled {name} in {compile_s:.1f} s; XLA memory: arguments "
              f"{mem.argument_size_in_bytes / G:.1f} GiB, temporaries {mem.temp_size_in_bytes / G:.1f}"
              f" GiB, outputs {mem.output_size_in_bytes / G:.1f} GiB (aliased "
              f"{mem.alias_size_in_bytes / G:.1f})", flush=True)

    for r in range(a.warmup + a.steps):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            if "error" in v:
                continue
            t0 = time.perf_counter()
            try:
                state, m = v["fn"](state, v["batch"], v["consts"])
                jax.block_until_ready((state, m))
            except Exception as e:  # e.g. out of device memory: report it, time the others
                v["error"] = _first_line(e)
                print(f"{v['name']} failed: {v['error']}", flush=True)
                if any(x.is_deleted() for x in jax.tree.leaves(state)):
                    state = _common.init_state(params, tx)  # the failed call took it
                continue
            dt = time.perf_counter() - t0
            if r >= a.warmup:
                v["times"].append(dt)
            v["loss"].append(float(m["loss"]))
            if not np.isfinite(v["loss"][-1]):  # a wrong step must not be timed as a fast one
                v["error"] = f"non-finite loss {v['loss'][-1]} at round {r}"
                print(f"{v['name']} failed: {v['error']}", flush=True)
    peak1, _ = _common.peak_flops(a.dtype)
    peak = float(np.median([peak0, peak1]))
    on_cpu = jax.devices()[0].platform == "cpu"
    measured = peak if on_cpu else _common.matmul_peak_flops(n=8192, dtype=a.dtype)

    rows = []
    base = _common.median(variants[0]["times"])
    for v in variants:
        if "error" in v:
            rows.append({"variant": v["name"], "step_s (median)": v["error"]})
            continue
        t = _common.median(v["times"])
        rows.append({
            "variant": v["name"], "step_s (median)": t, "min_s": min(v["times"]),
            "tokens/s": tokens / t, "pairs/s": a.pairs / t,
            "GFLOP/s": v["flops"] / t / 1e9, "MFU": v["flops"] / t / peak,
            "of measured matmul": v["flops"] / t / measured,
            "loss (first, last)": f"{v['loss'][0]:.6g}, {v['loss'][-1]:.6g}",
            "XLA temp MiB": v["temp_mb"], "compile_s": v["compile_s"],
            "speed-up vs first": base / t,
        })
    print(f"\npeak: {peak / 1e9:.1f} GFLOP/s ({peak_how}; median of before/after "
          f"{peak0 / 1e9:.1f}, {peak1 / 1e9:.1f})"
          + ("" if on_cpu else f"; measured {a.dtype} 8192^3 matmul: {measured / 1e9:.1f} GFLOP/s"))
    per_ref = {v["name"].split()[0]: v["flops"] / 1e9 for v in variants if "flops" in v}
    print("FLOPs per step counted for the unshared layout: "
          + ", ".join(f"{k}: {f:.1f} GFLOP" for k, f in per_ref.items()))
    print(f"timed steps per variant: {a.steps} (after {a.warmup} warm-up), alternating\n")
    _common.print_table(rows, ["variant", "step_s (median)", "min_s", "tokens/s", "pairs/s",
                               "GFLOP/s", "MFU"] + ([] if on_cpu else ["of measured matmul"])
                      + ["loss (first, last)"]
                      + ["XLA temp MiB", "speed-up vs first"])
    dev_peak = _common.device_peak_bytes()
    print(f"\npeak host RSS of this process: {_common.host_peak_rss_bytes() / 2**30:.2f} GiB"
          + (f"; device peak bytes in use: {dev_peak / 2**30:.2f} GiB" if dev_peak else ""))
    _common.dump_json(a.json, {"args": vars(a), "machine": _common.machine(), "peak_flops": peak,
                               "measured_matmul_flops": measured,
                               "peak_how": peak_how, "rows": rows,
                               "times": {v["name"]: v["times"] for v in variants},
                               "errors": {v["name"]: v["error"] for v in variants if "error" in v}})
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(isinstance(r["step_s (median)"], str) for r in main()) else 0)
