"""Batch layouts as types, and one function per layout from (model, batch) to log-probs.

Three layouts hold the same groups (B groups of K completions; index 0 chosen / positive):

* ``PreferenceBatch`` ``[B, K, L]``: every sequence in its own padded row (any K).
* ``PackedBatch`` ``[R, L]``: sequences packed padding-free into rows, one segment each.
* ``SharedPromptBatch`` ``[B, T]``: each group in ONE row ``[prompt | completion 0 |
  completion 1 | ...]`` (a pair: chosen, rejected), the prompt computed once.

The data pipeline builds them (``mio_jax.data``), with global shapes taken from its plan,
so every process of a run holds batches of the same global shape. The train step
dispatches once, on the type (``sequence_logps``); nothing looks at which fields exist.

Token convention (every layout): ``targets[..., t]`` is the token after
``input_ids[..., t]``, and ``loss_mask[..., t]`` is 1 where ``targets[..., t]`` is a
completion token whose log-prob counts. A sequence of n tokens (P prompt + C completion)
fills positions 0..n-1; its last position has no next token (target pad_id, mask 0), so
the mask has exactly C ones at positions P-1..n-2.

Group fields, the same in every layout: ``weights [B]`` float32 (0 for padding groups),
``valid [B, K]`` bool (slot k holds a sequence), ``example_id [B]`` int32 (index into the
prepared split, -1 for padding groups) and ``ref_logps [B, K]`` float32, the precomputed
reference log-prob sums, or None when the run has no precomputed reference.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mio_jax import logps as logps_lib

# The per-token fields of every layout (int32, same shape).
TOKEN_FIELDS = ("input_ids", "targets", "loss_mask", "positions", "attention_mask")


@struct.dataclass
class PreferenceBatch:
    """B groups of K sequences, each right-padded to L tokens.

    Numpy on the host, ``jax.Array`` after ``mio_jax.data.to_global_arrays``.

    Attributes:
      input_ids: [B, K, L] int32; pad_id at padding.
      targets: [B, K, L] int32; token after input_ids[t]; pad_id where none.
      loss_mask: [B, K, L] int32 {0, 1}; 1 where targets[t] is a completion token.
      positions: [B, K, L] int32; 0..n-1 on real tokens, 0 at padding.
      attention_mask: [B, K, L] int32 {0, 1}; 1 = real token.
      weights: [B] float32; group weight, 0 for padding groups.
      valid: [B, K] bool; slot k holds a sequence (False for missing K-way negatives and
        padding groups).
      example_id: [B] int32; index of the group in the prepared split, -1 for padding.
      ref_logps: [B, K] float32 precomputed reference sums, or None.
      advantages: [B, K] float32 per-completion advantages of a rollout batch (policy-
        gradient losses), else None.
      old_token_logps: [B, K, L] float32 per-token log-probs under the policy that sampled
        the rollouts, or None (on-policy).
      ref_token_logps: [B, K, L] float32 per-token reference log-probs, or None.
    """

    input_ids: Any
    targets: Any
    loss_mask: Any
    positions: Any
    attention_mask: Any
    weights: Any
    valid: Any
    example_id: Any
    ref_logps: Any = None
    advantages: Any = None
    old_token_logps: Any = None
    ref_token_logps: Any = None


@struct.dataclass
class PackedBatch:
    """B groups of K sequences packed into R rows of L tokens (padding-free).

    Each sequence (group b, slot k) is one segment of one row; segments never attend to
    each other and positions restart at 0 in each segment.

    Attributes:
      input_ids, targets, loss_mask, positions, attention_mask: [R, L] int32, as in
        ``PreferenceBatch`` but per segment (a segment's last token has target pad_id and
        mask 0; targets never cross segments).
      segment_ids: [R, L] int32; 1, 2, ... per segment within a row, 0 = padding.
      group_index: [R, L] int32; the token's group b in [0, B) of the GLOBAL batch, -1 at
        padding.
      slot_index: [R, L] int32; the token's slot k in [0, K), -1 at padding.
      weights, valid, example_id, ref_logps: the group fields ([B], [B, K]).
      advantages, old_token_logps, ref_token_logps: a rollout batch's fields as in
        ``PreferenceBatch``, the per-token tables ``[B, K, L]`` indexed by a token's
        position in its sequence (``token_table``).
    """

    input_ids: Any
    targets: Any
    loss_mask: Any
    positions: Any
    attention_mask: Any
    segment_ids: Any
    group_index: Any
    slot_index: Any
    weights: Any
    valid: Any
    example_id: Any
    ref_logps: Any = None
    advantages: Any = None
    old_token_logps: Any = None
    ref_token_logps: Any = None

    def model_inputs(self) -> dict:
        return {"attention_mask": self.attention_mask, "positions": self.positions,
                "segment_ids": self.segment_ids}

    def token_groups(self):
        """[R, L] the token's group (-1 at padding)."""
        return self.group_index

    def sequence_ids(self):
        """Flat sequence id ``b * K + k`` of every token; ``B * K`` where none."""
        b, k = self.valid.shape
        ok = (self.group_index >= 0) & (self.slot_index >= 0)
        return jnp.where(ok, self.group_index * k + self.slot_index, b * k)


# SharedPromptBatch.shared_code values (per token): the segment of completion k has code
# CHOSEN + k (so REJECTED for k = 1 of a pair).
PAD, PROMPT, LAST_PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3, 4


@struct.dataclass
class SharedPromptBatch:
    """B groups of K completions of one prompt, each group in one row of T tokens:
    ``[prompt x_0..x_{P-1} | completion 0 | x_{P-1} | completion 1 | x_{P-1} | ...]``
    (built by ``mio_jax.data.shared_prompt.to_shared_prompt``; pairs are K = 2, chosen
    then rejected; a rollout group is K = G samples).

    The last prompt token is written once more at the head of every completion segment
    after the first: the copy predicts that completion's first token. Completion 0 sees the
    prompt; completion k > 0 sees the prompt without its last token (its copy stands in for
    it), and positions restart at P-1 for it, so each token sees exactly what it sees
    unshared, at the same position.

    Attributes:
      input_ids, targets, loss_mask, positions, attention_mask: [B, T] int32 (padding at
        the end of each row: pad_id, mask 0, position 0).
      shared_code: [B, T] int32; 0 pad, 1 prompt, 2 last prompt token, 3 + k the segment of
        completion k (the attention mask is built from it on device).
      slot_index: [B, T] int32; k where the token's target counts for completion k, -1
        elsewhere.
      weights, valid, example_id, ref_logps: the group fields ([B], [B, K]).
      advantages, old_token_logps, ref_token_logps: a rollout batch's fields as in
        ``PreferenceBatch``, the per-token tables ``[B, K, T]`` indexed by a token's
        position in its unshared sequence (``token_table``).
    """

    input_ids: Any
    targets: Any
    loss_mask: Any
    positions: Any
    attention_mask: Any
    shared_code: Any
    slot_index: Any
    weights: Any
    valid: Any
    example_id: Any
    ref_logps: Any = None
    advantages: Any = None
    old_token_logps: Any = None
    ref_token_logps: Any = None

    def model_inputs(self) -> dict:
        return {"attention_mask": shared_attention_mask(self.shared_code),
                "positions": self.positions}

    def token_groups(self):
        """[B, T] the token's group: its row."""
        return jnp.broadcast_to(jnp.arange(self.slot_index.shape[0])[:, None],
                                self.slot_index.shape)

    def sequence_ids(self):
        """Flat sequence id ``b * K + k`` of every token; ``B * K`` where none."""
        b, k = self.valid.shape
        return jnp.where(self.slot_index >= 0, self.token_groups() * k + self.slot_index, b * k)


Batch = PreferenceBatch | PackedBatch | SharedPromptBatch


def shared_attention_mask(shared_code_bt) -> jax.Array:
    """Boolean ``[B, T, T]`` mask (True = query t may see key s) of the shared layout: every
    real token sees the prompt; the last prompt token is seen by the prompt and by
    completion 0; a completion's tokens see their own segment.

    Causality is not included (the model adds it).
    """
    code = jnp.asarray(shared_code_bt)
    q, k = code[:, :, None], code[:, None, :]
    return (((k == PROMPT) & (q != PAD))
            | ((k == LAST_PROMPT) & ((q == PROMPT) | (q == LAST_PROMPT) | (q == CHOSEN)))
            | ((k >= CHOSEN) & (q == k)))


class SequenceLogps(NamedTuple):
    """Per-sequence results of one forward.

    Attributes:
      logps: [B, K] float32 sums of completion-token log-probs (or LD-DPO's weighted sum).
      lengths: [B, K] float32 completion tokens per sequence.
      wpo_weights: [B] WPO weights (``use_weighting``), else None.
      router: a mixture of experts' router statistics, summed over its layers and the
        batch's real tokens (``models.moe.RouterStats``); None for a dense model.
    """

    logps: jax.Array
    lengths: jax.Array
    wpo_weights: jax.Array | None = None
    router: Any = None  # models.moe.RouterStats of a mixture of experts' forward, else None


def check_completion_fraction(fraction: float | None) -> None:
    """The completion-only projection's fraction must be None (off) or in (0, 1]."""
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"completion-only projection fraction {fraction} not in (0, 1] "
                         "(StepConfig.max_tokens_fraction; None projects every position)")


def completion_block(fraction: float | None, mask_shape) -> int | None:
    """Rows of the completion-only projection block for a ``loss_mask`` of this shape:
    ``ceil(fraction * size)`` rounded up to a multiple of 8; None when ``fraction`` is None.
    """
    check_completion_fraction(fraction)
    if fraction is None:
        return None
    n = math.prod(mask_shape)
    return min(n, -(-int(math.ceil(fraction * n)) // 8) * 8)


def sequence_logps(model, batch: Batch, *, chunk_size: int = logps_lib.DEFAULT_CHUNK_SIZE,
                   completion_fraction: float | None = None, ld_alpha: float | None = None,
                   use_weighting: bool = False) -> SequenceLogps:
    """Per-sequence log-probs ``[B, K]`` of a typed batch under ``model``.

    Args:
      model: an nnx decoder (``hidden_states``, ``output_matrix`` and the final-logit
        soft-cap of its ``cfg``).
      batch: one of the three layouts.
      chunk_size: vocabulary chunk of the projection.
      completion_fraction: project only completion positions, gathered into a static
        block of this fraction of the batch's token slots (``completion_block``); a batch
        with more completion tokens gives NaN, never silently dropped tokens.
      ld_alpha: LD-DPO weight of tokens past the shorter completion (unshared only).
      use_weighting: also return TRL's WPO weights (unshared only).

    Raises:
      TypeError: for an object that is not one of the layouts.
      ValueError: ``ld_alpha`` / ``use_weighting`` with a row layout.
    """
    check_token_options(type(batch), ld_alpha=ld_alpha, use_weighting=use_weighting)
    block = completion_block(completion_fraction, np.shape(batch.loss_mask))
    if isinstance(batch, PreferenceBatch):
        return _unshared_logps(model, batch, chunk_size, block, ld_alpha, use_weighting)
    return _row_logps(model, batch, chunk_size, block)


def check_token_options(layout: type, *, ld_alpha: float | None, use_weighting: bool) -> None:
    """LD-DPO (``ld_alpha``) and WPO (``use_weighting``) read each sequence's tokens in
    order, which only the unshared layout keeps.

    Raises:
      TypeError: ``layout`` is not one of the batch layouts.
      ValueError: one of the options with a row layout.
    """
    if layout not in (PreferenceBatch, PackedBatch, SharedPromptBatch):
        raise TypeError(f"not a batch layout: {layout.__name__}")
    if layout is not PreferenceBatch and (ld_alpha is not None or use_weighting):
        raise ValueError("ld_alpha / use_weighting need the unshared [B, K, L] layout "
                         f"(got {layout.__name__})")


def _hidden(model, input_ids, **inputs):
    """`(hidden, router stats or None)`: the stats where the model is a mixture of experts."""
    if getattr(model.cfg, "moe", False):
        return model.hidden_states(input_ids, with_router_stats=True, **inputs)
    return model.hidden_states(input_ids, **inputs), None


def _unshared_hidden(model, batch: PreferenceBatch):
    b, k, l = batch.input_ids.shape
    hidden, router = _hidden(model, batch.input_ids.reshape(b * k, l),
                             attention_mask=batch.attention_mask.reshape(b * k, l),
                             positions=batch.positions.reshape(b * k, l))
    return hidden.reshape(b, k, l, hidden.shape[-1]), router


def token_logps(model, batch: Batch, *, chunk_size: int = logps_lib.DEFAULT_CHUNK_SIZE,
                with_entropy: bool = False, with_router: bool = False):
    """Per-token log-prob of each target token under ``model`` (0 where ``loss_mask`` is 0),
    and with ``with_entropy`` each position's entropy (no gradient): what policy-gradient
    losses read. ``[B, K, L]`` for the unshared layout; a row layout's values are placed
    by ``token_table`` at the same ``[b, k, position]`` as unshared, in a ``[B, K, X]``
    table (X the row length).

    Returns:
      ``logps.TokenStats``; with ``with_router``, ``(TokenStats, router statistics of a
      mixture of experts or None)`` (as ``SequenceLogps.router``).
    """
    if isinstance(batch, PreferenceBatch):
        hidden, router = _unshared_hidden(model, batch)
        stats = logps_lib.token_stats_from_hidden(
            hidden, model.output_matrix(), batch.targets, batch.loss_mask,
            chunk_size=chunk_size, with_entropy=with_entropy, validate=False,
            softcap=model.cfg.final_logit_softcapping)
    else:
        hidden, router = _hidden(model, batch.input_ids, **batch.model_inputs())
        rows = logps_lib.token_stats_from_hidden(
            hidden, model.output_matrix(), batch.targets, batch.loss_mask,
            chunk_size=chunk_size, with_entropy=with_entropy, validate=False,
            softcap=model.cfg.final_logit_softcapping)
        stats = logps_lib.TokenStats(
            token_table(rows.logps_bt, batch), None,
            None if rows.entropy_bt is None else token_table(rows.entropy_bt, batch))
    return (stats, router) if with_router else stats


def token_table(values, batch: Batch):
    """``[B, K, X]`` per-completion table of per-token ``values``, zero where no completion
    token counts (``loss_mask`` 0).

    Unshared: ``values`` is ``[B, K, L]`` already (masked). Row layouts: ``values [R, X]``
    of the rows; the token that predicts a completion's target goes to ``[b, k, position]``,
    its slot in the unshared layout (a shared row's completion k > 0 restarts its positions
    at the prompt's last token, so positions are the unshared ones there too).
    """
    mask = batch.loss_mask != 0
    if isinstance(batch, PreferenceBatch):
        return jnp.where(mask, values, 0)
    b, k = batch.valid.shape
    x = batch.input_ids.shape[-1]
    ok = mask & (batch.slot_index >= 0)
    flat = jnp.where(ok, (batch.token_groups() * k + batch.slot_index) * x + batch.positions,
                     b * k * x)
    out = jnp.zeros((b * k * x + 1,), values.dtype).at[flat.reshape(-1)].add(
        jnp.where(ok, values, 0).reshape(-1))
    return out[: b * k * x].reshape(b, k, x)


def _unshared_logps(model, batch: PreferenceBatch, chunk_size, block, ld_alpha,
                    use_weighting) -> SequenceLogps:
    hidden, router = _unshared_hidden(model, batch)
    mask = batch.loss_mask
    lengths = (mask != 0).sum(axis=-1).astype(jnp.float32)
    if ld_alpha is None and not use_weighting:
        seq = logps_lib.sequence_logps_from_hidden(
            hidden, model.output_matrix(), batch.targets, mask, chunk_size=chunk_size,
            max_tokens=block, validate=False,
            softcap=model.cfg.final_logit_softcapping)
        return SequenceLogps(seq, lengths, router=router)
    stats = logps_lib.token_stats_from_hidden(
        hidden, model.output_matrix(), batch.targets, mask, chunk_size=chunk_size,
        with_log_sum_sq=use_weighting, validate=False,
            softcap=model.cfg.final_logit_softcapping)
    seq = (logps_lib.ld_sequence_logps(stats.logps_bt, mask, ld_alpha) if ld_alpha is not None
           else stats.logps_bt.sum(axis=-1))
    wpo = (logps_lib.wpo_weights(stats.logps_bt, stats.log_sum_sq_probs_bt, mask)
           if use_weighting else None)
    return SequenceLogps(seq, lengths, wpo, router)


def _row_logps(model, batch: PackedBatch | SharedPromptBatch, chunk_size,
               block) -> SequenceLogps:
    """Packed and shared-prompt rows differ only in their mask and sequence ids."""
    hidden, router = _hidden(model, batch.input_ids, **batch.model_inputs())
    tok = logps_lib.token_logps_from_hidden(
        hidden, model.output_matrix(), batch.targets, batch.loss_mask, chunk_size=chunk_size,
        max_tokens=block, validate=False,
            softcap=model.cfg.final_logit_softcapping)
    counts = (batch.loss_mask != 0).astype(jnp.float32)
    return SequenceLogps(sequence_sums(tok, batch), sequence_sums(counts, batch), router=router)


def sequence_sums(token_values, batch: PackedBatch | SharedPromptBatch) -> jax.Array:
    """Sums per-token values ``[R, L]`` of a row layout into ``[B, K]`` per sequence.

    Tokens that count for no sequence (padding, prompt tokens of a shared row) fall in a
    dropped bin; mask the values first if only completion tokens should count.
    """
    b, k = batch.valid.shape
    sums = jax.ops.segment_sum(token_values.reshape(-1), batch.sequence_ids().reshape(-1),
                               num_segments=b * k + 1)
    return sums[: b * k].reshape(b, k)
