"""Decoder-only transformers of the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3,
SmolLM2) and the Gemma family (Gemma 1, 2, 3 text) in flax.nnx.

Gemma differs by switches of `ModelConfig`: GeGLU, RMSNorm by `1 + w`, norms after the
attention and the MLP as well (Gemma 2/3), scaled embeddings, soft-capped attention scores
and logits (Gemma 2), a query scale of its own, QK-norm (Gemma 3), and sliding-window
layers interleaved with global ones (Gemma 3's with a RoPE base of their own): the masks
and RoPE tables of both kinds are built once per forward and each layer call picks its
kind from a per-layer flag (`_sliding`), so the stack still runs as one `lax.scan`.

The per-layer weights are stored stacked on a leading "layers" axis, so one parameter
layout serves both execution modes: `jax.lax.scan` over the stack (`scan_layers=True`)
or a Python loop that indexes it. Which parameters exist, their shapes, logical axes
and initialisers come from the family's weight table (`mio_jax.models.weights`); the
layout (HF's [out, in] transposed to [in, out]): q `[L, D, H, hd]`, k/v `[L, D, KV, hd]`,
o `[L, H, hd, D]`, gate/up `[L, D, F]`, down `[L, F, D]`, embedding and untied lm_head
`[V, D]`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mio_jax.logps import soft_cap
from mio_jax.models import lora as lora_lib
from mio_jax.models import moe as moe_lib
from mio_jax.models.splash import splash_attention
from mio_jax.models.config import ModelConfig
from mio_jax.sharding import DEFAULT_RULES, Rules, constrain
from mio_jax.models.weights import WeightSpec, axis_sizes, stacked_specs, weight_specs

_NEG = -1e30  # finite, so fully masked (padding) rows give a uniform softmax, not NaN


def _param(rngs: nnx.Rngs, spec: WeightSpec, cfg: ModelConfig) -> nnx.Param:
    """A parameter initialised as its table row says, carrying the row's logical axes."""
    shape, dtype = spec.shape(cfg), cfg.param_dtype
    if spec.init == "ones":
        value = jnp.ones(shape, dtype)
    elif spec.init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        std = 1.0 if spec.init == "unit_normal" else 0.02
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=spec.logical_axes, eager_sharding=False)


class LayerStack(nnx.Module):
    """All decoder layers' weights, stacked on a leading `layers` axis (filled by Decoder)."""

    def __init__(self):
        self.names: tuple[str, ...] = ()

    def arrays(self) -> dict[str, jax.Array]:
        return {n: getattr(self, n).get_value() for n in self.names}


def _rms_norm(x, weight, eps, offset=False):
    """HF RMSNorm: normalise in float32, cast back, then scale by the weight. With
    `offset` (Gemma): scale by `1 + weight` in float32, then cast back."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if offset:
        return (xf * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


# The RMSNorm's float32 intermediates are recomputed in the backward pass from its input
# instead of kept (autodiff would keep a float32 copy of the activations per layer,
# stacked over the layers under lax.scan): memory traffic, not FLOPs.
_rms_norm_bwd_recompute = jax.checkpoint(_rms_norm, static_argnums=(2, 3))


def activation(name: str, x):
    """The MLP's gate activation (`ModelConfig.hidden_act`): SiLU or GELU's tanh form."""
    return jax.nn.silu(x) if name == "silu" else jax.nn.gelu(x, approximate=True)


def _glu_fwd(h_btd, w_gate_df, w_up_df, add_gate, add_up, act):
    gate = jnp.einsum("btd,df->btf", h_btd, w_gate_df)
    up = jnp.einsum("btd,df->btf", h_btd, w_up_df)
    if add_gate is not None:
        gate = gate + add_gate
    if add_up is not None:
        up = up + add_up
    return activation(act, gate) * up, (h_btd, w_gate_df, w_up_df, gate, up, add_gate, add_up)


def swiglu(h_btd, w_gate_df, w_up_df, add_gate, add_up):
    """`gated_mlp` with SiLU (SwiGLU, the Llama family)."""
    return gated_mlp(h_btd, w_gate_df, w_up_df, add_gate, add_up, "silu")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def gated_mlp(h_btd, w_gate_df, w_up_df, add_gate, add_up, act):
    """Gated input of the MLP, `act(h @ W_gate + add_gate) * (h @ W_up + add_up)` (SwiGLU
    with `act="silu"`, GeGLU with "gelu_pytorch_tanh"), with a hand-written backward.

    Autodiff would keep six `[tokens, intermediate]` arrays per layer for this; the
    backward here keeps only the two projections and recomputes the SiLU (elementwise, in
    float32). The weight gradients are taken as `h^T @ d_gate` with `h^T` materialised
    first: left to itself, XLA:CPU transposes both `[tokens, intermediate]` gradients
    instead, in slow loop fusions (14 % of a SmolLM2 step); on a GPU/TPU the transpose of
    the 2.7-4x smaller `h` is a small copy.

    Args:
      h_btd: normalised hidden states `[B, T, D]`.
      w_gate_df, w_up_df: the gate and up projections `[D, F]`.
      add_gate, add_up: terms added to each projection before the gated product: None,
        a bias `[F]`, or per-token `[B, T, F]` (a bias plus a LoRA update).
      act: the gate's activation, "silu" or "gelu_pytorch_tanh".

    Returns:
      act_btf: `[B, T, F]` in the inputs' dtype, the input of the down projection.
    """
    return _glu_fwd(h_btd, w_gate_df, w_up_df, add_gate, add_up, act)[0]


def _sum_to(d_btf, like):
    """The cotangent of an additive term of shape `like` (None, `[F]` or `[B, T, F]`)."""
    if like is None:
        return None
    if like.ndim == 1:
        return d_btf.astype(jnp.float32).sum((0, 1)).astype(like.dtype)
    return d_btf.astype(like.dtype)


def _glu_bwd(act, res, d_act_btf):
    h, w_gate, w_up, gate, up, add_gate, add_up = res
    f32 = jnp.float32
    g, gf, uf = d_act_btf.astype(f32), gate.astype(f32), up.astype(f32)
    if act == "silu":
        sig = jax.nn.sigmoid(gf)
        d_up = (g * gf * sig).astype(up.dtype)
        d_gate = (g * uf * sig * (1.0 + gf * (1.0 - sig))).astype(gate.dtype)
    else:  # the activation and its derivative, elementwise in float32
        a, da = jax.jvp(functools.partial(activation, act), (gf,), (jnp.ones_like(gf),))
        d_up = (g * a).astype(up.dtype)
        d_gate = (g * uf * da).astype(gate.dtype)
    B, T, D = h.shape
    h_t = jax.lax.optimization_barrier(h.reshape(B * T, D).T)
    dg, du = d_gate.reshape(B * T, -1), d_up.reshape(B * T, -1)
    dw_gate = jnp.matmul(h_t, dg).astype(w_gate.dtype)
    dw_up = jnp.matmul(h_t, du).astype(w_up.dtype)
    dh = (jnp.einsum("nf,df->nd", dg, w_gate) + jnp.einsum("nf,df->nd", du, w_up)).reshape(B, T, D)
    return (dh.astype(h.dtype), dw_gate, dw_up, _sum_to(d_gate, add_gate),
            _sum_to(d_up, add_up))


gated_mlp.defvjp(_glu_fwd, _glu_bwd)


def _rope(x_bthk, cos_btk, sin_btk):
    """HF's rotate_half convention: the two halves of head_dim form the complex pairs."""
    half = x_bthk.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthk[..., half:], x_bthk[..., :half]], axis=-1)
    cos, sin = cos_btk[:, :, None, :].astype(x_bthk.dtype), sin_btk[:, :, None, :].astype(x_bthk.dtype)
    return x_bthk * cos + rotated * sin


def rope_tables(cfg: ModelConfig, positions_bt, local: bool = False):
    """cos/sin `[B, T, head_dim]` in float32 for integer positions `[B, T]` (`local`: the
    sliding layers' table, `ModelConfig.rope_inv_freq`)."""
    inv = jnp.asarray(cfg.rope_inv_freq(local), jnp.float32)
    freqs = positions_bt.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


@jax.custom_vjp
def attention_scores(qg_btkgh, k_bskh):
    """Attention scores `q . k` accumulated and returned in float32.

    The backward rounds the float32 score gradient to the operands' (compute) dtype
    before its two matmuls, as fused attention kernels do; left to autodiff, the float32
    cotangent would promote both to float32 matmuls in a bfloat16 step (slow TF32 on a
    GPU, several bf16 passes on a TPU). With float32 operands nothing changes.

    Args:
      qg_btkgh: queries grouped by KV head `[B, T, KV, H // KV, hd]`.
      k_bskh: keys `[B, S, KV, hd]`.

    Returns:
      scores_bkgts: float32 `[B, KV, H // KV, T, S]` (unscaled).
    """
    return jnp.einsum("btkgh,bskh->bkgts", qg_btkgh, k_bskh, preferred_element_type=jnp.float32)


def _attention_scores_fwd(qg_btkgh, k_bskh):
    return attention_scores(qg_btkgh, k_bskh), (qg_btkgh, k_bskh)


def _attention_scores_bwd(res, g_bkgts):
    qg, k = res
    g = g_bkgts.astype(qg.dtype)
    dq = jnp.einsum("bkgts,bskh->btkgh", g, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bkgts,btkgh->bskh", g, qg, preferred_element_type=jnp.float32)
    return dq.astype(qg.dtype), dk.astype(k.dtype)


attention_scores.defvjp(_attention_scores_fwd, _attention_scores_bwd)


def xla_attention(q_bthk, k_bskh, v_bskh, mask_bts, scale=None, softcap=None):
    """Grouped-query attention written out (``model.attention="xla"``): float32 scores,
    masked softmax.

    The backward recomputes the probabilities from the queries and keys (and the softmax's
    row maxima and sums, saved by the forward) instead of keeping the float32
    ``[B, KV, H // KV, T, S]`` probabilities of every layer for it: for a 135M model at 256
    tokens those were a quarter of the train step's saved activations.

    Args:
      q_bthk: queries ``[B, T, H, hd]``; k_bskh, v_bskh: keys and values ``[B, S, KV, hd]``
        (H a multiple of KV).
      mask_bts: bool ``[B, T, S]``, True where query t may attend key s.
      scale: the factor on the scores (default ``hd ** -0.5``).
      softcap: scores become ``softcap * tanh(scores / softcap)`` before the mask
        (Gemma 2's attention-logit soft-capping); None: no cap.

    Returns:
      ``[B, T, H, hd]`` in the queries' dtype.
    """
    B, T, H, hd = q_bthk.shape
    KV = k_bskh.shape[2]
    qg = q_bthk.reshape(B, T, KV, H // KV, hd)
    scale = hd ** -0.5 if scale is None else float(scale)
    out = _grouped_attention(qg, k_bskh, v_bskh, mask_bts, scale,
                             None if not softcap else float(softcap))
    return out.reshape(B, T, H, hd)


def _capped_scores(raw, mask_bts, scale, softcap):
    """Scaled (and soft-capped) float32 scores, masked: `(scores, tanh term or None)`."""
    scores, t = raw * scale, None
    if softcap is not None:
        t = jnp.tanh(scores / softcap)
        scores = t * softcap
    return jnp.where(mask_bts[:, None, None, :, :], scores, _NEG), t


def _softmax_parts(qg, k, mask_bts, scale, softcap):
    """Masked, scaled float32 scores -> (probabilities, row maxima, row sums)."""
    scores, _ = _capped_scores(attention_scores(qg, k), mask_bts, scale, softcap)
    top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    e = jnp.exp(scores - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / total, top, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _grouped_attention(qg, k, v, mask_bts, scale, softcap):
    probs, _, _ = _softmax_parts(qg, k, mask_bts, scale, softcap)
    return jnp.einsum("bkgts,bskh->btkgh", probs.astype(qg.dtype), v)


def _grouped_attention_fwd(qg, k, v, mask_bts, scale, softcap):
    probs, top, total = _softmax_parts(qg, k, mask_bts, scale, softcap)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(qg.dtype), v)
    return out, (qg, k, v, mask_bts, top, total)


def _grouped_attention_bwd(scale, softcap, res, d_out):
    qg, k, v, mask_bts, top, total = res
    scores, t = _capped_scores(attention_scores(qg, k), mask_bts, scale, softcap)
    probs = jnp.exp(scores - top) / total  # the forward's probabilities, recomputed
    p = probs.astype(qg.dtype)
    dv = jnp.einsum("bkgts,btkgh->bskh", p, d_out)
    dp = jnp.einsum("btkgh,bskh->bkgts", d_out, v, preferred_element_type=jnp.float32)
    ds = probs * (dp - jnp.sum(probs * dp, axis=-1, keepdims=True))
    if t is not None:  # through the cap: d(c tanh(s / c)) / ds = 1 - tanh^2
        ds = ds * (1.0 - t * t)
    ds = jnp.where(mask_bts[:, None, None, :, :], ds, 0.0) * scale
    dq, dk = _attention_scores_bwd((qg, k), ds)
    return dq, dk, dv.astype(v.dtype), None


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


def fused_attention(q_bthk, k_bskh, v_bskh, mask_bts, implementation="cudnn", scale=None):
    """cuDNN's fused (flash) attention (``model.attention="cudnn"``): the scores are never
    stored for the backward. Arguments and result as ``xla_attention``.

    `mask_bts` always lies inside the causal triangle (`build_mask` starts from it), so
    `is_causal` lets cuDNN skip the blocks above the diagonal; the mask itself carries
    padding, packing segments and the shared-prompt layout. `implementation="xla"`
    runs the same call through XLA (how the tests check it off GPU). `scale`: as in
    ``xla_attention`` (no soft-capping here: ``ModelConfig`` refuses cudnn with it).
    """
    hd = q_bthk.shape[-1]
    return jax.nn.dot_product_attention(
        q_bthk, k_bskh, v_bskh, mask=mask_bts[:, None, :, :],
        scale=hd ** -0.5 if scale is None else float(scale),
        is_causal=True, implementation=implementation)


def cached_attention(q_bthk, k_bksh, v_bksh, mask_bts, scale=None, softcap=None):
    """Grouped-query attention of new queries over a KV cache (forward only).

    The cache is stored heads-major, `[B, KV, S, hd]`, the layout both matmuls read
    directly: with `[B, S, KV, hd]` XLA transposes the whole cache of every layer on
    every decoded token before the score and value matmuls.

    Args:
      q_bthk: queries `[B, T, H, hd]`.
      k_bksh, v_bksh: this layer's cache `[B, KV, S, hd]`.
      mask_bts: bool `[B, T, S]`, True where query t may attend cache slot s.
      scale, softcap: as in `xla_attention`.

    Returns:
      `[B, T, H, hd]` in the queries' dtype.
    """
    B, T, H, hd = q_bthk.shape
    KV = k_bksh.shape[1]
    f32 = jnp.float32
    qg = q_bthk.reshape(B, T, KV, H // KV, hd)
    raw = jnp.einsum("btkgh,bksh->bkgts", qg, k_bksh, preferred_element_type=f32)
    scores, _ = _capped_scores(raw, mask_bts, hd ** -0.5 if scale is None else float(scale),
                               None if not softcap else float(softcap))
    probs = jax.nn.softmax(scores, axis=-1)
    if T == 1:
        # One query per row: a product and a sum that XLA fuses into one pass over the
        # values, in float32 as they are read. As a matmul, B x KV tiny products that
        # XLA:CPU runs outside its fast kernels, converting a bfloat16 cache to float32
        # (all of it, every layer, every token) first.
        out = jnp.sum(probs[:, :, :, 0, :, None] * v_bksh[:, :, None].astype(f32), axis=-2)
        out = out[:, None].astype(q_bthk.dtype)
    else:
        out = jnp.einsum("bkgts,bksh->btkgh", probs.astype(q_bthk.dtype), v_bksh)
    return out.reshape(B, T, H, hd)


def dense_weight(spec: WeightSpec, cfg: ModelConfig, a, dt):
    """One layer's weight in our layout and the compute dtype; a quantized base weight
    (HF layout, `mio_jax.models.quant`) is dequantized here, one layer at a time."""
    if hasattr(a, "dequantize"):
        return spec.from_hf(a.dequantize(dt), cfg)
    return a.astype(dt)


class _LoraUpdates:
    """The LoRA updates of one layer: `add(row, x)` is `scale * dropout(x) @ A @ B`, or
    None when `row` carries no adapter (or adapters are off)."""

    def __init__(self, cfg: ModelConfig, p, key, enabled: bool):
        self.spec = cfg.lora if enabled else None
        self.p, self.key = p, key
        self.dt = jnp.dtype(cfg.dtype)

    def add(self, row: str, x, n_in: int):
        spec = self.spec
        if spec is None or f"{row}_lora_a" not in self.p:
            return None
        scale = spec.scale
        if spec.partial(row):
            scale = scale * self.p["_lora_mask"][spec.rows.index(row)]
        key = None
        if self.key is not None and spec.dropout > 0:
            key = jax.random.fold_in(self.key, spec.rows.index(row))
        return lora_lib.delta(x, self.p[f"{row}_lora_a"].astype(self.dt),
                              self.p[f"{row}_lora_b"].astype(self.dt), scale, n_in=n_in,
                              dropout=spec.dropout, key=key)


def _plus(y, extra):
    return y if extra is None else y + extra


def _einsum_f32_out(eq, x, w):
    """`einsum` with a float32 result rounded once to `x`'s dtype (forward only: used
    when decoding). With bfloat16 operands a GPU or TPU accumulates in float32 anyway;
    XLA:CPU then runs a bfloat16 matmul (AMX / AVX512-BF16 where present) that at 16-256
    rows is 2.5-6x faster than its bfloat16-out one, and than float32. Float32 operands:
    the plain einsum."""
    return jnp.einsum(eq, x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _block(cfg: ModelConfig, rules, p, x_btd, inputs: "LayerInputs", kv=None, index=None,
           lora: _LoraUpdates | None = None):
    """One decoder layer. `inputs`: the RoPE tables and masks of the forward (this layer
    picks its kind by its `_sliding` flag), the tokens that count in a mixture of experts'
    router statistics, the segments splash attention reads. With `kv=(k_bksh, v_bksh)`
    (this layer's cache) the new keys and values are written at slots index..index+T-1
    and attention runs over the whole cache. `lora` adds the LoRA updates of the rows that
    carry one.

    Returns (x_btd, (k, v), router stats): this call's keys/values `[B, T, KV, hd]`, or
    with `kv` the updated cache; `moe.RouterStats` of this layer (None for a dense MLP).
    """
    dt = jnp.dtype(cfg.dtype)
    specs = stacked_specs(cfg)
    w = {n: dense_weight(specs[n], cfg, a, dt) for n, a in p.items() if n in specs}
    cos, sin, mask_bts = inputs.pick(p.get("_sliding"))
    lora = lora or _LoraUpdates(cfg, p, None, False)
    eps, off = cfg.rms_norm_eps, cfg.norm_weight_offset
    scale, softcap = cfg.attention_scale, cfg.attn_logit_softcapping

    def norm(x, name):
        return _rms_norm_bwd_recompute(x, w[name], eps, off)

    # Training keeps jnp.einsum (its backward's dtypes are chosen in the custom VJPs).
    mm = jnp.einsum if kv is None else _einsum_f32_out
    h = norm(x_btd, "attn_norm")
    q = _plus(mm("btd,dhk->bthk", h, w["q"]), lora.add("q", h, 1))
    k = _plus(mm("btd,dhk->bthk", h, w["k"]), lora.add("k", h, 1))
    v = _plus(mm("btd,dhk->bthk", h, w["v"]), lora.add("v", h, 1))
    if cfg.qkv_bias:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    if cfg.qk_norm:
        q, k = _rms_norm(q, w["q_norm"], eps, off), _rms_norm(k, w["k_norm"], eps, off)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"), rules)
    if kv is not None:
        cache_axes = ("batch", "kv_heads", "cache_seq", "head_dim")
        k = jax.lax.dynamic_update_slice(kv[0], jnp.swapaxes(k, 1, 2).astype(kv[0].dtype),
                                         (0, 0, index, 0))
        v = jax.lax.dynamic_update_slice(kv[1], jnp.swapaxes(v, 1, 2).astype(kv[1].dtype),
                                         (0, 0, index, 0))
        k, v = constrain(k, cache_axes, rules), constrain(v, cache_axes, rules)
        attn = cached_attention(q, k, v, mask_bts, scale, softcap)
    else:
        k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"), rules)
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"), rules)
        if cfg.attention == "cudnn":
            attn = fused_attention(q, k, v, mask_bts, scale=scale)
        elif cfg.attention == "splash" and inputs.segments is not None:
            slides = cfg.sliding_layers()
            attn = splash_attention(
                q, k, v, inputs.segments, scale=scale, softcap=softcap,
                window=cfg.sliding_window if any(slides) else None,
                sliding=p["_sliding"] if cfg.mixed_layers else slides[0], rules=rules)
        else:  # (also splash's fallback: a mask its kernels cannot express)
            attn = xla_attention(q, k, v, mask_bts, scale, softcap)
    out = _plus(mm("bthk,hkd->btd", attn, w["o"]), lora.add("o", attn, 2))
    if cfg.o_bias:
        out = out + w["o_bias"]
    if cfg.sandwich_norms:
        out = norm(out, "attn_post_norm")
    x_btd = constrain(x_btd + out, ("batch", "seq", "embed"), rules)
    h = norm(x_btd, "mlp_norm")
    if cfg.moe:
        down, stats = moe_lib.moe_mlp(
            h, w["router"], w["expert_gate"], w["expert_up"], w["expert_down"],
            k=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
            act=functools.partial(activation, cfg.hidden_act),
            token_weight_bt=inputs.token_weight)
        x_btd = constrain(x_btd + down, ("batch", "seq", "embed"), rules)
        return x_btd, (k, v), stats
    add_gate, add_up = lora.add("gate", h, 1), lora.add("up", h, 1)
    if cfg.mlp_bias:
        add_gate = _plus(w["gate_bias"], add_gate)
        add_up = _plus(w["up_bias"], add_up)
    if kv is None:
        act = gated_mlp(h, w["gate"], w["up"], add_gate, add_up, cfg.hidden_act)
    else:
        gate = _plus(mm("btd,df->btf", h, w["gate"]), add_gate)
        act = activation(cfg.hidden_act, gate) * _plus(mm("btd,df->btf", h, w["up"]), add_up)
    act = constrain(act, ("batch", "seq", "mlp"), rules)
    down = _plus(mm("btf,fd->btd", act, w["down"]), lora.add("down", act, 1))
    if cfg.mlp_bias:
        down = down + w["down_bias"]
    if cfg.sandwich_norms:
        down = norm(down, "mlp_post_norm")
    x_btd = constrain(x_btd + down, ("batch", "seq", "embed"), rules)
    return x_btd, (k, v), None


def _real_tokens(pad_bt, full_bts, segment_ids_bt):
    """`[B, T]` 1 at real tokens, 0 at padding, from whichever mask the batch carries (a
    padding mask; segment ids, 0 = padding; a full mask, whose diagonal is a token seeing
    itself); None when none says."""
    if pad_bt is not None:
        return pad_bt
    if segment_ids_bt is not None:
        return segment_ids_bt != 0
    if full_bts is not None:
        return jnp.diagonal(full_bts, axis1=1, axis2=2)
    return None


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    policies = {
        "full": None,
        "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "dots_with_no_batch_dims_saveable":
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    return jax.checkpoint(fn, policy=policies[policy])


def build_mask(B: int, T: int, S: int, *, q_slots_bt, kv_valid_bs=None, attention_mask=None,
               segment_ids=None, sliding_window=None, causal: bool = True,
               window_positions=None):
    """Boolean `[B, T, S]` attention mask: causal in slot order (unless `causal` is False:
    a one-token step over a ring cache, whose valid keys are all in the past whatever their
    slots), AND every restriction given.

    Args:
      q_slots_bt: int slot of each query in the key axis `[B, T]`.
      kv_valid_bs: `[B, S]` key slot holds a real token.
      attention_mask: `[B, T, T]` boolean (only when S == T).
      segment_ids: `[B, T]` int (only when S == T); 0 = padding.
      sliding_window: keys further back than this many positions are hidden (Mistral,
        Gemma's local layers).
      window_positions: `(q_positions [B, T], k_positions [B, S])`, the positions the
        window is measured in (the shared-prompt layout's completions restart theirs, a
        ring cache holds rows that started at different steps); None: the slots.
    """
    k_slots = jnp.arange(S)[None, None, :]
    q = q_slots_bt[:, :, None]
    mask = k_slots <= q if causal else jnp.ones((1, 1, S), bool)
    if sliding_window is not None:
        if window_positions is None:
            mask &= (q - k_slots) < sliding_window
        else:
            q_pos, k_pos = window_positions
            mask &= (q_pos[:, :, None] - k_pos[:, None, :]) < sliding_window
    if kv_valid_bs is not None:
        mask &= kv_valid_bs[:, None, :].astype(bool)
    if attention_mask is not None:
        mask &= attention_mask.astype(bool)
    if segment_ids is not None:
        mask &= (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
    return jnp.broadcast_to(mask, (B, T, S))


def default_positions(input_ids_bt, attention_mask=None, segment_ids=None):
    """arange, or cumsum of a `[B,T]` padding mask (left padding), or per-segment restarts."""
    B, T = input_ids_bt.shape
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is not None:
        prev = jnp.concatenate([jnp.full((B, 1), -1, segment_ids.dtype), segment_ids[:, :-1]], 1)
        starts = jax.lax.cummax(jnp.where(segment_ids != prev, idx, 0), axis=1)
        return idx - starts
    if attention_mask is not None and attention_mask.ndim == 2:
        return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)
    return idx


class LayerInputs(NamedTuple):
    """What a layer call reads besides its weights: the RoPE tables `[B, T, hd]` and the
    attention mask `[B, T, S]` of the model's layers, and where the model mixes sliding
    and global layers, `local`: the sliding layers' `(cos, sin, mask)` (the others are
    then the global layers')."""

    cos: jax.Array
    sin: jax.Array
    mask: jax.Array
    local: tuple | None = None
    token_weight: jax.Array | None = None  # [B, T] real tokens (MoE router statistics)
    segments: jax.Array | None = None  # [B, T] segment ids for splash attention, 0 = padding

    def pick(self, sliding) -> tuple:
        """`(cos, sin, mask)` of a layer whose `_sliding` flag is `sliding` (a traced
        bool under the layer scan; ignored when the layers do not mix)."""
        if self.local is None:
            return self.cos, self.sin, self.mask
        return tuple(jnp.where(sliding, a, b)
                     for a, b in zip(self.local, (self.cos, self.sin, self.mask)))


class Decoder(nnx.Module):
    """Decoder-only transformer; see the module docstring for the weight layout.

    Args:
      cfg: ModelConfig.
      rngs: nnx.Rngs for random initialisation (weights are normally loaded afterwards).
      rules: logical->mesh rule table for activation constraints (None -> DEFAULT_RULES).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules: Rules | None = None):
        self.cfg = cfg
        self.rules = tuple(DEFAULT_RULES if rules is None else
                           ((k, tuple(v) if isinstance(v, list) else v) for k, v in rules))
        # Every parameter comes from the weight table, in its row order (the order in which
        # the random ones draw from `rngs`).
        self.layers = LayerStack()
        for spec in weight_specs(cfg):
            owner = self.layers if spec.stacked else self
            setattr(owner, spec.path[-1], _param(rngs, spec, cfg))
            if spec.stacked:
                self.layers.names += (spec.path[-1],)
        # LoRA factors (nnx.LoRAParam), drawn after every base weight.
        for name, (a_axes, b_axes), (a_shape, b_shape) in adapter_rows(cfg):
            a, b = lora_lib.init_factors(rngs.params(), a_shape, b_shape, cfg.lora,
                                         cfg.param_dtype)
            setattr(self.layers, f"{name}_lora_a",
                    nnx.LoRAParam(a, out_sharding=a_axes, eager_sharding=False))
            setattr(self.layers, f"{name}_lora_b",
                    nnx.LoRAParam(b, out_sharding=b_axes, eager_sharding=False))
            self.layers.names += (f"{name}_lora_a", f"{name}_lora_b")
        self._adapters_on = True
        self._dropout_key = None

    def set_adapters(self, enabled: bool = True, dropout_key=None) -> "Decoder":
        """Turns the LoRA updates on or off for this (merged) module's next calls, and
        sets the key of their dropout (None: no dropout, as at eval). Used inside jitted
        steps on a module just merged from its state: the reference is the same weights
        with the adapters off. Returns the module."""
        object.__setattr__(self, "_adapters_on", bool(enabled))
        object.__setattr__(self, "_dropout_key", dropout_key)
        return self

    def output_matrix(self) -> jax.Array:
        """The output projection `[V, D]` (tied embedding or lm_head) in the compute dtype,
        so that the vocabulary projection runs at the same precision as every other
        matmul (with float32 master weights and bfloat16 compute, a float32 matrix here
        would turn the largest matmul of a small model into a TF32 one at half speed)."""
        w = (self.embed if self.cfg.tie_word_embeddings else self.lm_head)[...]
        return w.astype(self.cfg.dtype)

    def _lora_on(self) -> bool:
        return self.cfg.lora is not None and getattr(self, "_adapters_on", True)

    def _layer_arrays(self) -> dict[str, jax.Array]:
        """The stacked per-layer arrays `[L, ...]` one layer call reads: the weights, plus
        the LoRA layer mask and dropout keys when adapters are on and need them."""
        cfg = self.cfg
        params = self.layers.arrays()
        on = self._lora_on()
        key = getattr(self, "_dropout_key", None) if on else None
        if on and any(cfg.lora.partial(r) for r in cfg.lora.rows):  # [L, rows] layer mask
            params["_lora_mask"] = jnp.stack([cfg.lora.layer_mask(r) for r in cfg.lora.rows], 1)
        if key is not None:
            params["_lora_key"] = jax.random.split(key, cfg.num_hidden_layers)
        if cfg.mixed_layers:  # [L] which layers slide (they read LayerInputs.local)
            params["_sliding"] = jnp.asarray(cfg.sliding_layers())
        return params

    def _layer_inputs(self, B: int, T: int, S: int, positions_bt, *, q_slots_bt,
                      window_positions, **mask_kw) -> LayerInputs:
        """The RoPE tables and masks of this forward, one set per kind of layer the model
        has; `mask_kw` and the window arguments as `build_mask`."""
        cfg = self.cfg

        def mask(sliding: bool):
            return build_mask(B, T, S, q_slots_bt=q_slots_bt,
                              sliding_window=cfg.sliding_window if sliding else None,
                              window_positions=window_positions, **mask_kw)

        if not cfg.mixed_layers:
            sliding = cfg.sliding_layers()[0]
            return LayerInputs(*rope_tables(cfg, positions_bt, local=sliding), mask(sliding))
        cos, sin = rope_tables(cfg, positions_bt)
        if cfg.rope_local_theta is not None:  # Gemma 3: the sliding layers' own base
            local = (*rope_tables(cfg, positions_bt, local=True), mask(True))
        else:  # Gemma 2: one table for both kinds
            local = (cos, sin, mask(True))
        return LayerInputs(cos, sin, mask(False), local=local)

    def _layer_fn(self, inputs: LayerInputs, index=None):
        cfg, rules, on = self.cfg, self.rules, self._lora_on()

        def layer(x, p, kv):
            return _block(cfg, rules, p, x, inputs, kv, index,
                          _LoraUpdates(cfg, p, p.get("_lora_key"), on))

        return layer

    def _run_layers(self, x_btd, inputs: LayerInputs):
        """The layer stack: `(x_btd, router stats summed over the layers or None)`."""
        cfg = self.cfg
        params = self._layer_arrays()
        layer = _remat(self._layer_fn(inputs), cfg.remat_policy)
        total = moe_lib.zero_stats(cfg.num_experts) if cfg.moe else None

        def add(total, stats):
            return total if stats is None else jax.tree.map(jnp.add, total, stats)

        if cfg.scan_layers:
            def body(carry, p):
                x, total = carry
                x, _, stats = layer(x, p, None)
                return (x, add(total, stats)), None

            (x_btd, total), _ = jax.lax.scan(body, (x_btd, total), params)
        else:
            for i in range(cfg.num_hidden_layers):
                x_btd, _, stats = layer(x_btd, {n: a[i] for n, a in params.items()}, None)
                total = add(total, stats)
        return x_btd, total

    def _embed(self, input_ids_bt):
        # Gather from a replicated view of the table: gathering from a vocab/embed-sharded
        # table into batch-sharded activations makes the SPMD partitioner replicate the
        # table anyway (with an "involuntary full rematerialization" warning).
        table = constrain(self.embed[...], (None, None), self.rules)
        return constrain(self._lookup(table, input_ids_bt), ("batch", "seq", "embed"), self.rules)

    def _lookup(self, table_vd, input_ids_bt):
        """Embedding rows in the compute dtype; Gemma scales them by `sqrt(hidden_size)`
        (rounded to the table's dtype, as transformers does) before the cast."""
        x = jnp.take(table_vd, input_ids_bt, axis=0)
        if self.cfg.scale_embeddings:
            x = x * jnp.asarray(self.cfg.hidden_size ** 0.5, x.dtype)
        return x.astype(self.cfg.dtype)

    def _final_norm(self, x_btd, norm_d):
        return _rms_norm(x_btd, norm_d, self.cfg.rms_norm_eps, self.cfg.norm_weight_offset)

    def _project(self, hidden_btd, out_vd):
        """Float32 logits of final hidden states, soft-capped where the model caps (Gemma 2)."""
        logits = jnp.einsum("btd,vd->btv", hidden_btd, out_vd, preferred_element_type=jnp.float32)
        logits = soft_cap(logits, self.cfg.final_logit_softcapping)
        return constrain(logits, ("batch", "seq", "vocab"), self.rules)

    def hidden_states(self, input_ids, attention_mask=None, positions=None, segment_ids=None,
                      with_router_stats: bool = False):
        """Final-norm hidden states `[B, T, D]` (compute dtype); arguments as `__call__`.
        With `with_router_stats`: `(hidden, moe.RouterStats summed over the layers, over
        the real tokens)` (zeros for a dense model)."""
        B, T = input_ids.shape
        if positions is None:
            positions = default_positions(input_ids, attention_mask, segment_ids)
        pad = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        full = attention_mask if attention_mask is not None and attention_mask.ndim == 3 else None
        slots = jnp.broadcast_to(jnp.arange(T), (B, T))
        inputs = self._layer_inputs(B, T, T, positions, q_slots_bt=slots,
                                    window_positions=(positions, positions), kv_valid_bs=pad,
                                    attention_mask=full, segment_ids=segment_ids)
        if self.cfg.moe:
            inputs = inputs._replace(token_weight=_real_tokens(pad, full, segment_ids))
        if self.cfg.attention == "splash" and full is None:  # (a full mask: the fallback)
            segs = segment_ids if segment_ids is not None else pad
            inputs = inputs._replace(segments=jnp.ones((B, T), jnp.int32) if segs is None
                                     else segs.astype(jnp.int32))
        x, stats = self._run_layers(self._embed(input_ids), inputs)
        hidden = self._final_norm(x, self.final_norm[...].astype(self.cfg.dtype))
        if with_router_stats:
            return hidden, stats if stats is not None else moe_lib.zero_stats(1)
        return hidden

    def logits_from_hidden(self, hidden_btd):
        """`[B, T, D]` -> float32 logits `[B, T, V]` (soft-capped where the model caps)."""
        return self._project(hidden_btd, self.output_matrix())

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        """Logits for a batch.

        Args:
          input_ids: int `[B, T]`.
          attention_mask: `[B, T]` padding mask (1 = real) or `[B, T, T]` boolean
            (True = query t may attend key s); always combined with causality.
          positions: int `[B, T]` RoPE positions; default arange / padding cumsum /
            per-segment restart.
          segment_ids: int `[B, T]`; attention stays within a segment, 0 = padding.
        Returns:
          logits_btv: float32 `[B, T, V]`.
        """
        return self.logits_from_hidden(
            self.hidden_states(input_ids, attention_mask, positions, segment_ids))

    # ---- KV-cache decoding -------------------------------------------------------------
    # Decoding runs the layers as a Python loop over weights and caches that are separate
    # arrays per layer, prepared once per generation (`decode_weights`), not as a scan
    # over the stacks: XLA:CPU copies a slice of a stacked array into a buffer of its own
    # before a matmul reads it, which under the decode loop meant copying every weight
    # (and every layer's cache) on every token, about as many bytes as the matmuls read.

    def decode_weights(self) -> dict:
        """What `decode` reads, prepared once for many decode steps.

        Returns a pytree: "layers", one dict per layer of that layer's arrays (weights in
        the compute dtype; quantized weights stay quantized and are expanded in each
        step, as in the forward); "embed", the embedding table replicated over the mesh
        (the gather needs it whole); "final_norm"; "out", the output matrix `[V, D]` in
        the compute dtype. Holding it costs one copy of the layer weights (the stacks are
        the caller's and stay alive), no more than the gradient a train step holds.
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        specs = stacked_specs(cfg)
        arrays = self._layer_arrays()

        def one(name, a, i):
            if name in specs and hasattr(a, "dequantize"):
                return jax.tree.map(lambda f: f[i], a)
            return dense_weight(specs[name], cfg, a[i], dt) if name in specs else a[i]

        layers = tuple({n: one(n, a, i) for n, a in arrays.items()}
                       for i in range(cfg.num_hidden_layers))
        return {"layers": layers, "embed": constrain(self.embed[...], (None, None), self.rules),
                "final_norm": self.final_norm[...].astype(dt), "out": self.output_matrix()}

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
        """Empty KV cache: "k"/"v", one `[B, KV, S, hd]` array per layer (compute dtype
        unless `dtype`), "valid" (key slot holds a real token) `[B, S]`, write "index";
        for a model with sliding-window layers also "positions" `[B, S]`, each slot's
        token position (the window is measured in positions)."""
        cfg = self.cfg
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        dt = dtype or cfg.dtype
        zeros = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_hidden_layers))
        cache = {"k": zeros, "v": tuple(jnp.zeros(shape, dt) for _ in zeros),
                 "valid": jnp.zeros((batch_size, max_len), bool),
                 "index": jnp.zeros((), jnp.int32)}
        if any(cfg.sliding_layers()):
            cache["positions"] = jnp.zeros((batch_size, max_len), jnp.int32)
        return cache

    def decode(self, input_ids_bt, positions_bt, valid_bt, cache, weights=None,
               last_only: bool = False, ring: bool = False):
        """Runs `T` new tokens against the cache (prefill when T > 1, one step when T == 1).

        Args:
          input_ids_bt: int `[B, T]` new tokens, written at cache slots index..index+T-1.
          positions_bt: int `[B, T]` their RoPE positions.
          valid_bt: bool `[B, T]` real tokens (False = left padding).
          cache: from `init_cache` or a previous `decode`.
          weights: `decode_weights()`, made once outside a decode loop (None: made here).
          last_only: project only the last position (logits `[B, 1, V]`): a prefill
            needs no more, and the output projection is a fifth of a small model's work.
          ring: the cache is a ring (rows started at different steps, slots reused modulo
            its length; `models.sampling.generate_groups`): a one-token step attends to
            every valid slot (within the window, by position), not to the slots before
            its own.
        Returns:
          (logits_btv float32, updated cache).
        """
        w = self.decode_weights() if weights is None else weights
        B, T = input_ids_bt.shape
        S = cache["valid"].shape[1]
        index = cache["index"]
        valid = jax.lax.dynamic_update_slice(cache["valid"], valid_bt.astype(bool), (0, index))
        slots = jnp.broadcast_to(index + jnp.arange(T), (B, T))
        if ring and T != 1:
            raise ValueError("a ring cache takes one token per step")
        new_cache = {"valid": valid, "index": index + T}
        window = None
        if "positions" in cache:
            new_cache["positions"] = jax.lax.dynamic_update_slice(
                cache["positions"], positions_bt.astype(jnp.int32), (0, index))
            window = (positions_bt, new_cache["positions"])
        inputs = self._layer_inputs(B, T, S, positions_bt, q_slots_bt=slots,
                                    window_positions=window, kv_valid_bs=valid,
                                    causal=not ring)
        layer = self._layer_fn(inputs, index)
        x = constrain(self._lookup(w["embed"], input_ids_bt), ("batch", "seq", "embed"),
                      self.rules)
        ks, vs = [], []
        for p, k, v in zip(w["layers"], cache["k"], cache["v"]):
            x, (k, v), _ = layer(x, p, (k, v))
            ks.append(k)
            vs.append(v)
        if last_only:
            x = x[:, -1:]
        logits = self._project(self._final_norm(x, w["final_norm"]), w["out"])
        return logits, dict(new_cache, k=tuple(ks), v=tuple(vs))


def adapter_rows(cfg: ModelConfig):
    """``(row, (A axes, B axes), (A shape, B shape))`` of each LoRA target of ``cfg``
    (empty without ``cfg.lora``); axes and shapes include the leading ``layers`` axis."""
    if cfg.lora is None:
        return []
    specs = stacked_specs(cfg)
    sizes = dict(axis_sizes(cfg), **{lora_lib.RANK_AXIS: cfg.lora.rank})
    out = []
    for row in cfg.lora.rows:
        a_axes, b_axes = lora_lib.factor_axes(specs[row].axes, specs[row].hf_axes)
        a_axes, b_axes = ("layers",) + a_axes, ("layers",) + b_axes
        out.append((row, (a_axes, b_axes),
                    (tuple(sizes[x] for x in a_axes), tuple(sizes[x] for x in b_axes))))
    return out


def init_model(cfg: ModelConfig, *, seed: int = 0, rules: Rules | None = None) -> Decoder:
    """A randomly initialised Decoder (for tests and benchmarks without a checkpoint)."""
    return Decoder(cfg, rngs=nnx.Rngs(seed), rules=rules)
