"""LoRA adapters on the decoder's linear weights: the ``model.lora`` config section and its
check, which weights (PEFT's targets), their layout, init, low-rank update and merge.
(Applying them to a whole decoder, load / split / merged, is ``lora_decoder``; PEFT folders
are ``peft_io``.)

An adapter on weight row ``name`` of the weight table (``q``, ``k``, ``v``, ``o``,
``gate``, ``up``, ``down``; PEFT calls them ``q_proj`` ... ``down_proj``) is a pair of
stacked factors held by the layer stack as ``nnx.LoRAParam`` variables (a parameter type
of their own, so training can take gradients, optimizer state and checkpoints of them
alone while the base stays frozen):

- ``{name}_lora_a``: ``[L, *in_dims, r]``   (PEFT ``lora_A.weight`` is ``[r, in]``)
- ``{name}_lora_b``: ``[L, r, *out_dims]``  (PEFT ``lora_B.weight`` is ``[out, r]``)

where ``in_dims`` / ``out_dims`` are the row's own axes: our weights are laid out inputs
first, outputs last (``q`` is ``[D, H, hd]``, ``o`` is ``[H, hd, D]``), so the update of a
layer's weight is ``scale * tensordot(A, B, 1)``, already in the weight's layout.
``scale`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). B starts at exactly zero for
every init, so the adapted model equals the base at step 0.

Layers an adapter does not cover (PEFT ``layers_to_transform``) keep their rows of the
stacked factors at zero and masked out of the forward, so they never train.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mio_jax.errors import ConfigError

# PEFT module name -> our weight-table row, and back.
PEFT_TARGETS: dict[str, str] = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
}
ROW_TO_PEFT: dict[str, str] = {v: k for k, v in PEFT_TARGETS.items()}
# HF module path of each row (layer {i}), the string a PEFT regex is matched against.
HF_MODULES: dict[str, str] = {
    "q": "model.layers.{i}.self_attn.q_proj", "k": "model.layers.{i}.self_attn.k_proj",
    "v": "model.layers.{i}.self_attn.v_proj", "o": "model.layers.{i}.self_attn.o_proj",
    "gate": "model.layers.{i}.mlp.gate_proj", "up": "model.layers.{i}.mlp.up_proj",
    "down": "model.layers.{i}.mlp.down_proj",
}
ALL_LINEAR = tuple(PEFT_TARGETS)
# How a LoRA run's frozen base is stored (``model.lora.quantize``): as loaded, quantized by
# qwix's rules (``quant.QWIX_KINDS``), or kept as the GGUF file's own blocks.
BASE_STORAGES = ("none", "int8", "nf4", "gguf")
INITS = ("default", "gaussian")
RANK_AXIS = "lora_rank"  # logical axis of the rank dimension (replicated)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The adapters of a model (hashable: part of the ModelConfig and the jit cache key).

    Attributes:
      rank: r, the inner dimension of every adapter.
      alpha: the scale numerator (PEFT ``lora_alpha``).
      targets: ``(row, layers)`` pairs in weight-table order: the rows carrying an
        adapter and, for each, the layer indices it covers (sorted).
      dropout: dropout rate on the adapter's input while training (PEFT ``lora_dropout``).
      use_rslora: scale ``alpha / sqrt(rank)`` instead of ``alpha / rank``.
      init: "default" (PEFT's: A Kaiming-uniform, B zeros) or "gaussian" (A normal with
        std 1/r, B zeros).
      num_layers: layers of the model (to tell a full cover from a partial one).
    """

    rank: int
    alpha: float
    targets: tuple[tuple[str, tuple[int, ...]], ...]
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"
    num_layers: int = 0

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def rows(self) -> tuple[str, ...]:
        return tuple(r for r, _ in self.targets)

    def layers(self, row: str) -> tuple[int, ...]:
        return dict(self.targets)[row]

    def partial(self, row: str) -> bool:
        """Whether ``row``'s adapter covers only some layers (then masked in the forward)."""
        return len(self.layers(row)) != self.num_layers

    def layer_mask(self, row: str) -> jax.Array:
        """float32 ``[L]``: 1 on the layers the adapter covers."""
        mask = [0.0] * self.num_layers
        for i in self.layers(row):
            mask[i] = 1.0
        return jnp.asarray(mask, jnp.float32)


def resolve_targets(target_modules: str | Sequence[str], num_layers: int,
                    layers_to_transform: Sequence[int] | None = None,
                    *, key: str = "model.lora.target_modules",
                    rows: Sequence[str] | None = None
                    ) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The ``(row, layers)`` pairs named by PEFT-style ``target_modules``.

    Args:
      target_modules: a list of PEFT module names (``q_proj``, ..., ``down_proj``), the
        string "all-linear" (all seven), a comma-separated list of names, or a regex
        (PEFT's rule for a string: full match against each module path such as
        ``model.layers.3.self_attn.q_proj``).
      num_layers: the model's layers.
      layers_to_transform: only these layer indices (PEFT's option); None = all.
      key: the config key named in errors.
      rows: the rows the model has (a mixture of experts has q, k, v, o: its experts'
        projections take no adapters, as PEFT's all-linear finds no linear module in
        transformers' fused experts); None: all seven.

    Returns:
      Pairs in weight-table order, each with its sorted layer indices.

    Raises:
      ValueError naming ``key``: an unknown module name, a module the model lacks, or
        nothing matched.
    """
    have = set(HF_MODULES if rows is None else rows)
    wanted_layers = (set(range(num_layers)) if layers_to_transform is None
                     else {int(i) for i in layers_to_transform})
    bad = sorted(i for i in wanted_layers if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"{key}: layers_to_transform {bad} outside 0..{num_layers - 1}")
    if isinstance(target_modules, str):
        text = target_modules.strip()
        if text == "all-linear":
            names: Sequence[str] | None = [n for n in ALL_LINEAR if PEFT_TARGETS[n] in have]
        elif re.fullmatch(r"[A-Za-z_]+(\s*,\s*[A-Za-z_]+)*", text):
            names = [n.strip() for n in text.split(",")]
        else:
            names = None
            try:
                pattern = re.compile(text)
            except re.error as e:
                raise ValueError(f"{key}={text!r} is neither module names nor a valid regex: "
                                 f"{e}") from e
    else:
        names = list(target_modules)
    picked: dict[str, set[int]] = {}
    if names is not None:
        unknown = [n for n in names if n not in PEFT_TARGETS]
        if unknown:
            raise ValueError(f"{key}: unknown module name(s) {unknown}; the decoder's linear "
                             f"modules are {list(PEFT_TARGETS)} (or 'all-linear', or a regex)")
        missing = [n for n in names if PEFT_TARGETS[n] not in have]
        if missing:
            raise ValueError(f"{key}: {missing} are not linear modules of this model (a "
                             "mixture of experts' experts take no adapters); its modules: "
                             f"{[ROW_TO_PEFT[r] for r in HF_MODULES if r in have]}")
        for n in names:
            picked[PEFT_TARGETS[n]] = set(wanted_layers)
    else:
        for row, template in HF_MODULES.items():
            if row not in have:
                continue
            hit = {i for i in range(num_layers) if pattern.fullmatch(template.format(i=i))}
            if hit & wanted_layers:
                picked[row] = hit & wanted_layers
    if not picked:
        raise ValueError(f"{key}={target_modules!r} matches no linear module of the model "
                         f"(module paths look like {HF_MODULES['q'].format(i=0)!r})")
    order = list(HF_MODULES)
    return tuple((row, tuple(sorted(picked[row]))) for row in order if row in picked)


def make_spec(*, rank: int, alpha: float, target_modules, num_layers: int,
              layers_to_transform=None, dropout: float = 0.0, use_rslora: bool = False,
              init: str = "default", prefix: str = "model.lora.",
              rows: Sequence[str] | None = None) -> LoraSpec:
    """A checked ``LoraSpec``; errors name the config key (``prefix`` + field); ``rows``:
    the model's linear rows (``resolve_targets``)."""
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"{prefix}rank={rank!r} must be a positive integer")
    if not alpha > 0:
        raise ValueError(f"{prefix}alpha={alpha!r} must be > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{prefix}dropout={dropout!r} must be in [0, 1)")
    if init not in INITS:
        raise ValueError(f"{prefix}init={init!r}; choose one of {list(INITS)}")
    targets = resolve_targets(target_modules, num_layers, layers_to_transform,
                              key=f"{prefix}target_modules", rows=rows)
    return LoraSpec(rank=rank, alpha=float(alpha), targets=targets, dropout=float(dropout),
                    use_rslora=bool(use_rslora), init=init, num_layers=num_layers)


def enabled(config) -> bool:
    """Whether a training config trains LoRA adapters (``model.lora.enabled``)."""
    return bool(config.model.lora.enabled)


def spec_from_config(config, num_layers: int, rows: Sequence[str] | None = None
                     ) -> LoraSpec | None:
    """The ``LoraSpec`` of ``config.model.lora`` for a model of ``num_layers`` layers
    whose linear rows are ``rows`` (None: all seven), or None when LoRA is off. Raises
    ValueError naming the key."""
    c = config.model.lora
    if not c.enabled:
        return None
    layers = None if c.layers_to_transform is None else tuple(c.layers_to_transform)
    return make_spec(rank=c.rank, alpha=c.alpha, target_modules=c.target_modules,
                     num_layers=num_layers, layers_to_transform=layers, dropout=c.dropout,
                     use_rslora=c.use_rslora, init=c.init, rows=rows)


def validate_section(cfg, defaults) -> None:
    """``model.lora.*`` of a training config: values in range, targets that parse, options
    that fit together; with LoRA off, no other ``model.lora`` key changed from ``defaults``
    (a LoRA setting given without ``enabled=True`` would otherwise train every weight and
    write no adapter).

    Raises:
      ConfigError naming the key.
    """
    c = cfg.model.lora
    if not c.enabled:
        for key in sorted(k for k in defaults if k != "enabled"):
            if c.get(key) != defaults[key]:
                raise ConfigError(
                    f"model.lora.{key}={c[key]!r} is set but model.lora.enabled=False: LoRA is "
                    f"off, so every weight would train and no adapter would be written; set "
                    f"model.lora.enabled=True (or leave model.lora.{key} at {defaults[key]!r})")
        return
    try:  # structure only: the layer count is known once the model is read
        layers = c.layers_to_transform
        spec_from_config(cfg, max(layers) + 1 if layers else 1)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if c.quantize not in BASE_STORAGES:
        raise ConfigError(f"model.lora.quantize={c.quantize!r}; choose one of "
                          f"{list(BASE_STORAGES)}")
    if c.quantize == "gguf":
        path = str(cfg.model.path)
        if not (path == "smollm2" or path.endswith(".gguf")):
            raise ConfigError(f"model.lora.quantize='gguf' keeps a GGUF file's blocks, but "
                              f"model.path={path!r} is not a .gguf file (use 'nf4' or 'int8')")
        if c.base_adapters:
            raise ConfigError("model.lora.base_adapters cannot be merged into GGUF blocks "
                              "(model.lora.quantize='gguf'); use quantize='nf4' or 'none'")


def factor_axes(row_axes: tuple[str, ...], hf_axes: tuple[tuple[str, ...], ...]
                ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Logical axes (per layer) of A and B for a weight row with ``row_axes`` (ours) and
    ``hf_axes`` (HF's ``(out_group, in_group)``): A = ``in + (rank,)``, B = ``(rank,) + out``."""
    out_group, in_group = hf_axes
    n_in = len(in_group)
    if tuple(row_axes[:n_in]) != tuple(in_group) or tuple(row_axes[n_in:]) != tuple(out_group):
        raise AssertionError(f"weight axes {row_axes} are not inputs-then-outputs {hf_axes}")
    return tuple(in_group) + (RANK_AXIS,), (RANK_AXIS,) + tuple(out_group)


def init_factors(key: jax.Array, a_shape, b_shape, spec: LoraSpec, dtype):
    """``(A, B)`` for one stacked row: B zeros; A per ``spec.init``.

    "default" follows PEFT (``nn.init.kaiming_uniform_(a=sqrt(5))`` on ``lora_A``, a
    uniform bound of ``1/sqrt(fan_in)``); "gaussian" draws A from N(0, 1/r).
    """
    fan_in = math.prod(a_shape[1:-1])
    if spec.init == "gaussian":
        a = jax.random.normal(key, a_shape, jnp.float32) / spec.rank
    else:
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
    return a.astype(dtype), jnp.zeros(b_shape, dtype)


@jax.custom_vjp
def _low_rank(x_ni, a_ir, b_ro, scale):
    """``scale * (x @ A) @ B`` on flattened operands, with a hand-written backward.

    Every gradient is a matmul whose large operand (``x`` or the output gradient,
    ``[tokens, width]``) stays in row-major order: only the small factors and the
    ``[tokens, r]`` intermediate are transposed. Left to autodiff, XLA:CPU writes the
    ``[tokens, width]`` output gradient transposed for ``dB`` in slow strided loops
    (22 % of a SmolLM2 LoRA step before this).
    """
    return _low_rank_fwd(x_ni, a_ir, b_ro, scale)[0]


def _low_rank_fwd(x_ni, a_ir, b_ro, scale):
    low = jnp.matmul(x_ni, a_ir)
    return jnp.matmul(low, b_ro) * scale.astype(x_ni.dtype), (x_ni, a_ir, b_ro, low, scale)


def _low_rank_bwd(res, g_no):
    x, a, b, low, scale = res
    g = g_no * scale.astype(g_no.dtype)
    low_t, b_t, a_t = jax.lax.optimization_barrier((low.T, b.T, a.T))
    d_b = jnp.matmul(low_t, g)                        # [r, out]
    d_low = jnp.matmul(g, b_t)                        # [N, r]
    d_low_t = jax.lax.optimization_barrier(d_low.T)   # [r, N], small
    d_a = jnp.matmul(d_low_t, x).T                    # [in, r]
    d_x = jnp.matmul(d_low, a_t)                      # [N, in]
    return d_x, d_a.astype(a.dtype), d_b.astype(b.dtype), jnp.zeros_like(scale)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def delta(x, a, b, scale, *, n_in: int, dropout: float = 0.0, key=None):
    """The adapter's contribution ``scale * ((dropout(x) @ A) @ B)`` for one layer.

    Args:
      x: the layer input ``[B, T, *in_dims]``.
      a: ``[*in_dims, r]``; b: ``[r, *out_dims]`` (compute dtype).
      scale: ``LoraSpec.scale`` (times the layer mask for partial covers; may be traced).
      n_in: number of input dims.
      dropout: the rate; applied when ``key`` is given.
      key: PRNG key of this layer and row (None: no dropout, e.g. eval).

    Returns:
      ``[B, T, *out_dims]`` in ``x``'s dtype.
    """
    if key is not None and dropout > 0.0:
        keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    lead, out_dims = x.shape[:2], b.shape[1:]
    r = a.shape[-1]
    flat = _low_rank(x.reshape(math.prod(lead), -1), a.reshape(-1, r), b.reshape(r, -1),
                     jnp.asarray(scale, jnp.float32))
    return flat.reshape(*lead, *out_dims).astype(x.dtype)


def merged_weight(w, a, b, scale, mask=None):
    """A stacked row with its adapter merged in: ``w + scale * mask[l] * (A[l] . B[l])``,
    computed in float32 and cast back to ``w``'s dtype (merging in a low precision would
    round the update away).

    Args:
      w: ``[L, *in_dims, *out_dims]``; a: ``[L, *in_dims, r]``; b: ``[L, r, *out_dims]``.
      scale: ``LoraSpec.scale``.
      mask: optional ``[L]`` layer mask (partial covers).
    """
    upd = jax.vmap(lambda aa, bb: jnp.tensordot(aa, bb, axes=1))(
        a.astype(jnp.float32), b.astype(jnp.float32))
    s = jnp.float32(scale) if mask is None else scale * mask.reshape((-1,) + (1,) * (w.ndim - 1))
    return (w.astype(jnp.float32) + s * upd).astype(w.dtype)
