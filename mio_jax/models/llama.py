"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2) in flax.nnx.

The per-layer weights are stored stacked on a leading "layers" axis, so one parameter
layout serves both execution modes: `jax.lax.scan` over the stack (`scan_layers=True`)
or a Python loop that indexes it. Which parameters exist, their shapes, logical axes
and initialisers come from the family's weight table (`mio_jax.models.weights`); the
layout (HF's [out, in] transposed to [in, out]): q `[L, D, H, hd]`, k/v `[L, D, KV, hd]`,
o `[L, H, hd, D]`, gate/up `[L, D, F]`, down `[L, F, D]`, embedding and untied lm_head
`[V, D]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mio_jax.models import lora as lora_lib
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


def _rms_norm(x, weight, eps):
    """HF RMSNorm: normalise in float32, cast back, then scale by the weight."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


# The RMSNorm's float32 intermediates are recomputed in the backward pass from its input
# instead of kept (autodiff would keep a float32 copy of the activations per layer,
# stacked over the layers under lax.scan): memory traffic, not FLOPs.
_rms_norm_bwd_recompute = jax.checkpoint(_rms_norm, static_argnums=(2,))


def _swiglu_fwd(h_btd, w_gate_df, w_up_df, add_gate, add_up):
    gate = jnp.einsum("btd,df->btf", h_btd, w_gate_df)
    up = jnp.einsum("btd,df->btf", h_btd, w_up_df)
    if add_gate is not None:
        gate = gate + add_gate
    if add_up is not None:
        up = up + add_up
    return jax.nn.silu(gate) * up, (h_btd, w_gate_df, w_up_df, gate, up, add_gate, add_up)


@jax.custom_vjp
def swiglu(h_btd, w_gate_df, w_up_df, add_gate, add_up):
    """SwiGLU input of the MLP, `silu(h @ W_gate + add_gate) * (h @ W_up + add_up)`, with
    a hand-written backward.

    Autodiff would keep six `[tokens, intermediate]` arrays per layer for this; the
    backward here keeps only the two projections and recomputes the SiLU (elementwise, in
    float32). The weight gradients are taken as `h^T @ d_gate` with `h^T` materialised
    first: left to itself, XLA:CPU transposes both `[tokens, intermediate]` gradients
    instead, in slow loop fusions (14 % of a SmolLM2 step); on a GPU/TPU the transpose of
    the 2.7-4x smaller `h` is a small copy.

    Args:
      h_btd: normalised hidden states `[B, T, D]`.
      w_gate_df, w_up_df: the gate and up projections `[D, F]`.
      add_gate, add_up: terms added to each projection before the SiLU product: None,
        a bias `[F]`, or per-token `[B, T, F]` (a bias plus a LoRA update).

    Returns:
      act_btf: `[B, T, F]` in the inputs' dtype, the input of the down projection.
    """
    return _swiglu_fwd(h_btd, w_gate_df, w_up_df, add_gate, add_up)[0]


def _sum_to(d_btf, like):
    """The cotangent of an additive term of shape `like` (None, `[F]` or `[B, T, F]`)."""
    if like is None:
        return None
    if like.ndim == 1:
        return d_btf.astype(jnp.float32).sum((0, 1)).astype(like.dtype)
    return d_btf.astype(like.dtype)


def _swiglu_bwd(res, d_act_btf):
    h, w_gate, w_up, gate, up, add_gate, add_up = res
    f32 = jnp.float32
    g, gf, uf = d_act_btf.astype(f32), gate.astype(f32), up.astype(f32)
    sig = jax.nn.sigmoid(gf)
    d_up = (g * gf * sig).astype(up.dtype)
    d_gate = (g * uf * sig * (1.0 + gf * (1.0 - sig))).astype(gate.dtype)
    B, T, D = h.shape
    h_t = jax.lax.optimization_barrier(h.reshape(B * T, D).T)
    dg, du = d_gate.reshape(B * T, -1), d_up.reshape(B * T, -1)
    dw_gate = jnp.matmul(h_t, dg).astype(w_gate.dtype)
    dw_up = jnp.matmul(h_t, du).astype(w_up.dtype)
    dh = (jnp.einsum("nf,df->nd", dg, w_gate) + jnp.einsum("nf,df->nd", du, w_up)).reshape(B, T, D)
    return (dh.astype(h.dtype), dw_gate, dw_up, _sum_to(d_gate, add_gate),
            _sum_to(d_up, add_up))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _rope(x_bthk, cos_btk, sin_btk):
    """HF's rotate_half convention: the two halves of head_dim form the complex pairs."""
    half = x_bthk.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthk[..., half:], x_bthk[..., :half]], axis=-1)
    cos, sin = cos_btk[:, :, None, :].astype(x_bthk.dtype), sin_btk[:, :, None, :].astype(x_bthk.dtype)
    return x_bthk * cos + rotated * sin


def rope_tables(cfg: ModelConfig, positions_bt):
    """cos/sin `[B, T, head_dim]` in float32 for integer positions `[B, T]`."""
    inv = jnp.asarray(cfg.rope_inv_freq(), jnp.float32)
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


def xla_attention(q_bthk, k_bskh, v_bskh, mask_bts):
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

    Returns:
      ``[B, T, H, hd]`` in the queries' dtype.
    """
    B, T, H, hd = q_bthk.shape
    KV = k_bskh.shape[2]
    qg = q_bthk.reshape(B, T, KV, H // KV, hd)
    return _grouped_attention(qg, k_bskh, v_bskh, mask_bts).reshape(B, T, H, hd)


def _softmax_parts(qg, k, mask_bts):
    """Masked, scaled float32 scores -> (probabilities, row maxima, row sums)."""
    scores = attention_scores(qg, k) * (qg.shape[-1] ** -0.5)
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, _NEG)
    top = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    e = jnp.exp(scores - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / total, top, total


@jax.custom_vjp
def _grouped_attention(qg, k, v, mask_bts):
    probs, _, _ = _softmax_parts(qg, k, mask_bts)
    return jnp.einsum("bkgts,bskh->btkgh", probs.astype(qg.dtype), v)


def _grouped_attention_fwd(qg, k, v, mask_bts):
    probs, top, total = _softmax_parts(qg, k, mask_bts)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(qg.dtype), v)
    return out, (qg, k, v, mask_bts, top, total)


def _grouped_attention_bwd(res, d_out):
    qg, k, v, mask_bts, top, total = res
    scale = qg.shape[-1] ** -0.5
    scores = attention_scores(qg, k) * scale
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, _NEG)
    probs = jnp.exp(scores - top) / total  # the forward's probabilities, recomputed
    p = probs.astype(qg.dtype)
    dv = jnp.einsum("bkgts,btkgh->bskh", p, d_out)
    dp = jnp.einsum("btkgh,bskh->bkgts", d_out, v, preferred_element_type=jnp.float32)
    ds = probs * (dp - jnp.sum(probs * dp, axis=-1, keepdims=True))
    ds = jnp.where(mask_bts[:, None, None, :, :], ds, 0.0) * scale
    dq, dk = _attention_scores_bwd((qg, k), ds)
    return dq, dk, dv.astype(v.dtype), None


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


def fused_attention(q_bthk, k_bskh, v_bskh, mask_bts, implementation="cudnn"):
    """cuDNN's fused (flash) attention (``model.attention="cudnn"``): the scores are never
    stored for the backward. Arguments and result as ``xla_attention``.

    `mask_bts` always lies inside the causal triangle (`build_mask` starts from it), so
    `is_causal` lets cuDNN skip the blocks above the diagonal; the mask itself carries
    padding, packing segments and the shared-prompt layout. `implementation="xla"`
    runs the same call through XLA (how the tests check it off GPU).
    """
    hd = q_bthk.shape[-1]
    return jax.nn.dot_product_attention(
        q_bthk, k_bskh, v_bskh, mask=mask_bts[:, None, :, :], scale=hd ** -0.5,
        is_causal=True, implementation=implementation)


def cached_attention(q_bthk, k_bksh, v_bksh, mask_bts):
    """Grouped-query attention of new queries over a KV cache (forward only).

    The cache is stored heads-major, `[B, KV, S, hd]`, the layout both matmuls read
    directly: with `[B, S, KV, hd]` XLA transposes the whole cache of every layer on
    every decoded token before the score and value matmuls.

    Args:
      q_bthk: queries `[B, T, H, hd]`.
      k_bksh, v_bksh: this layer's cache `[B, KV, S, hd]`.
      mask_bts: bool `[B, T, S]`, True where query t may attend cache slot s.

    Returns:
      `[B, T, H, hd]` in the queries' dtype.
    """
    B, T, H, hd = q_bthk.shape
    KV = k_bksh.shape[1]
    f32 = jnp.float32
    qg = q_bthk.reshape(B, T, KV, H // KV, hd)
    scores = jnp.einsum("btkgh,bksh->bkgts", qg, k_bksh, preferred_element_type=f32)
    scores = jnp.where(mask_bts[:, None, None, :, :], scores * (hd ** -0.5), _NEG)
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


def _block(cfg: ModelConfig, rules, p, x_btd, cos, sin, mask_bts, kv=None, index=None,
           lora: _LoraUpdates | None = None):
    """One decoder layer. With `kv=(k_bksh, v_bksh)` (this layer's cache) the new keys
    and values are written at slots index..index+T-1 and attention runs over the whole
    cache. `lora` adds the LoRA updates of the rows that carry one.

    Returns (x_btd, (k, v)): this call's keys/values `[B, T, KV, hd]`, or with `kv` the
    updated cache.
    """
    dt = jnp.dtype(cfg.dtype)
    specs = stacked_specs(cfg)
    w = {n: dense_weight(specs[n], cfg, a, dt) for n, a in p.items() if n in specs}
    lora = lora or _LoraUpdates(cfg, p, None, False)
    eps = cfg.rms_norm_eps
    # Training keeps jnp.einsum (its backward's dtypes are chosen in the custom VJPs).
    mm = jnp.einsum if kv is None else _einsum_f32_out
    h = _rms_norm_bwd_recompute(x_btd, w["attn_norm"], eps)
    q = _plus(mm("btd,dhk->bthk", h, w["q"]), lora.add("q", h, 1))
    k = _plus(mm("btd,dhk->bthk", h, w["k"]), lora.add("k", h, 1))
    v = _plus(mm("btd,dhk->bthk", h, w["v"]), lora.add("v", h, 1))
    if cfg.qkv_bias:
        q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
    if cfg.qk_norm:
        q, k = _rms_norm(q, w["q_norm"], eps), _rms_norm(k, w["k_norm"], eps)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"), rules)
    if kv is not None:
        cache_axes = ("batch", "kv_heads", "cache_seq", "head_dim")
        k = jax.lax.dynamic_update_slice(kv[0], jnp.swapaxes(k, 1, 2).astype(kv[0].dtype),
                                         (0, 0, index, 0))
        v = jax.lax.dynamic_update_slice(kv[1], jnp.swapaxes(v, 1, 2).astype(kv[1].dtype),
                                         (0, 0, index, 0))
        k, v = constrain(k, cache_axes, rules), constrain(v, cache_axes, rules)
        attn = cached_attention(q, k, v, mask_bts)
    else:
        k = constrain(k, ("batch", "seq", "kv_heads", "head_dim"), rules)
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"), rules)
        if cfg.attention == "cudnn":
            attn = fused_attention(q, k, v, mask_bts)
        else:
            attn = xla_attention(q, k, v, mask_bts)
    out = _plus(mm("bthk,hkd->btd", attn, w["o"]), lora.add("o", attn, 2))
    if cfg.o_bias:
        out = out + w["o_bias"]
    x_btd = constrain(x_btd + out, ("batch", "seq", "embed"), rules)
    h = _rms_norm_bwd_recompute(x_btd, w["mlp_norm"], eps)
    add_gate, add_up = lora.add("gate", h, 1), lora.add("up", h, 1)
    if cfg.mlp_bias:
        add_gate = _plus(w["gate_bias"], add_gate)
        add_up = _plus(w["up_bias"], add_up)
    if kv is None:
        act = swiglu(h, w["gate"], w["up"], add_gate, add_up)
    else:
        gate = _plus(mm("btd,df->btf", h, w["gate"]), add_gate)
        act = jax.nn.silu(gate) * _plus(mm("btd,df->btf", h, w["up"]), add_up)
    act = constrain(act, ("batch", "seq", "mlp"), rules)
    down = _plus(mm("btf,fd->btd", act, w["down"]), lora.add("down", act, 1))
    if cfg.mlp_bias:
        down = down + w["down_bias"]
    x_btd = constrain(x_btd + down, ("batch", "seq", "embed"), rules)
    return x_btd, (k, v)


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
               segment_ids=None, sliding_window=None, causal: bool = True):
    """Boolean `[B, T, S]` attention mask: causal in slot order (unless `causal` is False:
    a one-token step over a ring cache, whose valid keys are all in the past whatever their
    slots), AND every restriction given.

    Args:
      q_slots_bt: int slot of each query in the key axis `[B, T]`.
      kv_valid_bs: `[B, S]` key slot holds a real token.
      attention_mask: `[B, T, T]` boolean (only when S == T).
      segment_ids: `[B, T]` int (only when S == T); 0 = padding.
      sliding_window: keys further back than this many slots are hidden (Mistral).
    """
    k_slots = jnp.arange(S)[None, None, :]
    q = q_slots_bt[:, :, None]
    mask = k_slots <= q if causal else jnp.ones((1, 1, S), bool)
    if sliding_window is not None:
        mask &= (q - k_slots) < sliding_window
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
        return params

    def _layer_fn(self, cos, sin, mask_bts, index=None):
        cfg, rules, on = self.cfg, self.rules, self._lora_on()

        def layer(x, p, kv):
            return _block(cfg, rules, p, x, cos, sin, mask_bts, kv, index,
                          _LoraUpdates(cfg, p, p.get("_lora_key"), on))

        return layer

    def _run_layers(self, x_btd, cos, sin, mask_bts):
        cfg = self.cfg
        params = self._layer_arrays()
        layer = _remat(self._layer_fn(cos, sin, mask_bts), cfg.remat_policy)
        if cfg.scan_layers:
            x_btd, _ = jax.lax.scan(lambda x, p: (layer(x, p, None)[0], None), x_btd, params)
        else:
            for i in range(cfg.num_hidden_layers):
                x_btd, _ = layer(x_btd, {n: a[i] for n, a in params.items()}, None)
        return x_btd

    def _embed(self, input_ids_bt):
        # Gather from a replicated view of the table: gathering from a vocab/embed-sharded
        # table into batch-sharded activations makes the SPMD partitioner replicate the
        # table anyway (with an "involuntary full rematerialization" warning).
        table = constrain(self.embed[...], (None, None), self.rules)
        x = jnp.take(table, input_ids_bt, axis=0).astype(self.cfg.dtype)
        return constrain(x, ("batch", "seq", "embed"), self.rules)

    def hidden_states(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        """Final-norm hidden states `[B, T, D]` (compute dtype); arguments as `__call__`."""
        B, T = input_ids.shape
        if positions is None:
            positions = default_positions(input_ids, attention_mask, segment_ids)
        pad = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
        full = attention_mask if attention_mask is not None and attention_mask.ndim == 3 else None
        slots = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask = build_mask(B, T, T, q_slots_bt=slots, kv_valid_bs=pad, attention_mask=full,
                          segment_ids=segment_ids, sliding_window=self.cfg.sliding_window)
        cos, sin = rope_tables(self.cfg, positions)
        x = self._run_layers(self._embed(input_ids), cos, sin, mask)
        return _rms_norm(x, self.final_norm[...].astype(self.cfg.dtype), self.cfg.rms_norm_eps)

    def logits_from_hidden(self, hidden_btd):
        """`[B, T, D]` -> float32 logits `[B, T, V]`."""
        logits = jnp.einsum("btd,vd->btv", hidden_btd, self.output_matrix(),
                            preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"), self.rules)

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
        unless `dtype`), "valid" (key slot holds a real token) `[B, S]`, write "index"."""
        cfg = self.cfg
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        dt = dtype or cfg.dtype
        zeros = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_hidden_layers))
        return {"k": zeros, "v": tuple(jnp.zeros(shape, dt) for _ in zeros),
                "valid": jnp.zeros((batch_size, max_len), bool),
                "index": jnp.zeros((), jnp.int32)}

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
            every valid slot, not to the slots before its own.
        Returns:
          (logits_btv float32, updated cache).
        """
        cfg = self.cfg
        w = self.decode_weights() if weights is None else weights
        B, T = input_ids_bt.shape
        S = cache["valid"].shape[1]
        index = cache["index"]
        valid = jax.lax.dynamic_update_slice(cache["valid"], valid_bt.astype(bool), (0, index))
        slots = jnp.broadcast_to(index + jnp.arange(T), (B, T))
        if ring and (T != 1 or cfg.sliding_window is not None):
            raise ValueError("a ring cache takes one token per step and no sliding window")
        mask = build_mask(B, T, S, q_slots_bt=slots, kv_valid_bs=valid,
                          sliding_window=cfg.sliding_window, causal=not ring)
        cos, sin = rope_tables(cfg, positions_bt)
        layer = self._layer_fn(cos, sin, mask, index)
        x = jnp.take(w["embed"], input_ids_bt, axis=0).astype(cfg.dtype)
        x = constrain(x, ("batch", "seq", "embed"), self.rules)
        ks, vs = [], []
        for p, k, v in zip(w["layers"], cache["k"], cache["v"]):
            x, (k, v) = layer(x, p, (k, v))
            ks.append(k)
            vs.append(v)
        if last_only:
            x = x[:, -1:]
        x = _rms_norm(x, w["final_norm"], cfg.rms_norm_eps)
        logits = jnp.einsum("btd,vd->btv", x, w["out"], preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "seq", "vocab"), self.rules)
        new_cache = {"k": tuple(ks), "v": tuple(vs), "valid": valid, "index": index + T}
        return logits, new_cache


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
