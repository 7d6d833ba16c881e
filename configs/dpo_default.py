"""DPO on the same model, data and schedule as configs/default.py.

beta_DPO = beta_MIO / 2 matches the two losses' initial gradients
(docs/method.md section 4: at z = 0, MIO's dL/dz_w is -beta/4, DPO's -beta/2).

  python -m mio_jax.main --config=configs/dpo_default.py --workdir=/tmp/dpo_default
"""

import os

from mio_jax import config as mio_config

# The sibling experiment file, by path: this file runs from any working directory.
default = mio_config.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              "default.py"))


def get_config(arg=None):
    """The default experiment with ``loss.name = "dpo"`` at the gradient-matched beta."""
    c = default.get_config(arg)
    c.loss.name = "dpo"
    c.loss.beta = default.get_config(arg).loss.beta / 2   # 0.05
    return c
