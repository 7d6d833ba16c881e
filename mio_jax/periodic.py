"""The train loop's periodic work as small objects, in the spirit of CLU's periodic actions.

The loop calls each once per step with the step number; each decides for itself whether
its turn has come. ``MetricsWindow`` fetches a step's metrics one step late (the host never
waits on the step it just launched), checks them for NaN/Inf and writes window means;
``Checkpoints`` saves the state with the data position; ``Evals`` runs the eval;
``Preemption`` turns a preemption notice (SIGTERM to any process) into a checkpoint of one
step all processes agree on, and exit 143.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mio_jax import checkpoint as ckpt_lib
from mio_jax import metrics as metrics_lib

_SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
          "rewards/rejected", "logps/chosen", "grad_norm", "learning_rate",
          "tokens_per_sec", "mfu")


def format_metrics(metrics: dict) -> str:
    """The metrics a person watches, as one short log line."""
    return " ".join(f"{k}={metrics[k]:.4g}" for k in _SHOWN if k in metrics)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is on disk (exit status 143)."""

    def __init__(self, step: int):
        super().__init__(143)
        self.step = step


class MetricsWindow:
    """Step metrics: fetched one step late, NaN-checked, averaged and written every N steps.

    Args:
      writer: a ``metrics.MultiWriter``.
      progress: a ``metrics.Progress`` bar.
      throughput: a ``metrics.Throughput`` (global token counts).
      every: write the window mean every ``every`` steps (and at ``total_steps``).
      total_steps: the run's last step.
    """

    def __init__(self, writer, progress, throughput: metrics_lib.Throughput, *, every: int,
                 total_steps: int):
        self.writer, self.progress, self.throughput = writer, progress, throughput
        self.every, self.total_steps = every, total_steps
        self._pending: list[tuple[int, Any, Any, Any]] = []
        self._window: list[dict] = []
        self.last: dict = {}

    def add(self, step: int, metrics: Any, info, example_id) -> None:
        """Queues ``step``'s device metrics; checks the previous step's meanwhile.

        Args:
          step: the step the metrics belong to (after the update).
          metrics: the step's device metrics (not yet fetched).
          info: the global batch's ``data.plan.BatchInfo`` (token counts).
          example_id: this process's example ids of the batch (named on NaN).
        """
        self.flush()
        self._pending.append((step, metrics, info, example_id))

    def flush(self) -> None:
        """Fetches every queued step, checks it, and writes a window mean when due."""
        for step, metrics, info, example_id in self._pending:
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            metrics_lib.check_finite(host, step=step, batch_indices=np.asarray(example_id))
            self.throughput.add(info.tokens, info.seq_len)
            self._window.append(host)
            if step % self.every == 0 or step == self.total_steps:
                mean = {k: float(np.mean([w[k] for w in self._window])) for k in self._window[-1]}
                mean.update(self.throughput.report())
                self.writer.write(step, mean, "train")
                self.progress.update(step, mean)
                logging.info("step %d: %s", step, format_metrics(mean))
                self.last = mean
                self._window.clear()
        self._pending.clear()

    def sync(self) -> None:
        """Flushes, then makes every row written so far durable (remote writers upload)."""
        self.flush()
        self.writer.sync(force=True)


class Checkpoints:
    """Saves the train state, the data position and the config every N steps.

    Args:
      checkpointer: the run's ``checkpoint.Checkpointer``.
      every: save every ``every`` steps.
      data_iterator: the train pipeline (its ``get_state()`` goes with each save).
      config: the resolved config as a dict.
      window: the ``MetricsWindow``, flushed and synced first: a saved step was checked
        finite, and its metrics rows are durable (uploaded, for a remote workdir) before the
        checkpoint can exist, so a resume from it finds every row up to its step.
    """

    def __init__(self, checkpointer: ckpt_lib.Checkpointer, *, every: int, data_iterator,
                 config: dict, window: MetricsWindow):
        self.checkpointer, self.every = checkpointer, every
        self.data_iterator, self.config, self.window = data_iterator, config, window

    def __call__(self, step: int, state) -> None:
        if step % self.every == 0:
            self.save(step, state)

    def save(self, step: int, state) -> None:
        self.window.sync()
        self.checkpointer.save(step, state, data_state=self.data_iterator.get_state(),
                               config=self.config)

    def finish(self, step: int, state) -> None:
        """The final checkpoint (unless that step is saved already), committed."""
        if step not in self.checkpointer.steps():
            self.save(step, state)
        self.checkpointer.wait()


class Evals:
    """Runs the eval every N steps before the last (the final eval is the loop's own).

    Args:
      evaluate: ``(params, step) -> metrics`` (empty when there is nothing to evaluate).
      every: evaluate every ``every`` steps; 0 = never.
      total_steps: the run's last step.
      writer: where eval metrics go; window: flushed first (log order).
    """

    def __init__(self, evaluate: Callable[[Any, int], dict], *, every: int, total_steps: int,
                 writer, window: MetricsWindow):
        self.evaluate, self.every, self.total_steps = evaluate, every, total_steps
        self.writer, self.window = writer, window

    def __call__(self, step: int, params) -> None:
        if self.every and step % self.every == 0 and step < self.total_steps:
            self.run(step, params)

    def run(self, step: int, params, label: str = "eval") -> dict:
        self.window.flush()
        out = self.evaluate(params, step)
        if out:
            self.writer.write(step, out, "eval")
            self.writer.sync(force=True)  # an eval is rare and costly: keep its row at once
            logging.info("%s at step %d: %s", label, step, format_metrics(out))
        return out


class Preemption:
    """A preemption notice -> a checkpoint of one agreed step and ``Preempted`` (exit 143).

    A context manager called at every step boundary (``check(step, state)``). With several
    processes it uses JAX's own preemption sync point
    (``multihost_utils.reached_preemption_sync_point``): the coordination service's
    notifier catches SIGTERM on any host, and every host learns the same safe step, saves
    it and exits together (hosts of a preempted slice are not signalled in the same step).
    A single process installs a SIGTERM handler for the duration of the loop instead.
    """

    def __init__(self, checkpoints: Checkpoints):
        self.checkpoints = checkpoints
        self._hit = False
        self._previous = None
        self._synced = False

    def __enter__(self) -> "Preemption":
        # The coordination service's notifier owns SIGTERM in a multi-process run; a Python
        # handler would replace it, and then only the signalled host would know.
        self._synced = jax.process_count() > 1
        if not self._synced:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if not self._synced:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, *_) -> None:
        self._hit = True

    def check(self, step: int, state) -> None:
        hit = (multihost_utils.reached_preemption_sync_point(step) if self._synced
               else self._hit)
        if not hit:
            return
        self.checkpoints.save(step, state)
        self.checkpoints.checkpointer.wait()
        logging.warning("preemption notice: checkpoint at step %d written; exiting", step)
        raise Preempted(step)
