"""The only Orbax code: save / restore train state, data-iterator state and config.

A checkpoint step holds three items:

* ``state``: the train-state pytree (params, optimizer state, step, RNG),
  restored straight into its shardings from an abstract target (any mesh and process
  count: a checkpoint resumes on another layout);
* ``data``: the data iterator's state (JSON; bytes are base64-encoded);
* ``config``: the full resolved config (JSON), for the record.

Saves are asynchronous; ``wait()`` blocks until the last one is on disk.

Restoring walks the steps newest first, and every process of the run takes each step
together (``restore``):

* a checkpoint whose saved structure, shapes or dtypes differ from the run's state (a
  changed model or optimizer setting) stops the run with ``CheckpointMismatch``, naming
  what differs; nothing is moved and nothing starts again from step 0 silently;
* a read that fails is retried (transient storage errors); a step that stays unreadable
  on ANY process makes all processes fall back to the next older step together;
* nothing is moved or deleted: a step found unreadable is left as it is and not saved
  again by this run (the log says which and how to clear it).
"""

from __future__ import annotations

import base64
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mio_jax import distributed, paths
from mio_jax.errors import ConfigError


class _QuietOrbax:
    """Drops Orbax's per-save INFO chatter from the absl log (warnings stay)."""

    def filter(self, record) -> bool:
        return record.levelno >= 30 or "/orbax/" not in (record.pathname or "")


logging.get_absl_logger().addFilter(_QuietOrbax())


def _encode(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"__bytes_b64__": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, dict):
        return {str(k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__bytes_b64__"}:
            return base64.b64decode(obj["__bytes_b64__"])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


class CheckpointMismatch(ConfigError):
    """The run's train state no longer matches its checkpoints (structure, shape or dtype)."""


# Outcomes of one process's attempt at one step (agreed across processes).
_OK, _UNREADABLE, _MISMATCH = 0, 1, 2


def _key(entry) -> str:
    for attr in ("key", "idx", "name"):  # dict key, sequence index, named-tuple field
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    # Saved metadata spells named tuples as dicts and lists: compare paths by their names.
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key(k) for k in path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
            for path, leaf in flat}


def state_differences(saved, wanted, limit: int = 6) -> list[str]:
    """What differs between a saved state's metadata and the run's abstract state.

    Returns:
      Lines such as ``"params/layers/q: saved (2, 32, 4, 8) float32, run (2, 32, 8, 8)
      float32"`` or ``"opt_state/0/mu/embed: only in the run"``; empty when they match.
    """
    a, b = _leaves(saved), _leaves(wanted)
    out = [f"{k}: only in the checkpoint" for k in sorted(a.keys() - b.keys())]
    out += [f"{k}: only in the run" for k in sorted(b.keys() - a.keys())]
    out += [f"{k}: saved {a[k][0]} {a[k][1]}, run {b[k][0]} {b[k][1]}"
            for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run under ``directory``.

    Args:
      directory: the checkpoint folder, a local path or a URL such as ``gs://bucket/run/
        checkpoints`` (created if missing; stored as ``paths.resolve`` gives it).
      keep: how many recent checkpoints to keep.
      async_save: save in a background thread.
      read_attempts: tries of each read before a step counts as unreadable.
      retry_wait: seconds before the second try (doubling after each).
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
                 read_attempts: int = 3, retry_wait: float = 0.5):
        self.directory = paths.resolve(directory)
        self._keep, self._async = keep, async_save
        self._attempts, self._wait = max(int(read_attempts), 1), retry_wait
        self.unreadable: list[int] = []  # steps found unreadable (left untouched)
        # Orbax's preservation policy (max_to_keep is its deprecated spelling): the latest
        # `keep` steps stay, older ones are deleted once a newer one is committed.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=self._keep),
            enable_async_checkpointing=self._async, create=True)
        # Explicit handlers: the saved state's metadata (structure, shapes, dtypes) can then
        # be read before a restore is tried.
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        """Committed checkpoint steps, ascending."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, *, data_state: Any = None,
             config: dict | None = None, force: bool = False) -> bool:
        """Starts saving ``state`` (plus data-iterator state and config) at ``step``.

        Returns:
          True if a save was started (False if that step already exists).
        """
        if step in self._mngr.all_steps():
            if step in self.unreadable:
                logging.error("checkpoint step %d in %s exists but is unreadable, so this run "
                              "does not save that step again; move %s aside to let it",
                              step, self.directory, paths.join(self.directory, str(step)))
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_encode({"iterator": data_state})),
            config=ocp.args.JsonSave(_encode(config or {})))
        return bool(self._mngr.save(step, args=args, force=force))

    def _read(self, step: int, abstract_state: Any):
        """One process's attempt at ``step``: ``(code, restored or message)``."""
        try:
            saved = self._mngr.item_metadata(step)["state"]
            saved = getattr(saved, "tree", saved)
        except Exception as e:  # noqa: BLE001 - unreadable metadata: a broken step
            return _UNREADABLE, f"metadata: {type(e).__name__}: {e}"
        if saved is not None:
            diff = state_differences(saved, abstract_state)
            if diff:
                return _MISMATCH, "; ".join(diff)
        error = ""
        for attempt in range(self._attempts):
            try:
                return _OK, self._read_items(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - retried, then the step is unreadable
                error = f"{type(e).__name__}: {e}"
                if attempt + 1 < self._attempts:
                    logging.warning("reading checkpoint step %d failed (%s); retrying", step,
                                    error.splitlines()[0][:300])
                    time.sleep(self._wait * 2 ** attempt)
        return _UNREADABLE, error

    def _read_items(self, step: int, abstract_state: Any) -> dict:
        """Reads the three items of ``step`` with Orbax's handlers directly. Each process reads
        only its own shards and nothing here waits for the other processes: the
        CheckpointManager's restore ends in a barrier that a process whose read failed never
        reaches, which hangs or mismatches the others; ``restore`` agrees instead."""
        folder = epath.Path(self.directory) / str(step)
        state_handler = ocp.StandardCheckpointHandler()
        try:
            state = state_handler.restore(folder / "state",
                                          args=ocp.args.StandardRestore(abstract_state))
            jax.block_until_ready(state)
        finally:
            state_handler.close()
        return {"state": state,
                "data": ocp.JsonCheckpointHandler().restore(folder / "data",
                                                           args=ocp.args.JsonRestore()),
                "config": ocp.JsonCheckpointHandler().restore(folder / "config",
                                                             args=ocp.args.JsonRestore())}

    def restore(self, abstract_state: Any) -> tuple[int, Any, Any, dict] | None:
        """Restores the newest step that every process can read.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings, shaped like
            the saved state (on any mesh: arrays are resharded as they are read).

        Returns:
          ``(step, state, data_state, config)``, or None if there is no checkpoint.

        Raises:
          CheckpointMismatch: the newest checkpoint's structure, shapes or dtypes differ
            from ``abstract_state``; the message names them.
        """
        for step in reversed(self.steps()):
            code, result = self._read(step, abstract_state)
            codes = distributed.process_values(code)
            if (codes == _MISMATCH).any():
                where = [int(i) for i in np.flatnonzero(codes == _MISMATCH)]
                detail = result if code == _MISMATCH else f"reported by process(es) {where}"
                raise CheckpointMismatch(
                    f"checkpoint step {step} in {self.directory} does not match this run's "
                    f"train state ({detail}). The model, optimizer or precision settings "
                    "changed since it was written: run with the settings it was saved with, "
                    "or start the new settings in another --workdir (nothing was moved).")
            if (codes == _OK).all():
                restored = result
                data = _decode(restored["data"] or {}).get("iterator")
                return step, restored["state"], data, _decode(restored["config"] or {})
            bad = [int(i) for i in np.flatnonzero(codes != _OK)]
            self.unreadable.append(step)
            logging.warning("checkpoint step %d in %s is unreadable on process(es) %s%s; all "
                            "processes fall back to the previous step (the step is left as "
                            "it is)", step, self.directory, bad,
                            f" ({str(result).splitlines()[0][:300]})" if code != _OK else "")
        return None

    def _pick(self, step: int | None) -> int:
        steps = self.steps()
        if not steps or (step is not None and step not in steps):
            want = "checkpoint" if step is None else f"checkpoint step {step}"
            raise FileNotFoundError(f"{self.directory}: no {want} (steps found: {steps})")
        return steps[-1] if step is None else step

    def saved_config(self, step: int | None = None) -> tuple[int, dict]:
        """``(step, config)``: the resolved config saved with a checkpoint (None = newest).

        Raises:
          FileNotFoundError: no checkpoint (or no such step) in the directory.
        """
        step = self._pick(step)
        restored = self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return step, _decode(restored["config"] or {})

    def restore_params(self, abstract_params: Any, step: int) -> Any:
        """Reads only the parameters of checkpoint ``step`` (for export).

        Args:
          abstract_params: pytree of ``jax.ShapeDtypeStruct`` (with shardings)
            shaped like ``state.params``.
          step: the checkpoint step.
        """
        item = {"params": abstract_params}
        folder = paths.as_path(paths.join(self.directory, str(self._pick(step)), "state"))
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:  # a partial read
            restored = reader.restore(folder, args=ocp.args.PyTreeRestore(
                item, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item)))
        return restored["params"]

    def wait(self) -> None:
        """Blocks until every started save is committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def validate_checkpoint_config(cfg) -> None:
    """Checks the ``checkpoint`` section: ``checkpoint.every_steps >= 1`` and
    ``checkpoint.keep >= 1``.

    Args:
      cfg: the whole experiment config (reads ``cfg.checkpoint``).

    Raises:
      mio_jax.config.ConfigError: naming the key.
    """
    c = cfg.checkpoint
    if c.every_steps < 1:
        raise ConfigError(f"checkpoint.every_steps={c.every_steps} must be >= 1 "
                          "(a run saves at the end in any case)")
    if c.keep < 1:
        raise ConfigError(f"checkpoint.keep={c.keep} must be >= 1")
