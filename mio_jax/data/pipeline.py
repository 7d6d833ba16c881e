"""Data preparation and the grain pipeline of global batches.

Order of work:
  1. `prepare`: read the split, detect/normalise the format, tokenise and
     truncate every row, apply the bad-row policy, and summarise. Every process
     prepares the whole split identically (deterministic, no communication),
     because all processes must agree on which rows exist, on the shuffle, and
     on each batch's padded length or packed row count.
  2. `BatchPlan`: a pure function of (seed, epoch) giving the global batches
     as lists of group indices (seeded shuffle; length bucketing, or length
     balancing when packing).
  3. grain `MapDataset.range(steps).map(assemble)`: step s -> this process's
     slice of global batch s, in its layout (collated, packed or shared-prompt
     rows; padded lengths and row counts come from the GLOBAL batch, so every
     process builds arrays of one global shape). Process p materialises only
     rows [p*B/P, (p+1)*B/P) of each global batch. `num_workers` > 0 runs the
     assembly in grain worker processes.
  4. `to_global_arrays`: `jax.make_array_from_process_local_data` per field.

The iterator state is grain's (the next step index), a small JSON-able dict:
restoring it into a fresh pipeline built with the same config, seed and
process layout yields exactly the batches an uninterrupted run would have seen.
"""

import collections
import dataclasses
import functools
import os
from typing import NamedTuple

import grain
import jax
import numpy as np
from absl import flags

from mio_jax.data import batching, formats, report, shared_prompt, sources, tokenize
from mio_jax.data.config import validate_data_config

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
EMBEDDED = {
    "train": os.path.join(ASSETS, "reasoning_prefs_train.jsonl.gz"),
    "eval": os.path.join(ASSETS, "reasoning_prefs_eval.jsonl.gz"),
}
FOREVER = 2**40  # steps of an endless (num_epochs=0) pipeline


@dataclasses.dataclass
class PreparedSplit:
    """A tokenised split: groups plus what preparation did.

    Attributes:
      groups: tokenised groups, in source order (example ids index this list).
      K: slots per group (2 for pairs, 1 + num_negatives for K-way groups).
      summary: counts of rows read/used/dropped/truncated.
    """

    groups: list
    K: int
    summary: report.DataSummary

    @property
    def seq_lengths(self) -> np.ndarray:
        """[N] longest sequence (prompt + completion) of each group."""
        return np.array([max(g.seq_lengths) for g in self.groups], np.int32)


def resolve_path(spec, split: str):
    """Maps "embedded" to the committed data set's file for the split."""
    return EMBEDDED[split] if spec == "embedded" else spec


def prepare(data_config, tokenizer, *, split: str = "train", source=None) -> PreparedSplit:
    """Reads, validates, normalises and tokenises one split.

    Args:
      data_config: ConfigDict shaped like `default_data_config()`.
      tokenizer: Hugging Face fast tokenizer.
      split: "train" or "eval" (picks train_path or eval_path).
      source: overrides the configured path (a path/glob/list or a list of dicts).

    Returns:
      PreparedSplit.

    Raises:
      report.BadRowError: first bad row, when data_config.on_bad_row == "error".
    """
    validate_data_config(data_config)
    if source is None:
        source = resolve_path(data_config[f"{split}_path"], split)
    log = report.BadRowLog(policy=data_config.on_bad_row)
    warnings = collections.Counter()
    fmt = data_config.format
    groups, rows_read, rows_used = [], 0, 0
    ptrunc = ctrunc = 0
    num_negatives = data_config.num_negatives
    for row_id, row in sources.read_rows(source, log, max_rows=data_config.max_rows):
        rows_read += 1
        if fmt == "auto" and isinstance(row, dict):
            try:
                fmt = formats.detect_format(row)
            except ValueError as e:  # an unrecognisable row: bad, detect on the next one
                log.reject(row_id, report.MISSING_FIELD, None, str(e))
                continue
        row_groups = formats.normalize_row(
            row,
            row_id,
            fmt if fmt != "auto" else "explicit",
            log,
            kway_mode=data_config.kway_mode,
            num_negatives=num_negatives,
            system_prompt=data_config.system_prompt,
        )
        tokenized = []
        for g in row_groups:
            t = tokenize.tokenize_group(
                tokenizer,
                g,
                max_length=data_config.max_length,
                max_prompt_length=data_config.max_prompt_length,
                truncation_mode=data_config.truncation_mode,
                log=log,
                warnings=warnings,
            )
            if t is None:  # one bad pair rejects the whole row, so counts are per row
                tokenized = []
                break
            tokenized.append(t)
        if tokenized:
            rows_used += 1
            groups.extend(tokenized)
            ptrunc += sum(t.prompt_truncated for t in tokenized)
            ctrunc += sum(t.completion_truncated for t in tokenized)
    rows_read += log.counts[report.MALFORMED_JSON]
    if not groups:
        raise ValueError(
            f"{split} split {source!r}: no usable row "
            f"(read {rows_read}, dropped {dict(log.counts)})"
        )
    K = data_config.num_negatives + 1 if fmt == "kway" and data_config.kway_mode == "group" else 2
    summary = report.DataSummary(
        split=split,
        format=fmt,
        rows_read=rows_read,
        rows_used=rows_used,
        groups=len(groups),
        dropped=dict(log.counts),
        dropped_examples=dict(log.examples),
        prompt_truncated=ptrunc,
        completion_truncated=ctrunc,
        warnings=dict(warnings),
        prompt_tokens=int(sum(len(g.prompt_ids) for g in groups)),
        completion_tokens=int(sum(len(c) for g in groups for c in g.completion_ids)),
        sequence_tokens=int(sum(sum(g.seq_lengths) for g in groups)),
    )
    return PreparedSplit(groups=groups, K=K, summary=summary)


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
    """Builds this process's share of global batch `step` (picklable for workers)."""

    groups: tuple
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
        longest = max(max(self.groups[i].seq_lengths) for i in ids if i >= 0)
        m = self.pad_to_multiple_of
        return min(self.max_length, -(-longest // m) * m)

    def shared_length(self, ids: np.ndarray) -> int:
        """Row length T of a global batch in the shared-prompt layout (the same on every
        process): its longest ``[prompt | chosen | rejected]`` row, rounded up."""
        longest = max(shared_prompt.shared_row_length(self.groups[i].seq_lengths,
                                                      len(self.groups[i].prompt_ids))
                      for i in ids if i >= 0)
        return shared_prompt.row_length(longest, self.shared_multiple)

    def info(self, ids: np.ndarray, local_mask_shape: tuple) -> BatchInfo:
        """The global batch's ``BatchInfo`` (same on every process)."""
        real = [self.groups[i] for i in ids if i >= 0]
        completions = np.array([sum(len(c) for c in self.groups[i].completion_ids) if i >= 0
                                else 0 for i in ids], np.int64)
        return BatchInfo(
            tokens=int(sum(sum(g.seq_lengths) for g in real)),
            seq_len=self.max_length if self.packing else self.length(ids),
            completion_tokens=completions,
            mask_shape=(local_mask_shape[0] * self.process_count, *local_mask_shape[1:]))

    def __call__(self, step: int):
        """``(batch, info)``: this process's share of global batch ``step``, and its facts."""
        ids, _, _ = self.local_share(int(step))
        batch = self.build(int(step))
        return batch, self.info(ids, np.shape(batch.loss_mask))

    def build(self, step: int):
        """This process's share of global batch ``step`` in its layout."""
        ids, local, offset = self.local_share(int(step))
        groups = [self.groups[i] if i >= 0 else None for i in local]
        if self.packing:
            return batching.pack(
                groups,
                local,
                K=self.K,
                R=self.pack_rows_local,
                L=self.max_length,
                group_offset=offset,
                pad_id=self.pad_id,
            )
        batch = batching.collate(groups, local, K=self.K, L=self.length(ids), pad_id=self.pad_id)
        if self.shared_prompt:
            return shared_prompt.to_shared_prompt(batch, length=self.shared_length(ids),
                                                  pad_id=self.pad_id)
        return batch


def auto_pack_rows(assembler: Assembler, steps: int, margin: float = 0.0) -> int:
    """Per-process rows fitting every batch of the first `steps` steps.

    Args:
      assembler: the batch assembler (plan, groups, process layout, L).
      steps: steps to check.
      margin: extra fraction of rows (rounded up) for steps beyond those checked.

    Returns:
      The row count, at most B/P * K (one sequence per row always fits).
    """
    need = 0
    for s in range(steps):
        ids = assembler.plan.batch(s)
        per = len(ids) // assembler.process_count
        for p in range(assembler.process_count):
            lens = [
                n
                for i in ids[p * per : (p + 1) * per]
                if i >= 0
                for n in assembler.groups[i].seq_lengths
            ]
            need = max(need, len(batching.pack_rows_needed(lens, assembler.max_length)))
    cap = assembler.plan.batch_size // assembler.process_count * assembler.K  # always fits
    return min(need + int(np.ceil(need * margin)), cap)


class PreferenceIterator(grain.DatasetIterator):
    """Iterator of host-local batches with get_state()/set_state() for Orbax.

    A grain DatasetIterator, so `grain.checkpoint.CheckpointSave(it)` /
    `CheckpointRestore(it)` inside an Orbax `args.Composite` save and restore
    it (one small JSON file per process).

    Attributes:
      prepared: the PreparedSplit (groups and summary).
      plan: the BatchPlan; assembler: the Assembler (batch shapes).
      steps: total steps (FOREVER for an endless pipeline).
    """

    def __init__(
        self, prepared: PreparedSplit, assembler: Assembler, steps: int, num_workers: int = 0
    ):
        # A small read-ahead: batches are cheap, and the training step shares the CPU.
        ds = (
            grain.MapDataset.range(steps)
            .map(assembler)
            .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=16))
        )
        if num_workers > 0:
            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        it = iter(ds)
        super().__init__(it)
        self._it = it
        self.prepared, self.assembler, self.plan, self.steps = (
            prepared,
            assembler,
            assembler.plan,
            steps,
        )

    @property
    def summary(self) -> report.DataSummary:
        return self.prepared.summary

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def groups_unused_per_epoch(self) -> int:
        """Groups left out of each epoch by dropping its last partial batch.

        They are different groups each epoch (reshuffled), never dropped for good.
        """
        n = len(self.prepared.groups)
        return (
            n - self.plan.steps_per_epoch * self.plan.batch_size if self.plan.drop_remainder else 0
        )

    def __next__(self):
        """This process's share of the next global batch (typed by layout)."""
        return self.next_with_info()[0]

    def next_with_info(self):
        """``(batch, BatchInfo)`` of the next global batch."""
        return next(self._it)

    def get_state(self) -> dict:
        """JSON-able position of the iterator (save it with every checkpoint)."""
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        """Restores a position saved by get_state() (same config and process layout)."""
        self._it.set_state(state)

    def close(self) -> None:
        """Stops worker processes, if any (idempotent)."""
        if not self._closed:
            self._closed = True
            self._it.close()


def make_pipeline(
    data_config,
    tokenizer,
    *,
    split: str = "train",
    batch_size: int,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    prepared: PreparedSplit | None = None,
    row_multiple: int = 1,
) -> PreferenceIterator:
    """Builds the batch iterator of one split for this process.

    Args:
      data_config: ConfigDict shaped like `default_data_config()`.
      tokenizer: Hugging Face fast tokenizer.
      split: "train" (shuffled per config, num_epochs epochs, partial batch
        dropped) or "eval" (one unshuffled pass, bucketed if configured, last
        batch padded with example id -1 and weight 0).
      batch_size: GLOBAL groups per batch, divisible by process_count.
      seed: shuffle seed.
      process_index / process_count: default jax.process_index()/count().
      prepared: reuse an already prepared split (skips tokenisation).
      row_multiple: packed rows per process are rounded up to this multiple
        (the number of local data-parallel devices).

    Returns:
      PreferenceIterator yielding this process's share of each global batch, typed by
      layout (`mio_jax.layouts`): PreferenceBatch ([B/P, K, L]), PackedBatch
      (`data.packing`: [R/P, L] rows, [B/P] groups) or SharedPromptBatch
      (`data.shared_prompt`: [B/P, T] rows, T from the global batch).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by process_count={process_count}"
        )
    prepared = prepared or prepare(data_config, tokenizer, split=split)
    train = split == "train"
    if train and len(prepared.groups) < batch_size:
        raise ValueError(f"{split}: {len(prepared.groups)} groups < batch_size={batch_size}")
    plan = BatchPlan(
        lengths=prepared.seq_lengths,
        batch_size=batch_size,
        seed=seed,
        shuffle=bool(data_config.shuffle) and train,
        bucketing=bool(data_config.bucketing) and not data_config.packing,
        balance=bool(data_config.packing),
        bucket_window=data_config.bucket_window,
        drop_remainder=train,
    )
    epochs = data_config.num_epochs if train else 1
    steps = plan.steps_per_epoch * epochs if epochs else FOREVER
    assembler = Assembler(
        groups=tuple(prepared.groups),
        plan=plan,
        K=prepared.K,
        max_length=data_config.max_length,
        process_index=process_index,
        process_count=process_count,
        pad_to_multiple_of=data_config.pad_to_multiple_of if data_config.bucketing else 0,
        packing=bool(data_config.packing),
        shared_prompt=bool(data_config.shared_prompt),
        shared_multiple=max(int(data_config.pad_to_multiple_of), 1),
        pad_id=data_config.pad_id,
    )
    if data_config.packing:
        if data_config.pack_rows:
            if data_config.pack_rows % process_count:
                raise ValueError(
                    f"data.pack_rows={data_config.pack_rows} is not divisible by "
                    f"process_count={process_count}"
                )
            rows = data_config.pack_rows // process_count
        else:
            # Every batch of the planned epochs (the first 10 of an endless
            # pipeline; at most ~20k batches) must fit; overflow later is an error.
            per_epoch = plan.steps_per_epoch
            planned = per_epoch * max(1, min(epochs or 10, 20000 // per_epoch))
            margin = 0.0 if steps <= planned else 0.05
            rows = auto_pack_rows(assembler, min(steps, planned), margin=margin)
        rows = -(-rows // row_multiple) * row_multiple
        assembler = dataclasses.replace(assembler, pack_rows_local=rows)
    return PreferenceIterator(prepared, assembler, steps, num_workers=data_config.num_workers)


def to_global_arrays(batch, sharding: jax.sharding.NamedSharding):
    """Turns host-local batches into global jax arrays sharded on the batch axis.

    Args:
      batch: a typed batch (`mio_jax.layouts`) of this process's numpy arrays.
      sharding: NamedSharding whose first PartitionSpec entry shards the
        leading (batch / row) axis; each field gets that entry on its axis 0.

    Returns:
      The same container of global jax.Arrays (leading axis = global size).
    """
    lead = jax.sharding.PartitionSpec(sharding.spec[0] if len(sharding.spec) else None)
    leaf_sharding = jax.sharding.NamedSharding(sharding.mesh, lead)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(leaf_sharding, np.asarray(x)), batch
    )
