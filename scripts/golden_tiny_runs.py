"""Writes tests/golden/tiny_runs.json: whole tiny training runs, for "behaviour unchanged".

Each variant trains the tiny random Llama of the test helpers for a few steps (one
layout, reference mode or loss each) and records the final train and eval metrics and,
per exported tensor, its float64 sum and sum of squares (the HF export of the run).
tests/test_train_golden.py reruns the same variants and compares.

Run it on the code whose behaviour is the reference (the first six variants were made with
the code before the typed-layout / staged-trainer refactor; the LoRA, QLoRA and online ones
with 46b643d, before the one-direction refactor, added with --update):

  git worktree add /tmp/before <commit> && cd /tmp/before && \
      PYTHONPATH=/tmp/before /path/to/.venv/bin/python /path/to/scripts/golden_tiny_runs.py \
      --out=/path/to/tests/golden/tiny_runs.json

It needs 8 simulated CPU devices (set below, before JAX is imported).
"""

import argparse
import hashlib
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
    # LoRA adapters on every linear weight, the base (adapters off) as the reference
    "lora_base_reference": {"model.lora.enabled": True, "model.lora.rank": 4,
                            "model.lora.alpha": 8.0},
    # QLoRA: the frozen base stored as NF4 blocks
    "qlora_nf4": {"model.lora.enabled": True, "model.lora.rank": 4, "model.lora.alpha": 8.0,
                  "model.lora.quantize": "nf4"},
    # two online rounds: sample 4 answers to 12 prompts, verify, pair, 3 steps each
    "online_two_rounds": {
        "online.enabled": True, "online.rounds": 2, "online.prompts_per_round": 12,
        "online.samples_per_prompt": 4, "online.steps_per_round": 3, "online.tasks": "",
        "online.verifier": "mio_jax.testing:parity_verifier", "online.max_new_tokens": 8,
        "online.temperature": 8.0, "online.pairs": "all_pairs", "online.sample_batch_size": 32,
        "online.eval_every_rounds": 0, "online.system": "", "data.max_length": 64,
        "reference.mode": "precomputed", "data.eval_path": "", "checkpoint.every_steps": 2,
        # the sampler the golden run was recorded with (online.sampler's default since is
        # "groups", whose samples draw other random streams)
        "online.sampler": "static"},
}
# GRPO rounds (added with --update by the commit that introduced them): DAPO's loss with a
# KL term, two rewards, the round-start and reference tables, 2-way data parallel
VARIANTS["grpo_two_rounds"] = {
    "online.enabled": True, "grpo.enabled": True, "online.rounds": 2,
    "online.prompts_per_round": 6, "grpo.num_generations": 4, "online.tasks": "",
    "online.verifier": "mio_jax.testing:parity_verifier", "online.max_new_tokens": 8,
    "online.temperature": 8.0, "online.sample_batch_size": 32, "online.eval_every_rounds": 0,
    "online.system": "", "data.max_length": 64, "reference.mode": "precomputed",
    "data.eval_path": "", "checkpoint.every_steps": 2, "train.batch_size": 2,
    "mesh.shape": (1, 2, 4), "grpo.loss_type": "dapo", "grpo.beta": 0.04,
    "grpo.epsilon_high": 0.28, "grpo.reward_funcs": "accuracy,format",
    "grpo.reward_weights": "1.0,0.5", "optim.learning_rate": 1e-3}
ONLINE_QUESTIONS = 30  # "q: i+(i%7)=" -> i + i % 7, the rows of online.jsonl
COMMON = {"train.steps": 4, "eval.every_steps": 0, "checkpoint.every_steps": 100}
TRAIN_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
              "logps/rejected", "grad_norm", "completion_tokens", "kl", "entropy",
              "clip_ratio/region_mean")
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


def questions(path: str) -> str:
    """The online variant's question/answer JSONL."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(ONLINE_QUESTIONS):
            f.write(json.dumps({"question": f"q: {i}+{i % 7}=", "answer": str(i + i % 7)}) + "\n")
    return path


def run_variant(name: str, root: str) -> dict:
    from mio_jax import train

    paths = tiny_files(os.path.join(root, "tiny"))
    overrides = dict(VARIANTS[name])
    runner = train.train_and_evaluate
    if overrides.get("online.enabled"):
        overrides["online.jsonl"] = questions(os.path.join(root, "questions.jsonl"))
        try:  # the online driver's own entry point (before: train's, which handed over)
            from mio_jax import online
            runner = getattr(online, "train_and_evaluate", runner)
        except ImportError:
            pass
    result = runner(config(paths, overrides), os.path.join(root, name))
    out = {"train": {k: result["train"][k] for k in TRAIN_KEYS if k in result["train"]},
           "eval": {k: result["eval"][k] for k in EVAL_KEYS if k in result["eval"]},
           "weights": tensor_stats(result["export"]),
           "initial_weights": tensor_stats(paths[0])}
    if "rounds" in result:  # what each online round sampled, kept and trained on
        out["rounds"] = []
        for r in result["rounds"]:
            samples = os.path.join(root, name, "online", f"round_{r['round']:04d}",
                                   "samples.jsonl")
            with open(samples, encoding="utf-8") as f:
                answers = [[(a["text"], a["score"]) for a in json.loads(line)["samples"]]
                           for line in f]
            digest = hashlib.sha256(json.dumps(answers).encode()).hexdigest()
            out["rounds"].append({"samples_sha256": digest,
                                  **{k: r[k] for k in ("rows", "steps", "start_step", "end_step")}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--update", action="store_true",
                    help="add the variants to --out's existing goldens instead of replacing it")
    a = ap.parse_args()
    golden = {}
    if a.update and os.path.exists(a.out):
        with open(a.out, encoding="utf-8") as f:
            golden = json.load(f)
    with tempfile.TemporaryDirectory() as root:
        golden.update({v: run_variant(v, os.path.join(root, v)) for v in a.variants.split(",")})
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(golden, f, indent=1, sort_keys=True)
    print(f"wrote {a.out}: {sorted(golden)}")


if __name__ == "__main__":
    main()
