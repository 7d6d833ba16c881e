"""mio_jax installed non-editable, run from a folder outside the checkout on an experiment
file that lives there and builds on ``mio_jax.config.base_config()``.

The package goes into a fresh virtual environment as a wheel of the checkout would put it
there: setuptools' ``build_py`` step of ``setup.py`` (the packages and package data a wheel
holds) writes it into the new site-packages. (``pip wheel --no-build-isolation`` needs the
``wheel`` package, which the development venv does not have.) The dependencies come from
the development venv's site-packages through a plain path line in a ``.pth`` file: a path
line is added to ``sys.path`` without processing the ``.pth`` files there, so the
checkout's editable install of mio_jax is not importable in the new environment.

Runs in the default suite (about 30-60 s on 2 cores: one tiny 2-step run).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENT = '''"""DPO on a tiny model: an experiment file outside the mio_jax checkout."""

from mio_jax import config as mio_config


def get_config(arg=None):
    c = mio_config.base_config()
    c.model.path = {model!r}
    c.model.logps_chunk_size = 64
    c.data.train_path = {train!r}
    c.data.eval_path = {ev!r}
    c.data.max_length = 32
    c.data.bucketing = False
    c.loss.name = "dpo"
    c.loss.beta = 0.05
    c.train.steps = 2
    c.train.batch_size = 8
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 1
    c.reference.batch_size = 8
    c.checkpoint.every_steps = 1
    c.checkpoint.async_save = False
    c.checkpoint.export_hf = False
    c.log.every_steps = 1
    c.log.progress_bar = False
    c.log.peak_flops_per_device = 1e11
    c.eval.every_steps = 0
    c.eval.batch_size = 8
    c.eval.max_batches = 1
    if arg == "typo":
        c.train.stpes = 3
    return c
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(python of the new environment, the environment's folder)``."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"  # a copy: building writes nothing into the checkout
    shutil.copytree(os.path.join(REPO, "mio_jax"), src / "mio_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = str(env_dir / "bin" / "python")
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([python, "-c", purelib],
                          check=True, capture_output=True, text=True).stdout.strip()
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", site],
                           cwd=src, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    with open(os.path.join(site, "dev_venv_dependencies.pth"), "w", encoding="utf-8") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return python, str(env_dir)


@pytest.fixture
def user_folder(tmp_path, tiny):
    """A folder outside the checkout holding the user's experiment file."""
    model, train, ev = tiny
    (tmp_path / "my_experiment.py").write_text(EXPERIMENT.format(model=model, train=train, ev=ev))
    return tmp_path


def _run(python, args, cwd, subprocess_env, timeout=300):
    env = dict(subprocess_env)
    env.pop("PYTHONPATH", None)  # nothing of the checkout on the path
    return subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_installed_package_trains_from_an_experiment_file_anywhere(installed, user_folder,
                                                                   subprocess_env):
    python, env_dir = installed
    # The installed copy is the one imported; `configs` (of the checkout) is not
    # importable, and the shipped configs still load by path from here.
    probe = ("import importlib.util, os, mio_jax\nfrom mio_jax import config as C\n"
             "print(mio_jax.__file__)\nprint(importlib.util.find_spec('configs'))\n"
             f"for f in sorted(os.listdir({os.path.join(REPO, 'configs')!r})):\n"
             f"    if f.endswith('.py') and f not in ('common.py', 'reproduce_pairs.py'):\n"
             f"        C.validate(C.load(os.path.join({os.path.join(REPO, 'configs')!r}, f)))\n")
    r = _run(python, ["-c", probe], user_folder, subprocess_env)
    assert r.returncode == 0, r.stderr[-3000:]
    file, spec = r.stdout.split()[:2]
    assert file.startswith(env_dir + os.sep)
    assert file.endswith(os.path.join("mio_jax", "__init__.py"))
    assert spec == "None"

    r = _run(python, ["-m", "mio_jax.main", "--config=my_experiment.py", "--workdir=run"],
             user_folder, subprocess_env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "done:" in r.stdout
    assert "  label_smoothing: 0.0" in r.stderr  # the start-of-run log shows effective values
    work = user_folder / "run"
    assert sorted(os.listdir(work / "checkpoints")) == ["1", "2"]
    rows = [json.loads(x) for x in open(work / "metrics.jsonl")]
    assert [x["step"] for x in rows if x["split"] == "train"] == [1, 2]
    loss = json.load(open(work / "config.json"))["loss"]
    assert (loss["name"], loss["beta"]) == ("dpo", 0.05)
    assert (loss["label_smoothing"], loss["f_divergence_type"],
            loss["f_alpha_divergence_coef"]) == (0.0, "reverse_kl", 0.5)  # dpo's defaults
    assert all(loss[k] is None for k in ("simpo_gamma", "rpo_alpha", "delta", "discopop_tau"))


def test_mistyped_key_in_the_experiment_file_fails_in_one_line(installed, user_folder,
                                                               subprocess_env):
    python, _ = installed
    r = _run(python, ["-m", "mio_jax.main", "--config=my_experiment.py:typo", "--workdir=run"],
             user_folder, subprocess_env)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "unknown config key 'train.stpes'" in errors[0], r.stderr[-3000:]
    assert not (user_folder / "run").exists()


def test_console_commands_are_installed_and_resolve():
    """The main commands are console entry points of the installed package, each naming a
    function that exists (python -m mio_jax.X keeps working beside them)."""
    from importlib import metadata

    scripts = {e.name: e for e in metadata.entry_points(group="console_scripts")
               if e.value.startswith("mio_jax.")}
    assert set(scripts) == {"mio-train", "mio-convert", "mio-evaluate", "mio-pairs", "mio-plot",
                            "mio-inspect-data"}
    for name, entry in scripts.items():
        assert callable(entry.load()), name
