"""Pallas splash attention for the training forward (``model.attention="splash"``).

The TPU kernel of ``jax.experimental.pallas.ops.tpu.splash_attention``: the score matrix
is never materialised, blocks that the mask hides are skipped, and its backward is the
kernel's own. What the kernel can express, and so what runs on it:

- the unshared ``[B, K, L]`` layout (causal, padding as segment 0) and packed rows
  (causal, segment ids; positions restart per segment, so slots and positions agree
  within a segment);
- sliding-window layers (a causal local mask of the window), mixed with global ones
  (Gemma 2/3: each layer picks its kernel by its flag);
- Gemma 2's soft-capped scores (the kernel's ``attn_logits_soft_cap``) and any query
  scale (applied to the queries).

The shared-prompt layout's mask (each completion sees the prompt and itself, not the
other completions) is neither causal-with-segments nor local, and it differs row by row;
the kernel's static masks cannot express it, so those forwards run the written-out
attention (``xla_attention``) instead, and ``attention_plan`` says so.

Off TPU the same kernel runs in Pallas' interpret mode (slow; how it is tested on CPU);
the platform is that of the mesh in context, so a step compiled ahead of time for a TPU
topology on a CPU host gets the real kernel.
Under a mesh the kernel runs per device inside ``jax.shard_map`` (rows over the batch
axes, heads over ``tensor``): a Pallas call is not partitioned by GSPMD on its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
from jax.sharding import PartitionSpec as P

from mio_jax.sharding import BATCH_AXES, DEFAULT_RULES

BLOCKS = (512, 256, 128)  # the block sizes tried, largest first (TPU tiles of 128)


def block_size(seq_len: int) -> int:
    """The largest of ``BLOCKS`` that divides ``seq_len``.

    Raises:
      ValueError: none does (pad the rows to a multiple of 128: data.pad_to_multiple_of).
    """
    for b in BLOCKS:
        if seq_len % b == 0:
            return b
    raise ValueError(f"splash attention needs a sequence length divisible by 128, got "
                     f"{seq_len} (set data.pad_to_multiple_of to a multiple of 128)")


def _kernel(heads: int, seq_len: int, window: int | None, softcap: float | None,
            interpret: bool):
    """A splash kernel for ``heads`` heads of ``seq_len`` tokens: causal, or causal within
    the last ``window`` positions."""
    shape = (seq_len, seq_len)
    one = (sm.CausalMask(shape) if window is None
           else sm.LocalMask(shape, window_size=(window - 1, 0), offset=0))
    b = block_size(seq_len)
    blocks = sk.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                           block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                           block_kv_dq=b)
    # Made inside the trace that calls it (its mask tables become that trace's constants;
    # a kernel cached across traces would carry another trace's values).
    return sk.make_splash_mha(sm.MultiHeadMask([one] * heads), head_shards=1, q_seq_shards=1,
                              block_sizes=blocks, attn_logits_soft_cap=softcap,
                              interpret=interpret)


def _attend(q_bhtd, k_bhtd, v_bhtd, segment_ids_bt, *, window, softcap, interpret):
    """The kernel over a (per-device) batch: ``[B, H, T, hd]`` in and out."""
    kernel = _kernel(q_bhtd.shape[1], q_bhtd.shape[2], window, softcap, interpret)
    seg = sk.SegmentIds(q=segment_ids_bt, kv=segment_ids_bt)
    return jax.vmap(kernel)(q_bhtd, k_bhtd, v_bhtd, segment_ids=seg)


def splash_attention(q_bthk, k_bskh, v_bskh, segment_ids_bt, *, scale: float,
                     window: int | None = None, softcap: float | None = None,
                     sliding=None, rules=None):
    """Causal grouped-query attention by the splash kernel.

    Args:
      q_bthk: queries ``[B, T, H, hd]``; k_bskh, v_bskh: ``[B, T, KV, hd]`` (the same T).
      segment_ids_bt: int ``[B, T]``: a token attends to the earlier tokens of its own
        segment; padding is a segment of its own (0), whose outputs nobody reads.
      scale: the factor on the scores (applied to the queries).
      window: the sliding layers' window (None: no sliding layer).
      softcap: Gemma 2's attention-logit soft-cap, or None.
      sliding: a (traced) bool: this layer slides. None: every layer slides iff
        ``window`` is set.
      rules: the logical rules (the heads' mesh axis for ``shard_map``).

    Returns:
      ``[B, T, H, hd]`` in the queries' dtype.
    """
    B, T, H, hd = q_bthk.shape
    groups = H // k_bskh.shape[2]
    q = jnp.swapaxes(q_bthk * jnp.asarray(scale, q_bthk.dtype), 1, 2)
    k = jnp.swapaxes(jnp.repeat(k_bskh, groups, axis=2), 1, 2)
    v = jnp.swapaxes(jnp.repeat(v_bskh, groups, axis=2), 1, 2)
    seg = segment_ids_bt.astype(jnp.int32)
    interpret = _platform() != "tpu"
    cap = None if not softcap else float(softcap)

    def local(q, k, v, seg):
        if window is None or sliding is False:
            return _attend(q, k, v, seg, window=None, softcap=cap, interpret=interpret)
        if sliding is None or sliding is True:
            return _attend(q, k, v, seg, window=window, softcap=cap, interpret=interpret)
        return jax.lax.cond(
            sliding,
            lambda *a: _attend(*a, window=window, softcap=cap, interpret=interpret),
            lambda *a: _attend(*a, window=None, softcap=cap, interpret=interpret),
            q, k, v, seg)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        out = local(q, k, v, seg)
    else:
        rows = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
        heads = _heads_axis(rules, mesh, H)
        spec = P(rows or None, heads, None, None)
        out = jax.shard_map(local, in_specs=(spec, spec, spec, P(rows or None, None)),
                            out_specs=spec, check_vma=False)(q, k, v, seg)
    return jnp.swapaxes(out, 1, 2).astype(q_bthk.dtype)


def _platform() -> str:
    """The platform the step is compiled for: the devices of the mesh in context (a TPU
    topology compiled ahead of time on a CPU host counts as TPU), else the default
    backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _heads_axis(rules, mesh, heads: int):
    """The mesh axis the heads are split over (the rules' "heads" entry where it divides
    them), else None."""
    table = dict(reversed(list(DEFAULT_RULES if rules is None else rules)))
    axis = table.get("heads")
    if isinstance(axis, str) and axis in mesh.axis_names and heads % mesh.shape[axis] == 0:
        return axis
    return None
