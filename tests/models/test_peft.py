"""PEFT LoRA adapter folders in and out, and parity with peft's own LoRA (golden JSON).

Golden values come from scripts/golden_peft.py: peft 0.21 wraps the tiny checkpoints of
golden_logits.json (and SmolLM2-135M) with LoRA adapters whose tensors are drawn from
their saved names (`tensor_value`), and records logits with the adapter on, disabled and
merged. Here the same adapter folders are rebuilt without torch and read with
`peft_io.read_adapter`.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from mio_jax.models import load_pretrained, peft_io
from mio_jax.models import lora as lora_lib
from tiny_checkpoints import GOLDEN as GOLDEN_BASE
from tiny_checkpoints import tensor_value, write_case

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), "golden_peft.json")))
CASES = sorted(GOLDEN["cases"])
IDS = jnp.asarray(GOLDEN["input_ids"], jnp.int32)
MASK = jnp.asarray(GOLDEN["attention_mask"], jnp.int32)
POS = GOLDEN["logit_positions"]
ATOL = 1e-4


def adapter_values(case: dict) -> dict[str, np.ndarray]:
    """The adapter tensors the golden script gave peft, rebuilt from their names."""
    return {n: case["factor"] * tensor_value(n, tuple(s), seed=GOLDEN["lora_seed"])
            for n, s in case["adapter_tensors"].items()}


def write_peft_folder(case: dict, folder: str, tensors=None, config=None) -> str:
    """A PEFT adapter folder as peft wrote it (its own adapter_config.json)."""
    os.makedirs(folder, exist_ok=True)
    safetensors.numpy.save_file(adapter_values(case) if tensors is None else tensors,
                                os.path.join(folder, peft_io.WEIGHTS_NAME),
                                metadata={"format": "pt"})
    with open(os.path.join(folder, peft_io.CONFIG_NAME), "w") as f:
        json.dump(case["adapter_config"] if config is None else config, f)
    return folder


@jax.jit
def _apply(graphdef, state, on):
    model = nnx.merge(graphdef, state)
    if on is not None:
        model.set_adapters(on)
    return model(IDS, attention_mask=MASK)[:, POS, :]


_apply = jax.jit(_apply.__wrapped__, static_argnums=(0, 2))


def logits(model, on=None):
    """Logits at the golden positions; `on` switches the adapters (None: leave as is)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_apply(graphdef, state, on))


def set_adapter_values(model, adapters):
    for name, value in adapters["layers"].items():
        getattr(model.layers, name).set_value(jnp.asarray(value))


def base_params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def set_params(model, pure: dict) -> None:
    """Writes a pure params dict (e.g. merged weights) into an adapter-free model."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """case -> (base folder, adapter folder, spec, adapters, LoRA model)."""
    root = tmp_path_factory.mktemp("peft")
    out = {}
    for name in CASES:
        case = GOLDEN["cases"][name]
        base = write_case(name, str(root / name / "base"))
        folder = write_peft_folder(case, str(root / name / "adapter"))
        cfg = load_pretrained(base).cfg
        spec, adapters = peft_io.read_adapter(folder, cfg)
        model = load_pretrained(base, lora=spec)
        set_adapter_values(model, adapters)
        out[name] = (base, folder, spec, adapters, model)
    return out


def test_golden_bases_are_the_model_goldens():
    assert GOLDEN["input_ids"] == GOLDEN_BASE["input_ids"]
    assert GOLDEN["attention_mask"] == GOLDEN_BASE["attention_mask"]
    for name in CASES:
        assert GOLDEN["cases"][name]["config"] == GOLDEN_BASE["cases"][name]["config"]
        assert GOLDEN["cases"][name]["tensors"] == GOLDEN_BASE["cases"][name]["tensors"]
        # the adapter visibly moves peft's logits, and disabling it gives the base model
        on = np.asarray(GOLDEN["cases"][name]["logits"])
        off = np.asarray(GOLDEN["cases"][name]["logits_disabled"])
        assert np.abs(on - off).max() > 1.0
        np.testing.assert_allclose(off, GOLDEN_BASE["cases"][name]["logits"], atol=ATOL, rtol=0)


def test_specs_read_from_peft_configs(loaded):
    specs = {name: loaded[name][2] for name in CASES}
    every = tuple((row, (0, 1)) for row in ("q", "k", "v", "o", "gate", "up", "down"))
    assert specs["llama3"] == lora_lib.LoraSpec(rank=4, alpha=8.0, targets=every, num_layers=2)
    assert specs["llama2"].use_rslora and specs["llama2"].scale == 4.0
    assert specs["llama3"].scale == 2.0
    assert specs["mistral"].targets == (("q", (0, 1)), ("v", (0, 1)))
    assert specs["qwen2"].targets == tuple((row, (1,)) for row, _ in every)
    assert specs["qwen2"].partial("q") and not specs["llama3"].partial("q")
    assert specs["smollm"].targets == (("v", (0,)), ("o", (0,)), ("gate", (1,)), ("up", (1,)),
                                       ("down", (1,)))  # a regex: rows differ in layers


@pytest.mark.parametrize("case", CASES)
def test_adapter_logits_match_peft(loaded, case):
    model = loaded[case][4]
    np.testing.assert_allclose(logits(model), GOLDEN["cases"][case]["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_disabled_adapter_is_the_base_model(loaded, case):
    base, _, _, _, model = loaded[case]
    off = logits(model, on=False)
    np.testing.assert_allclose(off, GOLDEN["cases"][case]["logits_disabled"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(off, logits(load_pretrained(base)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_merged_params_match_peft_merge_and_unload(loaded, case):
    base, _, spec, adapters, model = loaded[case]
    plain = load_pretrained(base)
    merged = peft_io.merge_adapters(base_params(plain), spec, adapters)
    set_params(plain, merged)
    np.testing.assert_allclose(logits(plain), GOLDEN["cases"][case]["logits_merged"],
                               atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits(plain), logits(model), atol=1e-5, rtol=0)
    # uncovered layers and rows are left bit for bit
    before = base_params(load_pretrained(base))["layers"]
    for row in ("q", "k", "v", "o", "gate", "up", "down"):
        covered = spec.layers(row) if row in spec.rows else ()
        for i in range(spec.num_layers):
            same = np.array_equal(np.asarray(merged["layers"][row][i]), before[row][i])
            assert same == (i not in covered), (row, i)


def test_merge_keeps_the_weight_dtype_and_drops_adapter_entries(loaded):
    base, _, spec, adapters, model = loaded["llama3"]
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), base_params(model))
    assert "q_lora_a" in params["layers"]  # nnx.LoRAParam is an nnx.Param
    merged = peft_io.merge_adapters(params, spec, adapters)
    assert merged["layers"]["q"].dtype == jnp.bfloat16
    assert not any(k.endswith(("_lora_a", "_lora_b")) for k in merged["layers"])
    w = np.asarray(params["layers"]["q"][0], np.float32)
    upd = spec.scale * np.tensordot(adapters["layers"]["q_lora_a"][0],
                                    adapters["layers"]["q_lora_b"][0], axes=1)
    want = np.asarray(jnp.asarray(w + upd).astype(jnp.bfloat16), np.float32)
    np.testing.assert_array_equal(np.asarray(merged["layers"]["q"][0], np.float32), want)


@pytest.mark.parametrize("case", CASES)
def test_write_read_round_trip(loaded, case, tmp_path):
    _, folder, spec, adapters, model = loaded[case]
    cfg = dataclasses.replace(model.cfg, lora=None)
    ours = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))  # the model's own adapters
    out = str(tmp_path / "export")
    peft_io.write_adapter(out, cfg, spec, ours, base_model_name_or_path="tiny/" + case)
    assert sorted(os.listdir(out)) == [peft_io.CONFIG_NAME, peft_io.WEIGHTS_NAME]
    # the tensors are peft's, bit for bit, under the names peft saved
    written = safetensors.numpy.load_file(os.path.join(out, peft_io.WEIGHTS_NAME))
    want = adapter_values(GOLDEN["cases"][case])
    assert sorted(written) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    # the config holds only keys peft's LoraConfig has, agreeing with what peft wrote
    with open(os.path.join(out, peft_io.CONFIG_NAME)) as f:
        config = json.load(f)
    theirs = GOLDEN["cases"][case]["adapter_config"]
    assert set(config) <= set(theirs), set(config) - set(theirs)
    for key in ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "bias",
                "fan_in_fan_out", "layers_to_transform", "use_dora", "inference_mode"):
        assert config[key] == theirs[key], key
    if isinstance(theirs["target_modules"], list):
        assert sorted(config["target_modules"]) == theirs["target_modules"]
    assert config["base_model_name_or_path"] == "tiny/" + case
    again_spec, again = peft_io.read_adapter(out, cfg)
    assert again_spec == spec
    for name, value in adapters["layers"].items():
        np.testing.assert_array_equal(again["layers"][name], value, err_msg=name)


def test_write_bfloat16_and_adapter_tensor_layout(loaded, tmp_path):
    _, _, spec, adapters, model = loaded["qwen3"]  # head_dim 16 != hidden / heads
    cfg = dataclasses.replace(model.cfg, lora=None)
    tensors = peft_io.adapter_tensors(cfg, spec, adapters)
    a_q = adapters["layers"]["q_lora_a"][1]  # [D, r]
    b_q = adapters["layers"]["q_lora_b"][1]  # [r, H, hd]
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.weight"
    np.testing.assert_array_equal(tensors[name.format("A")], a_q.T)
    np.testing.assert_array_equal(tensors[name.format("B")], b_q.reshape(4, -1).T)  # [H*hd, r]
    assert tensors[name.format("B")].shape == (4 * 16, 4)
    b_o = adapters["layers"]["o_lora_b"][0]  # [r, D]; A of o is [H, hd, r] -> [r, H*hd]
    o = "base_model.model.model.layers.0.self_attn.o_proj.lora_{}.weight"
    np.testing.assert_array_equal(tensors[o.format("A")],
                                  adapters["layers"]["o_lora_a"][0].reshape(64, 4).T)
    np.testing.assert_array_equal(tensors[o.format("B")], b_o.T)
    out = str(tmp_path / "bf16")
    peft_io.write_adapter(out, cfg, spec, adapters, dtype="bfloat16")
    from mio_jax.models.safetensors_file import SafetensorsFile

    st = SafetensorsFile(os.path.join(out, peft_io.WEIGHTS_NAME))
    assert {e["dtype"] for e in st.entries.values()} == {"BF16"}
    _, again = peft_io.read_adapter(out, cfg)
    assert again["layers"]["q_lora_a"].dtype == np.float32
    np.testing.assert_allclose(again["layers"]["q_lora_a"], adapters["layers"]["q_lora_a"],
                               rtol=1e-2)
    with pytest.raises(ValueError, match=r"q_lora_b.*shape"):
        peft_io.adapter_tensors(cfg, spec, {"layers": dict(
            adapters["layers"], q_lora_b=adapters["layers"]["q_lora_b"][:, :2])})


def test_peft_name_variants_are_accepted(loaded, tmp_path):
    _, _, spec, adapters, model = loaded["mistral"]
    case = GOLDEN["cases"]["mistral"]
    cfg = dataclasses.replace(model.cfg, lora=None)
    values = adapter_values(case)
    # without the base_model.model. prefix, and with the adapter-name segment
    renamed = {n.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v
               for n, v in values.items()}
    config = dict(case["adapter_config"], target_modules=["self_attn.q_proj", "v_proj"])
    got_spec, got = peft_io.read_adapter(
        write_peft_folder(case, str(tmp_path / "a"), renamed, config), cfg)
    assert got_spec == spec
    for name, value in adapters["layers"].items():
        np.testing.assert_array_equal(got["layers"][name], value)
    # one layer named by its path, an int layers_to_transform
    one = {n: v for n, v in values.items() if ".layers.1." in n}
    config = dict(case["adapter_config"], target_modules=["q_proj", "v_proj"],
                  layers_to_transform=1)
    got_spec, got = peft_io.read_adapter(write_peft_folder(case, str(tmp_path / "b"), one, config),
                                         cfg)
    assert got_spec.targets == (("q", (1,)), ("v", (1,)))
    assert not got["layers"]["q_lora_a"][0].any() and not got["layers"]["q_lora_b"][0].any()
    config = dict(case["adapter_config"], target_modules=["layers.1.self_attn.q_proj",
                                                          "layers.1.self_attn.v_proj"])
    assert peft_io.read_adapter(write_peft_folder(case, str(tmp_path / "c"), one, config),
                                cfg)[0] == got_spec



def test_write_and_read_through_gcs(loaded, gcs):
    import uuid

    _, _, spec, adapters, model = loaded["qwen2"]
    cfg = dataclasses.replace(model.cfg, lora=None)
    url = f"gs://{gcs.bucket}/adapter-{uuid.uuid4().hex[:8]}"
    peft_io.write_adapter(url, cfg, spec, adapters)
    got_spec, got = peft_io.read_adapter(url, cfg)
    assert got_spec == spec
    for name, value in adapters["layers"].items():
        np.testing.assert_array_equal(got["layers"][name], value, err_msg=name)

# ---- bad folders --------------------------------------------------------------------------
@pytest.fixture
def mistral(loaded, tmp_path):
    """(cfg, case, fresh folder path) for error tests."""
    return dataclasses.replace(loaded["mistral"][4].cfg, lora=None), GOLDEN["cases"]["mistral"], \
        str(tmp_path / "bad")


def test_pickle_only_folder_is_refused(mistral):
    cfg, case, folder = mistral
    os.makedirs(folder)
    with open(os.path.join(folder, "adapter_model.bin"), "wb") as f:
        f.write(b"\x80\x04not loaded")
    with open(os.path.join(folder, peft_io.CONFIG_NAME), "w") as f:
        json.dump(case["adapter_config"], f)
    with pytest.raises(ValueError, match=r"bad.*adapter_model\.bin.*pickle.*never loaded"):
        peft_io.read_adapter(folder, cfg)
    os.remove(os.path.join(folder, "adapter_model.bin"))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        peft_io.read_adapter(folder, cfg)


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, r"adapter_config\.json: use_dora=True.*DoRA"),
    ({"bias": "lora_only"}, r"adapter_config\.json: bias='lora_only'"),
    ({"fan_in_fan_out": True}, r"adapter_config\.json: fan_in_fan_out"),
    ({"modules_to_save": ["lm_head"]}, r"adapter_config\.json: modules_to_save=\['lm_head'\]"),
    ({"rank_pattern": {"q_proj": 8}}, r"adapter_config\.json: rank_pattern="),
    ({"alpha_pattern": {"v_proj": 2}}, r"adapter_config\.json: alpha_pattern="),
    ({"lora_bias": True}, r"adapter_config\.json: lora_bias=True"),
    ({"exclude_modules": ["v_proj"]}, r"adapter_config\.json: exclude_modules="),
    ({"init_lora_weights": "pissa_niter_4"}, r"init_lora_weights='pissa_niter_4' rewrites"),
    ({"peft_type": "IA3"}, r"adapter_config\.json: peft_type='IA3'"),
    ({"target_modules": ["q_proj", "lm_head"]}, r"adapter_config\.json: target_modules entry "
                                                r"'lm_head' names no linear module"),
    ({"target_modules": ["q_prj"]}, r"adapter_config\.json: target_modules entry 'q_prj'"),
    ({"layers_to_transform": [2]}, r"adapter_config\.json: .*layers_to_transform \[2\] outside"),
    ({"r": 0}, r"adapter_config\.json: model\.lora\.rank=0"),
])
def test_unsupported_options_are_refused_naming_key_and_file(mistral, change, message):
    cfg, case, folder = mistral
    write_peft_folder(case, folder, config=dict(case["adapter_config"], **change))
    with pytest.raises(ValueError, match=message):
        peft_io.read_adapter(folder, cfg)


def test_missing_unexpected_and_misshaped_tensors_name_file_and_tensor(mistral):
    cfg, case, folder = mistral
    values = adapter_values(case)
    q_b = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    write_peft_folder(case, folder, {n: v for n, v in values.items() if n != q_b})
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: missing tensor.*layers\.1"
                                         r"\.self_attn\.q_proj\.lora_B"):
        peft_io.read_adapter(folder, cfg)
    extra = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    write_peft_folder(case, folder, dict(values, **{extra: np.ones(32, np.float32)}))
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: unexpected tensor.*"
                                         r"lora_magnitude_vector"):
        peft_io.read_adapter(folder, cfg)
    bad = dict(values, **{q_b: values[q_b][:, :3].copy()})
    write_peft_folder(case, folder, bad)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor '" + q_b.replace(
            ".", r"\.") + r"' has shape \(32, 3\).*\(32, 4\)"):
        peft_io.read_adapter(folder, cfg)
    twice = dict(values, **{q_b.replace(".weight", ".default.weight"): values[q_b]})
    write_peft_folder(case, folder, twice)
    with pytest.raises(ValueError, match="same adapter tensor"):
        peft_io.read_adapter(folder, cfg)


# ---- SmolLM2-135M -------------------------------------------------------------------------
def test_smollm2_adapter_matches_peft(tmp_path):
    g = GOLDEN["smollm2"]
    folder = write_peft_folder(g, str(tmp_path / "adapter"))
    plain = load_pretrained("smollm2")
    spec, adapters = peft_io.read_adapter(folder, plain.cfg)
    assert spec.rank == 8 and spec.scale == 2.0 and len(spec.rows) == 7
    model = load_pretrained("smollm2", lora=spec)
    set_adapter_values(model, adapters)
    ids = jnp.asarray([g["ids"]], jnp.int32)

    def run(m, on=None):
        graphdef, state = nnx.split(m)

        def f(s):
            mm = nnx.merge(graphdef, s)
            if on is not None:
                mm.set_adapters(on)
            return mm(ids)

        return np.asarray(jax.jit(f)(state))[0].astype(np.float64)

    def check(logits_tv, want, atol):
        lo, hi = GOLDEN["slice"]
        assert int(np.argmax(logits_tv[-1])) == want["last_topk_ids"][0]
        np.testing.assert_allclose(logits_tv[-1, want["last_topk_ids"]], want["last_topk_values"],
                                   atol=atol, rtol=0)
        np.testing.assert_allclose(logits_tv[:, lo:hi], want["slice_values"], atol=atol, rtol=0)
        m = logits_tv.max(-1)
        lse = np.log(np.exp(logits_tv - m[:, None]).sum(-1)) + m
        np.testing.assert_allclose(lse, want["logsumexp"], atol=atol, rtol=0)
        np.testing.assert_allclose(logits_tv.mean(-1), want["mean"], atol=atol, rtol=0)

    check(run(model), g["on"], 1e-3)
    check(run(model, on=False), g["disabled"], 1e-3)
    merged = peft_io.merge_adapters(base_params(plain), spec, adapters)
    set_params(plain, merged)
    check(run(plain), g["merged"], 1e-3)
