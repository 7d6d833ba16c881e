"""Report stage of launch/reproduce_small.sh: figures, results table and metrics of the runs.

    python scripts/reproduce_small_report.py --out_dir=workdirs/reproduce_small \
        --results=docs/results/small --methods="mio dpo rpo js_multi infonce"

Reads `<out_dir>/runs/<method>/metrics.jsonl`, `<out_dir>/eval/<name>.json`,
`<out_dir>/pairs/groups.jsonl.gz(.stats.json)` and `<out_dir>/wall_times.tsv`; writes into
`<results>`: `curves.png` (train curves of every method side by side, raw and smoothed, plus the
chosen log-ratio z_w = rewards/chosen / beta, which is comparable across betas),
`curves_standard.png` (`mio_jax.plot`'s standard panels), `accuracy.png` (held-out accuracy with
Wilson 95% intervals), `results.md` (tables), `metrics/<method>.jsonl`, `eval/<name>.json`
(accuracies without completions), the pair data and its stats. Methods without a finished run
are listed as missing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import re
import runpy
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mio_jax import plot  # noqa: E402

METHODS = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                                      "reproduce_small.py"))["METHODS"]
PANELS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "z_w", "rewards/margins",
          "rewards/accuracies")
SMOOTH = 5  # moving-average window (steps) of the thick lines


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def base_method(run: str) -> str:
    """The METHODS key of a run name ("mio", "mio_seed1", "mio_long", "mio_long_seed1" -> "mio")."""
    return re.sub(r"(_seed\d+|_long)+$", "", run)


def series_of(series: plot.Series, key: str, beta: float) -> tuple[list[int], list[float]] | None:
    """Train series `key`; "z_w" is rewards/chosen / beta (the chosen log-ratio)."""
    if key == "z_w":
        if "rewards/chosen" not in series:
            return None
        steps, values = series["rewards/chosen"]
        return steps, [v / beta for v in values]
    return series.get(key)


def curves_figure(runs: dict[str, plot.Series], path: str, title: str) -> None:
    """Raw (thin) and smoothed (thick) train curves of every run, one panel per key; runs named
    "<method>_seed<s>" are drawn smoothed and dashed in their method's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    order = list(METHODS)  # one colour per method in every figure
    for ax, key in zip(axes.flat, PANELS):
        for method, series in runs.items():
            base = base_method(method)
            beta = METHODS[base][1]
            data = series_of(series, key, beta)
            if data is None:
                continue
            steps, values = data
            c = colors[order.index(base) % len(colors)]
            if "_seed" in method:  # another data-order seed: smoothed, dashed
                ax.plot(steps, moving_average(values, SMOOTH), color=c, lw=1.2, ls="--", label=method)
                continue
            ax.plot(steps, values, color=c, lw=0.7, alpha=0.35)
            ax.plot(steps, moving_average(values, SMOOTH), color=c, lw=2,
                    label=f"{method} ({METHODS[base][0]}, beta {beta:g})")
            ev = series.get("eval/" + ("rewards/chosen" if key == "z_w" else key))
            if ev:
                scale = 1 / beta if key == "z_w" else 1.0
                ax.plot(ev[0], [v * scale for v in ev[1]], color=c, marker="*", ms=12, ls="none")
        name = {"z_w": "z_w = log pi(y_w) - log pi_ref(y_w) (= rewards/chosen / beta)"}.get(key, key)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key in ("rewards/chosen", "z_w", "rewards/rejected", "rewards/margins"):
            ax.axhline(0, color="k", lw=0.6)
        if key == "rewards/chosen":  # the chosen-gradient zeros: b z_w = ln n for JS with n completions
            if any(base_method(m) == "mio" for m in runs):
                ax.axhline(math.log(2), color="k", ls=":", lw=1, label="MIO anchor ln 2")
            if any(base_method(m) == "js_multi" for m in runs):
                ax.axhline(math.log(4), color="gray", ls=":", lw=1, label="js_multi anchor ln 4 (K = 4)")
        if key == "z_w" and any(base_method(m) == "mio" for m in runs):
            ax.axhline(math.log(2) / METHODS["mio"][1], color="k", ls=":", lw=1,
                       label=f"MIO anchor ln2 / {METHODS['mio'][1]:g}")
            ax.legend(fontsize=7)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title + f": thin = per step (batch of 2), thick = {SMOOTH}-step moving average, "
                 "star = final pass over all training rows", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def accuracy_figure(evals: dict[str, dict], path: str) -> None:
    """Held-out accuracy of the base model and after each method, with Wilson 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evals)
    acc = [evals[n]["accuracy"] for n in names]
    lo = [a - evals[n]["ci95"][0] for a, n in zip(acc, names)]
    hi = [evals[n]["ci95"][1] - a for a, n in zip(acc, names)]
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names)), 3.6))
    colors = ["gray" if n == "base" else "C%d" % list(METHODS).index(base_method(n)) for n in names]
    ax.bar(names, acc, yerr=[lo, hi], capsize=5, color=colors)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(0, 1)
    n = evals[names[0]]["n"]
    ax.set_title(f"basic_arithmetic, {n} held-out problems (item seeds >= 1e9), 95% Wilson CI", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_eval(path: str) -> dict | None:
    """The overall result of an evaluate.py JSON (None if absent)."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    (result,) = report["results"].values()
    return result["overall"]


def last_mean(series: plot.Series, key: str, n: int = 5) -> float:
    """Mean of the last n train values of `key` (nan when absent)."""
    if key not in series:
        return float("nan")
    values = series[key][1][-n:]
    return sum(values) / len(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--methods", required=True, help="space-separated method names")
    args = ap.parse_args()
    out, res = args.out_dir, args.results
    os.makedirs(os.path.join(res, "metrics"), exist_ok=True)
    os.makedirs(os.path.join(res, "eval"), exist_ok=True)

    methods = [m for m in args.methods.split() if os.path.isfile(os.path.join(out, "runs", m, "metrics.jsonl"))]
    missing = [m for m in args.methods.split() if m not in methods]
    runs_dir = os.path.join(out, "runs")
    methods += sorted(d for d in os.listdir(runs_dir) if d != base_method(d) and base_method(d) in methods
                      and os.path.isfile(os.path.join(runs_dir, d, "metrics.jsonl")))
    runs = {m: plot.read_metrics(os.path.join(out, "runs", m)) for m in methods}
    for m in methods:
        shutil.copy(os.path.join(out, "runs", m, "metrics.jsonl"), os.path.join(res, "metrics", f"{m}.jsonl"))

    # pair data (small) and its stats
    groups = os.path.join(out, "pairs", "groups.jsonl.gz")
    stats = {}
    if os.path.isfile(groups + ".stats.json"):
        with open(groups + ".stats.json", encoding="utf-8") as f:
            stats = json.load(f)
        shutil.copy(groups + ".stats.json", os.path.join(res, "pairs.stats.json"))
    if os.path.isfile(groups) and os.path.getsize(groups) < 1_000_000:
        shutil.copy(groups, os.path.join(res, "groups.jsonl.gz"))
    group_sizes = []
    if os.path.isfile(groups):
        with gzip.open(groups, "rt", encoding="utf-8") as f:
            group_sizes = [len(json.loads(line)["completions"]) for line in f if line.strip()]

    # evaluations (the completions are dropped from the committed copies, the scores kept)
    evals, lengths = {}, {}
    for name in ["base"] + methods:
        path = os.path.join(out, "eval", f"{name}.json")
        overall = read_eval(path)
        if overall is None:
            continue
        evals[name] = overall
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        texts = [c["completions"][0] for r in report["results"].values() for c in r.get("completions", [])]
        lengths[name] = sorted(len(t) for t in texts)[len(texts) // 2] if texts else float("nan")
        for r in report["results"].values():
            r["completions"] = [{"answer": c["answer"], "completion": c["completions"][0]}
                                for c in r.get("completions", [])]
        with open(os.path.join(res, "eval", f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)

    walls = {}
    if os.path.isfile(os.path.join(out, "wall_times.tsv")):
        with open(os.path.join(out, "wall_times.tsv"), encoding="utf-8") as f:
            for line in f:
                k, v = line.split("\t")
                walls[k] = int(v)

    short = {m: r for m, r in runs.items() if "_long" not in m}
    long = {m: r for m, r in runs.items() if "_long" in m}
    if short:
        curves_figure(short, os.path.join(res, "curves.png"),
                      "SmolLM2-135M-Instruct, on-policy basic_arithmetic groups, 30 steps")
        fig = plot.plot_runs([os.path.join(out, "runs", m) for m in short], labels=list(short))
        fig.savefig(os.path.join(res, "curves_standard.png"), dpi=90)
    if long:
        steps = max(r["rewards/chosen"][0][-1] for r in long.values())
        curves_figure(long, os.path.join(res, "curves_long.png"),
                      f"SmolLM2-135M-Instruct, on-policy basic_arithmetic groups, {steps} steps")
    if evals:
        accuracy_figure(evals, os.path.join(res, "accuracy.png"))

    cfg = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs",
                                      "reproduce_small.py"))["get_config"]("mio")
    s = stats.get("stats", {})
    lines = ["# Small-scale reproduction: MIO vs DPO and friends on SmolLM2-135M-Instruct", "",
             "Generated by `launch/reproduce_small.sh` (report stage); the reading is in "
             "[../README.md](../README.md).", "",
             "## Set-up", "",
             f"- Model: SmolLM2-135M-Instruct (the embedded GGUF, float32 training).",
             f"- On-policy data: `configs/reproduce_pairs.py` -- {s.get('prompts', '?')} basic_arithmetic "
             f"prompts (reasoning-gym, single-digit operands, 2-3 terms, item seeds 0..), K = "
             f"{stats.get('config', {}).get('num_samples', '?')} samples each at temperature "
             f"{stats.get('config', {}).get('temperature', '?')}, verified by reasoning-gym's checker: "
             f"{s.get('correct', '?')} correct / {s.get('samples', '?')} samples; "
             f"{s.get('prompts_with_rows', '?')} prompts had both a correct and an incorrect sample and "
             f"became K-way rows (sizes {sorted(group_sizes)}); "
             f"{s.get('all_correct', '?')} all correct, {s.get('none_correct', '?')} none correct.",
             f"- Training: {cfg.train.steps} steps x {cfg.train.batch_size} rows, AdamW lr "
             f"{cfg.optim.learning_rate:g} ({cfg.optim.schedule}, warmup {cfg.optim.warmup_steps}), "
             f"grad clip {cfg.optim.max_grad_norm}, seed {cfg.seed}, max_length {cfg.data.max_length}, "
             f"reference log-probs precomputed; pairwise losses on one pair per row (first correct vs last "
             f"distinct incorrect), group losses on the whole row.",
             f"- Held-out accuracy: `mio_jax.evaluate`, greedy, 80 new tokens, the same task and difficulty, "
             f"item seeds from 1e9 (disjoint from training).", "",
             "## Results", "",
             "Final pass = one evaluation pass over all training rows after the last step (no noise from "
             "the batch of 2); z_w = mean over rows of log pi(y_w) - log pi_ref(y_w) = the change of "
             "logps/chosen (nats per completion); z_l likewise for the rejected (for the group losses, "
             "the mean over negatives as the loss's metrics define it). Train = mean of the last 5 steps. "
             "Rows `<method>_seed<s>`: the same method with another data-order seed (`--config.seed`); "
             "rows `<method>_long`: the same method trained longer (`--config.train.steps`, the cosine "
             "schedule stretched to the new length).", "",
             "| method | loss | beta | final rewards/chosen | final rewards/rejected | final z_w (logps/chosen change) "
             "| final z_l | final logps/chosen | final reward acc. | train rewards/chosen (last 5) "
             "| held-out acc. before | held-out acc. after [95% CI] | held-out answer length (median chars) "
             "| train wall (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = evals.get("base")
    base_txt = (f"{base['accuracy']:.2f} ({base['correct']}/{base['n']}) "
                f"[{base['ci95'][0]:.2f}, {base['ci95'][1]:.2f}]") if base else "n/a"
    for m in methods:
        loss, beta = METHODS[base_method(m)][0], METHODS[base_method(m)][1]
        r = runs[m]

        def ev(key):
            return r[f"eval/{key}"][1][-1] if f"eval/{key}" in r else float("nan")

        after = evals.get(m)
        after_txt = (f"{after['accuracy']:.2f} ({after['correct']}/{after['n']}) "
                     f"[{after['ci95'][0]:.2f}, {after['ci95'][1]:.2f}]") if after else "n/a"
        lines.append(
            f"| {m} | `{loss}` | {beta:g} | {ev('rewards/chosen'):+.3f} | {ev('rewards/rejected'):+.3f} "
            f"| {ev('rewards/chosen') / beta:+.2f} | {ev('rewards/rejected') / beta:+.2f} | {ev('logps/chosen'):.2f} "
            f"| {ev('rewards/accuracies'):.2f} | {last_mean(r, 'rewards/chosen'):+.3f} | {base_txt} | {after_txt} "
            f"| {lengths.get(m, 'n/a')} (base {lengths.get('base', 'n/a')}) | {walls.get('train_' + m, 'n/a')} |")
    if missing:
        lines += ["", f"Not run (time budget): {', '.join(missing)}."]
    uname = platform.uname()
    cpu = subprocess.run(["bash", "-c", "lscpu | grep 'Model name' | sed 's/.*: *//'"],
                         capture_output=True, text=True).stdout.strip()
    lines += ["", "## Wall times (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in walls.items()]
    lines += ["", "## Command and hardware", "",
              "```", "bash launch/reproduce_small.sh", "```", "",
              "(stages: pairs, base_eval, methods, long, seeds, report; `launch/reproduce_small.sh STAGE ...` "
              "runs some of them on the outputs of the others.)", "",
              f"- Hardware: {os.cpu_count()}-core {uname.machine} CPU ({cpu}), shared with other jobs "
              "during the run (wall times are inflated accordingly), no GPU.",
              f"- Software: Python {platform.python_version()}, jax, flax.nnx, optax (see setup.py).", "",
              "## Files", "",
              "- `curves.png`: rewards/chosen, rewards/rejected, logps/chosen, z_w, margins and reward "
              "accuracy over steps, all methods side by side.",
              "- `curves_standard.png`: the same runs through `python -m mio_jax.plot`.",
              "- `curves_long.png`: the `_long` runs.",
              "- `accuracy.png`: held-out accuracy before and after each method.",
              "- `metrics/<method>.jsonl`: every logged train row and the final pass (`\"split\": \"eval\"`).",
              "- `eval/<name>.json`: held-out scores and greedy completions.",
              "- `groups.jsonl.gz`, `pairs.stats.json`: the on-policy K-way rows and the builder's stats.", ""]
    with open(os.path.join(res, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    print(f"wrote {res}/results.md ({len(methods)} methods, {len(evals)} evaluations)")


if __name__ == "__main__":
    main()
