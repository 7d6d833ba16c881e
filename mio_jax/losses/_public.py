"""Plain per-loss functions with `compute`'s keyword contract (for jit / grad / vmap)."""

from __future__ import annotations

from typing import Any, Callable

import jax

from mio_jax.losses._api import compute
from mio_jax.losses._registry import spec

_DOC = """{summary}

    Args:
      policy_chosen_logps: [B] policy log-prob sums over the chosen completion tokens.
      policy_rejected_logps: [B] same for the rejected completions.
      ref_chosen_logps: [B] reference log-prob sums{ref_note}.
      ref_rejected_logps: [B] likewise.
      beta: scalar > 0.
      chosen_lengths: [B] completion token counts{len_note}.
      rejected_lengths: [B] likewise.
      **hparams: {hparams}.

    Returns:
      (losses_b, metrics): [B] per-example losses and a dict of [B] metrics.
    """


def make_public(name: str) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """The plain function of registered loss `name` (same keywords as `compute`)."""
    s = spec(name)

    def fn(
        *,
        policy_chosen_logps: jax.Array,
        policy_rejected_logps: jax.Array,
        ref_chosen_logps: jax.Array | None = None,
        ref_rejected_logps: jax.Array | None = None,
        beta: Any,
        chosen_lengths: jax.Array | None = None,
        rejected_lengths: jax.Array | None = None,
        **hparams: Any,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        return compute(
            name,
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            beta=beta,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            **hparams,
        )

    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = "mio_jax.losses"
    fn.__doc__ = _DOC.format(
        summary=f"Loss {name!r}: {s.summary}." + (s.core.__doc__ and "\n\n    " + s.core.__doc__.strip() or ""),
        ref_note="" if s.needs_reference else " (optional: unused by this loss)",
        len_note={"none": " (unused)", "chosen": " (required)", "both": " (required)"}[s.needs_lengths],
        hparams=", ".join(f"{k}={v!r}" for k, v in s.hparams.items()) or "none",
    )
    return fn
