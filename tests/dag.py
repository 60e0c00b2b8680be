"""Both orchestrators' views of the pipeline as plain data, for the parity and drift tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

Stage = dict[str, Any]
PLUGINS = Path(__file__).parent / "snakemake_plugins"


def snakemake_stages(repo: Path, forceall: bool = True) -> dict[str, Stage]:
    """Each job of `snakemake --forceall` (or, with forceall=False, each job `snakemake -n` would
    run): rule@wildcard, command, inputs, outputs, params.

    Read through Snakemake's public plugin interface: a dry run with the test executor
    `record-jobs` (tests/snakemake_plugins), which writes every job it is handed as a JSON line.
    """
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "jobs.jsonl"
        env = {
            **os.environ,
            "COLA_RECORD_JOBS": str(record),
            "COLA_DVC_SYNC": "off",  # reading the DAG must not sync the checkout with DVC
            "PYTHONPATH": os.pathsep.join(p for p in [str(PLUGINS), os.getenv("PYTHONPATH")] if p),
        }
        # No --quiet: a bare --quiet makes a dry run return before it schedules any job.
        cmd = ["snakemake", "--executor", "record-jobs", *(["--forceall"] if forceall else [])]
        done = subprocess.run(
            [*cmd, "all"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
        )
        said = done.stdout + done.stderr
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{said}"
        if record.is_file():
            jobs = [json.loads(line) for line in record.read_text().splitlines()]
        else:
            assert "Nothing to be done" in said, f"the recorder saw no job, yet:\n{said}"
            jobs = []

    stages: dict[str, Stage] = {}
    for job in jobs:
        if job["rule"] == "all":
            continue
        wildcards = list(job["wildcards"].values())
        # DVC names a matrix stage's instances by its values joined with "-"
        name = job["rule"] + (f"@{'-'.join(wildcards)}" if wildcards else "")
        stages[name] = {
            "cmd": re.sub(r"\s*>\s*\S+\s+2>&1$", "", job["shellcmd"].strip()),
            "deps": sorted(job["input"]),
            "outs": sorted(job["output"]),
            # One keyed param per rule (stages.Stage.declared); folder_files, the fingerprint of
            # audio outside the repository, is Snakemake's alone (DVC cannot watch it).
            "params": sorted(job["params"]["declared"]),
            "values": job["params"]["declared"],
        }
    return stages


def collapse_into_folders(files: list[str], folders: list[str]) -> list[str]:
    """Files inside one of `folders` replaced by that folder: a DVC folder dependency stands for
    every Snakemake input file inside it."""
    return sorted({next((d for d in folders if f.startswith(d + "/")), f) for f in files})


def with_downstream(changed: set[str], stages: dict[str, Stage]) -> set[str]:
    """`changed` and every stage that depends on one of their outputs, directly or not (a folder
    dependency depends on the outputs inside it)."""

    def feeds(out: str, dep: str) -> bool:
        return out == dep or out.startswith(dep + "/") or dep.startswith(out + "/")

    closure = set(changed)
    grew = True
    while grew:
        more = {
            name
            for name, stage in stages.items()
            if name not in closure
            and any(feeds(o, d) for c in closure for o in stages[c]["outs"] for d in stage["deps"])
        }
        closure |= more
        grew = bool(more)
    return closure


def dvc_stages(repo: Path) -> dict[str, Stage]:
    from dvc.repo import Repo

    stages: dict[str, Stage] = {}
    with Repo(str(repo)) as dvc_repo:
        for stage in dvc_repo.index.stages:
            params = sorted(
                {p for dep in stage.deps if hasattr(dep, "params") for p in (dep.params or [])}
            )
            stages[stage.name] = {
                "cmd": stage.cmd,
                "deps": sorted(dep.def_path for dep in stage.deps if not hasattr(dep, "params")),
                "outs": sorted(out.def_path for out in stage.outs if not out.persist),
                "persist": sorted(out.def_path for out in stage.outs if out.persist),
                "params": params,
            }
    return stages
