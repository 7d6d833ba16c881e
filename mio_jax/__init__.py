"""mio_jax: preference optimisation of LLMs in JAX, built around MIO.

Subpackages are imported on demand (``mio_jax.losses``, ``mio_jax.models``,
``mio_jax.data``, ...) so that using the loss library alone stays light.
"""

__version__ = "0.1.0"
