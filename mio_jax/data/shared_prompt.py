"""Shared-prompt layout: prompt, chosen and rejected in one row, the prompt run once.

An unshared pair batch ``[B, 2, L]`` runs the prompt twice (once per completion).
This layout writes each pair as ONE row ``[B, T]``::

    [ prompt x_0 .. x_{P-1} | chosen x^c_P .. x^c_{n0-1} | x_{P-1} | rejected x^r_P .. x^r_{n1-1} ]

i.e. the whole chosen sequence followed by the rejected sequence from its last
prompt token on. The last prompt token is written twice because it predicts the
first completion token, whose target differs per branch: the copy at the head
of the rejected segment carries the rejected target. A ``[B, T, T]`` boolean
attention mask (built on device from ``shared_code`` by
``shared_attention_mask``) lets

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

# shared_code values (per token).
PAD, PROMPT, LAST_PROMPT, CHOSEN, REJECTED = 0, 1, 2, 3, 4
# _VISIBLE[q, k]: may a query of code q attend a key of code k (causality is
# added by the model, slot order: prompt < chosen < rejected).
_VISIBLE = np.zeros((5, 5), bool)
_VISIBLE[PROMPT, [PROMPT, LAST_PROMPT]] = True
_VISIBLE[LAST_PROMPT, [PROMPT, LAST_PROMPT]] = True
_VISIBLE[CHOSEN, [PROMPT, LAST_PROMPT, CHOSEN]] = True
_VISIBLE[REJECTED, [PROMPT, REJECTED]] = True

SHARED_FIELDS = ("input_ids", "targets", "loss_mask", "positions", "attention_mask",
                 "shared_code", "slot_index")


def _prompt_length(mask_l: np.ndarray, where: str) -> int:
    nz = np.flatnonzero(mask_l)
    if nz.size == 0:
        raise ValueError(f"{where}: no completion token (loss_mask all zero)")
    if nz[-1] - nz[0] + 1 != nz.size:
        raise ValueError(f"{where}: loss_mask is not one contiguous completion span")
    return int(nz[0]) + 1


def shared_row_length(batch: dict) -> int:
    """Longest shared row ``n0 + n1 - P + 1`` of an unshared ``[B, 2, L]`` batch."""
    att = np.asarray(batch["attention_mask"]) != 0
    mask = np.asarray(batch["loss_mask"]) != 0
    best = 0
    for b in range(att.shape[0]):
        if not mask[b].any():
            continue
        p = _prompt_length(mask[b, 0], f"loss_mask[{b}, 0]")
        best = max(best, int(att[b, 0].sum() + att[b, 1].sum()) - p + 1)
    return best


def to_shared_prompt(batch: dict, *, length: int | None = None, multiple: int = 1,
                     pad_id: int = 0) -> dict:
    """Converts an unshared pair batch ``[B, 2, L]`` to the shared-prompt layout ``[B, T]``.

    Args:
      batch: host (numpy) ``PreferenceBatch`` fields as a dict: ``input_ids,
        targets, loss_mask, positions, attention_mask [B, 2, L]``, ``weights [B]``,
        ``valid [B, 2]`` (other keys, e.g. ``example_id``/``ref_logps``, are
        passed through). Sequences are right-padded, index 0 chosen, 1 rejected,
        sharing the same prompt tokens (same ``P``).
      length: row length ``T`` (default: the longest row rounded up to ``multiple``).
      multiple: round the default ``T`` up to a multiple of this (fewer compiles).
      pad_id: token id written at padding.

    Returns:
      dict with ``input_ids, targets, loss_mask, positions, attention_mask,
      shared_code, slot_index`` ``[B, T]`` int32 (``shared_code``: 0 pad,
      1 prompt, 2 last prompt token, 3 chosen, 4 rejected segment;
      ``slot_index``: 0/1 where the token's target counts for chosen/rejected,
      -1 elsewhere) plus the pass-through keys.

    Raises:
      ValueError: naming the row when K != 2, the two prompts differ, a mask is
        not one contiguous span, or ``length`` is too short.
    """
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 3 or ids.shape[1] != 2:
        raise ValueError(f"input_ids must be [B, 2, L] pairs, got shape {ids.shape}")
    B = ids.shape[0]
    need = shared_row_length(batch)
    T = length if length is not None else max(-(-need // multiple) * multiple, multiple, 1)
    if T < need:
        raise ValueError(f"length={T} < longest shared row {need}")
    src = {f: np.asarray(batch[f]) for f in ("input_ids", "targets", "loss_mask", "positions",
                                              "attention_mask")}
    out = {f: np.zeros((B, T), np.int32) for f in SHARED_FIELDS}
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
        segs = ((0, 0, n0), (1, p0 - 1, n1))  # (slot, first source index, end)
        t = 0
        for slot, lo, hi in segs:
            n = hi - lo
            for f in ("input_ids", "targets", "loss_mask", "positions", "attention_mask"):
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
    for k, v in batch.items():
        if k not in out and k not in src:
            out[k] = v
    return out


def shared_attention_mask(shared_code_bt):
    """Boolean ``[B, T, T]`` mask (True = query t may see key s) of the shared layout.

    Causality is not included (the model adds it in slot order).

    Args:
      shared_code_bt: int ``[B, T]`` codes from ``to_shared_prompt`` (numpy or jax).

    Returns:
      bool ``[B, T, T]`` (jax array).
    """
    import jax.numpy as jnp

    table = jnp.asarray(_VISIBLE)
    code = jnp.asarray(shared_code_bt)
    return table[code[:, :, None], code[:, None, :]]
