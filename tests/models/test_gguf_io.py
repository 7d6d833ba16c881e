"""read_gguf on small GGUF files written here with gguf.GGUFWriter, as llama.cpp would."""


import gguf
import numpy as np
import pytest

from mio_jax.models import gguf_io

Q = gguf.GGMLQuantizationType
TINY = dict(layers=2, hidden=64, ffn=256, heads=4, kv_heads=2, vocab=96)
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, the reference this reader must invert."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf_tensors(seed=0, tied=True, bias=False, **dims):
    """Random HF-named, HF-layout float32 tensors of a tiny Llama."""
    d = dict(TINY, **dims)
    rng = np.random.default_rng(seed)
    hd = d["hidden"] // d["heads"]
    shapes = {"model.embed_tokens.weight": (d["vocab"], d["hidden"]), "model.norm.weight": (d["hidden"],)}
    if not tied:
        shapes["lm_head.weight"] = (d["vocab"], d["hidden"])
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d["hidden"],),
            p + "post_attention_layernorm.weight": (d["hidden"],),
            p + "self_attn.q_proj.weight": (d["heads"] * hd, d["hidden"]),
            p + "self_attn.k_proj.weight": (d["kv_heads"] * hd, d["hidden"]),
            p + "self_attn.v_proj.weight": (d["kv_heads"] * hd, d["hidden"]),
            p + "self_attn.o_proj.weight": (d["hidden"], d["heads"] * hd),
            p + "mlp.gate_proj.weight": (d["ffn"], d["hidden"]),
            p + "mlp.up_proj.weight": (d["ffn"], d["hidden"]),
            p + "mlp.down_proj.weight": (d["hidden"], d["ffn"]),
        })
        if bias:
            shapes[p + "self_attn.q_proj.bias"] = (d["heads"] * hd,)
            shapes[p + "self_attn.k_proj.bias"] = (d["kv_heads"] * hd,)
            shapes[p + "self_attn.v_proj.bias"] = (d["kv_heads"] * hd,)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf.startswith("model.norm."):
        return "output_norm." + hf.rsplit(".", 1)[1]
    if hf.startswith("lm_head."):
        return "output." + hf.rsplit(".", 1)[1]
    _, _, i, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    short = {v: k for k, v in _BLOCK.items()}[module]
    return f"blk.{i}.{short}.{kind}"


def write_tiny_gguf(path, tensors, qtype=Q.F32, arch="llama", skip=(), tokenizer=None, vocab_kv=True, **dims):
    """Writes `tensors` (HF names) as llama.cpp would: GGUF names, q/k permuted for
    llama, 2-D weights in `qtype`, 1-D tensors in F32."""
    d = dict(TINY, **dims)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(d["layers"])
    w.add_context_length(128)
    w.add_embedding_length(d["hidden"])
    w.add_feed_forward_length(d["ffn"])
    w.add_head_count(d["heads"])
    w.add_head_count_kv(d["kv_heads"])
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if vocab_kv:
        w.add_vocab_size(d["vocab"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if tokenizer:
        tokenizer(w)
    for hf, array in tensors.items():
        name = gguf_name(hf)
        if name in skip:
            continue
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            array = llama_cpp_permute(array, d["heads"] if ".attn_q." in name else d["kv_heads"])
        if array.ndim == 2 and qtype not in (Q.F32, Q.F16):
            raw = gguf.quants.quantize(array, qtype)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        elif array.ndim == 2 and qtype == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# Max |error| / max |w| allowed per type: a misplaced row gives errors of order 2.
_TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1e-2, Q.Q5_0: 0.07, Q.Q5_1: 0.05, Q.Q4_0: 0.14, Q.Q4_1: 0.1}


@pytest.mark.parametrize("qtype", list(_TOL), ids=lambda q: q.name)
def test_read_gguf_inverts_llama_cpp_layout(tmp_path, qtype):
    hf = tiny_hf_tensors()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf, qtype)
    config, tensors = gguf_io.read_gguf(path)
    got = dict(tensors)
    assert sorted(got) == sorted(hf)
    for name, want in hf.items():
        assert got[name].dtype == np.float32 and got[name].shape == want.shape, name
        err = np.abs(got[name] - want).max() / np.abs(want).max()
        assert err <= _TOL[qtype if want.ndim == 2 else Q.F32], (name, err)
    assert config["tie_word_embeddings"] is True


def test_read_gguf_config_and_untied_head(tmp_path):
    hf = tiny_hf_tensors(tied=False)
    config, tensors = gguf_io.read_gguf(write_tiny_gguf(tmp_path / "t.gguf", hf))
    assert config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0, "rope_scaling": None, "max_position_embeddings": 128,
        "vocab_size": 96, "tie_word_embeddings": False, "initializer_range": 0.02,
        "use_cache": True, "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False,
        "pretraining_tp": 1, "bos_token_id": 1, "eos_token_id": 2,
    }
    got = dict(tensors)
    np.testing.assert_array_equal(got["lm_head.weight"], hf["lm_head.weight"])


def test_read_gguf_is_lazy(tmp_path):
    hf = tiny_hf_tensors()
    _, tensors = gguf_io.read_gguf(write_tiny_gguf(tmp_path / "t.gguf", hf))
    assert not isinstance(tensors, (list, tuple, dict))
    name, first = next(tensors)
    np.testing.assert_array_equal(first, hf[name])
    assert len(list(tensors)) == len(hf) - 1


def test_read_gguf_qwen2_keeps_row_order_and_biases(tmp_path):
    hf = tiny_hf_tensors(bias=True)
    config, tensors = gguf_io.read_gguf(write_tiny_gguf(tmp_path / "q.gguf", hf, arch="qwen2"))
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    got = dict(tensors)
    assert sorted(got) == sorted(hf)
    for name, want in hf.items():
        np.testing.assert_array_equal(got[name], want)


def test_llama_bias_rows_are_unpermuted_too(tmp_path):
    hf = tiny_hf_tensors(bias=True)
    with pytest.raises(ValueError, match=r"no_o\.gguf: missing tensor\(s\) \['blk\.0\.attn_output\.bias', 'blk\.1\.attn_output\.bias'\]"):
        gguf_io.read_gguf(write_tiny_gguf(tmp_path / "no_o.gguf", hf))
    for i in range(TINY["layers"]):
        hf[f"model.layers.{i}.self_attn.o_proj.bias"] = np.full(TINY["hidden"], 0.5 * i, np.float32)
    config, tensors = gguf_io.read_gguf(write_tiny_gguf(tmp_path / "b.gguf", hf))
    assert config["attention_bias"] is True
    got = dict(tensors)
    for name, want in hf.items():
        np.testing.assert_array_equal(got[name], want)


def test_k_quant_tensor_is_reshaped_from_gguf_dequantize(tmp_path):
    hf = tiny_hf_tensors()
    path = write_tiny_gguf(tmp_path / "k.gguf", hf, skip=("blk.0.ffn_down.weight",))
    # Re-write with ffn_down as Q6_K bytes (gguf has no Q6_K quantiser; any bytes decode).
    block, size = gguf.GGML_QUANT_SIZES[Q.Q6_K]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(64, 256 // block * size), dtype=np.uint8)
    raw[:, -2:] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # sane block scale d
    w = gguf.GGUFWriter(str(tmp_path / "k2.gguf"), "llama")
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith(("llama.", "tokenizer.")):
            w.add_key_value(key, field.contents(), field.types[0])
    for t in reader.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.add_tensor("blk.0.ffn_down.weight", raw, raw_shape=raw.shape, raw_dtype=Q.Q6_K)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    got = dict(gguf_io.read_gguf(tmp_path / "k2.gguf")[1])
    want = gguf.quants.dequantize(raw, Q.Q6_K)
    assert want.shape == (64, 256)
    np.testing.assert_array_equal(got["model.layers.0.mlp.down_proj.weight"], want)
    np.testing.assert_array_equal(got["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.q_proj.weight"])


def test_permute_rows_is_inverted():
    w = np.arange(32 * 3, dtype=np.float32).reshape(32, 3)
    np.testing.assert_array_equal(gguf_io.permute_rows(w, 4), llama_cpp_permute(w, 4))
    np.testing.assert_array_equal(gguf_io.unpermute_rows(gguf_io.permute_rows(w, 4), 4), w)
    assert not np.array_equal(gguf_io.permute_rows(w, 4), w)


def test_hf_names():
    assert gguf_io.hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert gguf_io.hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(KeyError):
        gguf_io.hf_name("blk.0.attn_qkv.weight")


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        gguf_io.read_gguf("/nonexistent/nope.gguf")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("{'not': 'gguf'}")
    with pytest.raises(ValueError, match=r"model\.gguf is not a GGUF file"):
        gguf_io.read_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(tmp_path, keep):
    path = write_tiny_gguf(tmp_path / "t.gguf", tiny_hf_tensors())
    data = open(path, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)] if keep > 0.9 else data[:200])
    with pytest.raises(ValueError, match=r"cut\.gguf.*truncated"):
        gguf_io.read_gguf(cut)


def test_missing_tensor_is_named(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", tiny_hf_tensors(), skip=("blk.1.ffn_up.weight",))
    with pytest.raises(ValueError, match=r"m\.gguf: missing tensor\(s\) \['blk\.1\.ffn_up\.weight'\] \(1 in all\)"):
        gguf_io.read_gguf(path)


def test_unsupported_tensor_type_is_named(tmp_path):
    hf = tiny_hf_tensors()
    hf["model.layers.0.input_layernorm.weight"] = np.arange(64, dtype=np.int32)
    path = write_tiny_gguf(tmp_path / "u.gguf", hf)
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_norm\.weight' has unsupported type I32"):
        gguf_io.read_gguf(path)


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "g.gguf", tiny_hf_tensors(), arch="gpt2")
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2' in .*g\.gguf"):
        gguf_io.read_gguf(path)


def test_vocab_size_from_embedding_when_metadata_lacks_it(tmp_path):
    path = write_tiny_gguf(tmp_path / "v.gguf", tiny_hf_tensors(vocab=80), vocab=80, vocab_kv=False)
    assert gguf_io.read_gguf(path)[0]["vocab_size"] == 80


def test_shape_disagreeing_with_metadata_is_named(tmp_path):
    hf = tiny_hf_tensors()
    hf["model.layers.1.mlp.down_proj.weight"] = hf["model.layers.1.mlp.down_proj.weight"][:, :128]
    path = write_tiny_gguf(tmp_path / "s.gguf", hf)
    with pytest.raises(ValueError, match=r"s\.gguf: tensor 'blk\.1\.ffn_down\.weight' has shape \(64, 128\), but the file's metadata implies \(64, 256\)"):
        gguf_io.read_gguf(path)


def test_header_parser_agrees_with_gguf_reader(tmp_path):
    def kv(w):
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["<s>", "a", "é 中"])
        w.add_token_types([3, 1, 1])
        w.add_token_scores([0.5, -1.0, 2.25])
        w.add_add_bos_token(True)
        w.add_key_value("test.int64", -(2**40), gguf.GGUFValueType.INT64)
        w.add_key_value("test.f64", 0.1, gguf.GGUFValueType.FLOAT64)
        w.add_key_value("test.u16s", [1, 2, 65535], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT16)

    path = write_tiny_gguf(tmp_path / "h.gguf", tiny_hf_tensors(), Q.Q4_1, tokenizer=kv)
    ours = gguf_io.open_gguf(path)
    ref = gguf.GGUFReader(path)
    want = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == want
    assert ours.metadata["test.int64"] == -(2**40) and ours.metadata["tokenizer.ggml.tokens"][2] == "é 中"
    assert [(t.name, t.ggml_type, t.shape, t.offset, t.n_bytes) for t in ours.tensors] == [
        (t.name, t.tensor_type, tuple(reversed(t.shape.tolist())), t.data_offset, t.n_bytes) for t in ref.tensors]


def test_unsupported_version(tmp_path):
    data = bytearray(open(write_tiny_gguf(tmp_path / "t.gguf", tiny_hf_tensors()), "rb").read())
    data[4:8] = (7).to_bytes(4, "little")
    (tmp_path / "v7.gguf").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"v7\.gguf: unsupported GGUF version 7"):
        gguf_io.read_gguf(tmp_path / "v7.gguf")


def test_partial_rotary_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "r.gguf", tiny_hf_tensors(), tokenizer=lambda w: w.add_rope_dimension_count(8))
    with pytest.raises(ValueError, match=r"r\.gguf: partial rotary .*dimension_count=8, head_dim=16"):
        gguf_io.read_gguf(path)
