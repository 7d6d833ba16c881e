"""Metric writers (JSONL, TensorBoard), console progress, FLOP accounting, NaN guard.

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
import sys
import time
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import numpy as np

from mio_jax.errors import ConfigError

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

    def train_flops_per_token(self, seq_len: int) -> float:
        """Forward + backward FLOPs per token of the policy."""
        return 6.0 * self.matmul_params + 6.0 * self.n_layers * self.attn_dim * seq_len

    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward-only FLOPs per token (reference model)."""
        return 2.0 * self.matmul_params + 2.0 * self.n_layers * self.attn_dim * seq_len


def flop_model(model_cfg, params) -> FlopModel:
    """``FlopModel`` of a decoder: N (matmul parameters), layers and attention width.

    Args:
      model_cfg: the decoder's ``ModelConfig``.
      params: its parameters (arrays or ``ShapeDtypeStruct``s).
    """
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    embed = model_cfg.vocab_size * model_cfg.hidden_size
    n = total if model_cfg.tie_word_embeddings else total - embed
    return FlopModel(n, model_cfg.num_hidden_layers,
                     model_cfg.num_attention_heads * model_cfg.head_dim)


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
      path: the JSONL file.
      resume_step: when resuming from a checkpoint at this step, rows of later
        steps (written before an interruption) are dropped first, so the file
        reads like one uninterrupted run.
    """

    def __init__(self, path: str, resume_step: int | None = None):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                keep = [line for line in f if line.strip()
                        and json.loads(line).get("step", 0) <= resume_step]
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(keep)
            os.replace(tmp, path)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        row = {"step": int(step), "split": split}
        row.update({k: _py(v) for k, v in metrics.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class TensorBoardWriter:
    """Scalar summaries in TensorBoard event files (tensorboard package, no TF)."""

    def __init__(self, logdir: str, resume_step: int | None = None):
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(logdir, exist_ok=True)
        self._w = EventFileWriter(logdir)
        if resume_step is not None:
            # TensorBoard discards earlier-written events at steps >= the marker's.
            self._w.add_event(event_pb2.Event(
                wall_time=time.time(), step=int(resume_step) + 1,
                session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

    def write(self, step: int, metrics: Mapping[str, float], split: str = "train") -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=f"{split}/{k}", simple_value=float(v))
                  for k, v in metrics.items() if isinstance(v, (int, float, np.number))]
        event = event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values))
        self._w.add_event(event)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class MultiWriter:
    """Fans out to several writers; only process 0 should create one."""

    def __init__(self, writers):
        self._writers = list(writers)

    def write(self, step, metrics, split="train"):
        for w in self._writers:
            w.write(step, metrics, split)

    def close(self):
        for w in self._writers:
            w.close()


def make_writers(workdir: str, enabled: bool = True,
                 resume_step: int | None = None) -> MultiWriter:
    """JSONL at ``workdir/metrics.jsonl`` and TensorBoard under ``workdir/tb``.

    Args:
      workdir: the run folder.
      enabled: False on every process but the first (writes nothing).
      resume_step: the restored checkpoint's step when resuming (see ``JsonlWriter``).
    """
    if not enabled:
        return MultiWriter([])
    return MultiWriter([JsonlWriter(os.path.join(workdir, "metrics.jsonl"), resume_step),
                        TensorBoardWriter(os.path.join(workdir, "tb"), resume_step)])


class Progress:
    """Console progress bar: step, ETA, loss and reward accuracy (tqdm)."""

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True):
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, initial=initial_step, disable=not enabled,
                         dynamic_ncols=True, file=sys.stderr, desc="train")

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
    """Checks the ``log`` section: ``log.every_steps >= 1`` and
    ``log.peak_flops_per_device >= 0`` (0 = from ``PEAK_FLOPS``).

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
