"""Errors meant for people, not tracebacks.

Anything a user can fix (a recipe typo, a missing file, a malformed row, a
peer that died) raises a subclass of :class:`UserError`. The CLI prints its
message as one line and exits with :attr:`UserError.exit_code`.
"""

import reprlib


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""

    exit_code = 2


class ConfigError(UserError):
    """The recipe or a command-line override is invalid."""


class DataError(UserError):
    """A dataset is missing, malformed, or too small."""


class ModelError(UserError):
    """A model or checkpoint cannot be loaded or does not fit the recipe."""


class CheckpointError(UserError):
    """A checkpoint cannot be written or read."""


class DistributedError(UserError):
    """Ranks disagree, a peer was lost, or a collective stalled.

    ``blamed`` lists the ranks that did not answer, where this rank knows them
    (a restart may leave their hosts out: ``trainer.cluster.elastic``);
    ``final`` says a restart would meet the same error (ranks that disagree);
    ``consequence`` says this rank only saw another's failure (whose own record
    of the cause then wins in ``status.json``).
    """

    exit_code = 3

    def __init__(self, message: str, blamed: tuple = (), final: bool = False, consequence: bool = False):
        super().__init__(message)
        self.blamed = tuple(blamed)
        self.final = final
        self.consequence = consequence


class Stopped(UserError):
    """A signal stopped the run before there was anything to save; exits ``128 + signal``."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def short(value, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, nested values elided: safe to put in a message.

    A recipe value can be huge (a long list, aliases expanded); an error
    line must stay one readable line.
    """
    r = reprlib.Repr()
    r.maxstring = r.maxother = limit
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 6
    r.maxlevel = 3
    text = r.repr(value)
    return text if len(text) <= limit + 20 else text[:limit] + "..."
