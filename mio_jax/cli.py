"""The one argument convention of the ``python -m mio_jax...`` commands: absl flags.

Each command defines its flags on its own ``flags.FlagValues()`` (never on absl's global
``flags.FLAGS``), so that several commands imported into one process never clash. A command
line is ``--name=value`` (or ``--name value``; a boolean also ``--name`` / ``--noname``); what
is not a flag, and everything after ``--``, are the positional arguments. ``--help`` / ``-h``
prints the command's summary and flags and exits with status 0; an unknown flag, a bad value
or a missing required flag is one ``error:`` line (``mio_jax.errors``) and exit status 2.
absl's own process-wide flags (``--verbosity``, ``--logtostderr``, grain's, orbax's) are
accepted too, as by any absl program.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Mapping, Sequence

from absl import app, flags

from mio_jax import errors

# the DEFINE of each type a dict of defaults may hold (`define_from_defaults`)
_DEFINE_BY_TYPE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer,
                   float: flags.DEFINE_float, str: flags.DEFINE_string}


def _usage(flag_values: flags.FlagValues, doc: str) -> str:
    """A command's help: the first paragraph of its docstring ``doc``, then its flags."""
    listed = flags.FlagValues()  # the flags without the modules that defined them: one list
    listed.append_flag_values(flag_values)
    return (doc.strip().split("\n\n")[0] + "\n\nflags:\n"
            + listed.get_help(prefix="  ", include_special_flags=False))


class _HelpFlag(flags.BooleanFlag):
    """``--help`` / ``-h``: prints the command's summary and flags and exits with status 0 as
    soon as it is read (so before required flags are checked)."""

    def __init__(self, flag_values: flags.FlagValues, doc: str):
        super().__init__("help", False, "show this help and exit", short_name="h")
        self.command_flags, self.doc = flag_values, doc

    def parse(self, argument) -> None:
        super().parse(argument)
        if self.value:
            print(_usage(self.command_flags, self.doc), flush=True)
            sys.exit(0)


def _shared_flags(flag_values: flags.FlagValues, doc: str) -> flags.FlagValues:
    """The flags a command line may hold besides the command's own: ``--help`` / ``-h`` and
    absl's global flags that the command does not define itself (absl's help flags, which
    describe the global flags only, give way to ours)."""
    shared = flags.FlagValues()
    shared.set_gnu_getopt(flag_values.is_gnu_getopt())
    flags.DEFINE_flag(_HelpFlag(flag_values, doc), shared)
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]  # listed under its short name as well: taken once
        if name == flag.name and name not in flag_values and not name.startswith("help"):
            shared[name] = flag
    return shared


def _one_line(error: Exception) -> str:
    """The message of a command-line error: absl's own (it names the flag), else the error's
    type and message."""
    if isinstance(error, flags.Error):
        return " ".join(str(error).split())
    return errors.describe(error)


def parse(flag_values: flags.FlagValues, argv: Sequence[str], *, doc: str,
          describe: Callable[[Exception], str] = _one_line) -> list[str]:
    """Parses a command line into a command's flags.

    Args:
      flag_values: the command's own flags; flags not given get their defaults (a second
        command line in one process starts afresh).
      argv: the command line, ``argv[0]`` the program name.
      doc: the command's module docstring (``--help`` shows its first paragraph).
      describe: the one-line message of a parse error (a config file flag runs the user's
        file while parsing, so anything it raises is one).

    Returns:
      The positional arguments (after ``--`` too), without the program name.
    """
    shared = _shared_flags(flag_values, doc)
    flag_values.unparse_flags()
    try:
        rest = shared(list(argv), known_only=True)
        # absl's global flags got their values through `shared`; app.run and grain's worker
        # processes read them
        flags.FLAGS.mark_as_parsed()
        return flag_values(rest)[1:]
    except Exception as e:  # noqa: BLE001  (see `describe`)
        errors.fail(describe(e))


def run(command: Callable[[list[str]], Any], flag_values: flags.FlagValues, doc: str,
        argv: Sequence[str] | None = None) -> Any:
    """Runs a command: ``command(positional arguments)`` once ``flag_values`` are parsed.

    Args:
      command: the command's body (it reads ``flag_values``); its return value is the exit
        status of a program.
      flag_values, doc: as for ``parse``.
      argv: the arguments after the program name, as a caller in Python (a test) gives them:
        parsed and run in this process, returning what ``command`` returns. None, for the
        ``__main__`` block and the console scripts: absl's ``app.run`` parses ``sys.argv``,
        sets up absl logging and exits with ``command``'s return value.
    """
    if argv is not None:
        return command(parse(flag_values, [sys.argv[0], *argv], doc=doc))
    app.run(command, flags_parser=lambda args: parse(flag_values, args, doc=doc))


def expect_no_arguments(args: Sequence[str]) -> None:
    """Stops a command that takes only flags when it is given positional arguments."""
    if args:
        errors.fail(f"unexpected argument(s) {' '.join(args)!r}: this command takes flags "
                    "only, --name=value (--help lists them)")


def define_from_defaults(defaults: Mapping[str, Any], flag_values: flags.FlagValues,
                         help_text: str) -> None:
    """One flag per key of ``defaults``, with the key's value as default and its type (bool,
    int, float or str)."""
    for name, value in defaults.items():
        _DEFINE_BY_TYPE[type(value)](name, value, help_text, flag_values=flag_values)
