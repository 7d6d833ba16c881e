"""Checks model.attention="cudnn" against "xla" on this machine's accelerator.

For one random model shape and a synthetic pair batch (unshared and shared-prompt
layouts), three forwards of the same float32 weights compute the per-sequence log-prob
sums and the gradient of their total: the written-out attention in float32 compute
(the reference), the written-out attention in the low-precision compute dtype, and
cuDNN's fused attention in that dtype. Both low-precision errors against the float32
reference are printed; the check passes when the fused kernel's error is within
``--factor`` times the written-out one's (plus a small floor), so it measures the
kernel, not bfloat16 itself. Exits non-zero on a mismatch. cuDNN's kernel runs only on
NVIDIA GPUs; elsewhere the script says so and exits 0 (``--dry_run`` sends the fused
call, ``jax.nn.dot_product_attention(implementation="cudnn")``, through XLA instead, to
exercise the script off GPU).

  python benchmarks/attention_check.py --model=smollm2_shape --pairs=4 --seq_len=512
"""

from __future__ import annotations

import argparse
import functools
import sys

if __package__:  # python -m benchmarks.attention_check
    from . import _common
else:  # python benchmarks/attention_check.py (this folder is sys.path[0])
    import _common


def _fused_attention_through_xla() -> None:
    """Off GPU: every ``jax.nn.dot_product_attention(implementation="cudnn")`` call (what
    ``model.attention="cudnn"`` runs) goes through XLA instead. mio_jax has no public
    switch for this, so the jax function is wrapped; only ``--dry_run`` does it."""
    import jax

    fused = jax.nn.dot_product_attention

    @functools.wraps(fused)
    def through_xla(*args, implementation=None, **kwargs):
        return fused(*args, implementation="xla" if implementation == "cudnn"
                     else implementation, **kwargs)

    jax.nn.dot_product_attention = through_xla


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    _common.add_model_args(p, model="smollm2_shape", pairs=4, seq_len=512, dtype="bfloat16",
                           param_dtype=False)
    p.add_argument("--factor", type=float, default=2.0)
    p.add_argument("--dry_run", action="store_true",
                   help="off GPU: send the fused call through XLA (checks this script only)")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from mio_jax import train_step
    from mio_jax.data import shared_prompt

    print(f"machine: {_common.machine()}", flush=True)
    if a.dry_run:
        _fused_attention_through_xla()
    elif jax.devices()[0].platform != "gpu":
        print("no GPU here: the cuDNN attention kernel cannot run; nothing checked")
        return 0
    _, params, other, mcfg = _common.build_model(a.model, dtype="float32", param_dtype="float32")
    unshared = _common.synthetic_pairs(a.pairs, a.seq_len, 0.5, mcfg.vocab_size)
    batches = {"unshared": unshared,
               "shared": shared_prompt.to_shared_prompt(unshared, multiple=16)}
    cfg = train_step.StepConfig(loss_name="sft", beta=0.1, reference="none", lengths=False)
    runs = {"float32 xla": ("float32", "xla"), f"{a.dtype} xla": (a.dtype, "xla"),
            f"{a.dtype} cudnn": (a.dtype, "cudnn")}

    def logps_and_grad(graphdef, batch):
        def total(p):
            seq = train_step.policy_logps(graphdef, p, other, batch, cfg).logps
            return seq.sum(), seq
        (_, seq), g = jax.value_and_grad(total, has_aux=True)(params)
        return seq, g

    ok = True
    for lay, batch in batches.items():
        batch = jax.device_put(batch)
        out = {}
        for name, (dtype, att) in runs.items():
            gd = _common.graphdef_for(mcfg, dtype=dtype, attention=att)
            seq, g = jax.jit(functools.partial(logps_and_grad, gd))(batch)
            flat = jnp.concatenate([x.ravel().astype(jnp.float32) for x in jax.tree.leaves(g)])
            out[name] = (np.asarray(seq, np.float64), np.asarray(flat, np.float64))
        ref_seq, ref_g = out["float32 xla"]
        tokens = float(np.sum(np.asarray(unshared.loss_mask) != 0))
        errs = {}
        for name in list(runs)[1:]:
            seq, g = out[name]
            errs[name] = (float(np.sum(np.abs(seq - ref_seq))) / tokens,
                          float(np.linalg.norm(g - ref_g) / np.linalg.norm(ref_g)))
        (x_lp, x_g), (c_lp, c_g) = errs[f"{a.dtype} xla"], errs[f"{a.dtype} cudnn"]
        good = c_lp <= a.factor * x_lp + 1e-3 and c_g <= a.factor * x_g + 1e-3
        ok &= good
        print(f"{lay}: mean |logp error| per completion token vs float32: written-out "
              f"{x_lp:.3g}, cudnn {c_lp:.3g}; relative gradient error: written-out {x_g:.3g}, "
              f"cudnn {c_g:.3g} (mean logp per token {ref_seq.sum() / tokens:.3g}) -> "
              f"{'OK' if good else 'MISMATCH'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
