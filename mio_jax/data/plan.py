"""The plan of global batches and how each process builds its share of one.

`BatchPlan` is a pure function of (seed, epoch, step) giving the groups of every global
batch; `Assembler` turns step s into this process's slice of global batch s in the
configured layout, with every padded length and row count taken from the GLOBAL batch, and
the `BatchInfo` every process computes alike. Nothing here communicates: all processes
agree because they compute the same plan.
"""

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

from mio_jax.data import batching, shared_prompt


@dataclasses.dataclass(frozen=True, eq=False)
class BatchPlan:
    """Global batches as a pure function of (seed, epoch, step).

    Attributes:
      lengths: [N] int array, longest sequence of each group (for bucketing).
      batch_size: global groups per batch B.
      seed, shuffle: seeded permutation per epoch (rng seeded by [seed, epoch]).
      bucketing: sort by length inside windows of `bucket_window` batches,
        then shuffle the batches' order (similar lengths share a batch).
      balance: the opposite, for packing: inside each window, deal the groups
        sorted by length to the batches in snake order, so every batch has a
        similar token total and a fixed packed row count fits them all.
      drop_remainder: drop the last partial batch of each epoch (train) or pad
        it with example id -1 (eval).
    """

    lengths: np.ndarray
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    bucketing: bool = False
    bucket_window: int = 16
    balance: bool = False
    drop_remainder: bool = True

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.lengths), self.batch_size
        return n // b if self.drop_remainder else -(-n // b)

    # Thread-safe (grain maps with threads); keyed by plan identity (eq=False) and epoch.
    @functools.lru_cache(maxsize=4)
    def epoch_batches(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch, B] group indices of one epoch (-1 = padding)."""
        return self._make_epoch(epoch)

    def _make_epoch(self, epoch: int) -> np.ndarray:
        n, B = len(self.lengths), self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        w = self.bucket_window * B
        chunks = np.split(order, range(w, n, w))
        if self.bucketing:
            order = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks])
        elif self.balance:
            order = np.concatenate([self._deal(c) for c in chunks])
        full = n // B
        batches = order[: full * B].reshape(full, B)
        if (self.bucketing or self.balance) and self.shuffle:
            batches = batches[rng.permutation(full)]
        if not self.drop_remainder and n % B:
            last = np.full([1, B], -1, np.int64)
            last[0, : n % B] = order[full * B :]
            batches = np.concatenate([batches, last])
        return batches

    def _deal(self, chunk: np.ndarray) -> np.ndarray:
        """Reorders a chunk so each run of B holds one group per length stratum."""
        B = self.batch_size
        nb = len(chunk) // B
        rest, chunk = chunk[nb * B :], chunk[: nb * B]  # leftovers: random, not the longest
        ranked = chunk[np.argsort(self.lengths[chunk], kind="stable")]
        i = np.arange(nb * B)
        r, j = divmod(i, nb)
        target = np.where(r % 2 == 0, j, nb - 1 - j) * B + r
        out = np.empty_like(ranked)
        out[target] = ranked
        return np.concatenate([out, rest])

    def batch(self, step: int) -> np.ndarray:
        """[B] group indices of global batch `step` (-1 = padding group)."""
        e, s = divmod(step, self.steps_per_epoch)
        return self.epoch_batches(e)[s]


class BatchInfo(NamedTuple):
    """Facts of one GLOBAL batch, computed from the plan by every process alike (no
    communication), whatever its layout.

    Attributes:
      tokens: real tokens of the global batch counted in the unshared ``[B, K, L]``
        layout (the FLOP convention: every layout is credited with the unshared work).
      seq_len: ``L`` of the unshared layout (attention FLOPs per token).
      completion_tokens: ``[B]`` completion tokens of each global group, in row order
        (0 for padding groups): the host-side check of the completion-only projection.
      mask_shape: shape of the global batch's ``loss_mask``.
    """

    tokens: int
    seq_len: int
    completion_tokens: np.ndarray
    mask_shape: tuple


@dataclasses.dataclass(frozen=True)
class Assembler:
    """Builds this process's share of global batch `step` (picklable for workers).

    ``groups`` is the split's store (``mio_jax.data.store``): every length and count of
    the global batch comes from its lengths index; only this process's groups are read.
    """

    groups: object
    plan: BatchPlan
    K: int
    max_length: int
    process_index: int = 0
    process_count: int = 1
    pad_to_multiple_of: int = 0
    packing: bool = False
    pack_rows_local: int = 0
    shared_prompt: bool = False
    shared_multiple: int = 1
    pad_id: int = 0
    micro_batches: int = 1

    def local_share(self, step: int) -> tuple[np.ndarray, np.ndarray, int]:
        ids = self.plan.batch(step)
        per = len(ids) // self.process_count
        return (
            ids,
            ids[self.process_index * per : (self.process_index + 1) * per],
            (self.process_index * per),
        )

    def length(self, ids: np.ndarray) -> int:
        """Padded L of a global batch: its longest sequence rounded up, or max_length."""
        if not self.pad_to_multiple_of:
            return self.max_length
        longest = int(self.groups.seq_lengths[ids[ids >= 0]].max())
        m = self.pad_to_multiple_of
        return min(self.max_length, -(-longest // m) * m)

    def shared_length(self, ids: np.ndarray) -> int:
        """Row length T of a global batch in the shared-prompt layout (the same on every
        process): its longest ``[prompt | chosen | rejected]`` row, rounded up."""
        g = self.groups
        longest = max(shared_prompt.shared_row_length(g.group_seq_lengths(i),
                                                      g.prompt_lengths[i])
                      for i in ids if i >= 0)
        return shared_prompt.row_length(longest, self.shared_multiple)

    def __call__(self, step: int):
        """``(batch, info)``: this process's share of global batch ``step`` in its layout,
        and the global batch's ``BatchInfo`` (the same on every process)."""
        ids, local, offset = self.local_share(int(step))
        groups = [self.groups[i] if i >= 0 else None for i in local]
        if self.packing:
            L = self.max_length
            batch = batching.pack(groups, local, K=self.K, R=self.pack_rows_local, L=L,
                                  group_offset=offset, pad_id=self.pad_id,
                                  micro_batches=self.micro_batches)
        else:
            L = self.length(ids)
            batch = batching.collate(groups, local, K=self.K, L=L, pad_id=self.pad_id)
            if self.shared_prompt:
                batch = shared_prompt.to_shared_prompt(batch, length=self.shared_length(ids),
                                                       pad_id=self.pad_id)
        real = ids[ids >= 0]
        comp = self.groups.completion_lengths[real].astype(np.int64)
        slots = (comp > 0).sum(axis=1)
        completion_tokens = np.zeros(len(ids), np.int64)
        completion_tokens[ids >= 0] = comp.sum(axis=1)
        mask_shape = np.shape(batch.loss_mask)
        info = BatchInfo(
            tokens=int(comp.sum() + (slots * self.groups.prompt_lengths[real]).sum()),
            seq_len=L,
            completion_tokens=completion_tokens,
            mask_shape=(mask_shape[0] * self.process_count, *mask_shape[1:]))
        return batch, info


def auto_pack_rows(assembler: Assembler, steps: int, margin: float = 0.0) -> int:
    """Per-process rows fitting every batch of the first `steps` steps.

    Args:
      assembler: the batch assembler (plan, groups, process layout, L).
      steps: steps to check.
      margin: extra fraction of rows (rounded up) for steps beyond those checked.

    Returns:
      The row count, at most B/P * K (one sequence per row always fits); with micro
      batches, A times the rows of the fullest micro-batch.
    """
    a = assembler.micro_batches
    need = 0  # rows of the fullest micro-batch
    for s in range(steps):
        ids = assembler.plan.batch(s)
        per = len(ids) // assembler.process_count
        for p in range(assembler.process_count):
            share = ids[p * per : (p + 1) * per]
            for m in range(a):
                lens = [n for i in share[m::a] if i >= 0
                        for n in assembler.groups.group_seq_lengths(i)]
                need = max(need, len(batching.pack_rows_needed(lens, assembler.max_length)))
    cap = assembler.plan.batch_size // assembler.process_count // a * assembler.K  # always fits
    return a * min(need + int(np.ceil(need * margin)), cap)


