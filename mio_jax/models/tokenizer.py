"""Tokenizers from a Hugging Face folder or rebuilt from a GGUF file's metadata.

A GGUF file carries no `tokenizer.json`, only llama.cpp's description of it
(vocabulary, merges, token types, special ids, pre-tokenizer name, chat
template). For byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`)
this module rebuilds the same tokenizer with the `tokenizers` library and wraps
it in `transformers.PreTrainedTokenizerFast`, without torch (transformers' own
GGUF path imports torch).

The pre-tokenizer follows llama.cpp's `tokenizer.ggml.pre` groups
(llama-vocab.cpp): "smollm" and its group isolate every digit before the GPT-2
split (the `Digits(individual_digits=True)` + `ByteLevel` pair of SmolLM2's
original tokenizer.json); "gpt2"/"default" use the GPT-2 split; the Llama-3 and
Qwen2 groups use their own split regexes.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from mio_jax import paths
from mio_jax.models.gguf_io import gguf_metadata, open_gguf

# llama.cpp token types (llama_token_type): 3 CONTROL, 4 USER_DEFINED.
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> how to split before byte-level BPE.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_GPT2 = ("gpt2", "default", "gpt-2")
_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")
_QWEN2 = ("qwen2", "deepseek-r1-qwen", "megrez")

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _pre_tokenizer(pre_type: str, path: str) -> pre_tokenizers.PreTokenizer:
    if pre_type in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre_type in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    for names, split in ((_LLAMA3, _LLAMA3_SPLIT), (_QWEN2, _QWEN2_SPLIT)):
        if pre_type in names:
            return pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
    known = sorted(_DIGITS_THEN_GPT2 + _GPT2 + _LLAMA3 + _QWEN2)
    raise ValueError(f"{path}: unsupported tokenizer.ggml.pre {pre_type!r} (supported: {known})")


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> frozenset[str]:
    return frozenset(pre_tokenizers.ByteLevel.alphabet())


def build_gguf_tokenizer(meta: dict[str, Any], path: str = "?"):
    """Builds a `PreTrainedTokenizerFast` from GGUF tokenizer metadata.

    Args:
      meta: GGUF metadata as from `gguf_io.gguf_metadata` (needs
        `tokenizer.ggml.{model,tokens,merges}`; uses token types, special ids,
        `tokenizer.ggml.pre`, `add_bos_token`, `add_eos_token`, `tokenizer.chat_template`).
      path: file name for error messages.

    Returns:
      A `transformers.PreTrainedTokenizerFast`.
    """
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: unsupported tokenizer.ggml.model {kind!r} (only byte-level BPE 'gpt2' is supported)")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if key not in meta:
            raise ValueError(f"{path}: missing GGUF metadata key {key!r}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    merges = []
    for i, merge in enumerate(meta["tokenizer.ggml.merges"]):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}: tokenizer.ggml.merges[{i}] = {merge!r} is not 'left right'")
        merges.append((parts[0], parts[1]))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), path)
    tok.decoder = decoders.ByteLevel()
    # Control tokens that are not spelled in the byte alphabet are llama.cpp
    # labels for ordinary tokens; making them special would change splitting.
    alphabet = _byte_alphabet()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL and set(t) <= alphabet
        ]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    )

    def special(key):
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        if index is None:
            return None
        if not 0 <= int(index) < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{key}_token_id = {index} outside the vocabulary")
        return tokens[int(index)]

    bos, eos = special("bos"), special("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    special_ids = [(t, vocab[t]) for t in {bos, eos} if t is not None and (add_bos or add_eos)]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special_ids),
        ]
    )
    kwargs = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": special("unknown"),
        "pad_token": special("padding"),
    }
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        model_max_length=int(meta.get(f"{meta.get('general.architecture')}.context_length", 0)) or None,
        **{k: v for k, v in kwargs.items() if v is not None},
    )
    return wrapped


def load_tokenizer(path: str | os.PathLike):
    """Loads the tokenizer of an HF folder or rebuilds it from a `.gguf` file.

    Args:
      path: an HF model folder with tokenizer files (read with
        `AutoTokenizer.from_pretrained`, local files only, no remote code), or a
        `.gguf` file; local or a URL such as `gs://bucket/model` (staged on local disk by
        `mio_jax.paths.local_copy`).

    Returns:
      A `transformers.PreTrainedTokenizerFast` (chat template, bos/eos/pad set).

    Raises:
      FileNotFoundError: no such path, or a folder without tokenizer files.
      ValueError: a GGUF file whose tokenizer cannot be rebuilt (names file and key).
    """
    path = os.fspath(path)
    if paths.is_remote(path):
        if not paths.exists(path):
            raise FileNotFoundError(f"tokenizer path not found: {path}")
        path = paths.local_copy(path)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            raise FileNotFoundError(f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in {path}")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path not found: {path}")

    return build_gguf_tokenizer(gguf_metadata(open_gguf(path)), path)
