"""Training orchestration: the only module that touches files during training.

Order of work (``train_and_evaluate``):
  1. validate the config; build the mesh; load tokenizer and model (sharded);
  2. prepare the train / eval splits;
  3. optimizer; train state created sharded from abstract shapes;
  4. resume from ``<workdir>/checkpoints`` if it holds a readable checkpoint
     (params, optimizer state, step, RNG and data position), else start from
     ``model.path``;
  5. reference: frozen copy (in the compute dtype), precomputed table (cached on disk), or none;
  6. step loop: metrics every ``log.every_steps``, eval every
     ``eval.every_steps``, checkpoints every ``checkpoint.every_steps``,
     SIGTERM -> checkpoint and ``Preempted``; NaN/Inf -> ``FloatingPointError``
     with nothing saved after the bad step;
  7. final checkpoint, final eval, Hugging Face export.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from mio_jax import checkpoint as ckpt_lib
from mio_jax import config_validation
from mio_jax import logps as logps_lib
from mio_jax import metrics as metrics_lib
from mio_jax import optim
from mio_jax import reference as reference_lib
from mio_jax import sharding as sharding_lib
from mio_jax import train_step as step_lib

_HOST_ONLY = ("example_id",)


class Preempted(SystemExit):
    """Raised after the SIGTERM checkpoint is on disk (exit status 143)."""

    def __init__(self, step: int):
        super().__init__(143)
        self.step = step


@dataclasses.dataclass
class _Run:
    """What the loop needs; built once by ``_setup``."""

    config: Any
    workdir: str
    mesh: Any
    model_cfg: Any
    tokenizer: Any
    graphdef: Any
    other: Any
    state: Any
    state_sh: Any
    ref_params: Any
    train_it: Any
    eval_prepared: Any
    train_table: Any
    eval_table: Any
    step_cfg: step_lib.StepConfig
    tx: Any
    schedule: Any
    total_steps: int
    ckpt: ckpt_lib.Checkpointer
    data_sh: Any


def resolve_model_path(path: str) -> str:
    """``"smollm2"`` -> the embedded GGUF; otherwise the path, which must exist."""
    if path == "smollm2":
        from mio_jax.models import smollm2_gguf_path

        return smollm2_gguf_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model.path={path!r} does not exist")
    return path


def _batch_dict(batch) -> dict:
    if isinstance(batch, dict):
        return dict(batch)
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}


def _step_config(config) -> step_lib.StepConfig:
    from mio_jax import losses

    names = config_validation.loss_names(config.loss.name)
    used = set().union(*(losses.spec(n).hparams for n in names))
    needs_len = any(losses.spec(n).needs_lengths != "none" for n in names)
    return step_lib.StepConfig(
        loss_name=names[0] if len(names) == 1 else tuple(names),
        beta=float(config.loss.beta),
        loss_hparams=tuple(sorted((k, config.loss[k]) for k in used
                                  if config.loss.get(k) is not None)),
        loss_weights=(None if config.loss.get("weights") is None
                      else tuple(float(w) for w in config.loss.weights)),
        grad_accum_steps=int(config.train.grad_accum_steps),
        chunk_size=int(config.model.logps_chunk_size),
        reference=config.reference.mode, lengths=needs_len,
        ld_alpha=None if config.loss.ld_alpha is None else float(config.loss.ld_alpha),
        use_weighting=bool(config.loss.use_weighting),
        max_tokens_fraction=(None if config.model.completion_logits_fraction is None
                             else float(config.model.completion_logits_fraction)),
        weight_norms=bool(config.log.weight_norms))


def _full_projection(cfg: step_lib.StepConfig) -> step_lib.StepConfig:
    """The same step settings with the output projection on every position."""
    return dataclasses.replace(cfg, max_tokens_fraction=None)


def flop_model(model_cfg, params) -> metrics_lib.FlopModel:
    """N (matmul parameters), layers and attention width of a decoder."""
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    embed = model_cfg.vocab_size * model_cfg.hidden_size
    n = total if model_cfg.tie_word_embeddings else total - embed
    return metrics_lib.FlopModel(n, model_cfg.num_hidden_layers,
                                 model_cfg.num_attention_heads * model_cfg.head_dim)


def _precompute(config, run_parts, prepared, split, params, workdir) -> Any:
    """Reference table of one split (cached on disk)."""
    from mio_jax.data.pipeline import make_pipeline

    graphdef, other, mesh, data_sh, step_cfg, tokenizer = run_parts
    dcfg = config.data.copy_and_resolve_references()
    with dcfg.unlocked():
        dcfg.packing = False
    ref_fn_jit = jax.jit(functools.partial(step_lib.reference_logps, graphdef, cfg=step_cfg))

    def batches():
        return make_pipeline(dcfg, tokenizer, split="eval", batch_size=config.reference.batch_size,
                             prepared=prepared)

    def ref_fn(host_batch):
        dev = {k: v for k, v in _batch_dict(host_batch).items() if k not in _HOST_ONLY}
        out = ref_fn_jit(params, other, _to_global(dev, data_sh))
        if jax.process_count() > 1:  # this process's rows, matching its host batch
            from jax.experimental import multihost_utils

            out = multihost_utils.global_array_to_host_local_array(out, mesh, data_sh.spec)
        return np.asarray(jax.device_get(out))

    settings = {"dtype": config.model.dtype, "ld_alpha": config.loss.ld_alpha, "split": split,
                "K": prepared.K}
    cache_dir = config.reference.cache_dir or os.path.join(workdir, "reference_cache")
    table, path, hit = reference_lib.build_or_load(
        cache_dir=cache_dir, batches=lambda: (_batch_dict(b) for b in batches()), ref_fn=ref_fn,
        weights_fp=reference_lib.weights_fingerprint(params), settings=settings)
    logging.info("reference log-probs (%s): %s %s", split, "cache hit" if hit else "computed", path)
    return table


def _to_global(batch: dict, data_sh) -> dict:
    from mio_jax.data.pipeline import to_global_arrays

    return to_global_arrays(batch, data_sh)


def load_model(config, mesh):
    """Tokenizer and sharded model of ``model.path``.

    Called outside ``jax.set_mesh``: nnx's abstract init would read the
    logical axis names as mesh axes inside a mesh context.
    """
    from mio_jax import models

    model_path = resolve_model_path(config.model.path)
    tokenizer = models.load_tokenizer(
        resolve_model_path(config.model.tokenizer_path) if config.model.tokenizer_path
        else model_path)
    model = models.load_pretrained(
        model_path, dtype=config.model.dtype, param_dtype=config.model.param_dtype, mesh=mesh,
        rules=models.DEFAULT_RULES, remat_policy=config.model.remat_policy,
        scan_layers=config.model.scan_layers, attention=config.model.attention)
    return tokenizer, model


def _setup(config, workdir: str, mesh, tokenizer, model) -> _Run:
    from mio_jax import models
    from mio_jax.data.pipeline import make_pipeline, prepare

    rules = models.DEFAULT_RULES
    model_path = config.model.path
    graphdef, params_state, other_state = nnx.split(model, nnx.Param, ...)
    param_specs = sharding_lib.state_partition_specs(params_state, rules, mesh)
    params = nnx.to_pure_dict(params_state)
    other = nnx.to_pure_dict(other_state)
    model_cfg = model.cfg
    del model, params_state

    dp = sharding_lib.data_parallel_size(mesh)
    data_sh = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(tuple(a for a in sharding_lib.BATCH_AXES
                                               if a in mesh.shape)))
    train_prepared = prepare(config.data, tokenizer, split="train")
    logging.info("train data: %s", train_prepared.summary)
    eval_prepared = None
    if config.eval.max_batches >= 0 and config.data.eval_path:
        eval_prepared = prepare(config.data, tokenizer, split="eval")
        logging.info("eval data: %s", eval_prepared.summary)
    steps_per_epoch = len(train_prepared.groups) // config.train.batch_size
    total_steps = (math.ceil(config.train.epochs * steps_per_epoch) if config.train.epochs > 0
                   else int(config.train.steps))
    train_it = make_pipeline(config.data, tokenizer, split="train",
                             batch_size=config.train.batch_size, seed=config.seed,
                             prepared=train_prepared,
                             row_multiple=max(dp // jax.process_count(), 1))

    tx, schedule = optim.from_config(config.optim, total_steps)
    init = functools.partial(step_lib.init_state, tx=tx, seed=config.seed)
    abstract = jax.eval_shape(init, params)
    state_specs = step_lib.TrainState(
        step=jax.sharding.PartitionSpec(), params=param_specs,
        opt_state=sharding_lib.optimizer_state_specs(tx, abstract.opt_state, param_specs),
        rng=jax.sharding.PartitionSpec())
    state_sh = sharding_lib.named(mesh, state_specs)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                 keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
    abstract_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               abstract, state_sh)
    restored = ckpt.restore(abstract_sh)
    if restored is not None:
        step0, state, data_state, _ = restored
        train_it.set_state(data_state)
        logging.info("resumed from %s at step %d", ckpt.directory, step0)
    else:
        state = jax.jit(init, out_shardings=state_sh)(params)
        logging.info("initialised from %s", model_path)

    step_cfg = _step_config(config)
    mode = config.reference.mode
    parts = (graphdef, other, mesh, data_sh, _full_projection(step_cfg), tokenizer)
    train_table = eval_table = None
    if mode == "precomputed":
        train_table = _precompute(config, parts, train_prepared, "train", params, workdir)
        if eval_prepared is not None:
            eval_table = _precompute(config, parts, eval_prepared, "eval", params, workdir)
    ref_params = reference_lib.frozen_params(params, model_cfg.dtype) if mode == "frozen" else None
    del params  # precomputed / none: no reference weights stay in memory
    return _Run(config, workdir, mesh, model_cfg, tokenizer, graphdef, other, state, state_sh,
                ref_params, train_it, eval_prepared, train_table, eval_table, step_cfg, tx,
                schedule, total_steps, ckpt, data_sh)


def _device_batch(run: _Run, host, table) -> tuple[dict, dict]:
    """Host batch -> (global device batch, host-only fields)."""
    batch = _batch_dict(host)
    if "segment_ids" not in batch:
        valid = np.asarray(batch["valid"], bool)
        logps_lib.check_completion_tokens(np.asarray(batch["loss_mask"])[valid],
                                          name="loss_mask (valid completions)")
    if table is not None:
        batch["ref_logps"] = table.lookup(batch["example_id"], batch["weights"])
    extra = {k: batch.pop(k) for k in _HOST_ONLY if k in batch}
    # FLOPs are counted on the unshared layout, whatever layout the step runs
    extra["tokens"] = float(np.sum(np.asarray(batch["attention_mask"]) != 0)) * jax.process_count()
    extra["seq_len"] = int(np.shape(batch["input_ids"])[-1])
    if run.config.data.shared_prompt:
        from mio_jax.data.shared_prompt import to_shared_prompt

        batch = to_shared_prompt(batch, multiple=max(run.config.data.pad_to_multiple_of, 1),
                                 pad_id=run.config.data.pad_id)
    extra["projection_fits"] = _projection_fits(run.step_cfg, batch["loss_mask"])
    return _to_global(batch, run.data_sh), extra


def _projection_fits(cfg: step_lib.StepConfig, local_mask) -> bool:
    """Whether the global batch's completion tokens fit the completion-only projection
    block (``model.completion_logits_fraction``); the same answer on every process."""
    if cfg.max_tokens_fraction is None:
        return True
    local_mask = np.asarray(local_mask)
    counts = (local_mask != 0).reshape(local_mask.shape[0], -1).sum(axis=1)
    if jax.process_count() > 1:  # processes hold consecutive row blocks of the batch
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1)
    return step_lib.projection_fits(cfg, (counts.shape[0], *local_mask.shape[1:]), counts)


def evaluate(run: _Run, params, eval_fn, step: int) -> dict[str, float]:
    """Eval metrics at ``step``: preference metrics and, if configured, reasoning accuracy."""
    out = _preference_eval(run, params, eval_fn)
    out.update(_reasoning_eval(run, params, step))
    return out


def _reasoning_eval(run: _Run, params, step: int) -> dict[str, float]:
    """Greedy accuracy on held-out reasoning-gym problems (``eval.reasoning_tasks``).

    The completions and per-task results go to ``<workdir>/reasoning_eval/step_<N>.json``.
    """
    from mio_jax import evaluate as evaluate_lib
    from mio_jax import models

    tasks = config_validation.reasoning_tasks(run.config)
    if not tasks:
        return {}
    ecfg = run.config.eval
    examples = [ex for t in tasks for ex in
                evaluate_lib.heldout_examples(t, ecfg.reasoning_examples, seed=0)]
    model = nnx.merge(run.graphdef, params, run.other)

    def sampler(prompts):
        return list(models.generate(model, run.tokenizer, list(prompts), temperature=0.0,
                                    max_new_tokens=ecfg.reasoning_max_new_tokens,
                                    batch_size=min(len(prompts), 16)).texts)

    result = evaluate_lib.evaluate(sampler, examples, "reasoning_gym")
    if jax.process_index() == 0:
        folder = os.path.join(run.workdir, "reasoning_eval")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"step_{step}.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    out = {"reasoning/accuracy": result["overall"]["accuracy"],
           "reasoning/ci95_low": result["overall"]["ci95"][0],
           "reasoning/ci95_high": result["overall"]["ci95"][1]}
    out.update({f"reasoning/{t}/accuracy": r["accuracy"] for t, r in result["tasks"].items()})
    return out


def _preference_eval(run: _Run, params, eval_fn) -> dict[str, float]:
    """Weighted means of the preference metrics over the eval split (no updates)."""
    from mio_jax.data.pipeline import make_pipeline

    if run.eval_prepared is None:
        return {}
    it = make_pipeline(run.config.data, run.tokenizer, split="eval",
                       batch_size=run.config.eval.batch_size, prepared=run.eval_prepared)
    sums, counts, denom = {}, {}, 0.0
    consts = {"other": run.other, "ref_params": run.ref_params}
    for i, host in enumerate(it):
        if 0 < run.config.eval.max_batches <= i:
            break
        batch, _ = _device_batch(run, host, run.eval_table)
        s, c, d = jax.device_get(eval_fn(params, batch, consts))
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        for k, v in c.items():
            counts[k] = counts.get(k, 0.0) + float(v)
        denom += float(d)
    out = {k: v / max(denom, 1e-30) for k, v in sums.items()}
    out.update(counts)
    return out


def _export(run: _Run, state) -> str:
    from mio_jax import models

    path = os.path.join(run.workdir, "hf_export")
    params = state.params
    if jax.process_count() > 1:  # every process takes part; process 0 writes
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    model = nnx.merge(run.graphdef, params, run.other)
    if jax.process_index() == 0:
        models.save_pretrained(model, run.tokenizer, path)
    logging.info("exported Hugging Face model to %s", path)
    return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per ``config`` in ``workdir`` (resuming if it holds checkpoints).

    Args:
      config: a resolved experiment config (see ``configs/common.py``).
      workdir: output folder: config.json, checkpoints/, metrics.jsonl, tb/, hf_export/
        (and reasoning_eval/ when eval.reasoning_tasks is set).

    Returns:
      ``{"step": final step, "train": last logged train metrics,
      "eval": final eval metrics, "export": HF folder or None,
      "state": the final TrainState}``.

    Raises:
      config_validation.ConfigError: bad config (message names the key).
      FloatingPointError: NaN/Inf loss (step, batch example ids, metrics).
      Preempted: after SIGTERM, once its checkpoint is on disk.
    """
    workdir = os.path.abspath(workdir)
    config_validation.validate(config, num_devices=jax.device_count())
    mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axes)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:  # the run's resolved config, for readers of the workdir
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config_validation.as_dict(config), f, indent=1, sort_keys=True)
    tokenizer, model = load_model(config, mesh)
    with jax.set_mesh(mesh):
        return _loop(_setup(config, workdir, mesh, tokenizer, model))


def _loop(run: _Run) -> dict[str, Any]:
    config = run.config
    consts = {"other": run.other, "ref_params": run.ref_params}
    consts_sh = jax.tree.map(lambda x: x.sharding, consts)

    def jit_step(cfg):
        return jax.jit(
            functools.partial(step_lib.train_step, graphdef=run.graphdef, tx=run.tx,
                              schedule=run.schedule, cfg=cfg),
            in_shardings=(run.state_sh, run.data_sh, consts_sh),
            out_shardings=(run.state_sh, None), donate_argnums=0)

    step_fn = jit_step(run.step_cfg)
    # Batches whose completion tokens overflow the completion-only projection block run
    # the full projection (compiled on first need); results are the same.
    full_step_fn = step_fn if run.step_cfg.max_tokens_fraction is None else None
    full_cfg = _full_projection(run.step_cfg)
    eval_fn = jax.jit(functools.partial(step_lib.eval_step, graphdef=run.graphdef, cfg=full_cfg))
    is_main = jax.process_index() == 0
    state = run.state
    step = int(jax.device_get(state.step))
    writer = metrics_lib.make_writers(run.workdir, enabled=is_main,
                                      resume_step=step if step > 0 else None)
    fm = flop_model(run.model_cfg, run.state.params)
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind,
                                             config.log.peak_flops_per_device)
    thr = metrics_lib.Throughput(fm, peak, jax.device_count(),
                                 reference_runs=config.reference.mode == "frozen")
    progress = metrics_lib.Progress(run.total_steps, step,
                                    enabled=is_main and config.log.progress_bar)
    sigterm = {"hit": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: sigterm.update(hit=True))
    pending: list[tuple[int, Any, dict]] = []
    window: list[dict] = []
    last_train: dict = {}
    cfg_dict = config_validation.as_dict(config)

    def flush():
        """Fetches pending step metrics, checks them, logs the window means."""
        nonlocal last_train
        for s, m, extra in pending:
            host = {k: float(v) for k, v in jax.device_get(m).items()}
            metrics_lib.check_finite(host, step=s, batch_indices=extra.get("example_id"))
            thr.add(extra["tokens"], extra["seq_len"])
            window.append(host)
            if s % config.log.every_steps == 0 or s == run.total_steps:
                mean = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
                mean.update(thr.report())
                writer.write(s, mean, "train")
                progress.update(s, mean)
                logging.info("step %d: %s", s, _fmt(mean))
                last_train = mean
                window.clear()
        pending.clear()

    def save(s):
        flush()
        run.ckpt.save(s, state, data_state=run.train_it.get_state(), config=cfg_dict)

    def run_eval(s, label) -> dict:
        ev = evaluate(run, state.params, eval_fn, s)
        if ev:
            writer.write(s, ev, "eval")
            logging.info("%s at step %d: %s", label, s, _fmt(ev))
        return ev

    try:
        if config.eval.at_start and step == 0:
            run_eval(0, "eval")
        while step < run.total_steps:
            if sigterm["hit"]:
                save(step)
                run.ckpt.wait()
                logging.warning("SIGTERM: checkpoint at step %d written; exiting", step)
                raise Preempted(step)
            host = next(run.train_it)
            batch, extra = _device_batch(run, host, run.train_table)
            if extra["projection_fits"]:
                state, m = step_fn(state, batch, consts)
            else:
                logging.warning(
                    "step %d: the batch has more completion tokens than "
                    "model.completion_logits_fraction=%s of its slots; running the full "
                    "output projection for it", step + 1, config.model.completion_logits_fraction)
                full_step_fn = full_step_fn or jit_step(full_cfg)
                state, m = full_step_fn(state, batch, consts)
            step += 1
            if pending:  # check the previous step while this one runs
                flush()
            pending.append((step, m, extra))
            if step % config.checkpoint.every_steps == 0:
                save(step)
            if config.eval.every_steps and step % config.eval.every_steps == 0 \
                    and step < run.total_steps:
                flush()
                run_eval(step, "eval")
        flush()
        if step not in run.ckpt.steps():
            save(step)
        run.ckpt.wait()
        final_eval = run_eval(step, "final eval")
        export = _export(run, state) if config.checkpoint.export_hf else None
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
        writer.close()
        run.ckpt.close()
    return {"step": step, "train": last_train, "eval": final_eval, "export": export,
            "state": state}


def _fmt(metrics: dict) -> str:
    keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
            "rewards/rejected", "logps/chosen", "grad_norm", "learning_rate",
            "tokens_per_sec", "mfu")
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
