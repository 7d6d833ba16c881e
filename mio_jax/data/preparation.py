"""Preparing a split: read rows, detect the format, normalise, tokenise, count.

`tokenize_part` does the work for the rows a caller selects (all of them, or every P-th
row when P processes split a cache build between them) and returns the groups with the
source row each came from, plus `PartStats`, the counts of what it did; `combine` adds
the parts' counts into one `report.DataSummary` equal to a single pass over all rows.
`prepare` is the entry point: in memory (every process tokenises everything) or through
the tokenized cache (`mio_jax.data.cache`, each process tokenising 1/P of the rows once).
"""

import collections
import dataclasses

from mio_jax.data import formats, report, sources, tokenize
from mio_jax.data.config import validate_data_config
from mio_jax.data.store import ListStore


@dataclasses.dataclass
class PreparedSplit:
    """A tokenised split: groups plus what preparation did.

    Attributes:
      groups: the groups in source order (example ids index it): a sequence of
        ``TokenizedGroup`` with the split's lengths index (``mio_jax.data.store``),
        in memory or read on demand from the tokenized cache.
      K: slots per group (2 for pairs, 1 + num_negatives for K-way groups).
      summary: counts of rows read/used/dropped/truncated.
      cache_path: the cache folder it was read from (None when prepared in memory).
    """

    groups: object
    K: int
    summary: report.DataSummary
    cache_path: str | None = None

    @property
    def seq_lengths(self):
        """[N] longest sequence (prompt + completion) of each group."""
        return self.groups.seq_lengths


@dataclasses.dataclass
class PartStats:
    """Counts of one part of a preparation (JSON-able, added up by `combine`).

    ``examples`` holds ``[row, where]`` per reason (the first few, by source row);
    ``error`` is ``[row, message]`` of the bad row that stopped an ``on_bad_row="error"``
    preparation, else None.
    """

    format: str = "auto"
    rows_read: int = 0
    rows_used: int = 0
    groups: int = 0
    dropped: dict = dataclasses.field(default_factory=dict)
    examples: dict = dataclasses.field(default_factory=dict)
    prompt_truncated: int = 0
    completion_truncated: int = 0
    warnings: dict = dataclasses.field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    sequence_tokens: int = 0
    error: list | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PartStats":
        return cls(**d)


class _NumberedLog(report.BadRowLog):
    """A bad-row log that also remembers the source row of each example."""

    def __init__(self, policy: str):
        super().__init__(policy=policy)
        self.row = -1
        self.numbered: dict = {}

    def reject(self, row_id, reason, field, detail):
        super().reject(row_id, reason, field, detail)
        ids = self.numbered.setdefault(reason, [])
        if len(ids) < self.max_examples:
            ids.append([self.row, self.examples[reason][len(ids)]])


def detect_format(data_config, source) -> tuple[str, int]:
    """``(format, n)``: the configured format, or the one detected from the first row that
    has a recognisable shape (row ``n``; every process finds the same one)."""
    if data_config.format != "auto":
        return data_config.format, 0
    for n, _, row in sources.numbered_rows(source, max_rows=data_config.max_rows):
        if isinstance(row, dict):
            try:
                return formats.detect_format(row), n
            except ValueError:
                continue
    return "auto", -1


def tokenize_part(data_config, tokenizer, source, *, fmt: str, first: int, select=None,
                  emit=None):
    """Normalises and tokenises the selected rows of a source.

    Args:
      data_config: the data config.
      tokenizer: Hugging Face fast tokenizer.
      source: path / glob / list of paths, or a list of dicts.
      fmt, first: ``detect_format``'s answer (rows before ``first`` are judged as a single
        pass would judge them before it had detected the format).
      select: ``n -> bool`` choosing the rows (None: all).
      emit: ``(row, group) -> None`` called for each group as it is made (then nothing
        is collected: a cache build streams groups to its file).

    Returns:
      ``(rows, groups, stats)``: the source row of each group, the ``TokenizedGroup``s
      (both empty with ``emit``) and the ``PartStats``. Under ``on_bad_row="error"`` the first bad row stops the part and
      is recorded in ``stats.error`` (the caller raises it, once every part agrees).
    """
    auto = data_config.format == "auto"
    log = _NumberedLog(policy=data_config.on_bad_row)
    warnings = collections.Counter()
    stats = PartStats(format=fmt)
    rows, groups = [], []
    for n, row_id, row in sources.numbered_rows(source, max_rows=data_config.max_rows,
                                                 select=select):
        log.row = n
        stats.rows_read += 1
        try:
            if isinstance(row, sources.Malformed):
                log.reject(row_id, report.MALFORMED_JSON, None, row.error)
                continue
            if auto and (first < 0 or n < first) and isinstance(row, dict):
                try:  # an unrecognisable row before the first recognisable one is bad
                    formats.detect_format(row)
                except ValueError as e:
                    log.reject(row_id, report.MISSING_FIELD, None, str(e))
                    continue
            row_fmt = fmt if fmt != "auto" and (first <= n) else "explicit"
            row_groups = formats.normalize_row(
                row, row_id, row_fmt, log, kway_mode=data_config.kway_mode,
                num_negatives=data_config.num_negatives, system_prompt=data_config.system_prompt)
            tokenized = []
            for g in row_groups:
                t = tokenize.tokenize_group(
                    tokenizer, g, max_length=data_config.max_length,
                    max_prompt_length=data_config.max_prompt_length,
                    truncation_mode=data_config.truncation_mode, log=log, warnings=warnings)
                if t is None:  # one bad pair rejects the whole row, so counts are per row
                    tokenized = []
                    break
                tokenized.append(t)
        except report.BadRowError as e:
            stats.error = [n, str(e)]
            break
        if tokenized:
            stats.rows_used += 1
            stats.groups += len(tokenized)
            if emit is None:
                rows.extend([n] * len(tokenized))
                groups.extend(tokenized)
            for t in tokenized:
                if emit is not None:
                    emit(n, t)
                stats.prompt_truncated += t.prompt_truncated
                stats.completion_truncated += t.completion_truncated
                stats.prompt_tokens += len(t.prompt_ids)
                stats.completion_tokens += sum(len(c) for c in t.completion_ids)
                stats.sequence_tokens += sum(t.seq_lengths)
    stats.dropped, stats.examples, stats.warnings = dict(log.counts), log.numbered, dict(warnings)
    return rows, groups, stats


def combine(parts: list[PartStats], split: str, max_examples: int = 5) -> report.DataSummary:
    """The summary of a whole split from the counts of its parts."""
    dropped, warnings, examples = collections.Counter(), collections.Counter(), {}
    for p in parts:
        dropped.update(p.dropped)
        warnings.update(p.warnings)
        for reason, ids in p.examples.items():
            examples.setdefault(reason, []).extend(ids)
    return report.DataSummary(
        split=split,
        format=next((p.format for p in parts), "auto"),
        rows_read=sum(p.rows_read for p in parts),
        rows_used=sum(p.rows_used for p in parts),
        groups=sum(p.groups for p in parts),
        dropped=dict(dropped),
        dropped_examples={r: [w for _, w in sorted(ids)[:max_examples]]
                          for r, ids in examples.items()},
        prompt_truncated=sum(p.prompt_truncated for p in parts),
        completion_truncated=sum(p.completion_truncated for p in parts),
        warnings=dict(warnings),
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        completion_tokens=sum(p.completion_tokens for p in parts),
        sequence_tokens=sum(p.sequence_tokens for p in parts),
    )


def first_error(parts: list[PartStats]) -> str | None:
    """The message of the earliest bad row that stopped a part, if any."""
    errors = sorted(p.error for p in parts if p.error)
    return errors[0][1] if errors else None


def check_usable(summary: report.DataSummary, source) -> None:
    if not summary.groups:
        raise ValueError(
            f"{summary.split} split {source!r}: no usable row "
            f"(read {summary.rows_read}, dropped {summary.dropped})")


def num_slots(data_config, fmt: str) -> int:
    return (data_config.num_negatives + 1
            if fmt == "kway" and data_config.kway_mode == "group" else 2)


def resolve_source(data_config, split: str, source=None):
    """The configured source of a split (``"embedded"``: the committed data set)."""
    from mio_jax.data.pipeline import resolve_path

    return resolve_path(data_config[f"{split}_path"], split) if source is None else source


def prepare(data_config, tokenizer, *, split: str = "train", source=None,
            cache_dir: str | None = None) -> PreparedSplit:
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
    source = resolve_source(data_config, split, source)
    if cache_dir is not None:
        from mio_jax.data import cache

        return cache.load_or_build(data_config, tokenizer, split=split, source=source,
                                   cache_dir=cache_dir)
    fmt, first = detect_format(data_config, source)
    _, groups, stats = tokenize_part(data_config, tokenizer, source, fmt=fmt, first=first)
    if stats.error:
        raise report.BadRowError(stats.error[1])
    summary = combine([stats], split)
    check_usable(summary, source)
    return PreparedSplit(ListStore(groups, num_slots(data_config, fmt)),
                         num_slots(data_config, fmt), summary)
