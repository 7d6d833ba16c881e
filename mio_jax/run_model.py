"""A run's model: built from ``model.path`` (and ``model.lora``) at the start, exported as a
Hugging Face folder (and, for LoRA, a PEFT adapter) at the end."""

from __future__ import annotations

import jax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from mio_jax import models
from mio_jax import paths
from mio_jax import sharding as sharding_lib
from mio_jax import stages
from mio_jax.models import lora_decoder
from mio_jax.models import peft_io


def build_model(config, mesh) -> stages.Model:
    """Tokenizer and sharded model of ``model.path``; with ``model.lora.enabled`` the
    trainable parameters are the adapters alone and the frozen base is in ``other``.

    Called outside ``jax.set_mesh``: nnx's abstract init would read the logical axis
    names as mesh axes inside a mesh context.
    """
    model_path = models.resolve_model_path(config.model.path)
    tokenizer = models.load_tokenizer(
        models.resolve_model_path(config.model.tokenizer_path) if config.model.tokenizer_path
        else model_path)
    model = lora_decoder.load(config, model_path, mesh, sharding_lib.DEFAULT_RULES)
    graphdef, params, other = lora_decoder.split(model)
    trainable = nnx.LoRAParam if model.cfg.lora is not None else nnx.Param
    _, params_state, _ = nnx.split(model, trainable, ...)
    if model.cfg.lora is not None:
        lora_decoder.log_sizes(params, other)
    return stages.Model(graphdef=graphdef, params=params, other=other, config=model.cfg,
                 tokenizer=tokenizer,
                 param_specs=sharding_lib.state_partition_specs(
                     params_state, sharding_lib.DEFAULT_RULES, mesh))


def export(run: stages.Run, params) -> str:
    """Writes ``<workdir>/hf_export`` (every process takes part; process 0 writes). With
    LoRA, also ``<workdir>/peft_adapter`` (PEFT's folder: ``adapter_model.safetensors`` +
    ``adapter_config.json``) and the merged weights (float32 merge) in ``hf_export``."""
    path = paths.join(run.workdir, "hf_export")
    other = run.model.other
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
        if run.model.config.lora is not None:
            other = multihost_utils.process_allgather(other, tiled=True)
    model = nnx.merge(run.model.graphdef, params, other)
    if run.model.config.lora is not None:
        if jax.process_index() == 0:
            peft_io.write_adapter(paths.join(run.workdir, "peft_adapter"), model.cfg,
                                  model.cfg.lora, params,
                                  base_model_name_or_path=str(run.config.model.path))
        model = lora_decoder.merged(model)
    if jax.process_index() == 0:
        models.save_pretrained(model, run.model.tokenizer, path)
    logging.info("exported Hugging Face model to %s", path)
    return path
