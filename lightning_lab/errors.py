"""The lab's one error convention, and the checks every command runs on its paths before any work.

A mistake in what the user gave (a missing or corrupt file, a bad flag or config value, an unknown
device) is a `UserError`: `lab` prints it as one line, ``lab <command>: error: <what>, <where>``, on
stderr and exits with status 2. Anything else is a bug and keeps its traceback. ``lab --debug ...``
(or ``--debug`` anywhere in a command's arguments) shows the traceback for user errors too.

Raise it from anywhere below the CLI; the message says what is wrong and where (file:line, the flag
or the config key), so it reads on its own after the ``lab <command>: error:`` prefix. Commands
parse their flags with `ArgumentParser` below (argparse's own usage errors become UserErrors too)
and check their paths with the ``check_*`` functions first, so a typo costs seconds, not a model load.
Commands parsed by jsonargparse (stages through LightningCLI, loops) read their ``--config`` files
with `check_config_files` first and raise `jsonargparse_message(error)` as the UserError.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user: reported as one line and exit status 2 by `lightning_lab.cli.main`."""


class DataError(UserError, ValueError):
    """A data, config or model file is missing, unreadable or malformed; the message names the file (and line)."""


class ConfigError(UserError, ValueError):
    """A flag or config value of the wrong kind or out of range; the message names the key."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (a missing flag, a bad choice, a value of the wrong type) are UserErrors,
    so `lab` prints them as its one line rather than argparse's usage block."""

    def error(self, message: str):
        raise UserError(message)


def check_input_file(path: str | os.PathLike, flag: str = "") -> Path:
    """`path` (given as `flag`, if it came from one) is an existing, readable file."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise DataError(f"{where}: is a directory, expected a file")
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{where}: not readable (permission denied)")
    return path


def check_input_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` (given as `flag`) is an existing, readable directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, expected a directory")
    if not path.is_dir():
        raise UserError(f"{flag} {path}: no such directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"{flag} {path}: not readable (permission denied)")
    return path


def _check_creatable(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` is a directory this process may write in."""
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: cannot be created, {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot be created, {ancestor} is not writable (permission denied)")


def check_new_output_file(path: str | os.PathLike, flag: str) -> Path:
    """`path` (given as `flag`) does not exist yet and can be created: nothing already written is overwritten."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory, expected a file name")
    if path.exists():
        raise UserError(f"{flag} {path}: already exists (nothing is overwritten; remove it or choose another name)")
    _check_creatable(path, flag)
    return path


def check_new_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` (given as `flag`) is a directory that can be created, or an empty one: nothing is overwritten."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, expected a directory")
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"{flag} {path}: already exists and is not empty (nothing is overwritten; "
                        "choose a new directory)")
    _check_creatable(path / "_", flag)
    return path


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """`path` (given as `flag`) is a directory this process can write in, or one it can create."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, expected a directory")
    _check_creatable(path / "_", flag)
    return path


def config_files(argv: list[str]) -> list[str]:
    """Every `--config FILE` (or `--config=FILE`) in argv, in order."""
    files = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
    return files + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]


def check_config_files(argv: list[str]) -> None:
    """Read every `--config FILE` in argv: a missing or malformed one is named with its line (jsonargparse,
    which reads them later, would say ``<unicode string>``)."""
    from lightning_lab.data.io import read_yaml_or_json  # here, not at the top: data.io imports this module

    for path in config_files(argv):
        check_input_file(path, "--config")
        read_yaml_or_json(path)


def jsonargparse_message(error: Exception, argv: list[str]) -> str:
    """A jsonargparse error in the lab's words: the flag as typed (`--model.lr`), an unknown key with the config
    file it came from, plain type names, and for a value that fits none of a union's types, the value and the
    choices rather than every type's error."""
    message = re.sub(r'Parser key "([^"]+)"', r"--\1", str(error))
    message = re.sub(r"Subcommand '\w+' does not accept option '([^']+)'",
                     rf"unknown key '\1' in --config {' '.join(config_files(argv))}", message)
    message = re.sub(r"<class '([\w.]+)'>", r"\1", message)
    union = re.search(r"Does not validate against any of the Union subtypes(.*)Given value: (.*)$", message, re.S)
    if union:
        choices = ", ".join(re.findall(r"Literal\[([^\]]*)\]", union.group(1).split("Errors:")[0]))
        expected = f" (expected one of {choices})" if choices else ""
        message = f"{message[:union.start()]}invalid value {union.group(2).strip()}{expected}"
    return " ".join(message.split())
