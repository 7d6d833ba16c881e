"""Fixtures for the data tests: real tokenizers (GPT-2 BPE without a template, the
same BPE with ChatML, and SmolLM2's from the embedded GGUF)."""

import functools
import gzip
import json
import os

import pytest
import tokenizers
import transformers

ASSETS = os.path.join(os.path.dirname(__file__), "assets")

# SmolLM2-Instruct's ChatML template (system message default as in the model's template).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The original GPT-2 BPE (eos <|endoftext|>, no BOS added, no chat template)."""
    with gzip.open(os.path.join(ASSETS, "gpt2_vocab.json.gz"), "rt", encoding="utf-8") as f:
        vocab = json.load(f)
    with gzip.open(os.path.join(ASSETS, "gpt2_merges.txt.gz"), "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@functools.lru_cache(maxsize=None)
def gpt2_chatml_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """GPT-2 BPE + <|im_start|>/<|im_end|> special tokens, ChatML template, eos <|im_end|>."""
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(gpt2_tokenizer()._tokenizer.to_str())
    )
    tok.add_special_tokens(
        {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
        }
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer rebuilt from the embedded GGUF."""
    from mio_jax.models.embedded import smollm2_gguf_path
    from mio_jax.models.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_gguf_path())


@pytest.fixture(scope="session")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="session")
def chatml():
    return gpt2_chatml_tokenizer()


@pytest.fixture(scope="session")
def smollm2():
    return smollm2_tokenizer()
