"""Safetensors folder export/import round trips and clear errors on bad checkpoints."""

import json
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from mio_jax.models import load_pretrained, save_pretrained
from mio_jax.models.safetensors_file import SafetensorsFile
from tiny_checkpoints import GOLDEN, tiny_tokenizer, write_case

IDS = jnp.asarray(GOLDEN["input_ids"], jnp.int32)
MASK = jnp.asarray(GOLDEN["attention_mask"], jnp.int32)


def logits(model):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(IDS, attention_mask=MASK))(state))


def test_round_trip_sharded_tied_with_tokenizer(tmp_path):
    src = write_case("smollm", str(tmp_path / "src"))
    model = load_pretrained(src)
    out = str(tmp_path / "out")
    save_pretrained(model, tiny_tokenizer(), out, max_shard_size="20KB")
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    names = set(index["weight_map"])
    assert names == set(GOLDEN["cases"]["smollm"]["tensors"])  # tied: no lm_head.weight
    assert "lm_head.weight" not in names
    assert index["metadata"]["total_size"] == sum(
        os.path.getsize(os.path.join(out, s)) for s in shards) - sum(
        8 + struct.unpack("<Q", open(os.path.join(out, s), "rb").read(8))[0] for s in shards)
    # every tensor equals the source bit for bit, read back by the reference library
    source = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
    for shard in shards:
        for name, arr in safetensors.numpy.load_file(os.path.join(out, shard)).items():
            np.testing.assert_array_equal(arr, source[name], err_msg=name)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["tie_word_embeddings"] is True and cfg["architectures"] == ["LlamaForCausalLM"]
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 2
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        tok_cfg = json.load(f)
    chat = tok_cfg.get("chat_template") or open(os.path.join(out, "chat_template.jinja")).read()
    assert "<|im_start|>" in chat
    again = load_pretrained(out)
    assert again.cfg == model.cfg
    np.testing.assert_array_equal(logits(again), logits(model))


def test_round_trip_untied_bias_bfloat16(tmp_path):
    model = load_pretrained(write_case("qwen2", str(tmp_path / "src")), dtype="bfloat16")
    out = str(tmp_path / "out")
    save_pretrained(model, None, out)
    assert os.listdir(out).count("model.safetensors") == 1
    st = SafetensorsFile(os.path.join(out, "model.safetensors"))
    assert st.entries["lm_head.weight"]["dtype"] == "BF16"
    assert "model.layers.1.self_attn.k_proj.bias" in st.keys()
    assert "model.layers.0.self_attn.o_proj.bias" not in st.keys()
    again = load_pretrained(out, dtype="bfloat16")
    np.testing.assert_array_equal(logits(again), logits(model))
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [5, 2]}, f)  # end-of-turn ids listed only here
    assert load_pretrained(out).cfg.eos_token_id == (2, 5)


# ---- bad input ---------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path):
    return write_case("llama2", str(tmp_path / "ckpt"))


def _rewrite(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    edit(tensors)
    safetensors.numpy.save_file(tensors, path)
    return path


def test_missing_config(folder):
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_pretrained(folder)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(str(tmp_path / "nowhere"))


def test_corrupt_safetensors_header(folder):
    path = os.path.join(folder, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe not json")
    with pytest.raises(ValueError, match=r"model\.safetensors.*corrupt safetensors header"):
        load_pretrained(folder)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 10**12))
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        load_pretrained(folder)


def test_missing_tensor(folder):
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.down_proj"):
        load_pretrained(folder)


def test_unexpected_tensor(folder):
    _rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight":
                                         np.ones(8, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*q_norm"):
        load_pretrained(folder)


def test_shape_mismatch(folder):
    _rewrite(folder, lambda t: t.update({"model.layers.0.mlp.up_proj.weight":
                                         np.ones((63, 32), np.float32)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor "
                                         r"'model\.layers\.0\.mlp\.up_proj\.weight' has shape "
                                         r"\(63, 32\).*\(64, 32\)"):
        load_pretrained(folder)


def test_unsupported_dtype(folder):
    _rewrite(folder, lambda t: t.update({"model.norm.weight": np.ones(32, np.int32)}))
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*unsupported dtype I32"):
        load_pretrained(folder)


def test_unsupported_architecture(folder):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_pretrained(folder)


def test_pickle_checkpoints_are_refused(folder, tmp_path):
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*pickle"):
        load_pretrained(str(tmp_path / "pytorch_model.bin"))
    only_bin = str(tmp_path / "bin_only")
    os.makedirs(only_bin)
    shutil.copy(os.path.join(folder, "config.json"), only_bin)
    open(os.path.join(only_bin, "pytorch_model.bin"), "wb").write(b"\x80\x04 not loaded")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*never loaded"):
        load_pretrained(only_bin)


def test_index_naming_missing_shard(folder):
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}, f)
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        load_pretrained(folder)
