"""Bad-row accounting and the data-preparation summary.

Nothing is dropped silently: every row that does not reach a batch is counted
under a reason, and the summary states how many rows were read, used,
truncated and dropped.
"""

import collections
import dataclasses
from typing import Any

from mio_jax.errors import InputError

# Reasons a row can be rejected (the keys of the counts).
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
EMPTY_FIELD = "empty_field"
NON_STRING_CONTENT = "non_string_content"
BAD_MESSAGE = "bad_message"
BAD_SCORES = "bad_scores"
IDENTICAL_COMPLETIONS = "chosen_equals_rejected"
NO_COMPLETION_TOKENS = "no_completion_token_after_truncation"
REASONS = (
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    MISSING_FIELD,
    EMPTY_FIELD,
    NON_STRING_CONTENT,
    BAD_MESSAGE,
    BAD_SCORES,
    IDENTICAL_COMPLETIONS,
    NO_COMPLETION_TOKENS,
)

# Warnings: the row is kept but something deserves attention.
BOUNDARY_MERGE = "prompt_boundary_merge"  # prompt tokens alone != prefix of full tokens
TEMPLATE_PREFIX = "template_prompt_not_prefix"  # rendered prompt not a prefix of rendered full
DUPLICATE_BOS = "duplicate_bos_removed"


class BadRowError(InputError):
    """A row is unusable and the policy is on_bad_row="error"."""


@dataclasses.dataclass
class BadRowLog:
    """Applies the on_bad_row policy and counts rejected rows per reason.

    Attributes:
      policy: "error" or "skip".
      counts: reason -> number of rows dropped.
      examples: reason -> first `max_examples` row ids (e.g. "train.jsonl:12").
    """

    policy: str = "error"
    max_examples: int = 5
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict = dataclasses.field(default_factory=dict)

    def reject(self, row_id: str, reason: str, field: str | None, detail: str) -> None:
        """Records (policy "skip") or raises (policy "error") a bad row.

        Args:
          row_id: where the row is, e.g. "data/train.jsonl:12" or "rows[3]".
          reason: one of REASONS.
          field: the offending field name, or None.
          detail: a human-readable explanation.

        Raises:
          BadRowError: when the policy is "error".
        """
        if reason not in REASONS:
            raise ValueError(f"unknown bad-row reason {reason!r}")
        where = f"{row_id}" + (f", field {field!r}" if field else "")
        if self.policy == "error":
            raise BadRowError(
                f"bad row at {where}: {reason}: {detail} "
                "(set data.on_bad_row='skip' to drop such rows and count them)"
            )
        self.counts[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < self.max_examples:
            ids.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclasses.dataclass
class DataSummary:
    """What data preparation did to one split.

    Attributes:
      split: "train" or "eval".
      format: the detected or configured format.
      rows_read: rows seen in the source(s).
      rows_used: rows that produced at least one group.
      groups: groups (pairs or K-way groups) produced from the used rows.
      dropped: reason -> rows dropped.
      dropped_examples: reason -> first few row ids.
      prompt_truncated / completion_truncated: groups whose prompt / at least
        one completion was cut.
      warnings: warning name -> count (rows kept).
      prompt_tokens / completion_tokens / sequence_tokens: totals over groups
        (completion and sequence summed over the K slots).
    """

    split: str
    format: str
    rows_read: int = 0
    rows_used: int = 0
    groups: int = 0
    dropped: dict = dataclasses.field(default_factory=dict)
    dropped_examples: dict = dataclasses.field(default_factory=dict)
    prompt_truncated: int = 0
    completion_truncated: int = 0
    warnings: dict = dataclasses.field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    sequence_tokens: int = 0

    @property
    def rows_dropped(self) -> int:
        return sum(self.dropped.values())

    def as_metrics(self) -> dict[str, float]:
        """Flat `data/<split>/...` numbers for the run's metrics writer."""
        p = f"data/{self.split}/"
        m: dict[str, float] = {
            p + "rows_read": self.rows_read,
            p + "rows_used": self.rows_used,
            p + "rows_dropped": self.rows_dropped,
            p + "groups": self.groups,
            p + "prompt_truncated": self.prompt_truncated,
            p + "completion_truncated": self.completion_truncated,
        }
        for reason, n in sorted(self.dropped.items()):
            m[p + "dropped/" + reason] = n
        for name, n in sorted(self.warnings.items()):
            m[p + "warnings/" + name] = n
        return m

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rows_dropped"] = self.rows_dropped
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataSummary":
        """The inverse of ``to_dict`` (its derived ``rows_dropped`` is left out)."""
        return cls(**{k: v for k, v in d.items() if k != "rows_dropped"})

    def format_text(self) -> str:
        """A few lines for the console and the run log."""
        lines = [
            f"[{self.split}] format={self.format} rows read={self.rows_read} "
            f"used={self.rows_used} dropped={self.rows_dropped} groups={self.groups}",
            f"  truncated: prompt={self.prompt_truncated} completion={self.completion_truncated}; "
            f"tokens: prompt={self.prompt_tokens} completion={self.completion_tokens}",
        ]
        for reason, n in sorted(self.dropped.items()):
            ids = ", ".join(self.dropped_examples.get(reason, []))
            lines.append(f"  dropped {n} x {reason} (first: {ids})")
        for name, n in sorted(self.warnings.items()):
            lines.append(f"  warning {n} x {name}")
        return "\n".join(lines)
