"""The lab's one error convention.

A mistake in what the user gave (a missing or corrupt file, a bad flag or config value, an unknown
device) is a `UserError`: `lab` prints it as one line, ``lab <command>: error: <what>, <where>``, on
stderr and exits with status 2. Anything else is a bug and keeps its traceback. ``lab --debug ...``
(or ``--debug`` anywhere in a command's arguments) shows the traceback for user errors too.

Raise it from anywhere below the CLI; the message says what is wrong and where (file:line, the flag
or the config key), so it reads on its own after the ``lab <command>: error:`` prefix.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: reported as one line and exit status 2 by `lightning_lab.cli.main`."""


EXIT_USER_ERROR = 2
