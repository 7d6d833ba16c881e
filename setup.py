"""Installable package for mio_jax (preference optimisation of LLMs in JAX)."""

from setuptools import find_packages, setup

# Lower bounds are the versions measured to install and work together on
# Python 3.11 (see docs/environment notes); newer releases are allowed.
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "ml_collections>=1.1.0",
    "absl-py>=2.5.1",
    "numpy>=2.4",
    "transformers>=5.24.0",
    "tokenizers>=0.23.3",
    "safetensors>=0.8.0",
    "jinja2>=3.1",
    "gguf>=0.19.0",
    "pyarrow>=20.0",
    "tensorboard>=2.20",
    "matplotlib>=3.9",
    "tqdm>=4.66",
    "etils[epath]>=1.7",
    "qwix>=0.1.8",  # the quantization rules of the QLoRA base (int8, NF4)
]

GCS = ["gcsfs>=2024.2", "fsspec>=2024.2"]  # gs:// paths (etils.epath's fsspec backend)
WANDB = ["wandb>=0.31"]
EXTRAS = {
    "gcs": GCS,
    "wandb": WANDB,
    # The tests run gs:// paths against a local GCS emulator and log to wandb offline.
    # pytest-xdist: the default suite runs on 2 workers (pytest.ini; -n 0 for one process).
    "test": ["pytest>=8.0", "pytest-xdist>=3.5", "gcp-storage-emulator>=2024.8", *GCS, *WANDB],
    # Procedural reasoning problems with verifiers, used to build the
    # committed preference set and for reasoning evaluation.
    "reasoning": ["reasoning-gym>=0.1.25"],
}

CONSOLE_SCRIPTS = [
    "mio-train = mio_jax.main:run",
    "mio-convert = mio_jax.convert:main",
    "mio-evaluate = mio_jax.evaluate:main",
    "mio-pairs = mio_jax.pairs:main",
    "mio-plot = mio_jax.plot:main",
    "mio-inspect-data = mio_jax.data.inspect:run",
]

setup(
    name="mio_jax",
    version="0.1.0",
    description="Preference optimisation (MIO, DPO and friends) for LLMs in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["mio_jax", "mio_jax.*"]),
    package_data={"mio_jax.data": ["assets/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    # the main commands on the PATH of the environment (same flags as python -m mio_jax.X)
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
)
