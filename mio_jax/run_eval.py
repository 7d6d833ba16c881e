"""Evaluation of a run's weights while it trains: weighted means of the preference metrics
over the eval split, and greedy held-out reasoning accuracy (``eval.reasoning_tasks``).
(``mio_jax.evaluate`` is the stand-alone command and the reasoning-eval library it uses.)
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from mio_jax import config as mio_config
from mio_jax import evaluate as evaluate_lib
from mio_jax import heldout
from mio_jax import layouts
from mio_jax import logps as logps_lib
from mio_jax import models
from mio_jax import paths
from mio_jax import reference as reference_lib
from mio_jax import stages
from mio_jax import train_step as step_lib
from mio_jax.data import pipeline as data_lib


def device_batch(run: stages.Run, host: layouts.Batch,
                 table: reference_lib.ReferenceTable | None) -> layouts.Batch:
    """A host batch -> the global device batch (precomputed reference log-probs filled in);
    the train loop feeds its batches through it too.

    Raises:
      ValueError: a valid completion slot of an unshared preference batch has no
        completion token.
    """
    if isinstance(host, layouts.PreferenceBatch) and host.advantages is None:
        # (a rollout batch may hold a completion masked on purpose: a truncated one)
        valid = np.asarray(host.valid, bool)
        logps_lib.check_completion_tokens(np.asarray(host.loss_mask)[valid],
                                          name="loss_mask (valid completions)")
    if table is not None:
        host = host.replace(ref_logps=table.lookup(host.example_id, host.weights))
    return data_lib.to_global_arrays(host, run.data.sharding)


@functools.lru_cache(maxsize=8)
def _eval_fn(graphdef, cfg: step_lib.StepConfig):
    return jax.jit(functools.partial(step_lib.eval_step, graphdef=graphdef,
                                     cfg=cfg.full_projection()))


def held_out_metrics(run: stages.Run, params, step: int) -> dict[str, float]:
    """Eval metrics of ``params`` at ``step``: weighted means of the preference metrics
    over the eval split, the probe pairs' (``probe/*``) and, with
    ``eval.reasoning_tasks``, held-out reasoning accuracy."""
    out = _preference_eval(run, params)
    out.update(_probe_metrics(run, params))
    out.update(_reasoning_eval(run, params, step))
    return out


def _probe_metrics(run: stages.Run, params) -> dict[str, float]:
    """The probe pairs' preference metrics as ``probe/<metric>``, with their mean
    log-ratios ``probe/logratio/chosen`` and ``probe/logratio/rejected`` (policy minus
    reference log-prob: the rewards over beta) when the loss has a reference."""
    if run.data.probe_split is None:
        return {}
    metrics = _preference_eval(run, params, run.data.probe_split, run.reference.probe_table)
    out = {f"probe/{k}": v for k, v in metrics.items()}
    if run.step_cfg.reference != "none":
        for side in ("chosen", "rejected"):
            if f"rewards/{side}" in metrics:
                out[f"probe/logratio/{side}"] = metrics[f"rewards/{side}"] / run.step_cfg.beta
    return out


def _preference_eval(run: stages.Run, params, split: data_lib.PreparedSplit | None = None,
                     table: reference_lib.ReferenceTable | None = None) -> dict[str, float]:
    """Weighted means of the preference metrics over ``split`` (default: the eval split,
    with its precomputed reference ``table``)."""
    if split is None:
        split, table = run.data.eval_split, run.reference.eval_table
    if split is None:
        return {}
    it = data_lib.make_pipeline(run.config.data, run.model.tokenizer, split="eval",
                                batch_size=run.config.eval.batch_size, prepared=split,
                                row_multiple=run.data.row_multiple)
    eval_fn = _eval_fn(run.model.graphdef, run.step_cfg)
    sums, counts, denom = {}, {}, 0.0
    for i, host in enumerate(it):
        if 0 < run.config.eval.max_batches <= i:
            break
        batch = device_batch(run, host, table)
        s, c, d = jax.device_get(eval_fn(params, batch, run.reference.consts))
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        for k, v in c.items():
            counts[k] = counts.get(k, 0.0) + float(v)
        denom += float(d)
    out = {k: v / max(denom, 1e-30) for k, v in sums.items()}
    out.update(counts)
    return out


def _reasoning_eval(run: stages.Run, params, step: int) -> dict[str, float]:
    """Greedy accuracy on held-out reasoning-gym problems (``eval.reasoning_tasks``); the
    completions and per-task results go to ``<workdir>/reasoning_eval/step_<N>.json``."""
    tasks = mio_config.reasoning_tasks(run.config)
    if not tasks:
        return {}
    ecfg = run.config.eval
    task_config = heldout.parse_task_config(ecfg.reasoning_task_config)
    examples = [ex for t in tasks for ex in
                heldout.heldout_examples(t, ecfg.reasoning_examples, 0, task_config,
                                              ecfg.reasoning_split)]
    model = nnx.merge(run.model.graphdef, params, run.model.other)

    def sampler(prompts):
        return list(models.generate(model, run.model.tokenizer, list(prompts), temperature=0.0,
                                    max_new_tokens=ecfg.reasoning_max_new_tokens,
                                    batch_size=min(len(prompts),
                                                   ecfg.get("reasoning_batch_size", 16))).texts)

    result = evaluate_lib.evaluate(sampler, examples, "reasoning_gym")
    if jax.process_index() == 0:
        paths.write_json(paths.join(run.workdir, "reasoning_eval", f"step_{step}.json"),
                         result, indent=1)
    out = {"reasoning/accuracy": result["overall"]["accuracy"],
           "reasoning/ci95_low": result["overall"]["ci95"][0],
           "reasoning/ci95_high": result["overall"]["ci95"][1]}
    out.update({f"reasoning/{t}/accuracy": r["accuracy"] for t, r in result["tasks"].items()})
    return out
