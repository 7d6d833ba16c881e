"""Decoder models, Hugging Face / GGUF weight I/O, tokenizers and sampling.

Public API: `ModelConfig`, `Decoder`, `init_model`, `load_pretrained`, `read_model_config`,
`save_pretrained`, `resolve_model_path`, `smollm2_gguf_path`, `generate`, `generate_ids`,
`GenerationResult`, `DEFAULT_RULES`, `logical_to_spec`, `state_shardings`, and (imported on
first use) `load_tokenizer`. The weight table every loader and writer reads is
`mio_jax.models.weights`.
"""

from mio_jax.models.config import ModelConfig
from mio_jax.models.embedded import resolve_model_path, smollm2_gguf_path
from mio_jax.models.hf_io import load_pretrained, read_model_config, save_pretrained
from mio_jax.models.llama import Decoder, init_model
from mio_jax.sharding import DEFAULT_RULES, logical_to_spec, state_shardings
from mio_jax.models.sampling import GenerationResult, generate, generate_ids

_LAZY = {
    "load_tokenizer": "mio_jax.models.tokenizer",
}


def __getattr__(name):
    # The tokenizer module imports transformers; load it only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mio_jax.models' has no attribute {name!r}")


__all__ = [
    "DEFAULT_RULES", "Decoder", "GenerationResult", "ModelConfig", "generate", "generate_ids",
    "init_model", "load_pretrained", "load_tokenizer", "logical_to_spec", "read_model_config",
    "resolve_model_path", "save_pretrained", "smollm2_gguf_path", "state_shardings",
]
