"""Preference data: sources, formats, tokenisation, batching/packing, grain pipeline.

Public API (see docs/architecture.md for the batch contract):
  default_data_config()            the `data` section of a training config
  prepare(data_config, tokenizer, split=..., cache_dir=None) -> PreparedSplit
                                   (groups + DataSummary; with cache_dir through the
                                   tokenized cache, mio_jax.data.cache: built once, split
                                   across the processes, read on demand)
  make_pipeline(data_config, tokenizer, split=..., batch_size=..., seed=...,
                process_index=..., process_count=...) -> PreferenceIterator
                (host-local batches; get_state()/set_state(); grain CheckpointSave works)
  to_global_arrays(batch, sharding) -> the batch as global jax.Arrays
  PreferenceBatch [B, K, L] / PackedBatch [R, L] / SharedPromptBatch [B, T]
                                   the typed layouts (defined in mio_jax.layouts)
  unpack_sequence_sums(token_values[R, L], packed_batch) -> [B, K]
  BadRowError, DataSummary
"""

from mio_jax.data.batching import collate, pack, unpack_sequence_sums
from mio_jax.data.config import default_data_config, validate_data_config
from mio_jax.data.pipeline import (
    BatchPlan,
    PreferenceIterator,
    PreparedSplit,
    make_pipeline,
    prepare,
    to_global_arrays,
)
from mio_jax.data.report import BadRowError, DataSummary
from mio_jax.layouts import PackedBatch, PreferenceBatch, SharedPromptBatch

__all__ = [
    "BadRowError",
    "BatchPlan",
    "DataSummary",
    "PackedBatch",
    "PreferenceBatch",
    "PreferenceIterator",
    "PreparedSplit",
    "SharedPromptBatch",
    "collate",
    "default_data_config",
    "make_pipeline",
    "pack",
    "prepare",
    "to_global_arrays",
    "unpack_sequence_sums",
    "validate_data_config",
]
