"""The toy of method.md section 8 shows the directions the method predicts."""

import json
import math

import jax
import numpy as np
import pytest

from mio_jax import toy


@pytest.fixture(scope="module")
def result():
    cfg = toy.get_config()
    cfg.num_seeds = 8
    return toy.run(cfg)


def test_dpo_chosen_collapses_and_rejected_falls_further(result):
    c = result["runs"]["dpo_beta0.1"]["curves"]
    zw, zl = c["chosen_logratio"], c["rejected_logratio"]
    assert zw[0] == 0.0 and zl[0] == 0.0  # reference = initial policy
    assert zw[-1] < -10.0  # far below its start
    assert zl[-1] < zw[-1] - 10.0  # the margin grows through the rejected falling further
    # the chosen log-prob itself falls (likelihood displacement), not only the ratio
    assert c["chosen_logp"][-1] < c["chosen_logp"][0] - 10.0
    ends = result["runs"]["dpo_beta0.1"]["ends_over_seeds"]["chosen_logratio"]
    assert np.median(ends) < -10.0


def test_mio_chosen_climbs_towards_its_ceiling(result):
    ceiling = result["chosen_ceiling"]
    for label in ("mio_beta0.2", "mio_beta0.1"):
        r = result["runs"][label]
        zw, zl = r["curves"]["chosen_logratio"], r["curves"]["rejected_logratio"]
        target = min(r["fixed_point"], ceiling)  # ln2/beta, unless pi(chosen) = 1 comes first
        assert r["fixed_point"] == pytest.approx(math.log(2) / r["beta"])
        assert 0.8 * target < zw[-1] <= ceiling + 1e-4, (label, zw[-1], target)
        assert zl[-1] < -5.0
        assert np.mean(np.asarray(r["ends_over_seeds"]["chosen_logratio"]) > 0) >= 0.75


def test_gradient_matched_betas_take_the_same_first_step(result):
    # At z = 0: DPO's dL/dz = (-beta/2, +beta/2), MIO's (-beta/4, +beta/4), so DPO at 0.1 and
    # MIO at 0.2 produce the same gradient in theta and the same first SGD step.
    dpo = result["runs"]["dpo_beta0.1"]["curves"]
    cfg = toy.get_config()
    cfg.steps = 1
    problem = toy.make_problem(jax.random.PRNGKey(cfg.seed), cfg)
    a = toy.train_curves(problem, "dpo", 0.1, cfg)
    b = toy.train_curves(problem, "mio", 0.2, cfg)
    c = toy.train_curves(problem, "mio", 0.1, cfg)
    np.testing.assert_allclose(a["chosen_logratio"], b["chosen_logratio"], atol=1e-6)
    np.testing.assert_allclose(a["rejected_logratio"], b["rejected_logratio"], atol=1e-6)
    assert abs(float(a["chosen_logratio"][1] - c["chosen_logratio"][1])) > 1e-4  # same beta differs
    np.testing.assert_allclose(a["loss"], [math.log(2)], rtol=1e-6)
    np.testing.assert_allclose(b["loss"], [math.log(4)], rtol=1e-6)
    assert dpo["chosen_logratio"][0] == 0.0


def test_cli_writes_metrics_and_png(tmp_path):
    toy.main([f"--out={tmp_path}", "--steps=200", "--num_seeds=2", "--num_pairs=4"])
    with open(tmp_path / "metrics.json") as f:
        data = json.load(f)
    assert data["config"]["num_pairs"] == 4 and data["steps"][-1] == 200
    assert len(data["runs"]["mio_beta0.2"]["curves"]["chosen_logratio"]) == len(data["steps"]) == 21
    assert (tmp_path / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_config_is_rejected():
    cfg = toy.get_config()
    cfg.num_pairs = 30
    with pytest.raises(ValueError, match="num_pairs=30"):
        toy.make_problem(jax.random.PRNGKey(0), cfg)
    cfg = toy.get_config()
    cfg.optimizer = "lion"
    with pytest.raises(ValueError, match="lion"):
        toy.train_curves(toy.make_problem(jax.random.PRNGKey(0), cfg), "dpo", 0.1, cfg)
