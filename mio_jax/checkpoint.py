"""The only Orbax code: save / restore train state, data-iterator state and config.

A checkpoint step holds three items:

* ``state``: the train-state pytree (params, optimizer state, step, RNG),
  restored straight into its shardings from an abstract target;
* ``data``: the data iterator's state (JSON; bytes are base64-encoded);
* ``config``: the full resolved config (JSON), for the record.

Saves are asynchronous; ``wait()`` blocks until the last one is on disk.
Restoring walks the steps newest first: a corrupted or partial checkpoint is
moved aside (to ``<dir>/../corrupt_checkpoints/<step>``) with a warning and
the previous one is used.
"""

from __future__ import annotations

import base64
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

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


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a run under ``directory``.

    Args:
      directory: absolute path of the checkpoint folder (created if missing).
      keep: how many recent checkpoints to keep.
      async_save: save in a background thread.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._keep, self._async = keep, async_save
        self._open()

    def _open(self) -> None:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, enable_async_checkpointing=self._async, create=True)
        self._mngr = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config"))

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
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(_encode({"iterator": data_state})),
            config=ocp.args.JsonSave(_encode(config or {})))
        return bool(self._mngr.save(step, args=args, force=force))

    def restore(self, abstract_state: Any) -> tuple[int, Any, Any, dict] | None:
        """Restores the newest readable checkpoint.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings,
            shaped like the saved state.

        Returns:
          ``(step, state, data_state, config)`` or None if there is none.
        """
        for step in reversed(self.steps()):
            try:
                restored = self._mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore()))
                state = restored["state"]
                jax.block_until_ready(state)
                data = _decode(restored["data"] or {}).get("iterator")
                return step, state, data, _decode(restored["config"] or {})
            except Exception as e:  # noqa: BLE001 - any read failure means "unusable"
                logging.warning("checkpoint step %d in %s is unreadable (%s: %s); "
                                "falling back to the previous one",
                                step, self.directory, type(e).__name__, e)
                self._quarantine(step)
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
        restored = self._mngr.restore(self._pick(step), args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item))))
        return restored["state"]["params"]

    def _quarantine(self, step: int) -> None:
        """Moves a broken step aside so later saves at that step do not collide."""
        self._mngr.wait_until_finished()
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst_root = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
            os.makedirs(dst_root, exist_ok=True)
            dst = os.path.join(dst_root, str(step))
            if os.path.exists(dst):
                shutil.rmtree(dst)
            if os.path.exists(src):
                shutil.move(src, dst)
        self._mngr.close()
        self._open()

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
