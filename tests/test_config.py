"""The config schema (mio_jax.config): each rule once, naming its key; effective values;
the shipped configs."""

import glob
import os
import re
import warnings

import ml_collections
import numpy as np
import pytest

from mio_jax import config as mio_config
from mio_jax import losses

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _tiny(**overrides):
    """configs/tiny_test.py with ``overrides`` ("a.b" -> value); its paths need not exist
    (validation reads no files)."""
    c = mio_config.load(os.path.join(CONFIGS, "tiny_test.py"))
    c.model.path, c.data.train_path, c.data.eval_path = "tiny_model", "train.jsonl", "eval.jsonl"
    for key, value in overrides.items():
        section, name = key.rsplit(".", 1)
        c[section][name] = value
    return c


# ---- every rule, once, with the key in its message ----------------------------------

# (override, message): each rule of each section's validator, in validation order.
RULES = [
    # data (mio_jax.data.config)
    ({"data.on_bad_row": "ignore"}, "on_bad_row='ignore'"),
    ({"data.max_length": 1}, "max_length=1"),
    ({"data.shared_prompt": True, "data.packing": True},
     "data.shared_prompt=True cannot be combined with data.packing=True"),
    ({"data.shared_prompt": True, "data.kway_mode": "group"},
     "data.shared_prompt=True needs pairs; data.kway_mode='group'"),
    # model (mio_jax.models.config)
    ({"model.dtype": "float8"}, "model.dtype='float8'"),
    ({"model.param_dtype": "int8"}, "model.param_dtype='int8'"),
    ({"model.remat_policy": "some"}, "model.remat_policy='some'"),
    ({"model.attention": "flash"}, "model.attention='flash'"),
    ({"model.attention": "cudnn"}, "model.attention='cudnn' needs model.dtype bfloat16"),
    ({"model.attention": "cudnn", "model.dtype": "bfloat16"},
     "model.attention='cudnn' needs NVIDIA GPUs; this run's backend is 'cpu'"),
    ({"model.attention": "splash"},
     "model.attention='splash' is a TPU kernel; this run's backend is 'cpu'"),
    ({"loss.router_aux_loss_coef": -0.1}, "loss.router_aux_loss_coef=-0.1 must be >= 0"),
    ({"mesh.axes": ("data", "fsdp", "pipeline"), "mesh.shape": (1, -1, 1)},
     r"only \('data', 'fsdp', 'tensor', 'expert'\) are known"),
    ({"model.path": ""}, "model.path is empty"),
    ({"model.logps_chunk_size": 0}, "model.logps_chunk_size=0"),
    ({"model.completion_logits_fraction": 1.5}, "model.completion_logits_fraction=1.5"),
    # reference (mio_jax.reference)
    ({"reference.mode": "cached"}, "reference.mode='cached'"),
    ({"reference.batch_size": 0}, "reference.batch_size=0"),
    # train (mio_jax.config)
    ({"train.steps": 0}, "train.steps=0"),
    ({"train.batch_size": 0}, "train.batch_size and train.grad_accum_steps must be > 0"),
    ({"train.grad_accum_steps": 3},
     "train.batch_size=8 is not divisible by train.grad_accum_steps=3"),
    # loss (mio_jax.losses.config), with the rules the loss puts on other sections
    ({"loss.name": "dpoo"}, "loss.name='dpoo' is not a registered loss"),
    ({"loss.weights": (1.0, 0.5)}, r"loss.weights=\(1.0, 0.5\) needs one weight per loss"),
    ({"loss.name": "dpo+sft", "loss.weights": (1.0, -1.0)},
     r"loss.weights=\(1.0, -1.0\) must be non-negative"),
    ({"loss.beta": 0.0}, "loss.beta=0.0 must be > 0"),
    ({"loss.simpo_gamma": 0.3}, "loss.simpo_gamma=0.3 is set but loss.name='mio' does not use it"),
    ({"loss.ld_alpha": 1.5}, r"loss.ld_alpha=1.5 must be in \[0, 1\]"),
    ({"loss.name": "dpo", "reference.mode": "none"},
     "loss.name='dpo' needs a reference model; set reference.mode"),
    ({"loss.name": "simpo"}, "loss.name='simpo' is reference-free; set reference.mode='none'"),
    ({"loss.name": "aot", "data.packing": True},
     "data.packing=True cannot be used with loss.name='aot'"),
    ({"loss.name": "aot_unpaired", "train.grad_accum_steps": 2},
     r"train.grad_accum_steps=2 changes the result of batch-coupled loss\(es\) \['aot_unpaired'\]"),
    ({"data.packing": True, "loss.use_weighting": True},
     "data.packing=True cannot be combined with loss.ld_alpha or loss.use_weighting"),
    ({"data.shared_prompt": True, "loss.ld_alpha": 0.5},
     "data.shared_prompt=True cannot be combined with loss.ld_alpha"),
    # optim (mio_jax.optim)
    ({"optim.schedule": "step"}, "optim.schedule='step'"),
    ({"optim.warmup_steps": 7}, r"optim.warmup_steps=7 must be in \[0, train.steps=6\]"),
    ({"optim.learning_rate": 0.0}, "optim.learning_rate=0.0 must be > 0"),
    ({"optim.final_lr_fraction": 2.0}, "optim.final_lr_fraction=2.0"),
    ({"optim.mu_dtype": "fp8"}, "optim.mu_dtype='fp8'"),
    # mesh (sharding.mesh_axis_sizes) and batch divisibility (mio_jax.config)
    ({"mesh.shape": (4, 4, 1)}, r"mesh.shape=\(4, 4, 1\) needs 16 devices, but 8 are available"),
    ({"mesh.axes": ("data", "model", "tensor")}, r"mesh.axes=\('data', 'model', 'tensor'\)"),
    ({"train.batch_size": 6}, "train.batch_size=6 / train.grad_accum_steps=1 = 6 groups per "
                              "micro-batch is not divisible by the data-parallel size 4"),
    ({"reference.batch_size": 6},
     "reference.batch_size=6 is not divisible by the data-parallel size 4"),
    ({"eval.batch_size": 2}, "eval.batch_size=2 is not divisible by the data-parallel size 4"),
    # checkpoint (mio_jax.checkpoint), log (mio_jax.metrics), eval (mio_jax.evaluate)
    ({"checkpoint.every_steps": 0}, "checkpoint.every_steps=0"),
    ({"checkpoint.keep": 0}, "checkpoint.keep=0"),
    ({"log.every_steps": 0}, "log.every_steps=0"),
    ({"log.peak_flops_per_device": -1.0}, "log.peak_flops_per_device=-1.0"),
    ({"eval.every_steps": -1}, "eval.every_steps=-1"),
    ({"eval.reasoning_tasks": "basic_arithmetic", "eval.reasoning_examples": 0},
     "eval.reasoning_examples=0 must be >= 1"),
    ({"eval.reasoning_tasks": "basic_arithmetic", "eval.reasoning_batch_size": 0},
     "eval.reasoning_batch_size=0 must be >= 1"),
    ({"eval.reasoning_tasks": "basic_arithmetic,nope"}, "eval.reasoning_tasks: 'nope'"),
]


@pytest.mark.parametrize("override,message", RULES, ids=[m[:48] for _, m in RULES])
def test_each_rule_raises_config_error_naming_the_key(override, message):
    cfg = _tiny(**{"mesh.shape": (2, -1, 2), **override})
    with pytest.raises(mio_config.ConfigError, match=message) as info:
        mio_config.validate(cfg, num_devices=8)
    assert isinstance(info.value, ValueError)
    keys = [k for k in override if k.split(".")[-1] in str(info.value)]
    assert keys, (override, str(info.value))  # the message names a key it is about


def test_the_tiny_config_is_valid_and_the_rules_are_distinct():
    mio_config.validate(_tiny(**{"mesh.shape": (2, -1, 2)}), num_devices=8)
    messages = [m for _, m in RULES]
    assert len(set(messages)) == len(messages)


def test_unknown_keys_and_wrong_types_name_the_key():
    cfg = _tiny()
    with cfg.train.unlocked():
        cfg.train.stpes = 10
    with pytest.raises(mio_config.ConfigError,
                       match=r"unknown config key 'train.stpes'; known keys under 'train': "
                             r"\['train.batch_size', 'train.epochs'"):
        mio_config.validate(cfg, num_devices=8)
    cfg = _tiny()
    with cfg.train.unlocked():
        del cfg.train["steps"]
        cfg.train.steps = "ten"
    with pytest.raises(mio_config.ConfigError,
                       match="'train.steps' = 'ten' has type str, expected int"):
        mio_config.validate(cfg, num_devices=8)
    # A config rebuilt from plain values (e.g. JSON) loses the placeholders' types; the
    # schema still knows them.
    cfg = ml_collections.ConfigDict(_tiny().to_dict())
    cfg.model.completion_logits_fraction = "half"
    with pytest.raises(mio_config.ConfigError, match="'model.completion_logits_fraction' = 'half' "
                                                     "has type str, expected float"):
        mio_config.validate(cfg, num_devices=8)
    cfg = ml_collections.ConfigDict(_tiny().to_dict())
    cfg.model.completion_logits_fraction = 0.5
    cfg.loss.name = "dpo"
    cfg.loss.label_smoothing = 0  # an int where a float is declared is fine
    mio_config.validate(cfg, num_devices=8)


def test_mesh_structure_is_checked_without_a_device_count():
    mio_config.validate(_tiny(**{"mesh.shape": (2, -1, 2), "train.batch_size": 6}))  # no count
    with pytest.raises(mio_config.ConfigError, match=r"mesh.shape=\(-1, -1, 1\): at most one"):
        mio_config.validate(_tiny(**{"mesh.shape": (-1, -1, 1)}))
    with pytest.raises(mio_config.ConfigError, match="must have equal length"):
        mio_config.validate(_tiny(**{"mesh.shape": (1, -1)}))


def test_batch_coupling_is_a_fact_of_the_loss_registry():
    coupled = {n for n in losses.names() if losses.spec(n).couples_batch}
    assert coupled == {"aot", "aot_unpaired"}
    # the validator reads it (no list of names of its own): a mix with a coupled member
    cfg = _tiny(**{"loss.name": "sigmoid+aot", "data.packing": True})
    with pytest.raises(mio_config.ConfigError, match=r"\['aot'\] need the batch structure"):
        mio_config.validate(cfg, num_devices=8)


# ---- effective values ----------------------------------------------------------------

def _for_loss(name, **overrides):
    ref = "frozen" if any(losses.spec(n).needs_reference for n in name.split("+")) else "none"
    return _tiny(**{"loss.name": name, "reference.mode": ref, **overrides})


@pytest.mark.parametrize("name", losses.names())
def test_resolve_writes_each_used_hparam_default_and_leaves_the_rest_none(name):
    cfg = _for_loss(name)
    resolved = mio_config.resolve(cfg)
    hparams = dict(losses.spec(name).hparams)
    for key in mio_config.loss_hparam_defaults():
        assert cfg.loss[key] is None  # the input is not changed
        assert resolved.loss[key] == hparams.get(key), key
        assert (resolved.loss[key] is None) == (key not in hparams), key
    mio_config.validate(resolved, num_devices=8)
    assert mio_config.resolve(resolved).to_dict() == resolved.to_dict()  # idempotent


def test_resolve_keeps_set_values_and_mixes_with_different_defaults():
    resolved = mio_config.resolve(_for_loss("dpo", **{"loss.label_smoothing": 0.2}))
    assert resolved.loss.label_smoothing == 0.2
    assert resolved.loss.f_divergence_type == "reverse_kl"
    # dpo and exo_pair default label_smoothing differently (0 and 1e-3): no single value
    # says that, so it stays None and each member keeps its own default.
    mix = mio_config.resolve(_for_loss("dpo+exo_pair"))
    assert mix.loss.label_smoothing is None
    assert (mix.loss.f_divergence_type, mix.loss.f_alpha_divergence_coef) == ("reverse_kl", 0.5)
    assert mio_config.resolve(_for_loss("dpo+sft")).loss.label_smoothing == 0.0


@pytest.mark.parametrize("name", [*losses.names(), "dpo+exo_pair", "sigmoid+bco_pair+sft"])
def test_resolved_hparams_give_the_same_losses_as_leaving_them_none(name):
    """The trainer's StepConfig built from the resolved config computes the same numbers."""
    from mio_jax import train

    names = name.split("+")
    plain, resolved = _for_loss(name), mio_config.resolve(_for_loss(name))
    rng = np.random.default_rng(0)
    kw = dict(policy_logps=rng.normal(-20, 3, (8, 2)).astype(np.float32), beta=0.1,
              lengths=rng.integers(1, 9, (8, 2)).astype(np.float32))
    if any(losses.spec(n).needs_reference for n in names):
        kw["ref_logps"] = rng.normal(-20, 3, (8, 2)).astype(np.float32)
    want, _ = losses.compute_group(name if len(names) == 1 else names, **kw)
    step_cfg = train.step_config(resolved)
    assert dict(step_cfg.loss_hparams) == {k: v for k, v in resolved.loss.items()
                                           if k in mio_config.loss_hparam_defaults()
                                           and v is not None}
    assert dict(train.step_config(plain).loss_hparams) == {}
    got, _ = losses.compute_group(step_cfg.loss_name, **kw, **dict(step_cfg.loss_hparams))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ---- shipped configs and the deprecated aliases ------------------------------------

def _shipped():
    """(file, arg, num_devices, backend) for every training config in configs/."""
    from configs import grpo, online, paper, reproduce_small, study_a

    devices = {"v5p-64": (32, "tpu"), "v4-64": (32, "tpu"), "v6e-32": (32, "tpu"),
               "h100x8": (8, "gpu"), "h100x1": (1, "gpu"), "h200x1": (1, "gpu"),
               "gpu24gb": (1, "gpu"), "v5p-8": (4, "tpu")}
    out = [("tiny_test.py", None, 8, None), ("tiny_test.py", "dpo", 8, None)]
    # The CPU defaults train 2 pairs per step: one device (8 would not divide the batch).
    out += [("default.py", a, 1, None) for a in (None, "runlocal")]
    out += [("dpo_default.py", a, 1, None) for a in (None, "runlocal")]
    out += [("lora_default.py", a, 1, None)
            for a in (None, "runlocal", "nf4", "int8", "gguf", "gguf,runlocal")]
    out += [("reproduce_small.py", m, 1, None) for m in reproduce_small.METHODS]
    out += [("online.py", f"{m}{opt}", 1, None) for m in online.METHODS
            for opt in ("", ",lora", ",runlocal", ",lora,runlocal")]
    out += [("study_a.py", m, 1, None) for m in study_a.METHODS]
    out += [("grpo.py", f"{r}{opt}", 1, None) for r in grpo.RECIPES
            for opt in ("", ",lora", ",runlocal", ",lora,runlocal")]
    out += [("paper.py", f"{m},{loss},{hw}{'' if mode == 'full' else ',' + mode}{run}",
             *devices[hw]) for m in paper.MODELS for loss in ("mio", "dpo")
            for hw, modes in paper.MODES.items() for mode in modes for run in ("", ",runlocal")
            if not (mode == "full" and (m, hw) in paper.DOES_NOT_FIT)]
    return out


def test_paper_models_that_do_not_fit_a_layout_are_refused_with_the_measured_peak():
    from configs import paper

    for (model, hw), why in paper.DOES_NOT_FIT.items():
        with pytest.raises(ValueError, match=f"does not fit: full fine-tuning of {model} on "
                                             f"{hw} needs"):
            paper.get_config(f"{model},mio,{hw}")
    moe = paper.get_config("qwen3_30b_a3b,mio,v5p-64")
    assert moe.mesh.axes == ("data", "fsdp", "tensor", "expert") and moe.mesh.shape == (1, 4, 1, 8)
    assert paper.get_config("gemma3_27b,mio,v5p-64").train.grad_accum_steps == 4


def test_every_shipped_config_loads_resolves_and_validates():
    files = {os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.py"))}
    # reproduce_pairs.py configures mio_jax.pairs.
    assert files - {"reproduce_pairs.py"} == {f for f, *_ in _shipped()}
    for file, arg, devices, backend in _shipped():
        path = os.path.join(CONFIGS, file) + (f":{arg}" if arg else "")
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # none uses a deprecated API
            cfg = mio_config.load(path)
        resolved = mio_config.resolve(cfg)
        mio_config.validate(cfg, num_devices=devices, backend=backend)
        mio_config.validate(resolved, num_devices=devices, backend=backend)
        for n in mio_config.loss_names(cfg.loss.name):
            for key, default in losses.spec(n).hparams.items():
                assert resolved.loss[key] == (cfg.loss[key] if cfg.loss[key] is not None
                                              else default), (path, key)
    from mio_jax import pairs

    mio_config.check_keys_and_types(mio_config.load(os.path.join(CONFIGS, "reproduce_pairs.py")),
                                    pairs.default_config())


def test_default_configs_dpo_beta_is_gradient_matched_and_cudnn_needs_a_gpu():
    mio = mio_config.load(os.path.join(CONFIGS, "default.py"))
    dpo = mio_config.load(os.path.join(CONFIGS, "dpo_default.py"))
    assert (mio.loss.name, dpo.loss.name) == ("mio", "dpo")
    assert dpo.loss.beta == mio.loss.beta / 2
    h100 = mio_config.load(os.path.join(CONFIGS, "paper.py:qwen2.5_7b,dpo,h100x8"))
    mio_config.validate(h100, num_devices=8, backend="gpu")
    with pytest.raises(mio_config.ConfigError, match="model.attention='cudnn' needs NVIDIA"):
        mio_config.validate(h100, num_devices=8)  # this run's backend: cpu


def test_paper_lora_variants_train_adapters_on_the_base_and_refuse_what_does_not_fit():
    from configs import paper

    from mio_jax import train

    assert set(paper.MODES) == set(paper.HARDWARE)
    lora_layouts = {hw: modes for hw, modes in paper.MODES.items() if "full" not in modes}
    assert set(lora_layouts) == {"h100x1", "h200x1", "gpu24gb", "v5p-8"}
    assert "qlora" in paper.MODES["gpu24gb"] and "lora" in paper.MODES["h100x1"]
    for hw, modes in lora_layouts.items():
        for mode in modes:
            cfg = mio_config.load(os.path.join(CONFIGS, f"paper.py:llama3_8b,mio,{hw},{mode}"))
            lo = cfg.model.lora
            assert (lo.enabled, lo.rank, lo.alpha, lo.target_modules, lo.dropout) == (
                True, 16, 32.0, "all-linear", 0.05), (hw, mode)
            assert lo.quantize == ("nf4" if mode == "qlora" else "none")
            assert (cfg.train.batch_size, cfg.data.max_length) == (8, 1024)
            assert cfg.optim.learning_rate == 5e-6
            # "frozen" with LoRA: the base with its adapters off, no copy of the weights
            step = train.step_config(mio_config.resolve(cfg))
            assert (cfg.reference.mode, step.reference) == ("frozen", "base")
            assert step.dropout_seed is not None
    full = mio_config.load(os.path.join(CONFIGS, "paper.py:llama3_8b,mio,v5p-64"))
    assert not full.model.lora.enabled and full.optim.learning_rate == 5e-7
    assert (full.data.max_length, full.reference.mode) == (2048, "precomputed")
    for arg in ("llama3_8b,mio,gpu24gb", "llama3_8b,mio,gpu24gb,lora", "llama3_8b,dpo,h100x1",
                "llama3_8b,mio,v5p-64,qlora", "llama3_8b,mio,h200x1,runlocal"):
        with pytest.raises(ValueError, match="does not fit"):
            mio_config.load(os.path.join(CONFIGS, f"paper.py:{arg}"))
    with pytest.raises(ValueError, match="bad arg"):
        mio_config.load(os.path.join(CONFIGS, "paper.py:llama3_8b,mio,h100x1,lora,qlora"))


def test_an_old_experiment_file_on_configs_common_names_what_replaced_it(tmp_path):
    """configs/common.py (deprecated for a release) is gone: an old experiment file run from
    the checkout fails in one line that says where to start instead."""
    exp = tmp_path / "old_style.py"
    exp.write_text("from configs import common\n\n\ndef get_config(arg=None):\n"
                   "    return common.base_config()\n")
    with pytest.raises(Exception) as info:
        mio_config.load(str(exp))
    text = mio_config.describe_load_error(info.value, str(exp))
    assert text.startswith(f"experiment file {exp}, line 1: ImportError: cannot import name "
                           "'common'"), text
    assert text.endswith("start from mio_jax.config.base_config()"), text


def test_helpers():
    assert mio_config.loss_names("dpo + sft") == ["dpo", "sft"]
    assert mio_config.loss_names(("mio",)) == ["mio"]
    assert mio_config.reasoning_tasks(_tiny(**{"eval.reasoning_tasks": " a, b,,"})) == ["a", "b"]
    assert mio_config.REFERENCE_MODES == ("frozen", "precomputed", "none")
    assert mio_config.as_dict(_tiny())["loss"]["name"] == "mio"


# ---- experiment files that do not load ---------------------------------------------

@pytest.mark.parametrize("body,message", [
    ("from configs_nowhere import common\n", r"experiment file {p}, line 1: ModuleNotFoundError: "
                                             r"No module named 'configs_nowhere'"),
    ("def get_config(arg=None):\n    return 1 / 0\n",
     r"experiment file {p}, line 2: ZeroDivisionError: division by zero"),
    ("X = 1\n", r"experiment file {p} has no get_config\(arg=None\) function"),
    ("def get_config(arg=None):\n    return (\n", r"experiment file {p}, line 2: SyntaxError"),
])
def test_describe_load_error_names_file_and_line(tmp_path, body, message):
    path = tmp_path / "exp.py"
    path.write_text(body)
    with pytest.raises(BaseException) as info:
        mio_config.load(str(path))
    text = mio_config.describe_load_error(info.value, str(path))
    assert "\n" not in text
    assert re.match(message.format(p=re.escape(str(path))), text), text
