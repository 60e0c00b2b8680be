"""The project's own error types: bad input that a user can fix.

`cola <stage>` prints such an error without a traceback (the message names the file or param and
the fix) and exits 1, or 2 for invalid params. Every other exception is a bug, or an environment
failure worth reading in full, and keeps its traceback.
"""

from __future__ import annotations


class InputError(Exception):
    """Bad or missing input; the message names it and says what to do."""


class BadInput(InputError, ValueError):
    """A file, argument or value that is malformed or contradicts another input."""


class MissingInput(InputError, FileNotFoundError):
    """An input that is not there: usually the stage that writes it has not run."""
