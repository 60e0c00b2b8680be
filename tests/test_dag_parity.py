"""Snakefile and dvc.yaml describe one pipeline: same stages, commands, deps, outputs and params."""

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


def test_drift_is_detected(tmp_path, both):
    """The comparison is not vacuous: a changed shard count shows up as a stage-set difference."""
    import shutil
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    for item in ["Snakefile", "workflow", "params.yaml", "dvc.yaml", "src", ".dvc"]:
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["features"]["n_shards"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    smk = snakemake_stages(tmp_path)
    dvc = dvc_stages(tmp_path)
    assert "featurize_shard@003" in dvc and "featurize_shard@003" not in smk


def test_snakemake_lint_finds_nothing_but_the_accepted_conda_advice():
    """README accepts one lint per rule (the environment is the project itself, not a conda file
    per rule); any other lint fails here."""
    lint = subprocess.run(
        ["snakemake", "--lint"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    out = lint.stdout + lint.stderr
    titles = re.findall(r"^\s+\* (.+?):$", out, re.M)
    rules = re.findall(r"^Lints for rule (\w+)", out, re.M)
    assert titles and set(titles) == {"Specify a conda environment or container for each rule."}
    assert len(titles) == len(rules)
