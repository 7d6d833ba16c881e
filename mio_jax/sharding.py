"""Device mesh, logical-axis rules and the shardings of weights, train state and batches.

The one module that maps names to mesh axes. Model weights carry logical axis names
(``out_sharding`` metadata on their ``nnx.Param`` variables, e.g. ``("embed", "mlp")``) and
activations are constrained by name inside the forward pass (``constrain``). A short rule
table maps each logical name to zero, one or several mesh axes; a rule naming an axis the
mesh lacks, or one that does not divide the dimension, falls back to replication for that
dimension. Batches are sharded along their leading (example / row) axis over every
data-parallel mesh axis.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Mesh axes over which examples are split (pure data parallelism and FSDP both
# split the batch; FSDP additionally shards the weights; expert parallelism splits the
# batch outside the experts and a mixture of experts' experts inside).
BATCH_AXES = ("data", "fsdp", "expert")
DEFAULT_AXES = ("data", "fsdp", "tensor")
KNOWN_AXES = ("data", "fsdp", "tensor", "expert")

Rules = Sequence[tuple[str, Any]]

# FSDP over the model width, tensor parallelism over heads / MLP / vocabulary (and each
# expert's width), expert parallelism over a mixture's experts, batch over data x fsdp x
# expert. "layers" (the scanned stack axis) stays unsharded.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("experts", "expert"),
    ("expert_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("seq", None),
    ("cache_seq", None),
)


def mesh_axis_sizes(shape: Sequence[int], axes: Sequence[str],
                    num_devices: int) -> dict[str, int]:
    """Sizes of each mesh axis for ``num_devices`` devices (the one rule for mesh arithmetic).

    Args:
      shape: ``mesh.shape``; at most one entry may be -1 ("all remaining devices").
        Without -1, a product smaller than ``num_devices`` is allowed (a single-process run
        then uses the first devices; ``make_mesh`` refuses it with several processes).
      axes: ``mesh.axes``, distinct names among ``KNOWN_AXES`` (``"expert"``: expert
        parallelism for a mixture of experts), as many as ``shape``.
      num_devices: devices of the run.

    Returns:
      ``{axis: size}`` in ``axes`` order.

    Raises:
      ValueError: naming ``mesh.shape`` / ``mesh.axes`` when they do not fit.
    """
    shape, axes = [int(s) for s in shape], tuple(axes)
    if len(shape) != len(axes) or len(set(axes)) != len(axes):
        raise ValueError(f"mesh.shape={tuple(shape)} and mesh.axes={axes} must have equal "
                         "length and distinct names")
    if not set(axes) <= set(KNOWN_AXES):
        raise ValueError(f"mesh.axes={axes}: only {KNOWN_AXES} are known")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape={tuple(shape)}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape={tuple(shape)}: sizes must be positive (or one -1)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape={tuple(shape)} cannot fill {num_devices} devices "
                             f"({num_devices} is not divisible by {known})")
        shape[shape.index(-1)] = num_devices // known
    elif known > num_devices:
        raise ValueError(f"mesh.shape={tuple(shape)} needs {known} devices, but "
                         f"{num_devices} are available")
    return dict(zip(axes, shape))


def make_mesh(shape: Sequence[int], axes: Sequence[str] = DEFAULT_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a device mesh with classic (Auto) GSPMD axis types.

    Args:
      shape: size of each mesh axis (``mesh_axis_sizes`` rules: one -1 at most,
        meaning "all remaining devices"). Without -1, a mesh smaller than the device
        count uses the first devices (single-process runs only).
      axes: axis names, same length as ``shape``.
      devices: devices to use (default: all of ``jax.devices()``).

    Returns:
      A ``jax.sharding.Mesh``.

    Raises:
      ValueError: naming ``mesh.shape``/``mesh.axes`` when they do not fit.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = tuple(mesh_axis_sizes(shape, axes, len(devices)).values())
    n = math.prod(sizes)
    if n < len(devices):
        if jax.process_count() > 1:
            raise ValueError(f"mesh.shape={tuple(shape)} uses {n} of {len(devices)} devices; "
                             "a multi-process run must use them all (use -1 for one axis)")
        devices = devices[:n]  # e.g. (1, 1, 1) to compare with one device
    return jax.make_mesh(sizes, tuple(axes), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def logical_to_spec(names: Sequence[str | None], rules: Rules | None, mesh=None,
                    shape: Sequence[int] | None = None) -> P:
    """Translates logical axis names to a PartitionSpec.

    Args:
      names: one logical name (or None) per array dimension.
      rules: (logical, mesh axes) pairs; the first match wins. None -> DEFAULT_RULES.
      mesh: a Mesh / AbstractMesh; mesh axes it lacks are dropped. None keeps all.
      shape: the array shape; a mesh axis that does not divide its dimension is dropped.

    Returns:
      PartitionSpec with one entry per dimension; a mesh axis is used at most once.
    """
    table = dict(reversed(list(DEFAULT_RULES if rules is None else rules)))
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh is not None else None
    used: set[str] = set()
    out = []
    for dim, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = []
        size = 1
        for ax in axes:
            if ax in used or (sizes is not None and ax not in sizes):
                continue
            ax_size = sizes[ax] if sizes is not None else 1
            if shape is not None and shape[dim] % (size * ax_size):
                continue
            kept.append(ax)
            size *= ax_size
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules | None) -> jax.Array:
    """``with_sharding_constraint`` by logical names under ``jax.set_mesh``; else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, mesh, x.shape))


def variable_names(variable) -> tuple[str | None, ...] | None:
    """The logical names stored on an nnx Variable (its ``out_sharding`` metadata), or None."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = meta.get("out_sharding")
    return tuple(names) if names is not None else None


def data_parallel_size(mesh: Mesh) -> int:
    """Number of ways the batch is split (product of the batch mesh axes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def _variable_spec(variable, rules: Rules | None, mesh) -> P:
    value = variable.get_value() if hasattr(variable, "get_value") else variable.value
    names = variable_names(variable)
    return P() if names is None else logical_to_spec(names, rules, mesh, np.shape(value))


def state_partition_specs(state: nnx.State, rules: Rules | None = None,
                          mesh: Mesh | None = None) -> Any:
    """PartitionSpecs of an nnx state (concrete or abstract), from each Variable's names.

    Args:
      state: an ``nnx.State`` whose variables carry logical axis names.
      rules: logical -> mesh rule table (None: ``DEFAULT_RULES``).
      mesh: optional mesh for the divisibility check.

    Returns:
      A nested dict shaped like ``nnx.to_pure_dict(state)`` of PartitionSpecs.
    """
    specs = jax.tree.map(lambda v: _variable_spec(v, rules, mesh), state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs) if isinstance(specs, nnx.State) else specs


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
    """NamedShardings of an (abstract) nnx state: the same State with a sharding per leaf."""
    return jax.tree.map(lambda v: NamedSharding(mesh, _variable_spec(v, rules, mesh)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


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
    return optax.tree_map_params(
        tx, lambda _leaf, spec: spec, abstract_opt_state, param_specs,
        transform_non_params=lambda _leaf: P(), is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: its leading (group / row) axis over every batch mesh axis.

    Every field of a typed batch is placed with this spec on its axis 0
    (``mio_jax.data.to_global_arrays``).
    """
    return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def spec_strings(specs: Any) -> dict:
    """Flattens a tree of PartitionSpecs to ``{"a/b/c": "P(...)"}`` for snapshots."""
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {"/".join(_key_str(k) for k in path): str(spec) for path, spec in flat}


def _key_str(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
