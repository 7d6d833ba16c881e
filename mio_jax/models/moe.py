"""The mixture-of-experts MLP (Qwen3-MoE, Mixtral): top-k routing, dropless grouped
matmuls, and the router statistics that the metrics and the optional auxiliary losses read.

Every token goes to its `k` experts of highest router probability; nothing is dropped
(no capacity factor). The `N * k` (token, expert) assignments are sorted by expert, each
expert's rows multiplied by its weights in one grouped matmul (`jax.lax.ragged_dot`, the
dropless form that XLA lowers to a grouped GEMM on GPU and TPU), and the outputs put back
in (token, slot) order and summed with the routing weights.

Routing follows transformers: router logits in the compute dtype, softmax in float32,
top-k of the probabilities, renormalised over the chosen experts when `norm_topk_prob`
(Mixtral always; Qwen3-MoE per its config), the weights cast to the compute dtype.

Expert parallelism (a mesh with an `expert` axis of size EP > 1): inside `jax.shard_map`,
each device gathers the tokens of its EP peers (all-gather over `expert`), computes the
assignments that go to its own E / EP experts (the others' rows are left out of the
grouped matmuls), and hands every peer back the sum for its tokens (reduce-scatter over
`expert`); each expert's width stays split over `tensor` (a psum after the down
projection) and its input width is gathered over `fsdp` as FSDP gathers every weight.
A device so holds EP x its tokens, never the global batch (which GSPMD's own partitioning
of the grouped matmul would gather), and still drops nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mio_jax.sharding import BATCH_AXES



class RouterStats(NamedTuple):
    """One layer's (or a sum over layers') routing, over the tokens that count.

    Attributes:
      tokens: float32 scalar, tokens routed (weighted by the token mask).
      expert_tokens: float32 `[E]`, assignments per expert (each token counts `k` times).
      expert_probs: float32 `[E]`, router probability summed per expert.
      z_sum: float32 scalar, sum over tokens of `logsumexp(router logits) ** 2`.
      computed: float32 scalar, (token, expert) assignments that went through the grouped
        matmuls (weighted like `tokens`): `k * tokens` when none was dropped.
    """

    tokens: jax.Array
    expert_tokens: jax.Array
    expert_probs: jax.Array
    z_sum: jax.Array
    computed: jax.Array


def route(x_nd, router_de, *, k: int, norm_topk_prob: bool):
    """Router logits, probabilities and each token's top-k experts and weights.

    Returns:
      `(logits [N, E] float32, probs [N, E] float32, experts [N, k] int32,
      weights [N, k] in x's dtype)`.
    """
    logits = jnp.einsum("nd,de->ne", x_nd, router_de, preferred_element_type=jnp.float32)
    logits = logits.astype(x_nd.dtype).astype(jnp.float32)  # HF: logits in the model dtype
    probs = jax.nn.softmax(logits, axis=-1)
    top, experts = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return logits, probs, experts.astype(jnp.int32), top.astype(x_nd.dtype)


def moe_mlp(h_btd, router_de, gate_edf, up_edf, down_efd, *, k: int, norm_topk_prob: bool,
            act, token_weight_bt=None):
    """The MoE MLP of one layer (expert-parallel under a mesh with an `expert` axis).

    Args:
      h_btd: normalised hidden states `[B, T, D]`.
      router_de: router `[D, E]`; gate_edf, up_edf: `[E, D, F]`; down_efd: `[E, F, D]`.
      k: experts per token; norm_topk_prob: renormalise the chosen probabilities.
      act: the gate activation, a function (SiLU for both families).
      token_weight_bt: `[B, T]` weight of each token in the router statistics (0 at
        padding); None: every token 1.

    Returns:
      `(out_btd, RouterStats)`.
    """
    B, T, D = h_btd.shape
    E = router_de.shape[-1]
    w = (jnp.ones((B, T), jnp.float32) if token_weight_bt is None
         else token_weight_bt.astype(jnp.float32))
    w = jax.lax.stop_gradient(w)
    kw = dict(k=k, norm_topk_prob=norm_topk_prob, act=act)
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh is None or mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))
    ep = sizes.get("expert", 1)
    rows = tuple(a for a in BATCH_AXES if a in sizes)
    split = 1
    for a in rows:
        split *= sizes[a]
    # The dispatch needs the experts and the rows to split evenly (a decode batch smaller
    # than the mesh's batch split, say, runs GSPMD's partitioning of the same computation).
    if ep <= 1 or E % ep or B % split:
        x = h_btd.reshape(B * T, D)
        out, stats = _local_moe(x, w.reshape(-1), router_de, gate_edf, up_edf, down_efd,
                                first=0, **kw)
        return out.reshape(B, T, D), stats
    tensor = "tensor" if "tensor" in sizes else None
    if tensor and gate_edf.shape[-1] % sizes["tensor"]:
        tensor = None

    def body(h, w, router, gate, up, down):
        b, t, _ = h.shape
        x_all = jax.lax.all_gather(h.reshape(b * t, D), "expert", tiled=True)
        w_all = jax.lax.all_gather(w.reshape(-1), "expert", tiled=True)
        first = jax.lax.axis_index("expert") * (E // ep)
        out, stats = _local_moe(x_all, w_all, router, gate, up, down, first=first, **kw)
        if tensor:
            out = jax.lax.psum(out, tensor)
        out = jax.lax.psum_scatter(out, "expert", tiled=True).reshape(b, t, D)
        # Every device of an expert group saw the group's tokens: count them once; each
        # computed only its own experts' assignments: add those up.
        stats = jax.tree.map(lambda s: jax.lax.psum(s, rows) / ep, stats)._replace(
            computed=jax.lax.psum(stats.computed, rows))
        return out, stats

    act_spec = P(rows, None, None)
    out, stats = jax.shard_map(
        body, in_specs=(act_spec, P(rows, None), P(), P("expert", None, tensor),
                        P("expert", None, tensor), P("expert", tensor, None)),
        out_specs=(act_spec, P()), check_vma=False)(h_btd, w, router_de, gate_edf, up_edf,
                                                     down_efd)
    return out, stats


def _local_moe(x, w, router_de, gate_edf, up_edf, down_efd, *, first, k, norm_topk_prob, act):
    """The MoE MLP of tokens `x [N, D]` (weights `w [N]` in the statistics) over the
    experts `first .. first + len(gate_edf)` of the router's E: the output `[N, D]` holds
    those experts' contributions (all of them when they are all the experts)."""
    n, D = x.shape
    E, local = router_de.shape[-1], gate_edf.shape[0]
    logits, probs, experts, weights = route(x, router_de, k=k, norm_topk_prob=norm_topk_prob)
    flat = experts.reshape(-1) - first  # [N * k], token-major
    mine = (flat >= 0) & (flat < local)
    key = jnp.where(mine, flat, local)  # other devices' experts sort last, outside every group
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=local + 1)[:local].astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)  # the assignments grouped by expert
    gate = jax.lax.ragged_dot(xs, gate_edf, sizes)
    up = jax.lax.ragged_dot(xs, up_edf, sizes)
    ys = jax.lax.ragged_dot(act(gate) * up, down_efd, sizes)  # rows past the groups: 0
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, D)
    out = jnp.einsum("nkd,nk->nd", y, weights * mine.reshape(n, k).astype(weights.dtype))
    one_hot = jax.nn.one_hot(experts, E, dtype=jnp.float32).sum(axis=1)  # [N, E]
    in_groups = jnp.arange(n * k) < jnp.sum(sizes)  # sorted rows the grouped matmuls ran
    row_weight = jnp.take(jnp.repeat(w, k), order)
    stats = RouterStats(
        tokens=jnp.sum(w),
        expert_tokens=jax.lax.stop_gradient(jnp.einsum("n,ne->e", w, one_hot)),
        expert_probs=jnp.einsum("n,ne->e", w, probs),
        z_sum=jnp.sum(w * jnp.square(jax.nn.logsumexp(logits, axis=-1))),
        computed=jax.lax.stop_gradient(jnp.sum(jnp.where(in_groups, row_weight, 0.0))))
    return out, stats


def zero_stats(num_experts: int) -> RouterStats:
    """Statistics of no tokens (a dense model's, or the start of a sum)."""
    z = jnp.zeros((), jnp.float32)
    return RouterStats(z, jnp.zeros((num_experts,), jnp.float32),
                       jnp.zeros((num_experts,), jnp.float32), z, z)


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """Switch Transformer's load-balancing loss as transformers computes it over all
    layers: `E * sum_e f_e P_e`, with `f_e` the assignments to expert e per token and
    `P_e` its mean router probability, both pooled over the layers (`stats` summed over
    the layers: its token count is every layer's tokens)."""
    rows = jnp.maximum(stats.tokens, 1.0)
    num_experts = stats.expert_tokens.shape[-1]
    f = stats.expert_tokens / rows
    p = stats.expert_probs / rows
    return num_experts * jnp.sum(f * p)


def z_loss(stats: RouterStats) -> jax.Array:
    """ST-MoE's router z-loss: mean over tokens (and layers) of `logsumexp(logits)^2`."""
    return stats.z_sum / jnp.maximum(stats.tokens, 1.0)
