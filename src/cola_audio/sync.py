"""`cola sync-dvc`: before Snakemake plans, take in what DVC did since Snakemake last looked.

Snakemake and DVC keep separate records of what is up to date (`.snakemake/` metadata and mtimes,
`dvc.lock` hashes). After every Snakemake run `cola dvc-commit` records in dvc.lock the stages
whose jobs' build records match DVC's view (buildrecord.py). This module is the other direction,
run by Snakemake before it plans the jobs of a real run (the first input function Snakemake
calls, workflow/rules/common.smk); a dry run (`-n`, `--summary`, `--report`, ...) changes no
output, dvc.lock or metadata and only says that a real run would sync first:

1. **Restore.** A stage DVC reports changed is checked out from DVC's cache when its current
   code, inputs and params match a run DVC has recorded (its run cache, filled by `dvc repro`,
   `dvc exp run` and `cola dvc-commit`) and each of its outputs is missing or still what dvc.lock
   records (so nothing unsaved is overwritten). That is what `dvc repro` does for such a stage;
   here nothing else runs, so going back to earlier params retrains nothing in either tool.
2. **Adopt.** A stage DVC now reports up to date, but which Snakemake would rebuild (`snakemake
   --summary`) or has no metadata for (`snakemake -n`), gets its outputs touched with Snakemake's
   metadata rewritten (`snakemake --touch --forcerun`, in DAG order), and so does every up-to-date
   stage after it (a touched output makes everything downstream look stale). After `dvc repro`,
   `dvc exp run`, `dvc pull` or a restore, Snakemake trusts what DVC verified from hashes, and a
   later edit of any param still reruns what depends on it (touch without --forcerun skips jobs
   whose outputs look newer than their inputs and leaves them without metadata). Outputs
   Snakemake already holds up to date keep their mtimes, so work it finished is never redone.
   Jobs reading files outside the repository (download with `data.source: folder`, task_data of
   a folder task) are never restored or adopted: only Snakemake sees those files (a fingerprint
   param), DVC does not (stages.unwatched_by_dvc).

In one sentence: after a sync, Snakemake treats as done exactly the stages whose outputs DVC has
verified against their current code, inputs and params.

The whole sync is skipped (in milliseconds) when dvc.yaml, dvc.lock, params.yaml and the mtimes of
every stage's dependencies and outputs are as the last sync or commit left them (a fingerprint in
.snakemake/); adopt runs only when dvc.lock or a file changed, not after a mere param edit. A
sync that cannot run (DVC busy in `dvc repro`, a failed nested call) says so and lets Snakemake go
on with its own records; the fingerprint is then not refreshed, so the next start tries again.
`COLA_DVC_SYNC=off` turns it off; nested Snakemake calls made from here set it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from cola_audio import digest, fsutil


def say(message: str) -> None:
    """Shown at a Snakemake start too, where no logging is configured."""
    print(f"cola sync-dvc: {message}", file=sys.stderr, flush=True)


STAMP = Path(".snakemake") / "cola-dvc-sync.json"
NESTED = {**os.environ, "COLA_DVC_SYNC": "off"}  # a Snakemake started from here must not sync
SYNCED = "COLA_DVC_SYNCED"  # set for this Snakemake process once it started in sync with DVC
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def fingerprints(repo: Path, paths: list[str]) -> dict[str, str]:
    """What DVC can see, hashed in two parts: `plan` (dvc.yaml, params.yaml) and `state`
    (dvc.lock and the mtime and size of each stage's dependencies and outputs)."""

    def content(name: str) -> str | None:
        path = repo / name
        return digest.file_digest(path) if path.is_file() else None

    def stat(rel: str) -> list[int] | None:
        try:
            st = (repo / rel).stat()
        except FileNotFoundError:
            return None
        return [st.st_mtime_ns, st.st_size]

    plan = {name: content(name) for name in ("dvc.yaml", "params.yaml")}
    state = {"dvc.lock": content("dvc.lock"), "paths": {rel: stat(rel) for rel in sorted(paths)}}
    return {"plan": digest.json_digest(plan), "state": digest.json_digest(state)}


def read_stamp(repo: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((repo / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and isinstance(stamp.get("paths"), list) else None


def write_stamp(repo: Path, paths: list[str]) -> None:
    """Record what DVC's files, inputs and outputs look like now that both tools agree on them."""
    (repo / STAMP).parent.mkdir(exist_ok=True)
    fsutil.write_json(repo / STAMP, {"paths": sorted(paths), **fingerprints(repo, paths)})


def needed(repo: Path) -> str | None:
    """Why a sync is needed ("first", "plan", "state"), or None: the cheap test run at every
    Snakemake start."""
    stamp = read_stamp(repo)
    if stamp is None:
        return "first"
    now = fingerprints(repo, stamp["paths"])
    if now["state"] != stamp.get("state"):
        return "state"
    return "plan" if now["plan"] != stamp.get("plan") else None


SWITCHED_OFF, NO_DVC = "COLA_DVC_SYNC=off", "no DVC pipeline here"  # nothing to say at a start


def blocked(repo: Path) -> str | None:
    """Why no sync may run here now, or None."""
    if os.environ.get("COLA_DVC_SYNC") == "off":
        return SWITCHED_OFF
    if not (repo / ".dvc").is_dir() or not (repo / "dvc.lock").is_file():
        return NO_DVC
    if any((repo / ".snakemake" / "locks").glob("*")):
        return "another Snakemake holds this folder (if none runs: `snakemake --unlock`)"
    return None


def before_planning(unwatched: set[str], real_run: bool, repo: Path = Path(".")) -> None:
    """The Snakefile's hook: sync when DVC is in use here and something changed since last time,
    in a real run only. `unwatched` are the jobs DVC cannot vouch for (stages.unwatched_by_dvc of
    the config Snakemake already read and validated)."""
    repo = Path(repo)
    why_not = blocked(repo)
    if why_not is not None:
        if why_not not in (SWITCHED_OFF, NO_DVC):
            say(f"skipped: {why_not}")
        return
    reason = needed(repo)
    if reason is not None and not real_run:
        say(
            "DVC's records changed since the two tools last agreed; this dry run changes "
            "nothing, so it may list jobs that a real run restores from DVC's cache or adopts "
            "from DVC instead of running (`snakemake` or `cola sync-dvc` syncs first)"
        )
        return
    if reason is not None:
        from dvc.lock import LockError

        try:
            run(unwatched, repo, adopt_rules=reason != "plan")
        except (LockError, subprocess.CalledProcessError) as exc:
            say(
                f"skipped ({exc}); Snakemake goes on with its own records and the next start "
                "tries again (COLA_DVC_SYNC=off silences this)"
            )
            return
    os.environ[SYNCED] = "1"  # cola dvc-commit may now stamp: nothing DVC did went unseen


class Pipeline:
    """DVC's stages as plain data: outputs, dependency paths, and who depends on whom."""

    def __init__(self, dvc_repo: Any) -> None:
        import networkx as nx
        from dvc.dependency.param import ParamsDependency

        graph = dvc_repo.index.graph  # edges run from a stage to the stages it depends on
        self.stages = [s for s in reversed(list(nx.topological_sort(graph))) if s.cmd]
        self.outs = {s.addressing: [o.def_path for o in s.outs] for s in self.stages}
        self.deps = {
            s.addressing: [d.def_path for d in s.deps if not isinstance(d, ParamsDependency)]
            for s in self.stages
        }
        self.dependents = {
            s.addressing: {d.addressing for d in nx.ancestors(graph, s)} for s in self.stages
        }

    def paths(self) -> list[str]:
        return sorted({p for table in (self.outs, self.deps) for ps in table.values() for p in ps})


def pipeline(repo: Path) -> Pipeline:
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return Pipeline(dvc_repo)


def restorable(status: list[Any]) -> bool:
    """Pure: a changed stage (its `Stage.status()` entries) that DVC may check out from its run
    cache: every input exists, and each output is missing or unmodified (so in DVC's cache
    already: nothing unsaved is overwritten)."""
    changes: dict[str, dict[str, Any]] = {"changed deps": {}, "changed outs": {}}
    for entry in status:
        if isinstance(entry, dict):
            for kind in changes:
                changes[kind].update(entry.get(kind, {}))
    outs_ok = all(state == "deleted" for state in changes["changed outs"].values())
    return outs_ok and "deleted" not in changes["changed deps"].values()


def in_run_cache(dvc_repo: Any, stage: Any) -> bool:
    """Whether DVC's cache holds a run of `stage` with its current code, inputs and params: what
    `dvc repro` would check out instead of running (StageCache.restore's lookup, without the
    checkout). It hashes the current inputs into `stage`; restore from a freshly loaded copy,
    since StageCache.restore tells what changed from the hashes dvc.lock gave the stage."""
    from dvc.stage.cache import _can_hash

    if not _can_hash(stage):
        return False
    if not stage.changed_stage() and stage.deps_cached() and all(o.hash_info for o in stage.outs):
        return bool(stage.outs_cached())  # only outputs are missing: dvc.lock's own run
    stage.save_deps()
    cache = dvc_repo.stage_cache._load(stage)
    if not cache:
        return False
    return bool(dvc_repo.stage_cache._create_stage(cache, wdir=stage.wdir).outs_cached())


def restore_from_cache(repo: Path, skip: set[str]) -> tuple[list[str], set[str], Pipeline]:
    """Check out every restorable changed stage (but those in `skip`) whose current inputs DVC's
    run cache knows, dependencies first so a restored stage makes its dependents' inputs current,
    and record it in dvc.lock. Returns (restored stages, stages still changed, the pipeline)."""
    from dvc.repo import Repo, lock_repo
    from dvc.stage.cache import RunCacheNotFoundError

    restored, changed = [], set()
    with Repo(str(repo)) as dvc_repo, lock_repo(dvc_repo):
        dag = Pipeline(dvc_repo)
        for stage in dag.stages:
            status = stage.status().get(stage.addressing)
            if not status:
                continue
            if (
                stage.addressing not in skip
                and restorable(status)
                and in_run_cache(dvc_repo, stage)
            ):
                # As `dvc repro` does: clear the outputs (all in DVC's cache), then check out
                # the cached run's; a checkout that fails leaves them missing, never old.
                fresh = dvc_repo.stage.load_one(stage.path, stage.name)
                fresh.remove_outs(ignore_remove=False, force=False)
                with contextlib.suppress(RunCacheNotFoundError):
                    dvc_repo.stage_cache.restore(fresh)
                    if all(out.exists for out in fresh.outs):
                        fresh.save()
                        fresh.commit()
                        fresh.dump(update_pipeline=False)
                        restored.append(stage.addressing)
                        continue
            changed.add(stage.addressing)
    return restored, changed, dag


def snakemake_report(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A read-only Snakemake call (`--summary`, `-n`) on `repo`, which must not sync in turn."""
    return subprocess.run(
        [*SNAKEMAKE, *args, "--nolock", "--cores", "1"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
        env=NESTED,
    )


def summary_plans(summary: str) -> dict[str, str]:
    """Pure: each output `snakemake --summary` lists (tab-separated, header row) → its plan."""
    rows = [line.split("\t") for line in summary.splitlines() if line.strip()]
    if not rows:
        return {}
    plan = rows[0].index("plan")
    return {row[0]: row[plan] for row in rows[1:] if len(row) > plan}


def snakemake_view(repo: Path) -> tuple[set[str], set[str]]:
    """(outputs Snakemake plans to update, rules with missing metadata), from its own reports."""
    plans = summary_plans(snakemake_report(repo, "--summary").stdout)
    stale = {out for out, plan in plans.items() if plan != "no update"}
    dry = snakemake_report(repo, "-n")
    found = re.search(r"^Rules with missing metadata: (.+)$", dry.stdout + dry.stderr, re.M)
    return stale, set(found.group(1).split()) if found else set()


def to_adopt(
    dag_outs: dict[str, list[str]],
    dependents: dict[str, set[str]],
    changed: set[str],
    stale: set[str],
    unrecorded_rules: set[str],
) -> list[str]:
    """Pure: the stages Snakemake should record as done. Up to date in DVC (not in `changed`),
    and stale for Snakemake or without its metadata, or downstream of such a stage."""
    clean = {s for s in dag_outs if s not in changed}
    seeds = {s for s in clean if set(dag_outs[s]) & stale or s.split("@")[0] in unrecorded_rules}
    chosen = set(seeds)
    for s in seeds:
        chosen |= dependents.get(s, set()) & clean
    return sorted(chosen)


def adopt(repo: Path, dag: Pipeline, changed: set[str]) -> list[str]:
    """Touch, with Snakemake's metadata, the outputs of the stages `to_adopt` picks."""
    stale, unrecorded = snakemake_view(repo)
    stages = to_adopt(dag.outs, dag.dependents, changed, stale, unrecorded)
    files = [f for s in stages for f in dag.outs[s] if (repo / f).exists()]
    if not files:
        return []
    rules = sorted({s.split("@")[0] for s in stages})
    say(f"Snakemake adopts what DVC verified: {', '.join(stages)}")
    cmd = [*SNAKEMAKE, "--touch", "--no-hooks", "--cores", "1", "--quiet"]
    cmd += ["--forcerun", *rules, "--allowed-rules", *rules, "--", *files]
    subprocess.run(cmd, cwd=repo, check=True, env=NESTED)
    return files


def run(unwatched: set[str], repo: Path = Path("."), adopt_rules: bool = True) -> dict[str, Any]:
    """Restore, then adopt (unless only params.yaml or dvc.yaml changed and nothing was
    restored: Snakemake's records are then still its own), then stamp; never the `unwatched`
    jobs."""
    repo = Path(repo)
    skip = set(unwatched)
    restored, changed, dag = restore_from_cache(repo, skip)
    if restored:
        say(f"restored from DVC's cache, nothing retrained: {', '.join(restored)}")
    adopted = adopt(repo, dag, changed | skip) if adopt_rules or restored else []
    write_stamp(repo, dag.paths())
    return {"restored": restored, "changed": sorted(changed), "adopted": adopted}
