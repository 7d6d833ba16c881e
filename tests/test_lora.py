"""LoRA / QLoRA training: zero update at init, the base as the reference, adapter-only state
and checkpoints, sharded == one device, exact resume, exports, bad configs."""

import json
import math
import os
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tolerance
from mio_jax import config as mio_config
from mio_jax import evaluate, losses, models, train
from mio_jax import train_step as step_lib
from mio_jax.data import pipeline as data_lib
from mio_jax.models import lora, lora_decoder, peft_io

LORA = {"model.lora.enabled": True, "model.lora.rank": 4, "model.lora.alpha": 8.0}
BETA, LR = 0.1, 1e-3  # configs/tiny_test.py's loss.beta and optim.learning_rate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"))
import test_gguf_io  # noqa: E402  (the tiny GGUF writer of the model tests)
TIMING = {"tokens_per_sec", "tokens_per_sec_per_device", "tflops_per_sec_per_device", "mfu"}


def _rows(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _stages(config, workdir):
    """The run's stages up to the reference (what the loop would see), on the config's mesh."""
    config = mio_config.resolve(config)
    mesh = train.build_mesh(config, workdir)
    model = train.build_model(config, mesh)
    with jax.set_mesh(mesh):
        data = train.build_data(config, model.tokenizer, mesh, workdir)
        cfg = train.step_config(config)
        reference = train.build_reference(config, workdir, model, data, cfg, mesh)
        host, _ = data.train.next_with_info()
        batch = data_lib.to_global_arrays(host, data.sharding)
    return mesh, model, cfg, reference, batch


def _first_loss(mesh, model, cfg, reference, batch):
    with jax.set_mesh(mesh):
        sums, _, denom = jax.jit(lambda p, b, c: step_lib.eval_step(
            p, b, c, graphdef=model.graphdef, cfg=cfg))(model.params, batch, reference.consts)
    return float(sums["loss"]) / float(denom)


@pytest.mark.parametrize("init,rslora,quantize", [("default", False, "none"),
                                                  ("gaussian", True, "none"),
                                                  ("default", False, "nf4"),
                                                  ("gaussian", False, "int8")])
def test_first_loss_is_ln4_for_mio_and_ln2_for_dpo(init, rslora, quantize, tiny, tmp_path,
                                                   tiny_config):
    # A non-zero adapter at step 0 would start DPO far from ln 2 (the trap Levanter hit).
    for loss, want in (("mio", math.log(4)), ("sigmoid", math.log(2))):
        config = tiny_config(*tiny, **LORA, **{
            "loss.name": loss, "model.lora.init": init, "model.lora.use_rslora": rslora,
            "model.lora.quantize": quantize, "model.lora.dropout": 0.1})
        stages = _stages(config, str(tmp_path / f"{loss}_{init}"))
        assert _first_loss(*stages) == pytest.approx(want, abs=1e-6)
        a_values = [v for k, v in stages[1].params["layers"].items() if k.endswith("_lora_a")]
        assert all(float(jnp.abs(a).max()) > 0 for a in a_values)  # A random, B zero


def test_the_state_holds_adapters_only_and_the_reference_no_copy(tiny, tmp_path, tiny_config):
    config = tiny_config(*tiny, **LORA)
    mesh, model, cfg, reference, batch = _stages(config, str(tmp_path / "run"))
    assert cfg.reference == "base" and reference.consts.ref_params is None
    names = set(model.params["layers"])
    assert names == {f"{r}_lora_{x}" for r in lora.ROW_TO_PEFT for x in "ab"}
    assert set(model.params) == {"layers"}
    # the base weights sit in `other` in the compute dtype, once
    assert {"q", "down", "embed"} <= set(model.other["layers"]) | set(model.other)
    out = train.train_and_evaluate(tiny_config(*tiny, **LORA, **{"train.steps": 2}),
                                   str(tmp_path / "trained"))
    leaves = jax.tree_util.tree_flatten_with_path(out["state"].opt_state)[0]
    shapes = {tuple(x.shape) for _, x in leaves if x.ndim}
    adapter_shapes = {tuple(x.shape) for x in jax.tree.leaves(model.params)}
    assert shapes <= adapter_shapes  # Adam moments exist for the adapters only


def test_the_base_reference_equals_the_frozen_copy_of_the_base(tiny, tmp_path, tiny_config):
    """With non-zero adapters, the step's adapters-off reference equals the log-probs of the
    base model loaded without LoRA (the full-copy frozen reference)."""
    mesh, model, cfg, reference, batch = _stages(tiny_config(*tiny, **LORA), str(tmp_path / "l"))
    params = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), model.params)
    full = _stages(tiny_config(*tiny), str(tmp_path / "f"))
    with jax.set_mesh(mesh):
        base_ref = jax.jit(lambda p, o, b: step_lib.reference_logps(
            model.graphdef, p, o, b, cfg, view="base"))(params, model.other, batch)
        policy = jax.jit(lambda p, o, b: step_lib.policy_logps(
            model.graphdef, p, o, b, cfg).logps)(params, model.other, batch)
        frozen = jax.jit(lambda p, o, b: step_lib.reference_logps(
            full[1].graphdef, p, o, b, full[2]))(full[3].consts.ref_params, full[1].other,
                                                 full[4])
    np.testing.assert_allclose(np.asarray(base_ref), np.asarray(frozen), rtol=1e-6, atol=1e-5)
    assert float(jnp.abs(policy - base_ref).max()) > 1e-3  # the adapters do change the policy


def test_every_loss_at_init_equals_the_full_model_at_init(tiny, tmp_path, tiny_config):
    """At step 0 the LoRA policy and its reference give exactly the full model's log-probs,
    so every registered loss starts where it starts without LoRA."""
    mesh, model, cfg, reference, batch = _stages(tiny_config(*tiny, **LORA), str(tmp_path / "l"))
    full = _stages(tiny_config(*tiny), str(tmp_path / "f"))
    with jax.set_mesh(mesh):
        lora_pol = jax.jit(lambda p, o, b: step_lib.policy_logps(
            model.graphdef, p, o, b, cfg).logps)(model.params, model.other, batch)
        lora_ref = jax.jit(lambda p, o, b: step_lib.reference_logps(
            model.graphdef, p, o, b, cfg, view="base"))(model.params, model.other, batch)
        full_pol = jax.jit(lambda p, o, b: step_lib.policy_logps(
            full[1].graphdef, p, o, b, full[2]).logps)(full[1].params, full[1].other, full[4])
    np.testing.assert_array_equal(np.asarray(lora_pol), np.asarray(full_pol))
    np.testing.assert_array_equal(np.asarray(lora_ref), np.asarray(full_pol))
    valid = jnp.asarray(batch.valid, bool)
    for name in losses.names():
        spec = losses.spec(name)
        if spec.needs_lengths != "none":
            continue
        kw = dict(beta=0.1, valid=valid)
        a = losses.compute_group(name, policy_logps=lora_pol, ref_logps=lora_ref, **kw)[0]
        b = losses.compute_group(name, policy_logps=full_pol, ref_logps=full_pol, **kw)[0]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.rounding
def test_lora_run_on_a_2x4_mesh_equals_one_device(tiny, tmp_path, tiny_config):
    runs = {}
    for shape in ((1, 2, 4), (1, 1, 1)):
        cfg = tiny_config(*tiny, **LORA, **{"mesh.shape": shape, "train.steps": 3,
                                            "eval.max_batches": -1, "model.lora.dropout": 0.1,
                                            "checkpoint.export_hf": False})
        runs[shape] = train.train_and_evaluate(cfg, str(tmp_path / str(len(runs))))
    a, b = runs[(1, 2, 4)], runs[(1, 1, 1)]
    tolerance.assert_results_close(a, b, beta=BETA, learning_rate=LR, steps=3)
    assert a["train"]["loss"] != pytest.approx(math.log(4), abs=1e-4)  # it trained


@pytest.mark.slow  # 4 LoRA runs (about 30 s on 2 cores); the layouts are tested without LoRA
def test_shared_prompt_accumulation_and_packing_train_like_the_unshared_layout(
        tiny, tmp_path, tiny_config):
    runs = {}
    for name, over in (("unshared", {}), ("shared", {"data.shared_prompt": True}),
                       ("accum", {"train.grad_accum_steps": 2}),
                       ("packed", {"data.packing": True})):
        cfg = tiny_config(*tiny, **LORA, **over, **{"train.steps": 3, "eval.every_steps": 0,
                                                    "eval.at_start": True, "mesh.shape": (1, 4, 1),
                                                    "checkpoint.export_hf": False})
        runs[name] = (train.train_and_evaluate(cfg, str(tmp_path / name)), tmp_path / name)
    base = runs["unshared"][0]
    for name in ("shared", "accum"):
        out = runs[name][0]
        tolerance.assert_results_close(out, base, beta=BETA, learning_rate=LR, steps=3,
                                       keys=("loss", "logps/chosen", "logps/rejected",
                                             "rewards/margins", "grad_norm"))
    # packing batches other groups together; its step-0 eval of the same weights agrees
    # (policy = reference there: the reward accuracy is rounding's choice, not compared)
    evals = {n: [r for r in _rows(w) if r["split"] == "eval" and r["step"] == 0][0]
             for n, (_, w) in runs.items()}
    tolerance.assert_rows_close(evals["packed"], evals["unshared"], beta=BETA, updates=0,
                                keys=("loss", "logps/chosen", "rewards/accuracies"))
    assert evals["unshared"]["loss"] == pytest.approx(math.log(4), abs=1e-6)


def test_resume_equals_uninterrupted_and_checkpoints_hold_adapters_only(tiny, tmp_path,
                                                                        tiny_config,
                                                                        monkeypatch):
    over = dict(LORA, **{"train.steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 2,
                         "model.lora.dropout": 0.1, "model.lora.quantize": "nf4"})
    cfg = tiny_config(*tiny, **over)
    whole = train.train_and_evaluate(cfg, str(tmp_path / "whole"))

    class Crash(Exception):
        pass

    from mio_jax import periodic
    save = periodic.Checkpoints.__call__

    def crash_after_step_2(self, step, state):  # dies right after checkpoint 2 is on disk
        save(self, step, state)
        if step == 2:
            self.checkpointer.wait()
            raise Crash()

    part = tmp_path / "part"
    monkeypatch.setattr(periodic.Checkpoints, "__call__", crash_after_step_2)
    with pytest.raises(Crash):
        train.train_and_evaluate(cfg, str(part))
    monkeypatch.undo()
    resumed = train.train_and_evaluate(cfg, str(part))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed["state"].params),
                 jax.device_get(whole["state"].params))
    assert _rows(part) == _rows(tmp_path / "whole")
    # an adapter-only checkpoint: every array it stores is an adapter or its Adam moment
    meta = json.load(open(part / "checkpoints" / "4" / "state" / "_METADATA"))
    keys = [eval(k) for k in meta["tree_metadata"]]  # "('params', 'layers', 'q_lora_a')"
    weights = [k for k in keys if "layers" in k or k[-1] in ("embed", "final_norm")]
    assert all("_lora_" in k[-1] for k in weights), weights
    assert len(weights) == 3 * len(whole["state"].params["layers"])  # params, mu, nu
    assert {k[-1] for k in keys if k[0] == "params"} == set(whole["state"].params["layers"])


def test_exports_peft_folder_and_merged_weights_that_generate_alike(tiny, tmp_path,
                                                                   tiny_config):
    work = tmp_path / "run"
    cfg = tiny_config(*tiny, **LORA, **{"train.steps": 3, "optim.learning_rate": 5e-2})
    out = train.train_and_evaluate(cfg, str(work))
    folder = work / "peft_adapter"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(folder))
    structure = models.read_model_config(tiny[0])
    spec, values = peft_io.read_adapter(str(folder), structure)
    assert spec.rank == 4 and spec.alpha == 8.0 and spec.rows == tuple(lora.ROW_TO_PEFT)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 values, jax.device_get(out["state"].params))
    # greedy generation: base + adapter (low-rank path) == the merged export
    prompts = [[{"role": "user", "content": "1+2="}], [{"role": "user", "content": "7*3 is"}]]
    with_adapter = evaluate.make_sampler(tiny[0], adapter=str(folder), max_new_tokens=6)(prompts)
    assert with_adapter == evaluate.make_sampler(str(work / "hf_export"),
                                                 max_new_tokens=6)(prompts)
    ids = [[5, 17, 33, 2, 64, 90, 11], [41, 7, 77, 13]]
    applied = lora_decoder.load_with_adapter(tiny[0], str(folder))
    exported = models.load_pretrained(str(work / "hf_export"))
    assert models.generate_ids(applied, ids, max_new_tokens=8) == \
        models.generate_ids(exported, ids, max_new_tokens=8)
    x = jnp.asarray([ids[0]])
    np.testing.assert_allclose(np.asarray(applied(x)), np.asarray(exported(x)), atol=1e-5)
    assert float(jnp.abs(applied(x) - models.load_pretrained(tiny[0])(x)).max()) > 1e-3
    from mio_jax import convert
    convert.convert(str(work), str(tmp_path / "conv_hf"))
    convert.convert(str(work), str(tmp_path / "conv_peft"), fmt="peft")
    a = models.load_pretrained(str(tmp_path / "conv_hf"))
    b = models.load_pretrained(str(work / "hf_export"))
    # the same float32 merge (on 8 devices in the run, on one here: rounding apart)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
                 nnx.to_pure_dict(nnx.state(a)), nnx.to_pure_dict(nnx.state(b)))
    _, again = peft_io.read_adapter(str(tmp_path / "conv_peft"), structure)
    jax.tree.map(np.testing.assert_array_equal, again, values)


def test_training_from_an_adapter_and_on_top_of_a_merged_one(tiny, tmp_path, tiny_config):
    """`init_from` starts the policy at base + adapter (reference: the base); `base_adapters`
    makes an adapter part of both (DPO on top of an SFT adapter starts at ln 2)."""
    first = tmp_path / "first"
    train.train_and_evaluate(tiny_config(*tiny, **LORA, **{
        "train.steps": 3, "optim.learning_rate": 5e-2, "checkpoint.export_hf": True}), str(first))
    sft = str(first / "peft_adapter")
    cont = tiny_config(*tiny, **LORA, **{"model.lora.init_from": sft, "loss.name": "sigmoid"})
    stages = _stages(cont, str(tmp_path / "cont"))
    assert _first_loss(*stages) != pytest.approx(math.log(2), abs=1e-4)  # policy != reference
    on_top = tiny_config(*tiny, **LORA, **{"model.lora.base_adapters": sft, "loss.name": "sigmoid"})
    stages = _stages(on_top, str(tmp_path / "top"))
    assert _first_loss(*stages) == pytest.approx(math.log(2), abs=1e-6)
    # the merged base differs from the plain base
    plain = _stages(tiny_config(*tiny, **LORA), str(tmp_path / "plain"))[1]
    assert float(jnp.abs(stages[1].other["layers"]["q"] - plain.other["layers"]["q"]).max()) > 0
    bad = tiny_config(*tiny, **dict(LORA, **{"model.lora.init_from": sft, "model.lora.rank": 8}))
    with pytest.raises(mio_config.ConfigError, match="model.lora.rank=8"):
        _stages(bad, str(tmp_path / "bad"))


@pytest.mark.parametrize("overrides,match", [
    ({"model.lora.rank": 0}, "model.lora.rank=0"),
    ({"model.lora.target_modules": "qkv_proj"}, "model.lora.target_modules"),
    ({"model.lora.target_modules": r".*\.attn_nothing"}, "matches no linear module"),
    ({"model.lora.dropout": 1.0}, "model.lora.dropout"),
    ({"model.lora.init": "pissa"}, "model.lora.init"),
    ({"model.lora.quantize": "fp8"}, "model.lora.quantize"),
    ({"model.lora.quantize": "gguf"}, "not a .gguf file"),
    ({"model.lora.enabled": False, "model.lora.quantize": "nf4"},
     "is set but model.lora.enabled=False"),
])
def test_bad_lora_config_is_rejected_naming_the_key(overrides, match, tiny, tiny_config):
    config = tiny_config(*tiny, **dict(LORA, **overrides))
    with pytest.raises(mio_config.ConfigError, match=match):
        mio_config.validate(config)


@pytest.mark.parametrize("key,value", [("model.lora.rank", 8), ("model.lora.dropout", 0.1),
                                       ("model.lora.target_modules", "q_proj")])
def test_a_lora_key_set_while_lora_is_off_is_refused(key, value, tiny, tiny_config):
    """`--config.model.lora.rank=8` without `model.lora.enabled=True` would train every
    weight and write no adapter: the config is refused, naming the key."""
    config = tiny_config(*tiny, **{key: value})
    with pytest.raises(mio_config.ConfigError,
                       match=f"{key}={value!r} is set but model.lora.enabled=False"):
        mio_config.validate(config)
    mio_config.validate(tiny_config(*tiny))  # the defaults pass


def _q4_1_blocks_give_the_dequantized_model(path, ids, num_layers):
    """A Q4_1 GGUF's linear weights stay blocks (0.625 bytes a weight), decoded a layer at a
    time inside the forward; its logits equal those of the model dequantized at load."""
    from mio_jax.models import quant

    spec = lora.make_spec(rank=4, alpha=8, target_modules="q_proj,v_proj", num_layers=num_layers)
    kept = models.load_pretrained(path, lora=spec, keep_quantized=True)
    q = kept.layers.q.get_value()
    assert isinstance(q, quant.QuantizedWeight) and q.kind == "Q4_1"
    assert quant.bytes_per_param(q) == pytest.approx(0.625)
    full = models.load_pretrained(path)
    a = jax.jit(lambda i: kept(i))(ids)
    b = jax.jit(lambda i: full(i))(ids)
    # both decode the same blocks to the same float32 weights; only the order of the work
    # differs (per layer in the forward vs at load)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-5)


def test_gguf_blocks_kept_as_the_file_has_them_give_the_dequantized_model(tmp_path):
    """The tiny model written as llama.cpp writes Q4_1 (tests/models/test_gguf_io.py)."""
    hf = test_gguf_io.tiny_hf_tensors(seed=3)
    path = test_gguf_io.write_tiny_gguf(tmp_path / "q4_1.gguf", hf, gguf.GGMLQuantizationType.Q4_1)
    ids = jnp.asarray([[1, 50, 34, 31, 26, 13, 30]])
    _q4_1_blocks_give_the_dequantized_model(path, ids, test_gguf_io.TINY["layers"])


@pytest.mark.slow
def test_smollm2_gguf_blocks_kept_as_the_file_has_them_give_the_dequantized_model():
    """The same on SmolLM2-135M's own Q4_1 file (30 layers: about 2 minutes on 2 cores)."""
    path = models.smollm2_gguf_path()
    structure = models.read_model_config(path)
    ids = jnp.asarray([[1, 504, 3458, 314, 260, 1345, 30]])
    _q4_1_blocks_give_the_dequantized_model(path, ids, structure.num_hidden_layers)


def test_the_base_storages_are_the_quantizer_kinds_plus_as_loaded_and_gguf():
    from mio_jax.models import quant

    assert set(lora.BASE_STORAGES) == {"none", "gguf", *quant.QWIX_KINDS}
