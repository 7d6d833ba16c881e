"""Writes tests/golden/tiny_runs.json: whole tiny training runs, for "behaviour unchanged".

Each variant trains the tiny random Llama of the test helpers for a few steps (one
layout, reference mode or loss each) and records the final train and eval metrics and,
per exported tensor, its float64 sum and sum of squares (the HF export of the run).
tests/test_train_golden.py reruns the same variants and compares.

Run it on the code whose behaviour is the reference (the numbers committed were made with
the code before the typed-layout / staged-trainer refactor):

  git worktree add /tmp/before <commit> && cd /tmp/before && \
      PYTHONPATH=/tmp/before /path/to/.venv/bin/python /path/to/scripts/golden_tiny_runs.py \
      --out=/path/to/tests/golden/tiny_runs.json

It needs 8 simulated CPU devices (set below, before JAX is imported).
"""

import argparse
import json
import os
import sys
import tempfile

if __name__ == "__main__":  # before JAX is imported (tests import this file with JAX set up)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

VARIANTS = {
    "unshared_frozen_mio": {},
    "shared_prompt_completion_only": {"data.shared_prompt": True,
                                      "model.completion_logits_fraction": 0.9},
    # No eval: the packed eval pipeline of the code before the refactor did not round its
    # rows to the data-parallel size (fixed since; tests/test_train.py checks packed eval).
    "packed_no_eval": {"data.packing": True, "eval.max_batches": -1},
    "precomputed_dpo": {"loss.name": "dpo", "loss.beta": 0.05, "reference.mode": "precomputed"},
    "accumulated_bucketed_tensor2": {"train.grad_accum_steps": 2, "data.bucketing": True,
                                     "mesh.shape": (1, 4, 2),
                                     "data.pad_to_multiple_of": 8},
    "simpo_reference_free": {"loss.name": "simpo", "loss.beta": 2.0, "reference.mode": "none"},
}
COMMON = {"train.steps": 4, "eval.every_steps": 0, "checkpoint.every_steps": 100}
TRAIN_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
              "logps/rejected", "grad_norm", "completion_tokens")
EVAL_KEYS = ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")


def tiny_files(folder: str):
    """The tiny model and data (the test helpers of either code generation)."""
    try:
        from mio_jax import testing
    except ImportError:  # the code before mio_jax.testing: its tests/ helper module
        sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
        import trainer_fixtures as testing
    return testing.tiny_setup(folder)


def config(paths, overrides: dict):
    from configs import tiny_test

    c = tiny_test.get_config()
    c.model.path, c.data.train_path, c.data.eval_path = paths
    for key, value in {**COMMON, **overrides}.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def tensor_stats(folder: str) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            for key, value in load_file(os.path.join(folder, name)).items():
                v = value.astype(np.float64)
                out[key] = [float(v.sum()), float((v * v).sum())]
    return out


def run_variant(name: str, root: str) -> dict:
    from mio_jax import train

    paths = tiny_files(os.path.join(root, "tiny"))
    result = train.train_and_evaluate(config(paths, VARIANTS[name]), os.path.join(root, name))
    return {"train": {k: result["train"][k] for k in TRAIN_KEYS if k in result["train"]},
            "eval": {k: result["eval"][k] for k in EVAL_KEYS if k in result["eval"]},
            "weights": tensor_stats(result["export"]),
            "initial_weights": tensor_stats(paths[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        golden = {v: run_variant(v, os.path.join(root, v)) for v in a.variants.split(",")}
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(golden, f, indent=1, sort_keys=True)
    print(f"wrote {a.out}: {sorted(golden)}")


if __name__ == "__main__":
    main()
