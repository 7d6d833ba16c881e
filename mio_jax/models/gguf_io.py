"""Reading llama.cpp GGUF files as a Hugging Face config dict plus HF-named tensors.

`read_gguf(path)` returns what an HF folder would hold: the `config.json` dict and
an iterator of `(hf_name, float32 array)` in HF names and HF layout (`[out, in]`
for linear weights), dequantised one tensor at a time so a whole model never has
to sit in memory dequantised; `GGUFTensors` gives the same tensors by name, for the
weight loader (`mio_jax.models.hf_io`), which maps HF names to the nnx model, so GGUF
and safetensors share one loader. GGUF names, expected shapes and which rows
llama.cpp permutes all come from the weight table (`mio_jax.models.weights`).

Two llama.cpp conventions are undone here:
- GGUF lists dims in ggml `ne` order (fastest first); the numpy shape is the
  reverse, which for a linear weight is already HF's `[out, in]`.
- `convert_hf_to_gguf.py` permutes the rows of the Llama q and k projections
  (interleaved rotary halves -> per-head pairs); `unpermute_rows` inverts it.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Iterator
from typing import Any

import gguf
import numpy as np

from mio_jax import paths
from mio_jax.models.config import ModelConfig
from mio_jax.models.weights import check_tensors, gguf_lookup, gguf_shapes, hf_name_of_gguf

_GGUF_MAGIC = b"GGUF"

# Tensor types this reader dequantises. The first eight round-trip through
# gguf.quants in the tests; the K-quants use gguf's numpy dequantiser (gguf has
# no quantiser for them, so the tests only check that our reshaping is right).
_T = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset(
    {
        _T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1,
        _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K,
    }
)

# GGUF architecture -> (HF class, HF model_type, q/k rows permuted by llama.cpp).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}

@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's entry in a GGUF file: `shape` in numpy order (reversed ggml `ne`),
    `offset`/`n_bytes` the absolute byte range of its data."""

    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    n_bytes: int


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: metadata, tensor table and the memory-mapped bytes."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    data: np.memmap


# GGUF value types (gguf.GGUFValueType): scalars by struct format; 8 string, 9 array.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reads from a buffer; struct.error on reading past its end."""

    def __init__(self, buf, offset: int = 0):
        self.buf, self.offset = buf, offset

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        if self.offset + n > len(self.buf):
            raise struct.error("string runs past the end of the file")
        text = bytes(self.buf[self.offset:self.offset + n]).decode("utf-8")
        self.offset += n
        return text

    def value(self, kind: int):
        if kind in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = self.scalar("I"), self.scalar("Q")
        if item in _SCALAR_FORMATS:
            dtype = np.dtype("<" + _SCALAR_FORMATS[item])
            if self.offset + count * dtype.itemsize > len(self.buf):
                raise struct.error("array runs past the end of the file")
            values = np.frombuffer(self.buf, dtype, count, self.offset).tolist()
            self.offset += count * dtype.itemsize
            return values
        return [self.value(item) for _ in range(count)]


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parses a GGUF file's header (memory-mapping the data) with errors that name the file.

    A small reader of its own: `gguf.GGUFReader` builds a numpy view per
    vocabulary string and takes seconds on a 49k-token vocabulary; this takes
    a tenth of that (tests check both agree).

    Args:
      path: path of a `.gguf` file (little-endian, GGUF version 2 or 3), local or a URL
        such as `gs://bucket/model.gguf` (staged on local disk by `paths.local_copy`).

    Returns:
      A `GGUFFile` whose tensors have been checked to lie inside the file.

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a GGUF file, unsupported version, or truncated / corrupt.
    """
    path = os.fspath(path)
    if paths.is_remote(path):
        if not paths.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path}")
        path = paths.local_copy(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (first bytes {magic!r}, expected {_GGUF_MAGIC!r})")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(data, 4)
    try:
        version = cur.scalar("I")
        if version not in (2, 3):
            order = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise ValueError(f"{path}: unsupported GGUF version {version}{order}")
        n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            ne = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
            infos.append((name, ne, cur.scalar("I"), cur.scalar("Q")))
    except (struct.error, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: truncated or corrupt GGUF header ({type(e).__name__}: {e})") from None
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-cur.offset // alignment) * alignment
    tensors = []
    for name, ne, raw_type, rel in infos:
        try:
            ggml_type = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"{path}: tensor {name!r} has unknown ggml type id {raw_type}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        n_elements = int(np.prod(ne, dtype=np.int64)) if ne else 1
        if ne and ne[0] % block:
            raise ValueError(f"{path}: tensor {name!r}: row length {ne[0]} is not a multiple of the "
                             f"{ggml_type.name} block size {block}")
        info = GGUFTensorInfo(name, ggml_type, tuple(int(d) for d in reversed(ne)), start + rel,
                              n_elements // block * type_size)
        if info.offset + info.n_bytes > len(data):
            raise ValueError(
                f"{path}: truncated GGUF file: tensor {name!r} needs bytes "
                f"[{info.offset}, {info.offset + info.n_bytes}) but the file has {len(data)}"
            )
        tensors.append(info)
    return GGUFFile(path, version, metadata, tensors, data)


def gguf_metadata(file: GGUFFile) -> dict[str, Any]:
    """All key/value metadata of an open GGUF file as plain Python values.

    Args:
      file: from `open_gguf`.

    Returns:
      `{key: value}`; arrays become lists, strings `str`.
    """
    return dict(file.metadata)


def unpermute_rows(w_oi: np.ndarray, n_head: int) -> np.ndarray:
    """Inverts llama.cpp's q/k row permutation (GGUF layout -> HF layout).

    convert_hf_to_gguf writes `w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)`;
    reading back swaps the same axes of the `(n_head, d/2, 2, ...)` view.

    Args:
      w_oi: `[n_head * head_dim, in]` weight or `[n_head * head_dim]` bias as stored.
      n_head: number of heads in this projection (KV heads for k).

    Returns:
      The rows in HF order (a new contiguous array).
    """
    rows = w_oi.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {rows} rows into {n_head} heads of even size")
    view = w_oi.reshape(n_head, rows // n_head // 2, 2, *w_oi.shape[1:])
    return np.ascontiguousarray(view.swapaxes(1, 2).reshape(w_oi.shape))


def permute_rows(w_oi: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF layout -> GGUF layout); for writers and tests.

    Args:
      w_oi: `[n_head * head_dim, in]` weight or `[n_head * head_dim]` bias.
      n_head: number of heads in this projection (KV heads for k).

    Returns:
      The permuted array, same shape.
    """
    rows = w_oi.shape[0]
    view = w_oi.reshape(n_head, 2, rows // n_head // 2, *w_oi.shape[1:])
    return np.ascontiguousarray(view.swapaxes(1, 2).reshape(w_oi.shape))


def hf_name(gguf_name: str) -> str:
    """The HF tensor name of a GGUF tensor name (`blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight`), from the weight table.

    Raises:
      KeyError: a name the table does not know.
    """
    return hf_name_of_gguf(gguf_name)


def _config_from_metadata(meta: dict[str, Any], tensor_shapes: dict[str, list[int]], path: str) -> dict[str, Any]:
    tensor_names = set(tensor_shapes)
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r} in {path} (supported: {sorted(_ARCHITECTURES)})"
        )
    hf_class, model_type, _ = _ARCHITECTURES[arch]

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise ValueError(f"{path}: missing GGUF metadata key {full!r}")
        return default

    hidden = int(get("embedding_length"))
    n_head = int(get("attention.head_count"))
    n_kv = int(get("attention.head_count_kv", n_head))
    head_dim = int(get("attention.key_length", hidden // n_head))
    rope_dim = get("rope.dimension_count", head_dim, required=False)
    if int(rope_dim) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count={rope_dim}, "
                         f"head_dim={head_dim}) are not supported")
    # The embedding's row count is the model's vocabulary (it may be padded past the token list).
    vocab = get("vocab_size", None, required=False)
    if vocab is None and "token_embd.weight" in tensor_shapes:
        vocab = tensor_shapes["token_embd.weight"][-1]  # ne order: [hidden, vocab]
    if vocab is None and meta.get("tokenizer.ggml.tokens"):
        vocab = len(meta["tokenizer.ggml.tokens"])
    if not vocab:
        raise ValueError(f"{path}: cannot tell the vocabulary size ({arch}.vocab_size, "
                         "tokenizer.ggml.tokens and token_embd.weight absent)")
    vocab = int(vocab)
    # float32 in the file: 1e-5 is stored as 9.9999997e-06; print it back the way HF writes it.
    eps = float(f"{float(get('attention.layer_norm_rms_epsilon', 1e-5 if arch == 'llama' else 1e-6)):.7g}")
    theta = float(f"{float(get('rope.freq_base', 10000.0)):.7g}")
    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(get, path),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        config.update(attention_bias="blk.0.attn_q.bias" in tensor_names, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=config["num_hidden_layers"])
    for key in ("bos", "eos", "padding"):
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(value)
    return config


def _rope_scaling(get, path: str) -> dict[str, Any] | None:
    kind = get("rope.scaling.type", "none", required=False)
    if kind in (None, "none"):
        return None
    factor = float(get("rope.scaling.factor", 1.0, required=False))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": int(get("rope.scaling.original_context_length")),
        }
    raise ValueError(f"{path}: unsupported RoPE scaling type {kind!r}")


def dequantize_tensor(file: GGUFFile, tensor: GGUFTensorInfo) -> np.ndarray:
    """Dequantises one GGUF tensor to float32 in numpy (reversed-`ne`) shape.

    Args:
      file: from `open_gguf`.
      tensor: one of `file.tensors`.

    Returns:
      float32 array of shape `tensor.shape`.
    """
    kind = tensor.ggml_type
    if kind not in SUPPORTED_TYPES:
        raise ValueError(
            f"{file.path}: tensor {tensor.name!r} has unsupported type {kind.name} "
            f"(supported: {sorted(t.name for t in SUPPORTED_TYPES)})"
        )
    raw = file.data[tensor.offset:tensor.offset + tensor.n_bytes]
    if kind == _T.F32:
        values = np.array(raw.view(np.float32))  # a copy, not a view of the file
    elif kind == _T.F16:
        values = raw.view(np.float16).astype(np.float32)
    else:  # quantised: gguf.quants wants rows of whole blocks as bytes (and returns a new array)
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        row = tensor.shape[-1] if tensor.shape else 1
        values = gguf.quants.dequantize(np.asarray(raw).reshape(-1, row // block * type_size), kind)
    return np.asarray(values, dtype=np.float32).reshape(tensor.shape)


def _config_of(file: GGUFFile, path: str) -> dict[str, Any]:
    shapes = {t.name: list(reversed(t.shape)) for t in file.tensors}
    return _config_from_metadata(file.metadata, shapes, path)


def gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The HF `config.json` dict of a Llama-family GGUF file, from its header only."""
    path = os.fspath(path)
    return _config_of(open_gguf(path), path)


def _table_config(config: dict[str, Any]) -> ModelConfig:
    """The ModelConfig whose weight-table rows a GGUF file must hold.

    Only sizes and flags matter to the table, so RoPE scaling (which the decoder may
    not run, e.g. YaRN) is left out: it must not stop a GGUF -> HF conversion.
    """
    return ModelConfig.from_hf(dict(config, rope_scaling=None))


class GGUFTensors:
    """The tensors of a Llama-family GGUF file under their HF names, decoded on request.

    The file's structure is checked when this is built (architecture, every tensor the
    table expects present and none else, supported types, shapes, truncation); `get`
    then dequantises one tensor into HF layout, so a caller that uses and drops each
    array in turn holds one dequantised tensor at a time.

    Args:
      path: a `.gguf` file (general.architecture "llama" or "qwen2").

    Raises:
      FileNotFoundError / ValueError naming the file and, where relevant, the tensor or key.
    """

    # `get` decodes the whole tensor however little of it is wanted, so a reader should
    # take each tensor once (not once per device shard).
    whole_tensor_reads = True

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.file = open_gguf(self.path)
        self.config = _config_of(self.file, self.path)
        cfg = _table_config(self.config)
        for t in self.file.tensors:
            if t.name == "rope_freqs.weight":
                raise ValueError(f"{self.path}: tensor 'rope_freqs.weight' (Llama-3.1-style RoPE "
                                 "frequency factors) is not supported")
            if t.ggml_type not in SUPPORTED_TYPES:
                raise ValueError(
                    f"{self.path}: tensor {t.name!r} has unsupported type {t.ggml_type.name} "
                    f"(supported: {sorted(x.name for x in SUPPORTED_TYPES)})")
        check_tensors(gguf_shapes(cfg), {t.name: t.shape for t in self.file.tensors},
                      origin=self.path, model_type=cfg.model_type,
                      implied_by="the file's metadata")
        permuted = _ARCHITECTURES[self.file.metadata["general.architecture"]][2]
        heads = {"heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads}
        # HF name -> (tensor entry, heads whose rows llama.cpp interleaved, or None)
        self._entries: dict[str, tuple[GGUFTensorInfo, int | None]] = {}
        for t in self.file.tensors:
            spec, _ = gguf_lookup(t.name)
            n_head = heads[spec.gguf_rows_per] if permuted and spec.gguf_rows_per else None
            self._entries[hf_name_of_gguf(t.name)] = (t, n_head)

    def keys(self):
        """HF names, in the file's order."""
        return self._entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][0].shape

    def describe(self, name: str) -> str:
        return f"{self.path}: tensor {self._entries[name][0].name!r} ({name})"

    def get(self, name: str) -> np.ndarray:
        """HF tensor `name` dequantised to float32 in HF layout (a new array)."""
        info, n_head = self._entries[name]
        array = dequantize_tensor(self.file, info)
        return array if n_head is None else unpermute_rows(array, n_head)

    def kind(self, name: str) -> str:
        """The GGML type name of HF tensor `name` ("Q4_1", "F32", ...)."""
        return self._entries[name][0].ggml_type.name

    def raw_blocks(self, name: str) -> np.ndarray:
        """HF tensor `name`'s stored bytes, one row of quantization blocks per output row
        (uint8 `[out, row_bytes]`, rows in HF order: llama.cpp's q/k row permutation is
        undone on whole rows, so no block is decoded)."""
        info, n_head = self._entries[name]
        rows = info.shape[0] if len(info.shape) > 1 else 1
        raw = np.asarray(self.file.data[info.offset:info.offset + info.n_bytes]).reshape(rows, -1)
        return raw if n_head is None else unpermute_rows(raw, n_head)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """`(hf_name, array)` pairs in file order, each decoded when the iterator reaches it."""
        for name in self.keys():
            yield name, self.get(name)


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], Iterator[tuple[str, np.ndarray]]]:
    """Reads a Llama-family GGUF file as an HF config dict and HF-named float32 tensors.

    Everything that can fail on the file's structure (architecture, missing
    tensors, unsupported types, truncation) is checked before returning; the
    tensors are then dequantised lazily, one per iteration step.

    Args:
      path: a `.gguf` file (general.architecture "llama" or "qwen2").

    Returns:
      `(config_dict, tensors)`: `config_dict` as in an HF `config.json`;
      `tensors` an iterator of `(hf_name, array)` with float32 arrays in HF
      layout, e.g. `model.layers.0.self_attn.q_proj.weight` `[out, in]`.
      `lm_head.weight` is absent when the embeddings are tied.

    Raises:
      FileNotFoundError / ValueError naming the file and, where relevant, the tensor or key.
    """
    tensors = GGUFTensors(path)
    return tensors.config, tensors.items()
