"""Deprecated: the config schema and its checks live in ``mio_jax.config``.

This module re-exports the public names so existing imports keep working; import
``mio_jax.config`` instead.
"""

import warnings

from mio_jax.config import (  # noqa: F401  (re-exports)
    REFERENCE_MODES,
    ConfigError,
    as_dict,
    check_keys_and_types,
    loss_names,
    reasoning_tasks,
    validate,
)

warnings.warn("mio_jax.config_validation is deprecated; use mio_jax.config",
              DeprecationWarning, stacklevel=2)

__all__ = ["REFERENCE_MODES", "ConfigError", "as_dict", "check_keys_and_types", "loss_names",
           "reasoning_tasks", "validate"]
