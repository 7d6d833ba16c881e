"""Config checks run at start: unknown keys, wrong types, impossible combinations.

Every error is a ``ConfigError`` (a ``ValueError``) whose message names the key.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections

from mio_jax.models.config import ATTENTION_IMPLS, DTYPES

REFERENCE_MODES = ("frozen", "precomputed", "none")
# Losses whose per-group value depends on the other groups of the batch (they
# sort over it): neither packing nor gradient accumulation preserves them.
BATCH_COUPLED_LOSSES = ("aot", "aot_unpaired")


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent (message names the key)."""


def _walk(cfg, prefix=""):
    for key in cfg.keys():
        value = cfg[key]
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _walk(value, path + ".")
        else:
            yield path, value


def _get(cfg, path):
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node


def _type_ok(value, default) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def check_keys_and_types(cfg: ml_collections.ConfigDict,
                         reference: ml_collections.ConfigDict) -> None:
    """Every key of ``cfg`` must exist in ``reference`` with a compatible type.

    Raises:
      ConfigError: naming the first unknown or mistyped key.
    """
    ref_keys = dict(_walk(reference))
    for path, value in _walk(cfg):
        if path not in ref_keys:
            parent = path.rsplit(".", 1)[0] if "." in path else ""
            siblings = sorted(k for k in ref_keys if k.rsplit(".", 1)[0] == parent
                              and "." in k) if parent else []
            raise ConfigError(f"unknown config key {path!r}"
                              + (f"; known keys under {parent!r}: {siblings}" if siblings else ""))
        if not _type_ok(value, ref_keys[path]):
            raise ConfigError(f"config key {path!r} = {value!r} has type {type(value).__name__}, "
                              f"expected {type(ref_keys[path]).__name__}")


def reasoning_tasks(cfg) -> list[str]:
    """``eval.reasoning_tasks`` as a list of reasoning-gym task names."""
    return [t.strip() for t in cfg.eval.get("reasoning_tasks", "").split(",") if t.strip()]


def loss_names(name) -> list[str]:
    """``loss.name`` as a list: one name, or a "+"-joined mix such as "dpo+sft"."""
    if isinstance(name, str):
        return [n.strip() for n in name.split("+") if n.strip()]
    return list(name)


def validate(cfg: ml_collections.ConfigDict, *, num_devices: int | None = None,
             reference: ml_collections.ConfigDict | None = None,
             backend: str | None = None) -> None:
    """Checks a resolved config; raises ``ConfigError`` naming the key.

    Args:
      cfg: the experiment config.
      num_devices: devices of the run (for the mesh and batch-divisibility checks).
      reference: the config holding every known key (default ``configs/common.py``).
      backend: the run's JAX backend ("cpu", "gpu", "tpu"); default: this process's.
    """
    from mio_jax import losses
    from mio_jax.data.config import validate_data_config

    if reference is None:
        from configs.common import base_config

        reference = base_config()
    check_keys_and_types(cfg, reference)
    try:
        validate_data_config(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from e

    names = loss_names(cfg.loss.name)
    known = set(losses.names())
    for n in names:
        if n not in known:
            raise ConfigError(f"loss.name={n!r} is not a registered loss; known: {sorted(known)}")
    specs = [losses.spec(n) for n in names]
    weights = cfg.loss.get("weights")
    if weights is not None:
        if len(names) < 2 or len(weights) != len(names):
            raise ConfigError(f"loss.weights={tuple(weights)} needs one weight per loss of a "
                              f"mix; loss.name={cfg.loss.name!r} has {len(names)}")
        if not all(isinstance(w, (int, float)) and w >= 0 for w in weights):
            raise ConfigError(f"loss.weights={tuple(weights)} must be non-negative numbers")
    if not cfg.loss.beta > 0:
        raise ConfigError(f"loss.beta={cfg.loss.beta} must be > 0")
    used = set().union(*(s.hparams for s in specs))
    all_hparams = set().union(*(losses.spec(n).hparams for n in known))
    for k in sorted(all_hparams):
        if k not in used and k in cfg.loss and cfg.loss[k] is not None:
            raise ConfigError(f"loss.{k}={cfg.loss[k]!r} is set but loss.name={cfg.loss.name!r} "
                              f"does not use it (its hyper-parameters: {sorted(used)})")

    mode = cfg.reference.mode
    if mode not in REFERENCE_MODES:
        raise ConfigError(f"reference.mode={mode!r}: expected one of {REFERENCE_MODES}")
    needs_ref = any(s.needs_reference for s in specs)
    if needs_ref and mode == "none":
        raise ConfigError(f"loss.name={cfg.loss.name!r} needs a reference model; "
                          "set reference.mode to 'frozen' or 'precomputed'")
    if not needs_ref and mode != "none":
        raise ConfigError(f"loss.name={cfg.loss.name!r} is reference-free; "
                          f"set reference.mode='none' (got {mode!r})")
    if cfg.loss.ld_alpha is not None and not 0.0 <= cfg.loss.ld_alpha <= 1.0:
        raise ConfigError(f"loss.ld_alpha={cfg.loss.ld_alpha} must be in [0, 1]")

    for key in ("model.dtype", "model.param_dtype"):
        if _get(cfg, key) not in DTYPES:
            raise ConfigError(f"{key}={_get(cfg, key)!r}: expected one of {DTYPES}")
    if not cfg.model.path:
        raise ConfigError("model.path is empty")
    frac = cfg.model.completion_logits_fraction
    if frac is not None and not 0.0 < frac <= 1.0:
        raise ConfigError(f"model.completion_logits_fraction={frac}: must be in (0, 1] "
                          "(or None to project every position)")
    if cfg.model.attention not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention={cfg.model.attention!r}: expected one of "
                          f"{ATTENTION_IMPLS}")
    if cfg.model.attention == "cudnn":
        if cfg.model.dtype == "float32":
            raise ConfigError("model.attention='cudnn' needs model.dtype bfloat16 or float16 "
                              "(got float32)")
        backend = backend or jax.default_backend()
        if backend != "gpu":
            raise ConfigError("model.attention='cudnn' needs NVIDIA GPUs; this run's backend "
                              f"is {backend!r} (use model.attention='xla')")

    t = cfg.train
    if t.epochs <= 0 and t.steps <= 0:
        raise ConfigError(f"train.steps={t.steps}: must be > 0 (or set train.epochs > 0)")
    if t.batch_size <= 0 or t.grad_accum_steps <= 0:
        raise ConfigError("train.batch_size and train.grad_accum_steps must be > 0")
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by "
                          f"train.grad_accum_steps={t.grad_accum_steps}")
    coupled = [n for n in names if n in BATCH_COUPLED_LOSSES]
    if coupled and cfg.data.packing:
        raise ConfigError(f"data.packing=True cannot be used with loss.name={cfg.loss.name!r}: "
                          f"{coupled} need the batch structure")
    if cfg.data.packing and t.grad_accum_steps > 1:
        raise ConfigError(f"data.packing=True needs train.grad_accum_steps=1 (got "
                          f"{t.grad_accum_steps}): packed rows are not split into micro-batches")
    if cfg.data.shared_prompt:
        if cfg.data.packing:
            raise ConfigError("data.shared_prompt=True cannot be combined with data.packing=True")
        if cfg.data.kway_mode == "group":
            raise ConfigError("data.shared_prompt=True needs pairs; data.kway_mode='group' makes "
                              "K-way groups")
    layout = next((k for k in ("packing", "shared_prompt") if cfg.data[k]), None)
    if layout and (cfg.loss.ld_alpha is not None or cfg.loss.use_weighting):
        raise ConfigError(f"data.{layout}=True cannot be combined with loss.ld_alpha or "
                          "loss.use_weighting (they need the [B, K, L] token layout)")
    tasks = reasoning_tasks(cfg)
    if tasks:
        from mio_jax import evaluate as evaluate_lib

        if cfg.eval.reasoning_examples < 1 or cfg.eval.reasoning_max_new_tokens < 1:
            raise ConfigError("eval.reasoning_examples and eval.reasoning_max_new_tokens "
                              "must be >= 1")
        for task in tasks:
            try:
                evaluate_lib.heldout_examples(task, 1, seed=0)
            except (ValueError, ImportError) as e:
                raise ConfigError(f"eval.reasoning_tasks: {task!r}: {e}") from e
    if coupled and t.grad_accum_steps > 1:
        raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} changes the result of "
                          f"batch-coupled loss(es) {coupled}; use 1")

    from mio_jax.optim import SCHEDULES

    if cfg.optim.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={cfg.optim.schedule!r}: expected one of {SCHEDULES}")
    if cfg.optim.learning_rate <= 0:
        raise ConfigError(f"optim.learning_rate={cfg.optim.learning_rate} must be > 0")
    if cfg.optim.warmup_steps < 0 or (t.epochs <= 0 and cfg.optim.warmup_steps > t.steps):
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} must be in "
                          f"[0, train.steps={t.steps}]")

    shape, axes = tuple(cfg.mesh.shape), tuple(cfg.mesh.axes)
    if len(shape) != len(axes) or len(set(axes)) != len(axes):
        raise ConfigError(f"mesh.shape={shape} and mesh.axes={axes} must have equal length "
                          "and distinct names")
    if not set(axes) <= {"data", "fsdp", "tensor"}:
        raise ConfigError(f"mesh.axes={axes}: only 'data', 'fsdp' and 'tensor' are known")
    if num_devices is not None:
        if shape.count(-1) > 1:
            raise ConfigError(f"mesh.shape={shape}: at most one -1")
        fixed = math.prod(s for s in shape if s != -1)
        if (-1 in shape and num_devices % fixed) or (-1 not in shape and fixed > num_devices):
            raise ConfigError(f"mesh.shape={shape} does not fit {num_devices} devices")
        sizes = dict(zip(axes, [s if s != -1 else num_devices // fixed for s in shape]))
        dp = sizes.get("data", 1) * sizes.get("fsdp", 1)
        micro = t.batch_size // t.grad_accum_steps
        if micro % dp:
            raise ConfigError(
                f"train.batch_size={t.batch_size} / train.grad_accum_steps={t.grad_accum_steps} "
                f"= {micro} groups per micro-batch is not divisible by the data-parallel size "
                f"{dp} (mesh.shape={shape}, mesh.axes={axes})")
        if cfg.reference.batch_size % dp or cfg.eval.batch_size % dp:
            raise ConfigError(f"reference.batch_size={cfg.reference.batch_size} and "
                              f"eval.batch_size={cfg.eval.batch_size} must be divisible by the "
                              f"data-parallel size {dp}")


def as_dict(cfg: Any) -> dict:
    """The config as plain JSON-able dict (for logs and checkpoints)."""
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
