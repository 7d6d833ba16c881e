"""Data preparation and the grain pipeline of global batches.

Order of work:
  1. `prepare` (here; its steps in `mio_jax.data.preparation`): read the split, detect/normalise the format,
     tokenise and truncate every row, apply the bad-row policy, and summarise. Through
     the tokenized cache (`mio_jax.data.cache`) this is done once, split across the
     processes, and every process then holds only the split's lengths index and reads
     the tokens of its own share of each batch on demand; without it, every process
     prepares the whole split in memory. Either way all processes agree on which groups
     exist, on the shuffle, and on each batch's padded length or packed row count.
  2. `BatchPlan` (`mio_jax.data.plan`): a pure function of (seed, epoch) giving the global batches
     as lists of group indices (seeded shuffle; length bucketing, or length
     balancing when packing).
  3. grain `MapDataset.range(steps).map(Assembler)`: step s -> this process's
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

import dataclasses

import grain
import jax
import numpy as np
from absl import flags

from mio_jax.data import cache, report
from mio_jax.data import preparation as prep
from mio_jax.data.config import validate_data_config
from mio_jax.data.plan import Assembler, BatchInfo, BatchPlan, auto_pack_rows  # noqa: F401
from mio_jax.data.preparation import EMBEDDED, PreparedSplit, resolve_path  # noqa: F401
from mio_jax.data.store import ListStore

FOREVER = 2**40  # steps of an endless (num_epochs=0) pipeline


def prepare(data_config, tokenizer, *, split: str = "train", source=None,
            cache_dir: str | None = None) -> prep.PreparedSplit:
    """Reads, validates, normalises and tokenises one split.

    Args:
      data_config: ConfigDict shaped like `default_data_config()`.
      tokenizer: Hugging Face fast tokenizer.
      split: "train" or "eval" (picks train_path or eval_path).
      source: overrides the configured path (a path/glob/list or a list of dicts).
      cache_dir: the tokenized cache's folder (local or a URL; ``mio_jax.data.cache``):
        built once, split across the processes, then read on demand by every process and
        restart. None: in memory, every process tokenising the whole split.

    Returns:
      PreparedSplit.

    Raises:
      report.BadRowError: first bad row, when data_config.on_bad_row == "error".
    """
    validate_data_config(data_config)
    source = prep.resolve_source(data_config, split, source)
    if cache_dir is not None:
        return cache.load_or_build(data_config, tokenizer, split=split, source=source,
                                   cache_dir=cache_dir)
    fmt, first = prep.detect_format(data_config, source)
    _, groups, stats = prep.tokenize_part(data_config, tokenizer, source, fmt=fmt, first=first)
    if stats.error:
        raise report.BadRowError(stats.error[1])
    summary = prep.combine([stats], split)
    prep.check_usable(summary, source)
    slots = prep.num_slots(data_config, fmt)
    return prep.PreparedSplit(ListStore(groups, slots), slots, summary)


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
    micro_batches: int = 1,
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
      micro_batches: the train step's micro-batches per batch (``train.grad_accum_steps``):
        packed rows are packed per micro-batch (``batching.pack``); the other layouts are
        split by the step as they are.

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
        groups=prepared.groups,
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
        micro_batches=int(micro_batches) if data_config.packing else 1,
    )
    if data_config.packing:
        if data_config.pack_rows:
            if data_config.pack_rows % (process_count * assembler.micro_batches):
                raise ValueError(
                    f"data.pack_rows={data_config.pack_rows} is not divisible by "
                    f"process_count={process_count} x micro-batches {assembler.micro_batches}"
                )
            rows = data_config.pack_rows // process_count
        else:
            # Every batch of the planned epochs (the first 10 of an endless
            # pipeline; at most ~20k batches) must fit; overflow later is an error.
            per_epoch = plan.steps_per_epoch
            planned = per_epoch * max(1, min(epochs or 10, 20000 // per_epoch))
            margin = 0.0 if steps <= planned else 0.05
            rows = auto_pack_rows(assembler, min(steps, planned), margin=margin)
        # each device's rows split evenly into the micro-batches (the step's split keeps
        # every row on its device)
        multiple = row_multiple * assembler.micro_batches
        rows = -(-rows // multiple) * multiple
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
