"""The weight tables of the decoder families: one row per parameter, read by every I/O path.

Each `WeightSpec` row names one parameter of `llama.Decoder` and says how it is stored
elsewhere: its Hugging Face tensor name (`{i}` = layer index for stacked rows), its GGUF
name, and its layout as logical axes. `axes` are the axes of our array (per layer);
`hf_axes` lists HF's dimensions in HF order, each a group of our axes flattened
together, so `q` (ours `[D, H, hd]`) is `(("heads", "head_dim"), ("embed",))`, HF's
`[H*hd, D]`. Shapes, the transposes between the two layouts and the logical names used
for sharding all follow from these two fields and `axis_sizes(cfg)`.

The table drives:
- `llama.Decoder` init (which parameters exist, their shapes, logical axes, initialiser);
- `hf_io.load_pretrained` (names and shapes checked against the checkpoint, HF -> ours);
- `hf_io.save_pretrained` / `hf_state_dict` (ours -> HF);
- `gguf_io` (GGUF names, their HF names, the shape checks, the llama.cpp q/k row order).

Llama, Mistral, Qwen2, Qwen3 and SmolLM2 (tied embeddings) share the table: rows that
only some of them have are switched on by a `ModelConfig` flag (`when`). The Gemma tables
are built from it (`_gemma_table`). Adding a weight
is adding a row here (and using it in `llama._block`). Row order is the initialisation
order of the random parameters, so it fixes what `init_model(cfg, seed)` draws.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping

import numpy as np

from mio_jax.models.config import ModelConfig
from mio_jax.models.lora import ROW_TO_PEFT

Shape = tuple[int, ...]


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
    """Size of every logical weight axis for `cfg` (`layers` included)."""
    return {
        "layers": cfg.num_hidden_layers,
        "vocab": cfg.vocab_size,
        "embed": cfg.hidden_size,
        "norm": cfg.hidden_size,
        "mlp": cfg.intermediate_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "experts": cfg.num_experts,
        "expert_mlp": cfg.moe_intermediate_size,
    }


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One parameter: our path, its HF and GGUF names, layouts and initialiser.

    Attributes:
      path: path in the nnx state, `("embed",)` or `("layers", "q")` (stacked on `layers`).
      hf: HF tensor name; contains `{i}` for per-layer tensors, and `{j}` too for a
        mixture of experts' per-expert tensors (our array's axes then start with
        `experts`: one HF tensor per layer and expert).
      gguf: llama.cpp tensor name; `{i}` likewise.
      axes: logical axes of our per-layer array, e.g. `("embed", "heads", "head_dim")`.
      hf_axes: HF dimensions in HF order, each a tuple of our axes flattened into it.
      init: "normal" (0.02 std), "unit_normal" (std 1), "ones" or "zeros".
      when: ModelConfig bool field that must hold for the row to exist, optionally
        prefixed by "not "; None = always present.
      gguf_rows_per: llama.cpp permutes this tensor's rows per head of this axis
        ("heads" / "kv_heads") in Llama GGUF files; None = stored in HF row order.
    """

    path: tuple[str, ...]
    hf: str
    gguf: str
    axes: tuple[str, ...]
    hf_axes: tuple[tuple[str, ...], ...]
    init: str = "normal"
    when: str | None = None
    gguf_rows_per: str | None = None

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    @property
    def per_expert(self) -> bool:
        return "{j}" in self.hf

    @property
    def tensor_axes(self) -> tuple[str, ...]:
        """Our axes of the part one HF tensor holds (`axes` without `experts` for a
        per-expert row)."""
        return self.axes[1:] if self.per_expert else self.axes

    @property
    def logical_axes(self) -> tuple[str, ...]:
        """Logical axes of the whole parameter (`layers` first when stacked)."""
        return (("layers",) if self.stacked else ()) + self.axes

    def enabled(self, cfg: ModelConfig) -> bool:
        """Whether `Decoder(cfg)` has this parameter (and its checkpoints this tensor)."""
        if self.when is None:
            return True
        negate = self.when.startswith("not ")
        return bool(getattr(cfg, self.when.removeprefix("not "))) != negate

    def shape(self, cfg: ModelConfig) -> Shape:
        """Shape of our parameter (with the leading layer axis when stacked)."""
        sizes = axis_sizes(cfg)
        return tuple(sizes[a] for a in self.logical_axes)

    def hf_shape(self, cfg: ModelConfig) -> Shape:
        """Shape of one HF tensor of this row (one layer's, one expert's)."""
        sizes = axis_sizes(cfg)
        return tuple(math.prod(sizes[a] for a in group) for group in self.hf_axes)

    def hf_names(self, cfg: ModelConfig) -> list[str]:
        """HF names, one per layer for a stacked row (layer order; per expert within a
        layer for a per-expert row), else one."""
        return _expand(self.hf, cfg)

    def hf_index(self, cfg: ModelConfig) -> list[tuple[int, ...]]:
        """Where each of `hf_names` goes in our array: `(layer,)`, `(layer, expert)` or `()`."""
        if not self.stacked:
            return [()]
        if not self.per_expert:
            return [(i,) for i in range(cfg.num_hidden_layers)]
        return [(i, j) for i in range(cfg.num_hidden_layers) for j in range(cfg.num_experts)]

    def gguf_names(self, cfg: ModelConfig) -> list[str]:
        """GGUF names, in the same order as `hf_names`."""
        return _expand(self.gguf, cfg)

    def _order(self) -> tuple[int, ...]:
        """Positions in `axes` of HF's axes, flattened in HF order."""
        flat = [a for group in self.hf_axes for a in group]
        axes = self.tensor_axes
        if sorted(flat) != sorted(axes):
            raise AssertionError(f"{self.path}: hf_axes {self.hf_axes} do not regroup {axes}")
        return tuple(axes.index(a) for a in flat)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """One HF tensor's part of our array (a layer's; a layer's expert's) -> HF layout
        (a view where possible; numpy or jax)."""
        sizes = dict(zip(self.tensor_axes, ours.shape))
        moved = ours.transpose(self._order())
        return moved.reshape(tuple(math.prod(sizes[a] for a in g) for g in self.hf_axes))

    def from_hf(self, hf: np.ndarray, cfg: ModelConfig) -> np.ndarray:
        """One HF tensor -> our per-layer layout (a view where possible; numpy or jax)."""
        sizes = axis_sizes(cfg)
        order = self._order()
        split = hf.reshape(tuple(sizes[self.tensor_axes[j]] for j in order))
        return split.transpose(tuple(int(i) for i in np.argsort(order)))


def _expand(pattern: str, cfg: ModelConfig) -> list[str]:
    if "{i}" not in pattern:
        return [pattern]
    if "{j}" not in pattern:
        return [pattern.format(i=i) for i in range(cfg.num_hidden_layers)]
    return [pattern.format(i=i, j=j) for i in range(cfg.num_hidden_layers)
            for j in range(cfg.num_experts)]


def _layer(name: str, hf: str, gguf: str, axes, hf_axes, init="normal", when=None, rows=None):
    return WeightSpec(("layers", name), f"model.layers.{{i}}.{hf}", f"blk.{{i}}.{gguf}",
                      tuple(axes), tuple(tuple(g) for g in hf_axes), init, when, rows)


_D, _F, _HD = ("embed",), ("mlp",), ("heads", "head_dim")
_KVD = ("kv_heads", "head_dim")

# Llama / Mistral / Qwen2 / Qwen3 / SmolLM2. HF linear weights are [out, in], ours [in, out].
LLAMA_FAMILY: tuple[WeightSpec, ...] = (
    WeightSpec(("embed",), "model.embed_tokens.weight", "token_embd.weight",
               ("vocab", "embed"), (("vocab",), _D), "unit_normal"),
    _layer("attn_norm", "input_layernorm.weight", "attn_norm.weight", ("norm",), [("norm",)], "ones"),
    _layer("q", "self_attn.q_proj.weight", "attn_q.weight", _D + _HD, [_HD, _D], rows="heads"),
    _layer("k", "self_attn.k_proj.weight", "attn_k.weight", _D + _KVD, [_KVD, _D], rows="kv_heads"),
    _layer("v", "self_attn.v_proj.weight", "attn_v.weight", _D + _KVD, [_KVD, _D]),
    _layer("o", "self_attn.o_proj.weight", "attn_output.weight", _HD + _D, [_D, _HD]),
    _layer("mlp_norm", "post_attention_layernorm.weight", "ffn_norm.weight", ("norm",),
           [("norm",)], "ones"),
    _layer("gate", "mlp.gate_proj.weight", "ffn_gate.weight", _D + _F, [_F, _D], when="not moe"),
    _layer("up", "mlp.up_proj.weight", "ffn_up.weight", _D + _F, [_F, _D], when="not moe"),
    _layer("down", "mlp.down_proj.weight", "ffn_down.weight", _F + _D, [_D, _F], when="not moe"),
    _layer("q_bias", "self_attn.q_proj.bias", "attn_q.bias", _HD, [_HD], "zeros", "qkv_bias", "heads"),
    _layer("k_bias", "self_attn.k_proj.bias", "attn_k.bias", _KVD, [_KVD], "zeros", "qkv_bias",
           "kv_heads"),
    _layer("v_bias", "self_attn.v_proj.bias", "attn_v.bias", _KVD, [_KVD], "zeros", "qkv_bias"),
    _layer("o_bias", "self_attn.o_proj.bias", "attn_output.bias", _D, [_D], "zeros", "o_bias"),
    _layer("gate_bias", "mlp.gate_proj.bias", "ffn_gate.bias", _F, [_F], "zeros", "mlp_bias"),
    _layer("up_bias", "mlp.up_proj.bias", "ffn_up.bias", _F, [_F], "zeros", "mlp_bias"),
    _layer("down_bias", "mlp.down_proj.bias", "ffn_down.bias", _D, [_D], "zeros", "mlp_bias"),
    _layer("q_norm", "self_attn.q_norm.weight", "attn_q_norm.weight", ("head_dim",),
           [("head_dim",)], "ones", "qk_norm"),
    _layer("k_norm", "self_attn.k_norm.weight", "attn_k_norm.weight", ("head_dim",),
           [("head_dim",)], "ones", "qk_norm"),
    WeightSpec(("final_norm",), "model.norm.weight", "output_norm.weight", ("norm",), (("norm",),),
               "ones"),
    WeightSpec(("lm_head",), "lm_head.weight", "output.weight", ("vocab", "embed"), (("vocab",), _D),
               "normal", "not tie_word_embeddings"),
)



def _gemma_table(sandwich: bool) -> tuple[WeightSpec, ...]:
    """The Gemma tables: the Llama rows with norms stored as offsets from 1 (zero-
    initialised); Gemma 2/3 (`sandwich`) add the norms after the attention and the MLP,
    and HF names its pre-MLP norm `pre_feedforward_layernorm` (Gemma 1 and Llama:
    `post_attention_layernorm`, the name Gemma 2/3 give the norm after the attention)."""
    rows = []
    for spec in LLAMA_FAMILY:
        if spec.path[-1].endswith("norm"):
            spec = dataclasses.replace(spec, init="zeros")
        if sandwich and spec.path == ("layers", "mlp_norm"):
            spec = dataclasses.replace(spec, hf="model.layers.{i}.pre_feedforward_layernorm.weight")
        rows.append(spec)
        if sandwich and spec.path == ("layers", "o"):
            rows.append(_layer("attn_post_norm", "post_attention_layernorm.weight",
                               "post_attention_norm.weight", ("norm",), [("norm",)], "zeros",
                               "sandwich_norms"))
        if sandwich and spec.path == ("layers", "down"):
            rows.append(_layer("mlp_post_norm", "post_feedforward_layernorm.weight",
                               "post_ffw_norm.weight", ("norm",), [("norm",)], "zeros",
                               "sandwich_norms"))
    return tuple(rows)


def _moe_table(prefix: str, names: tuple[str, str, str]) -> tuple[WeightSpec, ...]:
    """The Llama rows with the MLP replaced by a router `[D, E]` and stacked experts
    (`[E, D, F]` gate and up, `[E, F, D]` down), HF's per-expert tensors under `prefix`
    (`mlp` in Qwen3-MoE, `block_sparse_moe` in Mixtral) named `names` (gate, up, down)."""
    e, xf = ("experts",), ("expert_mlp",)
    gate, up, down = names
    rows = []
    for spec in LLAMA_FAMILY:
        if spec.path[-1] in ("gate", "up", "down"):
            continue
        rows.append(spec)
        if spec.path == ("layers", "mlp_norm"):
            rows += [
                _layer("router", f"{prefix}.gate.weight", "ffn_gate_inp.weight", _D + e,
                       [e, _D], when="moe"),
                _layer("expert_gate", f"{prefix}.experts.{{j}}.{gate}.weight",
                       "ffn_gate_exps.weight", e + _D + xf, [xf, _D], when="moe"),
                _layer("expert_up", f"{prefix}.experts.{{j}}.{up}.weight", "ffn_up_exps.weight",
                       e + _D + xf, [xf, _D], when="moe"),
                _layer("expert_down", f"{prefix}.experts.{{j}}.{down}.weight",
                       "ffn_down_exps.weight", e + xf + _D, [_D, xf], when="moe"),
            ]
    return tuple(rows)


QWEN3_MOE_FAMILY = _moe_table("mlp", ("gate_proj", "up_proj", "down_proj"))
MIXTRAL_FAMILY = _moe_table("block_sparse_moe", ("w1", "w3", "w2"))
GEMMA_FAMILY = _gemma_table(sandwich=False)
GEMMA2_FAMILY = _gemma_table(sandwich=True)  # Gemma 2 and Gemma 3 (text)

# model_type -> weight table.
TABLES: dict[str, tuple[WeightSpec, ...]] = {
    "llama": LLAMA_FAMILY, "mistral": LLAMA_FAMILY, "qwen2": LLAMA_FAMILY, "qwen3": LLAMA_FAMILY,
    "gemma": GEMMA_FAMILY, "gemma2": GEMMA2_FAMILY, "gemma3_text": GEMMA2_FAMILY,
    "qwen3_moe": QWEN3_MOE_FAMILY, "mixtral": MIXTRAL_FAMILY,
}


def weight_specs(cfg: ModelConfig) -> tuple[WeightSpec, ...]:
    """The rows of `cfg`'s family that exist for `cfg`, in table order.

    Args:
      cfg: the model's config (its flags pick the optional rows).

    Returns:
      One `WeightSpec` per parameter of `Decoder(cfg)`.
    """
    return tuple(s for s in TABLES[cfg.model_type] if s.enabled(cfg))


def stacked_specs(cfg: ModelConfig) -> dict[str, WeightSpec]:
    """The per-layer rows of `cfg` (stacked on `layers`) by name: `{"q": spec, ...}`."""
    return {s.path[-1]: s for s in weight_specs(cfg) if s.stacked}


def linear_specs(cfg: ModelConfig) -> dict[str, WeightSpec]:
    """The rows of ``cfg`` that adapters (and a quantized base) apply to: the seven
    per-layer linear weights, by row name."""
    return {n: s for n, s in stacked_specs(cfg).items() if n in ROW_TO_PEFT}


def hf_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Every HF tensor name of a `cfg` checkpoint -> its HF shape, in table/layer order."""
    return {name: s.hf_shape(cfg) for s in weight_specs(cfg) for name in s.hf_names(cfg)}


def gguf_shapes(cfg: ModelConfig) -> dict[str, Shape]:
    """Every GGUF tensor name of a `cfg` model -> its numpy shape (= the HF shape)."""
    return {name: s.hf_shape(cfg) for s in weight_specs(cfg) for name in s.gguf_names(cfg)}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_GGUF_PATTERNS = [(_pattern(s.gguf), s) for s in LLAMA_FAMILY]


def gguf_lookup(gguf_name: str) -> tuple[WeightSpec, int | None]:
    """The row and layer index (None if not stacked) of a GGUF tensor name.

    Args:
      gguf_name: e.g. `blk.3.attn_q.weight`.

    Returns:
      `(spec, layer)`.

    Raises:
      KeyError: no row has this GGUF name.
    """
    for pattern, spec in _GGUF_PATTERNS:
        m = pattern.match(gguf_name)
        if m:
            return spec, int(m["i"]) if spec.stacked else None
    raise KeyError(gguf_name)


def hf_name_of_gguf(gguf_name: str) -> str:
    """The HF name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`).

    Raises:
      KeyError: not a tensor of the table.
    """
    spec, layer = gguf_lookup(gguf_name)
    return spec.hf if layer is None else spec.hf.format(i=layer)


def _listed(names: list[str]) -> str:
    return f"{names[:8]}{' ...' if len(names) > 8 else ''} ({len(names)} in all)"


def check_tensors(expected: Mapping[str, Shape], found: Mapping[str, Shape], *, origin: str,
                  model_type: str, implied_by: str,
                  describe: Callable[[str], str] | None = None,
                  may_skip: Callable[[str], bool] = lambda name: False) -> None:
    """Raises unless `found` has exactly the `expected` tensors with the expected shapes.

    Args:
      expected: name -> shape from the table (`hf_shapes` / `gguf_shapes`).
      found: name -> shape in the checkpoint.
      origin: the checkpoint, named first in every message.
      model_type: named in the message about unexpected tensors.
      implied_by: what the expected shapes come from ("config.json", ...).
      describe: name -> "file: tensor 'name'" for shape errors (default: origin + name).
      may_skip: extra tensors for which this is True are accepted and ignored.

    Raises:
      ValueError naming the checkpoint and the missing, unexpected or mis-shaped tensors.
    """
    missing = [n for n in expected if n not in found]
    if missing:
        raise ValueError(f"{origin}: missing tensor(s) {_listed(missing)}")
    unexpected = sorted(n for n in found if n not in expected and not may_skip(n))
    if unexpected:
        raise ValueError(f"{origin}: unexpected tensor(s) {_listed(unexpected)} for model_type "
                         f"{model_type!r}")
    describe = describe or (lambda n: f"{origin}: tensor {n!r}")
    for name, want in expected.items():
        got = tuple(found[name])
        if got != tuple(want):
            raise ValueError(f"{describe(name)} has shape {got}, but {implied_by} implies "
                             f"{tuple(want)}")
