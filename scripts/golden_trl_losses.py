"""Writes tests/losses/golden_trl.json: TRL 1.16's own loss code on fixed inputs.

Run from the repository root with the throwaway torch + TRL environment:

    /work/trl_env/bin/python scripts/golden_trl_losses.py

What is driven (TRL's code, not a re-implementation):
  * `DPOTrainer._compute_loss` on a trainer object built with `object.__new__` and only
    the attributes that method reads, with `precompute_ref_logps=True` (reference
    log-probs come from the batch) and a stand-in model whose forward returns fixed
    per-token log-probs (each sequence's whole sum on its first completion token, zeros
    elsewhere, so TRL's token sums and token means see exactly the stored sums).
    Every `loss_type`, each f-divergence, label smoothing, discopop tau and weighted
    `loss_type` lists. Gradients are torch autograd of TRL's batch loss.
  * `CPOTrainer.cpo_loss` (loss_type "simpo", and "sigmoid" fed with log-ratios for
    cDPO label smoothing) and `ORPOTrainer.odds_ratio_loss`, on length-averaged log-probs.

Each case records TRL's batch loss, per-example losses where TRL's loss is per example
(rows run one at a time for DPOTrainer), the gradients of the batch loss with respect to
the policy's chosen / rejected log-prob sums, and TRL's logged metrics, in float64 and
float32 (TRL's alpha-divergence path has no float64 branch, so those cases are float32).
Tests read the JSON without torch.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch
import trl
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "losses", "golden_trl.json")
PROMPT_LEN = 2
METRIC_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
BATCH_COUPLED = {"aot", "aot_unpaired", "sft"}


def make_inputs() -> dict[str, list[float]]:
    """Six pairs: log-ratios from -12 to 12 (one tie), 3-decimal values (each dtype casts them)."""
    rng = np.random.default_rng(20250628)
    ref_w = np.round(rng.uniform(-80, -20, 6), 3)
    ref_l = np.round(rng.uniform(-80, -20, 6), 3)
    z_w = np.array([-12.0, -2.5, -0.3, 0.0, 0.7, 6.25])
    z_l = np.array([-4.0, 1.5, -0.3, 0.0, -3.2, 12.0])
    pol_w, pol_l = np.round(ref_w + z_w, 3), np.round(ref_l + z_l, 3)
    return {
        "policy_chosen_logps": pol_w.tolist(),
        "policy_rejected_logps": pol_l.tolist(),
        "ref_chosen_logps": ref_w.tolist(),
        "ref_rejected_logps": ref_l.tolist(),
        "chosen_lengths": [7, 3, 12, 5, 9, 20],
        "rejected_lengths": [4, 11, 12, 6, 2, 15],
    }


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


class _FixedLogpsModel:
    """Stand-in for the policy: returns the given per-token log-probs [2B, T-1]."""

    training = True

    def __init__(self, per_token_logps):
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        lp = self.per_token_logps
        return SimpleNamespace(
            log_probs=lp,
            entropy=torch.zeros_like(lp),
            mean_logits=torch.zeros_like(lp),
            is_top1=torch.zeros(lp.shape, dtype=torch.bool),
        )


def _dpo_trainer(model, cfg: dict) -> DPOTrainer:
    t = object.__new__(DPOTrainer)
    t.__dict__.update(
        model=model,
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        beta=cfg["beta"],
        loss_types=list(cfg["loss_type"]),
        loss_weights=list(cfg.get("loss_weights") or [1.0] * len(cfg["loss_type"])),
        f_divergence_type=cfg.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=cfg.get("f_alpha_divergence_coef", 0.5),
        label_smoothing=cfg.get("label_smoothing", 0.0),
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=cfg.get("discopop_tau", 0.05)),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return t


def run_dpo(inp: dict, rows: list[int], cfg: dict, dtype: torch.dtype) -> dict:
    """TRL DPOTrainer batch loss, grads and metrics on the pairs `rows`."""
    n = len(rows)
    lw = [inp["chosen_lengths"][i] for i in rows]
    ll = [inp["rejected_lengths"][i] for i in rows]
    lengths = lw + ll  # TRL's batch is [chosen..., rejected...]
    seq = PROMPT_LEN + max(lengths)
    completion_mask = torch.zeros(2 * n, seq, dtype=torch.long)
    for r, length in enumerate(lengths):
        completion_mask[r, PROMPT_LEN : PROMPT_LEN + length] = 1
    pol = torch.tensor(
        [inp["policy_chosen_logps"][i] for i in rows] + [inp["policy_rejected_logps"][i] for i in rows], dtype=dtype
    ).requires_grad_(True)
    # Whole sum on the first completion token (shifted index PROMPT_LEN - 1), zeros elsewhere.
    onehot = torch.zeros(2 * n, seq - 1, dtype=dtype)
    onehot[:, PROMPT_LEN - 1] = 1.0
    per_token = pol[:, None] * onehot
    model = _FixedLogpsModel(per_token)
    inputs = {
        "input_ids": torch.ones(2 * n, seq, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, seq, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor([inp["ref_chosen_logps"][i] for i in rows], dtype=dtype),
        "ref_rejected_logps": torch.tensor([inp["ref_rejected_logps"][i] for i in rows], dtype=dtype),
    }
    trainer = _dpo_trainer(model, cfg)
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: float(trainer._metrics["train"][k][-1]) for k in METRIC_KEYS}
    return {
        "loss": float(loss.detach()),
        "grad_chosen": pol.grad[:n].tolist(),
        "grad_rejected": pol.grad[n:].tolist(),
        "metrics": metrics,
    }


def dpo_case(inp: dict, cid: str, trl_cfg: dict, mio_name, mio_hparams: dict, dtype: torch.dtype) -> dict:
    rows = list(range(len(inp["policy_chosen_logps"])))
    full = run_dpo(inp, rows, trl_cfg, dtype)
    per_example = None
    if not set(trl_cfg["loss_type"]) & BATCH_COUPLED:
        per_example = [run_dpo(inp, [i], trl_cfg, dtype)["loss"] for i in rows]
    return {
        "id": cid,
        "dtype": str(dtype).replace("torch.", ""),
        "trl": {"api": "DPOTrainer._compute_loss", **trl_cfg},
        "name": mio_name,
        "beta": trl_cfg["beta"],
        "loss_weights": trl_cfg.get("loss_weights") if isinstance(mio_name, list) else None,
        "hparams": mio_hparams,
        "batch_loss": full["loss"],
        "per_example": per_example,
        "grad_policy_chosen": full["grad_chosen"],
        "grad_policy_rejected": full["grad_rejected"],
        "metrics": full["metrics"],
    }


def _cpo_like(cls, **attrs):
    t = object.__new__(cls)
    t.__dict__.update(accelerator=_Accelerator(), **attrs)
    return t


def ref_free_case(inp: dict, cid: str, kind: str, beta: float, params: dict, dtype: torch.dtype) -> dict:
    """SimPO via CPOTrainer.cpo_loss, ORPO's odds-ratio term via ORPOTrainer.odds_ratio_loss,
    cDPO via CPOTrainer.cpo_loss('sigmoid') fed with log-ratios."""
    pw = torch.tensor(inp["policy_chosen_logps"], dtype=dtype).requires_grad_(True)
    pl = torch.tensor(inp["policy_rejected_logps"], dtype=dtype).requires_grad_(True)
    lw = torch.tensor(inp["chosen_lengths"], dtype=dtype)
    ll = torch.tensor(inp["rejected_lengths"], dtype=dtype)
    out: dict = {"id": cid, "dtype": str(dtype).replace("torch.", ""), "beta": beta, "loss_weights": None}
    if kind == "simpo":
        t = _cpo_like(CPOTrainer, alpha=0.0, loss_type="simpo", beta=beta, **params)
        losses, rw, rl = t.cpo_loss(pw / lw, pl / ll)
        out.update(trl={"api": "CPOTrainer.cpo_loss", "loss_type": ["simpo"], **params}, name="simpo", hparams=params)
        batch = losses.mean()
    elif kind == "dpo_smoothed":
        rw_ = torch.tensor(inp["ref_chosen_logps"], dtype=dtype)
        rl_ = torch.tensor(inp["ref_rejected_logps"], dtype=dtype)
        t = _cpo_like(CPOTrainer, alpha=0.0, loss_type="sigmoid", beta=beta, **params)
        losses, rw, rl = t.cpo_loss(pw - rw_, pl - rl_)
        out.update(
            trl={"api": "CPOTrainer.cpo_loss on log-ratios", "loss_type": ["sigmoid"], **params}, name="dpo", hparams=params
        )
        batch = losses.mean()
    elif kind == "orpo":
        t = _cpo_like(ORPOTrainer, beta=beta)
        or_terms, rw, rl, ratio, log_odds = t.odds_ratio_loss(pw / lw, pl / ll)
        # Full per-example ORPO: NLL (batch token-mean over chosen completion tokens, spread
        # as -B logp_w / sum L_w) minus TRL's beta * log sigma(log odds).
        nll = -len(inp["chosen_lengths"]) * pw / lw.sum()
        losses = nll - or_terms
        out.update(trl={"api": "ORPOTrainer.odds_ratio_loss", "loss_type": ["orpo"]}, name="orpo", hparams={})
        out["orpo_terms"] = {
            "odds_ratio_term": or_terms.detach().tolist(),
            "log_odds_ratio_mean": float(ratio.detach()),
            "log_odds_chosen_mean": float(log_odds.detach()),
        }
        batch = losses.mean()
    else:
        raise ValueError(kind)
    batch.backward()
    out.update(
        batch_loss=float(batch.detach()),
        per_example=losses.detach().tolist(),
        grad_policy_chosen=pw.grad.tolist(),
        grad_policy_rejected=pl.grad.tolist(),
        metrics={
            "rewards/chosen": float(rw.mean()),
            "rewards/rejected": float(rl.mean()),
            "rewards/accuracies": float((rw > rl).to(dtype).mean()),
            "rewards/margins": float((rw - rl).mean()),
        }
        if kind != "dpo_smoothed"
        else {},
    )
    return out


def dpo_specs() -> list[tuple[str, dict, object, dict]]:
    """(id, TRL config, mio_jax name, mio_jax hparams)."""
    specs = []
    defaults = {"exo_pair": {"label_smoothing": 1e-3}}
    for lt in ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
               "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"):
        hp = defaults.get(lt, {})
        specs.append((lt, {"loss_type": [lt], "beta": 0.1, **hp}, lt, dict(hp)))
    for lt in ("sigmoid", "nca_pair", "ipo", "apo_zero"):
        specs.append((f"{lt}_beta0.5", {"loss_type": [lt], "beta": 0.5}, lt, {}))
    specs.append(("mio_is_nca_pair", {"loss_type": ["nca_pair"], "beta": 0.25}, "mio", {}))
    specs.append(("dpo_is_sigmoid", {"loss_type": ["sigmoid"], "beta": 0.25}, "dpo", {}))
    for lt, eps in (("robust", 0.1), ("robust", 0.3), ("exo_pair", 0.01), ("exo_pair", 0.1), ("aot", 0.1),
                    ("aot_unpaired", 0.2)):
        specs.append((f"{lt}_ls{eps}", {"loss_type": [lt], "beta": 0.1, "label_smoothing": eps}, lt,
                      {"label_smoothing": eps}))
    specs.append(("discopop_tau0.1", {"loss_type": ["discopop"], "beta": 0.1, "discopop_tau": 0.1}, "discopop",
                  {"discopop_tau": 0.1}))
    for fd, extra in (("forward_kl", {}), ("js_divergence", {}), ("alpha_divergence", {"f_alpha_divergence_coef": 0.5}),
                      ("alpha_divergence", {"f_alpha_divergence_coef": 0.3})):
        for lt in ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"):
            hp = {"f_divergence_type": fd, **extra, **defaults.get(lt, {})}
            tag = fd + (f"{extra['f_alpha_divergence_coef']}" if extra else "")
            specs.append((f"{lt}_{tag}", {"loss_type": [lt], "beta": 0.1, **hp}, lt, hp))
    specs.append(("mix_sigmoid_sft", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "beta": 0.1},
                  ["sigmoid", "sft"], {}))
    specs.append(("mix_mpo", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0],
                              "beta": 0.1}, ["sigmoid", "bco_pair", "sft"], {}))
    specs.append(("mix_nca_sft_unweighted", {"loss_type": ["nca_pair", "sft"], "beta": 0.1}, ["nca_pair", "sft"], {}))
    specs.append(("mix_robust_ipo_ls", {"loss_type": ["robust", "ipo"], "loss_weights": [0.7, 0.3], "beta": 0.2,
                                        "label_smoothing": 0.2}, ["robust", "ipo"], {"label_smoothing": 0.2}))
    specs.append(("rpo_is_sigmoid_plus_sft", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5],
                                              "beta": 0.1}, "rpo", {"rpo_alpha": 0.5}))
    return specs


def _shorten(obj, dtype: str):
    """Smaller file: float32 results in float32's shortest repr (exact as float32), float64
    results to 13 significant digits (5e-14 relative, far below the tests' 1e-6)."""
    if isinstance(obj, float):
        if not np.isfinite(obj):
            return obj
        return float(str(np.float32(obj))) if dtype == "float32" else float(f"{obj:.13g}")
    if isinstance(obj, list):
        return [_shorten(v, dtype) for v in obj]
    if isinstance(obj, dict):
        return {k: _shorten(v, dtype) if k not in ("trl", "hparams") else v for k, v in obj.items()}
    return obj


def main() -> None:
    inp = make_inputs()
    cases = []
    for dtype in (torch.float64, torch.float32):
        for cid, cfg, name, hp in dpo_specs():
            if dtype == torch.float64 and cfg.get("f_divergence_type") == "alpha_divergence":
                continue  # TRL's alpha-divergence clamp table has no float64 entry (KeyError)
            cases.append(dpo_case(inp, cid, cfg, name, hp, dtype))
        cases.append(ref_free_case(inp, "simpo", "simpo", 2.0, {"simpo_gamma": 0.5, "label_smoothing": 0.0}, dtype))
        cases.append(ref_free_case(inp, "simpo_g1.2_ls0.1", "simpo", 2.5, {"simpo_gamma": 1.2, "label_smoothing": 0.1},
                                   dtype))
        cases.append(ref_free_case(inp, "dpo_cdpo_ls0.1", "dpo_smoothed", 0.1, {"label_smoothing": 0.1}, dtype))
        cases.append(ref_free_case(inp, "dpo_cdpo_ls0.25", "dpo_smoothed", 0.5, {"label_smoothing": 0.25}, dtype))
        cases.append(ref_free_case(inp, "orpo", "orpo", 0.1, {}, dtype))
        cases.append(ref_free_case(inp, "orpo_b0.5", "orpo", 0.5, {}, dtype))
    cases = [_shorten(c, c["dtype"]) for c in cases]
    doc = {
        "generator": "scripts/golden_trl_losses.py",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "inputs": inp,
        "cases": cases,
    }
    with open(OUT, "w") as f:  # one case per line: small, and diffs stay readable
        f.write("{\n")
        for key in ("generator", "trl_version", "torch_version", "inputs"):
            f.write(f" {json.dumps(key)}: {json.dumps(doc[key])},\n")
        f.write(' "cases": [\n')
        f.write(",\n".join("  " + json.dumps(c) for c in cases))
        f.write("\n ]\n}\n")
    print(f"wrote {len(cases)} cases to {os.path.normpath(OUT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
