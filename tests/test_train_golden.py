"""Behaviour unchanged: whole tiny runs equal the numbers earlier code produced
(tests/golden/tiny_runs.json, written by scripts/golden_tiny_runs.py): the code before the
typed-layout / staged-trainer refactor for the layouts and reference modes, 46b643d (before
the one-direction refactor) for LoRA, QLoRA and two online rounds."""

import importlib.util
import json
import os

import pytest
from safetensors.numpy import load_file

import tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "tiny_runs.json")


def _script():
    spec = importlib.util.spec_from_file_location(
        "golden_tiny_runs", os.path.join(ROOT, "scripts", "golden_tiny_runs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.rounding
SCRIPT = _script()
with open(GOLDEN, encoding="utf-8") as f:
    WANT = json.load(f)


def _settings(variant: str) -> tuple[float, float, int]:
    """(beta, peak learning rate, steps) of a variant's run."""
    c = SCRIPT.config(("m", "t", "e"), SCRIPT.VARIANTS[variant])
    return c.loss.beta, c.optim.learning_rate, c.train.steps


def _sizes(folder: str) -> dict:
    """Exported tensor name -> number of weights."""
    return {k: v.size for name in os.listdir(folder) if name.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, name)).items()}


@pytest.mark.parametrize("variant", sorted(SCRIPT.VARIANTS))
def test_tiny_run_equals_the_committed_golden_run(variant, tmp_path):
    assert set(WANT) == set(SCRIPT.VARIANTS)
    got = SCRIPT.run_variant(variant, str(tmp_path))
    want = WANT[variant]
    beta, lr, steps = _settings(variant)
    # the same initial weights (up to the initialiser's rounding, tolerance.init_stat_atols)
    # and the same data
    assert got["initial_weights"].keys() == want["initial_weights"].keys()
    initial_sizes = _sizes(os.path.join(str(tmp_path), "tiny", "tiny_model"))
    for key, (s, sq) in want["initial_weights"].items():
        tol_s, tol_sq = tolerance.init_stat_atols(initial_sizes[key], sq)
        assert abs(got["initial_weights"][key][0] - s) <= tol_s, f"initial {key} sum +- {tol_s:.3g}"
        assert abs(got["initial_weights"][key][1] - sq) <= tol_sq, f"initial {key} sum sq +- {tol_sq:.3g}"
    # Any difference below is float32 rounding in another summation order: another CPU's
    # vector code, and today's attention backward (it recomputes its probabilities) against
    # the autodiff of the code that wrote the goldens. Tolerances from the numbers compared
    # (tests/tolerance.py): the train metrics after steps - 1 updates, eval and weights
    # after steps; the eval accuracy (16 pairs, mean margin ~0.03 against an allowance of
    # ~1e-4) is compared exactly.
    # metrics added since the goldens were written (grad_clipped: tests/test_train_step.py)
    assert got["train"].keys() - want["train"].keys() <= {"grad_clipped"}
    tolerance.assert_rows_close(got["train"], want["train"], beta=beta, updates=steps - 1,
                                what="train metrics", keys=want["train"].keys())
    tolerance.assert_rows_close(got["eval"], want["eval"], beta=beta, updates=steps,
                                what="eval metrics")
    sizes = _sizes(os.path.join(str(tmp_path), variant, "hf_export"))
    assert got["weights"].keys() == want["weights"].keys() == sizes.keys()
    for key, (s, sq) in want["weights"].items():
        tol_s, tol_sq = tolerance.tensor_stat_atols(sizes[key], sq, lr, steps)
        assert abs(got["weights"][key][0] - s) <= tol_s, f"{key} sum +- {tol_s:.3g}"
        assert abs(got["weights"][key][1] - sq) <= tol_sq, f"{key} sum of squares +- {tol_sq:.3g}"
    # online rounds: the same samples (texts and scores), rows and steps
    assert got.get("rounds") == want.get("rounds")
    # the runs train: the weights moved away from the initial ones
    assert any(got["weights"][k] != want["initial_weights"][k] for k in want["weights"])
