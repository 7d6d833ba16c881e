"""Verifiers: `(completion_text, example) -> score in [0, 1]` (1.0 = correct).

Registered by name (`get(name)`):

- "reasoning_gym": the reasoning-gym task's own `score_answer` on the final answer extracted
  from the completion. The example carries the task name (`task`, or
  `metadata["source_dataset"]` as reasoning-gym writes it) plus the entry fields that
  `score_answer` reads (`answer`, `metadata`, `question`).
- "exact_number": GSM8K-style exact match on the final number ("#### 42", "The answer is 42",
  `\\boxed{42}`, `<answer>42</answer>`, else the last number), commas and a trailing ".0" removed;
  the reference is `example["answer"]` (itself reduced the same way, so "#### 1,200" works).
- "exact_string": the extracted final answer equals `example["answer"]` after whitespace/case folding.
- "module:function": any importable callable with the same signature.
"""

from __future__ import annotations

import functools
import importlib
import re
from typing import Any, Callable, Mapping

Verifier = Callable[[str, Mapping[str, Any]], float]

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_TAGGED = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_HASHES = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]*)", re.IGNORECASE)
_NUMBER_RE = re.compile(_NUMBER)
_MARKERS = (_TAGGED, _BOXED, _HASHES, _ANSWER_IS)  # in the order they are tried


def marked_answer(completion: str) -> str | None:
    """The text of the completion's last marked answer (`<answer>..</answer>`, `\\boxed{..}`,
    `#### ..` or "answer is .."), tried in that order; None when nothing is marked."""
    for pattern in _MARKERS:
        found = pattern.findall(completion)
        if found:
            return found[-1]
    return None


def extract_final_answer(completion: str) -> str | None:
    """The completion's final answer: the last `<answer>..</answer>`, `\\boxed{..}`, `#### ..`
    or "answer is ..", else the last non-empty line. None for an empty completion."""
    marked = marked_answer(completion)
    if marked is not None:
        return marked.strip().rstrip(".").strip()
    lines = [ln.strip() for ln in completion.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


def normalize_number(text: str, *, first: bool = False) -> str | None:
    """Canonical form of the last (or `first`) number in text: "1,200.0" -> "1200", "$3.50" -> "3.5".

    Returns None if `text` holds no number."""
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    s = found[0 if first else -1].replace(",", "").replace("$", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def final_number(completion: str) -> str | None:
    """The normalised final number: the first number of the last marked answer if there is
    one ("The answer is 14 (not 15)" -> "14"), else the completion's last number."""
    for pattern in _MARKERS:  # a marker without a number falls through to the next one
        found = pattern.findall(completion)
        if found:
            n = normalize_number(found[-1], first=True)
            if n is not None:
                return n
    return normalize_number(completion)


def _require(example: Mapping[str, Any], key: str, verifier: str) -> Any:
    if key not in example:
        raise KeyError(f"verifier {verifier!r}: example has no {key!r} key (keys: {sorted(example)})")
    return example[key]


def exact_number(completion: str, example: Mapping[str, Any]) -> float:
    """1.0 iff the completion's final number equals the example's `answer` number."""
    reference = normalize_number(str(_require(example, "answer", "exact_number")))
    if reference is None:
        raise ValueError(f"verifier 'exact_number': answer {example['answer']!r} holds no number")
    return float(final_number(completion) == reference)


def exact_string(completion: str, example: Mapping[str, Any]) -> float:
    """1.0 iff the extracted final answer equals `answer` up to case and whitespace."""
    fold = lambda s: " ".join(str(s).split()).lower()
    answer = extract_final_answer(completion)
    return float(answer is not None and fold(answer) == fold(_require(example, "answer", "exact_string")))


def reasoning_gym_task(example: Mapping[str, Any]) -> str:
    """The reasoning-gym task name of an example (`task` or `metadata["source_dataset"]`)."""
    task = example.get("task") or (example.get("metadata") or {}).get("source_dataset")
    if not task:
        raise KeyError("verifier 'reasoning_gym': example has neither 'task' nor "
                       f"metadata['source_dataset'] (keys: {sorted(example)})")
    return task


@functools.lru_cache(maxsize=None)
def _score_fn(task: str) -> Callable[[Any, dict], float]:
    import reasoning_gym

    try:
        return reasoning_gym.get_score_answer_fn(task)
    except ValueError as e:
        raise ValueError(f"verifier 'reasoning_gym': unknown reasoning-gym task {task!r}") from e


def reasoning_gym(completion: str, example: Mapping[str, Any]) -> float:
    """The task's `score_answer(extracted_answer, entry)`, clipped to [0, 1].

    When the oracle answer is a number the extracted answer is `final_number(completion)`,
    otherwise `extract_final_answer(completion)`."""
    task = reasoning_gym_task(example)
    entry = {"question": example.get("question", ""), "answer": _require(example, "answer", "reasoning_gym"),
             "metadata": dict(example.get("metadata") or {})}
    oracle = str(entry["answer"]).strip()
    if _NUMBER_RE.fullmatch(oracle):  # a numeric task: read the final number ("= 8" counts)
        answer = final_number(completion)
    else:
        answer = extract_final_answer(completion)
    score = _score_fn(task)(answer, entry)
    return float(min(max(score, 0.0), 1.0))


_REGISTRY: dict[str, Verifier] = {
    "reasoning_gym": reasoning_gym,
    "exact_number": exact_number,
    "exact_string": exact_string,
}


def names() -> list[str]:
    """Registered verifier names (besides any "module:function")."""
    return sorted(_REGISTRY)


def import_callable(spec: str, kind: str) -> Callable:
    """The callable named ``spec`` ("module:function"); ``kind`` names what it is for in the
    error ("verifier", "reward").

    Raises:
      ValueError: the module or attribute cannot be imported, or it is not callable.
    """
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{kind} {spec!r}: cannot import {attr!r} from module {module!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"{kind} {spec!r} is not callable")
    return fn


def get(name: str) -> Verifier:
    """The verifier called `name`, or the callable `module:function`.

    Raises:
      ValueError: unknown name, or a "module:function" that cannot be imported / is not callable.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return import_callable(name, "verifier")
    raise ValueError(f"unknown verifier {name!r}; registered: {names()}, or give 'module:function'")


def is_correct(score: float, threshold: float = 1.0) -> bool:
    """A score counts as correct when it reaches `threshold` (default: exactly right)."""
    return score >= threshold
