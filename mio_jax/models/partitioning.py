"""Logical axis names -> mesh axes: the rule table and two small helpers.

Parameters carry logical names in their `out_sharding` metadata (flax.nnx), activations
are constrained by name inside the forward pass. A rule maps one logical name to a mesh
axis, a tuple of mesh axes, or None (replicated). Rules naming axes the current mesh lacks,
or that do not divide the dimension, fall back to replication for that dimension.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, Any]]

# FSDP over the model width, tensor parallelism over heads / MLP / vocabulary, batch over
# data x fsdp. "layers" (the scanned stack axis) stays unsharded.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
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


def logical_to_spec(names: Sequence[str | None], rules: Rules | None, mesh=None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
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
    return PartitionSpec(*out)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules | None) -> jax.Array:
    """Applies `with_sharding_constraint` by logical names under `jax.set_mesh`; else no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(names, rules, mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def variable_names(variable) -> tuple[str | None, ...] | None:
    """The logical names stored on an nnx Variable (its `out_sharding` metadata), or None."""
    meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    names = meta.get("out_sharding")
    return tuple(names) if names is not None else None


def state_shardings(state, mesh, rules: Rules | None = None):
    """NamedShardings for an (abstract) nnx State, from each Variable's logical names.

    Args:
      state: nnx.State (values may be ShapeDtypeStruct).
      mesh: jax.sharding.Mesh.
      rules: logical rules; None -> DEFAULT_RULES.
    Returns:
      A State of the same structure whose leaves are NamedSharding.
    """
    from flax import nnx

    def one(var):
        names = variable_names(var)
        shape = var.get_value().shape
        spec = (logical_to_spec(names, rules, mesh, shape) if names is not None
                else PartitionSpec())
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
