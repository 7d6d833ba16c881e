"""`python -m mio_jax.convert` on small GGUF files written as llama.cpp would."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import pre_tokenizers

from mio_jax import convert
from mio_jax.models import load_pretrained, load_tokenizer
from mio_jax.models.gguf_io import read_gguf

sys.path.insert(0, os.path.dirname(__file__))
from test_gguf_io import tiny_hf_tensors, write_tiny_gguf  # noqa: E402

ALPHABET = sorted(pre_tokenizers.ByteLevel.alphabet())
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + ALPHABET + ["Ġa"]
VOCAB = len(TOKENS)
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _tokenizer_kv(w):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    w.add_token_merges(["Ġ a"])
    w.add_pad_token_id(2)
    w.add_chat_template(TEMPLATE)


@pytest.fixture
def tiny(tmp_path):
    hf = tiny_hf_tensors(seed=3, vocab=VOCAB, tied=False)
    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf, tokenizer=_tokenizer_kv, vocab=VOCAB)
    return path, hf


def _read_folder(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(os.path.join(folder, f)))
    return files, out


def test_stream_export_shards_and_keeps_tensors(tiny, tmp_path):
    src, hf = tiny
    dst = str(tmp_path / "out")
    assert convert.main([src, dst, "--exporter=stream", "--max_shard_size=100KB"]) == 0
    files, tensors = _read_folder(dst)
    assert len(files) > 1 and files[0].startswith("model-00001-of-")
    assert sorted(tensors) == sorted(hf)
    for name, want in hf.items():
        np.testing.assert_array_equal(tensors[name], want)
    config = json.load(open(os.path.join(dst, "config.json")))
    assert config == read_gguf(src)[0]
    assert json.load(open(os.path.join(dst, "generation_config.json")))["eos_token_id"] == 2
    tok = load_tokenizer(dst)
    assert tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "<|im_start|>user\na<|im_end|>\n"
    assert tok.encode("<|im_start|> a") == [1, TOKENS.index("Ġa")]


def test_bfloat16_export(tiny, tmp_path):
    src, hf = tiny
    dst = str(tmp_path / "bf16")
    assert convert.main([src, dst, "--exporter=stream", "--dtype=bfloat16"]) == 0
    files, tensors = _read_folder(dst)
    assert files == ["model.safetensors"]
    name = "model.layers.1.mlp.up_proj.weight"
    assert tensors[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(tensors[name], hf[name].astype(ml_dtypes.bfloat16))
    assert json.load(open(os.path.join(dst, "config.json")))["torch_dtype"] == "bfloat16"


def test_mio_jax_exporter_round_trip(tiny, tmp_path):
    src, hf = tiny
    dst = str(tmp_path / "mj")
    convert.convert(src, dst, use_exporter=True)
    _, tensors = _read_folder(dst)
    assert sorted(tensors) == sorted(hf)
    for name, want in hf.items():
        np.testing.assert_array_equal(tensors[name], want)
    ids = jnp.asarray([[5, 17, 200, 3, 42]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(load_pretrained(dst)(ids)), np.asarray(load_pretrained(src)(ids)))


def test_hf_folder_reexport_to_bfloat16(tiny, tmp_path):
    src, hf = tiny
    first, second = str(tmp_path / "f32"), str(tmp_path / "bf16")
    assert convert.main([src, first, "--exporter=stream"]) == 0
    assert convert.main([first, second, "--dtype=bfloat16"]) == 0  # HF folder in: the mio_jax exporter
    _, tensors = _read_folder(second)
    assert sorted(tensors) == sorted(hf)
    for name, want in hf.items():
        np.testing.assert_array_equal(tensors[name], want.astype(ml_dtypes.bfloat16))
    assert load_tokenizer(second).encode("<|im_start|> a") == [1, TOKENS.index("Ġa")]


def test_parse_size():
    assert convert.parse_size("2GB") == 2 * 10**9
    assert convert.parse_size("500MiB") == 500 * 2**20
    assert convert.parse_size(1234) == 1234
    with pytest.raises(ValueError, match="cannot read size '2 parsecs'"):
        convert.parse_size("2 parsecs")


def test_errors(tmp_path, capsys):
    assert convert.main([str(tmp_path / "none.gguf"), str(tmp_path / "o")]) == 2
    assert "source not found" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04not gguf")
    assert convert.main([str(bad), str(tmp_path / "o")]) == 2
    assert "bad.gguf is not a GGUF file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.main([str(bad), str(tmp_path / "o"), "--dtype=float8"])


def test_cli_names_an_unrecognised_folder(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "100").mkdir(parents=True)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "mio_jax.convert", str(ckpt), str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2
    assert "not a GGUF file, an HF folder" in r.stderr and str(ckpt) in r.stderr


def test_empty_checkpoints_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert convert.main([str(tmp_path / "run"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "checkpoints: no checkpoint (steps found: [])" in err, err


def test_qwen2_gguf_loads_and_exports(tmp_path):
    hf = tiny_hf_tensors(seed=4, vocab=VOCAB, bias=True)
    src = write_tiny_gguf(tmp_path / "qwen2.gguf", hf, arch="qwen2", tokenizer=_tokenizer_kv, vocab=VOCAB)
    dst = str(tmp_path / "qwen2_hf")
    assert convert.main([src, dst, "--exporter=stream"]) == 0
    assert json.load(open(os.path.join(dst, "config.json")))["architectures"] == ["Qwen2ForCausalLM"]
    ids = jnp.asarray([[7, 1, 99]], jnp.int32)
    from_gguf = load_pretrained(src)
    assert from_gguf.cfg.qkv_bias and from_gguf.cfg.tie_word_embeddings
    np.testing.assert_array_equal(np.asarray(load_pretrained(dst)(ids)), np.asarray(from_gguf(ids)))


def test_read_model_config_reads_no_weights(tiny, tmp_path):
    """The structure of a model comes from its config alone: an HF folder whose weights
    are unreadable still yields the same ModelConfig (convert of a training checkpoint
    relies on this)."""
    import dataclasses
    import shutil

    from mio_jax import models

    src = str(tiny[0])
    folder = str(tmp_path / "hf")
    assert convert.main([src, folder]) == 0
    want = models.load_pretrained(folder).cfg
    assert models.read_model_config(folder) == want
    assert models.read_model_config(src) == models.load_pretrained(src).cfg
    broken = str(tmp_path / "broken")
    shutil.copytree(folder, broken)
    for f in os.listdir(broken):
        if f.endswith(".safetensors"):
            with open(os.path.join(broken, f), "wb") as fh:
                fh.write(b"not safetensors")
    assert models.read_model_config(broken, dtype="bfloat16") == \
        dataclasses.replace(want, dtype="bfloat16")
    with pytest.raises(ValueError, match="--exporter=stream reads GGUF files only"):
        convert.convert(folder, str(tmp_path / "x"), use_exporter=False)
