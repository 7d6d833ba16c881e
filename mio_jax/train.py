"""Training orchestration: the only module that touches files during training.

``train_and_evaluate`` runs named stages, each a function returning a small typed value:

  1. ``build_mesh``: validate the config, build the device mesh, write ``config.json``;
  2. ``build_model``: tokenizer and sharded model of ``model.path`` (``Model``);
  3. ``build_data``: the train pipeline and the eval split (``Data``);
  4. ``init_or_restore``: optimizer and train state, created sharded from abstract shapes,
     or restored with the data position from ``<workdir>/checkpoints`` (``Training``);
  5. ``build_reference``: the frozen reference weights (compute dtype), a precomputed
     table (cached on disk), or none (``Reference``);
  6. ``train_loop``: steps, with the periodic work as small objects (``mio_jax.periodic``:
     metrics window and NaN check, checkpoints, evals, preemption); then the final
     checkpoint, the final eval and the Hugging Face export.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from mio_jax import checkpoint as ckpt_lib
from mio_jax import config as mio_config
from mio_jax import evaluate as evaluate_lib
from mio_jax import layouts
from mio_jax import logps as logps_lib
from mio_jax import losses
from mio_jax import metrics as metrics_lib
from mio_jax import models
from mio_jax import optim
from mio_jax import paths
from mio_jax import periodic
from mio_jax import reference as reference_lib
from mio_jax import sharding as sharding_lib
from mio_jax import train_step as step_lib
from mio_jax.models import adapters as adapters_lib
from mio_jax.models import peft_io
from mio_jax.data import pipeline as data_lib
from mio_jax.periodic import Preempted  # noqa: F401  (public: raised by train_and_evaluate)


@dataclasses.dataclass(frozen=True)
class Model:
    """The model, split for jit.

    Attributes:
      graphdef: the nnx GraphDef.
      params: master weights (pure dict of sharded arrays); None once the state and the
        reference are built, so no stale copy stays in memory.
      other: non-trainable nnx state (pure dict).
      config: the decoder's ``models.ModelConfig``.
      tokenizer: its Hugging Face tokenizer.
      param_specs: PartitionSpecs shaped like ``params``.
    """

    graphdef: Any
    params: Any
    other: Any
    config: models.ModelConfig
    tokenizer: Any
    param_specs: Any


@dataclasses.dataclass(frozen=True)
class Data:
    """Attributes: train (the train ``PreferenceIterator``), eval_split (the prepared eval
    split or None), total_steps, sharding (of every batch field, on its leading axis),
    row_multiple (packed rows per process are a multiple of its data-parallel devices)."""

    train: data_lib.PreferenceIterator
    eval_split: data_lib.PreparedSplit | None
    total_steps: int
    sharding: jax.sharding.NamedSharding
    row_multiple: int


@dataclasses.dataclass(frozen=True)
class Training:
    """Attributes: state (the ``TrainState`` to continue from), shardings (of the state),
    tx and schedule (optax), checkpointer, data_state (the restored checkpoint's data
    position, or None when starting afresh)."""

    state: step_lib.TrainState
    shardings: step_lib.TrainState
    tx: Any
    schedule: Any
    checkpointer: ckpt_lib.Checkpointer
    data_state: Any = None


@dataclasses.dataclass(frozen=True)
class Reference:
    """Attributes: consts (what the step reads: the frozen weights when mode is "frozen"),
    train_table / eval_table (precomputed log-probs of each split, or None)."""

    consts: step_lib.StepConsts
    train_table: reference_lib.ReferenceTable | None = None
    eval_table: reference_lib.ReferenceTable | None = None


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything the loop and ``evaluate`` read; built once by ``train_and_evaluate``."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    model: Model
    data: Data
    reference: Reference
    step_cfg: step_lib.StepConfig


def step_config(config) -> step_lib.StepConfig:
    """The train step's static settings from a resolved config."""
    names = mio_config.loss_names(config.loss.name)
    used = set().union(*(losses.spec(n).hparams for n in names))
    return step_lib.StepConfig(
        loss_name=names[0] if len(names) == 1 else tuple(names),
        beta=float(config.loss.beta),
        loss_hparams=tuple(sorted((k, config.loss[k]) for k in used
                                  if config.loss.get(k) is not None)),
        loss_weights=(None if config.loss.get("weights") is None
                      else tuple(float(w) for w in config.loss.weights)),
        grad_accum_steps=int(config.train.grad_accum_steps),
        chunk_size=int(config.model.logps_chunk_size),
        reference=("base" if config.reference.mode == "frozen" and adapters_lib.enabled(config)
                   else config.reference.mode),
        lengths=any(losses.spec(n).needs_lengths != "none" for n in names),
        ld_alpha=None if config.loss.ld_alpha is None else float(config.loss.ld_alpha),
        use_weighting=bool(config.loss.use_weighting),
        max_tokens_fraction=(None if config.model.completion_logits_fraction is None
                             else float(config.model.completion_logits_fraction)),
        weight_norms=bool(config.log.weight_norms),
        dropout_seed=(int(config.seed) if adapters_lib.enabled(config)
                      and config.model.lora.dropout > 0 else None))


# --- stages -------------------------------------------------------------------------------

def build_mesh(config, workdir: str) -> jax.sharding.Mesh:
    """Validates the (resolved) config, builds the mesh and writes ``<workdir>/config.json``
    (every key with its effective value)."""
    mio_config.validate(config, num_devices=jax.device_count())
    mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axes)
    paths.makedirs(workdir)
    if jax.process_index() == 0:  # the run's resolved config, for readers of the workdir
        paths.write_json(paths.join(workdir, "config.json"), mio_config.as_dict(config),
                         indent=1, sort_keys=True)
    return mesh


def build_model(config, mesh) -> Model:
    """Tokenizer and sharded model of ``model.path``; with ``model.lora.enabled`` the
    trainable parameters are the adapters alone and the frozen base is in ``other``.

    Called outside ``jax.set_mesh``: nnx's abstract init would read the logical axis
    names as mesh axes inside a mesh context.
    """
    model_path = models.resolve_model_path(config.model.path)
    tokenizer = models.load_tokenizer(
        models.resolve_model_path(config.model.tokenizer_path) if config.model.tokenizer_path
        else model_path)
    model = adapters_lib.load(config, model_path, mesh, sharding_lib.DEFAULT_RULES)
    graphdef, params, other = adapters_lib.split(model)
    trainable = nnx.LoRAParam if model.cfg.lora is not None else nnx.Param
    _, params_state, _ = nnx.split(model, trainable, ...)
    if model.cfg.lora is not None:
        adapters_lib.log_sizes(params, other)
    return Model(graphdef=graphdef, params=params, other=other, config=model.cfg,
                 tokenizer=tokenizer,
                 param_specs=sharding_lib.state_partition_specs(
                     params_state, sharding_lib.DEFAULT_RULES, mesh))


def data_cache_dir(config, workdir: str) -> str | None:
    """The tokenized cache's folder: ``data.cache_dir``, or ``<workdir>/data_cache``;
    None when ``data.cache_dir`` is "none"."""
    if config.data.cache_dir == "none":
        return None
    return config.data.cache_dir or paths.join(workdir, "data_cache")


def row_multiple(mesh) -> int:
    """Packed rows per process come in multiples of its data-parallel devices."""
    return max(sharding_lib.data_parallel_size(mesh) // jax.process_count(), 1)


def build_data(config, tokenizer, mesh, workdir: str) -> Data:
    """The train pipeline (this process's share of each global batch) and the eval split."""
    cache_dir = data_cache_dir(config, workdir)
    train_split = data_lib.prepare(config.data, tokenizer, split="train", cache_dir=cache_dir)
    logging.info("train data: %s", train_split.summary)
    eval_split = None
    if config.eval.max_batches >= 0 and config.data.eval_path:
        eval_split = data_lib.prepare(config.data, tokenizer, split="eval", cache_dir=cache_dir)
        logging.info("eval data: %s", eval_split.summary)
    steps_per_epoch = len(train_split.groups) // config.train.batch_size
    total_steps = (math.ceil(config.train.epochs * steps_per_epoch) if config.train.epochs > 0
                   else int(config.train.steps))
    rows = row_multiple(mesh)
    train = data_lib.make_pipeline(config.data, tokenizer, split="train",
                                   batch_size=config.train.batch_size, seed=config.seed,
                                   prepared=train_split, row_multiple=rows)
    return Data(train, eval_split, total_steps, sharding_lib.batch_sharding(mesh), rows)


def init_or_restore(config, workdir: str, model: Model, data: Data, mesh) -> Training:
    """The optimizer and the train state: restored from the newest readable checkpoint
    (with the data position, set into ``data.train``), else initialised from the model's
    weights."""
    training = restore_or_init(config, workdir, model, data.total_steps, mesh)
    if training.data_state is not None:
        data.train.set_state(training.data_state)
    return training


def restore_or_init(config, workdir: str, model: Model, total_steps: int, mesh) -> Training:
    """``init_or_restore`` without a pipeline: the restored data position is returned in
    ``Training.data_state`` for the caller to apply."""
    tx, schedule = optim.from_config(config.optim, total_steps)
    shardings = sharding_lib.named(mesh, step_lib.state_specs(tx, model.params,
                                                              model.param_specs))
    ckpt = ckpt_lib.Checkpointer(paths.join(workdir, "checkpoints"),
                                 keep=config.checkpoint.keep,
                                 async_save=config.checkpoint.async_save)
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), model.params)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    restored = ckpt.restore(abstract)
    data_state = None
    if restored is not None:
        step0, state, data_state, _ = restored
        logging.info("resumed from %s at step %d", ckpt.directory, step0)
    else:
        state = jax.jit(lambda p: step_lib.init_state(p, tx), out_shardings=shardings)(
            model.params)
        logging.info("initialised from %s", config.model.path)
    return Training(state, shardings, tx, schedule, ckpt, data_state)


def build_reference(config, workdir: str, model: Model, data: Data,
                    step_cfg: step_lib.StepConfig, mesh) -> Reference:
    """The reference the loss compares with: the initial weights, frozen (in the compute
    dtype), or their log-probs precomputed once per split (cached on disk), or none."""
    mode = config.reference.mode
    if mode == "frozen" and model.config.lora is None:
        return Reference(step_lib.StepConsts(
            model.other, reference_lib.frozen_params(model.params, model.config.dtype)))
    if mode == "frozen":  # LoRA: the base in ``other`` with the adapters off, no copy
        return Reference(step_lib.StepConsts(model.other))
    consts = step_lib.StepConsts(model.other)
    if mode == "none":
        return Reference(consts)
    full = step_cfg.full_projection()
    lora = model.config.lora is not None  # the reference is the base: adapters off
    weights_fp = reference_lib.weights_fingerprint(model.other if lora else model.params)
    cache_dir = (paths.resolve(config.reference.cache_dir) if config.reference.cache_dir
                 else paths.join(workdir, "reference_cache"))

    def table(split, name):
        return precompute_table(config, model, data.sharding, mesh, full, split, name,
                                params=model.params, adapters=not lora, cache_dir=cache_dir,
                                weights_fp=weights_fp)

    train_table = table(data.train.prepared, "train")
    eval_table = None if data.eval_split is None else table(data.eval_split, "eval")
    return Reference(consts, train_table, eval_table)


def precompute_table(config, model: Model, sharding, mesh, cfg: step_lib.StepConfig,
                     split: data_lib.PreparedSplit, name: str, *, params, adapters: bool,
                     cache_dir: str, weights_fp: str) -> reference_lib.ReferenceTable:
    """Reference log-probs of one split under ``params`` (``adapters=False``: a LoRA
    model's base): one unshuffled, unshared pass, cached under ``cache_dir`` by the
    split's contents, ``weights_fp`` and the settings."""
    dcfg = config.data.copy_and_resolve_references()
    with dcfg.unlocked():  # the reference pass reads every group in the [B, K, L] layout
        dcfg.packing = False
        dcfg.shared_prompt = False
    ref_fn = jax.jit(functools.partial(step_lib.reference_logps, model.graphdef, cfg=cfg,
                                       adapters=adapters))

    def batches():
        return data_lib.make_pipeline(dcfg, model.tokenizer, split="eval",
                                      batch_size=config.reference.batch_size, prepared=split)

    def logps_of(host) -> np.ndarray:
        out = ref_fn(params, model.other, data_lib.to_global_arrays(host, sharding))
        if jax.process_count() > 1:  # this process's rows, matching its host batch
            out = multihost_utils.global_array_to_host_local_array(out, mesh, sharding.spec)
        return np.asarray(jax.device_get(out))

    settings = {"dtype": config.model.dtype, "ld_alpha": config.loss.ld_alpha, "split": name,
                "K": split.K}
    table, path, hit = reference_lib.build_or_load(
        cache_dir=cache_dir, batches=batches, ref_fn=logps_of, weights_fp=weights_fp,
        settings=settings, name=name)
    logging.info("reference log-probs (%s): %s %s", name, "cache hit" if hit else "computed", path)
    return _all_processes(table, len(split.groups)) if jax.process_count() > 1 else table


def _all_processes(table: reference_lib.ReferenceTable, n: int) -> reference_lib.ReferenceTable:
    """The table of every group: each process computed (and cached) the rows of its share
    of the unshuffled pass, but shuffled training batches hand it any group."""
    k = table.logps_nk.shape[1]
    logps, present = np.zeros((n, k), np.float32), np.zeros((n,), bool)
    m = min(len(table.present_n), n)
    logps[:m], present[:m] = table.logps_nk[:m], table.present_n[:m]
    all_logps = np.asarray(multihost_utils.process_allgather(logps))  # [P, N, K]
    all_present = np.asarray(multihost_utils.process_allgather(present))  # [P, N]
    chosen = np.argmax(all_present, axis=0)  # a process that holds the row
    return reference_lib.ReferenceTable(all_logps[chosen, np.arange(n)], all_present.any(axis=0))


# --- evaluation -----------------------------------------------------------------------------

def device_batch(run: Run, host: layouts.Batch,
                 table: reference_lib.ReferenceTable | None) -> layouts.Batch:
    """A host batch -> the global device batch (precomputed reference log-probs filled in).

    Raises:
      ValueError: a valid completion slot of an unshared batch has no completion token.
    """
    if isinstance(host, layouts.PreferenceBatch):
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


def evaluate(run: Run, params, step: int) -> dict[str, float]:
    """Eval metrics of ``params`` at ``step``: weighted means of the preference metrics
    over the eval split and, with ``eval.reasoning_tasks``, held-out reasoning accuracy."""
    out = _preference_eval(run, params)
    out.update(_reasoning_eval(run, params, step))
    return out


def _preference_eval(run: Run, params, split: data_lib.PreparedSplit | None = None,
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


def _reasoning_eval(run: Run, params, step: int) -> dict[str, float]:
    """Greedy accuracy on held-out reasoning-gym problems (``eval.reasoning_tasks``); the
    completions and per-task results go to ``<workdir>/reasoning_eval/step_<N>.json``."""
    tasks = mio_config.reasoning_tasks(run.config)
    if not tasks:
        return {}
    ecfg = run.config.eval
    task_config = evaluate_lib.parse_task_config(ecfg.reasoning_task_config)
    examples = [ex for t in tasks for ex in
                evaluate_lib.heldout_examples(t, ecfg.reasoning_examples, 0, task_config)]
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


def export(run: Run, params) -> str:
    """Writes ``<workdir>/hf_export`` (every process takes part; process 0 writes). With
    LoRA, also ``<workdir>/peft_adapter`` (PEFT's folder: ``adapter_model.safetensors`` +
    ``adapter_config.json``) and the merged weights (float32 merge) in ``hf_export``."""
    path = paths.join(run.workdir, "hf_export")
    other = run.model.other
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
        if run.model.config.lora is not None:
            other = multihost_utils.process_allgather(other, tiled=True)
    model = nnx.merge(run.model.graphdef, params, other)
    if run.model.config.lora is not None:
        if jax.process_index() == 0:
            peft_io.write_adapter(paths.join(run.workdir, "peft_adapter"), model.cfg,
                                  model.cfg.lora, params,
                                  base_model_name_or_path=str(run.config.model.path))
        model = adapters_lib.merged(model)
    if jax.process_index() == 0:
        models.save_pretrained(model, run.model.tokenizer, path)
    logging.info("exported Hugging Face model to %s", path)
    return path


# --- the loop -------------------------------------------------------------------------------

class _Steps:
    """The jitted train step, and its full-projection twin for the batches whose completion
    tokens overflow the completion-only block (compiled on first need; same results)."""

    def __init__(self, run: Run, training: Training):
        self.run, self.training = run, training
        self.fast = self._jit(run.step_cfg)
        self.full = self.fast if run.step_cfg.max_tokens_fraction is None else None

    def _jit(self, cfg: step_lib.StepConfig):
        t, consts = self.training, self.run.reference.consts
        return jax.jit(
            functools.partial(step_lib.train_step, graphdef=self.run.model.graphdef, tx=t.tx,
                              schedule=t.schedule, cfg=cfg),
            in_shardings=(t.shardings, self.run.data.sharding,
                          jax.tree.map(lambda x: x.sharding, consts)),
            out_shardings=(t.shardings, None), donate_argnums=0)

    def __call__(self, state, batch, info: data_lib.BatchInfo, step: int):
        consts = self.run.reference.consts
        if step_lib.projection_fits(self.run.step_cfg, info.mask_shape, info.completion_tokens):
            return self.fast(state, batch, consts)
        logging.warning("step %d: the batch has more completion tokens than "
                        "model.completion_logits_fraction=%s of its slots; running the full "
                        "output projection for it", step + 1,
                        self.run.config.model.completion_logits_fraction)
        self.full = self.full or self._jit(self.run.step_cfg.full_projection())
        return self.full(state, batch, consts)


@dataclasses.dataclass
class Loop:
    """The train loop's parts (``mio_jax.periodic``), built by ``make_loop``: writer,
    progress bar, metrics window, checkpoints, evals and the jitted steps."""

    writer: Any
    progress: Any
    window: periodic.MetricsWindow
    checkpoints: periodic.Checkpoints
    evals: periodic.Evals
    steps: _Steps

    def close(self, training: Training) -> None:
        self.progress.close()
        self.writer.close()
        training.checkpointer.close()


def make_loop(run: Run, training: Training, step: int, data_iterator) -> Loop:
    """The loop's parts for a run at ``step`` of ``run.data.total_steps``; checkpoints
    save ``data_iterator.get_state()`` as the data position."""
    config, total = run.config, run.data.total_steps
    is_main = jax.process_index() == 0
    writer = metrics_lib.make_writers(run.workdir, enabled=is_main, resume_step=step,
                                      config=config)
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind,
                                             config.log.peak_flops_per_device)
    throughput = metrics_lib.Throughput(metrics_lib.flop_model(run.model.config),
                                        peak, jax.device_count(),
                                        reference_runs=config.reference.mode == "frozen")
    progress = metrics_lib.Progress(total, step, enabled=is_main and config.log.progress_bar)
    window = periodic.MetricsWindow(writer, progress, throughput, every=config.log.every_steps,
                                    total_steps=total)
    checkpoints = periodic.Checkpoints(training.checkpointer,
                                       every=config.checkpoint.every_steps,
                                       data_iterator=data_iterator,
                                       config=mio_config.as_dict(config), window=window)
    evals = periodic.Evals(functools.partial(evaluate, run), every=config.eval.every_steps,
                           total_steps=total, writer=writer, window=window)
    return Loop(writer, progress, window, checkpoints, evals, _Steps(run, training))


def run_steps(run: Run, loop: Loop, preemption: periodic.Preemption, state, step: int,
              stop: int, iterator, table: reference_lib.ReferenceTable | None):
    """Steps ``step`` -> ``stop`` on ``iterator``'s batches (``table``: their precomputed
    reference log-probs), with the periodic work. Returns ``(state, step)``."""
    while step < stop:
        preemption.check(step, state)
        host, info = iterator.next_with_info()
        state, metrics = loop.steps(state, device_batch(run, host, table), info, step)
        step += 1
        loop.window.add(step, metrics, info, host.example_id)
        loop.evals(step, state.params)  # before the checkpoint: a resume from step s
        loop.checkpoints(step, state)   # finds the eval row of s written
    return state, step


def train_loop(run: Run, training: Training) -> dict[str, Any]:
    """Steps from the state's step to ``total_steps``, then the final checkpoint, eval and
    export. Returns what ``train_and_evaluate`` returns."""
    config, total = run.config, run.data.total_steps
    state = training.state
    step = int(jax.device_get(state.step))
    loop = make_loop(run, training, step, run.data.train)
    try:
        with periodic.Preemption(loop.checkpoints) as preemption:
            if config.eval.at_start and step == 0:
                loop.evals.run(0, state.params)
            state, step = run_steps(run, loop, preemption, state, step, total, run.data.train,
                                    run.reference.train_table)
            loop.window.flush()
            loop.checkpoints.finish(step, state)
        final_eval = loop.evals.run(step, state.params, "final eval")
        exported = export(run, state.params) if config.checkpoint.export_hf else None
    finally:
        loop.close(training)
    return {"step": step, "train": loop.window.last, "eval": final_eval, "export": exported,
            "state": state}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per ``config`` in ``workdir`` (resuming if it holds checkpoints).

    Args:
      config: a resolved experiment config (``mio_jax.config.base_config()`` and overrides).
      workdir: output folder, a local path or a URL such as ``gs://bucket/run`` (every
        file goes through ``mio_jax.paths``): config.json, checkpoints/, metrics.jsonl,
        tb/, hf_export/ (and reasoning_eval/ when eval.reasoning_tasks is set).

    Returns:
      ``{"step": final step, "train": last logged train metrics, "eval": final eval
      metrics, "export": HF folder or None, "state": the final TrainState}``.

    Raises:
      mio_config.ConfigError: bad config (message names the key).
      FloatingPointError: NaN/Inf loss (step, batch example ids, metrics).
      Preempted: after SIGTERM, once its checkpoint is on disk.
    """
    workdir = paths.resolve(workdir)  # local: absolute; a URL (gs://...) stays a URL
    config = mio_config.resolve(config)
    mesh = build_mesh(config, workdir)
    model = build_model(config, mesh)
    with jax.set_mesh(mesh):
        data = build_data(config, model.tokenizer, mesh, workdir)
        training = init_or_restore(config, workdir, model, data, mesh)
        cfg = step_config(config)
        reference = build_reference(config, workdir, model, data, cfg, mesh)
        # Precomputed / no reference: the initial weights are not kept beside the state.
        model = dataclasses.replace(model, params=None)
        run = Run(config, workdir, mesh, model, data, reference, cfg)
        return train_loop(run, training)
