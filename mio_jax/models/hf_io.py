"""Hugging Face checkpoints <-> Decoder: safetensors folders (and GGUF via gguf_io) in, out.

One loading path consumes `(config.json dict, tensor source)` whatever the file format.
With a mesh the model is built abstractly and every parameter is created already sharded
by `jax.make_array_from_callback`; each device's callback reads only the layer tensors it
needs from the memory-mapped file, so the checkpoint never sits whole in host memory.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterable

import jax
import numpy as np
from flax import nnx

from mio_jax.models.config import ModelConfig
from mio_jax.models.llama import Decoder
from mio_jax.models.partitioning import Rules, state_shardings
from mio_jax.models.safetensors_file import SafetensorsFile, write_safetensors

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---- name and layout mapping --------------------------------------------------------------
def _layer_table(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """Our stacked name -> (HF suffix under model.layers.N., HF shape, HF is [out, in])."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    t = {
        "attn_norm": ("input_layernorm.weight", (D,), False),
        "q": ("self_attn.q_proj.weight", (H * hd, D), True),
        "k": ("self_attn.k_proj.weight", (KV * hd, D), True),
        "v": ("self_attn.v_proj.weight", (KV * hd, D), True),
        "o": ("self_attn.o_proj.weight", (D, H * hd), True),
        "mlp_norm": ("post_attention_layernorm.weight", (D,), False),
        "gate": ("mlp.gate_proj.weight", (F, D), True),
        "up": ("mlp.up_proj.weight", (F, D), True),
        "down": ("mlp.down_proj.weight", (D, F), True),
        "q_bias": ("self_attn.q_proj.bias", (H * hd,), False),
        "k_bias": ("self_attn.k_proj.bias", (KV * hd,), False),
        "v_bias": ("self_attn.v_proj.bias", (KV * hd,), False),
        "o_bias": ("self_attn.o_proj.bias", (D,), False),
        "gate_bias": ("mlp.gate_proj.bias", (F,), False),
        "up_bias": ("mlp.up_proj.bias", (F,), False),
        "down_bias": ("mlp.down_proj.bias", (D,), False),
        "q_norm": ("self_attn.q_norm.weight", (hd,), False),
        "k_norm": ("self_attn.k_norm.weight", (hd,), False),
    }
    return t


def hf_tensor_map(cfg: ModelConfig) -> dict[tuple[str, ...], list[tuple[str, tuple, bool]]]:
    """Our parameter path -> per-layer list of (HF name, HF shape, transposed) (one entry if
    the parameter is not stacked)."""
    V, D = cfg.vocab_size, cfg.hidden_size
    from mio_jax.models.llama import layer_param_specs

    table = _layer_table(cfg)
    out: dict[tuple[str, ...], list] = {
        ("embed",): [("model.embed_tokens.weight", (V, D), False)],
        ("final_norm",): [("model.norm.weight", (D,), False)],
    }
    if not cfg.tie_word_embeddings:
        out[("lm_head",)] = [("lm_head.weight", (V, D), False)]
    for name in layer_param_specs(cfg):
        suffix, shape, transposed = table[name]
        out[("layers", name)] = [(f"model.layers.{i}.{suffix}", shape, transposed)
                                 for i in range(cfg.num_hidden_layers)]
    return out


def _to_ours(arr: np.ndarray, transposed: bool, shape: tuple[int, ...]) -> np.ndarray:
    return (arr.T if transposed else arr).reshape(shape)


def _to_hf(arr: np.ndarray, transposed: bool, hf_shape: tuple[int, ...]) -> np.ndarray:
    if transposed:
        return arr.reshape(hf_shape[1], hf_shape[0]).T
    return arr.reshape(hf_shape)


# ---- tensor sources -------------------------------------------------------------------------
class _SafetensorsSource:
    """Names -> lazily read arrays over the safetensors files of an HF folder."""

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


class _DictSource:
    """Names -> arrays already in memory (e.g. dequantised GGUF tensors)."""

    def __init__(self, tensors: Iterable[tuple[str, np.ndarray]], origin: str):
        self.tensors = dict(tensors)
        self.origin = origin

    def keys(self):
        return self.tensors.keys()

    def describe(self, name: str) -> str:
        return f"{self.origin}: tensor {name!r}"

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(np.shape(self.tensors[name]))

    def get(self, name: str) -> np.ndarray:
        arr = np.asarray(self.tensors[name])
        if arr.dtype.kind != "f":
            raise ValueError(f"{self.describe(name)} has unsupported dtype {arr.dtype}")
        return arr


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


def _open(path: str):
    """-> (config dict, tensor source) for an HF folder or a .gguf file."""
    path = os.fspath(path)
    if _is_gguf(path):
        from mio_jax.models.gguf_io import read_gguf  # lazy: optional reader

        hf_cfg, tensors = read_gguf(path)
        return hf_cfg, _DictSource(tensors, path)
    return _folder_config(path), _SafetensorsSource(path)


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
    """
    path = os.fspath(path)
    if _is_gguf(path):
        from mio_jax.models.gguf_io import gguf_config

        return ModelConfig.from_hf(gguf_config(path), **overrides)
    return ModelConfig.from_hf(_folder_config(path), **overrides)


# ---- load ---------------------------------------------------------------------------------
def _check_names(tmap, source, cfg: ModelConfig, origin: str) -> None:
    expected = {hf for entries in tmap.values() for hf, _, _ in entries}
    present = set(source.keys())
    missing = sorted(expected - present)
    if missing:
        raise ValueError(f"{origin}: missing tensor(s) {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)} in all)")
    allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(n for n in present - expected - allowed_extra
                        if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"{origin}: unexpected tensor(s) {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} for model_type "
                         f"{cfg.model_type!r} ({len(unexpected)} in all)")
    for entries in tmap.values():
        for hf, shape, _ in entries:
            got = tuple(source.shape(hf))
            if got != tuple(shape):
                raise ValueError(f"{source.describe(hf)} has shape {got}, but config.json "
                                 f"implies {tuple(shape)}")


def _make_param(entries, source, shape, dtype, sharding, stacked: bool) -> jax.Array:
    def read(i):
        hf, hf_shape, transposed = entries[i]
        return _to_ours(source.get(hf), transposed, shape[1:] if stacked else shape)

    def callback(index):
        if not stacked:
            return np.asarray(read(0)[index], dtype=dtype)
        layers = range(shape[0])[index[0]]
        return np.stack([np.asarray(read(i)[index[1:]], dtype=dtype) for i in layers])

    return jax.make_array_from_callback(shape, sharding, callback)


def load_pretrained(path: str, *, dtype: str = "float32", mesh=None, rules: Rules | None = None,
                    param_dtype: str | None = None, **config_overrides) -> Decoder:
    """Loads a Decoder from an HF folder (config.json + *.safetensors [+ index]) or `.gguf`.

    Args:
      path: folder or `.gguf` file. Pickle checkpoints (`.bin`, `.pt`) are refused.
      dtype: compute dtype ("float32" | "bfloat16"); also the parameter dtype unless
        `param_dtype` is given.
      mesh: optional jax.sharding.Mesh; parameters are created sharded on it by `rules`.
      rules: logical->mesh rules (None -> DEFAULT_RULES).
      param_dtype: storage dtype of the parameters (default: `dtype`).
      **config_overrides: ModelConfig fields, e.g. scan_layers=False, remat_policy="full".
    Returns:
      Decoder with the checkpoint's weights. Errors name the file and tensor.
    """
    hf_cfg, source = _open(path)
    origin = os.fspath(path)
    cfg = ModelConfig.from_hf(hf_cfg, dtype=dtype, param_dtype=param_dtype or dtype,
                              **config_overrides)
    tmap = hf_tensor_map(cfg)
    _check_names(tmap, source, cfg, origin)
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), rules=rules))
    graphdef, state = nnx.split(abstract)
    if mesh is not None:
        shardings = state_shardings(state, mesh, rules)
    else:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: single, state)
    flat_sh = dict(nnx.to_flat_state(shardings))
    flat = nnx.to_flat_state(state)
    np_dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))
    for key, var in flat:
        entries = tmap[tuple(key)]
        shape = var.get_value().shape
        sharding = flat_sh[key]
        sharding = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
        var.set_value(_make_param(entries, source, shape, np_dtype, sharding,
                                  stacked=key[0] == "layers"))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---- save ---------------------------------------------------------------------------------
def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def hf_state_dict(model: Decoder) -> Iterable[tuple[str, np.ndarray]]:
    """Yields (HF name, numpy array) for every weight, in HF layout and the params' dtype."""
    cfg = model.cfg
    tmap = hf_tensor_map(cfg)
    for key, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        entries = tmap[tuple(key)]
        arr = np.asarray(jax.device_get(var.get_value()))
        if key[0] == "layers":
            for i, (hf, hf_shape, transposed) in enumerate(entries):
                yield hf, _to_hf(arr[i], transposed, hf_shape)
        else:
            hf, hf_shape, transposed = entries[0]
            yield hf, _to_hf(arr, transposed, hf_shape)


def save_pretrained(model: Decoder, tokenizer, path: str, *, max_shard_size="2GB") -> None:
    """Writes an HF folder: safetensors (sharded above `max_shard_size`, with
    model.safetensors.index.json), config.json, generation_config.json and, when
    `tokenizer` is given, its files (chat template included).

    Args:
      model: Decoder.
      tokenizer: transformers tokenizer or None.
      path: output folder (created).
      max_shard_size: int bytes or a string such as "2GB" / "500MB".
    """
    os.makedirs(path, exist_ok=True)
    limit = _parse_size(max_shard_size)
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    total = 0
    for name, arr in hf_state_dict(model):
        if shards[-1] and size + arr.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, arr))
        size += arr.nbytes
        total += arr.nbytes
    for stale in glob.glob(os.path.join(path, "model*.safetensors")):
        os.remove(stale)
    if len(shards) == 1:
        write_safetensors(os.path.join(path, "model.safetensors"), shards[0])
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index_path):
            os.remove(index_path)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, fname), shard)
            weight_map.update({n: fname for n, _ in shard})
        with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg = model.cfg
    hf = cfg.to_hf()
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    gen = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"],
           "pad_token_id": hf["pad_token_id"]}
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
