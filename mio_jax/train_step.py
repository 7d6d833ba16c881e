"""Pure train and eval steps: ``(state, batch, consts) -> (state, metrics)``.

One forward runs over all completions of a group stacked as ``[B, K, L]``
(index 0 chosen / positive), per-sequence log-probs come from the final hidden
states through the vocabulary-chunked projection of ``mio_jax.logps``, and the
loss comes from the ``mio_jax.losses`` registry, so DPO and MIO differ only by
the loss name.

Normalisation is exact under gradient accumulation: every micro-batch returns
the weighted SUM of its per-group losses (and metrics) together with the sum of
its group weights; gradients and metrics are divided by the total weight once,
after the last micro-batch, so ``A`` micro-batches of ``b`` groups give the same
result as one batch of ``A * b`` groups (for every loss whose per-group value
does not depend on other groups of the batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from mio_jax import logps as logps_lib
from mio_jax import losses as losses_lib

# Batch fields with a leading [B] (group) axis that the step reads.
_SEQ_FIELDS = ("input_ids", "targets", "loss_mask", "positions", "attention_mask")


@struct.dataclass
class TrainState:
    """The whole mutable state of training (an immutable pytree).

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: pure dict of trainable parameter arrays (master dtype).
      opt_state: the optax state.
      rng: uint32 ``[2]`` PRNG key data (split once per step).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step (hashable; part of the jit cache key).

    Attributes:
      loss_name: a registered loss, or a tuple of names for a weighted mix.
      beta: the loss temperature.
      loss_hparams: sorted ``(name, value)`` hyper-parameters of the loss.
      loss_weights: mix weights (None: all 1).
      grad_accum_steps: micro-batches per optimizer step (A).
      chunk_size: vocabulary chunk of the log-prob projection.
      reference: "frozen", "precomputed" or "none".
      lengths: pass completion lengths to the loss (needed by length-normalised losses).
      ld_alpha: LD-DPO weight of tokens past the shorter completion (None: off).
      use_weighting: WPO weighting of each group's loss (TRL ``use_weighting``).
      max_tokens_fraction: if set, the output projection runs only on completion
        positions, gathered into a static block of ``ceil(fraction * B*K*L)``
        rows (rounded up to a multiple of 8) taken from the batch shape; a batch
        with more completion tokens than that gives NaN log-probs (caught by the
        NaN guard), never silently dropped tokens. None: project every position.
      weight_norms: also report ``param_norm`` (after the update) and ``update_norm``;
        each is one more pass over all weights per step (about 3 % of a SmolLM2 CPU
        step each, ~0.5 % on an accelerator), so they are opt-in.
    """

    loss_name: str | tuple[str, ...]
    beta: float
    loss_hparams: tuple[tuple[str, Any], ...] = ()
    loss_weights: tuple[float, ...] | None = None
    grad_accum_steps: int = 1
    chunk_size: int = logps_lib.DEFAULT_CHUNK_SIZE
    reference: str = "frozen"
    lengths: bool = True
    ld_alpha: float | None = None
    use_weighting: bool = False
    max_tokens_fraction: float | None = None
    weight_norms: bool = False


def completion_block(cfg: StepConfig, mask_shape) -> int | None:
    """Rows of the completion-only projection block for a (micro-)batch ``loss_mask`` of
    this shape: ``ceil(fraction * size)`` rounded up to a multiple of 8; None when off."""
    if cfg.max_tokens_fraction is None:
        return None
    if not 0.0 < cfg.max_tokens_fraction <= 1.0:
        raise ValueError(f"max_tokens_fraction={cfg.max_tokens_fraction} not in (0, 1]")
    n = math.prod(mask_shape)
    return min(n, -(-int(math.ceil(cfg.max_tokens_fraction * n)) // 8) * 8)


def projection_fits(cfg: StepConfig, mask_shape, row_counts) -> bool:
    """Host-side check before a step: does every micro-batch's completion-token count fit
    the static projection block? (A step whose batch does not fit would give NaN.)

    Args:
      cfg: the step's settings (``max_tokens_fraction``, ``grad_accum_steps``).
      mask_shape: shape of the GLOBAL batch's ``loss_mask`` (rows first).
      row_counts: completion tokens of each global row, in row order (numpy ``[rows]``).
    """
    a = cfg.grad_accum_steps
    block = completion_block(cfg, (mask_shape[0] // a, *mask_shape[1:]))
    if block is None:
        return True
    counts = np.asarray(row_counts).reshape(-1, a).sum(axis=0)  # row j*A + i -> micro i
    return int(counts.max()) <= block


def _sequence_index(batch):
    """Flat sequence id ``b * K + k`` of every token of a packed / shared batch.

    Tokens that count for no sequence get ``B * K`` (a dropped bin). Returns
    ``(seq_ids, B, K)``.
    """
    b, k = batch["valid"].shape
    slot = batch["slot_index"]
    if "segment_ids" in batch:
        group = batch["group_index"]
    else:  # shared-prompt rows: row r is group r
        group = jnp.broadcast_to(jnp.arange(slot.shape[0])[:, None], slot.shape)
    ok = (group >= 0) & (slot >= 0)
    return jnp.where(ok, group * k + slot, b * k), b, k


def _sums_by_sequence(tok_rl, batch):
    seq, b, k = _sequence_index(batch)
    sums = jax.ops.segment_sum(tok_rl.reshape(-1), seq.reshape(-1), num_segments=b * k + 1)
    return sums[: b * k].reshape(b, k)


def _forward_packed(model, batch, cfg: StepConfig):
    """Padding-free packed rows ``[R, L]`` -> per-sequence sums ``[B, K]``."""
    hidden = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"],
                                 positions=batch["positions"], segment_ids=batch["segment_ids"])
    tok_rl = logps_lib.token_logps_from_hidden(
        hidden, model.output_matrix(), batch["targets"], batch["loss_mask"],
        chunk_size=cfg.chunk_size, max_tokens=completion_block(cfg, batch["loss_mask"].shape),
        validate=False)
    return _sums_by_sequence(tok_rl, batch)


def _forward_shared(model, batch, cfg: StepConfig):
    """Shared-prompt rows ``[B, T]`` (``mio_jax.data.shared_prompt``) -> sums ``[B, 2]``."""
    from mio_jax.data.shared_prompt import shared_attention_mask

    hidden = model.hidden_states(batch["input_ids"],
                                 attention_mask=shared_attention_mask(batch["shared_code"]),
                                 positions=batch["positions"])
    tok_bt = logps_lib.token_logps_from_hidden(
        hidden, model.output_matrix(), batch["targets"], batch["loss_mask"],
        chunk_size=cfg.chunk_size, max_tokens=completion_block(cfg, batch["loss_mask"].shape),
        validate=False)
    return _sums_by_sequence(tok_bt, batch)


def _forward_logps(graphdef, params, other, batch, cfg: StepConfig):
    """Per-sequence log-probs ``[B, K]`` (+ WPO weights ``[B]`` or None)."""
    model = nnx.merge(graphdef, params, other)
    if "segment_ids" in batch or "shared_code" in batch:
        if cfg.ld_alpha is not None or cfg.use_weighting:
            raise ValueError("ld_alpha / use_weighting need the unshared [B, K, L] layout "
                             "(not packing or shared-prompt rows)")
        fwd = _forward_packed if "segment_ids" in batch else _forward_shared
        return fwd(model, batch, cfg), None
    b, k, l = batch["input_ids"].shape
    flat = {f: batch[f].reshape(b * k, l) for f in _SEQ_FIELDS}
    hidden = model.hidden_states(flat["input_ids"], attention_mask=flat["attention_mask"],
                                 positions=flat["positions"])
    hidden = hidden.reshape(b, k, l, hidden.shape[-1])
    mask = batch["loss_mask"]
    if cfg.ld_alpha is None and not cfg.use_weighting:
        return logps_lib.sequence_logps_from_hidden(
            hidden, model.output_matrix(), batch["targets"], mask,
            chunk_size=cfg.chunk_size, max_tokens=completion_block(cfg, mask.shape),
            validate=False), None
    stats = logps_lib.token_stats_from_hidden(
        hidden, model.output_matrix(), batch["targets"], mask, chunk_size=cfg.chunk_size,
        with_log_sum_sq=cfg.use_weighting, validate=False)
    if cfg.ld_alpha is not None:
        seq = logps_lib.ld_sequence_logps(stats.logps_bt, mask, cfg.ld_alpha)
    else:
        seq = stats.logps_bt.sum(axis=-1)
    wpo = (logps_lib.wpo_weights(stats.logps_bt, stats.log_sum_sq_probs_bt, mask)
           if cfg.use_weighting else None)
    return seq, wpo


def reference_logps(graphdef, ref_params, other, batch, cfg: StepConfig) -> jax.Array:
    """Reference per-sequence log-prob sums ``[B, K]`` (no gradient)."""
    ref_cfg = dataclasses.replace(cfg, use_weighting=False)
    seq, _ = _forward_logps(graphdef, ref_params, other, batch, ref_cfg)
    return jax.lax.stop_gradient(seq)


def _weighted_sums(params, graphdef, other, batch, ref_params, cfg: StepConfig):
    """Weighted loss sum of one micro-batch, plus metric sums and the weight sum."""
    if cfg.reference == "frozen":
        ref_bk = reference_logps(graphdef, ref_params, other, batch, cfg)
        # The reference forward runs to completion before the policy forward starts, so
        # its temporaries are freed before the policy's saved activations pile up (left to
        # the scheduler, the two can overlap and add up at the memory peak).
        ref_bk, params = jax.lax.optimization_barrier((ref_bk, params))
    elif cfg.reference == "precomputed":
        ref_bk = batch["ref_logps"]
    else:
        ref_bk = None
    policy_bk, wpo_b = _forward_logps(graphdef, params, other, batch, cfg)
    mask = batch["loss_mask"]
    if "segment_ids" in batch or "shared_code" in batch:
        seq, b, k = _sequence_index(batch)
        counts = jax.ops.segment_sum((mask != 0).astype(jnp.float32).reshape(-1),
                                     seq.reshape(-1), num_segments=b * k + 1)
        lengths_bk = counts[: b * k].reshape(b, k) if cfg.lengths else None
    else:
        lengths_bk = (mask != 0).sum(axis=-1).astype(jnp.float32) if cfg.lengths else None
    w_b = batch["weights"].astype(jnp.float32)
    # A padding group (weight 0) has no valid completion; a multi-negative loss over
    # zero negatives is 0/0. Mark its (finite, empty) slots valid so its loss stays
    # finite; its zero weight then removes it from sums and gradients alike.
    valid = batch["valid"].astype(bool) | (w_b <= 0)[:, None]
    losses_b, metrics = losses_lib.compute_group(
        cfg.loss_name, policy_logps=policy_bk, ref_logps=ref_bk, beta=cfg.beta,
        lengths=lengths_bk, valid=valid, loss_weights=cfg.loss_weights,
        **dict(cfg.loss_hparams))
    if wpo_b is not None:
        losses_b = losses_b * jax.lax.stop_gradient(wpo_b)
        metrics = dict(metrics, **{"wpo/weights": wpo_b})
    loss_sum = jnp.sum(w_b * losses_b)
    sums = {k: jnp.sum(w_b * v.astype(jnp.float32)) for k, v in metrics.items()
            if v.ndim == 1}
    sums["loss"] = jax.lax.stop_gradient(loss_sum)
    counts = {
        "num_tokens": jnp.sum(batch["attention_mask"] != 0).astype(jnp.float32),
        "completion_tokens": jnp.sum(mask != 0).astype(jnp.float32),
        "num_groups": jnp.sum(w_b > 0).astype(jnp.float32),
    }
    return loss_sum, (sums, counts, jnp.sum(w_b))


def _micro_batches(batch: dict, a: int) -> dict:
    """``[A*b, ...] -> [A, b, ...]`` keeping each device's rows on that device.

    Row ``j * A + i`` goes to micro-batch ``i``; the batch axis stays the one
    split over devices, so no data moves.
    """
    def split(x):
        g = x.shape[0]
        if g % a:
            raise ValueError(f"batch of {g} groups is not divisible by grad_accum_steps={a}")
        return jnp.swapaxes(x.reshape(g // a, a, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _accumulate(params, graphdef, other, batch, ref_params, cfg: StepConfig):
    """Gradient and metric SUMS over ``cfg.grad_accum_steps`` micro-batches."""
    grad_fn = jax.value_and_grad(_weighted_sums, has_aux=True)
    if cfg.grad_accum_steps == 1:
        (_, aux), grads = grad_fn(params, graphdef, other, batch, ref_params, cfg)
        return grads, aux
    micro = _micro_batches(batch, cfg.grad_accum_steps)

    def body(carry, mb):
        grads_acc, aux_acc = carry
        (_, aux), grads = grad_fn(params, graphdef, other, mb, ref_params, cfg)
        return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, aux_acc, aux)), None

    first = jax.tree.map(lambda x: x[0], micro)
    aux_shape = jax.eval_shape(lambda: grad_fn(params, graphdef, other, first, ref_params, cfg)[0][1])
    zeros_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.result_type(p.dtype, jnp.float32)),
                           params)
    (grads, aux), _ = jax.lax.scan(body, (zeros_g, zeros_aux), micro)
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), aux


def _finish_metrics(sums, counts, denom):
    safe = jnp.maximum(denom, jnp.finfo(jnp.float32).tiny)
    out = {k: v / safe for k, v in sums.items()}
    out.update(counts)
    return out


def train_step(state: TrainState, batch: dict, consts: dict, *, graphdef, tx,
               schedule, cfg: StepConfig) -> tuple[TrainState, dict]:
    """One optimizer step (pure; jit it with ``static_argnames`` bound via partial).

    Args:
      state: the ``TrainState``.
      batch: dict of ``[B, K, L]`` arrays ``input_ids, targets, loss_mask,
        positions, attention_mask`` plus ``weights [B]``, ``valid [B, K]`` and,
        for precomputed references, ``ref_logps [B, K]``.
      consts: ``{"other": non-trainable model state, "ref_params": frozen
        reference params or None}``.
      graphdef: the model's nnx GraphDef.
      tx: the optax transformation; schedule: its learning-rate schedule.
      cfg: ``StepConfig``.

    Returns:
      ``(new_state, metrics)``: scalar metrics (weighted means over the groups
      of the step, token counts as sums), including ``loss``, ``grad_norm``,
      ``param_norm``, ``update_norm`` and ``learning_rate``.
    """
    grads, (sums, counts, denom) = _accumulate(
        state.params, graphdef, consts["other"], batch, consts.get("ref_params"), cfg)
    safe = jnp.maximum(denom, jnp.finfo(jnp.float32).tiny)
    grads = jax.tree.map(lambda g: (g / safe).astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _finish_metrics(sums, counts, denom)
    metrics.update({
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
    })
    if cfg.weight_norms:
        metrics.update({"update_norm": optax.tree.norm(updates),
                        "param_norm": optax.tree.norm(params)})
    rng, _ = jax.random.split(jax.random.wrap_key_data(state.rng))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              rng=jax.random.key_data(rng))
    return new_state, metrics


def eval_step(params, batch: dict, consts: dict, *, graphdef, cfg: StepConfig) -> tuple[dict, dict, jax.Array]:
    """Metric sums of one eval batch (no update); divide by the summed weights on the host.

    Returns:
      ``(sums, counts, weight_sum)``: weighted metric sums (``loss`` included),
      token counts, and the batch's total group weight.
    """
    _, aux = _weighted_sums(params, graphdef, consts["other"], batch, consts.get("ref_params"), cfg)
    return aux


def init_state(params, tx, seed: int) -> TrainState:
    """A fresh ``TrainState`` at step 0 (jit with out_shardings to build it sharded)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))
