"""Tokenizers rebuilt from GGUF metadata: SmolLM2 against transformers' own GGUF
tokenizer (golden ids from scripts/golden_smollm2.py), and small hand-made vocabularies."""

import json
import os

import pytest
from tokenizers import pre_tokenizers

from mio_jax.models.embedded import smollm2_gguf_path
from mio_jax.models.tokenizer import build_gguf_tokenizer, load_tokenizer

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), "golden_smollm2.json")))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(smollm2_gguf_path())


def test_smollm2_ids_match_transformers_gguf_tokenizer(smollm2_tokenizer):
    for case in GOLDEN["tokenizer"]:
        ids = smollm2_tokenizer.encode(case["text"], add_special_tokens=True)
        assert ids == case["ids"], case["text"]
        assert smollm2_tokenizer.decode(ids) == case["text"]


def test_smollm2_chat_template(smollm2_tokenizer):
    chat = GOLDEN["chat"]
    text = smollm2_tokenizer.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True)
    assert text == chat["text"]
    assert smollm2_tokenizer(text, add_special_tokens=False)["input_ids"] == chat["ids"]
    assert text.endswith("<|im_start|>assistant\n")


def test_smollm2_special_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token_id, tok.unk_token_id) == (2, 0)
    assert len(tok) == 49152
    ids = tok.encode("<|im_start|>hi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    # SmolLM2 isolates digits: "2024" is four tokens, one per digit.
    assert tok.convert_ids_to_tokens(tok.encode("2024")) == ["2", "0", "2", "4"]


def test_hf_folder_round_trip(smollm2_tokenizer, tmp_path):
    smollm2_tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    for case in GOLDEN["tokenizer"]:
        assert again.encode(case["text"]) == case["ids"]
    chat = GOLDEN["chat"]
    assert again.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True) == chat["text"]
    assert again.eos_token_id == 2


def _tiny_meta(**overrides):
    """A byte-level vocabulary: two control tokens, the 256 byte symbols, "12" and "Ġa"."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<s>", "</s>"] + alphabet + ["12", "Ġa"]
    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": ["1 2", "Ġ a"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }
    meta.update(overrides)
    return meta


def test_pre_tokenizer_types_split_digits_as_llama_cpp():
    smollm = build_gguf_tokenizer(_tiny_meta())
    gpt2 = build_gguf_tokenizer(_tiny_meta(**{"tokenizer.ggml.pre": "gpt2"}))
    assert smollm.convert_ids_to_tokens(smollm.encode("12 a")) == ["1", "2", "Ġa"]
    assert gpt2.convert_ids_to_tokens(gpt2.encode("12 a")) == ["12", "Ġa"]
    assert smollm.decode(smollm.encode("12 a")) == "12 a"


def test_control_tokens_are_special_and_bos_added_when_asked():
    tok = build_gguf_tokenizer(_tiny_meta(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("</s>a") == [0, 1, tok.convert_tokens_to_ids("a")]
    assert tok.encode("a", add_special_tokens=False) == [tok.convert_tokens_to_ids("a")]
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match=r"x\.gguf: unsupported tokenizer.ggml.model 'llama'"):
        build_gguf_tokenizer(_tiny_meta(**{"tokenizer.ggml.model": "llama"}), "x.gguf")
    with pytest.raises(ValueError, match=r"unsupported tokenizer.ggml.pre 'mystery'"):
        build_gguf_tokenizer(_tiny_meta(**{"tokenizer.ggml.pre": "mystery"}))
    with pytest.raises(ValueError, match=r"merges\[0\] = 'a' is not"):
        build_gguf_tokenizer(_tiny_meta(**{"tokenizer.ggml.merges": ["a"]}))
