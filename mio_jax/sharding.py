"""Device mesh, logical-axis rules and the shardings of train state and batches.

Model weights carry logical axis names (``out_sharding`` metadata on their
``nnx.Param`` variables, e.g. ``("embed", "mlp")``). A short rule table maps
each logical name to zero, one or several mesh axes; this module turns names
into ``PartitionSpec``/``NamedSharding`` objects. Batches are sharded along
their leading (example) axis over every data-parallel mesh axis.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mio_jax.models import partitioning

# Mesh axes over which examples are split (pure data parallelism and FSDP both
# split the batch; FSDP additionally shards the weights).
BATCH_AXES = ("data", "fsdp")
DEFAULT_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, Any]]
DEFAULT_RULES = partitioning.DEFAULT_RULES
logical_to_spec = partitioning.logical_to_spec


def make_mesh(shape: Sequence[int], axes: Sequence[str] = DEFAULT_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a device mesh with classic (Auto) GSPMD axis types.

    Args:
      shape: size of each mesh axis; at most one entry may be -1, meaning
        "all remaining devices". Without -1, a mesh smaller than the device
        count uses the first devices (single-process runs only).
      axes: axis names, same length as ``shape``.
      devices: devices to use (default: all of ``jax.devices()``).

    Returns:
      A ``jax.sharding.Mesh``.

    Raises:
      ValueError: naming ``mesh.shape``/``mesh.axes`` when they do not fit.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape, axes = list(shape), tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"mesh.shape {tuple(shape)} and mesh.axes {axes} differ in length")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape {tuple(shape)}: at most one axis may be -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if known <= 0 or len(devices) % known:
            raise ValueError(f"mesh.shape {tuple(shape)} cannot fill {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if -1 not in shape and math.prod(shape) < len(devices) and jax.process_count() == 1:
        # A smaller explicit mesh (e.g. (1, 1, 1) to compare with one device)
        # uses the first devices; multi-process runs must use them all.
        devices = devices[: math.prod(shape)]
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices, "
            f"but {len(devices)} are available")
    return jax.make_mesh(tuple(shape), axes, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch is split (product of the batch mesh axes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def state_partition_specs(state: nnx.State, rules: Rules, mesh: Mesh | None = None) -> dict:
    """PartitionSpecs for an nnx state (concrete or abstract), as a pure dict.

    Args:
      state: an ``nnx.State`` whose variables carry logical axis names.
      rules: logical -> mesh rule table (None: the models' ``DEFAULT_RULES``).
      mesh: optional mesh for the divisibility check.

    Returns:
      A nested dict shaped like ``nnx.to_pure_dict(state)`` of PartitionSpecs.
    """
    def spec(variable):
        value = variable.get_value() if hasattr(variable, "get_value") else variable.value
        names = partitioning.variable_names(variable)
        if names is None:
            return P()
        return partitioning.logical_to_spec(names, rules, mesh, np.shape(value))

    specs = jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def named(mesh: Mesh, specs: Any) -> Any:
    """Turns a tree of PartitionSpecs into NamedShardings on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def optimizer_state_specs(tx, abstract_opt_state: Any, param_specs: Any) -> Any:
    """PartitionSpecs for an optax state: parameter-shaped leaves follow the params.

    Args:
      tx: the optax GradientTransformation that built the state.
      abstract_opt_state: ``jax.eval_shape(tx.init, params)``.
      param_specs: PartitionSpecs shaped like the params.

    Returns:
      A tree like ``abstract_opt_state`` of PartitionSpecs (scalars replicated).
    """
    import optax  # local: keeps this module importable without optimiser code paths

    return optax.tree_map_params(
        tx, lambda _leaf, spec: spec, abstract_opt_state, param_specs,
        transform_non_params=lambda _leaf: P(), is_leaf=lambda x: isinstance(x, P))


def batch_spec(ndim: int) -> P:
    """Spec of a batch array: leading dimension over every batch mesh axis."""
    return P(BATCH_AXES, *([None] * (ndim - 1))) if ndim else P()


def batch_shardings(mesh: Mesh, batch: Any) -> Any:
    """NamedShardings for every array of a batch pytree (leading axis split)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)

    def one(x):
        nd = np.ndim(x)
        return NamedSharding(mesh, P(axes, *([None] * (nd - 1))) if nd else P())

    return jax.tree.map(one, batch)


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def spec_strings(specs: Any) -> dict:
    """Flattens a tree of PartitionSpecs to ``{"a/b/c": "P(...)"}`` for snapshots."""
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {"/".join(_key_str(k) for k in path): str(spec) for path, spec in flat}


def _key_str(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def check_divisible(name: str, value: int, parts: int) -> None:
    """Raises ValueError naming config key ``name`` if ``value % parts``."""
    if parts and value % parts:
        raise ValueError(f"{name}={value} is not divisible by the data-parallel size {parts}")


__all__: Iterable[str] = [
    "make_mesh", "data_parallel_size", "logical_to_spec", "state_partition_specs", "named",
    "optimizer_state_specs", "batch_spec", "batch_shardings", "replicated", "spec_strings",
    "check_divisible", "BATCH_AXES", "DEFAULT_AXES", "DEFAULT_RULES",
]
