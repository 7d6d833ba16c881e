"""Metric writers (JSONL, TensorBoard, Weights & Biases), console progress, FLOP accounting,
NaN guard.

Writers take any path of ``mio_jax.paths`` (local or ``gs://...``). A remote
``metrics.jsonl`` is a local mirror uploaded whole; remote TensorBoard event files are
written to a local staging folder and uploaded (object stores cannot append, and gcsfs opens
an append as an overwrite, so tensorboard's own gfile would keep only the last event). Both
upload at most every ``upload_every`` seconds on a write, and on ``sync(force=True)`` (the
train loop forces one before each checkpoint save) and ``close()``.

FLOP accounting (per real, non-padding token; ``N`` = parameters that take
part in matrix multiplies: all weights except an untied input embedding):

* policy forward + backward: ``6 N`` plus attention ``6 * n_layers * d_attn * T``
  (``T`` the padded sequence length; causal attention computes half of the
  ``T x T`` scores, so the PaLM term ``12 n_layers d_attn T`` is halved);
* frozen reference forward (only when it runs in the step): ``2 N`` plus
  attention ``2 * n_layers * d_attn * T``;
* chosen and rejected (all K completions) tokens both count.

MFU = achieved model FLOP/s / (peak FLOP/s per device x devices).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import string
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from absl import logging as absl_logging
from tqdm import tqdm

from mio_jax import paths
from mio_jax.errors import ConfigError
from mio_jax.models.llama import adapter_rows
from mio_jax.models.weights import weight_specs

# Dense (no sparsity) peak FLOP/s per device in bfloat16, from vendor sheets.
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "a100": 312e12, "l4": 121e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12,
    "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: ``override`` if > 0, else from ``PEAK_FLOPS``.

    Args:
      device_kind: ``jax.devices()[0].device_kind`` (e.g. "NVIDIA H100 80GB HBM3").
      override: a user-supplied peak (config ``log.peak_flops_per_device``).

    Returns:
      FLOP/s, or None when the chip is unknown and no override is given.
    """
    if override and override > 0:
        return float(override)
    kind = device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_FLOPS[key]
    return None


@dataclass(frozen=True)
class FlopModel:
    """Numbers that FLOP accounting needs from the model.

    Attributes:
      matmul_params: N, parameters taking part in matmuls (see module docstring).
      n_layers: decoder layers.
      attn_dim: num_heads * head_dim (query width).
    """

    matmul_params: int
    n_layers: int
    attn_dim: int
    adapter_params: int = 0

    def train_flops_per_token(self, seq_len: int) -> float:
        """Forward + backward FLOPs per token of the policy. With LoRA adapters the frozen
        weights take part in the forward and the input gradients (4N) but get no weight
        gradient; the adapters get all three (6 per parameter)."""
        weights = (4.0 * self.matmul_params + 6.0 * self.adapter_params if self.adapter_params
                   else 6.0 * self.matmul_params)
        return weights + 6.0 * self.n_layers * self.attn_dim * seq_len

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward-only FLOPs per token (reference model)."""
        return 2.0 * self.matmul_params + 2.0 * self.n_layers * self.attn_dim * seq_len


def flop_model(model_cfg) -> FlopModel:
    """``FlopModel`` of a decoder: N (matmul parameters), layers and attention width, and
    the LoRA adapters' parameters when ``model_cfg.lora`` is set.

    A mixture of experts counts its ACTIVE parameters: each token meets
    ``num_experts_per_tok`` of the experts' weights (and the whole router), so MFU is
    measured against the work the step does, not the parameters it stores.

    Args:
      model_cfg: the decoder's ``ModelConfig``; the counts come from its weight table
        (so a quantized base counts its logical weights, not its stored bytes).
    """
    def active(spec) -> int:
        size = int(np.prod(spec.shape(model_cfg)))
        if spec.per_expert:
            return size // model_cfg.num_experts * model_cfg.num_experts_per_tok
        return size

    total = sum(active(s) for s in weight_specs(model_cfg))
    embed = model_cfg.vocab_size * model_cfg.hidden_size
    n = total if model_cfg.tie_word_embeddings else total - embed
    adapters = sum(int(np.prod(a)) + int(np.prod(b)) for _, _, (a, b) in adapter_rows(model_cfg))
    return FlopModel(n, model_cfg.num_hidden_layers,
                     model_cfg.num_attention_heads * model_cfg.head_dim, adapters)


def step_flops(flop_model: FlopModel, *, tokens: float, seq_len: int,
               reference_runs: bool) -> float:
    """Model FLOPs of one optimizer step.

    Args:
      flop_model: see ``FlopModel``.
      tokens: real (non-padding) tokens of all K completions in the step.
      seq_len: padded sequence length L of the batch.
      reference_runs: whether a frozen reference forward runs in the step.

    Returns:
      FLOPs (float).
    """
    per_token = flop_model.train_flops_per_token(seq_len)
    if reference_runs:
        per_token += flop_model.forward_flops_per_token(seq_len)
    return per_token * tokens


def check_finite(metrics: Mapping[str, Any], *, step: int, batch_indices=None) -> None:
    """Raises FloatingPointError if the loss (or any metric) is NaN or Inf.

    Args:
      metrics: host scalars of one step.
      step: the step number, reported in the message.
      batch_indices: example indices of the batch, reported in the message.
    """
    bad = sorted(k for k, v in metrics.items()
                 if isinstance(v, (float, int, np.floating)) and not math.isfinite(float(v)))
    if bad:
        shown = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}
        idx = None if batch_indices is None else np.asarray(batch_indices).tolist()
        raise FloatingPointError(
            f"non-finite {bad} at step {step}; batch indices {idx}; metrics {shown}")


class JsonlWriter:
    """Appends one JSON object per line: ``{"step": s, "split": ..., **metrics}``.

    Args:
      path: the JSONL file (local or remote, see ``paths.AppendFile``).
      resume_step: when resuming from a checkpoint at this step, rows of later steps
        (written before an interruption) and unreadable lines (a row cut short by a kill)
        are dropped first, so the file reads like one uninterrupted run; 0 (a run
        starting from scratch) starts the file afresh. None appends to what is there.
      upload_every: a remote file is uploaded at most this often (seconds) on a write;
        ``sync(force=True)`` and ``close()`` always upload.
    """

    def __init__(self, path: str, resume_step: int | None = None, upload_every: float = 30.0):
        path = paths.resolve(path)
        initial = None
        if resume_step == 0:
            initial = ""
        elif resume_step is not None and paths.exists(path):
            initial = "".join(
                line for line in paths.read_text(path).splitlines(keepends=True)
                if line.endswith("\n") and (step := _row_step(line)) is not None
                and step <= resume_step)
        self._f = paths.AppendFile(path, initial=initial, upload_every=upload_every)

    def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        row = {"step": int(step), "split": split}
        row.update({k: _py(v) for k, v in metrics.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.sync()

    def sync(self, force: bool = False) -> None:
        self._f.sync(force)

    def close(self) -> None:
        self._f.close()


def _row_step(line: str) -> int | None:
    """The step of a JSONL row (0 for a row without one); None for a line that is not a
    JSON object."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return int(row.get("step", 0)) if isinstance(row, dict) else None


def _scalars(metrics: Mapping[str, Any], split: str) -> dict[str, float]:
    """``{"split/key": value}`` of the numeric metrics (what TensorBoard and W&B show)."""
    return {f"{split}/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float, np.number))}


class TensorBoardWriter:
    """Scalar summaries in TensorBoard event files (tensorboard package, no TF).

    Args:
      logdir: the event folder (local or remote). For a remote one the events are written
        to a local staging folder whose files are uploaded on ``sync`` and ``close``.
      resume_step: a restart marker makes TensorBoard discard the events an interrupted
        attempt wrote after this step (0: every earlier event).
      upload_every: remote uploads happen at most this often (seconds) on a write;
        ``sync(force=True)`` and ``close()`` always upload.
    """

    def __init__(self, logdir: str, resume_step: int | None = None,
                 upload_every: float = 30.0):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.logdir = paths.resolve(logdir)
        self._remote = paths.is_remote(self.logdir)
        self._every, self._last, self._closed = upload_every, 0.0, False
        if self._remote:
            self._local = tempfile.mkdtemp(prefix="mio_tb_")
        else:
            self._local = self.logdir
            os.makedirs(self._local, exist_ok=True)
        self._w = EventFileWriter(self._local)
        if resume_step is not None:
            # TensorBoard discards earlier-written events at steps >= the marker's.
            self._w.add_event(event_pb2.Event(
                wall_time=time.time(), step=int(resume_step) + 1 if resume_step else 0,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=tag, simple_value=v)
                  for tag, v in _scalars(metrics, split).items()]
        event = event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values))
        self._w.add_event(event)
        self._w.flush()
        self.sync()

    def sync(self, force: bool = False) -> None:
        """Uploads the staged event files (remote logdirs; local ones are flushed on every
        write)."""
        if self._remote and not self._closed and (
                force or time.monotonic() - self._last >= self._every):
            self._w.flush()
            self._upload()

    def _upload(self) -> None:
        for name in sorted(os.listdir(self._local)):
            paths.upload(os.path.join(self._local, name), paths.join(self.logdir, name))
        self._last = time.monotonic()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._w.close()
        if self._remote:
            self._upload()
            shutil.rmtree(self._local, ignore_errors=True)  # our own staging folder


WANDB_MODES = ("disabled", "online", "offline")
WANDB_RUN_ID_FILE = "wandb_run_id"  # in the workdir: the W&B run a resumed run continues


def _import_wandb(mode: str):
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(f"log.wandb.mode={mode!r} needs the wandb package: "
                          "pip install 'mio_jax[wandb]' (or set log.wandb.mode='disabled')") from e
    return wandb


def wandb_tags(tags: str) -> list[str]:
    """``log.wandb.tags`` (comma-separated) as a list."""
    return [t.strip() for t in tags.split(",") if t.strip()]


class WandbWriter:
    """The same scalars as ``TensorBoardWriter`` (``split/key``, same steps) in a Weights &
    Biases run; only process 0 creates one (``make_writers``).

    The run's id is kept in ``<workdir>/wandb_run_id``: a resumed run (``resume_step`` > 0)
    continues the same W&B run (``resume="allow"``); a run starting from scratch
    (``resume_step`` 0) starts a new one. W&B ignores a step at or below the last one it
    holds, so after a kill the rows an interrupted attempt logged past the checkpoint stay
    as that attempt logged them.

    Args:
      workdir: the run folder (local or remote).
      cfg: the ``log.wandb`` config section (see ``validate_log_config``).
      run_config: the resolved experiment config, recorded as the W&B run config.
      resume_step: as for ``JsonlWriter``.
    """

    def __init__(self, workdir: str, cfg, run_config: dict | None = None,
                 resume_step: int | None = None):
        wandb = _import_wandb(cfg.mode)
        id_path = paths.join(workdir, WANDB_RUN_ID_FILE)
        run_id = None
        if resume_step != 0 and paths.exists(id_path):
            run_id = paths.read_text(id_path).strip() or None
        if run_id is None:
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                             for _ in range(8))  # the form of wandb's own run ids
            paths.write_text(id_path, run_id + "\n")
        # log.wandb.dir, else $WANDB_DIR (read now: wandb reads it once a process), else a
        # local workdir, else wandb's default (./wandb): wandb writes on local disk.
        folder = cfg.dir or os.environ.get("WANDB_DIR") or (
            None if paths.is_remote(workdir) else workdir)
        if folder:
            os.makedirs(folder, exist_ok=True)
        self.run_id = run_id
        self._run = wandb.init(
            project=cfg.project or None, entity=cfg.entity or None, name=cfg.name or None,
            tags=wandb_tags(cfg.tags) or None, dir=folder, mode=cfg.mode, id=run_id,
            resume="allow", config=run_config, allow_val_change=True)

    def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        values = _scalars(metrics, split)
        if values:
            self._run.log(values, step=int(step))

    def sync(self, force: bool = False) -> None:
        """Nothing to do: wandb streams each ``log`` to its own service process."""

    def close(self) -> None:
        if self._run is None:
            return
        run, self._run = self._run, None
        exc = sys.exc_info()[1]  # called from a ``finally``: the error ending the run, if any
        code = 0 if exc is None else (
            exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1)
        run.finish(exit_code=code)


class MultiWriter:
    """Fans out to several writers; only process 0 should create one."""

    def __init__(self, writers):
        self._writers = list(writers)

    def write(self, step, metrics, split="train"):
        for w in self._writers:
            w.write(step, metrics, split)

    def sync(self, force: bool = False) -> None:
        """Uploads what remote writers hold (``force``: now, not only when due)."""
        for w in self._writers:
            w.sync(force)

    def close(self):
        first = None
        for w in self._writers:
            try:
                w.close()
            except Exception as e:  # close the others before raising
                first = first or e
        if first is not None:
            raise first


def make_writers(workdir: str, enabled: bool = True, resume_step: int | None = None,
                 config=None) -> MultiWriter:
    """JSONL at ``workdir/metrics.jsonl``, TensorBoard under ``workdir/tb`` and, when
    ``config.log.wandb.mode`` is not "disabled", a W&B run (``WandbWriter``).

    Args:
      workdir: the run folder (local or remote).
      enabled: False on every process but the first (writes nothing).
      resume_step: the restored checkpoint's step when resuming, 0 for a run starting
        from scratch (see ``JsonlWriter``); None appends.
      config: the resolved experiment config (its ``log.wandb`` section; the whole as the
        W&B run config); None = no W&B.
    """
    if not enabled:
        return MultiWriter([])
    writers = [JsonlWriter(paths.join(workdir, "metrics.jsonl"), resume_step),
               TensorBoardWriter(paths.join(workdir, "tb"), resume_step)]
    wandb_cfg = None if config is None else config.log.get("wandb")
    if wandb_cfg is not None and wandb_cfg.mode != "disabled":
        try:
            writers.append(WandbWriter(workdir, wandb_cfg, config.to_dict(), resume_step))
        except BaseException:
            MultiWriter(writers).close()
            raise
    return MultiWriter(writers)


class _AboveTheBar:
    """A text stream whose lines tqdm prints above its bar (a log line never shares the
    bar's terminal line)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():
            tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


class Progress:
    """Console progress bar: step, ETA, loss and reward accuracy (tqdm). While it is shown,
    absl's log lines are printed above it, each on its own line."""

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self._bar = tqdm(total=total_steps, initial=initial_step, disable=not enabled,
                         dynamic_ncols=True, file=sys.stderr, desc="train")
        self._handler, self._stream = None, None
        if enabled:
            self._handler = absl_logging.get_absl_handler().python_handler
            self._stream = self._handler.stream
            self._handler.stream = _AboveTheBar(self._stream)

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
        self._bar.n = step
        if metrics:
            shown = {}
            if "loss" in metrics:
                shown["loss"] = f"{float(metrics['loss']):.4f}"
            if "rewards/accuracies" in metrics:
                shown["acc"] = f"{float(metrics['rewards/accuracies']):.3f}"
            self._bar.set_postfix(shown, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()
        if self._handler is not None:
            self._handler.stream, self._handler = self._stream, None


def _py(v):
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return v.item()
    return v


class Throughput:
    """Tokens/s and MFU over the steps since the last report."""

    def __init__(self, flop_model: FlopModel | None, peak_flops: float | None,
                 num_devices: int, reference_runs: bool):
        self.flop_model, self.peak, self.n = flop_model, peak_flops, num_devices
        self.reference_runs = reference_runs
        self.reset()

    def reset(self) -> None:
        self._t0, self._tokens, self._flops = time.perf_counter(), 0.0, 0.0

    def add(self, tokens: float, seq_len: int) -> None:
        self._tokens += tokens
        if self.flop_model is not None:
            self._flops += step_flops(self.flop_model, tokens=tokens, seq_len=seq_len,
                                      reference_runs=self.reference_runs)

    def report(self) -> dict[str, float]:
        dt = max(time.perf_counter() - self._t0, 1e-9)
        out = {"tokens_per_sec": self._tokens / dt,
               "tokens_per_sec_per_device": self._tokens / dt / self.n}
        if self.flop_model is not None:
            out["tflops_per_sec_per_device"] = self._flops / dt / self.n / 1e12
            if self.peak:
                out["mfu"] = self._flops / dt / (self.peak * self.n)
        self.reset()
        return out


def validate_log_config(cfg) -> None:
    """Checks the ``log`` section.

    Keys: ``log.every_steps`` (>= 1: train rows are means over this many steps),
    ``log.peak_flops_per_device`` (>= 0; 0 = from ``PEAK_FLOPS``), ``log.progress_bar``,
    ``log.weight_norms``, and Weights & Biases tracking (``WandbWriter``, the same
    scalars as TensorBoard; needs ``pip install 'mio_jax[wandb]'``):

    * ``log.wandb.mode``: "disabled" (default), "online" or "offline" (files only, for
      ``wandb sync``);
    * ``log.wandb.project`` (required online), ``log.wandb.entity`` (team or user; "" = the
      API key's default), ``log.wandb.name`` (run name; "" = generated);
    * ``log.wandb.tags``: comma-separated tags (each at most 64 characters);
    * ``log.wandb.dir``: a local folder for wandb's files ("" = ``$WANDB_DIR``, else a
      local workdir, else ``./wandb``).

    Args:
      cfg: the whole experiment config (reads ``cfg.log``).

    Raises:
      mio_jax.config.ConfigError: naming the key.
    """
    log = cfg.log
    if log.every_steps < 1:
        raise ConfigError(f"log.every_steps={log.every_steps} must be >= 1")
    if log.peak_flops_per_device < 0:
        raise ConfigError(f"log.peak_flops_per_device={log.peak_flops_per_device} must be "
                          ">= 0 (0 = from the table of known chips)")
    w = log.wandb
    if w.mode not in WANDB_MODES:
        raise ConfigError(f"log.wandb.mode={w.mode!r} must be one of {list(WANDB_MODES)}")
    if w.mode == "disabled":
        return
    if w.mode == "online" and not w.project.strip():
        raise ConfigError("log.wandb.project must be set when log.wandb.mode='online'")
    long = [t for t in wandb_tags(w.tags) if len(t) > 64]
    if long:
        raise ConfigError(f"log.wandb.tags={w.tags!r}: tag {long[0]!r} is longer than 64 "
                          "characters")
    if paths.is_remote(w.dir):
        raise ConfigError(f"log.wandb.dir={w.dir!r} must be a local folder (wandb writes its "
                          "files on local disk)")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        _import_wandb(w.mode)  # raises the error that names the key and the extra
