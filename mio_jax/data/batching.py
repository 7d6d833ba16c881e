"""Collation to [B, K, L], packing into [R, L] rows, and the unpacking helper.

The batch types themselves live in `mio_jax.layouts` (re-exported by `mio_jax.data`).

Token convention (docs/architecture.md): `targets[..., t]` is the token after
`input_ids[..., t]`; `loss_mask[..., t]` is 1 where `targets[..., t]` is a
completion token. A sequence of n tokens (prompt P + completion C) fills
positions 0..n-1; its last position has no next token (target = pad_id,
mask 0), so the mask has exactly C ones, at positions P-1 .. n-2: the last
prompt position predicts the first completion token and the final EOS is a
target.
"""

import jax
import jax.numpy as jnp
import numpy as np

from mio_jax.data.tokenize import TokenizedGroup
from mio_jax.layouts import PackedBatch, PreferenceBatch


class PackingOverflow(ValueError):
    """The sequences of a batch do not fit the configured packed rows."""


def _fill(
    arrays: dict, where: tuple, prompt: np.ndarray, completion: np.ndarray, start: int, pad_id: int
) -> None:
    seq = np.concatenate([prompt, completion])
    n, p = len(seq), len(prompt)
    row = arrays["input_ids"][where]
    row[start : start + n] = seq
    arrays["targets"][where][start : start + n - 1] = seq[1:]
    arrays["loss_mask"][where][start + max(p - 1, 0) : start + n - 1] = 1
    arrays["positions"][where][start : start + n] = np.arange(n, dtype=np.int32)
    arrays["attention_mask"][where][start : start + n] = 1
    del pad_id  # targets were initialised to pad_id


def _group_fields(groups: list[TokenizedGroup | None], ids: np.ndarray, K: int):
    B = len(groups)
    weights = np.zeros([B], np.float32)
    valid = np.zeros([B, K], bool)
    for b, g in enumerate(groups):
        if g is not None:
            weights[b] = g.weight
            valid[b, : len(g.completion_ids)] = True
    example_id = np.where([g is not None for g in groups], ids, -1).astype(np.int32)
    return weights, valid, example_id


def collate(
    groups: list[TokenizedGroup | None], ids: np.ndarray, *, K: int, L: int, pad_id: int = 0
) -> PreferenceBatch:
    """Pads B groups into a [B, K, L] PreferenceBatch.

    Args:
      groups: B tokenised groups; None for a padding group.
      ids: [B] example ids (indices into the prepared split).
      K: completion slots per group.
      L: padded length (>= every sequence's length).
      pad_id: token id at padding positions.

    Returns:
      PreferenceBatch of numpy arrays.
    """
    B = len(groups)
    arrays = {
        k: np.zeros([B, K, L], np.int32)
        for k in ("input_ids", "targets", "loss_mask", "positions", "attention_mask")
    }
    arrays["input_ids"][:] = pad_id
    arrays["targets"][:] = pad_id
    for b, g in enumerate(groups):
        if g is None:
            continue
        for k, c in enumerate(g.completion_ids):
            if len(g.prompt_ids) + len(c) > L:
                raise ValueError(f"sequence of {len(g.prompt_ids) + len(c)} tokens > L={L}")
            _fill(arrays, (b, k), g.prompt_ids, c, 0, pad_id)
    return PreferenceBatch(
        **arrays, **dict(zip(("weights", "valid", "example_id"), _group_fields(groups, ids, K)))
    )


def pack_rows_needed(seq_lengths: list[int], L: int) -> list[list[int]]:
    """First-fit-decreasing assignment of sequences to rows of capacity L.

    Args:
      seq_lengths: token count of each sequence (each <= L).
      L: row capacity.

    Returns:
      rows: a list of rows, each the list of sequence indices placed in it.
    """
    order = sorted(range(len(seq_lengths)), key=lambda i: (-seq_lengths[i], i))
    rows, free = [], []
    for i in order:
        for r, space in enumerate(free):
            if seq_lengths[i] <= space:
                rows[r].append(i)
                free[r] -= seq_lengths[i]
                break
        else:
            rows.append([i])
            free.append(L - seq_lengths[i])
    return rows


def pack(
    groups: list[TokenizedGroup | None],
    ids: np.ndarray,
    *,
    K: int,
    R: int,
    L: int,
    group_offset: int = 0,
    pad_id: int = 0,
    micro_batches: int = 1,
) -> PackedBatch:
    """Packs the sequences of B groups into R rows of L tokens.

    With ``micro_batches`` A > 1 the batch is ready to be split the way the train step
    splits it (row and group ``j * A + i`` go to micro-batch ``i``): the groups ``b`` with
    ``b % A == i`` are packed on their own into the rows ``i, i + A, ...``, so every
    micro-batch holds whole groups.

    Args:
      groups: B tokenised groups (None for padding groups).
      ids: [B] example ids.
      K: slots per group.
      R: rows; L: row length.
      group_offset: index of groups[0] in the global batch (process share; a multiple of
        A when A > 1).
      pad_id: token id at padding.
      micro_batches: A, dividing B and R.

    Returns:
      PackedBatch of numpy arrays ([R, L] token fields, [B]/[B, K] group fields).

    Raises:
      PackingOverflow: when the sequences need more than R rows (R / A per micro-batch).
    """
    a = int(micro_batches)
    if len(groups) % a or R % a:
        raise ValueError(f"{len(groups)} groups and {R} rows do not split into "
                         f"{a} micro-batches")
    names = ("input_ids", "targets", "loss_mask", "positions", "attention_mask", "segment_ids")
    arrays = {k: np.zeros([R, L], np.int32) for k in names}
    arrays["input_ids"][:] = pad_id
    arrays["targets"][:] = pad_id
    arrays["group_index"] = np.full([R, L], -1, np.int32)
    arrays["slot_index"] = np.full([R, L], -1, np.int32)
    for i in range(a):
        seqs = [(b, k) for b in range(i, len(groups), a) if groups[b] is not None
                for k in range(len(groups[b].completion_ids))]
        lengths = [len(groups[b].prompt_ids) + len(groups[b].completion_ids[k]) for b, k in seqs]
        rows = pack_rows_needed(lengths, L)
        if len(rows) > R // a:
            where = f" of micro-batch {i} of {a}" if a > 1 else ""
            raise PackingOverflow(
                f"{len(seqs)} sequences{where} ({sum(lengths)} tokens) need {len(rows)} packed "
                f"rows of {L} tokens but data.pack_rows gives {R // a} per process; raise "
                "data.pack_rows")
        for r, members in zip(range(i, R, a), rows):
            start = 0
            for seg, m in enumerate(sorted(members), start=1):
                b, k = seqs[m]
                g = groups[b]
                n = lengths[m]
                _fill(arrays, (r,), g.prompt_ids, g.completion_ids[k], start, pad_id)
                arrays["segment_ids"][r, start : start + n] = seg
                arrays["group_index"][r, start : start + n] = group_offset + b
                arrays["slot_index"][r, start : start + n] = k
                start += n
    weights, valid, example_id = _group_fields(groups, ids, K)
    return PackedBatch(**arrays, weights=weights, valid=valid, example_id=example_id)


def unpack_sequence_sums(
    token_values_rl: jax.Array, batch: PackedBatch, mask_rl: jax.Array | None = None
) -> jax.Array:
    """Sums per-token values of a packed batch back into [B, K] per sequence.

    Args:
      token_values_rl: [R, L] per-token values (e.g. log-probs of `targets`).
      batch: the PackedBatch the values were computed on.
      mask_rl: [R, L] weights of the tokens; default `batch.loss_mask`
        (completion tokens only). Pass `batch.attention_mask` to sum all tokens.

    Returns:
      [B, K] float sums; 0 for invalid slots.
    """
    B, K = batch.valid.shape
    mask_rl = batch.loss_mask if mask_rl is None else mask_rl
    seq = jnp.where(batch.group_index >= 0, batch.group_index * K + batch.slot_index, B * K)
    values = jnp.where(seq < B * K, token_values_rl * mask_rl.astype(token_values_rl.dtype), 0)
    sums = jax.ops.segment_sum(values.reshape(-1), seq.reshape(-1), num_segments=B * K + 1)
    return sums[: B * K].reshape(B, K)
