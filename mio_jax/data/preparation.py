"""Preparing a split: read rows, detect the format, normalise, tokenise, count.

`tokenize_part` does the work for the rows a caller selects (all of them, or every P-th
row when P processes split a cache build between them) and returns the groups with the
source row each came from, plus `PartStats`, the counts of what it did; `combine` adds
the parts' counts into one `report.DataSummary` equal to a single pass over all rows.
The entry point above this layer and the tokenized cache is `mio_jax.data.pipeline.prepare`:
in memory with these functions (every process tokenises everything) or through the cache
(`mio_jax.data.cache`, each process tokenising 1/P of the rows once).
"""

import collections
import dataclasses
import os

from mio_jax.data import formats, report, sources, tokenize

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
EMBEDDED = {
    "train": os.path.join(ASSETS, "reasoning_prefs_train.jsonl.gz"),
    "eval": os.path.join(ASSETS, "reasoning_prefs_eval.jsonl.gz"),
}


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
    """What preparing one part did (JSON-able; `combine` adds the parts up).

    Attributes:
      counts: the part's counts as a ``DataSummary`` (its ``dropped_examples`` unused).
      examples: ``[row, where]`` per reason, the first few by source row.
      error: ``[row, message]`` of the bad row that stopped an ``on_bad_row="error"``
        preparation, else None.
    """

    counts: report.DataSummary
    examples: dict = dataclasses.field(default_factory=dict)
    error: list | None = None

    def to_dict(self) -> dict:
        return {"counts": self.counts.to_dict(), "examples": self.examples, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> "PartStats":
        return cls(report.DataSummary.from_dict(d["counts"]), d["examples"], d["error"])


# The DataSummary fields that are counts: a split's is the sum of its parts'.
_SUMMED = tuple(f.name for f in dataclasses.fields(report.DataSummary) if f.default == 0)


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
    stats = PartStats(report.DataSummary(split="", format=fmt))
    c = stats.counts
    rows, groups = [], []
    for n, row_id, row in sources.numbered_rows(source, max_rows=data_config.max_rows,
                                                 select=select):
        log.row = n
        c.rows_read += 1
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
            c.rows_used += 1
            c.groups += len(tokenized)
            if emit is None:
                rows.extend([n] * len(tokenized))
                groups.extend(tokenized)
            for t in tokenized:
                if emit is not None:
                    emit(n, t)
                c.prompt_truncated += t.prompt_truncated
                c.completion_truncated += t.completion_truncated
                c.prompt_tokens += len(t.prompt_ids)
                c.completion_tokens += sum(len(x) for x in t.completion_ids)
                c.sequence_tokens += sum(t.seq_lengths)
    c.dropped, c.warnings, stats.examples = dict(log.counts), dict(warnings), log.numbered
    return rows, groups, stats


def combine(parts: list[PartStats], split: str, max_examples: int = 5) -> report.DataSummary:
    """The summary of a whole split from the counts of its parts."""
    dropped, warnings, examples = collections.Counter(), collections.Counter(), {}
    for p in parts:
        dropped.update(p.counts.dropped)
        warnings.update(p.counts.warnings)
        for reason, ids in p.examples.items():
            examples.setdefault(reason, []).extend(ids)
    return report.DataSummary(
        split=split,
        format=next((p.counts.format for p in parts), "auto"),
        dropped=dict(dropped),
        dropped_examples={r: [w for _, w in sorted(ids)[:max_examples]]
                          for r, ids in examples.items()},
        warnings=dict(warnings),
        **{name: sum(getattr(p.counts, name) for p in parts) for name in _SUMMED})


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


def resolve_path(spec, split: str):
    """Maps "embedded" to the committed data set's file for the split."""
    return EMBEDDED[split] if spec == "embedded" else spec


def resolve_source(data_config, split: str, source=None):
    """The configured source of a split (``"embedded"``: the committed data set)."""
    return resolve_path(data_config[f"{split}_path"], split) if source is None else source
