"""LoRA on a whole decoder: build it from a config, split it for training, merge it.

``mio_jax.models.lora`` holds the ``model.lora`` section, the spec and the adapter math;
this module applies them to ``Decoder`` modules:

- ``load``: base weights (optionally with PEFT adapters merged in, and/or stored
  quantized), adapters initialised to a zero update or read from a PEFT folder;
- ``split``: ``(graphdef, adapters, rest)``; the adapters are the only trainable state,
  the rest (the frozen base) is read by the step but never differentiated or copied;
- ``merged``: an adapter-free decoder with every update merged in float32 (for the
  Hugging Face export and for generation without the low-rank path).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from mio_jax.errors import ConfigError
from mio_jax.models import hf_io, peft_io, quant
from mio_jax.models import lora as lora_lib
from mio_jax.models.frozen import frozen_params
from mio_jax.models.llama import Decoder, dense_weight
from mio_jax.models.weights import linear_specs, stacked_specs



def load(config, model_path: str, mesh, rules) -> Decoder:
    """The model of a training config: ``model.path`` and, with ``model.lora.enabled``,
    its adapters (zero update, or ``init_from``), ``base_adapters`` merged into the frozen
    base, and the base stored per ``model.lora.quantize``.

    Raises:
      ConfigError naming the ``model.lora`` key for adapters that do not fit the model.
    """
    m = config.model
    kw = dict(dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh, rules=rules,
              remat_policy=m.remat_policy, scan_layers=m.scan_layers, attention=m.attention)
    if not lora_lib.enabled(config):
        return hf_io.load_pretrained(model_path, **kw)
    structure = hf_io.read_model_config(model_path)
    try:
        spec = lora_lib.spec_from_config(config, structure.num_hidden_layers,
                                         rows=tuple(linear_specs(structure)))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    start = None
    if m.lora.init_from:
        found, start = peft_io.read_adapter(m.lora.init_from, structure)
        _check_same(spec, found, m.lora.init_from)
    model = hf_io.load_pretrained(model_path, lora=spec, lora_seed=int(config.seed),
                                  keep_quantized=m.lora.quantize == "gguf", **kw)
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    base = nnx.to_pure_dict(rest)
    for folder in [f.strip() for f in m.lora.base_adapters.split(",") if f.strip()]:
        extra_spec, extra = peft_io.read_adapter(folder, structure)
        base = peft_io.merge_adapters(base, extra_spec, extra)
        logging.info("merged the adapter %s into the frozen base", folder)
    # The base is never updated: keep it in the compute dtype (or quantized).
    base = frozen_params(base, m.dtype)
    if m.lora.quantize in quant.QWIX_KINDS:
        base = quant.quantize_base(base, model.cfg, m.lora.quantize, mesh, rules)
    nnx.replace_by_pure_dict(rest, base)
    model = nnx.merge(graphdef, adapters, rest)
    if start is not None:
        set_adapters(model, start)
        logging.info("adapters start from %s", m.lora.init_from)
    return model


def load_with_adapter(model_path: str, folder: str, **kwargs) -> Decoder:
    """``model_path`` with the PEFT adapter of ``folder`` applied (unmerged: generation
    runs the low-rank path); ``kwargs`` go to ``load_pretrained`` (dtype, mesh, ...)."""
    structure = hf_io.read_model_config(model_path)
    spec, values = peft_io.read_adapter(folder, structure)
    model = hf_io.load_pretrained(model_path, lora=spec, **kwargs)
    set_adapters(model, values)
    return model


def _check_same(spec: lora_lib.LoraSpec, found: lora_lib.LoraSpec, folder: str) -> None:
    """The adapter of ``folder`` has the shape the config asks for."""
    for key, want, got in (("rank", spec.rank, found.rank), ("alpha", spec.alpha, found.alpha),
                           ("use_rslora", spec.use_rslora, found.use_rslora),
                           ("target_modules", spec.targets, found.targets)):
        if want != got:
            raise ConfigError(f"model.lora.{key}={want!r} but the adapter in {folder} "
                              f"(model.lora.init_from) has {got!r}; set model.lora.{key} to match")


def split(model: Decoder) -> tuple[Any, Any, Any]:
    """``(graphdef, trainable, rest)`` as pure dicts: with adapters, the LoRA factors and
    everything else (the frozen base); without, the parameters and the other state."""
    if model.cfg.lora is None:
        graphdef, params, other = nnx.split(model, nnx.Param, ...)
    else:
        graphdef, params, other = nnx.split(model, nnx.LoRAParam, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(other)


def set_adapters(model: Decoder, adapters: dict) -> None:
    """Writes adapter values (our layout, ``{"layers": {"q_lora_a": ...}}``) into
    ``model``'s LoRA variables, keeping each variable's sharding, dtype and shape."""
    layers = adapters["layers"]
    for name, value in layers.items():
        var = getattr(model.layers, name, None)
        if not isinstance(var, nnx.LoRAParam):
            raise ValueError(f"adapter tensor {name!r}: the model has no such adapter")
        old = var.get_value()
        if tuple(value.shape) != tuple(old.shape):
            raise ValueError(f"adapter tensor {name!r} has shape {tuple(value.shape)}, the "
                             f"model's adapter {tuple(old.shape)}")
        var.set_value(jax.device_put(jnp.asarray(value, old.dtype), old.sharding))


def merged(model: Decoder, dtype: str | None = None) -> Decoder:
    """An adapter-free copy of ``model`` whose weights hold the base plus every LoRA
    update, merged in float32 and cast to ``dtype`` (default: the model's param dtype).
    A quantized base is dequantized first. The model itself is not changed."""
    cfg = model.cfg
    dtype = dtype or cfg.param_dtype
    base_cfg = dataclasses.replace(cfg, lora=None, param_dtype=dtype)
    _, adapters, rest = split(model)
    layers = dict(rest["layers"])
    stacked = stacked_specs(cfg)
    for name, value in list(layers.items()):
        if hasattr(value, "dequantize"):  # [L, out, in] -> ours, one layer at a time
            layers[name] = jax.vmap(
                lambda q, spec=stacked[name]: dense_weight(spec, cfg, q, jnp.float32))(value)
    if cfg.lora is not None:
        for row in cfg.lora.rows:
            mask = cfg.lora.layer_mask(row) if cfg.lora.partial(row) else None
            layers[row] = lora_lib.merged_weight(
                jnp.asarray(layers[row], jnp.float32), adapters["layers"][f"{row}_lora_a"],
                adapters["layers"][f"{row}_lora_b"], cfg.lora.scale, mask)
    params = jax.tree.map(lambda x: jnp.asarray(x).astype(dtype), dict(rest, layers=layers))
    # A copy of the module without its LoRA variables (built from the module itself, not
    # by a fresh abstract init, which would read logical axes as mesh axes under a mesh).
    clone = nnx.merge(*nnx.split(model))
    for name in [n for n in clone.layers.names if "_lora_" in n]:
        delattr(clone.layers, name)
    clone.layers.names = tuple(n for n in clone.layers.names if "_lora_" not in n)
    clone.cfg = base_cfg
    graphdef, state = nnx.split(clone)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def parameter_count(tree) -> tuple[int, int]:
    """``(values, bytes)`` of a pytree of arrays (quantized fields counted as stored)."""
    leaves = jax.tree.leaves(tree)
    return (sum(int(x.size) for x in leaves),
            sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in leaves))


def log_sizes(adapters, rest) -> None:
    n_a, b_a = parameter_count(adapters)
    n_r, b_r = parameter_count(rest)
    logging.info("LoRA: %d trainable adapter values (%.2f MiB); frozen base %.2f MiB, "
                 "never differentiated or copied", n_a, b_a / 2**20, b_r / 2**20)
