"""Test set-up: 8 simulated CPU devices, configured before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# The suite compiles hundreds of small programs and runs each a few times: on a cold cache
# XLA:CPU's code generation is most of its time. The suite compiles them unoptimised (LLVM
# -O0) and with XLA:CPU's older fusion emitter (LLVM IR written directly, not through the
# MLIR fusion emitters): the same HLO and the same operations, the matmuls in the same
# runtime library, and less than half the compile time per test. MIO_JAX_TEST_FULL_OPT=1
# compiles as a user's run does (XLA's defaults); .ci/run runs the rounding tests that way,
# under the default instruction set and under AVX2.
if os.environ.get("MIO_JAX_TEST_FULL_OPT", "0") != "1":
    for flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
        if flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
            os.environ["XLA_FLAGS"] += " " + flag
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Persistent XLA compilation cache, shared with the subprocesses the CLI tests
# start: the same small programs recur across tests and runs, and compiling them
# dominates a cold run on 2 cores. It stores compiled executables only.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join("/tmp", f"mio_jax_test_compile_cache_{os.getuid()}")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (must follow the environment set-up above)
import pytest  # noqa: E402


def pytest_configure(config):
    assert jax.device_count() == 8, (
        "tests expect 8 simulated CPU devices; JAX was initialised before "
        "tests/conftest.py could set XLA_FLAGS"
    )
    config.addinivalue_line("markers", "slow: long-running test (excluded by -m 'not slow')")
    config.addinivalue_line(
        "markers", "rounding: golden and equality tests of float32 training, whose tolerances "
        "must hold on any CPU; .ci/run also runs them under XLA_FLAGS=--xla_cpu_max_isa=AVX2")


# The longest test files first: the two pytest-xdist workers take whole files in this
# order, so the long ones do not start last and leave one worker running alone at the end.
LONGEST_FIRST = ("test_multiprocess.py", "test_online.py", "test_lora.py", "test_gcs.py",
                 "test_train.py", "test_train_golden.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable otherwise


@pytest.fixture
def x64():
    """Runs a test with float64 enabled, restoring the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


# ---- shared helpers of the trainer, CLI and model tests (tiny real artefacts) ----

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model_dir, train.jsonl, eval.jsonl)``: a tiny random Llama and data, per module."""
    from mio_jax import testing

    return testing.tiny_setup(str(tmp_path_factory.mktemp("tiny")))


def _tiny_config(model_dir, train, ev, arg=None, **overrides):
    from configs import tiny_test

    c = tiny_test.get_config(arg)
    c.model.path, c.data.train_path, c.data.eval_path = model_dir, train, ev
    for key, value in overrides.items():
        node = c
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
    return c


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: ``configs/tiny_test.py`` with the given paths; overrides as "a.b" -> value:
    ``tiny_config(model_dir, train, eval, arg=None, **{"loss.beta": 0.2})``."""
    return _tiny_config


@pytest.fixture(scope="session")
def subprocess_env():
    """Environment for ``python -m mio_jax.*`` subprocesses of the tests (8 CPU devices,
    no hub, the checkout importable for ``configs``)."""
    env = dict(os.environ)  # XLA_FLAGS as set above: 8 devices and any flag given (an ISA)
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=REPO)
    return env


# ---- gs:// paths against a real local GCS server (tests/test_gcs.py) ----

@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A started ``mio_jax.testing.GcsEmulator`` (bucket "mio-test", in memory) for the whole
    session; ``os.environ`` points gcsfs and tensorstore at it, and remote inputs are staged
    under a session folder (``MIO_JAX_STAGING``) rather than ``~/.cache``."""
    import logging

    from mio_jax import paths, testing

    # No credentials against the emulator: gcsfs warns on every operation that it cannot
    # tell the bucket type, then goes on as it should.
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    staging = str(tmp_path_factory.mktemp("gcs_staging"))
    saved = os.environ.get(paths.STAGING_ENV)
    os.environ[paths.STAGING_ENV] = staging
    try:
        with testing.GcsEmulator() as emulator:
            emulator.env = {**emulator.env, paths.STAGING_ENV: staging}
            yield emulator
    finally:
        if saved is None:
            os.environ.pop(paths.STAGING_ENV, None)
        else:
            os.environ[paths.STAGING_ENV] = saved


@pytest.fixture(scope="session")
def gcs_env(gcs, subprocess_env):
    """``subprocess_env`` plus the emulator's variables (and the staging folder), for
    ``python -m mio_jax.*`` subprocesses and pods that read or write ``gs://``."""
    return {**subprocess_env, **gcs.env}
