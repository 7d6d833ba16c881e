"""Ahead-of-time compilation for real TPU topologies on any machine (this CPU one included).

libtpu carries the TPU compiler; with it, ``jax.experimental.topologies`` describes a slice
(``v5p:4x4x2`` = a v5p-64's 32 chips, ``v5p:2x2x1`` a v5p-8's 4) as compile-only devices,
and a jitted function whose shardings live on a mesh of them compiles with the TPU
compiler: its ``memory_analysis()`` is the chip's own, so a config that does not fit is
caught before a slice is booked. launch/setup.sh installs libtpu into ``.venv/libtpu``,
off the import path (CPU and GPU runs never load it); ``tpu_env()`` is the environment of
a process that uses it. ``benchmarks/aot_memory.py --platform=tpu`` compiles the shipped
paper configs.
"""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# hardware layout of configs/paper.py -> (topology name, topology options, HBM GB per chip)
TPU_TOPOLOGIES = {
    "v5p-64": ("v5p:4x4x2", {}, 95.0),
    "v5p-8": ("v5p:2x2x1", {}, 95.0),  # 4 chips, one host
    "v4-64": ("v4:4x4x2", {"chip_config_name": "megacore"}, 32.0),
    "v6e-32": ("v6e:4x8", {}, 32.0),
}


def libtpu_path() -> str | None:
    """libtpu.so: ``TPU_LIBRARY_PATH``, the copy launch/setup.sh puts in ``.venv/libtpu``, or
    an installed ``libtpu`` package; None when there is none."""
    for path in (os.environ.get("TPU_LIBRARY_PATH", ""),
                 os.path.join(ROOT, ".venv", "libtpu", "libtpu", "libtpu.so")):
        if path and os.path.isfile(path):
            return path
    try:
        import libtpu  # optional: only where jax[tpu] is installed
    except ImportError:
        return None
    return libtpu.get_library_path()


def tpu_env(base=None) -> dict:
    """The environment of a process that compiles for TPU topologies on this machine.

    Raises:
      FileNotFoundError: no libtpu (``bash launch/setup.sh`` installs it).
    """
    path = libtpu_path()
    if path is None:
        raise FileNotFoundError("libtpu not found: `bash launch/setup.sh` installs it into "
                                ".venv/libtpu (or pip install 'jax[tpu]')")
    env = dict(os.environ if base is None else base, TPU_LIBRARY_PATH=path, JAX_PLATFORMS="cpu")
    # Quiets libtpu's search for a TPU VM's metadata at start-up.
    env.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compile-only processes touch no chip: several may run at once (test workers, a
    # benchmark beside them) without libtpu's one-process lockfile refusing the second.
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return env


def topology_devices(hardware: str, **kwargs):
    """Compile-only TPU devices of ``hardware`` (a ``TPU_TOPOLOGIES`` key, or a topology name
    such as ``"v5p:2x2x1"``). Needs a process started with ``tpu_env()``."""
    from jax.experimental import topologies  # after tpu_env() took effect

    name, options, _ = TPU_TOPOLOGIES.get(hardware, (hardware, {}, None))
    return topologies.get_topology_desc(platform="tpu", topology_name=name,
                                        **{**options, **kwargs}).devices


def peak_bytes(compiled) -> int:
    """Per-device peak of a compiled program: arguments + outputs + temporaries - aliased
    (donated inputs alias their outputs)."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
