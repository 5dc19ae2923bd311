"""Errors a user can act on.

Every error raised for a user mistake or an environment problem is an `ItscaleError` whose
message names what was wrong and, where there is one, the command that fixes it. The CLI
prints the message on one line and exits with `exit_code`; it never shows a traceback for
these.
"""

from __future__ import annotations


class ItscaleError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(ItscaleError, ValueError):
    """Bad input: an empty problem, a budget below 1, an unknown name. CLI exit code 2."""

    exit_code = 2


class ModelNotAvailable(ItscaleError):
    """A named model's package is missing, or its file is truncated or corrupted."""


class BackendError(ItscaleError):
    """A language-model server was unreachable, answered with an error or with bad JSON."""


class BackendTimeout(BackendError):
    """A language-model server did not answer in time (after retries)."""


class RewardError(ItscaleError):
    """A reward failed more often than the run allows."""


class Terminated(KeyboardInterrupt):
    """SIGTERM during an evaluation: stops it as Ctrl-C does. CLI exit code 143 (128 + 15)."""

    exit_code = 143
