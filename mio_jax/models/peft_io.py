"""PEFT LoRA adapter folders <-> our stacked adapters, and merging adapters into a base.

A PEFT LoRA folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with
two tensors per adapted module and layer, in torch layout:

- ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``: ``[r, in]``
- ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight``: ``[out, r]``

``in`` and ``out`` are the HF weight's flattened input and output groups (the weight
table's ``hf_axes``, out group first). Ours are stacked per row (``mio_jax.models.lora``):
``{row}_lora_a`` ``[L, *in_dims, r]`` and ``{row}_lora_b`` ``[L, r, *out_dims]``, with
layers the adapter does not cover left at zero. Since our weights list their input axes
in HF's order and then their output axes (``lora.factor_axes`` checks it), converting a
layer is a reshape and a transpose.

Only plain LoRA is read: options that change what the adapter computes and that we do
not implement (DoRA, bias training, per-module ranks, modules_to_save, base-rewriting
inits such as PiSSA, ...) are refused with the key and the file named, never ignored.
Pickle adapters (``adapter_model.bin``) are never loaded.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from mio_jax import paths
from mio_jax.models import lora as lora_lib
from mio_jax.models.config import ModelConfig
from mio_jax.models.safetensors_file import SafetensorsFile, write_safetensors
from mio_jax.models.weights import WeightSpec, check_tensors, linear_specs, stacked_specs

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PEFT_PREFIX = "base_model.model."  # what PeftModel prepends to the base model's names
_STORE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}

# adapter_config.json keys we read or that do not change what a loaded adapter computes.
_HANDLED = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora",
    "target_modules", "layers_to_transform", "layers_pattern", "init_lora_weights",
    "bias", "fan_in_fan_out", "base_model_name_or_path", "revision", "inference_mode",
    "peft_version", "auto_mapping", "runtime_config", "ensure_weight_tying",
    "modules_to_tie", "target_modules_to_tie", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "megatron_core", "qalora_group_size",
}
# Inits that rewrite the base weights when the adapter is created: the adapter is only
# meaningful on top of the rewritten base, which we do not reproduce.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "mica", "loftq", "lora_ga")
# Inits that only decide the adapter's starting values (the loaded weights replace them).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_ADAPTER_NAME = re.compile(r"\.(lora_[AB])\.[^.]+\.weight$")


def _peft_name(row_spec: WeightSpec, layer: int, factor: str) -> str:
    """``base_model.model.model.layers.{i}.<module>.lora_A.weight`` (factor "A" or "B")."""
    module = row_spec.hf.format(i=layer).removesuffix(".weight")
    return f"{PEFT_PREFIX}{module}.lora_{factor}.weight"


def _factor_sizes(cfg: ModelConfig, row_spec: WeightSpec):
    """``(in_dims, out_dims)`` of a row (our axes, HF group order), checked by
    ``lora.factor_axes`` to be our weight's input axes followed by its output axes."""
    lora_lib.factor_axes(row_spec.axes, row_spec.hf_axes)
    out_group, in_group = row_spec.hf_axes
    sizes = dict(zip(row_spec.axes, row_spec.shape(cfg)[1:]))
    return tuple(sizes[a] for a in in_group), tuple(sizes[a] for a in out_group)


def expected_tensors(cfg: ModelConfig, spec: lora_lib.LoraSpec) -> dict[str, tuple[int, ...]]:
    """PEFT tensor name -> torch shape of every tensor of ``spec``'s adapter on ``cfg``.

    Args:
      cfg: the base model's config.
      spec: the adapters.

    Returns:
      ``[r, in]`` for each ``lora_A`` and ``[out, r]`` for each ``lora_B``, in row then
      layer order, only for the layers each row covers.
    """
    row_specs = stacked_specs(cfg)
    out: dict[str, tuple[int, ...]] = {}
    for row in spec.rows:
        in_dims, out_dims = _factor_sizes(cfg, row_specs[row])
        for i in spec.layers(row):
            out[_peft_name(row_specs[row], i, "A")] = (spec.rank, int(np.prod(in_dims)))
            out[_peft_name(row_specs[row], i, "B")] = (int(np.prod(out_dims)), spec.rank)
    return out


def adapter_tensors(cfg: ModelConfig, spec: lora_lib.LoraSpec, adapters) -> dict[str, np.ndarray]:
    """Our stacked adapters -> PEFT-named tensors in torch layout.

    Args:
      cfg: the base model's config.
      spec: the adapters' LoraSpec.
      adapters: ``{"layers": {"q_lora_a": [L, *in_dims, r], "q_lora_b": [L, r, *out_dims],
        ...}}`` (numpy or jax arrays; an ``nnx.State`` converted with ``to_pure_dict``).

    Returns:
      ``{peft name: array}``: ``lora_A.weight`` ``[r, in]`` and ``lora_B.weight``
      ``[out, r]`` for each covered layer, in the arrays' dtype.

    Raises:
      ValueError: a row's factor is missing or has the wrong shape.
    """
    layers = adapters["layers"] if "layers" in adapters else adapters
    row_specs = stacked_specs(cfg)
    L, r = cfg.num_hidden_layers, spec.rank
    out: dict[str, np.ndarray] = {}
    for row in spec.rows:
        in_dims, out_dims = _factor_sizes(cfg, row_specs[row])
        factors = {}
        for part, want in (("a", (L, *in_dims, r)), ("b", (L, r, *out_dims))):
            key = f"{row}_lora_{part}"
            if key not in layers:
                raise ValueError(f"adapters lack {key!r} (the LoraSpec targets row {row!r})")
            arr = np.asarray(jax.device_get(layers[key]))
            if arr.shape != want:
                raise ValueError(f"adapters[{key!r}] has shape {arr.shape}, expected {want} "
                                 f"for rank {r} on this model")
            factors[part] = arr
        n_in, n_out = int(np.prod(in_dims)), int(np.prod(out_dims))
        for i in spec.layers(row):
            out[_peft_name(row_specs[row], i, "A")] = factors["a"][i].reshape(n_in, r).T
            out[_peft_name(row_specs[row], i, "B")] = factors["b"][i].reshape(r, n_out).T
    return out


def _module_regex(cover: Mapping[str, tuple[int, ...]]) -> str:
    """A regex PEFT full-matches against module paths, naming exactly the modules of
    ``cover`` (row -> layers): for covers whose rows differ in their layers, which a name
    list with one ``layers_to_transform`` cannot say."""
    parts = []
    for row, layer_ids in cover.items():
        layers = "|".join(str(i) for i in layer_ids)
        template = re.escape(lora_lib.HF_MODULES[row]).replace(re.escape("{i}"), "{i}")
        parts.append(template.replace("{i}", f"(?:{layers})"))
    return "|".join(parts)


def adapter_config(spec: lora_lib.LoraSpec, *, base_model_name_or_path: str = "") -> dict:
    """The ``adapter_config.json`` dict PEFT reads ``spec`` back from."""
    layer_sets = {spec.layers(row) for row in spec.rows}
    layers_to_transform = None
    if len(layer_sets) == 1:
        target_modules: Any = [lora_lib.ROW_TO_PEFT[row] for row in spec.rows]
        (layers,) = layer_sets
        if len(layers) != spec.num_layers:
            layers_to_transform = list(layers)
    else:
        target_modules = _module_regex(dict(spec.targets))
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": spec.rank,
        "lora_alpha": alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora,
        "target_modules": target_modules,
        "exclude_modules": None,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": "gaussian" if spec.init == "gaussian" else True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
    }


def write_adapter(folder: str, cfg: ModelConfig, spec: lora_lib.LoraSpec, adapters, *,
                  base_model_name_or_path: str = "", dtype: str | None = None) -> None:
    """Writes a PEFT LoRA folder (``PeftModel.from_pretrained`` loads it onto the base).

    The weights are written first and ``adapter_config.json`` last, each atomically
    through ``mio_jax.paths`` (so ``folder`` may be a ``gs://`` URL): a reader that finds
    the config finds the weights of the same write.

    Args:
      folder: output folder (created), local or remote.
      cfg: the base model's config.
      spec: the adapters' LoraSpec.
      adapters: ``{"layers": {"{row}_lora_a": ..., "{row}_lora_b": ...}}`` (see
        ``adapter_tensors``).
      base_model_name_or_path: recorded in the config (PEFT uses it to find the base).
      dtype: "float32" | "bfloat16" | "float16" to store the tensors in; None keeps the
        arrays' dtype.
    """
    if dtype is not None and dtype not in _STORE_DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {sorted(_STORE_DTYPES)}")
    tensors = adapter_tensors(cfg, spec, adapters)
    if dtype is not None:
        tensors = {n: a.astype(_STORE_DTYPES[dtype]) for n, a in tensors.items()}
    paths.makedirs(folder)
    with tempfile.TemporaryDirectory(prefix="mio_adapter_") as tmp:
        local = os.path.join(tmp, WEIGHTS_NAME)
        write_safetensors(local, tensors.items(), metadata={"format": "pt"})
        paths.upload(local, paths.join(folder, WEIGHTS_NAME))
    config = adapter_config(spec, base_model_name_or_path=base_model_name_or_path)
    paths.write_json(paths.join(folder, CONFIG_NAME), config, indent=2, sort_keys=True)


# ---- read ---------------------------------------------------------------------------------
def _neutral(value) -> bool:
    return value is None or value is False or value == "" or (
        isinstance(value, (list, tuple, dict, set)) and len(value) == 0)


def _check_options(peft: Mapping[str, Any], where: str) -> None:
    """Refuses every option of ``peft`` that would make the adapter compute something other
    than plain LoRA (any key we do not handle must hold its neutral value)."""
    if peft.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type={peft.get('peft_type')!r}; only 'LORA' adapters "
                         "are supported")
    if peft.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias={peft['bias']!r} (trained biases) is not supported; "
                         "only bias='none'")
    if peft.get("fan_in_fan_out"):
        raise ValueError(f"{where}: fan_in_fan_out=true (Conv1D-style [in, out] weights) is "
                         "not supported for this decoder")
    init = peft.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ValueError(f"{where}: init_lora_weights={init!r} rewrites the base weights when "
                         "the adapter is created, so the adapter does not apply to the "
                         "plain base model; convert it to a plain LoRA adapter first")
    if init not in _PLAIN_INITS:
        raise ValueError(f"{where}: unsupported init_lora_weights={init!r}")
    layers_pattern = peft.get("layers_pattern")
    if layers_pattern not in (None, "layers", ["layers"]):
        raise ValueError(f"{where}: layers_pattern={layers_pattern!r}; this decoder's layers "
                         "are 'model.layers'")
    named = {"use_dora": "DoRA (use_dora)", "modules_to_save": "modules_to_save",
             "rank_pattern": "per-module ranks (rank_pattern)",
             "alpha_pattern": "per-module alphas (alpha_pattern)"}
    for key, value in peft.items():
        if key in _HANDLED or _neutral(value):
            continue
        what = named.get(key, key)
        raise ValueError(f"{where}: {key}={value!r} is not supported ({what} changes what "
                         "the adapter computes; only plain LoRA adapters are read)")


def _target_names(target_modules, num_layers: int, where: str):
    """PEFT's ``target_modules`` as what ``lora.make_spec`` reads: PEFT module names, or
    a regex (kept as written, or built to name exactly the modules a list selects).

    A list entry selects every layer module whose path equals it or ends with ``.`` + it
    (PEFT's rule), so ``q_proj`` and ``self_attn.q_proj`` name the same row and
    ``layers.1.self_attn.q_proj`` one layer of it.
    """
    if target_modules is None:
        raise ValueError(f"{where}: target_modules is missing")
    if isinstance(target_modules, str):
        return target_modules
    picked: dict[str, set[int]] = {}
    for entry in target_modules:
        hit = False
        for row, template in lora_lib.HF_MODULES.items():
            for i in range(num_layers):
                path = template.format(i=i)
                if path == entry or path.endswith("." + entry):
                    picked.setdefault(row, set()).add(i)
                    hit = True
        if not hit:
            raise ValueError(f"{where}: target_modules entry {entry!r} names no linear module "
                             f"of the decoder's layers (supported: "
                             f"{list(lora_lib.PEFT_TARGETS)})")
    if all(len(layers) == num_layers for layers in picked.values()):
        return [lora_lib.ROW_TO_PEFT[row] for row in picked]
    return _module_regex({row: tuple(sorted(v)) for row, v in picked.items()})


def _normalised(name: str) -> str:
    """A tensor name in the canonical PEFT form: ``base_model.model.`` prefix, no
    adapter-name segment (``lora_A.default.weight`` -> ``lora_A.weight``)."""
    name = _ADAPTER_NAME.sub(r".\1.weight", name)
    return name if name.startswith(PEFT_PREFIX) else PEFT_PREFIX + name


def read_adapter(folder: str, cfg: ModelConfig, *, prefix: str = "model.lora."
                 ) -> tuple[lora_lib.LoraSpec, dict]:
    """Reads a PEFT LoRA folder for a base model of config ``cfg``.

    Args:
      folder: a folder (local or remote) with ``adapter_config.json`` and
        ``adapter_model.safetensors``.
      cfg: the base model's config (shapes and layer count come from it).
      prefix: the config section named in errors about the spec's fields
        (``lora.make_spec``).

    Returns:
      ``(spec, adapters)``: the LoraSpec and ``{"layers": {"{row}_lora_a": [L, *in, r],
      "{row}_lora_b": [L, r, *out]}}`` as float32 numpy, zero on uncovered layers.

    Raises:
      FileNotFoundError: no config or no safetensors weights.
      ValueError naming the file and key or tensor: a pickle-only folder, an unsupported
        option, a missing, unexpected or mis-shaped tensor.
    """
    cfg_path = paths.join(folder, CONFIG_NAME)
    weights_path = paths.join(folder, WEIGHTS_NAME)
    if not paths.exists(weights_path):
        pickles = [n for n in PICKLE_NAMES if paths.exists(paths.join(folder, n))]
        if pickles:
            raise ValueError(f"{folder}: holds only pickle adapter weights {pickles}; pickle "
                             f"files are never loaded (save the adapter as {WEIGHTS_NAME})")
        raise FileNotFoundError(f"{weights_path}: missing")
    if not paths.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (a PEFT adapter folder needs it)")
    try:
        peft = paths.read_json(cfg_path)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(peft, dict):
        raise ValueError(f"{cfg_path}: not a JSON object")
    _check_options(peft, cfg_path)
    for key in ("r", "lora_alpha"):
        if key not in peft:
            raise ValueError(f"{cfg_path}: lacks required key {key!r}")
    targets = _target_names(peft.get("target_modules"), cfg.num_hidden_layers, cfg_path)
    layers = peft.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    init = "gaussian" if peft.get("init_lora_weights") == "gaussian" else "default"
    try:
        spec = lora_lib.make_spec(
            rank=peft["r"], alpha=peft["lora_alpha"], target_modules=targets,
            num_layers=cfg.num_hidden_layers, layers_to_transform=layers,
            dropout=float(peft.get("lora_dropout") or 0.0),
            use_rslora=bool(peft.get("use_rslora", False)), init=init, prefix=prefix,
            rows=tuple(linear_specs(cfg)))
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None

    st = SafetensorsFile(paths.local_copy(weights_path))
    found: dict[str, str] = {}  # canonical name -> name in the file
    for name in st.keys():
        canon = _normalised(name)
        if canon in found:
            raise ValueError(f"{weights_path}: tensors {found[canon]!r} and {name!r} are the "
                             "same adapter tensor")
        found[canon] = name
    expected = expected_tensors(cfg, spec)
    check_tensors(expected, {c: st.shape(n) for c, n in found.items()}, origin=weights_path,
                  model_type=cfg.model_type, implied_by=f"{CONFIG_NAME} and the base config",
                  describe=lambda c: f"{weights_path}: tensor {found[c]!r}")

    row_specs = stacked_specs(cfg)
    L, r = cfg.num_hidden_layers, spec.rank
    out: dict[str, np.ndarray] = {}
    for row in spec.rows:
        in_dims, out_dims = _factor_sizes(cfg, row_specs[row])
        a = np.zeros((L, *in_dims, r), np.float32)
        b = np.zeros((L, r, *out_dims), np.float32)
        for i in spec.layers(row):
            a_hf = np.asarray(st.get(found[_peft_name(row_specs[row], i, "A")]), np.float32)
            b_hf = np.asarray(st.get(found[_peft_name(row_specs[row], i, "B")]), np.float32)
            a[i] = a_hf.T.reshape(*in_dims, r)
            b[i] = b_hf.T.reshape(r, *out_dims)
        out[f"{row}_lora_a"], out[f"{row}_lora_b"] = a, b
    return spec, {"layers": out}


# ---- merge --------------------------------------------------------------------------------
def merge_adapters(params: Mapping, spec: lora_lib.LoraSpec, adapters) -> dict:
    """Base params with each adapter merged into its weight (``lora.merged_weight``).

    Args:
      params: the base model's pure dict, ``{"layers": {"q": [L, D, H, hd], ...}, ...}``
        (``nnx.to_pure_dict`` of ``nnx.state(model, nnx.Param)``).
      spec: the adapters' LoraSpec.
      adapters: ``{"layers": {"{row}_lora_a": ..., "{row}_lora_b": ...}}``.

    Returns:
      A dict like ``params`` (unchanged leaves shared) whose adapted rows are
      ``w + scale * A @ B`` on the covered layers, computed in float32 and cast to each
      weight's dtype; adapter entries in ``params["layers"]``, if any, are dropped, so the
      result loads into a model without adapters.
    """
    ad = adapters["layers"] if "layers" in adapters else adapters
    layers = {k: v for k, v in params["layers"].items()
              if not k.endswith(("_lora_a", "_lora_b"))}
    for row in spec.rows:
        if hasattr(layers[row], "dequantize"):
            raise ValueError(f"cannot merge an adapter into the quantized weight {row!r}; merge "
                             "into the base before quantizing it")
        mask = spec.layer_mask(row) if spec.partial(row) else None
        layers[row] = lora_lib.merged_weight(layers[row], ad[f"{row}_lora_a"],
                                             ad[f"{row}_lora_b"], spec.scale, mask)
    return {**params, "layers": layers}
