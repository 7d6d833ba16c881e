"""The test harness of mio_jax (and of code built on it), outside the library's core: no
library module imports it. Tiny real artefacts: a model checkpoint, a tokenizer and preference
data; a GCS emulator (``gcs_emulator``); verifiers for online-training tests.

Everything is real: a randomly initialised 2-layer Llama written as a Hugging Face
folder by the models exporter, a character-level BPE tokenizer with a ChatML template,
and explicit-format preference JSONL files. The project's tests use them (through the
fixtures of ``tests/conftest.py``), and so can tests of code built on mio_jax: a run on
them takes seconds on a CPU.
"""

import json
import os

import numpy as np
from tokenizers import Tokenizer, decoders, models as tok_models
from transformers import PreTrainedTokenizerFast

from mio_jax import models
from mio_jax.local_pod import free_port
from mio_jax.models import ModelConfig

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VOCAB = 96


def tiny_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """Character-level tokenizer, exactly ``vocab_size`` tokens, ChatML specials, bos/eos/pad set."""
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?:;'\n-=+")
    vocab = specials + chars
    vocab += [f"<x{i}>" for i in range(vocab_size - len(vocab))]
    tok = Tokenizer(tok_models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[],
                                   unk_token=None))
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHATML)


def tiny_model_config(**overrides) -> ModelConfig:
    """The 2-layer, 32-wide Llama config of the tiny model (``overrides`` change fields)."""
    kw = dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)
    kw.update(overrides)
    return ModelConfig(**kw)


def tiny_gemma_config(**overrides) -> ModelConfig:
    """The tiny model as a Gemma 3 (text) with every Gemma feature on: GeGLU, norms by
    `1 + w` before and after each block, scaled embeddings, QK-norm, a query scale of its
    own, soft-capped scores and logits, a sliding layer (window 4, RoPE base 1e3) then a
    global one (RoPE base 1e6)."""
    kw = dict(model_type="gemma3_text", hidden_act="gelu_pytorch_tanh",
              norm_weight_offset=True, sandwich_norms=True, scale_embeddings=True,
              qk_norm=True, query_pre_attn_scalar=16.0, attn_logit_softcapping=20.0,
              final_logit_softcapping=15.0, sliding_window=4,
              layer_types=("sliding_attention", "full_attention"), rope_theta=1e6,
              rope_local_theta=1e3)
    kw.update(overrides)
    return tiny_model_config(**kw)


def tiny_moe_config(**overrides) -> ModelConfig:
    """The tiny model as a Qwen3-MoE: 4 experts of width 16, 2 per token, renormalised."""
    kw = dict(model_type="qwen3_moe", qk_norm=True, num_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=16, norm_topk_prob=True, tie_word_embeddings=False)
    kw.update(overrides)
    return tiny_model_config(**kw)


def write_tiny_model(folder: str, seed: int = 0, config=tiny_model_config, **overrides) -> str:
    """Writes a random tiny model + tokenizer as an HF folder; returns the folder.
    ``config``: the tiny config's maker (``tiny_model_config``, ``tiny_gemma_config``,
    ``tiny_moe_config``), called with ``overrides``."""
    model = models.init_model(config(**overrides), seed=seed)
    models.save_pretrained(model, tiny_tokenizer(), folder)
    return folder


def write_tiny_data(path: str, n: int, seed: int = 0) -> str:
    """Explicit-format pairs: "q: a+b=" -> right answer (chosen) / wrong answer (rejected)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = (int(x) for x in rng.integers(0, 50, 2))
            wrong = a + b + int(rng.integers(1, 9))
            pad = " so" * int(rng.integers(0, 3))
            f.write(json.dumps({"prompt": f"q: {a}+{b}=", "chosen": f" {a + b}{pad}.",
                                "rejected": f" {wrong}.{pad}"}) + "\n")
    return path


def tiny_setup(tmp_path, n_train: int = 64, n_eval: int = 16):
    """Writes model + data under ``tmp_path``; returns ``(model_dir, train, eval)``."""
    model_dir = write_tiny_model(os.path.join(tmp_path, "tiny_model"))
    train = write_tiny_data(os.path.join(tmp_path, "train.jsonl"), n_train, seed=1)
    ev = write_tiny_data(os.path.join(tmp_path, "eval.jsonl"), n_eval, seed=2)
    return model_dir, train, ev


class GcsEmulator:
    """A real local GCS server (``gcp-storage-emulator``, in-memory) for ``gs://`` tests.

    Starts ``python -m mio_jax.testing.gcs_emulator`` (the emulator with GCS's generation
    preconditions, which tensorstore needs from the second checkpoint of a process on) on
    127.0.0.1 and sets, in ``os.environ`` (and in ``env`` for child processes), the
    variables the clients honour:
    ``STORAGE_EMULATOR_HOST`` (gcsfs, google-cloud-storage) and ``TENSORSTORE_GCS_HTTP_URL``
    (tensorstore, Orbax's array I/O). Use as a context manager; ``bucket`` exists at start.

    Args:
      bucket: the bucket created at start.
      log_path: where the server's request log goes (default: discarded).
    """

    def __init__(self, bucket: str = "mio-test", log_path: str | None = None):
        import socket
        import subprocess
        import sys
        import time

        self.bucket, self.port = bucket, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GOOGLE_CLOUD_PROJECT": "mio-test"}
        self._log = open(log_path or os.devnull, "wb")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mio_jax.testing.gcs_emulator", "start", "--host=127.0.0.1",
             f"--port={self.port}", "--in-memory", f"--default-bucket={bucket}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("the GCS emulator did not start")
                time.sleep(0.1)
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._log.close()
        for k, v in getattr(self, "_saved", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- verifiers for online-training tests (``online.verifier = "mio_jax.testing:..."``) ----

def parity_verifier(completion: str, example) -> float:
    """1.0 when the completion has an even number of characters: a rule whose answers are
    known, and which splits a random model's samples into right and wrong."""
    del example
    return float(len(completion) % 2 == 0)


KILL_FILE = "MIO_JAX_TEST_KILL_FILE"


def killing_verifier(completion: str, example) -> float:
    """``parity_verifier``, except that when the file named by ``$MIO_JAX_TEST_KILL_FILE``
    exists it holds a count: each call decrements it, and the call that finds 1 removes the
    file and SIGKILLs this process (a crash at a known point of a round's sampling)."""
    path = os.environ.get(KILL_FILE)
    if path and os.path.exists(path):
        with open(path) as f:
            left = int(f.read().strip())
        if left <= 1:
            import signal

            os.remove(path)
            os.kill(os.getpid(), signal.SIGKILL)
        with open(path, "w") as f:
            f.write(str(left - 1))
    return parity_verifier(completion, example)


def length_reward(prompts, completions, completion_ids, **columns) -> list:
    """A TRL-style reward for the tests: the completion's character count, None when empty."""
    return [float(len(c)) if c else None for c in completions]
