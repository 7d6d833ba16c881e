"""Deprecated: the shared defaults live in the package, ``mio_jax.config.base_config()``.

Old experiment files (``from configs import common`` ... ``common.base_config()``) keep
working from the checkout; new ones build on ``mio_jax.config`` and run from any folder:

    from mio_jax import config as mio_config

    def get_config(arg=None):
        c = mio_config.base_config()
        ...
"""

import warnings

from mio_jax import config as _mio_config

loss_hparam_defaults = _mio_config.loss_hparam_defaults


def base_config():
    """``mio_jax.config.base_config()``, with a DeprecationWarning."""
    warnings.warn("configs/common.py is deprecated: build on mio_jax.config.base_config() "
                  "(from mio_jax import config as mio_config)", DeprecationWarning, stacklevel=2)
    return _mio_config.base_config()
