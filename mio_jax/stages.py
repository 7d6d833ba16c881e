"""The typed values the trainer's stages hand each other, and the step's settings.

``train.train_and_evaluate`` (and ``online.train_and_evaluate``) build them in order:
``Model`` (``run_model.build_model``), ``Data``, ``Training``, ``Reference``, then one
``Run`` that the loop, the evaluation (``run_eval``) and the export (``run_model.export``)
read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from mio_jax import checkpoint as ckpt_lib
from mio_jax import config as mio_config
from mio_jax import losses
from mio_jax import models
from mio_jax import online_config
from mio_jax import optim
from mio_jax import reference as reference_lib
from mio_jax import train_step as step_lib
from mio_jax.data import pipeline as data_lib
from mio_jax.models import lora as lora_lib


@dataclasses.dataclass(frozen=True)
class Model:
    """The model, split for jit.

    Attributes:
      graphdef: the nnx GraphDef.
      params: master weights (pure dict of sharded arrays); None once the state and the
        reference are built, so no stale copy stays in memory.
      other: everything the optimizer does not update (pure dict): the rotary tables and
        other non-parameter state and, for a LoRA model, the whole frozen base (possibly
        quantized); the step reads it but never differentiates or copies it.
      config: the decoder's ``models.ModelConfig``.
      tokenizer: its Hugging Face tokenizer.
      param_specs: PartitionSpecs shaped like ``params``.
    """

    graphdef: Any
    params: Any
    other: Any
    config: models.ModelConfig
    tokenizer: Any
    param_specs: Any


@dataclasses.dataclass(frozen=True)
class Data:
    """Attributes: train (the train ``PreferenceIterator``; None when a caller feeds its own
    batches to ``run_steps``, as the online rounds do), eval_split (the prepared eval split
    or None), total_steps, sharding (of every batch field, on its leading axis),
    row_multiple (packed rows per process are a multiple of its data-parallel devices),
    probe_split (the prepared probe pairs of ``eval.probe_path``, or None)."""

    train: data_lib.PreferenceIterator | None
    eval_split: data_lib.PreparedSplit | None
    total_steps: int
    sharding: jax.sharding.NamedSharding
    row_multiple: int
    probe_split: data_lib.PreparedSplit | None = None


@dataclasses.dataclass(frozen=True)
class Training:
    """Attributes: state (the ``TrainState`` to continue from), shardings (of the state),
    tx and schedule (optax), checkpointer, data_state (the restored checkpoint's data
    position, or None when starting afresh)."""

    state: step_lib.TrainState
    shardings: step_lib.TrainState
    tx: Any
    schedule: Any
    checkpointer: ckpt_lib.Checkpointer
    data_state: Any = None


@dataclasses.dataclass(frozen=True)
class Reference:
    """Attributes: consts (what the step reads: the frozen weights when mode is "frozen"),
    train_table / eval_table / probe_table (precomputed log-probs of each split, or None)."""

    consts: step_lib.StepConsts
    train_table: reference_lib.ReferenceTable | None = None
    eval_table: reference_lib.ReferenceTable | None = None
    probe_table: reference_lib.ReferenceTable | None = None


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything the loop, the evaluation (``run_eval``) and the export
    (``run_model.export``) read; built once by ``train_and_evaluate``."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    model: Model
    data: Data
    reference: Reference
    step_cfg: step_lib.StepConfig


def step_config(config) -> step_lib.StepConfig:
    """The train step's static settings from a resolved config."""
    names = mio_config.loss_names(config.loss.name)
    used = set().union(*(losses.spec(n).hparams for n in names))
    return step_lib.StepConfig(
        loss_name=names[0] if len(names) == 1 else tuple(names),
        beta=float(config.loss.beta),
        loss_hparams=tuple(sorted((k, config.loss[k]) for k in used
                                  if config.loss.get(k) is not None)),
        loss_weights=(None if config.loss.get("weights") is None
                      else tuple(float(w) for w in config.loss.weights)),
        grad_accum_steps=int(config.train.grad_accum_steps),
        chunk_size=int(config.model.logps_chunk_size),
        reference=("base" if config.reference.mode == "frozen" and lora_lib.enabled(config)
                   else config.reference.mode),
        lengths=any(losses.spec(n).needs_lengths != "none" for n in names),
        ld_alpha=None if config.loss.ld_alpha is None else float(config.loss.ld_alpha),
        use_weighting=bool(config.loss.use_weighting),
        max_tokens_fraction=(None if config.model.completion_logits_fraction is None
                             else float(config.model.completion_logits_fraction)),
        weight_norms=bool(config.log.weight_norms),
        dropout_seed=(int(config.seed) if lora_lib.enabled(config)
                      and config.model.lora.dropout > 0 else None),
        max_grad_norm=optim.clip_norm(config.optim.max_grad_norm),
        router_aux_loss_coef=float(config.loss.router_aux_loss_coef),
        router_z_loss_coef=float(config.loss.router_z_loss_coef),
        policy_loss=config.grpo.loss_type if online_config.grpo_enabled(config) else None,
        policy_hparams=(tuple(sorted(online_config.grpo_hparams(config).items()))
                        if online_config.grpo_enabled(config) else ()))
