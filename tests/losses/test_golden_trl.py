"""Parity with TRL 1.16's own loss code (golden numbers from scripts/golden_trl_losses.py).

Per case: TRL's batch loss == mean of our per-example losses; per-example losses (where
TRL's loss is per example); gradients of the batch loss w.r.t. the policy's chosen and
rejected log-prob sums; TRL's logged metrics == means of ours. Tolerance: 1e-6 relative
in float64, 1e-4 in float32 (plus an absolute floor of 1% of that times the array's
scale, for entries that are zero up to rounding). Where TRL itself overflows (e.g.
discopop's e^{-x} times a sigmoid that underflowed to 0 gives inf * 0 = NaN under
forward_kl scores), ours must be finite and the other entries must match.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mio_jax.losses as L

GOLDEN = json.loads((pathlib.Path(__file__).parent / "golden_trl.json").read_text())
INPUTS = GOLDEN["inputs"]
CASES = GOLDEN["cases"]
RTOL = {"float64": 1e-6, "float32": 1e-4}


def _close(actual, expected, rtol, what):
    """allclose where TRL is finite; where TRL overflowed to NaN/inf, ours must be finite."""
    expected = np.asarray(expected, np.float64)
    actual = np.asarray(actual, np.float64)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values {actual}"
    finite = np.isfinite(expected)
    expected, actual = expected[finite], actual[finite]
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * 1e-2 * scale, err_msg=what)


def _run_case(case):
    dtype = jnp.float64 if case["dtype"] == "float64" else jnp.float32
    arr = {k: jnp.asarray(v, dtype) for k, v in INPUTS.items() if k.endswith("logps")}
    lengths = {k: jnp.asarray(INPUTS[k], jnp.int32) for k in ("chosen_lengths", "rejected_lengths")}
    name = case["name"] if isinstance(case["name"], str) else tuple(case["name"])
    kwargs = dict(case["hparams"])
    if case["loss_weights"] is not None:
        kwargs["loss_weights"] = tuple(case["loss_weights"])

    def batch_loss(pw, pl):
        losses, metrics = L.compute(
            name,
            policy_chosen_logps=pw,
            policy_rejected_logps=pl,
            ref_chosen_logps=arr["ref_chosen_logps"],
            ref_rejected_logps=arr["ref_rejected_logps"],
            beta=case["beta"],
            **lengths,
            **kwargs,
        )
        return jnp.mean(losses), (losses, metrics)

    (mean, (losses, metrics)), (g_w, g_l) = jax.value_and_grad(batch_loss, argnums=(0, 1), has_aux=True)(
        arr["policy_chosen_logps"], arr["policy_rejected_logps"]
    )
    assert losses.dtype == dtype
    return mean, losses, metrics, g_w, g_l


@pytest.mark.parametrize("case", CASES, ids=[f"{c['id']}-{c['dtype']}" for c in CASES])
def test_matches_trl(case, request):
    if case["dtype"] == "float64":
        request.getfixturevalue("x64")
    rtol = RTOL[case["dtype"]]
    mean, losses, metrics, g_w, g_l = _run_case(case)
    _close(mean, case["batch_loss"], rtol, "batch loss")
    if case["per_example"] is not None:
        _close(losses, case["per_example"], rtol, "per-example losses")
    _close(g_w, case["grad_policy_chosen"], rtol, "d batch loss / d policy_chosen_logps")
    _close(g_l, case["grad_policy_rejected"], rtol, "d batch loss / d policy_rejected_logps")
    for key, value in case["metrics"].items():
        _close(jnp.mean(metrics[key]), value, rtol, f"metric {key}")
    if "orpo_terms" in case:
        terms = case["orpo_terms"]
        _close(metrics["nll_loss"] - losses, terms["odds_ratio_term"], rtol, "ORPO beta * log sigma(log odds)")
        _close(jnp.mean(metrics["log_odds_ratio"]), terms["log_odds_ratio_mean"], rtol, "log_odds_ratio")
        _close(jnp.mean(metrics["log_odds_chosen"]), terms["log_odds_chosen_mean"], rtol, "log_odds_chosen")


def test_golden_covers_every_trl_loss_type_and_option():
    """The golden file exercises each TRL loss_type, f-divergence, smoothing and mixes."""
    trl_types = {t for c in CASES for t in c["trl"].get("loss_type", [])} if CASES else set()
    assert {
        "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo",
    } <= trl_types  # fmt: skip
    fdivs = {c["trl"].get("f_divergence_type") for c in CASES}
    assert {"forward_kl", "js_divergence", "alpha_divergence"} <= fdivs
    ours = {c["name"] if isinstance(c["name"], str) else "+".join(c["name"]) for c in CASES}
    assert {"mio", "dpo", "rpo", "simpo", "orpo", "sigmoid+sft", "sigmoid+bco_pair+sft"} <= ours
    assert {c["dtype"] for c in CASES} == {"float32", "float64"}
    assert GOLDEN["trl_version"] == "1.16.0"
