"""Study A's report (docs/results/study_a/protocol.md): endpoints per run, paired comparisons,
the decision rule, figures; the runs' small files copied beside it.

    python scripts/study_a_report.py --runs=workdirs/study_a/runs --out=docs/results/study_a

Reads the sweep folder of launch/study_a.sh (cells ``<method>_lr<lr>_beta<beta>``, runs
``<method>_seed<k>``); a run without its final eval is listed as unfinished and left out.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence

from mio_jax import compare, paired

CELL = re.compile(r"(?P<method>[a-z_]+)_lr(?P<lr>[0-9.e+-]+)_beta(?P<beta>[0-9.e+-]+)$")
COPIED = ("metrics.jsonl", "config.json", "sweep_run.json", "sweep_test.json", "test_eval.json")


def endpoints(rows: Sequence[Mapping]) -> dict:
    """The protocol's endpoints of one run from its metrics rows.

    c(t) = logps/chosen(t) - logps/chosen(0) over the eval rows (the training pairs), and
    the same of the probe pairs; D = max c - c(T); P = c_probe(T).
    """
    evals = sorted((r for r in rows if r.get("split") == "eval" and "logps/chosen" in r),
                   key=lambda r: r["step"])
    if len(evals) < 2 or evals[0]["step"] != 0:
        raise ValueError("needs the step-0 eval and at least one later eval")
    c0, p0 = evals[0]["logps/chosen"], evals[0].get("probe/logps/chosen")
    r0 = evals[0]["logps/rejected"]
    c = [r["logps/chosen"] - c0 for r in evals]
    peak = max(range(len(c)), key=lambda i: c[i])
    clipped = [r["grad_clipped"] for r in rows if r.get("split", "train") == "train"
               and "grad_clipped" in r]
    out = {"steps": [r["step"] for r in evals], "c": c,
           "rejected": [r["logps/rejected"] - r0 for r in evals],
           "D": max(c) - c[-1], "peak": c[peak], "peak_step": evals[peak]["step"],
           "peak_is_final": peak == len(c) - 1, "final_step": evals[-1]["step"],
           "clipped_fraction": sum(clipped) / len(clipped) if clipped else math.nan,
           "validation_accuracy": [r.get("reasoning/accuracy") for r in evals]}
    if p0 is not None:
        out["c_probe"] = [r["probe/logps/chosen"] - p0 for r in evals]
        out["P"] = out["c_probe"][-1]
    return out


def decide(d_dpo: Sequence[float], d_mio: Sequence[float], p_dpo: Sequence[float],
           p_mio: Sequence[float], dpo_peak_final: Sequence[bool]) -> tuple[str, dict]:
    """The protocol's decision on the late-stage claim from the paired per-seed endpoints
    (seed order the same in every list). Returns (verdict, statistics)."""
    n = len(d_dpo)
    zeros = [0.0] * n
    dpo_drop = paired.paired_t(d_dpo, zeros)
    diff = paired.paired_t(d_dpo, d_mio)
    probe = paired.paired_t(p_mio, p_dpo)
    stats = {"D_dpo": dpo_drop, "D_dpo_minus_D_mio": diff, "P_mio_minus_P_dpo": probe}
    if not dpo_drop.low > 0 or sum(dpo_peak_final) >= 3:
        return "not testable at this scale: DPO's chosen log-ratio shows no late decline", stats
    if diff.low > 0 and probe.mean > 0:
        return "supported: MIO's chosen log-ratio falls measurably less than DPO's", stats
    return "not supported: DPO declines, but MIO does not reduce the decline measurably", stats


def load_runs(runs: str) -> dict:
    """cell -> seed -> (run folder, endpoints) for every finished run; and the unfinished."""
    cells, unfinished = {}, []
    for cell in sorted(os.listdir(runs)):
        if not CELL.match(cell) or not os.path.isdir(os.path.join(runs, cell)):
            continue
        for name in sorted(os.listdir(os.path.join(runs, cell))):
            match, folder = compare.RUN_NAME.match(name), os.path.join(runs, cell, name)
            if not match or not os.path.isdir(folder):
                continue
            if not os.path.isfile(os.path.join(folder, "sweep_run.json")):
                unfinished.append(f"{cell}/{name}")
                continue
            with open(os.path.join(folder, "metrics.jsonl"), encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
            cells.setdefault(cell, {})[int(match["seed"])] = (folder, endpoints(rows))
    return {"cells": cells, "unfinished": unfinished}


def copy_small_files(cells: Mapping, out: str) -> None:
    """Each finished run's metrics, config, sweep records and evaluations (with per-problem
    completions) under ``out/runs/<cell>/<method>_seed<k>/``."""
    for cell, seeds in cells.items():
        for _, (folder, _) in seeds.items():
            dst = os.path.join(out, "runs", cell, os.path.basename(folder))
            os.makedirs(dst, exist_ok=True)
            for name in COPIED:
                if os.path.isfile(os.path.join(folder, name)):
                    shutil.copy(os.path.join(folder, name), dst)
            evals = os.path.join(folder, "reasoning_eval")
            if os.path.isdir(evals):
                shutil.copytree(evals, os.path.join(dst, "reasoning_eval"), dirs_exist_ok=True)


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _interval(s: paired.Interval) -> str:
    return f"{s.mean:+.3f} [{s.low:+.3f}, {s.high:+.3f}] (n={s.n}, p={_fmt(s.p_value)})"


def figure(cells: Mapping, path: str) -> None:
    """c(t) on the training pairs and on the probe pairs, per arm: seeds as thin lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (cell, seeds) in enumerate(sorted(cells.items())):
        for j, (seed, (_, e)) in enumerate(sorted(seeds.items())):
            label = cell if j == 0 else None
            axes[0].plot(e["steps"], e["c"], color=colors[i % len(colors)], lw=1, label=label)
            if "c_probe" in e:
                axes[1].plot(e["steps"], e["c_probe"], color=colors[i % len(colors)], lw=1,
                             label=label)
    for ax, title in zip(axes, ("training pairs: chosen log-ratio c(t)",
                                "probe pairs (never trained on): chosen log-ratio")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(runs: str, out: str) -> str:
    data = load_runs(runs)
    cells = data["cells"]
    copy_small_files(cells, out)
    lines = ["# Study A: results", "",
             "Generated by `scripts/study_a_report.py` from `launch/study_a.sh`; the protocol "
             "is [protocol.md](protocol.md).", "",
             "| arm | seed | D (drop from peak) | peak | peak step | final step | P (probe) "
             "| final validation acc. | test acc. | clipped steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cell, seeds in sorted(cells.items()):
        for seed, (folder, e) in sorted(seeds.items()):
            test = os.path.join(folder, "sweep_test.json")
            acc = json.load(open(test))["value"] if os.path.isfile(test) else None
            lines.append(f"| {cell} | {seed} | {_fmt(e['D'])} | {_fmt(e['peak'])} | "
                         f"{e['peak_step']} | {e['final_step']} | {_fmt(e.get('P'))} | "
                         f"{_fmt(e['validation_accuracy'][-1])} | {_fmt(acc)} | "
                         f"{_fmt(e['clipped_fraction'])} |")
    if data["unfinished"]:
        lines += ["", "Unfinished runs (left out): " + ", ".join(data["unfinished"])]
    mio, dpo = cells.get("mio_lr5e-06_beta0.1", {}), cells.get("dpo_lr5e-06_beta0.1", {})
    seeds = sorted(set(mio) & set(dpo))
    lines += ["", "## The confirmatory comparison (MIO and DPO at beta 0.1)", ""]
    if len(seeds) >= 2:
        verdict, stats = decide([dpo[s][1]["D"] for s in seeds], [mio[s][1]["D"] for s in seeds],
                                [dpo[s][1]["P"] for s in seeds], [mio[s][1]["P"] for s in seeds],
                                [dpo[s][1]["peak_is_final"] for s in seeds])
        lines += [f"Paired seeds: {seeds}.", ""]
        lines += [f"- {k}: {_interval(v)}" for k, v in stats.items()]
        lines += ["", f"**Decision (protocol's rule): {verdict}.**"]
        if len(seeds) < 4:
            lines += ["", f"(Only {len(seeds)} of the protocol's 4 seeds are finished: the "
                      "decision is provisional until all are.)"]
    else:
        lines += ["Not enough paired seeds finished yet."]
    if cells:
        figure(cells, os.path.join(out, "chosen_logratio.png"))
        lines += ["", "![chosen log-ratios](chosen_logratio.png)"]
    # the test comparison once every run of both cells has its test evaluation
    test_cells = [os.path.join(runs, c) for c in ("mio_lr5e-06_beta0.1", "dpo_lr5e-06_beta0.1")]
    if seeds and all(os.path.isfile(os.path.join(folder, "test_eval.json"))
                     for cell in test_cells for folder in glob.glob(os.path.join(cell, "*_seed*"))
                     if os.path.isdir(folder)):
        rows = compare.compare(compare.load_study(test_cells, "test_eval.json"), "dpo",
                               num_resamples=10000)
        lines += ["", "## Test accuracy (secondary; 300 problems, greedy)", "",
                  compare.format_rows(rows)]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    print(report(a.runs, a.out))


if __name__ == "__main__":
    main()
