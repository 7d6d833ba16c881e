"""The weight table (mio_jax.models.weights) against transformers' checkpoints, and the
loaders and writer it drives: HF save -> load for every family, errors naming tensor and
file, GGUF tensors decoded once each and one at a time, the shard-size parser."""

import dataclasses
import gc
import json
import os
import sys
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import PartitionSpec as P

from mio_jax.models import (ModelConfig, init_model, load_pretrained, resolve_model_path,
                            save_pretrained, smollm2_gguf_path)
from mio_jax.models import gguf_io, hf_io, weights
from tiny_checkpoints import CASES, GOLDEN, language_model_tensors, tensor_value, write_case

sys.path.insert(0, os.path.dirname(__file__))
from test_gguf_io import tiny_hf_tensors, write_tiny_gguf  # noqa: E402

# Every optional row switched on (no family has all of them; the table must not care).
ALL_FLAGS = ModelConfig(model_type="llama", vocab_size=40, hidden_size=16, intermediate_size=24,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=6, qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=True)


def _cfg(case):
    return ModelConfig.from_hf(GOLDEN["cases"][case]["config"])


def _params(model):
    return {tuple(k): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ---- the table itself ---------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_table_gives_the_names_and_shapes_transformers_saved(case):
    want = {n: tuple(s) for n, s in language_model_tensors(case).items()}
    assert weights.hf_shapes(_cfg(case)) == want


@pytest.mark.parametrize("case", CASES + ["all_flags"])
def test_decoder_parameters_are_the_table_rows(case):
    cfg = ALL_FLAGS if case == "all_flags" else _cfg(case)
    abstract = nnx.eval_shape(lambda: init_model(cfg))
    params = _params(abstract)
    specs = weights.weight_specs(cfg)
    assert set(params) == {s.path for s in specs}
    for s in specs:
        var = params[s.path]
        assert var.get_value().shape == s.shape(cfg), s.path
        assert tuple(var.get_metadata()["out_sharding"]) == s.logical_axes, s.path
    if case == "all_flags":
        assert len(specs) == len(weights.LLAMA_FAMILY)


def test_optional_rows_follow_the_config_flags():
    paths = lambda cfg: {s.path[-1] for s in weights.weight_specs(cfg)}  # noqa: E731
    base = dataclasses.replace(ALL_FLAGS, qkv_bias=False, o_bias=False, mlp_bias=False,
                               qk_norm=False)
    core = {"embed", "attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down",
            "final_norm", "lm_head"}
    assert paths(base) == core
    assert paths(dataclasses.replace(base, tie_word_embeddings=True)) == core - {"lm_head"}
    assert paths(dataclasses.replace(base, qk_norm=True)) == core | {"q_norm", "k_norm"}
    assert paths(dataclasses.replace(base, qkv_bias=True)) == core | {"q_bias", "k_bias", "v_bias"}
    assert paths(ALL_FLAGS) == {s.path[-1] for s in weights.LLAMA_FAMILY}
    hf = dict(GOLDEN["cases"]["llama3"]["config"], attention_bias=True, mlp_bias=True)
    assert paths(ModelConfig.from_hf(hf)) == core | {
        "q_bias", "k_bias", "v_bias", "o_bias", "gate_bias", "up_bias", "down_bias"}


def test_every_row_converts_both_ways():
    cfg = ALL_FLAGS
    rng = np.random.default_rng(0)
    seen = set()
    for s in weights.LLAMA_FAMILY:
        per_layer = s.shape(cfg)[1:] if s.stacked else s.shape(cfg)
        ours = rng.standard_normal(per_layer).astype(np.float32)
        hf = s.to_hf(ours)
        assert hf.shape == s.hf_shape(cfg), s.path
        np.testing.assert_array_equal(s.from_hf(hf, cfg), ours, err_msg=str(s.path))
        for name, gguf_name in zip(s.hf_names(cfg), s.gguf_names(cfg)):
            assert gguf_io.hf_name(gguf_name) == name
            assert weights.gguf_lookup(gguf_name)[0] is s
            seen.add(name)
    assert len(seen) == sum(len(s.hf_names(cfg)) for s in weights.LLAMA_FAMILY)  # unique
    # The linear layouts are HF's transposes: q [D, H, hd] <-> [H*hd, D], o [H, hd, D] <-> [D, H*hd].
    q = rng.standard_normal((16, 4, 6)).astype(np.float32)
    o = rng.standard_normal((4, 6, 16)).astype(np.float32)
    spec = {s.path[-1]: s for s in weights.LLAMA_FAMILY}
    np.testing.assert_array_equal(spec["q"].to_hf(q), q.reshape(16, 24).T)
    np.testing.assert_array_equal(spec["o"].to_hf(o), o.reshape(24, 16).T)


# ---- HF save -> load ----------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_every_row_round_trips_through_save_and_load(case, tmp_path):
    src = write_case(case, str(tmp_path / "src"))
    model = load_pretrained(src)
    out = str(tmp_path / "out")
    files = save_pretrained(model, None, out, max_shard_size=30_000)  # int bytes: several shards
    assert len(files) > 1
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(set(weight_map.values())) == sorted(files)
    saved = {}
    for name in files:
        saved.update(safetensors.numpy.load_file(os.path.join(out, name)))
    want = language_model_tensors(case)
    assert sorted(saved) == sorted(want)
    drawn = GOLDEN["cases"][case]["tensors"]  # (a multimodal case's under their prefix)
    for name, shape in want.items():
        source = name if name in drawn else "language_model." + name
        value = tensor_value(source, tuple(shape), **GOLDEN["cases"][case].get("weights", {}))
        np.testing.assert_array_equal(saved[name], value, err_msg=name)
    again = load_pretrained(out)
    assert again.cfg == model.cfg
    a, b = _params(model), _params(again)
    for path in a:
        np.testing.assert_array_equal(np.asarray(b[path].get_value()),
                                      np.asarray(a[path].get_value()), err_msg=str(path))


def test_bias_rows_round_trip_and_dtype_is_recorded(tmp_path):
    # Llama with attention_bias and mlp_bias: every bias row (q/k norms: the qwen3 case).
    cfg = dataclasses.replace(ALL_FLAGS, qk_norm=False, bos_token_id=1, eos_token_id=(2,))
    model = init_model(cfg, seed=4)
    out = str(tmp_path / "bf16")
    assert save_pretrained(model, None, out, dtype="bfloat16") == ["model.safetensors"]
    saved = safetensors.numpy.load_file(os.path.join(out, "model.safetensors"))
    assert sorted(saved) == sorted(weights.hf_shapes(cfg))
    assert all(a.dtype == ml_dtypes.bfloat16 for a in saved.values())
    with open(os.path.join(out, "config.json")) as f:
        hf = json.load(f)
    assert hf["torch_dtype"] == hf["dtype"] == "bfloat16"
    again = load_pretrained(out)  # float32 parameters: the bfloat16 values, widened
    a, b = _params(model), _params(again)
    for path in a:
        want = np.asarray(a[path].get_value()).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(b[path].get_value()), want, err_msg=str(path))


def test_wrong_shape_in_a_shard_names_that_file(tmp_path):
    out = str(tmp_path / "out")
    save_pretrained(load_pretrained(write_case("qwen3", str(tmp_path / "src"))), None, out,
                    max_shard_size="30KB")
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        shard = json.load(f)["weight_map"]["model.layers.1.self_attn.k_norm.weight"]
    path = os.path.join(out, shard)
    tensors = safetensors.numpy.load_file(path)
    tensors["model.layers.1.self_attn.k_norm.weight"] = np.ones(5, np.float32)
    safetensors.numpy.save_file(tensors, path)
    with pytest.raises(ValueError, match=rf"{shard}: tensor 'model\.layers\.1\.self_attn\.k_norm"
                                         r"\.weight' has shape \(5,\), but config\.json implies \(16,\)"):
        load_pretrained(out)


def test_writer_refuses_duplicates_and_clears_stale_shards(tmp_path):
    out = str(tmp_path / "out")
    t = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="tensor 'a' given twice"):
        hf_io.write_hf_folder({}, [("a", t), ("a", t)], None, out)
    assert hf_io.write_hf_folder({}, [("a", t), ("b", t)], None, out, max_shard_size=64) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert hf_io.write_hf_folder({}, [("a", t)], None, out) == ["model.safetensors"]
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]


@pytest.mark.parametrize("text,want", [
    ("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("20KB", 20_000), ("20kb", 20_000),
    ("1.5 GB", 15 * 10**8), ("500MiB", 500 * 2**20), ("2GiB", 2 * 2**30), ("1000000", 10**6),
    ("64B", 64), (1234, 1234), (np.int64(7), 7)])
def test_parse_size(text, want):
    assert hf_io.parse_size(text) == want


@pytest.mark.parametrize("bad", ["2 parsecs", "GB", "", "-1MB", 0, -5])
def test_parse_size_errors(bad):
    with pytest.raises(ValueError, match="cannot read size|must be positive"):
        hf_io.parse_size(bad)


# ---- GGUF: each tensor decoded once, one at a time -----------------------------------------
@pytest.fixture
def decode_log(monkeypatch):
    """Wraps gguf_io.dequantize_tensor: per call, the name and how many arrays of earlier
    calls are still alive."""
    log, alive = [], []
    real = gguf_io.dequantize_tensor

    def logged(file, tensor):
        gc.collect()
        log.append((tensor.name, sum(r() is not None for r in alive)))
        array = real(file, tensor)
        alive.append(weakref.ref(array))
        return array

    monkeypatch.setattr(gguf_io, "dequantize_tensor", logged)
    return log


@pytest.mark.parametrize("sharded", [False, True])
def test_gguf_load_decodes_each_tensor_once_and_one_at_a_time(tmp_path, decode_log, sharded):
    hf = tiny_hf_tensors(seed=5, tied=False, bias=True)
    path = write_tiny_gguf(tmp_path / "q.gguf", hf, arch="qwen2")
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3) if sharded else None
    model = load_pretrained(path, mesh=mesh)
    names = [n for n, _ in decode_log]
    assert sorted(names) == sorted(t.name for t in gguf_io.open_gguf(path).tensors)
    assert len(names) == len(set(names)) == len(hf)  # once each, even with 8 devices
    # When a tensor is decoded, at most the one before it is still referenced (by the
    # transfer JAX releases at its next call); a loader that collected them all would
    # show len(hf) - 1 here.
    assert max(n for _, n in decode_log) <= 1, decode_log
    if sharded:
        assert model.layers.q[...].sharding.spec == P(None, "fsdp", "tensor", None)
        assert model.layers.q_bias[...].sharding.spec == P(None, "tensor", None)
        assert model.lm_head[...].sharding.spec == P("tensor", "fsdp")
    spec = {s.path: s for s in weights.weight_specs(model.cfg)}
    for p, var in _params(model).items():
        s = spec[p]
        got = np.asarray(var.get_value())
        for i, name in enumerate(s.hf_names(model.cfg)):
            np.testing.assert_array_equal(s.to_hf(got[i] if s.stacked else got), hf[name],
                                          err_msg=name)


def test_gguf_tensors_decode_lazily(tmp_path, decode_log):
    hf = tiny_hf_tensors(seed=6)
    tensors = gguf_io.GGUFTensors(write_tiny_gguf(tmp_path / "t.gguf", hf))
    assert decode_log == []  # building it checks the header only
    assert sorted(tensors.keys()) == sorted(hf)
    items = tensors.items()
    name, first = next(items)
    assert len(decode_log) == 1
    np.testing.assert_array_equal(first, hf[name])
    np.testing.assert_array_equal(tensors.get("model.layers.1.self_attn.k_proj.weight"),
                                  hf["model.layers.1.self_attn.k_proj.weight"])  # unpermuted
    assert len(decode_log) == 2


def test_gguf_tensor_outside_the_table_for_this_config_is_named(tmp_path):
    hf = tiny_hf_tensors()
    hf["model.layers.0.mlp.gate_proj.bias"] = np.zeros(256, np.float32)  # no mlp_bias in GGUF llama
    path = write_tiny_gguf(tmp_path / "x.gguf", hf)
    with pytest.raises(ValueError, match=r"x\.gguf: unexpected tensor\(s\) \['blk\.0\.ffn_gate"
                                         r"\.bias'\] \(1 in all\) for model_type 'llama'"):
        gguf_io.read_gguf(path)


# ---- model paths ---------------------------------------------------------------------------
def test_resolve_model_path(tmp_path):
    assert resolve_model_path("smollm2") == smollm2_gguf_path()
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"model\.path='.*nowhere' does not exist"):
        resolve_model_path(missing)


def test_convert_does_not_import_the_trainer():
    """Not even lazily, inside a function: convert needs no training code."""
    import ast

    from mio_jax import convert

    with open(convert.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    assert "mio_jax.models.resolve_model_path" in imported
    assert not {n for n in imported if n == "mio_jax.train" or n.startswith("mio_jax.train.")}
