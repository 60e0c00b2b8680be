"""The project's own error types: bad input that a user can fix.

`cola <stage>` prints such an error without a traceback (the message names the file or param and
the fix) and exits 1, or 2 for invalid params. Every other exception is a bug, or an environment
failure worth reading in full, and keeps its traceback.
"""

from __future__ import annotations

import errno


class InputError(Exception):
    """Bad or missing input; the message names it and says what to do."""


class BadInput(InputError, ValueError):
    """A file, argument or value that is malformed or contradicts another input."""


class MissingInput(InputError, FileNotFoundError):
    """An input that is not there: usually the stage that writes it has not run."""


# The machine, not the code or the input: the user reads what happened to which path and the fix.
_ENVIRONMENT = {
    errno.ENOSPC: ("no space left on device", "free space there and rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota there and rerun"),
    errno.EACCES: ("permission denied", "fix the permissions there and rerun"),
    errno.EPERM: ("operation not permitted", "fix the permissions there and rerun"),
    errno.EROFS: ("read-only file system", "run from a writable checkout"),
}


def environment_problem(exc: BaseException) -> str | None:
    """One line for an environment failure (no space, no permission) naming the path, or None
    for any other error, which keeps its traceback."""
    if not isinstance(exc, OSError) or exc.errno not in _ENVIRONMENT:
        return None
    what, fix = _ENVIRONMENT[exc.errno]
    where = exc.filename or "a file this stage writes (the path was not reported)"
    return f"{what}: {where}; {fix}"
