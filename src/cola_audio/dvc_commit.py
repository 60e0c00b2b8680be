"""`cola dvc-commit`: record in dvc.lock what was built, and only what was built, without
disturbing Snakemake.

dvc.lock may only vouch for outputs built from the params, code and inputs DVC sees now. Every job
records what it was built from (buildrecord.py); a stage DVC reports changed is committed only
when its record matches DVC's view of it: the values of its declared params, and the state of each
dependency (code included) and output. So Snakemake's own view of what is up to date is not
trusted here: a stage it skipped (`--until`, a failed job elsewhere, `--touch`, `--rerun-triggers
mtime`) keeps its old lock entry, `dvc status` still reports it changed, and DVC's run cache gets
no entry pairing those params with outputs built from others.

Committing moves outputs into the cache and copies them back where the file system cannot
reflink, which gives them new mtimes; Snakemake would then see "updated input files" and rebuild.
So each stage's output mtimes are put back after its commit (contents untouched, so the hashes DVC
just recorded stay valid).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from cola_audio import buildrecord, sync
from cola_audio.stages import RAW_SUMS, lookup, unwatched_by_dvc

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


def dvc_view(stage: Any, params: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """(declared params with today's values, dependency paths, output paths) of a DVC stage."""
    from dvc.dependency.param import ParamsDependency

    keys = [k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params or []]
    deps = [d.def_path for d in stage.deps if not isinstance(d, ParamsDependency)]
    return {k: lookup(params, k) for k in keys}, deps, [o.def_path for o in stage.outs]


def unvouched_audio() -> str:
    """Why a stage reading data/raw is not committed while download's entry is left as it was:
    its dependency is data/raw.sha1sums, which vouches for the audio only as download wrote it
    (data/raw edited by hand, and a job read it before download reran)."""
    return (
        f"data/raw differs from download's entry in dvc.lock, so {RAW_SUMS} does not describe "
        "the audio it read; rerun download (`dvc repro download`, `snakemake --forcerun "
        "download`), then this stage"
    )


def run(repo: Path = Path(".")) -> int:
    """Commit every changed stage whose build record matches DVC's view, upstream first. When
    this Snakemake started in sync with DVC (`cola sync-dvc`), also stamp the state: both tools
    agree on it, so the next start has nothing to take in from DVC."""
    from dvc.repo import Repo, lock_repo

    repo = Path(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    committed, kept = [], []
    left_changed: set[str] = set()  # changed stages whose old entries stay
    unwatched = unwatched_by_dvc(params)
    with Repo(str(repo)) as dvc_repo, lock_repo(dvc_repo):
        dag = sync.Pipeline(dvc_repo)
        for stage in dag.stages:
            if not stage.status().get(stage.addressing):
                continue
            values, deps, outs = dvc_view(stage, params)
            why = buildrecord.mismatch(stage.name, values, deps, outs, repo)
            if why is None and RAW_SUMS in deps and "download" in left_changed:
                why = unvouched_audio()
            if why is not None:
                kept.append(f"{stage.name} ({why})")
                left_changed.add(stage.addressing)
                continue
            times = snapshot([repo / o for o in outs])
            # DVC's run cache keys a run by its deps; a folder source's audio is none of them
            run_cache = stage.name not in unwatched
            try:
                stage.save(run_cache=run_cache)
                stage.commit()
                stage.dump(update_pipeline=False)
            finally:  # even a failed commit may have relinked outputs from the cache
                restore(times)
            committed.append(stage.name)
    if kept:
        log.info("not committed, dvc.lock keeps their old entries: %s", "; ".join(kept))
    log.info("dvc.lock updated for %d stages: %s", len(committed), ", ".join(committed) or "-")
    if os.environ.get(sync.SYNCED) == "1":
        sync.write_stamp(repo, dag.paths())
    return len(committed)
