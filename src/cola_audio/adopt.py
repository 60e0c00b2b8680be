"""`cola adopt-dvc`: after `dvc pull`, let Snakemake trust the outputs DVC vouches for.

A fresh clone has no .snakemake metadata and `dvc pull` writes files with fresh mtimes in arbitrary
order, so Snakemake would rebuild everything downstream of whatever landed first, retraining
the encoder. DVC knows better: it hashed each stage's deps, params and outs. For every Snakemake
rule all of whose DVC stages `dvc status` reports up to date, this runs `snakemake --touch
--forcerun` on their outputs (in DAG order, recording Snakemake's metadata: params, code, inputs),
and leaves every other rule alone, so a changed parameter or file still triggers the rerun it
should. Without --forcerun, touch skips jobs whose pulled outputs already look newer than their
inputs, and those rules (download, prepare, featurize_shard here) kept no metadata: a later
edit of their params went unnoticed.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def dvc_changed_stages(repo: Path) -> set[str]:
    out = subprocess.run(
        ["dvc", "status", "--json"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout
    return {name.split(":")[-1] for name in json.loads(out or "{}")}


def dvc_stage_outs(repo: Path, persist: bool = False) -> dict[str, list[str]]:
    """Each dvc.yaml stage's output paths; `persist` outputs (checkpoints) only when asked."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return {
            s.name: [o.def_path for o in s.outs if persist or not o.persist]
            for s in dvc_repo.index.stages
        }


def adoptable(stage_outs: dict[str, list[str]], changed: set[str]) -> tuple[list[str], list[str]]:
    """Pure: (rules whose every stage is up to date, their outputs). Rule = stage name before @."""
    by_rule: dict[str, list[str]] = {}
    for stage in stage_outs:
        by_rule.setdefault(stage.split("@")[0], []).append(stage)
    rules = sorted(r for r, stages in by_rule.items() if not set(stages) & changed)
    outs = sorted(o for r in rules for s in by_rule[r] for o in stage_outs[s])
    return rules, outs


def run(params: dict[str, Any], repo: Path = Path("."), dry_run: bool = False) -> list[str]:
    repo = Path(repo)
    changed = dvc_changed_stages(repo)
    rules, outs = adoptable(dvc_stage_outs(repo), changed)
    present = [o for o in outs if (repo / o).exists()]
    if changed:
        log.info(
            "left for Snakemake to rebuild (DVC reports changes): %s", ", ".join(sorted(changed))
        )
    if not present:
        log.info("nothing to adopt")
        return []
    cmd = [
        "snakemake",
        "--touch",
        "--cores",
        "1",
        "--quiet",
        "all",
        "--forcerun",
        *rules,
        "--allowed-rules",
        *rules,
        "--",
        *present,
    ]
    log.info("adopting %d outputs of %s", len(present), ", ".join(rules))
    if not dry_run:
        subprocess.run(cmd, cwd=repo, check=True)
    return present
