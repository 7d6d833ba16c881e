"""Report stage of launch/online_study.sh: tables, figures and the runs' files.

    python scripts/online_report.py --runs=workdirs/online_study --out=docs/results/online

Reads every `<runs>/<method>_seed<k>/` (an online run: `online/round_*/done.json`,
`metrics.jsonl`, `reasoning_eval/step_*.json`, `config.json`), `<runs>/wall_times.tsv` and
`<runs>/base_eval.json` (the base model's held-out eval, made once by the first run: it is
the same for every run); writes into `<out>`: `results.md` (set-up, per-run and per-method
tables: held-out accuracy before and after with Wilson 95 % intervals, the pooled accuracy
of each method's seeds, the per-round pass rate, signal, chosen log-ratio and
logps/chosen), `rounds.png` (`mio_jax.plot.plot_rounds` of every run), `methods.png`
(`plot_methods`: each method's seeds together), `metrics/<run>.jsonl`,
`rounds/<run>.json` (the rounds' done.json), `samples/<run>.jsonl.gz` and
`pairs/<run>.jsonl.gz` (every round's samples with their verdicts, and its rows, each line
with its "round"), `eval/<run>/step_<N>.json` (the held-out
evaluations with their completions) and `eval/base.json`. The reading is written by hand in `<out>/README.md`.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import re
import shutil
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mio_jax import evaluate, plot  # noqa: E402

RUN = re.compile(r"^(?P<method>[a-z0-9_]+)_seed(?P<seed>\d+)$")


def read_run(path: str) -> dict:
    rounds = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(path, "online",
                                                                         "round_*", "done.json")))]
    evals = {}
    for p in glob.glob(os.path.join(path, "reasoning_eval", "step_*.json")):
        step = int(re.search(r"step_(\d+)\.json$", p).group(1))
        evals[step] = json.load(open(p))
    config = json.load(open(os.path.join(path, "config.json")))
    return {"path": path, "rounds": rounds, "evals": dict(sorted(evals.items())),
            "config": config}


def _acc(result: dict) -> str:
    o = result["overall"]
    return f"{o['accuracy']:.3f} ({o['correct']}/{o['n']}) [{o['ci95'][0]:.3f}, {o['ci95'][1]:.3f}]"


def _pooled_counts(results: list[dict]) -> tuple[int, int]:
    """(correct, n) of several evaluations together."""
    return (sum(r["overall"]["correct"] for r in results),
            sum(r["overall"]["n"] for r in results))


def _pooled(results: list[dict]) -> str:
    correct, n = _pooled_counts(results)
    lo, hi = evaluate.wilson_interval(correct, n)
    return f"{correct / max(n, 1):.3f} ({correct}/{n}) [{lo:.3f}, {hi:.3f}]"


METHOD_PANELS = ("pass_rate", "signal_fraction", "chosen_logratio", "logps_chosen",
                 "rejected_logratio", "answer_tokens_mean")


def plot_methods(by_method: dict, base: dict | None):
    """Per method, the mean over its seeds of each round's value (band: the seeds' range),
    and the held-out accuracy pooled over seeds (before: the base model) with its 95 %
    Wilson interval; returns the Figure."""
    import matplotlib.ticker

    n_panels = len(METHOD_PANELS) + 1
    fig, axes, colors = plot.panel_grid(n_panels, 3.4)
    held = axes[len(METHOD_PANELS)]
    for i, (method, rs) in enumerate(sorted(by_method.items())):
        color = colors[i % len(colors)]
        n = min(len(r["rounds"]) for r in rs)
        for ax, key in zip(axes, METHOD_PANELS):
            vals = [[r["rounds"][j].get(key, float("nan")) for r in rs] for j in range(n)]
            ax.plot(range(n), [sum(v) / len(v) for v in vals], marker="o", color=color,
                    label=f"{method} ({len(rs)} seeds)")
            ax.fill_between(range(n), [min(v) for v in vals], [max(v) for v in vals],
                            color=color, alpha=0.15)
            ax.set_title(key)
        points = [] if base is None else [(-1, _pooled_counts([base]))]
        steps = sorted(set.intersection(*(set(r["evals"]) for r in rs)) - {0})
        per_round = {s: j for j, s in enumerate(d["end_step"] for d in rs[0]["rounds"])}
        points += [(per_round.get(step, n - 1), _pooled_counts([r["evals"][step] for r in rs]))
                   for step in steps]
        plot.accuracy_errorbar(
            held, [x + 0.05 * i for x, _ in points],
            [(c / t, *evaluate.wilson_interval(c, t)) for _, (c, t) in points],
            color=color, label=method)
    held.set_title("held-out accuracy, seeds pooled (95% CI)")
    fig = plot.finish_panels(fig, axes, n_panels, "round")
    held.set_xlabel("round (-1: base model)")
    for ax in axes[:n_panels]:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return fig


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    runs = {}
    for path in sorted(glob.glob(os.path.join(a.runs, "*"))):
        m = RUN.match(os.path.basename(path))
        if m and os.path.isfile(os.path.join(path, "config.json")):
            runs[os.path.basename(path)] = dict(read_run(path), **m.groupdict())
    if not runs:
        raise SystemExit(f"no <method>_seed<k> runs under {a.runs}")
    walls = {}
    wall_file = os.path.join(a.runs, "wall_times.tsv")
    if os.path.isfile(wall_file):
        for line in open(wall_file):
            name, secs = line.split("\t")
            walls[name] = int(secs)
    os.makedirs(os.path.join(a.out, "eval"), exist_ok=True)
    base = None
    base_file = os.path.join(a.runs, "base_eval.json")
    if os.path.isfile(base_file):
        base = json.load(open(base_file))
        shutil.copy(base_file, os.path.join(a.out, "eval", "base.json"))
    for name, run in runs.items():
        for sub in ("metrics", "rounds", os.path.join("eval", name)):
            os.makedirs(os.path.join(a.out, sub), exist_ok=True)
        shutil.copy(os.path.join(run["path"], "metrics.jsonl"),
                    os.path.join(a.out, "metrics", f"{name}.jsonl"))
        with open(os.path.join(a.out, "rounds", f"{name}.json"), "w") as f:
            json.dump(run["rounds"], f, indent=1)
        for kind in ("samples", "pairs"):  # every round's file, one gzipped JSONL per run
            os.makedirs(os.path.join(a.out, kind), exist_ok=True)
            # mtime 0 and no name in the header: the same runs give the same bytes
            with open(os.path.join(a.out, kind, f"{name}.jsonl.gz"), "wb") as raw, \
                    gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
                    io.TextIOWrapper(gz, encoding="utf-8") as f:
                for r in range(len(run["rounds"])):
                    path = os.path.join(run["path"], "online", f"round_{r:04d}", f"{kind}.jsonl")
                    for line in open(path):
                        f.write(json.dumps({"round": r, **json.loads(line)}) + "\n")
        for step, result in run["evals"].items():
            with open(os.path.join(a.out, "eval", name, f"step_{step}.json"), "w") as f:
                json.dump(result, f, indent=1)
    names = sorted(runs)
    plot.save_figure(plot.plot_rounds([runs[n]["path"] for n in names], names),
                     os.path.join(a.out, "rounds.png"))

    first = runs[names[0]]["config"]
    o = first["online"]
    lines = ["# Online MIO vs online DPO vs DPO + NLL on SmolLM2-135M-Instruct (generated)", "",
             "Generated by `scripts/online_report.py` from `launch/online_study.sh`; the reading "
             "is in [README.md](README.md).", "", "## Set-up", "",
             f"- Prompts: reasoning-gym `{o['tasks']}` at `{o['task_config']}`, "
             f"{o['prompts_per_round']} per round, item seeds {o['prompt_seed']} + r x "
             f"{o['prompts_per_round']} (the same problems for every method and seed).",
             f"- Per round: K = {o['samples_per_prompt']} samples per prompt at temperature "
             f"{o['temperature']}, top-p {o['top_p']}, up to {o['max_new_tokens']} tokens; "
             f"pairs `{o['pairs']}`; {o['steps_per_round']} steps of "
             f"{first['train']['batch_size']} rows; reference `{o['reference']}`; "
             f"{o['rounds']} rounds.",
             f"- Optimiser: AdamW lr {first['optim']['learning_rate']} "
             f"({first['optim']['schedule']}, warmup {first['optim']['warmup_steps']}) over "
             f"the run's {o['rounds'] * o['steps_per_round']} steps.",
             f"- Held-out: greedy, {first['eval']['reasoning_examples']} problems per "
             "evaluation (item seeds from 1e9), the training task and difficulty; the base "
             "model once (the same for every run: greedy on the same problems) and every "
             f"{o['eval_every_rounds']} rounds of each run.", ""]
    if base is not None:
        lines += [f"Base model, held-out: {_acc(base)}.", ""]
    lines += ["## Runs", "", "| run | loss | beta | held-out before | held-out after [95% CI] | "
              "pass rate round 0 -> last | chosen log-ratio (last round) | logps/chosen "
              "(last round) | rows | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_method = defaultdict(list)
    for n in names:
        run = runs[n]
        ev = list(run["evals"].values())
        if 0 not in run["evals"] and base is not None:
            ev = [base] + ev
        rd = run["rounds"]
        by_method[run["method"]].append(run)
        lines.append(
            f"| {n} | `{run['config']['loss']['name']}` | {run['config']['loss']['beta']} | "
            f"{_acc(ev[0]) if ev else '-'} | {_acc(ev[-1]) if len(ev) > 1 else '-'} | "
            f"{rd[0]['pass_rate']:.3f} -> {rd[-1]['pass_rate']:.3f} | "
            f"{rd[-1].get('chosen_logratio', float('nan')):+.2f} | "
            f"{rd[-1].get('logps_chosen', float('nan')):.2f} | {sum(r['rows'] for r in rd)} | "
            f"{walls.get(n, '-')} |")
    lines += ["", "## Methods (seeds pooled)", "", "| method | seeds | held-out after, pooled "
              "[95% CI] | pass rate last round (mean) |", "|---|---|---|---|"]
    for method, rs in sorted(by_method.items()):
        finals = [list(r["evals"].values())[-1] for r in rs
                  if max(r["evals"], default=0) > 0]
        last = [r["rounds"][-1]["pass_rate"] for r in rs]
        lines.append(f"| {method} | {len(rs)} | {_pooled(finals) if finals else '-'} | "
                     f"{sum(last) / len(last):.3f} |")
    plot.save_figure(plot_methods(by_method, base), os.path.join(a.out, "methods.png"))
    lines += ["", "## Per round (mean over seeds)", ""]
    keys = ("pass_rate", "signal_fraction", "rows", "chosen_logratio", "logps_chosen",
            "answer_tokens_mean")
    lines += ["| method | round | " + " | ".join(keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for method, rs in sorted(by_method.items()):
        for i in range(min(len(r["rounds"]) for r in rs)):
            vals = [sum(r["rounds"][i].get(k, float("nan")) for r in rs) / len(rs) for k in keys]
            lines.append(f"| {method} | {i} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    if walls:
        lines += ["", f"Total wall time of the runs on this machine: {sum(walls.values())} s."]
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}/results.md, rounds.png, methods.png and the runs' files ({len(runs)} runs)")


if __name__ == "__main__":
    main()
