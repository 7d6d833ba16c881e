"""Weights that never update (a frozen reference, a LoRA run's base), kept in the compute
dtype: the model casts every weight to it before use, so nothing changes but the memory."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def frozen_dtype(param_dtype, compute_dtype):
    """The dtype the frozen reference stores a weight of ``param_dtype`` in: the compute
    dtype where it is a narrower float, else unchanged."""
    p, c = jnp.dtype(param_dtype), jnp.dtype(compute_dtype)
    if jnp.issubdtype(p, jnp.floating) and jnp.issubdtype(c, jnp.floating) and c.itemsize < p.itemsize:
        return c
    return p


def frozen_params(params: Any, compute_dtype) -> Any:
    """The frozen reference's weights: ``params`` cast to ``frozen_dtype`` (same shardings).

    The model casts every weight to the compute dtype before using it, so reference
    log-probs from these are bit-identical to those from ``params``; with float32 master
    weights and bfloat16 compute they take half the memory and no per-step cast.
    Where nothing narrows (float32 compute), ``params`` is returned as it is.
    """
    leaves = jax.tree.leaves(params)
    if all(frozen_dtype(x.dtype, compute_dtype) == x.dtype for x in leaves):
        return params
    shardings = jax.tree.map(lambda x: x.sharding, params)
    cast = jax.jit(lambda tree: jax.tree.map(
        lambda x: x.astype(frozen_dtype(x.dtype, compute_dtype)), tree), out_shardings=shardings)
    return cast(params)
