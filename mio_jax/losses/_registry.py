"""The loss registry: one frozen `LossSpec` per name, looked up by `spec(name)`."""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping

# Critic conventions used for the logged rewards / MI metrics.
CRITIC_LOGRATIO = "logratio"  # T = beta * (log pi_theta - log pi_ref)
CRITIC_AVG_LOGP = "avg_logp"  # T = beta * (log pi_theta / length)  (SimPO, ORPO: TRL's CPO/ORPO logging)

PAIRWISE = "pairwise"
MULTI_NEGATIVE = "multi_negative"


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Metadata of a registered loss (what a trainer needs to validate a config).

    Attributes:
      name: registry name (`compute(name, ...)`).
      kind: "pairwise" (K must be 2) or "multi_negative" (any K >= 2).
      needs_reference: True if `ref_*` log-probs are required.
      needs_lengths: "none", "chosen" or "both": which completion lengths are required.
      hparams: read-only mapping of hparam name -> default value.
      trl_name: TRL's `loss_type` (or trainer) this loss matches, or None.
      critic: how the metrics' critic T is formed ("logratio" or "avg_logp").
      summary: one-line formula.
      core: internal function `(group, **hparams) -> (losses[B], extra_metrics)`.
      couples_batch: True if a group's loss depends on the other groups of the batch
        (e.g. it sorts over the batch axis): such a loss changes value under packing
        or gradient accumulation, which split the batch.
    """

    name: str
    kind: str
    needs_reference: bool
    needs_lengths: str
    hparams: Mapping[str, Any]
    trl_name: str | None
    critic: str
    summary: str
    core: Callable[..., Any] = dataclasses.field(repr=False, compare=False)
    couples_batch: bool = False


_REGISTRY: dict[str, LossSpec] = {}


def register(
    name: str,
    *,
    kind: str = PAIRWISE,
    needs_reference: bool = True,
    needs_lengths: str = "none",
    hparams: Mapping[str, Any] | None = None,
    trl_name: str | None = None,
    critic: str = CRITIC_LOGRATIO,
    summary: str = "",
    couples_batch: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a core loss function under `name`."""
    if needs_lengths not in ("none", "chosen", "both"):
        raise ValueError(f"needs_lengths must be 'none', 'chosen' or 'both', got {needs_lengths!r}")
    if kind not in (PAIRWISE, MULTI_NEGATIVE):
        raise ValueError(f"kind must be {PAIRWISE!r} or {MULTI_NEGATIVE!r}, got {kind!r}")

    def deco(core: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        _REGISTRY[name] = LossSpec(
            name=name,
            kind=kind,
            needs_reference=needs_reference,
            needs_lengths=needs_lengths,
            hparams=types.MappingProxyType(dict(hparams or {})),
            trl_name=trl_name,
            critic=critic,
            summary=summary,
            core=core,
            couples_batch=couples_batch,
        )
        return core

    return deco


def names() -> tuple[str, ...]:
    """Every registered loss name, sorted."""
    return tuple(sorted(_REGISTRY))


def spec(name: str) -> LossSpec:
    """The `LossSpec` of `name`; raises ValueError listing the valid names if unknown."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(names())}")
    return _REGISTRY[name]
