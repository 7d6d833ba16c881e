"""Completion log-probs from logits or hidden states, chunked over the vocabulary.

Token convention (docs/architecture.md): ``targets[..., t]`` is the token that
follows ``input_ids[..., t]`` and ``mask[..., t]`` is 1 where ``targets[..., t]``
is a completion token whose log-prob counts, so ``logits[..., t, :]`` scores
``targets[..., t]``. Leading dimensions are free: ``[B]``, ``[B, K]`` (K
completions per group, index 0 chosen), ...

Nothing here builds a float32 ``[..., T, V]`` log-softmax. The log-normaliser is
an online (streaming) logsumexp over vocabulary chunks of ``chunk_size`` columns
computed in float32 (float64 for float64 inputs), the target logit is gathered
directly, and a ``jax.custom_vjp`` recomputes the softmax chunk by chunk in the
backward pass. The ``*_from_hidden`` functions go further and project the final
hidden states through the output matrix one chunk at a time, so ``[..., T, V]``
logits never exist, in the forward or the backward pass.

Rows with no completion token (mask all zero) would give a log-prob of 0 and a
DPO loss stuck at log 2. With concrete inputs every public function raises
``ValueError`` on them; under ``jax.jit`` inputs are tracers and cannot raise, so
the trainer calls ``check_completion_tokens(batch.loss_mask)`` on each host
batch before the jitted step (the data pipeline also guarantees it).

WPO weights and LD-DPO log-probs follow TRL 1.16's ``DPOTrainer`` exactly
(``use_weighting`` and ``ld_alpha``); tests/test_logps.py checks them against
numbers produced by TRL itself (scripts/golden_trl_logps.py).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DEFAULT_CHUNK_SIZE = 4096


class TokenStats(NamedTuple):
    """Per-token statistics of the next-token distribution, zero where masked.

    Attributes:
      logps_bt: ``[..., T]`` log-prob of each target token (differentiable).
      log_sum_sq_probs_bt: ``[..., T]`` ``log(sum_v p_v^2)``, no gradient (WPO);
        ``None`` unless requested.
      entropy_bt: ``[..., T]`` entropy of the next-token distribution,
        ``-sum_v p_v log p_v``, no gradient (the RL losses' ``entropy`` metric); ``None``
        unless requested.
    """

    logps_bt: jax.Array
    log_sum_sq_probs_bt: jax.Array | None
    entropy_bt: jax.Array | None = None


# ---- Validation (eager only: concrete inputs) --------------------------------


_TRACER = getattr(jax.core, "Tracer", None) or jax._src.core.Tracer  # noqa: SLF001


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, _TRACER) for x in xs)


def check_completion_tokens(mask_bt, *, name: str = "mask") -> None:
    """Raises if any row has no completion token.

    A row whose mask is all zero contributes a log-prob of exactly 0, so its DPO
    loss sits at log 2 = 0.693 and its gradient is 0: the silent failure users
    report as "loss stuck at 0.693". Call this on concrete (host) batches, e.g.
    in the trainer before each jitted step; inside ``jax.jit`` it cannot see
    values. The public functions of this module call it automatically whenever
    their inputs are concrete.

    Args:
      mask_bt: ``[..., T]`` completion mask (bool, int or float; nonzero counts).
      name: the tensor's name, used in the error message.

    Raises:
      ValueError: naming every row index (over the leading dims) without a
        completion token.
    """
    if not _is_concrete(mask_bt):
        raise TypeError(
            f"check_completion_tokens needs a concrete {name}, got a tracer; call it "
            "outside jax.jit (on the host batch)"
        )
    mask = np.asarray(mask_bt)
    if mask.ndim < 1:
        raise ValueError(f"{name} must be at least 1-D [..., T], got shape {mask.shape}")
    counts = (mask != 0).sum(axis=-1)
    empty = np.argwhere(counts == 0)
    if empty.size:
        rows = [tuple(int(i) for i in r) if len(r) > 1 else int(r[0]) for r in empty]
        shown = rows[:20]
        more = f" (and {len(rows) - len(shown)} more)" if len(rows) > len(shown) else ""
        raise ValueError(
            f"{name}: {len(rows)} of {counts.size} rows have no completion token "
            f"(mask all zero) at row indices {shown}{more} of leading shape "
            f"{mask.shape[:-1]}. Their log-prob would be 0 and a DPO loss stuck at "
            "log 2 = 0.693; drop or fix these rows in the data pipeline (truncation "
            "left no completion tokens)."
        )


def _validate(targets_bt, mask_bt, vocab: int, *, check: bool) -> None:
    """Static shape checks always; value checks when inputs are concrete."""
    if targets_bt.shape != mask_bt.shape:
        raise ValueError(
            f"targets_bt shape {targets_bt.shape} != mask_bt shape {mask_bt.shape}"
        )
    if not jnp.issubdtype(targets_bt.dtype, jnp.integer):
        raise TypeError(f"targets_bt must be integer token ids, got {targets_bt.dtype}")
    if not check or not _is_concrete(targets_bt, mask_bt):
        return
    check_completion_tokens(mask_bt, name="mask_bt")
    targets = np.asarray(targets_bt)
    counted = np.asarray(mask_bt) != 0
    bad = counted & ((targets < 0) | (targets >= vocab))
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"targets_bt has {int(bad.sum())} masked-in token ids outside [0, {vocab}), "
            f"first at index {first}: {int(targets[first])}"
        )


def _compute_dtype(*dtypes):
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


# ---- Vocabulary-chunked loops ------------------------------------------------


def _fold_vocab(step, init, vocab: int, chunk: int):
    """Runs ``step(carry, start, width)`` over [0, vocab) in chunks.

    Full chunks go through ``lax.fori_loop`` (``start`` traced, ``width`` static);
    the remainder, if any, is one static call, so nothing is padded or copied.
    """
    if chunk <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk}")
    chunk = min(chunk, vocab)
    n_full, tail = divmod(vocab, chunk)
    carry = init
    if n_full == 1:
        carry = step(carry, 0, chunk)
    elif n_full > 1:
        carry = lax.fori_loop(0, n_full, lambda i, c: step(c, i * chunk, chunk), carry)
    if tail:
        carry = step(carry, n_full * chunk, tail)
    return carry


def _online_init(n: int, dtype):
    return (jnp.full((n,), -jnp.inf, dtype), jnp.zeros((n,), dtype), jnp.zeros((n,), dtype),
            jnp.zeros((n,), dtype))


def _online_update(stats, z_nc):
    """Folds a ``[N, C]`` logit chunk into running (max, sum exp, sum exp^2, sum exp * z)
    (exponentials relative to the running max)."""
    m, s, sq, t = stats
    m_new = jnp.maximum(m, z_nc.max(axis=-1))
    rescale = jnp.exp(m - m_new)
    e = jnp.exp(z_nc - m_new[:, None])
    s = s * rescale + e.sum(axis=-1)
    sq = sq * rescale * rescale + (e * e).sum(axis=-1)
    t = t * rescale + (e * z_nc).sum(axis=-1)
    return m_new, s, sq, t


def _finish(stats, target_logit_n):
    """-> (log p_target, log sum p^2, entropy = lse - E_p[z], lse)."""
    m, s, sq, t = stats
    lse = m + jnp.log(s)
    return target_logit_n - lse, jnp.log(sq) - 2.0 * jnp.log(s), lse - t / s, lse


# ---- from logits -----------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _stats_from_logits(logits_nv, targets_n, chunk):
    out, _ = _stats_from_logits_fwd(logits_nv, targets_n, chunk)
    return out


def _stats_from_logits_fwd(logits_nv, targets_n, chunk):
    n, vocab = logits_nv.shape
    cd = _compute_dtype(logits_nv.dtype)

    def step(stats, start, width):
        z = lax.dynamic_slice_in_dim(logits_nv, start, width, axis=1).astype(cd)
        return _online_update(stats, z)

    stats = _fold_vocab(step, _online_init(n, cd), vocab, chunk)
    target = jnp.take_along_axis(logits_nv, targets_n[:, None], axis=1)[:, 0].astype(cd)
    logps, lss, ent, lse = _finish(stats, target)
    return (logps, lss, ent), (logits_nv, targets_n, lse)


def _stats_from_logits_bwd(chunk, res, cts):
    logits_nv, targets_n, lse = res
    g = cts[0].astype(lse.dtype)  # log_sum_sq and the entropy carry no gradient
    n, vocab = logits_nv.shape

    def step(grad_nv, start, width):
        z = lax.dynamic_slice_in_dim(logits_nv, start, width, axis=1).astype(lse.dtype)
        d = -g[:, None] * jnp.exp(z - lse[:, None])
        hit = (start + jnp.arange(width))[None, :] == targets_n[:, None]
        d = jnp.where(hit, d + g[:, None], d)
        return lax.dynamic_update_slice_in_dim(grad_nv, d.astype(grad_nv.dtype), start, axis=1)

    grad = _fold_vocab(step, jnp.zeros_like(logits_nv), vocab, chunk)
    return grad, None


_stats_from_logits.defvjp(_stats_from_logits_fwd, _stats_from_logits_bwd)


# ---- from hidden states ----------------------------------------------------


def soft_cap(x, cap: float | None):
    """`cap * tanh(x / cap)` (Gemma's soft-capping of scores and logits), or `x` when
    `cap` is None."""
    return x if not cap else jnp.tanh(x / cap) * cap


def _project(hidden_nd, w_cd, cd, softcap=None):
    # Inputs stay in their own (common) dtype, accumulation is in float32 or wider.
    common = jnp.result_type(hidden_nd.dtype, w_cd.dtype)
    z = jnp.matmul(hidden_nd.astype(common), w_cd.astype(common).T, preferred_element_type=cd)
    return soft_cap(z, softcap)


def _target_logit(hidden_nd, out_vd, targets_n, cd, softcap=None):
    rows_nd = jnp.take(out_vd, targets_n, axis=0)
    common = jnp.result_type(hidden_nd.dtype, out_vd.dtype)
    return soft_cap(jnp.einsum(
        "nd,nd->n", hidden_nd.astype(common), rows_nd.astype(common), preferred_element_type=cd
    ), softcap)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _stats_from_hidden(hidden_nd, out_vd, targets_n, chunk, softcap):
    out, _ = _stats_from_hidden_fwd(hidden_nd, out_vd, targets_n, chunk, softcap)
    return out


def _stats_from_hidden_fwd(hidden_nd, out_vd, targets_n, chunk, softcap):
    n = hidden_nd.shape[0]
    vocab = out_vd.shape[0]
    cd = _compute_dtype(hidden_nd.dtype, out_vd.dtype)

    def step(stats, start, width):
        w = lax.dynamic_slice_in_dim(out_vd, start, width, axis=0)
        return _online_update(stats, _project(hidden_nd, w, cd, softcap))

    stats = _fold_vocab(step, _online_init(n, cd), vocab, chunk)
    target = _target_logit(hidden_nd, out_vd, targets_n, cd, softcap)
    logps, lss, ent, lse = _finish(stats, target)
    return (logps, lss, ent), (hidden_nd, out_vd, targets_n, lse)


def _stats_from_hidden_bwd(chunk, softcap, res, cts):
    hidden_nd, out_vd, targets_n, lse = res
    cd = lse.dtype
    g = cts[0].astype(cd)
    vocab, _ = out_vd.shape
    common = jnp.result_type(hidden_nd.dtype, out_vd.dtype)
    h = hidden_nd.astype(common)

    def step(carry, start, width):
        grad_h, grad_w = carry
        w = lax.dynamic_slice_in_dim(out_vd, start, width, axis=0).astype(common)
        # d log p_target / d z_v = 1[v = target] - p_v; the indicator is added below. With
        # a soft-cap, the logit is c tanh(u / c) of the projection u: times 1 - tanh^2.
        u = _project(h, w, cd)
        d_nc = -g[:, None] * jnp.exp(soft_cap(u, softcap) - lse[:, None])
        if softcap is not None:
            d_nc = d_nc * (1.0 - jnp.square(jnp.tanh(u / softcap)))
        d_nc = d_nc.astype(common)
        grad_h = grad_h + jnp.matmul(d_nc, w, preferred_element_type=cd)
        grad_w_chunk = jnp.matmul(d_nc.T, h, preferred_element_type=cd)
        grad_w = lax.dynamic_update_slice_in_dim(grad_w, grad_w_chunk, start, axis=0)
        return grad_h, grad_w

    init = (jnp.zeros(hidden_nd.shape, cd), jnp.zeros(out_vd.shape, cd))
    grad_h, grad_w = _fold_vocab(step, init, vocab, chunk)
    g_target = g
    if softcap is not None:
        g_target = g * (1.0 - jnp.square(jnp.tanh(_target_logit(h, out_vd, targets_n, cd)
                                                  / softcap)))
    grad_h = grad_h + g_target[:, None] * jnp.take(out_vd, targets_n, axis=0).astype(cd)
    grad_w = grad_w.at[targets_n].add(g_target[:, None] * h.astype(cd))
    return grad_h.astype(hidden_nd.dtype), grad_w.astype(out_vd.dtype), None


_stats_from_hidden.defvjp(_stats_from_hidden_fwd, _stats_from_hidden_bwd)


# ---- Public API --------------------------------------------------------------


def _mask_out(values_bt, mask_bt):
    return jnp.where(mask_bt != 0, values_bt, jnp.zeros((), values_bt.dtype))


def token_stats(
    logits_btv, targets_bt, mask_bt, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_log_sum_sq: bool = False, with_entropy: bool = False, validate: bool = True,
) -> TokenStats:
    """Per-token target log-probs (and WPO statistics) from logits.

    Args:
      logits_btv: ``[..., T, V]`` logits, any float dtype (bfloat16 is fine).
      targets_bt: ``[..., T]`` int target ids (anything where ``mask_bt`` is 0).
      mask_bt: ``[..., T]`` completion mask, nonzero where the token counts.
      chunk_size: vocabulary columns per chunk of the online logsumexp.
      with_log_sum_sq: also return ``log(sum_v p_v^2)`` per token (for WPO).
      with_entropy: also return each token's distribution's entropy.
      validate: when inputs are concrete, raise on rows without completion
        tokens and on out-of-range targets.

    Returns:
      ``TokenStats`` with ``logps_bt [..., T]`` in float32 (float64 for float64
      logits), zero where ``mask_bt`` is 0.
    """
    *lead, vocab = logits_btv.shape
    if tuple(lead) != tuple(targets_bt.shape):
        raise ValueError(
            f"logits_btv shape {logits_btv.shape} does not match targets_bt shape "
            f"{targets_bt.shape} (expected [..., T, V] vs [..., T])"
        )
    _validate(targets_bt, mask_bt, vocab, check=validate)
    safe_targets = jnp.where(mask_bt != 0, targets_bt, 0).reshape(-1)
    logps, lss, ent = _stats_from_logits(logits_btv.reshape(-1, vocab), safe_targets, chunk_size)
    return _token_stats(logps, lss, ent, targets_bt.shape, mask_bt, with_log_sum_sq,
                        with_entropy)


def _token_stats(logps, lss, ent, shape, mask_bt, with_log_sum_sq, with_entropy) -> TokenStats:
    def out(x):
        return _mask_out(x.reshape(shape), mask_bt)

    return TokenStats(out(logps), out(lss) if with_log_sum_sq else None,
                      lax.stop_gradient(out(ent)) if with_entropy else None)


def token_logps(logits_btv, targets_bt, mask_bt, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                validate: bool = True):
    """Per-token target log-probs ``[..., T]`` from logits, zero where masked.

    Args and Returns: as ``token_stats`` (its ``logps_bt``).
    """
    return token_stats(logits_btv, targets_bt, mask_bt, chunk_size=chunk_size,
                       validate=validate).logps_bt


def sequence_logps(logits_btv, targets_bt, mask_bt, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   validate: bool = True):
    """Per-sequence SUM of completion-token log-probs from logits.

    Args:
      logits_btv: ``[..., T, V]`` logits, any float dtype.
      targets_bt: ``[..., T]`` int target ids.
      mask_bt: ``[..., T]`` completion mask.
      chunk_size: vocabulary columns per chunk.
      validate: eager checks (see ``token_stats``).

    Returns:
      ``[...]`` float32 (float64 for float64 logits) sums, e.g. ``[B]`` or ``[B, K]``.
    """
    return token_logps(logits_btv, targets_bt, mask_bt, chunk_size=chunk_size,
                       validate=validate).sum(axis=-1)


def token_stats_from_hidden(
    hidden_btd, out_vd, targets_bt, mask_bt, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_tokens: int | None = None, with_log_sum_sq: bool = False, with_entropy: bool = False,
    validate: bool = True, softcap: float | None = None,
) -> TokenStats:
    """Per-token log-probs from final hidden states, never building ``[..., T, V]``.

    The projection ``hidden @ out_vd.T`` is done ``chunk_size`` vocabulary rows at
    a time in the forward and again in the backward pass (custom VJP), so the
    largest temporary is ``[N, chunk_size]`` with ``N`` the projected positions.

    Args:
      hidden_btd: ``[..., T, D]`` hidden states after the final norm.
      out_vd: ``[V, D]`` output matrix as stored by the model (tied embedding or
        untied ``lm_head``).
      targets_bt: ``[..., T]`` int target ids.
      mask_bt: ``[..., T]`` completion mask.
      chunk_size: vocabulary rows per projection chunk.
      max_tokens: if set, only the masked positions are projected: the first
        ``max_tokens`` positions with a nonzero mask (over the flattened batch)
        are gathered into a ``[max_tokens, D]`` block. It is static (one
        compile per value) and must be >= ``mask_bt.sum()``: with concrete inputs
        a ValueError is raised otherwise; under jit the result becomes NaN so a
        NaN guard catches it instead of silently dropping tokens.
      with_log_sum_sq: also return ``log(sum_v p_v^2)`` per token (for WPO).
      with_entropy: also return each token's distribution's entropy.
      validate: eager checks (see ``token_stats``).
      softcap: the model's final-logit soft-cap (Gemma 2): every logit is
        ``softcap * tanh(z / softcap)`` of its projection ``z``; None: none.

    Returns:
      ``TokenStats`` with ``logps_bt [..., T]`` in float32 (float64 for float64
      inputs), zero where masked.
    """
    *lead, dim = hidden_btd.shape
    if tuple(lead) != tuple(targets_bt.shape):
        raise ValueError(
            f"hidden_btd shape {hidden_btd.shape} does not match targets_bt shape "
            f"{targets_bt.shape} (expected [..., T, D] vs [..., T])"
        )
    if out_vd.ndim != 2 or out_vd.shape[1] != dim:
        raise ValueError(f"out_vd must be [V, D={dim}], got shape {out_vd.shape}")
    _validate(targets_bt, mask_bt, out_vd.shape[0], check=validate)
    flat_mask = (mask_bt != 0).reshape(-1)
    hidden_nd = hidden_btd.reshape(-1, dim)
    safe_targets = jnp.where(flat_mask, targets_bt.reshape(-1), 0)
    n = hidden_nd.shape[0]

    softcap = None if not softcap else float(softcap)
    if max_tokens is None:
        logps, lss, ent = _stats_from_hidden(hidden_nd, out_vd, safe_targets, chunk_size, softcap)
    else:
        if _is_concrete(mask_bt) and (eager := int((np.asarray(mask_bt) != 0).sum())) > max_tokens:
            raise ValueError(f"mask_bt has {eager} completion tokens but max_tokens={max_tokens}")
        count = flat_mask.sum()
        (idx,) = jnp.nonzero(flat_mask, size=max_tokens, fill_value=0)
        valid = jnp.arange(max_tokens) < count
        selected = _stats_from_hidden(
            jnp.take(hidden_nd, idx, axis=0), out_vd, jnp.take(safe_targets, idx), chunk_size,
            softcap)
        overflow = count > max_tokens

        def scatter(sel):
            zero = jnp.zeros((), sel.dtype)
            full = jnp.zeros((n,), sel.dtype).at[idx].add(jnp.where(valid, sel, zero))
            return jnp.where(overflow, jnp.nan, full)

        logps, lss, ent = (scatter(x) for x in selected)

    return _token_stats(logps, lss, ent, targets_bt.shape, mask_bt, with_log_sum_sq,
                        with_entropy)


def token_logps_from_hidden(hidden_btd, out_vd, targets_bt, mask_bt, *,
                            chunk_size: int = DEFAULT_CHUNK_SIZE,
                            max_tokens: int | None = None, validate: bool = True,
                            softcap: float | None = None):
    """Per-token log-probs ``[..., T]`` from hidden states, zero where masked.

    Args and Returns: as ``token_stats_from_hidden`` (its ``logps_bt``).
    """
    return token_stats_from_hidden(hidden_btd, out_vd, targets_bt, mask_bt,
                                   chunk_size=chunk_size, max_tokens=max_tokens,
                                   validate=validate, softcap=softcap).logps_bt


def sequence_logps_from_hidden(hidden_btd, out_vd, targets_bt, mask_bt, *,
                               chunk_size: int = DEFAULT_CHUNK_SIZE,
                               max_tokens: int | None = None, validate: bool = True,
                               softcap: float | None = None):
    """Per-sequence SUM of completion-token log-probs from hidden states.

    Args: ``hidden_btd [..., T, D]`` (after the final norm), ``out_vd [V, D]``
      (tied embedding or ``lm_head``), ``targets_bt``/``mask_bt [..., T]`` and
      options as ``token_stats_from_hidden``.

    Returns:
      ``[...]`` float32 (float64 for float64 inputs) sums.
    """
    return token_logps_from_hidden(hidden_btd, out_vd, targets_bt, mask_bt,
                                   chunk_size=chunk_size, max_tokens=max_tokens,
                                   validate=validate, softcap=softcap).sum(axis=-1)


# ---- WPO weights and LD-DPO (TRL 1.16 DPOTrainer semantics) ------------------


def wpo_sequence_weights(logps_bt, log_sum_sq_probs_bt, mask_bt):
    """WPO weight of each sequence (TRL ``use_weighting``; WPO paper eq. 2).

    ``w = exp(sum_t m_t (log p_t - log sum_v p_v^2) / max(sum_t m_t, 1))``: the
    geometric mean over completion tokens of the target probability normalised
    by the distribution's collision probability. No gradient flows through it.

    Args:
      logps_bt: ``[..., T]`` per-token log-probs (``TokenStats.logps_bt``).
      log_sum_sq_probs_bt: ``[..., T]`` ``TokenStats.log_sum_sq_probs_bt``.
      mask_bt: ``[..., T]`` completion mask.

    Returns:
      ``[...]`` weights.
    """
    mask = (mask_bt != 0)
    aligned = jnp.where(mask, lax.stop_gradient(logps_bt - log_sum_sq_probs_bt), 0.0)
    lengths = jnp.maximum(mask.sum(axis=-1), 1).astype(aligned.dtype)
    return jnp.exp(aligned.sum(axis=-1) / lengths)


def wpo_weights(logps_bkt, log_sum_sq_probs_bkt, mask_bkt):
    """Per-group WPO weights: the product of the K sequences' weights.

    For K = 2 (chosen, rejected) this is TRL's ``chosen_weights *
    rejected_weights``, by which each pair's loss is multiplied.

    Args:
      logps_bkt: ``[..., K, T]`` per-token log-probs.
      log_sum_sq_probs_bkt: ``[..., K, T]`` ``log(sum_v p_v^2)`` per token.
      mask_bkt: ``[..., K, T]`` completion mask.

    Returns:
      ``[...]`` weights, e.g. ``[B]``.
    """
    if logps_bkt.ndim < 2:
        raise ValueError(f"wpo_weights needs [..., K, T] inputs, got shape {logps_bkt.shape}")
    return wpo_sequence_weights(logps_bkt, log_sum_sq_probs_bkt, mask_bkt).prod(axis=-1)


def ld_sequence_logps(logps_bkt, mask_bkt, alpha: float):
    """LD-DPO per-sequence log-probs (TRL ``ld_alpha``).

    Within each group the completion tokens up to the shortest completion's
    length count fully and those past it are scaled by ``alpha``:
    ``sum_{pos <= l_min} log p + alpha * sum_{pos > l_min} log p`` with ``pos``
    the 1-based index among completion tokens. For K = 2 this is exactly TRL's
    chosen/rejected rule; for K > 2 ``l_min`` is the minimum over the group.

    Args:
      logps_bkt: ``[..., K, T]`` per-token log-probs (zero where masked).
      mask_bkt: ``[..., K, T]`` completion mask.
      alpha: weight of the tokens past the shared length (1 gives plain sums).

    Returns:
      ``[..., K]`` log-probs.
    """
    if logps_bkt.ndim < 2 or logps_bkt.shape != mask_bkt.shape:
        raise ValueError(
            f"ld_sequence_logps needs matching [..., K, T] inputs, got {logps_bkt.shape} "
            f"and {mask_bkt.shape}"
        )
    mask = (mask_bkt != 0)
    pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1)
    shared_len = mask.sum(axis=-1).min(axis=-1, keepdims=True)[..., None]  # [..., 1, 1]
    lp = jnp.where(mask, logps_bkt, jnp.zeros((), logps_bkt.dtype))
    shared = jnp.where((pos > 0) & (pos <= shared_len), lp, 0.0).sum(axis=-1)
    tail = jnp.where(pos > shared_len, lp, 0.0).sum(axis=-1)
    return shared + alpha * tail
