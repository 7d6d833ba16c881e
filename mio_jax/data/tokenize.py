"""Tokenisation of groups with exact prompt/completion boundaries, and truncation.

Guarantees, for a Hugging Face (fast) tokenizer:
  * prompt_ids + completion_ids are the tokens of the concatenated text
    (prompt + completion, or the chat template rendered over prompt and
    completion messages), up to the end-of-sequence handling below. When the
    prompt tokenised alone is not a prefix of the full text's tokens (a BPE
    merge across the boundary, or a template that renders the prompt
    differently inside the conversation) the full text's tokens are kept, the
    boundary is put before the first token that ends inside the completion
    text (character offsets; a straddling token goes to the completion), and a
    warning is counted.
  * no duplicated BOS: plain text gets the tokenizer's own special tokens once;
    chat text is tokenised without them because templates write their own.
  * EOS exactly once at the end of each completion: the completion is cut just
    after its last EOS if it has one (a ChatML template's trailing newline
    after <|im_end|> goes), else EOS is appended.
  * truncation: the prompt to `max_prompt_length` tokens (keep_start keeps the
    first ones; keep_end keeps the last ones, and a leading BOS); every
    completion is cut from the end to `max_length - len(prompt)` tokens. A
    completion left with no token rejects the row.
"""

import collections
import dataclasses

import numpy as np

from mio_jax.data import report
from mio_jax.data.formats import Group

COMPLETION_FIELDS = ("chosen", "rejected")


@dataclasses.dataclass(frozen=True)
class TokenizedGroup:
    """A group as token ids, ready for batching.

    Attributes:
      row_id: source location of the row.
      prompt_ids: [P] int32 prompt tokens (shared by the K sequences).
      completion_ids: K arrays [C_k] int32; index 0 is the preferred one.
      weight: the group's weight.
      prompt_truncated / completion_truncated: whether anything was cut.
    """

    row_id: str
    prompt_ids: np.ndarray
    completion_ids: tuple
    weight: float = 1.0
    prompt_truncated: bool = False
    completion_truncated: bool = False

    @property
    def seq_lengths(self) -> list[int]:
        """Tokens of each of the K sequences (prompt + completion k)."""
        return [len(self.prompt_ids) + len(c) for c in self.completion_ids]


class _Bad(Exception):
    def __init__(self, reason, field, detail):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


def _field(k: int, K: int) -> str:
    return COMPLETION_FIELDS[k] if K == 2 else f"completions[{k}]"


def _encode(tokenizer, text: str, special: bool, offsets: bool = False):
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=offsets)
    return list(enc["input_ids"]), (list(enc["offset_mapping"]) if offsets else None)


def _dedupe_bos(ids: list[int], bos: int | None, warnings: collections.Counter) -> list[int]:
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        warnings[report.DUPLICATE_BOS] += 1
        return ids[1:]
    return ids


def split_prompt_completion(
    tokenizer, prompt_text: str, full_text: str, *, special: bool, warnings: collections.Counter
) -> tuple[list[int], list[int]]:
    """Tokenises a full text and splits it where the prompt text ends.

    Args:
      tokenizer: Hugging Face fast tokenizer.
      prompt_text: the prompt part (a prefix of full_text, normally).
      full_text: prompt + completion as one text.
      special: add the tokenizer's special tokens (plain text) or not (chat).
      warnings: counter for boundary warnings.

    Returns:
      (prompt_ids, completion_ids) with prompt_ids + completion_ids equal to the
      tokens of full_text (before EOS handling).
    """
    bos = tokenizer.bos_token_id
    full_ids, offsets = _encode(tokenizer, full_text, special, offsets=True)
    full_ids = _dedupe_bos(full_ids, bos, warnings)
    if len(full_ids) != len(offsets):
        offsets = offsets[1:]
    prompt_ids = _dedupe_bos(
        _encode(tokenizer, prompt_text, special)[0], bos, collections.Counter()
    )
    if not full_text.startswith(prompt_text):
        warnings[report.TEMPLATE_PREFIX] += 1
    if full_ids[: len(prompt_ids)] == prompt_ids and full_text.startswith(prompt_text):
        n = len(prompt_ids)
    else:
        if full_text.startswith(prompt_text):
            warnings[report.BOUNDARY_MERGE] += 1
        boundary = 0
        while boundary < min(len(prompt_text), len(full_text)) and (
            prompt_text[boundary] == full_text[boundary]
        ):
            boundary += 1
        # The prompt is the leading tokens that end inside the prompt text; a token
        # straddling the boundary goes to the completion (as TRL does), so no
        # completion text is lost. Added special tokens have offsets (0, 0).
        n = next((i for i, (_, end) in enumerate(offsets) if end > boundary), len(offsets))
    return full_ids[:n], full_ids[n:]


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    if eos is None:
        return ids
    if eos in ids:
        return ids[: len(ids) - ids[::-1].index(eos)]
    return ids + [eos]


def _render(tokenizer, messages, *, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational data needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _shared_prompt(splits, eos) -> tuple[list[int], list[list[int]]]:
    """One prompt for all K slots: the common prefix of their prompt parts.

    Each slot keeps prompt + completion equal to its full tokens; a slot whose
    prompt part is longer (a boundary merge) moves the extra tokens into its
    completion.
    """
    prompt = _lcp(*[p for p, _ in splits])
    return prompt, [_with_eos(p[len(prompt) :] + c, eos) for p, c in splits]


def _tokenize_raw(tokenizer, group: Group, warnings) -> tuple[list[int], list[list[int]]]:
    eos = tokenizer.eos_token_id
    if group.chat:
        prompt_text = _render(tokenizer, group.prompt, generation_prompt=True)
        splits = [
            split_prompt_completion(
                tokenizer,
                prompt_text,
                _render(tokenizer, group.prompt + c, generation_prompt=False),
                special=False,
                warnings=warnings,
            )
            for c in group.completions
        ]
        return _shared_prompt(splits, eos)
    if group.prompt is None:  # implicit prompt: longest common token prefix
        fulls = [
            _dedupe_bos(_encode(tokenizer, c, True)[0], tokenizer.bos_token_id, warnings)
            for c in group.completions
        ]
        n = len(_lcp(*fulls))
        if n == 0:
            raise _Bad(report.EMPTY_FIELD, "prompt", "chosen and rejected share no leading token")
        return fulls[0][:n], [_with_eos(f[n:], eos) for f in fulls]
    splits = [
        split_prompt_completion(
            tokenizer, group.prompt, group.prompt + c, special=True, warnings=warnings
        )
        for c in group.completions
    ]
    return _shared_prompt(splits, eos)


def _lcp(*seqs: list[int]) -> list[int]:
    n = 0
    while all(n < len(s) for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return list(seqs[0][:n])


def tokenize_group(
    tokenizer,
    group: Group,
    *,
    max_length: int,
    max_prompt_length: int = 0,
    truncation_mode: str = "keep_end",
    log: report.BadRowLog,
    warnings: collections.Counter,
) -> TokenizedGroup | None:
    """Tokenises and truncates one group.

    Args:
      tokenizer: Hugging Face fast tokenizer (chat template for chat groups).
      group: the normalised group.
      max_length: most tokens in prompt + completion.
      max_prompt_length: most prompt tokens (0 = no separate limit).
      truncation_mode: "keep_start" or "keep_end" (prompt only).
      log: bad-row log (raises under on_bad_row="error").
      warnings: counter of kept-row warnings.

    Returns:
      The tokenised group, or None when the row was rejected and skipped.
    """
    try:
        prompt, completions = _tokenize_raw(tokenizer, group, warnings)
        K = len(completions)
        prompt_cut = False
        if max_prompt_length and len(prompt) > max_prompt_length:
            prompt_cut = True
            if truncation_mode == "keep_start":
                prompt = prompt[:max_prompt_length]
            else:
                bos = tokenizer.bos_token_id
                keep_bos = bos is not None and prompt[0] == bos and max_prompt_length > 1
                tail = prompt[len(prompt) - (max_prompt_length - keep_bos) :]
                prompt = ([bos] if keep_bos else []) + tail
        budget = max_length - len(prompt)
        completion_cut = any(len(c) > budget for c in completions)
        completions = [c[: max(budget, 0)] for c in completions]
        for k, c in enumerate(completions):
            if not c:
                raise _Bad(
                    report.NO_COMPLETION_TOKENS,
                    _field(k, K),
                    f"prompt has {len(prompt)} tokens, max_length={max_length}",
                )
        for k in range(1, K):
            if completions[k] == completions[0]:
                raise _Bad(
                    report.IDENTICAL_COMPLETIONS,
                    _field(k, K),
                    "completion tokens identical to the preferred one after truncation",
                )
    except _Bad as bad:
        log.reject(group.row_id, bad.reason, bad.field, bad.detail)
        return None
    return TokenizedGroup(
        row_id=group.row_id,
        prompt_ids=np.asarray(prompt, np.int32),
        completion_ids=tuple(np.asarray(c, np.int32) for c in completions),
        weight=group.weight,
        prompt_truncated=prompt_cut,
        completion_truncated=completion_cut,
    )
