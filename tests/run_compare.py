"""Comparing two finished runs' workdirs (pod vs one process, resumed vs uninterrupted)."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

TIMING = {"tokens_per_sec", "tokens_per_sec_per_device", "tflops_per_sec_per_device", "mfu"}


def metrics_rows(workdir) -> list[dict]:
    """metrics.jsonl's rows without the timing keys (which differ between any two runs)."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def exported_weights(workdir) -> dict:
    folder = os.path.join(workdir, "hf_export")
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def assert_same_run(a, b, *, rel=2e-5, abs_=2e-5, weights=True, weight_rtol=1e-4,
                    weight_atol=2e-5) -> dict:
    """Asserts two workdirs' metrics rows (same splits and steps, floats close) and
    exported weights agree; returns the largest differences."""
    ra, rb = metrics_rows(a), metrics_rows(b)
    assert [(r["split"], r["step"]) for r in ra] == [(r["split"], r["step"]) for r in rb]
    worst = 0.0
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys(), (x["step"], x.keys() ^ y.keys())
        for k, v in x.items():
            if isinstance(v, float):
                assert v == pytest.approx(y[k], rel=rel, abs=abs_), (x["split"], x["step"], k)
                worst = max(worst, abs(v - y[k]))
    out = {"metrics_max_abs": worst, "rows": len(ra)}
    if weights:
        wa, wb = exported_weights(a), exported_weights(b)
        assert wa.keys() == wb.keys()
        for k in wa:
            np.testing.assert_allclose(wa[k], wb[k], rtol=weight_rtol, atol=weight_atol,
                                       err_msg=k)
        out["weights_max_abs"] = max(float(np.max(np.abs(wa[k] - wb[k]))) for k in wa)
    return out
