"""The ``loss`` section of a training config: its checks and its effective hyper-parameters.

Every fact used here comes from the registry (``spec(name)``): which hyper-parameters a
loss reads and their defaults, whether it needs a reference model, and whether it couples
the groups of a batch (``LossSpec.couples_batch``). The losses themselves stay free of
configs; only trainers import this module.
"""

from __future__ import annotations

from typing import Any, Mapping

from mio_jax import layouts
from mio_jax.errors import ConfigError
from mio_jax.losses._registry import names as _registered, spec


def loss_names(name) -> list[str]:
    """``loss.name`` as a list: one name, or a "+"-joined mix such as "dpo+sft"."""
    if isinstance(name, str):
        return [n.strip() for n in name.split("+") if n.strip()]
    return list(name)


def hparam_defaults() -> dict[str, Any]:
    """Union of every registered loss's hyper-parameters with one default each (the
    first loss in name order that declares it; used for the schema's types)."""
    out: dict[str, Any] = {}
    for name in _registered():
        for key, value in spec(name).hparams.items():
            out.setdefault(key, value)
    return out


def effective_hparams(name, values: Mapping[str, Any]) -> dict[str, Any]:
    """The value each hyper-parameter of ``loss.name`` takes in a run.

    Args:
      name: ``loss.name`` (one name or a "+"-joined mix); unknown names are skipped.
      values: the ``loss`` section (or any mapping); a key holding None means "the
        loss's own default".

    Returns:
      ``{key: value}`` for every hyper-parameter the chosen loss(es) read: the set value,
      else the loss's default. A key that the losses of a mix default differently (e.g.
      ``label_smoothing`` of "dpo+exo_pair") and that is not set is left out: each member
      then keeps its own default, which one value could not express.
    """
    known = set(_registered())
    defaults: dict[str, set] = {}
    for n in loss_names(name):
        if n in known:
            for key, value in spec(n).hparams.items():
                defaults.setdefault(key, set()).add(value)
    out = {}
    for key, candidates in sorted(defaults.items()):
        if values.get(key) is not None:
            out[key] = values[key]
        elif len(candidates) == 1:
            out[key] = next(iter(candidates))
    return out


def validate_loss_config(cfg) -> None:
    """Checks the ``loss`` section and the rules that tie the chosen loss to other sections.

    Rules: ``loss.name`` registered; ``loss.weights`` one non-negative weight per member of
    a mix; ``loss.beta > 0``; no hyper-parameter set that the chosen loss does not read;
    ``loss.ld_alpha`` in [0, 1]; a loss that needs a reference model has
    ``reference.mode`` 'frozen' or 'precomputed', a reference-free one 'none'; a loss that
    couples the batch (``LossSpec.couples_batch``) runs without ``data.packing`` and with
    ``train.grad_accum_steps=1``; ``loss.ld_alpha`` / ``loss.use_weighting`` need the
    ``[B, K, L]`` token layout (neither ``data.packing`` nor ``data.shared_prompt``).

    Args:
      cfg: the whole experiment config (reads ``loss``, ``reference.mode``,
        ``data.packing``, ``data.shared_prompt``, ``train.grad_accum_steps``).

    Raises:
      mio_jax.config.ConfigError: naming the key.
    """
    loss = cfg.loss
    for key in ("router_aux_loss_coef", "router_z_loss_coef"):
        if loss.get(key, 0.0) < 0:
            raise ConfigError(f"loss.{key}={loss[key]} must be >= 0")
    names = loss_names(loss.name)
    known = set(_registered())
    if not names:
        raise ConfigError(f"loss.name={loss.name!r} names no loss; known: {sorted(known)}")
    for n in names:
        if n not in known:
            raise ConfigError(f"loss.name={n!r} is not a registered loss; known: {sorted(known)}")
    specs = [spec(n) for n in names]
    weights = loss.get("weights")
    if weights is not None:
        if len(names) < 2 or len(weights) != len(names):
            raise ConfigError(f"loss.weights={tuple(weights)} needs one weight per loss of a "
                              f"mix; loss.name={loss.name!r} has {len(names)}")
        if not all(isinstance(w, (int, float)) and w >= 0 for w in weights):
            raise ConfigError(f"loss.weights={tuple(weights)} must be non-negative numbers")
    if not loss.beta > 0:
        raise ConfigError(f"loss.beta={loss.beta} must be > 0")
    used = set().union(*(s.hparams for s in specs))
    for k in sorted(hparam_defaults()):
        if k not in used and loss.get(k) is not None:
            raise ConfigError(f"loss.{k}={loss[k]!r} is set but loss.name={loss.name!r} "
                              f"does not use it (its hyper-parameters: {sorted(used)})")
    if loss.ld_alpha is not None and not 0.0 <= loss.ld_alpha <= 1.0:
        raise ConfigError(f"loss.ld_alpha={loss.ld_alpha} must be in [0, 1]")

    mode = cfg.reference.mode
    needs_ref = any(s.needs_reference for s in specs)
    if needs_ref and mode == "none":
        raise ConfigError(f"loss.name={loss.name!r} needs a reference model; "
                          "set reference.mode to 'frozen' or 'precomputed'")
    if not needs_ref and mode != "none":
        raise ConfigError(f"loss.name={loss.name!r} is reference-free; "
                          f"set reference.mode='none' (got {mode!r})")

    coupled = [s.name for s in specs if s.couples_batch]
    if coupled and cfg.data.packing:
        raise ConfigError(f"data.packing=True cannot be used with loss.name={loss.name!r}: "
                          f"{coupled} need the batch structure")
    accum = cfg.train.grad_accum_steps
    if coupled and accum > 1:
        raise ConfigError(f"train.grad_accum_steps={accum} changes the result of "
                          f"batch-coupled loss(es) {coupled}; use 1")
    layout = next((k for k in ("packing", "shared_prompt") if cfg.data[k]), None)
    try:
        layouts.check_token_options(
            {"packing": layouts.PackedBatch, "shared_prompt": layouts.SharedPromptBatch}.get(
                layout, layouts.PreferenceBatch),
            ld_alpha=loss.ld_alpha, use_weighting=bool(loss.use_weighting))
    except ValueError as e:
        raise ConfigError(f"data.{layout}=True cannot be combined with loss.ld_alpha or "
                          f"loss.use_weighting: {e}") from e
