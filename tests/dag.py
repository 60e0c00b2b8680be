"""Both orchestrators' views of the pipeline as plain data, for the drift test and the e2e tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path
from typing import Any

Stage = dict[str, Any]


@contextlib.contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def snakemake_stages(repo: Path) -> dict[str, Stage]:
    """Each job of `snakemake --forceall`: rule@wildcard, command, inputs, outputs, params."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import DAGSettings, OutputSettings, ResourceSettings

    stages: dict[str, Stage] = {}
    # Reading the DAG must not sync the checkout with DVC; the variable is put back afterwards
    # (left set, it silently switched the sync off in every later test's Snakemake).
    with _cwd(repo), _env(COLA_DVC_SYNC="off"), SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            snakefile=Path("Snakefile"),
            workdir=Path("."),
        )
        dag_api = wf_api.dag(dag_settings=DAGSettings(forceall=True))
        wf = wf_api._workflow  # the public API prints DAGs but does not return them
        wf.dag_settings = dag_api.dag_settings
        wf._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        built = wf._build_dag()
        if asyncio.iscoroutine(built):
            asyncio.run(built)
        for job in wf.dag.jobs:
            if job.rule.name == "all":
                continue
            wildcards = list(dict(job.wildcards).values())
            # DVC names a matrix stage's instances by its values joined with "-"
            name = job.rule.name + (f"@{'-'.join(wildcards)}" if wildcards else "")
            stages[name] = {
                "cmd": re.sub(r"\s*>\s*\S+\s+2>&1$", "", job.shellcmd.strip()),
                "deps": sorted(str(f) for f in job.input),
                "outs": sorted(str(f) for f in job.output),
                # folder_files: the fingerprint of audio outside the repository, which DVC cannot
                # watch (README: `dvc repro -f download` after editing that folder).
                "params": sorted(k for k in job.params.keys() if k != "folder_files"),  # noqa: SIM118 (a Namedlist iterates values)
            }
    return stages


def collapse_into_folders(files: list[str], folders: list[str]) -> list[str]:
    """Files inside one of `folders` replaced by that folder: a DVC folder dependency stands for
    every Snakemake input file inside it."""
    return sorted({next((d for d in folders if f.startswith(d + "/")), f) for f in files})


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
