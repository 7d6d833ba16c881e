"""Where the time of one SmolLM2 MIO step goes: a timer breakdown plus a jax.profiler trace.

Breakdown (each piece jitted on its own, all run alternating in one process, medians):
  trunk_fwd     decoder forward to the final hidden states  ``[B*2, L, D]``
  policy_fwd    trunk + chunked output projection + log-softmax -> ``[B, 2]`` log-probs
  loss_fwd_bwd  ``value_and_grad`` of the step's weighted loss sum (policy_logps +
                ``losses.compute_group``, precomputed reference; no metrics)
  adamw         the optimizer update alone (on gradient-shaped arrays)
  step_precomp  the trainer's whole step, precomputed reference
  step_frozen   the trainer's whole step, frozen reference (one more forward)
Then one whole step (frozen) is traced with ``jax.profiler.trace`` into a temp dir and the
events are summed by name (the top ones printed): the XLA CPU client threads' on CPU, the
device's kernels on a GPU.

  python benchmarks/profile_step.py --pairs=2 --seq_len=128
  # GPU: a Llama-3.2-1B-shaped random model in bfloat16 with cuDNN attention
  python benchmarks/profile_step.py --model=llama1b --pairs=2 --seq_len=1024 \
      --dtype=bfloat16 --attention=cudnn
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import tempfile
import time

if __package__:  # python -m benchmarks.profile_step
    from . import _common
else:  # python benchmarks/profile_step.py (this folder is sys.path[0])
    import _common


_KINDS = (  # (kind, substrings of a device kernel's name), first match wins
    ("attention (fused)", ("sdpa", "fmha", "flash", "cudnn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "__dot", "dot_")),
    ("copy / memset", ("memcpy", "memset", "copy")),
    ("reduction fusion", ("input_", "reduce", "scatter")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in _KINDS:
        if any(k in low for k in keys):
            return kind
    return "elementwise / other"


def trace_events(trace_dir: str, device_only: bool = False) -> list[tuple[str, str, float]]:
    """``(line, event name, ms)`` of every event in a trace: every non-Python line of
    the host threads, or only the planes of accelerator devices. A device plane has
    one line per stream (its kernels) beside the "XLA Modules" / "XLA Ops" lines that
    span the same time, so a sum must pick one kind of line."""
    import jax

    out = []
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in jax.profiler.ProfileData.from_file(path).planes:
            if device_only and not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                if line.name == "python":
                    continue
                for ev in line.events:
                    if ev.duration_ns > 0 and not ev.name.startswith(("end: ", "ThunkExecutor")):
                        out.append((line.name, ev.name, ev.duration_ns / 1e6))
    return out


def trace_summary(trace_dir: str, top: int = 15,
                  device_only: bool = False) -> list[tuple[str, float, int]]:
    """``(event name, total ms, count)`` by total: the host threads' events, or on a
    device its kernels (the stream lines) only."""
    totals, counts = collections.Counter(), collections.Counter()
    for line, name, ms in trace_events(trace_dir, device_only):
        if device_only and not line.startswith("Stream"):
            continue
        totals[name] += ms
        counts[name] += 1
    return [(n, t, counts[n]) for n, t in totals.most_common(top)]


def device_breakdown(trace_dir: str) -> dict:
    """Device kernel time by kind (``kernel_kind``), the busy total, and the time of the
    XLA module executions that the kernels belong to."""
    kinds, busy, modules = collections.Counter(), 0.0, 0.0
    for line, name, ms in trace_events(trace_dir, device_only=True):
        if line.startswith("Stream"):
            kinds[kernel_kind(name)] += ms
            busy += ms
        elif line == "XLA Modules":
            modules += ms
    return {"kernels_ms": busy, "modules_ms": modules, "by_kind_ms": dict(kinds.most_common())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    _common.add_model_args(p, model="smollm2", pairs=2, seq_len=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--attention", default="xla", help="xla | cudnn")
    p.add_argument("--layers", default="scan", help="scan | unroll")
    p.add_argument("--top", type=int, default=15, help="events listed from the trace")
    p.add_argument("--hlo", default="", help="write the optimised HLO of the frozen step "
                   "here (gzip; maps the trace's fusion names to their computations)")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mio_jax import losses
    from mio_jax.models import frozen
    from mio_jax import train_step as ts

    print(f"machine: {_common.machine()}", flush=True)
    graphdef, params, other, mcfg = _common.build_model(
        a.model, dtype=a.dtype, param_dtype=a.param_dtype, attention=a.attention,
        scan_layers=a.layers == "scan")
    # Everything committed to one device, so that no step sees its inputs change from
    # uncommitted to committed between calls (that retraces and recompiles in a timed round).
    dev = jax.devices()[0]
    params, other = jax.device_put(params, dev), jax.device_put(other, dev)
    batch = jax.device_put(_common.synthetic_pairs(a.pairs, a.seq_len, 0.5, mcfg.vocab_size), dev)
    cfg_f = ts.StepConfig(loss_name="mio", beta=0.1, chunk_size=8192, lengths=False)
    cfg_p = ts.StepConfig(loss_name="mio", beta=0.1, chunk_size=8192, lengths=False,
                          reference="precomputed")
    tx = optax.adamw(1e-6)
    ref = frozen.frozen_params(params, a.dtype)  # as train.py

    def trunk(params):
        m = nnx.merge(graphdef, params, other)
        b, k, l = batch.input_ids.shape
        return m.hidden_states(batch.input_ids.reshape(b * k, l),
                               attention_mask=batch.attention_mask.reshape(b * k, l),
                               positions=batch.positions.reshape(b * k, l))

    pol = jax.jit(lambda prm: ts.policy_logps(graphdef, prm, other, batch, cfg_f).logps)
    bp = batch.replace(ref_logps=pol(ref))

    def loss_sum(prm):  # the step's weighted loss sum, precomputed reference (no metrics)
        seq = ts.policy_logps(graphdef, prm, other, bp, cfg_p).logps
        losses_b, _ = losses.compute_group(cfg_p.loss_name, policy_logps=seq,
                                           ref_logps=bp.ref_logps, beta=cfg_p.beta,
                                           valid=bp.valid)
        return jnp.sum(bp.weights * losses_b)

    grad_fn = jax.jit(jax.value_and_grad(loss_sum))
    grads = grad_fn(params)[1]
    # The update and the steps donate their state, as the trainer does: without it every
    # call writes a fresh copy of the weights and Adam moments (on a CPU, fresh pages).
    # The Adam inputs are committed like the others (uncommitted, the update recompiled
    # in its first timed round, once its donated outputs came back committed).
    live = {"adam": jax.device_put((jax.tree.map(jnp.copy, params), tx.init(params)), dev),
            "state": _common.init_state(params, tx)}
    upd = jax.jit(lambda g, prm, s: (lambda u, s2: (optax.apply_updates(prm, u), s2))(
        *tx.update(g, s, prm)), donate_argnums=(1, 2))
    step_p = _common.jit_train_step(graphdef, tx, cfg_p, 1e-6)
    step_f = _common.jit_train_step(graphdef, tx, cfg_f, 1e-6)
    consts_p, consts_f = ts.StepConsts(other), ts.StepConsts(other, ref)

    def run_adam():
        live["adam"] = upd(grads, *live["adam"])
        return live["adam"]

    def run_step(fn, *args):
        live["state"], metrics = fn(live["state"], *args)
        return metrics

    trunk_jit = jax.jit(trunk)
    pieces = {
        "trunk_fwd": lambda: trunk_jit(params),
        "policy_fwd": lambda: pol(params),
        "loss_fwd_bwd": lambda: grad_fn(params),
        "adamw": run_adam,
        "step_precomp": lambda: run_step(step_p, bp, consts_p),
        "step_frozen": lambda: run_step(step_f, batch, consts_f),
    }
    times = {k: [] for k in pieces}
    for r in range(a.rounds + 1):
        names = list(pieces)
        names = names[r % len(names):] + names[:r % len(names)]
        for k in names:
            t0 = time.perf_counter()
            jax.block_until_ready(pieces[k]())
            if r:
                times[k].append(time.perf_counter() - t0)
    med = {k: _common.median(v) for k, v in times.items()}
    rows = [{"piece": k, "median ms": 1e3 * v, "share of step_frozen": v / med["step_frozen"]}
            for k, v in med.items()]
    print(f"\n{a.model}, {a.pairs} pairs x {a.seq_len} tokens, {a.dtype} compute, "
          f"attention {a.attention}, {a.rounds} rounds\n")
    _common.print_table(rows, ["piece", "median ms", "share of step_frozen"])

    if a.hlo:
        import gzip

        with gzip.open(a.hlo, "wt", encoding="utf-8") as f:
            f.write(step_f.lower(live["state"], batch, consts_f).compile().as_text())
    tdir = tempfile.mkdtemp(prefix="mio_jax_trace_")
    with jax.profiler.trace(tdir):
        t0 = time.perf_counter()
        jax.block_until_ready((run_step(step_f, batch, consts_f), live["state"]))
        traced_ms = 1e3 * (time.perf_counter() - t0)
    on_device = jax.devices()[0].platform != "cpu"
    top = trace_summary(tdir, top=a.top, device_only=on_device)
    kinds = device_breakdown(tdir) if on_device else None
    if kinds:
        print(f"\ntraced frozen step: {traced_ms:.1f} ms wall, XLA module time "
              f"{kinds['modules_ms']:.1f} ms, kernels busy {kinds['kernels_ms']:.1f} ms; by kind:\n")
        _common.print_table([{"kind": k, "ms": v, "share of kernel time": v / kinds["kernels_ms"]}
                             for k, v in kinds["by_kind_ms"].items()],
                            ["kind", "ms", "share of kernel time"])
    where = "device kernels" if on_device else "XLA CPU threads"
    print(f"\ntrace of one frozen-reference step ({tdir}); top events of the {where}:\n")
    _common.print_table([{"event": n, "total ms": t, "count": c} for n, t, c in top],
                        ["event", "total ms", "count"])
    _common.dump_json(a.json, {"machine": _common.machine(), "rows": rows, "trace_top": top,
                               "device_kinds": kinds, "times": times})


if __name__ == "__main__":
    main()
