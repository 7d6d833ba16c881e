"""Frozen base weights kept quantized in memory and expanded one layer at a time in the step.

QLoRA-style training holds the base model's linear weights in a few bits per parameter
and turns each back into floats only where the layer uses it, inside the jitted step
(under `lax.scan` over the layers, one layer's worth at a time), so the dequantized
copy is a transient the compiler can fuse into the matmul's producer.

Layout contract (the loader, the decoder and the sharding rules all rely on it):

- A `QuantizedWeight` stands for a weight in Hugging Face layout, `[*lead, out, in]`
  (`lead` is usually empty or the stacked layers axis `[L]`), with its quantization
  blocks running along `in`, the last axis.
- Every field has the weight's `[*lead, out]` dims first, then dims of its own:
  typically the block index along `in` and a within-block byte axis. `field_dims`
  names them so each field can be given a `PartitionSpec` (`field_logical_axes`).
- `dequantize` is plain `jnp` on whatever leading dims it finds, so under `lax.scan`
  over the layer axis (fields without `L`), `vmap` or `jit` it needs nothing special.

Kinds:

- "int8": symmetric, one absmax scale per output row (`[*lead, out]`), int8 values.
- "nf4": NormalFloat-4 (QLoRA): one absmax scale per block of `block_size` along `in`,
  4-bit codes into the NF4 codebook, packed two per byte.
- GGUF block kinds, taken from a llama.cpp file without re-quantizing (`from_gguf`):
  Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (32-element blocks), Q4_K, Q5_K, Q6_K (256-element
  super-blocks). The fields hold the file's bytes split by meaning (float16 scales,
  quant bytes as uint8/int8), including the K-quants' 6-bit packed sub-block scales,
  so storage is byte for byte what the file holds. `dequantize` reproduces
  `gguf.quants.dequantize` bit for bit in float32 (every product before the last
  rounding is exact in float32, so the result does not depend on the order of
  multiplies or on fused multiply-add).

Where qwix is used and where not: int8 and nf4 take their quantization rule (absmax
calibration, qwix's int8 bound of 127.5, NF4 nearest-bucket rounding) and the NF4
codebook from qwix, and `dequantize` gives exactly `qwix.dequantize` of the same
quantization. Four things are done here instead:
- qwix holds NF4 codes as `jnp.uint4`, which XLA on CPU stores one per byte, so the
  codes are repacked two per uint8 here and unpacked in `dequantize`.
- qwix computes the scale in the input's dtype; weights are upcast to float32 first so
  a bfloat16 checkpoint gets float32-accurate scales (stored in `scale_dtype`).
- the NF4 codebook lookup is a select tree rather than qwix's gather (`table[codes]`),
  which fails under jit on sharded codes ("Use `.at[...].get(out_sharding=)`") in
  JAX 0.10; the values are the same float32 table entries.
- the GGUF kinds are not `QArray`s: their low/high-nibble and split high-bit packing,
  float minimums (`d * q + m`, not an integer zero point) and packed 6-bit sub-block
  scales have no qwix representation, so their dequantizers are written here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.struct as struct
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from mio_jax.models.config import ModelConfig
from mio_jax.models.weights import linear_specs
from mio_jax.sharding import logical_to_spec

# Field-dim labels (see `field_dims`).
OUT = "out"  # the weight's output dim: shard like the weight's output logical axis
IN = "in"  # walks along the weight's input dim (block index, or element for int8)

QWIX_KINDS = ("int8", "nf4")  # what ``quantize`` stores by qwix's rules


@struct.dataclass
class QuantizedWeight:
    """A `[*lead, out, in]` weight held quantized (a pytree whose leaves are `fields`).

    Attributes:
      fields: name -> array; each is `[*lead, out, *own]`, `own` as `field_dims(kind)`.
      kind: "int8", "nf4" or a GGUF kind in `GGUF_IN_STEP`.
      in_features: the weight's `in` size; static, so the output shape is known at trace
        time and the fields are checked against it there.
    """

    fields: dict[str, Any]
    kind: str = struct.field(pytree_node=False)
    in_features: int = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """`(*lead, out, in)` of the weight this stands for."""
        name, dims = next(iter(field_dims(self.kind).items()))
        f = self.fields[name]
        return tuple(f.shape[: f.ndim - len(dims) + 1]) + (self.in_features,)

    @property
    def nbytes(self) -> int:
        """Bytes of all fields as stored (works on abstract `ShapeDtypeStruct` fields)."""
        return sum(math.prod(f.shape) * np.dtype(f.dtype).itemsize for f in self.fields.values())

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The weight as floats, `[*lead, out, in]` in `dtype`.

        GGUF kinds are computed in float32; int8/nf4 in the scales' dtype, as
        `qwix.dequantize` does (float32 unless quantized with a bfloat16 scale); then cast.

        Pure `jnp`; any number of leading dims (e.g. none under `lax.scan` over layers).
        """
        _check_fields(self)
        if self.kind in _QWIX_DEQUANT:
            return _QWIX_DEQUANT[self.kind](self).astype(dtype)
        fields = {k: jnp.asarray(v) for k, v in self.fields.items()}
        blocks = _GGUF_DEQUANT[self.kind](fields)  # [*lead, out, n_blocks, block] float32
        return blocks.reshape(*blocks.shape[:-2], self.in_features).astype(dtype)


def bytes_per_param(qw: QuantizedWeight) -> float:
    """Stored bytes per weight element (scales and packing included)."""
    return qw.nbytes / math.prod(qw.shape)


# ----------------------------------------------------------------------------- int8 / nf4


def quantize(w_hf: jax.Array, kind: str, *, block_size: int = 64,
             scale_dtype=jnp.float32) -> QuantizedWeight:
    """Quantizes a float weight with qwix's rules ("int8" per output row, "nf4" per block).

    Args:
      w_hf: `[*lead, out, in]` float weight in Hugging Face layout.
      kind: "int8" or "nf4".
      block_size: nf4 block length along `in` (even, dividing `in`); ignored for int8.
      scale_dtype: dtype the scales are stored in (float32, or bfloat16 to save
        `2 / block_size` bytes per parameter).

    Returns:
      int8: fields `q` int8 `[*lead, out, in]`, `scale` `[*lead, out]`.
      nf4: fields `codes` uint8 `[*lead, out, in // block_size, block_size // 2]`
        (element `j` of a block in the low nibble of byte `j`, element `j + block_size/2`
        in its high nibble) and `scale` `[*lead, out, in // block_size]`.

    Raises:
      ValueError: unknown kind, fewer than 2 dims, a non-float weight, or (nf4) an `in`
        not divisible by `block_size` or an odd `block_size`.
    """
    shape = tuple(w_hf.shape)
    if kind not in QWIX_KINDS:
        raise ValueError(f"quantize: unknown kind {kind!r}; expected one of {QWIX_KINDS} "
                         f"(GGUF kinds come from files, see from_gguf)")
    if len(shape) < 2:
        raise ValueError(f"quantize: expected a [*lead, out, in] weight, got shape {shape}")
    if not jnp.issubdtype(w_hf.dtype, jnp.floating):
        raise ValueError(f"quantize: expected a float weight, got dtype {w_hf.dtype}")
    if kind == "nf4":
        if block_size <= 0 or block_size % 2:
            raise ValueError(f"quantize: nf4 block_size must be a positive even number, got {block_size}")
        if shape[-1] % block_size:
            raise ValueError(f"quantize: nf4 weight of shape {shape}: in={shape[-1]} is not "
                             f"divisible by block_size={block_size}")
    fields = _quantize_jit(jnp.asarray(w_hf), kind, block_size, jnp.dtype(scale_dtype))
    return QuantizedWeight(fields=fields, kind=kind, in_features=shape[-1])


def qwix_reference(w_hf: jax.Array, kind: str, *, block_size: int = 64, scale_dtype=jnp.float32):
    """The `qwix.QArray` that `quantize` packs: same rule, same axes, unpacked codes.

    Args:
      w_hf: `[*lead, out, in]` float weight.
      kind: "int8" or "nf4".
      block_size: nf4 block length along `in`.
      scale_dtype: the scales' dtype.

    Returns:
      `qwix.QArray` with `qvalue` `[*lead, out, in]`; `qwix.dequantize` of it equals
      `quantize(...).dequantize(scale_dtype)` exactly.
    """
    w = jnp.asarray(w_hf).astype(jnp.float32)
    row_axes = tuple(range(w.ndim - 1))  # every axis but `in` keeps its own scales
    if kind == "int8":
        return qwix.quantize(w, jnp.int8, channelwise_axes=row_axes, scale_dtype=scale_dtype)
    if kind == "nf4":
        return qwix.quantize(w, "nf4", channelwise_axes=row_axes,
                             tiled_axes={w.ndim - 1: block_size}, scale_dtype=scale_dtype)
    raise ValueError(f"qwix_reference: unknown kind {kind!r}; expected one of {QWIX_KINDS}")


def _quantize_fields(w, kind, block_size, scale_dtype):
    qa = qwix_reference(w, kind, block_size=block_size, scale_dtype=scale_dtype)
    if kind == "int8":
        return {"q": qa.qvalue, "scale": qa.scale[..., 0]}
    codes = qa.qvalue.astype(jnp.uint8).reshape(*w.shape[:-1], -1, block_size)
    half = block_size // 2
    packed = codes[..., :half] | (codes[..., half:] << 4)
    return {"codes": packed, "scale": qa.scale}


# Under jit the NF4 nearest-bucket search fuses into one reduction instead of
# materializing a [n, 16] distance table.
_quantize_jit = jax.jit(_quantize_fields, static_argnums=(1, 2, 3))


def _dequantize_int8(qw: QuantizedWeight) -> jax.Array:
    scale = jnp.asarray(qw.fields["scale"])
    return jnp.asarray(qw.fields["q"]).astype(scale.dtype) * scale[..., None]


def _dequantize_nf4(qw: QuantizedWeight) -> jax.Array:
    scale = jnp.asarray(qw.fields["scale"])  # [*lead, out, nb]
    codes = _nibbles(jnp.asarray(qw.fields["codes"]))  # [*lead, out, nb, block]
    values = _nf4_values(codes).astype(scale.dtype) * scale[..., None]
    return values.reshape(*scale.shape[:-1], qw.in_features)


# The 4-bit NormalFloat codebook of QLoRA (Dettmers et al. 2023, arXiv 2305.14314): the
# quantiles of N(0, 1) scaled to [-1, 1], with an exact zero. qwix quantizes with the same
# 16 values (tests/models/test_quant.py checks it against qwix's own table).
NF4_CODEBOOK = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0)


def _nf4_values(codes):
    """float32 codebook values of 4-bit codes, by a tree of selects on the code's bits.

    A select tree, not a gather: a gather of a replicated table by sharded codes needs
    an explicit output sharding in current JAX, while selects are elementwise and keep
    the codes' sharding (and fuse into the consumer on GPU).
    """
    level = [jnp.float32(v) for v in NF4_CODEBOOK]
    for bit in range(4):
        is_set = ((codes >> bit) & 1).astype(jnp.bool_)
        level = [jnp.where(is_set, hi, lo) for lo, hi in zip(level[0::2], level[1::2])]
    return level[0]


_QWIX_DEQUANT = {"int8": _dequantize_int8, "nf4": _dequantize_nf4}


# ----------------------------------------------------------------------------- GGUF kinds

# One ggml block, front to back: (field, bytes, numpy dtype, own trailing shape).
# The field order is the byte order in the file; () marks one scalar per block.
_F16, _U8, _I8 = np.float16, np.uint8, np.int8
_GGUF_LAYOUTS: dict[str, tuple[tuple[str, int, Any, tuple[int, ...]], ...]] = {
    "Q8_0": (("d", 2, _F16, ()), ("qs", 32, _I8, (32,))),
    "Q4_0": (("d", 2, _F16, ()), ("qs", 16, _U8, (16,))),
    "Q4_1": (("d", 2, _F16, ()), ("m", 2, _F16, ()), ("qs", 16, _U8, (16,))),
    "Q5_0": (("d", 2, _F16, ()), ("qh", 4, _U8, (4,)), ("qs", 16, _U8, (16,))),
    "Q5_1": (("d", 2, _F16, ()), ("m", 2, _F16, ()), ("qh", 4, _U8, (4,)), ("qs", 16, _U8, (16,))),
    "Q4_K": (("d", 2, _F16, ()), ("dmin", 2, _F16, ()), ("scales", 12, _U8, (12,)),
             ("qs", 128, _U8, (128,))),
    "Q5_K": (("d", 2, _F16, ()), ("dmin", 2, _F16, ()), ("scales", 12, _U8, (12,)),
             ("qh", 32, _U8, (32,)), ("qs", 128, _U8, (128,))),
    "Q6_K": (("ql", 128, _U8, (128,)), ("qh", 64, _U8, (64,)), ("scales", 16, _I8, (16,)),
             ("d", 2, _F16, ())),
}
GGUF_IN_STEP = frozenset(_GGUF_LAYOUTS)


def gguf_block(kind: str) -> tuple[int, int]:
    """`(elements, bytes)` of one block of a GGUF kind in `GGUF_IN_STEP`."""
    _check_gguf_kind(kind, "gguf_block")
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    assert type_size == sum(n for _, n, _, _ in _GGUF_LAYOUTS[kind])
    return block, type_size


def from_gguf(raw: np.ndarray, kind: str | gguf.GGMLQuantizationType,
              in_features: int) -> dict[str, np.ndarray]:
    """Splits one GGUF tensor's block bytes into named fields, without dequantizing.

    Args:
      raw: uint8 `[*lead, out, row_bytes]`, one row of ggml blocks per output row (the
        file's bytes for a `[out, in]` weight reshaped to rows; HF layout already).
      kind: a kind in `GGUF_IN_STEP` (name or `gguf.GGMLQuantizationType`).
      in_features: the row length in elements.

    Returns:
      `{field: array [*lead, out, in // block, *own]}` (new arrays, not views of `raw`):
      float16 scales, uint8/int8 quant bytes, as `_GGUF_LAYOUTS` lists them. Build the
      weight with `QuantizedWeight(fields=..., kind=kind, in_features=in_features)`.
      Per-row operations such as `gguf_io.unpermute_rows` apply to each field on axis 0.

    Raises:
      ValueError: an unsupported kind, `in_features` not a multiple of the block, or
        `raw` not uint8 with `in_features // block * block_bytes` bytes per row.
    """
    kind = kind.name if isinstance(kind, gguf.GGMLQuantizationType) else kind
    block, type_size = gguf_block(kind)
    raw = np.asarray(raw)
    if in_features <= 0 or in_features % block:
        raise ValueError(f"from_gguf: {kind} rows of {in_features} elements are not a whole "
                         f"number of {block}-element blocks")
    n_blocks = in_features // block
    if raw.dtype != np.uint8 or raw.ndim < 2 or raw.shape[-1] != n_blocks * type_size:
        raise ValueError(f"from_gguf: {kind} with in_features={in_features} needs uint8 "
                         f"[*lead, out, {n_blocks * type_size}] bytes, got {raw.dtype} {raw.shape}")
    blocks = raw.reshape(*raw.shape[:-1], n_blocks, type_size)
    fields, start = {}, 0
    for name, n, dtype, own in _GGUF_LAYOUTS[kind]:
        piece = np.ascontiguousarray(blocks[..., start:start + n]).view(dtype)
        fields[name] = piece.reshape(*blocks.shape[:-1], *own)
        start += n
    return fields


def stack_fields(per_layer: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks per-layer field dicts on a new leading axis: `[out, ...]` -> `[L, out, ...]`.

    Raises:
      ValueError: no layers, or layers with different field names or shapes.
    """
    if not per_layer:
        raise ValueError("stack_fields: no layers to stack")
    names = list(per_layer[0])
    for i, fields in enumerate(per_layer):
        if list(fields) != names:
            raise ValueError(f"stack_fields: layer {i} has fields {list(fields)}, layer 0 has {names}")
        for k in names:
            if fields[k].shape != per_layer[0][k].shape or fields[k].dtype != per_layer[0][k].dtype:
                raise ValueError(f"stack_fields: field {k!r} of layer {i} is {fields[k].dtype} "
                                 f"{fields[k].shape}, layer 0's is {per_layer[0][k].dtype} "
                                 f"{per_layer[0][k].shape}")
    return {k: np.stack([fields[k] for fields in per_layer]) for k in names}


def _f32(x):
    return x.astype(jnp.float32)


def _nibbles(qs):
    """uint8 `[..., n]` -> `[..., 2n]`: all low nibbles, then all high nibbles."""
    return jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(b):
    """uint8 `[..., n]` -> `[..., 8, n]`: `[..., i, j]` is bit i of byte j."""
    shifts = jnp.arange(8, dtype=jnp.uint8)[:, None]
    return (b[..., None, :] >> shifts) & 1


def _low_bits_first(b):
    """uint8 `[..., n]` -> `[..., 8n]`: bit i of byte j at `8j + i` (a little-endian word)."""
    return jnp.swapaxes(_bits(b), -1, -2).reshape(*b.shape[:-1], 8 * b.shape[-1])


def _q8_0(f):
    return _f32(f["d"])[..., None] * _f32(f["qs"])


def _q4_0(f):
    q = _nibbles(f["qs"]).astype(jnp.int32) - 8
    return _f32(f["d"])[..., None] * _f32(q)


def _q4_1(f):
    return _f32(f["d"])[..., None] * _f32(_nibbles(f["qs"])) + _f32(f["m"])[..., None]


def _five_bit(f):
    """Q5_0/Q5_1 codes 0..31: nibble from `qs`, fifth bit i of the 32-bit `qh` word."""
    return _nibbles(f["qs"]) | (_low_bits_first(f["qh"]) << 4)


def _q5_0(f):
    return _f32(f["d"])[..., None] * _f32(_five_bit(f).astype(jnp.int32) - 16)


def _q5_1(f):
    return _f32(f["d"])[..., None] * _f32(_five_bit(f)) + _f32(f["m"])[..., None]


def _k_scales(packed):
    """Q4_K/Q5_K: 12 bytes -> 6-bit (scale, min) of the 8 sub-blocks, each `[..., 8]`.

    Sub-blocks 0-3 keep their 6 bits in the low bits of bytes 0-3 (scales) and 4-7
    (mins); sub-blocks 4-7 take 4 low bits from bytes 8-11 (scale low nibble, min high
    nibble) and their top 2 bits from the spare top bits of bytes 0-3 / 4-7.
    """
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scale = jnp.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    minimum = jnp.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return scale, minimum


def _k_nibbles(qs):
    """Q4_K/Q5_K: 128 bytes -> `[..., 8, 32]` 4-bit codes; sub-block 2c (low nibbles) and
    2c + 1 (high nibbles) share bytes 32c .. 32c + 31."""
    chunks = qs.reshape(*qs.shape[:-1], 4, 32)
    return jnp.stack([chunks & 0x0F, chunks >> 4], axis=-2).reshape(*qs.shape[:-1], 8, 32)


def _k_dequant(f, q):
    """`(d * scale) * q - dmin * min` per 32-element sub-block, `q` `[..., 8, 32]`."""
    scale, minimum = _k_scales(f["scales"])
    dl = _f32(f["d"])[..., None] * _f32(scale)
    ml = _f32(f["dmin"])[..., None] * _f32(minimum)
    out = dl[..., None] * _f32(q) - ml[..., None]
    return out.reshape(*out.shape[:-2], 256)


def _q4_k(f):
    return _k_dequant(f, _k_nibbles(f["qs"]))


def _q5_k(f):
    # The fifth bit of sub-block s is bit s of the 32 `qh` bytes.
    return _k_dequant(f, _k_nibbles(f["qs"]) | (_bits(f["qh"]) << 4))


def _q6_k(f):
    lead = f["ql"].shape[:-1]
    # Each 128-element half h: low 4 bits from 64 `ql` bytes (low nibbles give elements
    # 0-63, high nibbles 64-127), top 2 bits from 32 `qh` bytes, 2 bits per 32 elements.
    ql = f["ql"].reshape(*lead, 2, 64)
    low = jnp.stack([ql & 0x0F, ql >> 4], axis=-2).reshape(*lead, 256)
    qh = f["qh"].reshape(*lead, 2, 1, 32)
    high = ((qh >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]) & 3).reshape(*lead, 256)
    q = (low | (high << 4)).astype(jnp.int32) - 32
    dl = _f32(f["d"])[..., None] * _f32(f["scales"])  # one int8 scale per 16 elements
    out = dl[..., None] * _f32(q.reshape(*lead, 16, 16))
    return out.reshape(*lead, 256)


_GGUF_DEQUANT = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
assert set(_GGUF_DEQUANT) == GGUF_IN_STEP


def _check_gguf_kind(kind: str, where: str) -> None:
    if kind not in _GGUF_LAYOUTS:
        raise ValueError(f"{where}: unsupported GGUF kind {kind!r}; supported: {sorted(GGUF_IN_STEP)}")


# ----------------------------------------------------------------------------- field layout


def field_dims(kind: str) -> dict[str, tuple[str | None, ...]]:
    """What each field's dims after the lead dims are, for a kind.

    Args:
      kind: "int8", "nf4" or a kind in `GGUF_IN_STEP`.

    Returns:
      `{field: labels}`, one label per dim from the `out` dim on: `OUT` ("out", the
      weight's output dim), `IN` ("in", a dim along the weight's input: the block index,
      or the element itself for int8's `q`) or None (within a block: keep replicated).
      Sharding an `IN` dim splits `in` at block boundaries, which `dequantize` keeps.
    """
    if kind == "int8":
        return {"q": (OUT, IN), "scale": (OUT,)}
    if kind == "nf4":
        return {"codes": (OUT, IN, None), "scale": (OUT, IN)}
    _check_gguf_kind(kind, "field_dims")
    return {name: (OUT, IN) + (None,) * len(own) for name, _, _, own in _GGUF_LAYOUTS[kind]}


def field_logical_axes(kind: str, *, out_axis: str | None, in_axis: str | None,
                       lead_axes: Sequence[str | None] = ()) -> dict[str, tuple[str | None, ...]]:
    """Logical axis names of every dim of every field, from the weight's own names.

    Args:
      kind: the weight's kind.
      out_axis: logical axis name of the weight's output dim.
      in_axis: logical axis name of the weight's input dim.
      lead_axes: names of the lead dims (e.g. `("layers",)` for a stacked weight).

    Returns:
      `{field: (*lead_axes, ...)}`, ready for a logical-to-mesh rule table.
    """
    names = {OUT: out_axis, IN: in_axis, None: None}
    return {k: tuple(lead_axes) + tuple(names[d] for d in dims) for k, dims in field_dims(kind).items()}


def _check_fields(qw: QuantizedWeight) -> None:
    """Static shape checks (shapes are known under jit), so a mismatch fails at trace time."""
    dims = field_dims(qw.kind)
    if set(qw.fields) != set(dims):
        raise ValueError(f"QuantizedWeight {qw.kind}: fields {sorted(qw.fields)}, expected {sorted(dims)}")
    rows = None
    for name, labels in dims.items():
        f = qw.fields[name]
        if f.ndim < len(labels):
            raise ValueError(f"QuantizedWeight {qw.kind}: field {name!r} has shape {f.shape}, "
                             f"expected at least {len(labels)} dims {labels}")
        lead_out = tuple(f.shape[: f.ndim - len(labels) + 1])
        if rows is not None and lead_out != rows:
            raise ValueError(f"QuantizedWeight {qw.kind}: field {name!r} has [*lead, out] = "
                             f"{lead_out}, other fields {rows}")
        rows = lead_out
    if qw.kind in _GGUF_LAYOUTS:
        block, _ = gguf_block(qw.kind)
        n_blocks = qw.fields["d"].shape[-1]
    elif qw.kind == "nf4":
        block, n_blocks = 2 * qw.fields["codes"].shape[-1], qw.fields["codes"].shape[-2]
    else:
        block, n_blocks = 1, qw.fields["q"].shape[-1]
    if block * n_blocks != qw.in_features:
        raise ValueError(f"QuantizedWeight {qw.kind}: {n_blocks} blocks of {block} do not make "
                         f"in_features={qw.in_features}")


def place_quantized(qw, spec, mesh, rules):
    """A ``QuantizedWeight`` with each field sharded by the weight's logical axes: the
    output dimension as the row's first output axis, the block dimension along the input
    as its first input axis (each falls back to replication where it does not divide)."""
    if mesh is None:
        return qw
    out_group, in_group = spec.hf_axes
    axes = field_logical_axes(qw.kind, out_axis=out_group[0], in_axis=in_group[0],
                              lead_axes=("layers",) if spec.stacked else ())
    fields = {}
    for key, value in qw.fields.items():
        pspec = logical_to_spec(axes[key], rules, mesh, value.shape)
        fields[key] = jax.device_put(value, jax.sharding.NamedSharding(mesh, pspec))
    return qw.replace(fields=fields)


def quantize_base(base: dict, cfg: ModelConfig, kind: str, mesh, rules) -> dict:
    """A LoRA run's frozen ``base`` with every stacked linear weight replaced by a
    ``QuantizedWeight`` of ``kind`` (``QWIX_KINDS``; HF layout ``[L, out, in]``), one row at
    a time, each field sharded like the weight."""
    layers = dict(base["layers"])
    for name, spec in linear_specs(cfg).items():
        w = layers[name]
        block = math.gcd(spec.hf_shape(cfg)[1], 64)  # NF4 blocks of 64 inputs (fewer if
        fn = jax.jit(lambda x, spec=spec, block=block:  # the input width needs it)
                     quantize(jax.vmap(spec.to_hf)(x), kind, block_size=block))
        layers[name] = place_quantized(fn(w), spec, mesh, rules)
        del w
    return dict(base, layers=layers)
