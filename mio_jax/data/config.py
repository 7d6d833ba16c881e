"""Data configuration: the keys the data pipeline reads, with their defaults.

The trainer's config embeds this ConfigDict under `data`. Every key is listed
here so a mistyped key fails at start (ConfigDict rejects unknown attributes
once locked) and every default is visible.
"""

import ml_collections

FORMATS = ("auto", "explicit", "implicit", "conversational", "kway")
TRUNCATION_MODES = ("keep_start", "keep_end")
BAD_ROW_POLICIES = ("error", "skip")
KWAY_MODES = ("best_vs_each", "best_vs_worst", "group")


def default_data_config() -> ml_collections.ConfigDict:
    """Returns the data config with every key and its default.

    Returns:
      ConfigDict with keys:
        train_path / eval_path: a local file (.jsonl, .jsonl.gz, .parquet), a
          folder saved by `datasets.Dataset.save_to_disk`, a glob, or a list of
          these; "embedded" (the default) is the committed reasoning preference
          set (`mio_jax/data/assets/`), eval_path "embedded" its held-out split.
        format: "auto" (detected from the first valid row) or one of
          explicit | implicit | conversational | kway.
        max_length: longest prompt + completion in tokens (sequence length L
          is at most max_length - 1 after the one-token target shift).
        max_prompt_length: prompt tokens kept (0 = no separate limit).
        truncation_mode: "keep_start" or "keep_end" for prompts; completions
          are always cut from the end.
        on_bad_row: "error" (stop, naming file/line/field/reason) or "skip"
          (drop, count per reason, report).
        kway_mode: how K-way rows become groups: "best_vs_each" (one pair per
          worse completion), "best_vs_worst" (one pair), "group" (the best and
          `num_negatives` worse completions as one [K = 1 + num_negatives] group).
        num_negatives: negatives per group in "group" mode.
        bucketing: sort rows by length inside windows of `bucket_window`
          global batches, and pad each batch only to its longest sequence
          rounded up to `pad_to_multiple_of` (otherwise every batch is padded
          to max_length - 1 so shapes are static).
        packing: pack the sequences of a batch into rows of max_length - 1
          tokens with segment ids (padding-free); `pack_rows` rows per global
          batch (0 = the smallest count that fits every batch of the planned
          epochs: all of them, or the first 10 of an endless run plus 5%; the
          groups of each batch are balanced by length so one count fits well).
        shared_prompt: lay each pair out as one row [prompt | chosen | rejected]
          with an attention mask in which the rejected tokens see the prompt but
          not the chosen ones (mio_jax.data.shared_prompt), so the prompt is
          computed once per pair; same log-probs as the [B, 2, L] layout.
          Pairs only (not K-way groups), not with packing.
        shuffle: seeded shuffle of the rows each epoch.
        num_epochs: epochs to iterate (0 = repeat forever).
        num_workers: grain worker processes for batch assembly (0 = in-process).
        pad_id: token id written at padding positions.
        system_prompt: system message prepended to conversational prompts that
          have none ("" = leave them as they are).
        max_rows: keep only the first max_rows rows of the source (0 = all).
        cache_dir: folder of the tokenized cache (`mio_jax.data.cache`; local or a URL
          such as gs://, e.g. a bucket shared by runs): each split is tokenised once,
          split across the processes, and every process and restart then reads it
          instead of tokenising. "" = `<workdir>/data_cache` for training runs (and no
          cache for commands without a workdir); "none" = no cache (every process
          tokenises the whole split in memory at every start).
    """
    c = ml_collections.ConfigDict()
    c.train_path = "embedded"
    c.eval_path = "embedded"
    c.format = "auto"
    c.max_length = 256
    c.max_prompt_length = 0
    c.truncation_mode = "keep_end"
    c.on_bad_row = "error"
    c.kway_mode = "best_vs_each"
    c.num_negatives = 3
    c.bucketing = True
    c.bucket_window = 16
    c.pad_to_multiple_of = 32
    c.packing = False
    c.pack_rows = 0
    c.shared_prompt = False
    c.shuffle = True
    c.num_epochs = 0
    c.num_workers = 0
    c.pad_id = 0
    c.system_prompt = ""
    c.max_rows = 0
    c.cache_dir = ""
    c.lock()
    return c


def validate_data_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key when a data config value is invalid.

    Args:
      config: a ConfigDict shaped like `default_data_config()`.
    """
    known = set(default_data_config().keys())
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        raise ValueError(f"data: unknown key(s) {unknown}; known keys: {sorted(known)}")
    choices = {
        "format": FORMATS,
        "truncation_mode": TRUNCATION_MODES,
        "on_bad_row": BAD_ROW_POLICIES,
        "kway_mode": KWAY_MODES,
    }
    for key, allowed in choices.items():
        if config.get(key, None) is not None and config[key] not in allowed:
            raise ValueError(f"data.{key}={config[key]!r}: expected one of {allowed}")
    if config.get("max_length", 2) < 2:
        raise ValueError(f"data.max_length={config.max_length} must be >= 2")
    if config.get("max_prompt_length", 0) < 0:
        raise ValueError("data.max_prompt_length must be >= 0")
    if config.get("num_negatives", 1) < 1:
        raise ValueError("data.num_negatives must be >= 1")


def validate_data_layout(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key when the batch layouts asked for do not combine.

    ``shared_prompt`` lays out pairs only and is not packed (rules of the data section
    alone; rules that tie the layout to the loss or to gradient accumulation live with
    those: ``mio_jax.losses.config``, ``mio_jax.config``).

    Args:
      config: a ConfigDict shaped like `default_data_config()`.
    """
    if config.shared_prompt:
        if config.packing:
            raise ValueError("data.shared_prompt=True cannot be combined with data.packing=True")
        if config.kway_mode == "group":
            raise ValueError("data.shared_prompt=True needs pairs; data.kway_mode='group' makes "
                             "K-way groups")
