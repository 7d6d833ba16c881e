"""Shared-prompt layout: a prompt and its K completions in one row, the prompt run once.

An unshared batch ``[B, K, L]`` runs each group's prompt K times (once per completion).
This layout writes each group as ONE row ``[B, T]``::

    [ prompt x_0 .. x_{P-1} | completion 0 | x_{P-1} | completion 1 | x_{P-1} | ... ]

i.e. the whole first sequence (for a pair: chosen) followed by every other sequence from
its last prompt token on. The last prompt token is written again at the head of each later
segment because it predicts that completion's first token, whose target differs per
completion. A ``[B, T, T]`` boolean attention mask (built on device from ``shared_code``
by ``mio_jax.layouts.shared_attention_mask``) lets

* prompt tokens see the prompt (causally),
* completion 0's tokens see the prompt and earlier tokens of completion 0,
* a later segment (the copied token and completion k's tokens) see the prompt WITHOUT its
  last token (the copy stands in for it) and earlier tokens of its own segment.

Positions restart at ``P-1`` for every later segment, so every token sees exactly the keys,
at exactly the positions, it sees in the unshared layout: per-sequence log-probs are equal
up to float summation order (tests/data/test_shared_prompt.py checks them).

Row length ``T = n_0 + sum_{k>0} (n_k - P + 1)`` instead of ``K L``: a pair with half of
each sequence prompt sends ~25 % fewer tokens through the MLPs and projections; a rollout
group of G = 8 completions with a long prompt, far more. The written-out attention still
computes the full ``T x T`` scores of a row (masked), against ``K L^2`` unshared.
"""

from __future__ import annotations

import numpy as np

from mio_jax.layouts import (CHOSEN, LAST_PROMPT, PROMPT, TOKEN_FIELDS, PreferenceBatch,
                             SharedPromptBatch)


def _prompt_length(mask_l: np.ndarray, where: str) -> int:
    nz = np.flatnonzero(mask_l)
    if nz.size == 0:
        raise ValueError(f"{where}: no completion token (loss_mask all zero)")
    if nz[-1] - nz[0] + 1 != nz.size:
        raise ValueError(f"{where}: loss_mask is not one contiguous completion span")
    return int(nz[0]) + 1


def shared_row_length(seq_lengths, prompt_len: int) -> int:
    """Tokens of one group's shared row, ``n_0 + sum_{k>0} (n_k - P + 1)``, from its
    sequence lengths ``n_k`` (prompt included; 0 for an empty slot) and the prompt's ``P``
    tokens."""
    first, *rest = (int(n) for n in seq_lengths)
    p = max(int(prompt_len), 1)
    return first + sum(n - p + 1 for n in rest if n > 0)


def row_length(longest: int, multiple: int = 1) -> int:
    """Row length ``T`` of a batch whose longest shared row has ``longest`` tokens:
    rounded up to ``multiple`` (fewer compiles), at least ``multiple``."""
    multiple = max(int(multiple), 1)
    return max(-(-int(longest) // multiple) * multiple, multiple)


def _longest_row(batch: PreferenceBatch) -> int:
    att = np.asarray(batch.attention_mask) != 0
    mask = np.asarray(batch.loss_mask) != 0
    best = 0
    for b in range(att.shape[0]):
        if mask[b].any():
            p = _prompt_length(mask[b, 0], f"loss_mask[{b}, 0]")
            best = max(best, shared_row_length(att[b].sum(axis=-1), p))
    return best


def to_shared_prompt(batch: PreferenceBatch, *, length: int | None = None, multiple: int = 1,
                     pad_id: int = 0) -> SharedPromptBatch:
    """Converts an unshared batch ``[B, K, L]`` to the shared-prompt layout ``[B, T]``.

    Args:
      batch: a host (numpy) ``PreferenceBatch``: right-padded sequences sharing the same
        prompt tokens (same ``P``) within a group, slot 0 present in every real group (a
        pair's chosen; a later slot may be empty: no token). Its ``advantages`` pass
        through; per-token tables (``old_token_logps``, ``ref_token_logps``) must be absent
        (they are indexed by the target layout's row length: set them after).
      length: row length ``T``. The data pipeline passes the length its plan gives the
        GLOBAL batch, so every process builds the same shape; default: this batch's
        longest row rounded up to ``multiple``.
      multiple: rounding of the default ``T``.
      pad_id: token id written at padding.

    Returns:
      ``SharedPromptBatch`` (numpy; group fields passed through).

    Raises:
      ValueError: naming the row when K < 2, the prompts differ, a mask is not one
        contiguous span, slot 0 is empty, or ``length`` is shorter than the longest row.
    """
    ids = np.asarray(batch.input_ids)
    if ids.ndim != 3 or ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, K, L] groups with K >= 2, got shape {ids.shape}")
    if batch.old_token_logps is not None or batch.ref_token_logps is not None:
        raise ValueError("to_shared_prompt: per-token tables are indexed by the row length; "
                         "convert first, then set old_token_logps / ref_token_logps")
    B, K = ids.shape[:2]
    need = _longest_row(batch)
    T = length if length is not None else row_length(need, multiple)
    if T < need:
        raise ValueError(f"length={T} < longest shared row {need}")
    src = {f: np.asarray(getattr(batch, f)) for f in TOKEN_FIELDS}
    out = {f: np.zeros((B, T), np.int32) for f in (*TOKEN_FIELDS, "shared_code", "slot_index")}
    out["input_ids"][:] = pad_id
    out["targets"][:] = pad_id
    out["slot_index"][:] = -1
    for b in range(B):
        mask = src["loss_mask"][b] != 0
        if not mask.any():
            continue  # padding group: an all-pad row
        p = _prompt_length(mask[0], f"loss_mask[{b}, 0]")
        t = 0
        for slot in range(K):
            n = int((src["attention_mask"][b, slot] != 0).sum())
            if slot and n == 0:
                continue  # an empty slot (a missing negative)
            where = f"loss_mask[{b}, {slot}]"
            if slot and (_prompt_length(mask[slot], where) != p or not np.array_equal(
                    src["input_ids"][b, 0, :p], src["input_ids"][b, slot, :p])):
                raise ValueError(f"row {b}: slot {slot} does not share slot 0's prompt "
                                 f"({p} tokens)")
            lo = 0 if slot == 0 else p - 1
            m = n - lo
            for f in TOKEN_FIELDS:
                out[f][b, t:t + m] = src[f][b, slot, lo:n]
            counts = src["loss_mask"][b, slot, lo:n] != 0
            out["slot_index"][b, t:t + m] = np.where(counts, slot, -1)
            out["shared_code"][b, t:t + m] = CHOSEN + slot
            if slot == 0:
                out["shared_code"][b, :p - 1] = PROMPT
                out["shared_code"][b, p - 1] = LAST_PROMPT
            t += m
    return SharedPromptBatch(**out, weights=batch.weights, valid=batch.valid,
                             example_id=batch.example_id, ref_logps=batch.ref_logps,
                             advantages=batch.advantages)
