"""`cola dvc-commit`: record what Snakemake built in dvc.lock without disturbing Snakemake.

dvc.lock may only vouch for what Snakemake vouches for: a stage is committed when `snakemake
--summary` plans no update for any of its outputs (built from the current params, inputs and
code). After a partial run (`--until`, a failed job elsewhere) the other stages keep their old
lock entries, so `dvc status` still reports them changed.

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

from cola_audio import sync

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


def up_to_date_outputs(summary: str) -> set[str]:
    """Pure: outputs `snakemake --summary` (tab-separated, header row) plans no update for."""
    return {out for out, plan in sync.summary_plans(summary).items() if plan == "no update"}


def vouched_stages(stage_outs: dict[str, list[str]], up_to_date: set[str]) -> list[str]:
    """Pure: DVC stages every output of which Snakemake holds up to date."""
    return sorted(s for s, outs in stage_outs.items() if outs and set(outs) <= up_to_date)


def run(repo: Path = Path(".")) -> int:
    """Commit the stages Snakemake vouches for. When this Snakemake started in sync with DVC
    (`cola sync-dvc`), also stamp the state: both tools agree on it, so the next start has
    nothing to take in from DVC."""
    dag = sync.pipeline(repo)
    summary = sync.snakemake_report(repo, "--summary").stdout
    stages = vouched_stages(dag.outs, up_to_date_outputs(summary))
    skipped = sorted(set(dag.outs) - set(stages))
    if skipped:
        log.info("not committed (Snakemake plans an update or has not built them): %s", skipped)
    if stages:
        commit(repo, stages, dag.outs)
    if os.environ.get(sync.SYNCED) == "1":
        sync.write_stamp(repo, dag.paths())
    return len(stages)


def commit(repo: Path, stages: list[str], stage_outs: dict[str, list[str]]) -> None:
    outs = sorted({Path(repo) / o for s in stages for o in stage_outs[s]})
    times = snapshot(outs)
    try:
        subprocess.run(["dvc", "commit", "--force", "--quiet", *stages], cwd=repo, check=True)
    finally:  # even a failed commit may have relinked outputs from the cache
        restore(times)
    log.info("dvc.lock updated for %d stages; %d output mtimes kept", len(stages), len(times))
