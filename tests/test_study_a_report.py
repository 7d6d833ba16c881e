"""Study A's endpoints and decision rule (scripts/study_a_report.py) on made-up runs."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "study_a_report", os.path.join(ROOT, "scripts", "study_a_report.py"))
REPORT = importlib.util.module_from_spec(spec)
spec.loader.exec_module(REPORT)


def _rows(chosen, probe):
    return ([{"split": "train", "step": s, "grad_clipped": float(s % 2)} for s in (1, 2, 3, 4)]
            + [{"split": "eval", "step": 2 * i, "logps/chosen": c, "logps/rejected": -60.0 - i,
                "probe/logps/chosen": p} for i, (c, p) in enumerate(zip(chosen, probe))])


def test_endpoints_follow_the_protocol():
    e = REPORT.endpoints(_rows([-50.0, -48.0, -47.0, -49.5], [-40.0, -39.0, -41.0, -42.0]))
    assert e["c"] == [0.0, 2.0, 3.0, 0.5]
    assert e["D"] == pytest.approx(2.5) and e["peak"] == 3.0 and e["peak_step"] == 4
    assert e["P"] == -2.0 and not e["peak_is_final"]
    assert e["rejected"] == [0.0, -1.0, -2.0, -3.0] and e["clipped_fraction"] == 0.5
    with pytest.raises(ValueError, match="step-0 eval"):
        REPORT.endpoints(_rows([-50.0], [-40.0]))


def test_the_decision_rule():
    peak_not_final = [False] * 4
    # DPO declines clearly, MIO much less, MIO's probe higher: supported
    verdict, _ = REPORT.decide([2.0, 2.2, 1.9, 2.1], [0.1, 0.3, 0.0, 0.2],
                               [-1.0, -1.2, -0.9, -1.1], [0.2, 0.1, 0.3, 0.0], peak_not_final)
    assert verdict.startswith("supported")
    # no decline of DPO (its interval includes 0): not testable
    verdict, _ = REPORT.decide([0.5, -0.4, 0.1, -0.2], [0.0] * 4, [0.0] * 4, [0.0] * 4,
                               peak_not_final)
    assert verdict.startswith("not testable")
    # DPO peaks at the final eval in 3 of 4 seeds: not testable either
    verdict, _ = REPORT.decide([2.0, 2.2, 1.9, 2.1], [0.0] * 4, [0.0] * 4, [1.0] * 4,
                               [True, True, True, False])
    assert verdict.startswith("not testable")
    # a decline, and MIO's as large: not supported
    verdict, stats = REPORT.decide([2.0, 2.2, 1.9, 2.1], [2.1, 2.0, 2.0, 2.2],
                                   [-1.0] * 4, [-1.0] * 4, peak_not_final)
    assert verdict.startswith("not supported")
    assert stats["D_dpo_minus_D_mio"].mean == pytest.approx(-0.025)
