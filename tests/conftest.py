"""Shared fixtures: the production params with the tiny test overrides, and the tiny dataset."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from cola_audio import download, featurize, params, prepare
from cola_audio.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COLA_SHARED", REPO.parent / "shared"))
FMA_REAL = SHARED / "fixtures" / "fma_real"
FRONTEND_FIXTURE = SHARED / "fixtures" / "cola_frontend"


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def tiny_params_dict() -> dict[str, Any]:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    tiny = yaml.safe_load((REPO / "tests" / "config_tiny" / "overrides.yaml").read_text())
    return params.validate(merge(base, tiny))


# Every rule but `all`, in pipeline order: what a full build runs (the stage table's order).
PIPELINE_RULES = tuple(STAGES)


def sh(cmd: str, cwd: Path, check: bool = True, timeout: float | None = None):
    """Run a shell command as a user would (one BLAS thread, a git identity); fail showing its
    output's tail."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    result = subprocess.run(
        cmd, shell=True, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"`{cmd}` failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
    return result


def tiny_checkout(dest: Path) -> Path:
    """A git checkout of this working tree (tracked and untracked files) at `dest`, with the tiny
    params as its params.yaml: what a user has after `git clone` and an edit."""
    files = sh("git ls-files -co --exclude-standard", REPO).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    (dest / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    sh("git init -q && git add -A && git commit -qm init", dest)
    return dest


def require(path: Path) -> Path:
    """Skip, saying why, where the shared fixtures are not beside the checkout."""
    if not path.exists():
        pytest.skip(f"shared fixture {path} is absent (set COLA_SHARED to the shared/ folder)")
    return path


@pytest.fixture(autouse=True)
def _caller_thread_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process training sets OMP_NUM_THREADS (training.seed_everything); put it back after
    each test, so later `snakemake` and `dvc repro` subprocesses get the caller's environment."""
    if "OMP_NUM_THREADS" in os.environ:
        monkeypatch.setenv("OMP_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
    else:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.fixture
def default_params() -> dict[str, Any]:
    return params.load(REPO / "params.yaml")


@pytest.fixture
def tiny_params() -> dict[str, Any]:
    return tiny_params_dict()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny embedded dataset, prepared and featurized once per session (read-only for tests)."""
    base = tmp_path_factory.mktemp("tiny")
    p = tiny_params_dict()
    download.run(p, raw_dir=base / "raw", archive_dir=base / "downloads")
    prepare.run(p, out_dir=base / "meta", raw_dir=base / "raw")
    featurize.run(p, meta_dir=base / "meta", out_dir=base / "features")
    return {
        "params": p,
        "root": base,
        "raw": base / "raw",
        "meta": base / "meta",
        "features": base / "features",
    }
