"""Snakefile and dvc.yaml describe one pipeline: same stages, commands, deps, outputs and params."""

import json
import os
import re
import subprocess

import pytest
import yaml
from dag import collapse_into_folders, dvc_stages, snakemake_stages

from cola_audio.params import finetune_runs
from cola_audio.stages import STAGES
from conftest import REPO, sh, tiny_params_dict


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


TRAINING = ("finetune_", "linear_")


def test_every_run_and_seed_is_a_stage_of_its_own(both):
    smk, dvc = both
    params = yaml.safe_load((REPO / "params.yaml").read_text())["finetune"]
    expected = {
        f"{spec['mode']}_{spec['init']}@{run}-{seed}"
        for run, spec in finetune_runs(params).items()
        for seed in params["seeds"]
    }
    assert {s for s in smk if s.startswith(TRAINING)} == expected
    assert {s for s in dvc if s.startswith(TRAINING)} == expected


def test_a_training_job_declares_what_its_mode_uses_and_no_job_list(both):
    """No training job declares the seed or run lists (a new seed or run reruns only its own
    jobs); fine-tuning declares lr, linear evaluation linear_lr, and neither the other's."""
    smk, dvc = both
    for name in (s for s in smk if s.startswith(TRAINING)):
        keys = set(smk[name]["params"])
        assert keys == set(dvc[name]["params"])
        assert not keys & {"finetune.seeds", "finetune.runs", "finetune"}
        mode = name.split("_")[0]
        assert ("finetune.lr" in keys, "finetune.linear_lr" in keys) == (
            mode == "finetune",
            mode == "linear",
        ), name


def test_snakemake_holds_each_stages_params_as_one_keyed_mapping(both):
    """Snakemake compares a rule's params as a set of values without their keys; one param
    holding every declared key with its value makes each edit of each key a change it sees."""
    smk, _ = both
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in smk.items():
        table = STAGES[name.split("@")[0]]
        item = next(i for i in table.items(params) if table.addressing(i) == name)
        declared = table.declared(params, item)
        assert stage["values"] == json.loads(json.dumps(declared)), name


PATH_FLAGS = {"--raw", "--meta", "--features", "--encoder", "--models", "--out"}


def test_every_stage_calls_only_the_cola_cli_and_names_its_paths(both):
    smk, _ = both
    for name, stage in smk.items():
        assert stage["cmd"].startswith("cola --params params.yaml "), name
        words = stage["cmd"].split()
        paths = [v for k, v in zip(words, words[1:], strict=False) if k in PATH_FLAGS]
        # every output lies under a path its command names, and every path named is one of the
        # job's outputs or inputs (or a folder holding some)
        assert all(any(o.startswith(p) for p in paths) for o in stage["outs"]), stage["cmd"]
        files = [*stage["outs"], *stage["deps"]]
        assert all(any(f.startswith(p) for f in files) for p in paths), stage["cmd"]


def _copy(dest):
    import shutil

    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    for item in ["Snakefile", "workflow", "params.yaml", "dvc.yaml", "src", ".dvc", ".dvcignore"]:
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    return dest


def _edit_params(repo, edit):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_a_shard_count_or_a_new_run_is_one_edit_both_tools_follow(tmp_path):
    """Issue 10: features.shards and finetune.runs are lists both files iterate (dvc.yaml's
    matrix over params), so one params.yaml edit changes both stage sets alike."""
    repo = _copy(tmp_path)

    def edit(params):
        params["features"]["shards"] = [0, 1, 2]
        params["finetune"]["runs"]["linear"]["pretrained"].append("pretrained-linear-2")

    _edit_params(repo, edit)
    smk, dvc = snakemake_stages(repo), dvc_stages(repo)
    assert sorted(smk) == sorted(dvc)
    assert {s for s in smk if s.startswith("featurize_shard@")} == {
        f"featurize_shard@{k}" for k in range(3)
    }
    assert "linear_pretrained@pretrained-linear-2-0" in dvc
    for name in smk:
        assert collapse_into_folders(smk[name]["deps"], dvc[name]["deps"]) == dvc[name]["deps"]
        assert smk[name]["outs"] == dvc[name]["outs"]


def test_dvc_yaml_is_the_render_of_the_stage_table_and_drift_fails_the_check(tmp_path):
    """dvc.yaml is never written by hand: CI's `cola dvc-yaml --check` fails on any difference
    from what the table renders, and the parity above is not vacuous (a dropped param shows)."""
    assert sh("cola dvc-yaml --check", REPO, check=False).returncode == 0
    repo = _copy(tmp_path)
    text = (repo / "dvc.yaml").read_text()
    (repo / "dvc.yaml").write_text(text.replace("    - pretrain.temperature\n", "", 1))
    check = sh("cola dvc-yaml --check", repo, check=False)
    assert check.returncode == 1 and "+    - pretrain.temperature" in check.stdout
    assert "never edit dvc.yaml by hand" in check.stderr
    smk, dvc = snakemake_stages(repo), dvc_stages(repo)
    assert "pretrain.temperature" in smk["pretrain"]["params"]
    assert "pretrain.temperature" not in dvc["pretrain"]["params"]
    sh("cola dvc-yaml", repo)
    assert (repo / "dvc.yaml").read_text() == text


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


def test_a_config_override_is_refused_before_any_job_naming_the_key_and_the_alternatives(
    tmp_path,
):
    """Every job reads params.yaml (as DVC does), so a --configfile/--config value would reach
    Snakemake's records and dvc.lock but not the computation: it is refused before any job."""
    repo = _copy(tmp_path)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    other = yaml.safe_load((repo / "params.yaml").read_text())
    other["pretrain"]["lr"] = 0.005
    (repo / "other.yaml").write_text(yaml.safe_dump(other, sort_keys=False))
    env = "COLA_DVC_SYNC=off "
    run = "snakemake --cores 1 --until download --configfile other.yaml"  # ignored: 1 job ran
    refused = sh(f"{env}{run}", repo, check=False, timeout=300)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0, said[-2000:]
    assert "override pretrain.lr" in said and "edit params.yaml" in said, said[-2000:]
    assert "dvc exp run -S pretrain.lr=VALUE" in said
    assert not (repo / "data" / "raw").exists()  # nothing ran
    typed = sh(f"""{env}snakemake -n --config 'finetune={{"lr": 0.05}}'""", repo, check=False)
    assert typed.returncode != 0 and "override finetune.lr" in typed.stdout + typed.stderr
    # The control: the same values as params.yaml from another file are no override.
    (repo / "same.yaml").write_text((repo / "params.yaml").read_text())
    assert sh(f"{env}snakemake -n --configfile same.yaml", repo, check=False).returncode == 0
