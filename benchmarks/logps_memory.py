"""Peak memory of value_and_grad: naive full log-softmax vs vocabulary-chunked log-probs.

Prints, for V = 32k, 128k, 256k at fixed B, T, D, XLA's compiled memory analysis
(temp + argument + output - aliased bytes; deterministic, nothing is executed)
of ``jax.value_and_grad`` for:

  logits/naive     loss from logits [B,T,V]: jax.nn.log_softmax in float32 + gather
  logits/chunked   mio_jax.logps.sequence_logps (online logsumexp, custom VJP)
  hidden/naive     hidden [B,T,D] @ out[V,D].T -> float32 logits -> log_softmax
  hidden/chunked   mio_jax.logps.sequence_logps_from_hidden
  hidden/selected  same with max_tokens = the completion tokens (half of T here)

The logits variants take the logits as an argument and return their gradient,
so at least 2 x [B,T,V] is unavoidable for them; the hidden variants show what
the trainer gains by never building logits at all.

    .venv/bin/python benchmarks/logps_memory.py                 # the table
    .venv/bin/python benchmarks/logps_memory.py --rss --vocab 32768   # + measured host RSS

``--rss`` runs each case once in a fresh subprocess and reports its peak
resident memory (ru_maxrss), which includes the process baseline (~0.3 GB).
"""

import argparse
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp

from mio_jax import logps as L

CASES = ("logits/naive", "logits/chunked", "hidden/naive", "hidden/chunked", "hidden/selected")


def _naive(logits_btv, targets_bt, mask_bt):
    lsm = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(lsm, targets_bt[..., None], axis=-1)[..., 0]
    return (picked * mask_bt).sum(-1)


def build(case, b, t, d, v, chunk, dtype):
    """Returns (function, example arguments as ShapeDtypeStructs) for one case."""
    mask = jnp.zeros((b, t), jnp.float32).at[:, t // 2:].set(1.0)  # completion = second half
    targets = jax.ShapeDtypeStruct((b, t), jnp.int32)
    kind, variant = case.split("/")
    if kind == "logits":
        args = (jax.ShapeDtypeStruct((b, t, v), dtype), targets)
        if variant == "naive":
            loss = lambda x, tg: _naive(x, tg, mask).sum()  # noqa: E731
        else:
            loss = lambda x, tg: L.sequence_logps(x, tg, mask, chunk_size=chunk).sum()  # noqa: E731
        return jax.value_and_grad(loss), args
    args = (jax.ShapeDtypeStruct((b, t, d), dtype), jax.ShapeDtypeStruct((v, d), dtype), targets)
    if variant == "naive":
        def loss(h, w, tg):
            logits = jnp.matmul(h, w.T, preferred_element_type=jnp.float32)
            return _naive(logits, tg, mask).sum()
    else:
        max_tokens = b * (t - t // 2) if variant == "selected" else None

        def loss(h, w, tg):
            return L.sequence_logps_from_hidden(h, w, tg, mask, chunk_size=chunk,
                                                max_tokens=max_tokens, validate=False).sum()
    return jax.value_and_grad(loss, argnums=(0, 1)), args


def compiled_bytes(case, b, t, d, v, chunk, dtype):
    fn, args = build(case, b, t, d, v, chunk, dtype)
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def run_once(case, b, t, d, v, chunk, dtype):
    """Executes one case on zeros/ones and prints this process's peak RSS in bytes."""
    fn, specs = build(case, b, t, d, v, chunk, dtype)
    args = [jnp.zeros(s.shape, s.dtype) for s in specs]
    jax.block_until_ready(jax.jit(fn)(*args))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def measured_rss(case, a):
    cmd = [sys.executable, __file__, "--one", case, "--batch", str(a.batch), "--seq", str(a.seq),
           "--dim", str(a.dim), "--chunk", str(a.chunk), "--dtype", a.dtype, "--vocab", str(a.vocab[0])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--chunk", type=int, default=L.DEFAULT_CHUNK_SIZE)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072, 262144])
    p.add_argument("--rss", action="store_true", help="also execute each case and measure peak RSS")
    p.add_argument("--one", choices=CASES, help=argparse.SUPPRESS)
    a = p.parse_args()
    dtype = jnp.dtype(a.dtype)
    if a.one:
        run_once(a.one, a.batch, a.seq, a.dim, a.vocab[0], a.chunk, dtype)
        return

    gib = 2.0 ** 30
    print(f"value_and_grad peak bytes (XLA memory analysis, {jax.devices()[0].platform}); "
          f"B={a.batch} T={a.seq} D={a.dim} dtype={a.dtype} chunk={a.chunk}")
    head = f"{'V':>7} | " + " | ".join(f"{c:>15}" for c in CASES) + " | logits n/c | hidden n/c | hidden n/sel"
    print(head)
    print("-" * len(head))
    for v in a.vocab:
        got = {c: compiled_bytes(c, a.batch, a.seq, a.dim, v, a.chunk, dtype) for c in CASES}
        cells = " | ".join(f"{got[c] / gib:>11.3f} GiB" for c in CASES)
        print(f"{v:>7} | {cells} | {got['logits/naive'] / got['logits/chunked']:>10.2f} | "
              f"{got['hidden/naive'] / got['hidden/chunked']:>10.2f} | "
              f"{got['hidden/naive'] / got['hidden/selected']:>12.2f}")
        if a.rss:
            sub = argparse.Namespace(**{**vars(a), "vocab": [v]})
            rss = {c: measured_rss(c, sub) for c in CASES}
            print(f"{'  RSS':>7} | " + " | ".join(f"{rss[c] / gib:>11.3f} GiB" for c in CASES))


if __name__ == "__main__":
    main()
