"""Quantized base weights: GGUF blocks against gguf.quants, int8/nf4 against qwix."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from jax.sharding import NamedSharding, PartitionSpec as P

from mio_jax.models import quant

T = gguf.GGMLQuantizationType
OUT, IN, LAYERS = 6, 512, 3  # IN: 2 K-quant super-blocks, 16 blocks of 32
# Kinds gguf.quants can quantize; for the K-quants the tests write random blocks.
GGUF_QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# Byte offsets of the float16 super-block scales (d, dmin) of each K-quant.
K_SCALE_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def gguf_raw(kind, rows, seed):
    """uint8 `[*rows, IN // block * block_bytes]` GGUF bytes of `kind`."""
    rng = np.random.default_rng(seed)
    if kind in GGUF_QUANTIZABLE:
        w = rng.standard_normal((*rows, IN)).astype(np.float32)
        w[..., :32] = 0.0  # an all-zero block (d == 0)
        return gguf.quants.quantize(w, T[kind])
    block, type_size = gguf.GGML_QUANT_SIZES[T[kind]]
    raw = rng.integers(0, 256, (*rows, IN // block, type_size), dtype=np.uint8)
    for at in K_SCALE_OFFSETS[kind]:  # finite, weight-sized d and dmin
        d = rng.uniform(1e-4, 2e-2, (*rows, IN // block, 1)).astype(np.float16)
        raw[..., at:at + 2] = d.view(np.uint8)
    return raw.reshape(*rows, -1)


def gguf_weight(kind, rows, seed=0):
    raw = gguf_raw(kind, rows, seed)
    return raw, quant.QuantizedWeight(fields=quant.from_gguf(raw, kind, IN), kind=kind, in_features=IN)


def test_in_step_kinds():
    assert quant.GGUF_IN_STEP == {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"}


@pytest.mark.parametrize("kind", sorted(quant.GGUF_IN_STEP))
def test_gguf_dequantize_is_bit_exact(kind):
    raw, qw = gguf_weight(kind, (OUT,))
    ref = gguf.quants.dequantize(raw, T[kind])
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    # The fields are the file's bytes regrouped, nothing dequantized or widened.
    assert all(f.dtype in (np.float16, np.uint8, np.int8) for f in qw.fields.values())
    assert qw.nbytes == raw.nbytes
    block, type_size = gguf.GGML_QUANT_SIZES[T[kind]]
    assert quant.bytes_per_param(qw) == type_size / block
    assert qw.shape == (OUT, IN)
    np.testing.assert_array_equal(np.asarray(qw.dequantize(jnp.float32)), ref)
    np.testing.assert_array_equal(np.asarray(qw.dequantize(jnp.bfloat16)), ref.astype(jnp.bfloat16))


@pytest.mark.parametrize("kind", sorted(quant.GGUF_IN_STEP))
def test_gguf_stacked_under_jit_and_scan(kind):
    layers = [gguf_raw(kind, (OUT,), seed) for seed in range(LAYERS)]
    fields = quant.stack_fields([quant.from_gguf(raw, kind, IN) for raw in layers])
    qw = quant.QuantizedWeight(fields=jax.tree.map(jnp.asarray, fields), kind=kind, in_features=IN)
    assert qw.shape == (LAYERS, OUT, IN)
    ref = np.stack([gguf.quants.dequantize(raw, T[kind]) for raw in layers])

    @jax.jit
    def per_layer(qw):
        def body(carry, layer_qw):  # the fields arrive without the layers axis
            w = layer_qw.dequantize(jnp.float32)
            return carry + w.sum(), w
        return jax.lax.scan(body, jnp.float32(0), qw)

    total, ws = per_layer(qw)
    np.testing.assert_array_equal(np.asarray(ws), ref)
    np.testing.assert_allclose(float(total), ref.astype(np.float64).sum(), rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda q: q.dequantize())(qw)), ref)


def test_from_gguf_accepts_enum_and_checks_sizes():
    raw = gguf_raw("Q4_0", (OUT,), 0)
    by_enum = quant.from_gguf(raw, T.Q4_0, IN)
    assert {k: v.shape for k, v in by_enum.items()} == {"d": (OUT, 16), "qs": (OUT, 16, 16)}
    with pytest.raises(ValueError, match=r"uint8 \[\*lead, out, 288\].*\(6, 287\)"):
        quant.from_gguf(raw[:, :-1], "Q4_0", IN)
    with pytest.raises(ValueError, match="not a whole number of 32-element blocks"):
        quant.from_gguf(raw, "Q4_0", IN + 16)
    with pytest.raises(ValueError, match="unsupported GGUF kind 'Q2_K'"):
        quant.from_gguf(raw, "Q2_K", IN)
    with pytest.raises(ValueError, match="field 'qs' of layer 1"):
        quant.stack_fields([by_enum, {"d": by_enum["d"], "qs": by_enum["qs"][:3]}])


def test_dequantize_checks_in_features():
    _, qw = gguf_weight("Q8_0", (OUT,))
    bad = quant.QuantizedWeight(fields=qw.fields, kind="Q8_0", in_features=IN + 32)
    with pytest.raises(ValueError, match="16 blocks of 32 do not make in_features=544"):
        bad.dequantize()


@pytest.fixture(scope="module")
def weight():
    """A stacked `[L, out, in]` float32 weight with one all-zero row and one outlier."""
    w = jax.random.normal(jax.random.key(0), (2, OUT, 256), jnp.float32) * 0.02
    return w.at[0, 1].set(0.0).at[1, 2, 7].set(0.5)


@pytest.mark.parametrize("scale_dtype", [jnp.float32, jnp.bfloat16])
def test_nf4_equals_qwix_and_packs_two_codes_per_byte(weight, scale_dtype):
    qw = quant.quantize(weight, "nf4", block_size=64, scale_dtype=scale_dtype)
    ref = quant.qwix_reference(weight, "nf4", block_size=64, scale_dtype=scale_dtype)
    # Same rule as qwix called directly on the weight's axes.
    direct = qwix.quantize(weight, "nf4", channelwise_axes=(0, 1), tiled_axes={2: 64},
                           scale_dtype=scale_dtype)
    np.testing.assert_array_equal(np.asarray(ref.qvalue), np.asarray(direct.qvalue))
    assert qw.fields["codes"].dtype == jnp.uint8 and qw.fields["codes"].shape == (2, OUT, 4, 32)
    assert qw.fields["scale"].shape == (2, OUT, 4) and qw.fields["scale"].dtype == scale_dtype
    # Unpacking gives back qwix's codes.
    codes = qw.fields["codes"]
    unpacked = jnp.concatenate([codes & 15, codes >> 4], axis=-1).reshape(weight.shape)
    np.testing.assert_array_equal(np.asarray(unpacked), np.asarray(ref.qvalue.astype(jnp.uint8)))
    np.testing.assert_array_equal(np.asarray(qw.dequantize(scale_dtype)), np.asarray(qwix.dequantize(ref)))
    err = float(jnp.abs(qw.dequantize(jnp.float32) - weight).max())
    assert err == float(jnp.abs(qwix.dequantize(ref).astype(jnp.float32) - weight).max())
    # Each element is within half the widest NF4 gap (-1 to -0.696) of its block's absmax,
    # plus the rounding of a bfloat16 scale and product (2 * 2^-9 relative).
    blocks = jnp.abs(qw.dequantize(jnp.float32) - weight).reshape(2, OUT, 4, 64).max(-1)
    absmax = jnp.abs(weight).reshape(2, OUT, 4, 64).max(-1)
    slack = 1e-6 if scale_dtype == jnp.float32 else 2.0**-8
    assert bool(jnp.all(blocks <= (0.1520 + slack) * absmax))
    n = weight.size
    scale_bytes = np.dtype(scale_dtype).itemsize
    assert qw.fields["codes"].nbytes == n // 2
    assert quant.bytes_per_param(qw) == 0.5 + scale_bytes / 64


def test_nf4_under_scan_matches_whole(weight):
    qw = quant.quantize(weight, "nf4", block_size=32)
    whole = qw.dequantize(jnp.bfloat16)
    _, layers = jax.jit(lambda q: jax.lax.scan(lambda c, x: (c, x.dequantize(jnp.bfloat16)), 0, q))(qw)
    np.testing.assert_array_equal(np.asarray(layers, np.float32), np.asarray(whole, np.float32))
    assert quant.bytes_per_param(qw) == 0.5 + 4 / 32


def test_int8_error_is_at_most_half_a_step(weight):
    qw = quant.quantize(weight.astype(jnp.bfloat16), "int8")
    assert qw.fields["q"].dtype == jnp.int8 and qw.fields["scale"].shape == (2, OUT)
    w32 = weight.astype(jnp.bfloat16).astype(jnp.float32)
    scale = qw.fields["scale"]
    err = jnp.abs(qw.dequantize(jnp.float32) - w32).max(axis=-1)
    assert bool(jnp.all(err <= scale * 0.5 * (1 + 1e-5)))
    np.testing.assert_allclose(np.asarray(scale[0, 0]), np.abs(np.asarray(w32[0, 0])).max() / 127.5, rtol=1e-6)
    assert float(scale[0, 1]) == 1.0 and not bool(jnp.any(qw.fields["q"][0, 1]))  # zero row
    ref = quant.qwix_reference(weight.astype(jnp.bfloat16), "int8")
    np.testing.assert_array_equal(np.asarray(qw.dequantize(jnp.float32)), np.asarray(qwix.dequantize(ref)))
    assert quant.bytes_per_param(qw) == 1 + 4 / 256


def test_quantize_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"shape \(6, 100\): in=100 is not divisible by block_size=64"):
        quant.quantize(jnp.ones((OUT, 100)), "nf4")
    with pytest.raises(ValueError, match="positive even number, got 7"):
        quant.quantize(jnp.ones((OUT, 70)), "nf4", block_size=7)
    with pytest.raises(ValueError, match=r"\[\*lead, out, in\] weight, got shape \(64,\)"):
        quant.quantize(jnp.ones((64,)), "int8")
    with pytest.raises(ValueError, match="expected a float weight"):
        quant.quantize(jnp.ones((4, 64), jnp.int32), "int8")
    with pytest.raises(ValueError, match="unknown kind 'Q4_0'"):
        quant.quantize(jnp.ones((4, 64)), "Q4_0")


def test_field_dims_describe_every_field(weight):
    cases = {"int8": quant.quantize(weight, "int8"), "nf4": quant.quantize(weight, "nf4")}
    for kind in quant.GGUF_IN_STEP:
        cases[kind] = gguf_weight(kind, (2, OUT))[1]
    for kind, qw in cases.items():
        dims = quant.field_dims(kind)
        assert set(dims) == set(qw.fields), kind
        block = 1 if kind == "int8" else 64 if kind == "nf4" else gguf.GGML_QUANT_SIZES[T[kind]][0]
        for name, labels in dims.items():
            f = qw.fields[name]
            assert f.ndim == 1 + len(labels), (kind, name)
            for size, label in zip(f.shape[1:], labels):
                if label == quant.OUT:
                    assert size == OUT, (kind, name)
                elif label == quant.IN:
                    assert size == qw.in_features // block, (kind, name)
    axes = quant.field_logical_axes("nf4", out_axis="mlp", in_axis="embed", lead_axes=("layers",))
    assert axes == {"codes": ("layers", "mlp", "embed", None), "scale": ("layers", "mlp", "embed")}


@pytest.mark.parametrize("kind", ["int8", "nf4", "Q4_K", "Q6_K"])
def test_sharded_fields_dequantize_like_unsharded(kind):
    """Fields placed by their labels (out over 2 devices, in over 4) give the same weight."""
    if kind in ("int8", "nf4"):
        w = jax.random.normal(jax.random.key(1), (8, 1024), jnp.float32)
        qw = quant.quantize(w, kind)
    else:
        raw = gguf_raw(kind, (8,), 3)
        raw = np.concatenate([raw, gguf_raw(kind, (8,), 4)], axis=-1)  # 4 super-blocks a row
        qw = quant.QuantizedWeight(fields=quant.from_gguf(raw, kind, 2 * IN), kind=kind,
                                   in_features=2 * IN)
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    axes = quant.field_logical_axes(kind, out_axis="x", in_axis="y")
    fields = {k: jax.device_put(v, NamedSharding(mesh, P(*axes[k]))) for k, v in qw.fields.items()}
    sharded = quant.QuantizedWeight(fields=fields, kind=kind, in_features=qw.in_features)
    out = jax.jit(lambda q: q.dequantize(jnp.float32),
                  out_shardings=NamedSharding(mesh, P("x", "y")))(sharded)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(qw.dequantize(jnp.float32)))


def test_the_nf4_codebook_is_qwixs():
    """quant.NF4_CODEBOOK (QLoRA's 16 NormalFloat values, written out) equals the table
    qwix quantizes with, so a base quantized by qwix decodes to qwix's own dequantize."""
    from qwix._src.core import numerics  # a test may read qwix's private table

    want = np.asarray(numerics.get_nf4_buckets(), np.float32)
    np.testing.assert_array_equal(np.asarray(quant.NF4_CODEBOOK, np.float32), want)
