"""Preference-row formats: detection, validation and normalisation to groups.

Formats (detected once per data set from the first object row, or set by
`data.format`):
  * explicit: `prompt`, `chosen`, `rejected` strings.
  * implicit: `chosen` and `rejected` full texts only; the prompt is their
    longest common token prefix (split in `tokenize.py`).
  * conversational: `chosen` / `rejected` (and optionally `prompt`) are lists
    of {"role", "content"} messages rendered with the chat template; without
    `prompt`, the prompt is the longest common prefix of whole messages.
  * kway: `prompt` (or UltraFeedback's `instruction`) plus `completions`
    (strings, message lists, or dicts with a "text"/"response"/"content" and
    a "score"/"overall_score"), or with `scores` (higher is better) or `ranks`
    (1 = best) lists.

Every row becomes one or more `Group`s: a prompt and K completions, slot 0
the preferred one. An optional numeric `weight` field sets the group weight.
"""

import dataclasses
import math
from typing import Any

from mio_jax.data import report

Messages = list[dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Group:
    """One training group before tokenisation.

    Attributes:
      row_id: source location of the row, e.g. "train.jsonl:12".
      prompt: text, messages, or None (implicit text: split on tokens later).
      completions: K >= 2 texts or message lists; index 0 is preferred.
      chat: True when prompt/completions are messages (chat template applies).
      weight: per-group weight (the row's `weight` field, default 1.0).
    """

    row_id: str
    prompt: str | Messages | None
    completions: tuple
    chat: bool
    weight: float = 1.0


class _Bad(Exception):
    def __init__(self, reason: str, field: str | None, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


def detect_format(row: Any) -> str:
    """Returns the format of a row from its keys and value types.

    Args:
      row: a dict row.

    Returns:
      "explicit", "implicit", "conversational" or "kway".

    Raises:
      ValueError: when the keys fit no known format.
    """
    if not isinstance(row, dict):
        raise ValueError(f"cannot detect the format of a non-object row: {type(row).__name__}")
    if "completions" in row:
        return "kway"
    if "chosen" in row and "rejected" in row:
        return (
            "conversational"
            if isinstance(row["chosen"], list)
            else ("explicit" if "prompt" in row else "implicit")
        )
    raise ValueError(
        f"cannot detect the data format from keys {sorted(row)}: expected "
        "prompt/chosen/rejected, chosen/rejected, or prompt/completions(+scores|ranks)"
    )


def _text(row: dict, field: str) -> str:
    if field not in row or row[field] is None:
        raise _Bad(report.MISSING_FIELD, field, "field is missing")
    value = row[field]
    if not isinstance(value, str):
        raise _Bad(
            report.NON_STRING_CONTENT, field, f"expected a string, got {type(value).__name__}"
        )
    if not value.strip():
        raise _Bad(report.EMPTY_FIELD, field, "string is empty")
    return value


def _messages(value: Any, field: str, *, allow_empty: bool = False) -> Messages:
    if not isinstance(value, list):
        raise _Bad(
            report.BAD_MESSAGE, field, f"expected a list of messages, got {type(value).__name__}"
        )
    if not value and not allow_empty:
        raise _Bad(report.EMPTY_FIELD, field, "message list is empty")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _Bad(
                report.BAD_MESSAGE, field, f"message {i} is not a {{'role', 'content'}} object"
            )
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise _Bad(
                report.NON_STRING_CONTENT, field, f"message {i} has non-string role or content"
            )
        if not m["content"].strip():
            raise _Bad(report.EMPTY_FIELD, field, f"message {i} has empty content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _chat_field(row: dict, field: str) -> Messages:
    if field not in row or row[field] is None:
        raise _Bad(report.MISSING_FIELD, field, "field is missing")
    value = row[field]
    if isinstance(value, str):  # a bare string in a chat row: one message
        if not value.strip():
            raise _Bad(report.EMPTY_FIELD, field, "string is empty")
        return [{"role": "user" if field == "prompt" else "assistant", "content": value}]
    return _messages(value, field)


def _with_system(prompt: Messages, system_prompt: str) -> Messages:
    if system_prompt and not (prompt and prompt[0]["role"] == "system"):
        return [{"role": "system", "content": system_prompt}] + prompt
    return prompt


def _weight(row: dict) -> float:
    w = row.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise _Bad(report.BAD_SCORES, "weight", f"weight must be a finite number >= 0, got {w!r}")
    return float(w)


def _pairwise(row: dict, fmt: str, row_id: str, system_prompt: str) -> list[Group]:
    weight = _weight(row)
    if fmt == "explicit":
        prompt, chosen, rejected = (
            _text(row, "prompt"),
            _text(row, "chosen"),
            _text(row, "rejected"),
        )
        if chosen == rejected:
            raise _Bad(
                report.IDENTICAL_COMPLETIONS, "rejected", "chosen and rejected are identical"
            )
        return [Group(row_id, prompt, (chosen, rejected), False, weight)]
    if fmt == "implicit":
        chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
        if chosen == rejected:
            raise _Bad(
                report.IDENTICAL_COMPLETIONS, "rejected", "chosen and rejected are identical"
            )
        return [Group(row_id, None, (chosen, rejected), False, weight)]
    chosen, rejected = _chat_field(row, "chosen"), _chat_field(row, "rejected")
    if row.get("prompt") is not None:
        prompt = _chat_field(row, "prompt")
    else:  # implicit conversation: the shared leading messages are the prompt
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        for field, rest in (("chosen", chosen), ("rejected", rejected)):
            if not rest and (chosen or rejected):
                raise _Bad(
                    report.EMPTY_FIELD, field, "no message left after the shared prompt messages"
                )
    if chosen == rejected:
        raise _Bad(report.IDENTICAL_COMPLETIONS, "rejected", "chosen and rejected are identical")
    return [Group(row_id, _with_system(prompt, system_prompt), (chosen, rejected), True, weight)]


def _kway_completion(value: Any, i: int, chat: bool) -> tuple[Any, float | None]:
    field = f"completions[{i}]"
    score = None
    if isinstance(value, dict) and "role" not in value:
        score = value.get("score", value.get("overall_score"))
        key = next((k for k in ("text", "response", "content") if k in value), None)
        if key is None:
            raise _Bad(
                report.MISSING_FIELD, field, "completion object has no text/response/content"
            )
        value = value[key]
    if chat:
        return _chat_field({field: value}, field), score
    if isinstance(value, list):
        raise _Bad(report.NON_STRING_CONTENT, field, "message list completion with a text prompt")
    return _text({field: value}, field), score


def _kway(row: dict, row_id: str, mode: str, num_negatives: int, system_prompt: str) -> list[Group]:
    weight = _weight(row)
    key = "instruction" if "prompt" not in row and "instruction" in row else "prompt"
    if row.get(key) is None:
        raise _Bad(report.MISSING_FIELD, "prompt", "field is missing")
    chat = isinstance(row[key], list)
    prompt = _with_system(_chat_field(row, key), system_prompt) if chat else _text(row, key)
    raw = row.get("completions")
    if not isinstance(raw, list) or len(raw) < 2:
        raise _Bad(
            report.MISSING_FIELD if not raw else report.BAD_SCORES,
            "completions",
            "need a list of at least 2 completions",
        )
    parsed = [_kway_completion(c, i, chat) for i, c in enumerate(raw)]
    completions = [c for c, _ in parsed]
    if "scores" in row:
        scores, field = row["scores"], "scores"
    elif "ranks" in row:
        scores, field = row["ranks"], "ranks"
    else:
        scores, field = [s for _, s in parsed], "completions[].score"
    if (
        not isinstance(scores, list)
        or len(scores) != len(completions)
        or any(
            isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)
            for s in scores
        )
    ):
        raise _Bad(
            report.BAD_SCORES, field, f"need one finite number per completion, got {scores!r}"
        )
    if field == "ranks":
        scores = [-s for s in scores]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worse = sorted(
        (i for i in range(len(scores)) if scores[i] < scores[best]), key=lambda i: (-scores[i], i)
    )  # hardest negative first
    worse = [i for i in worse if completions[i] != completions[best]]
    if not worse:
        reason = (
            report.IDENTICAL_COMPLETIONS
            if any(scores[i] < scores[best] for i in range(len(scores)))
            else report.BAD_SCORES
        )
        raise _Bad(reason, field, "no completion differs from and scores below the best")
    if mode == "best_vs_each":
        sets = [(best, w) for w in worse]
    elif mode == "best_vs_worst":
        sets = [(best, worse[-1])]
    else:
        sets = [(best, *worse[:num_negatives])]
    return [Group(row_id, prompt, tuple(completions[i] for i in s), chat, weight) for s in sets]


def normalize_row(
    row: Any,
    row_id: str,
    fmt: str,
    log: report.BadRowLog,
    *,
    kway_mode: str = "best_vs_each",
    num_negatives: int = 3,
    system_prompt: str = "",
) -> list[Group]:
    """Validates one row and turns it into groups (empty list when rejected).

    Args:
      row: the parsed row (a dict for a well-formed row).
      row_id: its source location, used in errors and the report.
      fmt: explicit | implicit | conversational | kway.
      log: applies the on_bad_row policy (raises under "error").
      kway_mode: best_vs_each | best_vs_worst | group (K-way rows only).
      num_negatives: negatives per group in "group" mode.
      system_prompt: system message added to chat prompts without one.

    Returns:
      The row's groups, slot 0 preferred; [] when the row was skipped.
    """
    try:
        if not isinstance(row, dict):
            raise _Bad(
                report.NOT_AN_OBJECT, None, f"expected a JSON object, got {type(row).__name__}"
            )
        if fmt == "kway":
            return _kway(row, row_id, kway_mode, num_negatives, system_prompt)
        if fmt == "conversational" and not isinstance(row.get("chosen"), (list, str, type(None))):
            raise _Bad(report.BAD_MESSAGE, "chosen", "expected a list of messages")
        return _pairwise(row, fmt, row_id, system_prompt)
    except _Bad as bad:
        log.reject(row_id, bad.reason, bad.field, bad.detail)
        return []
