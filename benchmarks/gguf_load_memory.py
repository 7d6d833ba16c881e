"""Peak host memory of loading the embedded SmolLM2 GGUF with `mio_jax.models.load_pretrained`.

Each measurement runs in a fresh Python process (so earlier allocations do not count)
on the CPU backend with one device. The child imports mio_jax from the given source
root, records `ru_maxrss` once the imports are done (the baseline), loads the
embedded SmolLM2-135M-Instruct Q4_1 GGUF in float32, waits for every parameter, and
records `ru_maxrss` again. Memory does not depend on machine load, so this can run
while other work shares the CPUs.

    .venv/bin/python benchmarks/gguf_load_memory.py                   # the current code
    .venv/bin/python benchmarks/gguf_load_memory.py /tmp/before .      # two roots side by side

A source root is a folder holding a `mio_jax/` package. The "before" figure in the
weights-table change was measured from the committed code exported without touching
the working tree:

    mkdir -p /tmp/before && git archive HEAD mio_jax | tar -x -C /tmp/before
    .venv/bin/python benchmarks/gguf_load_memory.py /tmp/before .

(the child runs with its working directory and PYTHONPATH set to the root, which take
precedence over the editable install of the venv; the printed `module` column shows
which copy was measured).

"load MiB" is the growth over the baseline: the parameters themselves ("params MiB",
float32) plus whatever the loader holds at its worst moment, plus jaxlib code pages
and heap that the first compilations touch. On 2026-11 (jax 0.10.2, 2 shared cores):
before 1327 MiB peak / 1148 MiB growth (every dequantised tensor held in a dict while
the parameters were built), after 884 / 704 (513 MiB of parameters; after loading,
anonymous memory is the parameters + ~25 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = r"""
import json, resource, time
import jax
import mio_jax
from mio_jax import models
from mio_jax.models.embedded import smollm2_gguf_path

path = smollm2_gguf_path()
base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
model = models.load_pretrained(path, dtype="float32")
from flax import nnx
leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
jax.block_until_ready(leaves)
seconds = time.perf_counter() - t0
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"module": mio_jax.__file__, "baseline_kb": base_kb, "peak_kb": peak_kb,
                  "param_bytes": sum(x.nbytes for x in leaves), "seconds": seconds}))
"""


def measure(root: str) -> dict:
    """Runs one load of the embedded GGUF in a fresh process importing mio_jax from `root`.

    Args:
      root: folder that contains the `mio_jax` package to measure.

    Returns:
      `{"module", "baseline_kb", "peak_kb", "param_bytes", "seconds"}` (ru_maxrss in KiB).
    """
    root = os.path.abspath(root)
    if not os.path.isdir(os.path.join(root, "mio_jax")):
        raise SystemExit(f"{root}: no mio_jax/ package here")
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device: the plain, unsharded load
    out = subprocess.run([sys.executable, "-c", _CHILD], cwd=root, env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="*", default=["."],
                        help="source roots to measure (default: this checkout)")
    args = parser.parse_args(argv)
    rows = [(root, measure(root)) for root in args.roots]
    mib = 1024.0
    print(f"{'root':<28} {'baseline MiB':>12} {'peak MiB':>9} {'load MiB':>9} "
          f"{'params MiB':>10} {'load s':>7}  module")
    for root, r in rows:
        print(f"{root:<28} {r['baseline_kb'] / mib:12.0f} {r['peak_kb'] / mib:9.0f} "
              f"{(r['peak_kb'] - r['baseline_kb']) / mib:9.0f} "
              f"{r['param_bytes'] / 2**20:10.0f} {r['seconds']:7.1f}  {r['module']}")
    if len(rows) == 2:
        (_, a), (_, b) = rows
        grow = lambda r: r["peak_kb"] - r["baseline_kb"]  # noqa: E731
        print(f"peak ratio (second / first): {b['peak_kb'] / a['peak_kb']:.2f}; "
              f"growth over baseline: {grow(b) / grow(a):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
