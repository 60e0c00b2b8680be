"""Ctrl-C and SIGTERM stop a Snakemake run's jobs, not only Snakemake.

Snakemake's local executor answers SIGINT or SIGTERM sent to its own process (`kill -INT`, a
wrapper, a scheduler stopping the run) by waiting for the running jobs (`pool.shutdown`), not
stopping them: a pretraining job trained on for minutes after "Terminating processes on user
request", then wrote outputs Snakemake had already marked incomplete. The Snakefile's `onstart`
hook calls `stop_jobs_first`, so either signal first sends SIGTERM to every process below
Snakemake's (Lightning ends the batch it is in; an epoch's checkpoint stays for the resume), waits
for them, and only then lets Snakemake handle the signal as before. Linux only (/proc); elsewhere
Snakemake keeps its own behaviour.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

GRACE_S = 30.0  # for a job to end its batch and exit before it is killed


def _parents() -> dict[int, int]:
    """pid → parent pid of every process /proc shows."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # gone since the listing
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(root: int) -> list[int]:
    """Every living process below `root`, children before grandchildren."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    found, level = [], [root]
    while level:
        level = [child for pid in level for child in sorted(children.get(pid, []))]
        found += level
    return [pid for pid in found if _alive(pid)]


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent to read its exit status."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def terminate(pids: list[int], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM each process, wait up to `grace_s` for all to exit, SIGKILL the rest; return
    those that needed SIGKILL."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (left := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        _signal(pid, signal.SIGKILL)
    return left


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it exited since it was listed
        os.kill(pid, signum)


def _stop_jobs_then(previous: Any, signum: int, frame: FrameType | None) -> None:
    jobs = descendants(os.getpid())
    if jobs:
        name = signal.Signals(signum).name
        print(f"cola: {name}: stopping {len(jobs)} job process(es) first", file=sys.stderr)
        killed = terminate(jobs)
        if killed:
            print(f"cola: killed {len(killed)} that ignored SIGTERM", file=sys.stderr)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def stop_jobs_first() -> None:
    """Make SIGINT and SIGTERM stop this process's jobs before its own handlers run."""
    if not Path("/proc/self/stat").is_file():
        return
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(signum)
        signal.signal(signum, functools.partial(_stop_jobs_then, previous))
