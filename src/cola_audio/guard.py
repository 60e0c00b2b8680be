"""One real Snakemake run per checkout, and DVC kept off its outputs while it runs.

Measured before: `dvc repro` started while a Snakemake run worked in the same checkout deleted and
rebuilt data/raw under the running jobs (42 "missing file" skips, a failed gather, a failed commit
hook), and a second `snakemake` beside a running one ended on Snakemake's advice to use
`--rerun-incomplete`, which would rebuild the first run's outputs under it. So a real run

1. holds `.cola/snakemake.lock` (an flock, with its pid and command) from before planning to its
   exit: a second real run stops before planning, with one line naming the first (dry runs only
   read, and stay free);
2. once its DVC sync is done, enters every pipeline output in DVC's own path lock
   (`.dvc/tmp/rwlock`, which `dvc repro`, `checkout`, `commit`, `status` and `pull` consult) as
   written by it: DVC then refuses with "'data/raw' is busy, it is being blocked by: (PID n):
   snakemake …" instead of deleting anything. The entries go before the commit hook runs (it is
   a DVC command too); if Snakemake dies, DVC drops them itself (the pid is gone).

Conversely a run started while a DVC command holds the repository stops before its first job.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from cola_audio.errors import InputError

RUN_LOCK = Path(".cola/snakemake.lock")
_held: list[IO[str]] = []  # the open lock file: closing it (or exiting) releases the flock


class Busy(InputError, RuntimeError):
    """Another run or a DVC command works in this checkout; the message says which, and what
    to do."""


def hold_checkout(lock: Path = RUN_LOCK) -> None:
    """Take the checkout for this process's lifetime, or raise Busy naming the holder."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock, "a+")  # noqa: SIM115 (held open until the process exits)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "pid unknown"
        fh.close()
        raise Busy(
            f"another Snakemake run works in this checkout ({holder}); wait for it to finish or "
            "stop it (Ctrl-C), then rerun. Do not --unlock or --rerun-incomplete meanwhile: "
            "that would rebuild its outputs under its running jobs"
        ) from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}: {' '.join(sys.argv)}")
    fh.flush()
    _held.append(fh)


def keep_dvc_off(outputs: Iterable[str], repo: Path = Path(".")) -> Callable[[], None]:
    """Enter `outputs` in DVC's path lock as written by this process; return the release."""
    from dvc.lock import LockError
    from dvc.repo import Repo
    from dvc.rwlock import rwlock

    dvc_repo = Repo(str(repo))
    paths = [os.path.abspath(repo / path) for path in outputs]
    held = contextlib.ExitStack()
    try:
        with dvc_repo.lock:  # not while a DVC command works here
            hardlink = dvc_repo.config["core"].get("hardlink_lock", False)
            cmd = " ".join(["snakemake", *sys.argv[1:]])
            held.enter_context(rwlock(dvc_repo.tmp_dir, dvc_repo.fs, cmd, [], paths, hardlink))
    except LockError as exc:
        raise Busy(
            f"a DVC command works in this checkout ({str(exc).splitlines()[0]}); wait for it to "
            "finish (or stop it), then rerun snakemake"
        ) from None
    finally:
        dvc_repo.close()

    def release() -> None:
        with contextlib.suppress(LockError):  # DVC drops a dead pid's entries by itself
            held.close()

    return release
