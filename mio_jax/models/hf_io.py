"""Hugging Face checkpoints <-> Decoder: safetensors folders (and GGUF via gguf_io) in, out.

One loading path consumes `(config.json dict, tensor source)` whatever the file format;
the weight table (`mio_jax.models.weights`) says which tensors a config implies, their
shapes and how each maps onto a parameter. The model is built abstractly and every
parameter is created already placed (sharded with a mesh) by
`jax.make_array_from_callback`. From safetensors each device's callback reads only the
slices it needs from the memory-mapped file, so the checkpoint never sits whole in host
memory; GGUF tensors, which must be decoded whole, are dequantised one at a time into
one parameter's host buffer, which is dropped once placed.

One writer, `write_hf_folder`, streams HF-named tensors into safetensors shards plus
config, generation config and tokenizer; `save_pretrained` feeds it a model's weights
and `mio_jax.convert` a GGUF file's.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import ml_dtypes
from absl import logging
import numpy as np
from flax import nnx

from mio_jax import paths
from mio_jax.models.config import ModelConfig
from mio_jax.models.embedded import smollm2_gguf_path
from mio_jax.models.llama import Decoder, adapter_rows
from mio_jax.models.lora import init_factors
from mio_jax.sharding import Rules, state_shardings
from mio_jax.models.safetensors_file import SafetensorsFile, write_safetensors
from mio_jax.models.weights import (WeightSpec, check_tensors, hf_shapes, linear_specs,
                                    weight_specs)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---- tensor sources -------------------------------------------------------------------------
# A tensor source maps HF names to arrays in HF layout: `keys()`, `shape(name)`,
# `describe(name)` ("file: tensor 'name'", for errors), `get(name)`, and
# `whole_tensor_reads` (True when `get` decodes a whole tensor however little of it is
# used, as for GGUF). `gguf_io.GGUFTensors` is the other one.
class _SafetensorsSource:
    """Names -> lazily read arrays over the safetensors files of an HF folder."""

    # get() returns a memory-map view: slicing it reads only the bytes of the slice.
    whole_tensor_reads = False

    def __init__(self, folder: str):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            pickles = [p for p in os.listdir(folder) if p.endswith(_PICKLE_SUFFIXES)]
            hint = (f" (found pickle checkpoint(s) {pickles}: these are never loaded; convert "
                    "them to safetensors)") if pickles else ""
            raise FileNotFoundError(f"{folder}: no *.safetensors weights{hint}")
        self.where: dict[str, SafetensorsFile] = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: listed in {index} but missing")
            st = SafetensorsFile(path)
            for key in st.keys():
                self.where[key] = st

    def keys(self):
        return self.where.keys()

    def describe(self, name: str) -> str:
        return f"{self.where[name].path}: tensor {name!r}"

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.where[name].get(name)


class _PrefixedSource:
    """The tensors of `source` under `prefix`, named without it (a multimodal checkpoint's
    language model); the others (a vision tower, a projector) are not seen."""

    def __init__(self, source, prefix: str):
        self.source = source
        self.whole_tensor_reads = source.whole_tensor_reads
        self.names = {k[len(prefix):]: k for k in source.keys() if k.startswith(prefix)}

    def keys(self):
        return self.names.keys()

    def describe(self, name: str) -> str:
        return self.source.describe(self.names[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self.names[name])

    def get(self, name: str) -> np.ndarray:
        return self.source.get(self.names[name])


# The prefix of a multimodal checkpoint's language-model tensors (config.MULTIMODAL).
LANGUAGE_MODEL_PREFIX = {"gemma3": "language_model."}


def _is_gguf(path: str) -> bool:
    """True for a `.gguf` file, False for a folder; pickle files and missing GGUFs raise."""
    if path.endswith(_PICKLE_SUFFIXES):
        raise ValueError(f"{path}: refusing to load a pickle checkpoint; only safetensors "
                         "folders and .gguf files are supported")
    if path.endswith(".gguf"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: GGUF file not found")
        return True
    return False


def _local_path(path) -> str:
    """`path` as a local path string: "smollm2" stands for the embedded GGUF, and a URL
    (`gs://...`) for its copy staged on local disk (`mio_jax.paths.local_copy`)."""
    path = os.fspath(path)
    if path == "smollm2":

        return smollm2_gguf_path()
    if paths.is_remote(path):
        if not paths.exists(path):
            raise FileNotFoundError(f"{path}: not found")
        return paths.local_copy(path)
    return path


def _open(path: str):
    """-> (config dict, tensor source) for an HF folder or a .gguf file."""
    if _is_gguf(path):
        from mio_jax.models.gguf_io import GGUFTensors  # lazy: the gguf package

        tensors = GGUFTensors(path)
        return tensors.config, tensors
    hf_cfg = _folder_config(path)
    source = _SafetensorsSource(path)
    prefix = LANGUAGE_MODEL_PREFIX.get(hf_cfg.get("model_type"), "")
    if prefix and "text_config" in hf_cfg:
        logging.info("%s: a multimodal checkpoint; its language model (%s*) is read as a "
                     "text decoder, the other tensors are not loaded", path, prefix)
        source = _PrefixedSource(source, prefix)
    return hf_cfg, source


def _folder_config(path: str) -> dict[str, Any]:
    """config.json of an HF folder, with generation_config.json's extra EOS ids merged."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a checkpoint folder or .gguf file")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (a Hugging Face folder needs config.json)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf_cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.exists(gen_path):
        # Chat models often list extra end-of-turn ids (e.g. <|eot_id|>) only here.
        try:
            with open(gen_path, encoding="utf-8") as f:
                gen_eos = json.load(f).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ValueError(f"{gen_path}: invalid JSON ({e})") from None
        ids = []
        for value in (hf_cfg.get("eos_token_id"), gen_eos):
            for i in (value if isinstance(value, list) else [value]):
                if i is not None and i not in ids:
                    ids.append(i)
        if ids:
            hf_cfg = dict(hf_cfg, eos_token_id=ids if len(ids) > 1 else ids[0])
    return hf_cfg


def read_model_config(path: str, **overrides) -> ModelConfig:
    """The ModelConfig of an HF folder or `.gguf` file without reading any weights.

    Args:
      path: as for `load_pretrained`.
      **overrides: ModelConfig fields (dtype, param_dtype, remat_policy, ...).

    Returns:
      The ModelConfig; `Decoder(cfg)` then has the parameters the weight table lists
      for it, which is what a checkpoint of this model holds.
    """
    path = _local_path(path)
    if _is_gguf(path):
        from mio_jax.models.gguf_io import gguf_config  # lazy: the gguf package

        return ModelConfig.from_hf(gguf_config(path), **overrides)
    return ModelConfig.from_hf(_folder_config(path), **overrides)


# ---- load ---------------------------------------------------------------------------------
def _check_source(cfg: ModelConfig, source, origin: str) -> None:
    """The source holds exactly the tensors the table lists for `cfg`, in their shapes."""
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()  # tied: often saved
    check_tensors(hf_shapes(cfg), {n: tuple(source.shape(n)) for n in source.keys()},
                  origin=origin, model_type=cfg.model_type, implied_by="config.json",
                  describe=source.describe,
                  may_skip=lambda n: n in ignored or n.endswith(_IGNORED_SUFFIXES))


@functools.partial(jax.jit, donate_argnums=0)
def _set_at(stack, value, lead):
    """`stack` with the part at the leading indices `lead` (a layer, or a layer's expert)
    replaced by `value`, written in place (donated)."""
    start = tuple(lead) + (0,) * value.ndim
    return jax.lax.dynamic_update_slice(stack, value[(None,) * len(lead)], start)


def _place(spec: WeightSpec, cfg: ModelConfig, source, shape, dtype, sharding) -> jax.Array:
    """Parameter `spec` read from `source` (HF layout) and created with `sharding`."""
    names = dict(zip(spec.hf_index(cfg), spec.hf_names(cfg)))

    def part(lead: tuple) -> np.ndarray:  # one HF tensor in our layout (a view where possible)
        return spec.from_hf(source.get(names[lead]), cfg)

    if source.whole_tensor_reads:
        # Decode each tensor once (per-device callbacks would decode it once per device)
        # and put it on the device before decoding the next; a stacked parameter is
        # filled in place, tensor by tensor, so no host copy of it is ever built.
        if not spec.stacked:
            value = np.asarray(part(()), dtype=dtype)
            return jax.make_array_from_callback(shape, sharding, lambda index: value[index])
        stack = jax.numpy.zeros(shape, dtype, device=sharding)
        for lead in names:
            stack = _set_at(stack, np.asarray(part(lead), dtype=dtype), lead)
        return stack

    def callback(index):  # only this device's slice is read from the memory map
        n = len(next(iter(names)))  # leading axes indexed by tensor: 0, 1 or 2
        if n == 0:
            return np.asarray(part(())[index], dtype=dtype)

        def block(lead):  # the slice of the leading axes from len(lead) on
            if len(lead) == n:
                return np.asarray(part(lead)[index[n:]], dtype=dtype)
            return np.stack([block(lead + (i,)) for i in range(shape[len(lead)])[index[len(lead)]]])

        return block(())

    return jax.make_array_from_callback(shape, sharding, callback)


def load_pretrained(path: str, *, dtype: str = "float32", mesh=None, rules: Rules | None = None,
                    param_dtype: str | None = None, lora_seed: int = 0,
                    keep_quantized: bool = False, **config_overrides) -> Decoder:
    """Loads a Decoder from an HF folder (config.json + *.safetensors [+ index]) or `.gguf`.

    Args:
      path: folder, `.gguf` file, or "smollm2" (the embedded SmolLM2 GGUF). Pickle
        checkpoints (`.bin`, `.pt`) are refused. A multimodal Gemma 3 folder
        (`Gemma3ForConditionalGeneration`) gives its language model (the vision tower is
        not loaded; `save_pretrained` then writes a text-only `Gemma3ForCausalLM`).
      dtype: compute dtype ("float32" | "bfloat16"); also the parameter dtype unless
        `param_dtype` is given.
      mesh: optional jax.sharding.Mesh; parameters are created sharded on it by `rules`.
      rules: logical->mesh rules (None -> DEFAULT_RULES).
      param_dtype: storage dtype of the parameters (default: `dtype`).
      lora_seed: seed of the LoRA factors' init (with `lora=` in the overrides).
      keep_quantized: for a `.gguf` source, keep the linear weights' quantized blocks as
        the file has them (`mio_jax.models.quant.QuantizedWeight`, dequantized one layer
        at a time in the forward) wherever every layer of a row has one type the forward
        decodes; other rows are dequantized as usual.
      **config_overrides: ModelConfig fields, e.g. scan_layers=False, remat_policy="full",
        lora=LoraSpec(...) (adapters initialised so that their update is exactly zero).
    Returns:
      Decoder with the checkpoint's weights. Errors name the file and tensor.
    """
    path = _local_path(path)
    hf_cfg, source = _open(path)
    cfg = ModelConfig.from_hf(hf_cfg, dtype=dtype, param_dtype=param_dtype or dtype,
                              **config_overrides)
    _check_source(cfg, source, path)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), rules=rules))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shardings = state_shardings(state, mesh, rules)
    else:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, state)
    flat_sh = dict(nnx.to_flat_state(shardings))
    flat = dict(nnx.to_flat_state(state))
    np_dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    blocks = _quantized_rows(cfg, source) if keep_quantized else {}
    for spec in weight_specs(cfg):
        var = flat[spec.path]
        if spec.path[-1] in blocks:
            from mio_jax.models import quant  # lazy: gguf and qwix, for quantized bases only

            var.set_value(quant.place_quantized(blocks[spec.path[-1]](), spec, mesh, rules))
            continue
        shape = var.get_value().shape
        if shape != spec.shape(cfg):  # the Decoder is built from the same table
            raise AssertionError(f"{spec.path}: model has {shape}, table {spec.shape(cfg)}")
        sharding = flat_sh[spec.path]
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        var.set_value(_place(spec, cfg, source, shape, np_dtype, sharding))
    _init_adapters(cfg, flat, flat_sh, lora_seed)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _quantized_rows(cfg: ModelConfig, source) -> dict:
    """Row name -> a function building its `QuantizedWeight` from the GGUF blocks, for the
    stacked linear rows whose layers all share one type the forward decodes."""
    from mio_jax.models import quant  # lazy: gguf and qwix, for quantized bases only

    if not hasattr(source, "raw_blocks"):
        raise ValueError("keep_quantized needs a .gguf model (an HF folder holds no blocks)")
    rows = {}
    for name, spec in linear_specs(cfg).items():
        kinds = {source.kind(n) for n in spec.hf_names(cfg)}
        if len(kinds) != 1 or next(iter(kinds)) not in quant.GGUF_IN_STEP:
            logging.warning("%s: %s has block types %s; dequantized at load instead",
                            source.path, name, sorted(kinds))
            continue
        kind = next(iter(kinds))
        in_features = spec.hf_shape(cfg)[1]

        def build(spec=spec, kind=kind, in_features=in_features):
            fields = quant.stack_fields([quant.from_gguf(source.raw_blocks(n), kind, in_features)
                                         for n in spec.hf_names(cfg)])
            return quant.QuantizedWeight(fields={k: jax.numpy.asarray(v) for k, v in fields.items()},
                                         kind=kind, in_features=in_features)
        rows[name] = build
    return rows


def _init_adapters(cfg: ModelConfig, flat, flat_sh, seed: int) -> None:
    """Creates the LoRA factors of `cfg.lora` in place of their abstract values, each
    directly with its sharding (A per the init option, B zeros)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), max(len(cfg.lora.rows), 1)) \
        if cfg.lora is not None else []
    for key, (row, _, (a_shape, b_shape)) in zip(keys, adapter_rows(cfg)):
        paths_ab = (("layers", f"{row}_lora_a"), ("layers", f"{row}_lora_b"))
        shard = tuple(flat_sh[p].get_value() if isinstance(flat_sh[p], nnx.Variable)
                      else flat_sh[p] for p in paths_ab)
        a, b = jax.jit(lambda k: init_factors(k, a_shape, b_shape, cfg.lora, cfg.param_dtype),
                       out_shardings=shard)(key)
        flat[paths_ab[0]].set_value(a)
        flat[paths_ab[1]].set_value(b)


# ---- save ---------------------------------------------------------------------------------
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_STORE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}


def parse_size(size: str | int) -> int:
    """Bytes in a size: an int, or a string such as "2GB", "500MiB", "1.5 GB", "1000000".

    KB/MB/GB/TB are powers of 10 and KiB/MiB/GiB/TiB powers of 2 (transformers'
    convention for `max_shard_size`); case does not matter.

    Args:
      size: int bytes, or a number with an optional unit (B, KB, ..., TiB).

    Returns:
      The size in bytes (> 0).

    Raises:
      ValueError: unreadable or not positive.
    """
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"cannot read size {size!r} (e.g. 2GB, 500MiB, 1000000)")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def hf_state_dict(model: Decoder) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, numpy array) for every weight, in HF layout and the params' dtype.

    One parameter is fetched to the host at a time, in weight-table order.
    """
    cfg = model.cfg
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for spec in weight_specs(cfg):
        arr = np.asarray(jax.device_get(params[spec.path].get_value()))
        for lead, name in zip(spec.hf_index(cfg), spec.hf_names(cfg)):
            yield name, spec.to_hf(arr[lead])


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _write_json(path: str, value: dict, **kwargs) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, **kwargs)


def write_hf_folder(config: dict[str, Any], tensors: Iterable[tuple[str, np.ndarray]], tokenizer,
                    dst: str, *, dtype: str | None = None, max_shard_size: str | int = "2GB"
                    ) -> list[str]:
    """Writes an HF model folder from a config dict and a stream of HF-named tensors.

    Each shard is written as soon as it is full, so at most one shard's tensors are held.
    The folder gets `*.safetensors` (one `model.safetensors`, or
    `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json` above
    `max_shard_size`), `config.json`, `generation_config.json` and, with a tokenizer,
    its files (chat template included). Model files already in `dst` are replaced.

    Args:
      config: HF `config.json` dict (`ModelConfig.to_hf()`, or `read_gguf`'s).
      tensors: iterable of `(hf_name, array)`, e.g. `hf_state_dict(model)`.
      tokenizer: a transformers tokenizer (its `save_pretrained` is called), or None.
      dst: output folder (created), local or a URL such as `gs://bucket/model`: then the
        folder is written on local disk first and each file uploaded (the weights first,
        `config.json` last).
      dtype: "float32" | "bfloat16" | "float16" to store every tensor in (and record as
        `torch_dtype`); None keeps each array's dtype and the config's `torch_dtype`.
      max_shard_size: largest shard, int bytes or a string such as "2GB" / "500MiB".

    Returns:
      The names of the safetensors files written.
    """
    if dtype is not None and dtype not in _STORE_DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {sorted(_STORE_DTYPES)}")
    limit = parse_size(max_shard_size)
    if paths.is_remote(dst):
        return _write_remote_hf_folder(config, tensors, tokenizer, paths.resolve(dst),
                                       dtype=dtype, max_shard_size=limit)
    os.makedirs(dst, exist_ok=True)
    temp: list[str] = []  # shards under temporary names until all are written
    shard: list[tuple[str, np.ndarray]] = []
    shard_of: dict[str, int] = {}
    size = total = 0

    def flush():
        name = f"model-shard-{len(temp):05d}.tmp.safetensors"
        write_safetensors(os.path.join(dst, name), shard, metadata={"format": "pt"})
        temp.append(name)
        shard.clear()

    for name, array in tensors:
        array = np.asarray(array)
        if dtype is not None:
            array = array.astype(_STORE_DTYPES[dtype], copy=False)
        if name in shard_of:
            raise ValueError(f"tensor {name!r} given twice")
        if shard and size + array.nbytes > limit:
            flush()
            size = 0
        shard.append((name, array))
        shard_of[name] = len(temp)
        size += array.nbytes
        total += array.nbytes
    if not shard_of:
        raise ValueError("no tensors to write")
    flush()
    final = _shard_names(len(temp))
    for old in os.listdir(dst):
        stale = old.startswith("model") and old.endswith(".safetensors") and old not in temp
        if stale or old == "model.safetensors.index.json":
            os.remove(os.path.join(dst, old))
    for tmp, name in zip(temp, final):
        os.replace(os.path.join(dst, tmp), os.path.join(dst, name))
    if len(final) > 1:
        weight_map = {n: final[k] for n, k in sorted(shard_of.items())}
        _write_json(os.path.join(dst, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    config = dict(config)
    if dtype is not None:
        config["torch_dtype"] = dtype
        if "dtype" in config:  # transformers 5 reads this key
            config["dtype"] = dtype
    _write_json(os.path.join(dst, "config.json"), config, sort_keys=True)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if config.get(k) is not None}
    _write_json(os.path.join(dst, "generation_config.json"), generation)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
    return final


def _write_remote_hf_folder(config, tensors, tokenizer, dst: str, *, dtype, max_shard_size
                            ) -> list[str]:
    """`write_hf_folder` to a URL: the folder is written in a local temporary folder, then
    each file is uploaded (the config last, so a reader that finds it finds the weights);
    model files of an earlier export that this one does not write are deleted."""
    with tempfile.TemporaryDirectory(prefix="mio_hf_export_") as local:
        final = write_hf_folder(config, tensors, tokenizer, local, dtype=dtype,
                                max_shard_size=max_shard_size)
        names = sorted(os.listdir(local))
        if paths.isdir(dst):
            for old in paths.listdir(dst):
                stale = old.startswith("model") and old.endswith(".safetensors")
                if (stale or old == "model.safetensors.index.json") and old not in names:
                    paths.as_path(paths.join(dst, old)).unlink()
        last = ("config.json",)
        for name in [n for n in names if n not in last] + [n for n in last if n in names]:
            source = os.path.join(local, name)
            if os.path.isdir(source):  # a tokenizer's sub-folder, if any
                for root, _, files in os.walk(source):
                    for f in files:
                        rel = os.path.relpath(os.path.join(root, f), local)
                        paths.upload(os.path.join(root, f), paths.join(dst, *rel.split(os.sep)))
            else:
                paths.upload(source, paths.join(dst, name))
    return final


def save_pretrained(model: Decoder, tokenizer, path: str, *, max_shard_size: str | int = "2GB",
                    dtype: str | None = None) -> list[str]:
    """Writes a model as an HF folder that transformers and `load_pretrained` read back.

    Args:
      model: Decoder.
      tokenizer: transformers tokenizer or None.
      path: output folder (created), local or a URL such as `gs://bucket/model`.
      max_shard_size: int bytes or a string such as "2GB" / "500MiB" (see `parse_size`).
      dtype: stored dtype ("float32" | "bfloat16" | "float16"); None = the params' dtype.

    Returns:
      The names of the safetensors files written.
    """
    return write_hf_folder(model.cfg.to_hf(), hf_state_dict(model), tokenizer, path,
                           dtype=dtype, max_shard_size=max_shard_size)
