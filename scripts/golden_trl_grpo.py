"""Writes tests/losses/golden_trl_grpo.json: TRL 1.16's own GRPO-family code on fixed inputs.

Run from the repository root with the throwaway torch + TRL environment:

    /work/trl_env/bin/python scripts/golden_trl_grpo.py

What is driven (TRL's code, not a re-implementation):
  * `GRPOTrainer._compute_loss` on a trainer object made with `object.__new__` that carries
    only the attributes the method reads (one process, no accumulation, no vLLM, no entropy
    bonus or masking), its per-token log-probs and entropies replaced by fixed leaf tensors.
    Each case records TRL's loss, torch autograd's gradient of it with respect to the
    per-token log-probs, and every metric TRL logged.
  * The advantage blocks of `GRPOTrainer._generate_and_score_completions` (group / batch /
    none) and of `RLOOTrainer._generate_and_score_completions` (the leave-one-out baseline,
    with and without `normalize_advantages`), cut out of TRL's installed source by their
    first and last lines and executed on fixed rewards (NaN for an unscorable completion),
    together with TRL's logged `reward`, `reward_std` and `frac_reward_zero_std`.
  * TRL's `think_format_reward` and `get_soft_overlong_punishment` on fixed completions.
Everything in float64. Tests read the JSON without torch.
"""

from __future__ import annotations

import inspect
import json
import os
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch
import trl
from trl.rewards import get_soft_overlong_punishment, think_format_reward
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.rloo_trainer import RLOOTrainer
from trl.trainer.utils import nanstd

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "losses", "golden_trl_grpo.json")
B, T = 6, 7
LENGTHS = [7, 5, 3, 0, 6, 1]  # completion tokens per row; row 3 fully masked (a truncated one)


def make_inputs() -> dict[str, list]:
    rng = np.random.default_rng(25)
    logps = np.round(rng.uniform(-4.0, -0.05, (B, T)), 4)
    old = np.round(logps + rng.normal(0.0, 0.4, (B, T)), 4)
    ref = np.round(logps + rng.normal(0.0, 0.5, (B, T)), 4)
    mask = (np.arange(T)[None, :] < np.asarray(LENGTHS)[:, None]).astype(np.float64)
    advantages = [1.3, 0.8, 0.0, 0.9, -1.6, -0.4]
    entropies = np.round(rng.uniform(0.1, 3.0, (B, T)), 4)
    return {"per_token_logps": logps.tolist(), "old_per_token_logps": old.tolist(),
            "ref_per_token_logps": ref.tolist(), "completion_mask": mask.tolist(),
            "advantages": advantages, "entropies": entropies.tolist()}


# (id, loss_type, hparams under GRPOConfig's names, on_policy): on_policy drops the old
# log-probs (TRL then uses per_token_logps.detach())
CASES = [
    ("grpo", "grpo", {}, False),
    ("grpo_kl", "grpo", {"beta": 0.04}, False),
    ("grpo_kl_no_bias_correction", "grpo", {"beta": 0.04, "use_bias_correction_kl": False}, False),
    ("grpo_delta", "grpo", {"delta": 1.1, "epsilon_high": 0.28}, False),
    ("grpo_on_policy", "grpo", {"beta": 0.04}, True),
    ("gspo", "grpo", {"importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4}, False),
    ("bnpo", "bnpo", {"beta": 0.02}, False),
    ("dr_grpo", "dr_grpo", {"max_completion_length": 10}, False),
    ("dr_grpo_kl_sequence", "dr_grpo", {"max_completion_length": 10, "beta": 0.04,
                                        "importance_sampling_level": "sequence"}, False),
    ("dapo", "dapo", {"epsilon_high": 0.28}, False),
    ("dapo_items", "dapo", {"epsilon_high": 0.28, "num_items_in_batch": 40.0, "beta": 0.04}, False),
    ("cispo", "cispo", {"epsilon_high": 1.1}, False),
    ("cispo_kl_items", "cispo", {"epsilon_high": 5.0, "beta": 0.04, "num_items_in_batch": 30.0}, False),
    # temperatures exact in float32: TRL builds them with torch.where on Python floats (float32)
    ("sapo", "sapo", {"sapo_temperature_neg": 1.25}, False),
    ("sapo_temperatures_kl", "sapo", {"sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0,
                                      "beta": 0.04}, False),
    ("luspo", "luspo", {"importance_sampling_level": "sequence"}, False),
    ("luspo_kl", "luspo", {"importance_sampling_level": "sequence", "beta": 0.04,
                           "epsilon_high": 0.28}, False),
]
DEFAULTS = {"beta": 0.0, "epsilon": 0.2, "epsilon_high": None, "delta": None,
            "importance_sampling_level": "token", "max_completion_length": T,
            "use_bias_correction_kl": True, "sapo_temperature_pos": 1.0,
            "sapo_temperature_neg": 1.05, "num_items_in_batch": None}


class _Accelerator:
    num_processes = 1
    process_index = 0
    device = torch.device("cpu")

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def run_loss(inp: dict, loss_type: str, hparams: dict, on_policy: bool) -> dict:
    h = {**DEFAULTS, **hparams}
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in inp.items()}
    logps = t["per_token_logps"].clone().requires_grad_(True)
    trainer = object.__new__(GRPOTrainer)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, t["entropies"], None)
    trainer.__dict__.update(
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=h["importance_sampling_level"], beta=h["beta"],
        loss_type=loss_type, epsilon_low=h["epsilon"],
        epsilon_high=h["epsilon"] if h["epsilon_high"] is None else h["epsilon_high"],
        use_vllm=False, vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=h["max_completion_length"], accelerator=_Accelerator(),
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=h["use_bias_correction_kl"], delta=h["delta"],
                             sapo_temperature_pos=h["sapo_temperature_pos"],
                             sapo_temperature_neg=h["sapo_temperature_neg"], steps_per_generation=1))
    mask = t["completion_mask"]
    items = mask.sum() if h["num_items_in_batch"] is None else torch.tensor(h["num_items_in_batch"], dtype=torch.float64)
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": t["advantages"], "num_items_in_batch": items}
    if not on_policy:
        inputs["old_per_token_logps"] = t["old_per_token_logps"]
    if h["beta"] != 0.0:
        inputs["ref_per_token_logps"] = t["ref_per_token_logps"]
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    (grad,) = torch.autograd.grad(loss, logps)
    metrics = {k: v[0] for k, v in trainer._metrics["train"].items()}
    assert all(len(v) == 1 for v in trainer._metrics["train"].values())
    return {"loss": loss.item(), "grad_per_token_logps": grad.tolist(),
            "metrics": {k: (None if np.isnan(v) else v) for k, v in metrics.items()}}


def _source_block(method, first: str, last: str) -> str:
    """The lines of TRL's installed `method` from the one starting with `first` to the one
    starting with `last`, dedented."""
    lines = inspect.getsource(method).splitlines()
    start = next(i for i, x in enumerate(lines) if x.strip().startswith(first))
    end = next(i for i, x in enumerate(lines) if i > start and x.strip().startswith(last))
    return textwrap.dedent("\n".join(lines[start:end + 1]))


GRPO_BLOCK = _source_block(GRPOTrainer._generate_and_score_completions,
                           "unscorable_mask = torch.isnan(rewards_per_func)",
                           "advantages = torch.nan_to_num(advantages, nan=0.0)")
GRPO_LOG = _source_block(GRPOTrainer._generate_and_score_completions,
                         "rewards = (rewards_per_func * self.reward_weights.to(rewards_per_func.device)",
                         'self._metrics[mode]["frac_reward_zero_std"]')
RLOO_BLOCK = _source_block(RLOOTrainer._generate_and_score_completions,
                           "scorable_counts = (~torch.isnan(grouped_rewards))",
                           "advantages = torch.nan_to_num(advantages, nan=0.0)")

# rewards of 3 prompts x 4 completions: a mixed group, an all-equal group, a group with an
# unscorable completion; and 2 prompts x 2 (the smallest groups)
REWARDS = {
    "mixed_equal_nan": [1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, float("nan"), 0.9, 0.0],
    "pairs": [1.0, 0.0, 0.3, 0.3],
}
GENERATIONS = {"mixed_equal_nan": 4, "pairs": 2}


def run_advantages(rewards: list[float], num_generations: int, scale_rewards: str) -> dict:
    env = {"torch": torch, "nanstd": nanstd, "num_generations": num_generations,
           "rewards_per_func": torch.tensor(rewards, dtype=torch.float64)[:, None],
           "device": "cpu", "mode": "train",
           "self": SimpleNamespace(multi_objective_aggregation="sum_then_normalize",
                                   reward_weights=torch.ones(1, dtype=torch.float64),
                                   scale_rewards=scale_rewards,
                                   _metrics={"train": defaultdict(list)})}
    exec(GRPO_BLOCK, env)
    exec(GRPO_LOG, env)
    logged = {k: v[0] for k, v in env["self"]._metrics["train"].items()}
    return {"advantages": env["advantages"].tolist(), "metrics": logged}


def run_rloo(rewards: list[float], num_generations: int, normalize: bool) -> list[float]:
    r = torch.tensor(rewards, dtype=torch.float64)
    env = {"torch": torch, "nanstd": nanstd, "num_generations": num_generations, "rewards": r,
           "grouped_rewards": r.view(-1, num_generations), "std_rewards": torch.zeros_like(r),
           "self": SimpleNamespace(normalize_advantages=normalize)}
    exec(RLOO_BLOCK, env)
    return env["advantages"].tolist()


THINK_COMPLETIONS = ["<think>\nadd 3 and 4\n</think>\nThe answer is 7.", "<think>add</think>7",
                     "<think>\nno end tag\n7", "7 <think>late</think>",
                     "<think>a</think><think>b</think>7", ""]
OVERLONG = {"max_completion_len": 20, "soft_punish_cache": 8, "lengths": [0, 5, 12, 13, 16, 20, 21, 40]}


def run_rewards() -> dict:
    think = think_format_reward([[{"role": "assistant", "content": c}] for c in THINK_COMPLETIONS])
    punish = get_soft_overlong_punishment(OVERLONG["max_completion_len"], OVERLONG["soft_punish_cache"])
    overlong = punish([[1] * n for n in OVERLONG["lengths"]])
    return {"think_format": {"completions": THINK_COMPLETIONS, "rewards": think},
            "soft_overlong_punishment": {**OVERLONG, "rewards": overlong}}


def main() -> None:
    inp = make_inputs()
    cases = [{"id": cid, "loss_type": lt, "hparams": hp, "on_policy": op, **run_loss(inp, lt, hp, op)}
             for cid, lt, hp, op in CASES]
    advantages = [{"rewards": key, "num_generations": GENERATIONS[key], "scale_rewards": s,
                   **run_advantages(REWARDS[key], GENERATIONS[key], s)}
                  for key in REWARDS for s in ("group", "batch", "none")]
    rloo = [{"rewards": key, "num_generations": GENERATIONS[key], "normalize_advantages": n,
             "advantages": run_rloo(REWARDS[key], GENERATIONS[key], n)}
            for key in REWARDS for n in (False, True)]
    out = {"trl_version": trl.__version__, "torch_version": torch.__version__, "dtype": "float64",
           "inputs": inp, "defaults": DEFAULTS, "cases": cases,
           "rewards": {k: [None if np.isnan(x) else x for x in v] for k, v in REWARDS.items()},
           "advantages": advantages, "rloo": rloo, "reward_funcs": run_rewards()}
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {len(cases)} loss cases, {len(advantages)} advantage and {len(rloo)} RLOO cases to {OUT}")


if __name__ == "__main__":
    main()
