"""Training orchestration: the stages of a run and its loop.

``train_and_evaluate`` runs named stages, each a function returning a small typed value
(``mio_jax.stages``):

  1. ``build_mesh``: validate the config, build the device mesh, write ``config.json``;
  2. ``build_model`` (``mio_jax.run_model``): tokenizer and sharded model of ``model.path``
     (``Model``);
  3. ``build_data``: the train pipeline and the eval split (``Data``);
  4. ``init_or_restore``: optimizer and train state, created sharded from abstract shapes,
     or restored with the data position from ``<workdir>/checkpoints`` (``Training``);
  5. ``build_reference``: the frozen reference weights (compute dtype), a precomputed
     table (``mio_jax.reference_pass``: cached on disk, gathered across processes), or
     none (``Reference``);
  6. ``train_loop``: steps, with the periodic work as small objects (``mio_jax.periodic``:
     metrics window and NaN check, checkpoints, evals, preemption); then the final
     checkpoint, the final eval (``mio_jax.run_eval``) and the Hugging Face export
     (``run_model.export``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import ml_collections
from absl import logging

from mio_jax import checkpoint as ckpt_lib
from mio_jax import config as mio_config
from mio_jax import metrics as metrics_lib
from mio_jax import optim
from mio_jax import paths
from mio_jax import periodic
from mio_jax import reference as reference_lib
from mio_jax import sharding as sharding_lib
from mio_jax import train_step as step_lib
from mio_jax.data import pipeline as data_lib
from mio_jax.models import frozen
from mio_jax.periodic import Preempted  # noqa: F401  (public: raised by train_and_evaluate)
from mio_jax.reference_pass import precompute_table
from mio_jax.run_eval import device_batch, held_out_metrics
from mio_jax.run_model import build_model, export
# the stage types (public here too: the stages below take and return them)
from mio_jax.stages import Data, Model, Reference, Run, Training, step_config


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
    """The train pipeline (this process's share of each global batch), the eval split and
    the probe pairs."""
    cache_dir = data_cache_dir(config, workdir)
    train_split = data_lib.prepare(config.data, tokenizer, split="train", cache_dir=cache_dir)
    logging.info("train data: %s", train_split.summary)
    eval_split = probe_split = None
    if config.eval.max_batches >= 0 and config.data.eval_path:
        eval_split = data_lib.prepare(config.data, tokenizer, split="eval", cache_dir=cache_dir)
        logging.info("eval data: %s", eval_split.summary)
    if config.eval.probe_path:  # held out like the eval split, read the same way
        probe_split = data_lib.prepare(config.data, tokenizer, split="eval",
                                       source=config.eval.probe_path, cache_dir=cache_dir)
        logging.info("probe pairs: %s", probe_split.summary)
    steps_per_epoch = len(train_split.groups) // config.train.batch_size
    total_steps = (math.ceil(config.train.epochs * steps_per_epoch) if config.train.epochs > 0
                   else int(config.train.steps))
    rows = row_multiple(mesh)
    train = data_lib.make_pipeline(config.data, tokenizer, split="train",
                                   batch_size=config.train.batch_size, seed=config.seed,
                                   prepared=train_split, row_multiple=rows,
                                   micro_batches=config.train.grad_accum_steps)
    return Data(train, eval_split, total_steps, sharding_lib.batch_sharding(mesh), rows,
                probe_split)


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
            model.other, frozen.frozen_params(model.params, model.config.dtype)))
    if mode == "frozen":  # LoRA: the base in ``other`` with the adapters off, no copy
        return Reference(step_lib.StepConsts(model.other))
    consts = step_lib.StepConsts(model.other)
    if mode == "none":
        return Reference(consts)
    full = step_cfg.full_projection()
    # the initial model's base: a LoRA model's frozen weights (in ``other``), or the weights
    base = model.other if model.config.lora is not None else model.params
    weights_fp = reference_lib.weights_fingerprint(base)
    cache_dir = (paths.resolve(config.reference.cache_dir) if config.reference.cache_dir
                 else paths.join(workdir, "reference_cache"))

    def table(split, name):
        return precompute_table(config, model, data.sharding, mesh, full, split, name,
                                params=model.params, view="base", cache_dir=cache_dir,
                                weights_fp=weights_fp)

    train_table = table(data.train.prepared, "train")
    eval_table = None if data.eval_split is None else table(data.eval_split, "eval")
    probe_table = None if data.probe_split is None else table(data.probe_split, "probe")
    return Reference(consts, train_table, eval_table, probe_table)


# --- the loop -------------------------------------------------------------------------------

class _Steps:
    """The jitted train step, and its full-projection twin for the batches whose completion
    tokens overflow the completion-only block (compiled on first need; same results)."""

    def __init__(self, run: Run, training: Training):
        self.run, self.training = run, training
        self.fast = self._jit(run.step_cfg)
        self.full_projection = self.fast if run.step_cfg.max_tokens_fraction is None else None

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
        self.full_projection = (self.full_projection
                                or self._jit(self.run.step_cfg.full_projection()))
        return self.full_projection(state, batch, consts)


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

    # What a driver above the loop (the online rounds) uses between runs of ``run_steps``:

    def flush(self) -> None:
        """Writes the metrics window's pending rows."""
        self.window.flush()

    def last_train_metrics(self) -> dict:
        """The last train metrics row the window wrote ({} before any)."""
        return self.window.last or {}

    def save_now(self, step: int, state) -> None:
        """A checkpoint of ``step``, committed before this returns."""
        self.checkpoints.save(step, state)
        self.checkpoints.checkpointer.wait()

    def write_row(self, step: int, row: dict, split: str) -> None:
        """One metrics row of ``split`` to every writer, synced (durable, uploaded)."""
        self.writer.write(step, row, split)
        self.writer.sync(force=True)

    def finish(self, step: int, state) -> None:
        """Pending rows written, then the final checkpoint, committed."""
        self.window.flush()
        self.checkpoints.finish(step, state)


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
    evals = periodic.Evals(functools.partial(held_out_metrics, run),
                           every=config.eval.every_steps,
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
