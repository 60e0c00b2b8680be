"""`cola sync-dvc`: before Snakemake plans, take in what DVC did since Snakemake last looked.

Snakemake and DVC keep separate records of what is up to date (`.snakemake/` metadata and mtimes,
`dvc.lock` hashes). After every Snakemake run `cola dvc-commit` copies Snakemake's view into
dvc.lock (only for stages Snakemake holds up to date). This module is the other direction, run by
the Snakefile each time Snakemake starts (workflow/rules/common.smk), dry runs included:

1. **Restore.** A stage DVC reports changed is checked out from DVC's cache when its current
   code, inputs and params match a run DVC has recorded (its run cache, filled by `dvc repro`,
   `dvc exp run` and `cola dvc-commit`) and each of its outputs is missing or still what dvc.lock
   records (so nothing unsaved is overwritten). That is what `dvc repro` does for such a stage;
   here nothing else runs, so going back to earlier params retrains nothing in either tool.
2. **Adopt.** Every rule all of whose stages DVC now reports up to date gets Snakemake's metadata
   rewritten (`snakemake --touch --forcerun`, in DAG order): after `dvc repro`, `dvc exp run`,
   `dvc pull` or a restore, Snakemake trusts what DVC verified from hashes, and a later edit of
   any param still reruns what depends on it (touch alone skips jobs whose outputs look newer
   than their inputs and leaves them without metadata).

In one sentence: after a sync, Snakemake treats as done exactly the stages whose outputs DVC has
verified against their current code, inputs and params.

The whole sync is skipped (in milliseconds) when dvc.yaml, dvc.lock, params.yaml and the outputs'
mtimes are as the last sync or commit left them (a fingerprint in .snakemake/); adopt runs only
when dvc.lock or an output changed outside Snakemake, not after a mere param edit.
`COLA_DVC_SYNC=off` turns it off; nested Snakemake calls made from here set it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cola_audio import fsutil


def say(message: str) -> None:
    """Shown at a Snakemake start too, where no logging is configured."""
    print(f"cola sync-dvc: {message}", file=sys.stderr, flush=True)


STAMP = Path(".snakemake") / "cola-dvc-sync.json"
NESTED = {**os.environ, "COLA_DVC_SYNC": "off"}  # a Snakemake started from here must not sync


def fingerprints(repo: Path, outs: list[str]) -> dict[str, str]:
    """What DVC can see, hashed in two parts: `plan` (dvc.yaml, params.yaml) and `state`
    (dvc.lock and each output's mtime and size)."""
    plan, state = hashlib.sha256(), hashlib.sha256()
    for name, digest in (("dvc.yaml", plan), ("params.yaml", plan), ("dvc.lock", state)):
        path = repo / name
        digest.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"-"))
    for out in sorted(outs):
        try:
            st = (repo / out).stat()
            state.update(f"{out}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
        except FileNotFoundError:
            state.update(f"{out}\0missing\n".encode())
    return {"plan": plan.hexdigest(), "state": state.hexdigest()}


def read_stamp(repo: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((repo / STAMP).read_text())
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and isinstance(stamp.get("outs"), list) else None


def write_stamp(repo: Path, outs: list[str]) -> None:
    """Record what DVC's files and outputs look like now that both tools agree on them."""
    (repo / STAMP).parent.mkdir(exist_ok=True)
    fsutil.write_json(repo / STAMP, {"outs": sorted(outs), **fingerprints(repo, outs)})


def needed(repo: Path) -> str | None:
    """Why a sync is needed ("first", "plan", "state"), or None: the cheap test run at every
    Snakemake start."""
    stamp = read_stamp(repo)
    if stamp is None:
        return "first"
    now = fingerprints(repo, stamp["outs"])
    if now["state"] != stamp.get("state"):
        return "state"
    return "plan" if now["plan"] != stamp.get("plan") else None


def at_snakemake_start(repo: Path = Path(".")) -> None:
    """The Snakefile's hook: sync when DVC is in use here and something changed since last time."""
    repo = Path(repo)
    if os.environ.get("COLA_DVC_SYNC") == "off" or not (repo / "dvc.lock").is_file():
        return
    if not (repo / ".dvc").is_dir():
        return
    if any((repo / ".snakemake" / "locks").glob("*")):
        say("skipped: another Snakemake holds this folder (if none runs: `snakemake --unlock`)")
        return
    reason = needed(repo)
    if reason is not None:
        run(repo, adopt_rules=reason != "plan")


def stage_outs(repo: Path) -> dict[str, list[str]]:
    """Each dvc.yaml stage's output paths."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return {s.addressing: [o.def_path for o in s.outs] for s in dvc_repo.index.stages}


def restorable(status: list[Any]) -> bool:
    """Pure: a changed stage (its `Stage.status()` entries) whose outputs DVC may check out from
    its cache: each output is missing or unmodified, so nothing unsaved is overwritten."""
    outs: dict[str, str] = {}
    for entry in status:
        if isinstance(entry, dict):
            outs.update(entry.get("changed outs", {}))
    return all(state == "deleted" for state in outs.values())


def restore_from_cache(repo: Path) -> tuple[list[str], set[str]]:
    """Check out every restorable changed stage whose current inputs DVC's run cache knows
    (dependencies first, so a restored stage makes its dependents' inputs current) and record
    it in dvc.lock. Returns (restored stages, stages still changed)."""
    import networkx as nx
    from dvc.repo import Repo, lock_repo
    from dvc.stage.cache import RunCacheNotFoundError

    restored, changed = [], set()
    with Repo(str(repo)) as dvc_repo, lock_repo(dvc_repo):
        graph = dvc_repo.index.graph  # edges run from a stage to the stages it depends on
        for stage in reversed(list(nx.topological_sort(graph))):
            if not stage.cmd:
                continue
            status = stage.status().get(stage.addressing)
            if not status:
                continue
            if restorable(status):
                try:
                    dvc_repo.stage_cache.restore(stage)
                except RunCacheNotFoundError:
                    pass
                else:
                    stage.save()
                    stage.commit()
                    stage.dump(update_pipeline=False)
                    restored.append(stage.addressing)
                    continue
            changed.add(stage.addressing)
    return restored, changed


def adoptable(outs: dict[str, list[str]], changed: set[str]) -> tuple[list[str], list[str]]:
    """Pure: (rules whose every stage is up to date, their outputs). Rule = stage name before @."""
    by_rule: dict[str, list[str]] = {}
    for stage in outs:
        by_rule.setdefault(stage.split("@")[0], []).append(stage)
    rules = sorted(r for r, stages in by_rule.items() if not set(stages) & changed)
    files = sorted(o for r in rules for s in by_rule[r] for o in outs[s])
    return rules, files


def adopt(repo: Path, outs: dict[str, list[str]], changed: set[str]) -> list[str]:
    """Record Snakemake metadata for every rule DVC holds up to date; returns the files touched."""
    rules, files = adoptable(outs, changed)
    present = [f for f in files if (repo / f).exists()]
    if not present:
        return []
    say(f"Snakemake adopts what DVC verified: {', '.join(rules)}")
    cmd = ["snakemake", "--touch", "--cores", "1", "--quiet", "all", "--forcerun", *rules]
    cmd += ["--allowed-rules", *rules, "--", *present]
    subprocess.run(cmd, cwd=repo, check=True, env=NESTED)
    return present


def run(repo: Path = Path("."), adopt_rules: bool = True) -> dict[str, Any]:
    """Restore, then adopt (unless only params.yaml or dvc.yaml changed and nothing was
    restored: Snakemake's records are then still its own), then stamp."""
    repo = Path(repo)
    restored, changed = restore_from_cache(repo)
    if restored:
        say(f"restored from DVC's cache, nothing retrained: {', '.join(restored)}")
    outs = stage_outs(repo)
    adopted = adopt(repo, outs, changed) if adopt_rules or restored else []
    write_stamp(repo, [o for files in outs.values() for o in files])
    return {"restored": restored, "changed": sorted(changed), "adopted": adopted}
