"""Shared-prompt layout: prompt, chosen and rejected in one row, the prompt run once.

An unshared pair batch ``[B, 2, L]`` runs the prompt twice (once per completion).
This layout writes each pair as ONE row ``[B, T]``::

    [ prompt x_0 .. x_{P-1} | chosen x^c_P .. x^c_{n0-1} | x_{P-1} | rejected x^r_P .. x^r_{n1-1} ]

i.e. the whole chosen sequence followed by the rejected sequence from its last
prompt token on. The last prompt token is written twice because it predicts the
first completion token, whose target differs per branch: the copy at the head
of the rejected segment carries the rejected target. A ``[B, T, T]`` boolean
attention mask (built on device from ``shared_code`` by
``mio_jax.layouts.shared_attention_mask``) lets

* prompt tokens see the prompt (causally),
* chosen tokens see the prompt and earlier chosen tokens,
* the rejected segment (the copied token and rejected tokens) see the prompt
  WITHOUT its last token (the copy stands in for it) and earlier rejected tokens.

Positions restart after the prompt for the rejected segment (the copy sits at
``P-1``), so every token sees exactly the keys, at exactly the positions, it
sees in the unshared layout: per-sequence log-probs are equal up to float
summation order (tests/data/test_shared_prompt.py checks them).

Row length ``T = n0 + n1 - P + 1`` instead of ``2 L``: with half of each
sequence prompt, ~25 % fewer tokens go through the MLPs and projections.
"""

from __future__ import annotations

import numpy as np

from mio_jax.layouts import (CHOSEN, LAST_PROMPT, PROMPT, REJECTED, TOKEN_FIELDS,
                             PreferenceBatch, SharedPromptBatch)


def _prompt_length(mask_l: np.ndarray, where: str) -> int:
    nz = np.flatnonzero(mask_l)
    if nz.size == 0:
        raise ValueError(f"{where}: no completion token (loss_mask all zero)")
    if nz[-1] - nz[0] + 1 != nz.size:
        raise ValueError(f"{where}: loss_mask is not one contiguous completion span")
    return int(nz[0]) + 1


def shared_row_length(seq_lengths, prompt_len: int) -> int:
    """Tokens of one pair's shared row, ``n0 + n1 - P + 1``, from its two sequence lengths
    ``n0, n1`` (prompt included) and the prompt's ``P`` tokens."""
    n0, n1 = seq_lengths
    return int(n0) + int(n1) - max(int(prompt_len), 1) + 1


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
    """Converts an unshared pair batch ``[B, 2, L]`` to the shared-prompt layout ``[B, T]``.

    Args:
      batch: a host (numpy) ``PreferenceBatch`` of pairs: right-padded sequences, index 0
        chosen, 1 rejected, sharing the same prompt tokens (same ``P``).
      length: row length ``T``. The data pipeline passes the length its plan gives the
        GLOBAL batch, so every process builds the same shape; default: this batch's
        longest row rounded up to ``multiple``.
      multiple: rounding of the default ``T``.
      pad_id: token id written at padding.

    Returns:
      ``SharedPromptBatch`` (numpy; group fields passed through).

    Raises:
      ValueError: naming the row when K != 2, the two prompts differ, a mask is not one
        contiguous span, or ``length`` is shorter than the longest row.
    """
    ids = np.asarray(batch.input_ids)
    if ids.ndim != 3 or ids.shape[1] != 2:
        raise ValueError(f"input_ids must be [B, 2, L] pairs, got shape {ids.shape}")
    B = ids.shape[0]
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
        p0 = _prompt_length(mask[0], f"loss_mask[{b}, 0]")
        p1 = _prompt_length(mask[1], f"loss_mask[{b}, 1]")
        if p0 != p1 or not np.array_equal(src["input_ids"][b, 0, :p0], src["input_ids"][b, 1, :p0]):
            raise ValueError(f"row {b}: chosen and rejected do not share one prompt "
                             f"(prompt lengths {p0} and {p1} or different prompt tokens)")
        n0, n1 = (int((src["attention_mask"][b, k] != 0).sum()) for k in (0, 1))
        t = 0
        for slot, lo, hi in ((0, 0, n0), (1, p0 - 1, n1)):  # (slot, first source index, end)
            n = hi - lo
            for f in TOKEN_FIELDS:
                out[f][b, t:t + n] = src[f][b, slot, lo:hi]
            counts = src["loss_mask"][b, slot, lo:hi] != 0
            out["slot_index"][b, t:t + n] = np.where(counts, slot, -1)
            if slot == 0:
                out["shared_code"][b, t:t + p0 - 1] = PROMPT
                out["shared_code"][b, t + p0 - 1] = LAST_PROMPT
                out["shared_code"][b, t + p0:t + n] = CHOSEN
            else:
                out["shared_code"][b, t:t + n] = REJECTED
            t += n
    return SharedPromptBatch(**out, weights=batch.weights, valid=batch.valid,
                             example_id=batch.example_id, ref_logps=batch.ref_logps)
