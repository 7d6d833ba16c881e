"""Decoder configuration read from (and written back to) a Hugging Face config.json dict."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mio_jax.errors import ConfigError
from mio_jax.layouts import check_completion_fraction
from mio_jax.models import lora as lora_lib

# model_type -> family: which of the family rules below `from_hf` applies.
_FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
}
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
MOE_TYPES = ("qwen3_moe", "mixtral")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")
# Multimodal checkpoints whose language model is read as a text decoder:
# model_type -> (the text model's model_type, its architecture).
MULTIMODAL = {"gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
# The MLP's gate activation: SiLU (SwiGLU, the Llama family) or GELU's tanh form (GeGLU,
# Gemma; HF's "gelu_pytorch_tanh", which Gemma 1's legacy "gelu" also means).
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "nothing_saveable")
DTYPES = ("float32", "bfloat16", "float16")
# "xla": attention written out in jnp (any backend and dtype; materialises the scores).
# "cudnn": cuDNN's fused flash attention (NVIDIA GPUs, bfloat16/float16 compute).
# "splash": the Pallas splash kernel (TPU; mio_jax.models.splash says which layouts it runs).
ATTENTION_IMPLS = ("xla", "cudnn", "splash")


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The config of the text decoder a config.json describes: itself, or a multimodal
    checkpoint's (`Gemma3ForConditionalGeneration`) `text_config`, with the top level's
    token ids where the text part lacks them."""
    known = MULTIMODAL.get(hf.get("model_type"))
    if known is None or "text_config" not in hf:
        return hf
    text = dict(hf["text_config"], model_type=known[0], architectures=[known[1]])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
        if key in hf and key not in hf["text_config"]:
            text[key] = hf[key]
    return text


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder of the Llama, Gemma or mixture-of-experts families.

    Fields mirror Hugging Face names where one exists. `dtype` is the compute dtype,
    `param_dtype` the storage dtype of the parameters; `scan_layers`, `remat_policy` and
    `attention` change how the layer stack is traced and run, not what it computes.

    The Gemma fields: `hidden_act` "gelu_pytorch_tanh" (GeGLU); `norm_weight_offset`
    (RMSNorm scales by `1 + w`, the product taken in float32); `sandwich_norms` (Gemma 2
    and 3: a norm after the attention and after the MLP as well as before them, rows
    `attn_post_norm` / `mlp_post_norm`); `scale_embeddings` (embeddings times
    `sqrt(hidden_size)`); `query_pre_attn_scalar` (scores scaled by its inverse square
    root instead of `head_dim`'s); `attn_logit_softcapping` and `final_logit_softcapping`
    (`cap * tanh(x / cap)` on the attention scores and the output logits); `layer_types`
    (HF's per-layer "sliding_attention" / "full_attention"; None: every layer slides when
    `sliding_window` is set, as in Mistral); `rope_local_theta` (Gemma 3: the sliding
    layers' RoPE base, without the global layers' scaling; None: one table for all).

    Mixture of experts (Qwen3-MoE, Mixtral): `num_experts` > 0 replaces every layer's MLP
    by that many experts of width `moe_intermediate_size`, each token sent to its
    `num_experts_per_tok` experts of highest router probability, their outputs weighted
    by those probabilities (renormalised over the chosen ones when `norm_topk_prob`).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of HF's dict
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    hidden_act: str = "silu"
    norm_weight_offset: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention: str = "xla"
    lora: Any = None  # mio_jax.models.lora.LoraSpec: adapters on the linear weights

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: expected one of {ACTIVATIONS}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                                 f"num_hidden_layers={self.num_hidden_layers}")
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad:
                raise ValueError(f"layer_types: unsupported {bad}; supported: {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types names sliding_attention layers but "
                                 "sliding_window is not set")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                             f"1..num_experts={self.num_experts}")
        if self.num_experts and self.moe_intermediate_size < 1:
            raise ValueError("a mixture of experts needs moe_intermediate_size >= 1")
        if self.attention == "cudnn" and self.attn_logit_softcapping:
            raise ValueError("attention='cudnn' has no attention-logit soft-capping "
                             f"(attn_logit_softcapping={self.attn_logit_softcapping}, as "
                             "in Gemma 2); use attention='xla'")
        check_compute_settings(dtype=self.dtype, param_dtype=self.param_dtype,
                               attention=self.attention, remat_policy=self.remat_policy)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def moe(self) -> bool:
        """Every layer's MLP is a mixture of experts."""
        return self.num_experts > 0

    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: whether its attention is limited to the last `sliding_window` keys."""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_hidden_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def mixed_layers(self) -> bool:
        """The layers differ in their mask or RoPE tables (Gemma 2/3's local/global mix):
        each layer call then picks its own from the two built per forward."""
        return len(set(self.sliding_layers())) > 1

    @property
    def attention_scale(self) -> float:
        """The factor on the attention scores: `query_pre_attn_scalar ** -0.5` or
        `head_dim ** -0.5`."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        """Builds a config from a Hugging Face config.json dict.

        Args:
          hf: the parsed config.json (transformers 4 `rope_theta`/`rope_scaling` or
            transformers 5 `rope_parameters` layout; a multimodal Gemma 3's gives its
            language model, `text_config`).
          **overrides: ModelConfig fields to set (dtype, param_dtype, scan_layers, ...).
        Returns:
          ModelConfig. Raises ValueError naming the key for unsupported families/options.
        """
        hf = text_config(hf)
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type not in _FAMILIES:
            raise ValueError(
                f"unsupported model_type {model_type!r} (architectures={archs}); supported: "
                f"{sorted(_FAMILIES)}")
        for arch in archs:
            if arch not in _ARCHITECTURES:
                raise ValueError(f"unsupported architecture {arch!r}; supported: "
                                 f"{sorted(_ARCHITECTURES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in hf:
                raise ValueError(f"config.json lacks required key {key!r}")
        family = _FAMILIES[model_type]
        gemma = model_type in GEMMA_TYPES
        act = hf.get("hidden_activation") or hf.get("hidden_act") or (
            "gelu_pytorch_tanh" if gemma else "silu")
        if gemma and act == "gelu":  # Gemma 1's legacy name for the tanh form (as HF reads it)
            act = "gelu_pytorch_tanh"
        act = "silu" if act == "swish" else act
        if act not in (("gelu_pytorch_tanh",) if gemma else ("silu",)):
            raise ValueError(f"unsupported hidden_act/hidden_activation {act!r} for "
                             f"model_type {model_type!r}")
        heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        rope = dict(hf.get("rope_parameters") or {})
        local_theta = None
        if family == "gemma3":
            # transformers 5: one dict per layer type; 4: rope_theta, rope_scaling and
            # rope_local_base_freq at the top level.
            local = rope.pop("sliding_attention", None)
            rope = dict(rope.pop("full_attention", None) or rope)
            local_theta = float((local or {}).get(
                "rope_theta", hf.get("rope_local_base_freq", 10000.0)))
            if local and local.get("rope_type", "default") != "default":
                raise ValueError("gemma3_text: sliding_attention rope_parameters of type "
                                 f"{local.get('rope_type')!r} are not supported (default only)")
            rope.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = hf.get("rope_scaling") or rope
        scaling = {k: v for k, v in dict(scaling or {}).items() if k != "rope_theta"}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type in ("llama3", "linear"):
            scaling = {k: v for k, v in scaling.items() if k != "type"}
            scaling["rope_type"] = rope_type
        else:
            raise ValueError(f"unsupported rope scaling type {rope_type!r} (rope_scaling/"
                             "rope_parameters); supported: default, linear, llama3")
        sliding = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3", "qwen3_moe"):
            if hf.get("use_sliding_window"):
                raise ValueError(f"{model_type}: use_sliding_window=True is not supported")
            sliding = None
        layers = int(hf["num_hidden_layers"])
        layer_types = hf.get("layer_types")
        if family in ("gemma2", "gemma3"):
            if hf.get("use_bidirectional_attention"):
                raise ValueError(f"{model_type}: use_bidirectional_attention=True (an encoder "
                                 "setting) is not supported")
            if layer_types is None:  # HF's defaults: every other layer / 5 local, 1 global
                period = 2 if family == "gemma2" else int(hf.get("sliding_window_pattern", 6))
                layer_types = ["sliding_attention" if (i + 1) % period else "full_attention"
                               for i in range(layers)]
        elif layer_types is not None:  # transformers 5 writes them for every family
            if set(layer_types) - {"full_attention"}:
                raise ValueError(f"{model_type}: layer_types other than full_attention are "
                                 f"not supported (got {sorted(set(layer_types))})")
            layer_types = None
        if family == "gemma":
            sliding = None
        moe = {}
        if family in MOE_TYPES:
            experts = hf.get("num_experts") or hf.get("num_local_experts")  # transformers 4 | 5
            if family == "qwen3_moe":
                if int(hf.get("decoder_sparse_step", 1)) != 1 or hf.get("mlp_only_layers"):
                    raise ValueError("qwen3_moe: dense layers among the sparse ones "
                                     "(decoder_sparse_step != 1 or mlp_only_layers) are not "
                                     "supported")
                if "moe_intermediate_size" not in hf:
                    raise ValueError("config.json lacks required key 'moe_intermediate_size'")
            if not experts or "num_experts_per_tok" not in hf:
                raise ValueError(f"{model_type}: config.json lacks the number of experts or "
                                 "num_experts_per_tok")
            if hf.get("router_jitter_noise"):
                raise ValueError(f"{model_type}: router_jitter_noise="
                                 f"{hf['router_jitter_noise']} is not supported (use 0)")
            moe = dict(num_experts=int(experts), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                       moe_intermediate_size=int(hf.get("moe_intermediate_size")
                                                 or hf["intermediate_size"]),
                       norm_topk_prob=(bool(hf.get("norm_topk_prob", False))
                                       if family == "qwen3_moe" else True))
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        attention_bias = bool(hf.get("attention_bias", False))
        fields = dict(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family == "qwen2" else attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=family in ("qwen3", "gemma3", "qwen3_moe"),
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            hidden_act=act,
            norm_weight_offset=gemma,
            sandwich_norms=family in ("gemma2", "gemma3"),
            scale_embeddings=gemma,
            query_pre_attn_scalar=(float(hf.get("query_pre_attn_scalar", 256))
                                   if family in ("gemma2", "gemma3") else None),
            attn_logit_softcapping=_cap(hf.get("attn_logit_softcapping")),
            final_logit_softcapping=_cap(hf.get("final_logit_softcapping")),
            layer_types=tuple(layer_types) if layer_types is not None else None,
            rope_local_theta=local_theta,
            **moe,
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """Returns a config.json dict that transformers (and `from_hf`) read back."""
        arch = {v: k for k, v in _ARCHITECTURES.items()}[self.model_type]
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = dict(self.rope_scaling, rope_theta=self.rope_theta)
        hf = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_id) if len(self.eos_token_id) > 1
                             else (self.eos_token_id[0] if self.eos_token_id else None)),
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }
        if self.model_type in ("llama", "mistral", "qwen3"):
            hf["attention_bias"] = self.o_bias
        if self.model_type == "llama":
            hf["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            hf["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3", "qwen3_moe"):
            hf["use_sliding_window"] = False
            hf["sliding_window"] = None
        if self.model_type == "qwen3_moe":
            hf.update(attention_bias=self.o_bias, num_experts=self.num_experts,
                      num_local_experts=self.num_experts,
                      num_experts_per_tok=self.num_experts_per_tok,
                      moe_intermediate_size=self.moe_intermediate_size,
                      norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=1,
                      mlp_only_layers=[])
        if self.model_type == "mixtral":
            hf.update(num_local_experts=self.num_experts,
                      num_experts_per_tok=self.num_experts_per_tok,
                      sliding_window=self.sliding_window, router_jitter_noise=0.0)
            hf["intermediate_size"] = self.moe_intermediate_size
        if self.model_type in GEMMA_TYPES:
            hf["attention_bias"] = self.o_bias
            hf.pop("hidden_act")
            hf["hidden_act" if self.model_type == "gemma" else "hidden_activation"] = \
                self.hidden_act
        if self.model_type in ("gemma2", "gemma3_text"):
            hf.update(sliding_window=self.sliding_window, layer_types=list(self.layer_types),
                      query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar),
                      attn_logit_softcapping=self.attn_logit_softcapping,
                      final_logit_softcapping=self.final_logit_softcapping)
        if self.model_type == "gemma3_text":
            local = {"rope_type": "default", "rope_theta": self.rope_local_theta}
            hf.update(rope_parameters={"full_attention": rope, "sliding_attention": local},
                      rope_local_base_freq=self.rope_local_theta)
        return hf

    def rope_inv_freq(self, local: bool = False):
        """Returns the RoPE inverse frequencies `[head_dim // 2]` (float32 numpy, HF's formula).

        Args:
          local: the sliding layers' table (`rope_local_theta`, unscaled) where the config
            has one.
        """
        import numpy as np

        local = local and self.rope_local_theta is not None
        theta = self.rope_local_theta if local else self.rope_theta
        # float32 like transformers, so positions far from 0 rotate identically.
        exps = np.arange(0, self.head_dim, 2).astype(np.float32) / np.float32(self.head_dim)
        inv = (1.0 / (np.float32(theta) ** exps)).astype(np.float32)
        s = None if local else self.rope_scaling_dict
        if s is None:
            return inv
        if s["rope_type"] == "linear":
            return (inv / np.float32(s["factor"])).astype(np.float32)
        factor = float(s["factor"])
        low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)


def _int_if_whole(x: float):
    """transformers 5 types some config fields int (query_pre_attn_scalar)."""
    return int(x) if float(x).is_integer() else x


def _cap(value) -> float | None:
    """A soft-capping value from config.json (None or 0: none)."""
    return float(value) if value else None


def check_compute_settings(*, dtype: str, param_dtype: str, attention: str,
                           remat_policy: str, prefix: str = "") -> None:
    """The rules on a decoder's numerics and attention, in one place.

    Args:
      dtype, param_dtype, attention, remat_policy: as the ``ModelConfig`` fields.
      prefix: prepended to each field name in messages ("model." for the training config).

    Raises:
      ValueError: naming ``{prefix}{field}``.
    """
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{prefix}{name}={value!r}: expected one of {DTYPES}")
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"{prefix}remat_policy={remat_policy!r}: expected one of "
                         f"{REMAT_POLICIES}")
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"{prefix}attention={attention!r}: expected one of {ATTENTION_IMPLS}")
    if attention == "cudnn" and dtype == "float32":
        raise ValueError(f"{prefix}attention='cudnn' needs {prefix}dtype bfloat16 or float16 "
                         f"(got float32; use {prefix}attention='xla' for float32)")


def validate_model_config(cfg, *, lora_defaults, backend: str | None = None) -> None:
    """Checks the ``model`` section of a training config.

    Rules: ``check_compute_settings``; ``model.path`` set; ``model.logps_chunk_size >= 1``;
    ``model.completion_logits_fraction`` in (0, 1] or None; ``model.attention='cudnn'``
    only on the "gpu" backend, ``'splash'`` only on "tpu".

    Args:
      cfg: the whole experiment config (reads ``cfg.model``).
      backend: the run's JAX backend; default ``jax.default_backend()`` (read only for
        cudnn and splash attention).
      lora_defaults: the ``model.lora`` section's defaults (the schema's,
        ``base_config().model.lora``); with LoRA off, a key changed from them is refused.

    Raises:
      mio_jax.config.ConfigError: naming the key.
    """
    m = cfg.model
    try:
        check_compute_settings(dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention,
                               remat_policy=m.remat_policy, prefix="model.")
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if not m.path:
        raise ConfigError("model.path is empty")
    if m.logps_chunk_size < 1:
        raise ConfigError(f"model.logps_chunk_size={m.logps_chunk_size} must be >= 1")
    try:
        check_completion_fraction(m.completion_logits_fraction)
    except ValueError as e:
        raise ConfigError(f"model.completion_logits_fraction={m.completion_logits_fraction}: "
                          f"{e}") from e
    lora_lib.validate_section(cfg, lora_defaults)
    needs = {"cudnn": ("gpu", "needs NVIDIA GPUs", "use model.attention='xla'"),
             "splash": ("tpu", "is a TPU kernel", "use model.attention='xla', or 'cudnn' on "
                        "GPUs")}
    if m.attention in needs:
        want, what, instead = needs[m.attention]
        if backend is None:
            import jax

            backend = jax.default_backend()
        if backend != want:
            raise ConfigError(f"model.attention={m.attention!r} {what}; this run's backend is "
                              f"{backend!r} ({instead})")
