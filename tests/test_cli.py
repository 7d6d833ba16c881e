"""Every ``python -m mio_jax...`` command follows one argument convention (``mio_jax.cli``):
absl flags, ``--help`` lists them, a bad flag is one ``error:`` line and exit status 2."""

import importlib
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from mio_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# each command, with one of its flags that --help must name
COMMANDS = {
    "mio_jax.main": "--workdir",
    "mio_jax.evaluate": "--num_examples",
    "mio_jax.pairs": "--num_samples",
    "mio_jax.convert": "--max_shard_size",
    "mio_jax.plot": "--rounds",
    "mio_jax.toy": "--num_pairs",
    "mio_jax.local_pod": "--num_processes",
    "mio_jax.data.inspect": "--examples",
    "mio_jax.data.build_reasoning_prefs": "--out_dir",
    "mio_jax.compare": "--baseline",
    "mio_jax.sweep": "--learning_rates",
}

# Runs commands as ``python -m`` does (runpy, as __main__), each command line in turn, in one
# process so that the imports are paid once; prints, per command line, the exit status and
# what it wrote. An exception other than SystemExit escapes: a traceback.
DRIVER = """
import contextlib, io, json, runpy, sys

def run(module, argv):
    sys.argv = [module, *argv]
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            status = 0 if e.code is None else e.code
    return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}

print(json.dumps([run(module, argv) for module, argv in json.loads(sys.argv[1])]))
"""
CASES = (["--help"], ["--no_such_flag=1"])


@pytest.fixture(scope="module")
def outcomes(subprocess_env):
    """(module, case index) -> what the command did, every command line in one process."""
    lines = [(module, case) for module in sorted(COMMANDS) for case in CASES]
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(lines)], cwd=ROOT,
                       env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.splitlines()[-1])
    return {(m, CASES.index(case)): out for (m, case), out in zip(lines, results)}


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_help_and_an_unknown_flag(module, outcomes):
    helped, unknown = outcomes[module, 0], outcomes[module, 1]
    assert helped["status"] == 0, helped
    assert COMMANDS[module] in helped["stdout"], helped["stdout"]
    assert unknown["status"] == 2, unknown
    assert "Traceback" not in unknown["stderr"], unknown["stderr"]
    errors = [x for x in unknown["stderr"].splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "no_such_flag" in errors[0], unknown["stderr"]


def test_the_commands_import_together_with_their_own_flags():
    """Importing every command into one process clashes nowhere (no DuplicateFlagError): each
    defines its flags on its own FlagValues, none on absl's global one."""
    modules = [importlib.import_module(name) for name in COMMANDS]
    for module in modules:
        assert isinstance(module.FLAGS, flags.FlagValues) and module.FLAGS is not flags.FLAGS
    for name in ("config", "workdir", "out", "seed", "model", "num_processes"):
        assert name not in flags.FLAGS, name


@pytest.fixture
def command_flags():
    fv = flags.FlagValues()
    flags.DEFINE_string("out", "", "output", flag_values=fv)
    flags.DEFINE_multi_string("task", [], "tasks", flag_values=fv)
    flags.DEFINE_bool("rounds", False, "rounds", flag_values=fv)
    flags.DEFINE_integer("seed", None, "seed", flag_values=fv, required=True)
    return fv


def test_parse_returns_the_positionals_and_starts_from_the_defaults(command_flags):
    args = cli.parse(command_flags, ["prog", "a", "--out", "o.png", "--seed=3", "--rounds", "b",
                                     "--task=x", "--task=y", "--", "--not_a_flag"], doc="Doc.")
    assert args == ["a", "b", "--not_a_flag"]
    assert (command_flags.out, command_flags.seed, command_flags.rounds,
            command_flags.task) == ("o.png", 3, True, ["x", "y"])
    assert cli.parse(command_flags, ["prog", "--seed=4", "--norounds"], doc="Doc.") == []
    assert (command_flags.out, command_flags.rounds, command_flags.task) == ("", False, [])


@pytest.mark.parametrize("argv,needle", [
    (["--out=o"], "--seed"),  # a missing required flag
    (["--seed=x"], "--seed=x"),  # an illegal value
    (["--seed=1", "--sed=2"], "'sed'"),  # an unknown flag
])
def test_a_bad_command_line_is_one_error_line(command_flags, capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        cli.parse(command_flags, ["prog", *argv], doc="Doc.")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and needle in err, err


def test_help_shows_the_summary_and_the_flags_before_checking_them(command_flags, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse(command_flags, ["prog", "--out=o", "-h"], doc="Summary line.\n\nMore text.")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Summary line.\n\nflags:\n") and "More text" not in out
    assert "--[no]rounds: rounds" in out and "--seed: seed" in out


def test_flags_from_a_dict_of_defaults_take_each_value_s_type():
    fv = flags.FlagValues()
    cli.define_from_defaults({"n": 2, "lr": 0.5, "name": "a", "on": True}, fv, "a setting")
    cli.parse(fv, ["prog", "--n=3", "--lr=1e-2", "--name=b", "--noon"], doc="Doc.")
    assert (fv.n, fv.lr, fv.name, fv.on) == (3, 0.01, "b", False)
