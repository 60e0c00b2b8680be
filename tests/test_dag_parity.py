"""Snakefile and dvc.yaml describe one pipeline: same stages, commands, deps, outputs and params."""

import os
import re
import subprocess

import pytest
import yaml
from dag import collapse_into_folders, dvc_stages, snakemake_stages

from conftest import REPO


@pytest.fixture(scope="module")
def both():
    return snakemake_stages(REPO), dvc_stages(REPO)


def test_same_stage_set(both):
    smk, dvc = both
    assert sorted(smk) == sorted(dvc)


@pytest.mark.parametrize("field", ["cmd", "deps", "outs", "params"])
def test_same_field_per_stage(both, field):
    smk, dvc = both

    def ours(name: str) -> list[str]:
        if field != "deps":
            return smk[name][field]
        return collapse_into_folders(smk[name]["deps"], dvc[name]["deps"])

    drift = {
        name: {"snakemake": ours(name), "dvc": dvc[name][field]}
        for name in smk
        if name in dvc and ours(name) != dvc[name][field]
    }
    assert not drift, f"Snakefile and dvc.yaml disagree on {field}: {drift}"


def test_no_output_persists_across_runs(both):
    """A persistent output survives a rerun with other params: exactly how a stale checkpoint
    used to be resumed. Checkpoints are undeclared scratch space that a finished run deletes."""
    _, dvc = both
    assert [p for s in dvc.values() for p in s["persist"]] == []


def test_every_run_and_seed_is_a_stage_of_its_own(both):
    smk, dvc = both
    params = yaml.safe_load((REPO / "params.yaml").read_text())["finetune"]
    expected = {
        f"finetune_{init}@{run}-{seed}"
        for init, runs in params["runs"].items()
        for run in runs
        for seed in params["seeds"]
    }
    assert {s for s in smk if s.startswith("finetune_")} == expected
    assert {s for s in dvc if s.startswith("finetune_")} == expected


def test_adding_a_seed_leaves_the_other_jobs_params_untouched(both):
    """Fine-tuning jobs declare every finetune key but the seed list, in both tools."""
    smk, dvc = both
    for name in (s for s in smk if s.startswith("finetune_")):
        assert "finetune.seeds" not in smk[name]["params"] and "finetune" not in dvc[name]["params"]
        assert "finetune.lr" in smk[name]["params"]


def test_every_stage_calls_only_the_cola_cli(both):
    smk, _ = both
    for name, stage in smk.items():
        assert stage["cmd"].startswith("cola --params params.yaml "), name


def _copy(dest):
    import shutil

    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    for item in ["Snakefile", "workflow", "params.yaml", "dvc.yaml", "src", ".dvc"]:
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    return dest


def _edit_params(repo, edit):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_a_shard_count_or_a_new_run_is_one_edit_both_tools_follow(tmp_path):
    """Issue 10: features.shards and finetune.runs are lists both files iterate (dvc.yaml's
    foreach/matrix over params), so one params.yaml edit changes both stage sets alike."""
    repo = _copy(tmp_path)

    def edit(params):
        params["features"]["shards"] = [0, 1, 2]
        params["finetune"]["runs"]["pretrained"]["pretrained-linear-2"] = "linear"

    _edit_params(repo, edit)
    smk, dvc = snakemake_stages(repo), dvc_stages(repo)
    assert sorted(smk) == sorted(dvc)
    assert {s for s in smk if s.startswith("featurize_shard@")} == {
        f"featurize_shard@{k}" for k in range(3)
    }
    assert "finetune_pretrained@pretrained-linear-2-0" in dvc
    for name in smk:
        assert collapse_into_folders(smk[name]["deps"], dvc[name]["deps"]) == dvc[name]["deps"]
        assert smk[name]["outs"] == dvc[name]["outs"]


def test_drift_is_detected(tmp_path):
    """The comparison is not vacuous: a param dropped from one dvc.yaml stage shows up."""
    repo = _copy(tmp_path)
    text = (repo / "dvc.yaml").read_text()
    (repo / "dvc.yaml").write_text(text.replace("      - pretrain.temperature\n", "", 1))
    smk, dvc = snakemake_stages(repo), dvc_stages(repo)
    assert "pretrain.temperature" in smk["pretrain"]["params"]
    assert "pretrain.temperature" not in dvc["pretrain"]["params"]


def test_snakemake_lint_finds_nothing_but_the_accepted_conda_advice():
    """README accepts one lint per rule (the environment is the project itself, not a conda file
    per rule); any other lint fails here."""
    lint = subprocess.run(
        ["snakemake", "--lint"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLA_DVC_SYNC": "off"},
    )
    out = lint.stdout + lint.stderr
    titles = re.findall(r"^\s+\* (.+?):$", out, re.M)
    rules = re.findall(r"^Lints for rule (\w+)", out, re.M)
    assert titles and set(titles) == {"Specify a conda environment or container for each rule."}
    assert len(titles) == len(rules)
