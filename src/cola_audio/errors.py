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
    errno.EEXIST: ("a file is in the way of a folder", "move it or choose another path"),
    errno.ENOTDIR: ("a file is in the way of a folder", "move it or choose another path"),
    errno.EISDIR: ("a folder is in the way of a file", "move it or choose another path"),
}


def environment_problem(exc: BaseException, written: object = None) -> str | None:
    """One line for an environment failure (no space, no permission, a file where a folder
    goes) naming the path, or None for any other error, which keeps its traceback. `written`:
    what the stage writes, named when the error carries no path (a write on a full disk)."""
    if not isinstance(exc, OSError) or exc.errno not in _ENVIRONMENT:
        return None
    what, fix = _ENVIRONMENT[exc.errno]
    where = exc.filename or (f"while writing {written}" if written else "(path not reported)")
    return f"{what}: {where}; {fix}"
