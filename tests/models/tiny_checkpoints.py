"""Tiny checkpoints and a tiny tokenizer for the model tests (no torch, no network), and
the random groups and jitted log-probs the layout tests of several families share.

The weights are those of scripts/golden_model_logits.py: drawn per tensor name from numpy,
written with the reference `safetensors.numpy` writer under the names and shapes that
transformers saved (stored in golden_logits.json).
"""

import functools
import json
import os
import zlib

import jax
import numpy as np
import safetensors.numpy
from mio_jax import train_step
from mio_jax.data.tokenize import TokenizedGroup
from mio_jax.testing import VOCAB
from mio_jax.testing import tiny_tokenizer  # noqa: F401  (re-exported for the model tests)

GOLDEN_PATH = os.path.join(os.path.dirname(__file__), "golden_logits.json")
with open(GOLDEN_PATH) as _f:
    GOLDEN = json.load(_f)
CASES = sorted(GOLDEN["cases"])


def tensor_value(name, shape, seed=GOLDEN["seed"], norm_center=1.0, embed_std=1.0):
    """Same as scripts/golden_model_logits.py:tensor_value."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    noise = rng.standard_normal(shape).astype(np.float32)
    if name.endswith("norm.weight"):
        return (norm_center + 0.1 * noise).astype(np.float32)
    if name.endswith(".bias"):
        return (0.1 * noise).astype(np.float32)
    if name.endswith("embed_tokens.weight"):
        return noise if embed_std == 1.0 else (embed_std * noise).astype(np.float32)
    return (noise / np.sqrt(shape[-1])).astype(np.float32)


def language_model_tensors(case: str) -> dict:
    """Name -> shape of the text decoder's tensors in golden case `case`: all of them, or
    a multimodal checkpoint's language model, named as the text model names them."""
    spec = GOLDEN["cases"][case]
    if spec["config"].get("model_type") != "gemma3":
        return spec["tensors"]
    prefix = "language_model."
    return {n[len(prefix):]: s for n, s in spec["tensors"].items() if n.startswith(prefix)}


def write_case(case: str, folder: str) -> str:
    """Writes golden case `case` as an HF folder (config.json + model.safetensors)."""
    spec = GOLDEN["cases"][case]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(spec["config"], f)
    tensors = {n: tensor_value(n, tuple(s), **spec.get("weights", {}))
               for n, s in spec["tensors"].items()}
    safetensors.numpy.save_file(tensors, os.path.join(folder, "model.safetensors"),
                                metadata={"format": "pt"})
    return folder


def random_groups(n: int, K: int, seed: int, *, lengths=(2, 7)) -> list[TokenizedGroup]:
    """`n` groups of a prompt and `K` completions, token ids in [5, VOCAB), each length
    drawn from `lengths` (numpy's half-open range)."""
    rng = np.random.default_rng(seed)
    return [TokenizedGroup(row_id=f"g{i}", prompt_ids=rng.integers(5, VOCAB, int(
        rng.integers(*lengths))).astype(np.int32), completion_ids=tuple(
            rng.integers(5, VOCAB, int(rng.integers(*lengths))).astype(np.int32)
            for _ in range(K)))
        for i in range(n)]


@functools.partial(jax.jit, static_argnums=(0, 4))
def policy_logps(graphdef, params, other, batch, cfg):
    """The train step's per-sequence log-probs `[B, K]` of a batch in any layout."""
    return train_step.policy_logps(graphdef, params, other, batch, cfg).logps
