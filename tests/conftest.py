"""Test set-up: 8 simulated CPU devices, configured before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402  (must follow the environment set-up above)
import pytest  # noqa: E402


def pytest_configure(config):
    assert jax.device_count() == 8, (
        "tests expect 8 simulated CPU devices; JAX was initialised before "
        "tests/conftest.py could set XLA_FLAGS"
    )
    config.addinivalue_line("markers", "slow: long-running test (excluded by -m 'not slow')")


@pytest.fixture
def x64():
    """Runs a test with float64 enabled, restoring the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
