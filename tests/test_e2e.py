"""The whole pipeline, small, in a temporary copy of the repository, through both orchestrators.

Order matters: each test continues from the state the previous one left (a user's session).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_params_dict

pytestmark = pytest.mark.slow


def sh(cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    result = subprocess.run(cmd, shell=True, cwd=cwd, capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(
            f"`{cmd}` failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
    return result


def stages_run(dvc_output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", dvc_output))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("e2e")
    repo, remote = base / "repo", base / "remote"
    files = sh("git ls-files -co --exclude-standard", REPO).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, repo / rel)
    params = tiny_params_dict()
    params["data"]["root"] = "data/raw"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git init -q && git add -A && git commit -qm init", repo)
    sh(f"dvc remote add -f -d local {remote}", repo)
    return {"base": base, "repo": repo, "remote": remote}


def test_snakemake_builds_the_report_with_every_row(work):
    repo = work["repo"]
    sh("snakemake --cores 2", repo)
    report = (repo / "reports" / "report.md").read_text()
    for row in ("random guess", "scratch-finetune", "pretrained-finetune", "pretrained-linear"):
        assert f"| {row} |" in report or f"| {row} " in report, row
    assert "embedded synthetic dataset" in report
    html = (repo / "reports" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # curves + three confusion matrices
    results = json.loads((repo / "reports" / "results.json").read_text())
    assert len(results["rows"]) == 4
    for run in ("scratch-finetune", "pretrained-finetune", "pretrained-linear"):
        assert (repo / "logs" / "finetune" / f"{run}.log").is_file()


def test_dvc_status_is_clean_after_snakemake(work):
    repo = work["repo"]
    assert json.loads(sh("dvc status --json", repo).stdout or "{}") == {}
    assert (repo / "dvc.lock").is_file()


def test_second_snakemake_run_has_nothing_to_do(work):
    out = sh("snakemake --cores 2", work["repo"])
    assert "Nothing to be done" in out.stdout + out.stderr


def test_finetune_param_edit_reruns_only_finetuning_and_report(work):
    repo = work["repo"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["finetune"]["lr"] = 5e-4
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc repro", repo).stdout
    assert stages_run(out) == {
        "finetune_scratch@scratch-finetune",
        "finetune_pretrained@pretrained-finetune",
        "finetune_pretrained@pretrained-linear",
        "report",
    }


def test_featurize_param_edit_reruns_featurize_and_everything_after(work):
    repo = work["repo"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["features"]["fmin_hz"] = 80.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh("dvc repro", repo).stdout
    ran = stages_run(out)
    assert "download" not in ran and "prepare" not in ran
    assert ran == {
        *(f"featurize_shard@{k:03d}" for k in range(4)),
        "featurize_gather",
        "pretrain",
        "finetune_scratch@scratch-finetune",
        "finetune_pretrained@pretrained-finetune",
        "finetune_pretrained@pretrained-linear",
        "report",
    }


def test_push_clone_pull_retrains_nothing(work):
    repo, base = work["repo"], work["base"]
    sh("git add -A && git commit -qm 'results' && dvc push -q", repo)
    clone = base / "clone"
    sh(f"git clone -q {repo} {clone}", base)
    sh("dvc pull -q", clone)
    assert json.loads(sh("dvc status --json", clone).stdout or "{}") == {}
    encoder = clone / "models" / "pretrain" / "encoder.safetensors"
    digest = encoder.read_bytes()
    sh("cola adopt-dvc", clone)
    dry = sh("snakemake --cores 2 -n", clone)
    assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
    sh("snakemake --cores 2", clone)
    assert encoder.read_bytes() == digest
    assert json.loads(sh("dvc status --json", clone).stdout or "{}") == {}
    assert "Stage 'pretrain' didn't change" in sh("dvc repro", clone).stdout
    # A later parameter edit is still noticed by Snakemake after adoption.
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["finetune"]["dropout"] = 0.3
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dry = sh("snakemake --cores 2 -n", clone).stdout
    assert "finetune_scratch" in dry and "rule pretrain:" not in dry
