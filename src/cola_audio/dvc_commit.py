"""`cola dvc-commit`: record what Snakemake built in dvc.lock without disturbing Snakemake.

`dvc commit` moves outputs into the cache and copies them back (where the file system cannot
reflink), which gives every output a new mtime in arbitrary order; Snakemake would then see
"updated input files" and rebuild the pipeline on its next run. This snapshots the mtimes of every
DVC output (files and folders, recursively), commits, and puts the mtimes back. Contents are
untouched, so the hashes DVC just recorded stay valid.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def snapshot(paths: list[Path]) -> dict[Path, int]:
    """mtime (ns) of each path and, for folders, of everything inside."""
    times: dict[Path, int] = {}
    for root in paths:
        if not root.exists():
            continue
        times[root] = root.stat().st_mtime_ns
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                for name in dirnames + filenames:
                    path = Path(dirpath) / name
                    times[path] = path.stat().st_mtime_ns
    return times


def restore(times: dict[Path, int]) -> None:
    # Deepest first: restoring a file's mtime does not touch its folder, but do folders last anyway.
    for path in sorted(times, key=lambda p: len(p.parts), reverse=True):
        if path.exists():
            os.utime(path, ns=(times[path], times[path]), follow_symlinks=False)


def run(repo: Path = Path(".")) -> int:
    from cola_audio.adopt import dvc_stage_outs

    outs = sorted(
        {Path(repo) / o for paths in dvc_stage_outs(repo, persist=True).values() for o in paths}
    )
    times = snapshot(outs)
    subprocess.run(["dvc", "commit", "--force", "--quiet"], cwd=repo, check=True)
    restore(times)
    log.info("dvc.lock updated; %d output mtimes kept for Snakemake", len(times))
    return len(times)
