"""Comparing two finished runs' workdirs (pod vs one process, resumed vs uninterrupted)."""

import json
import os

import numpy as np
from safetensors.numpy import load_file

import tolerance
from tolerance import TIMING


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


def run_settings(workdir) -> tuple[float, float]:
    """(loss.beta, optim.learning_rate) of a run, from its resolved config.json."""
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return float(config["loss"]["beta"]), float(config["optim"]["learning_rate"])


def assert_same_run(a, b, *, weights=True) -> dict:
    """Asserts two workdirs' metrics rows (same splits and steps; every value within the
    rounding allowance of tests/tolerance.py for its step) and exported weights agree;
    returns the largest differences."""
    ra, rb = metrics_rows(a), metrics_rows(b)
    assert [(r["split"], r["step"]) for r in ra] == [(r["split"], r["step"]) for r in rb]
    beta, lr = run_settings(b)
    worst = 0.0
    for x, y in zip(ra, rb):
        # a train row's metrics come before its step's update; an eval row's after it
        updates = y["step"] - (y["split"] == "train")
        worst = max(worst, tolerance.assert_rows_close(
            x, y, beta=beta, updates=updates, what=f"{y['split']} step {y['step']}"))
    out = {"metrics_max_abs": worst, "rows": len(ra)}
    if weights:
        steps = max(r["step"] for r in rb)
        out["weights_max_abs"] = tolerance.assert_params_close(
            exported_weights(a), exported_weights(b), learning_rate=lr, updates=steps,
            what="exported weights")
    return out
