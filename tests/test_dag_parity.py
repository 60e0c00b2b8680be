"""Snakefile and dvc.yaml describe one pipeline: same stages, commands, deps, outputs and params."""

import pytest
import yaml
from dag import dvc_stages, snakemake_stages

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
    drift = {
        name: {"snakemake": smk[name][field], "dvc": dvc[name][field]}
        for name in smk
        if name in dvc and smk[name][field] != dvc[name][field]
    }
    assert not drift, f"Snakefile and dvc.yaml disagree on {field}: {drift}"


def test_only_checkpoint_folders_are_dvc_only(both):
    """Checkpoints persist across DVC runs (the resume point); Snakemake does not track them."""
    _, dvc = both
    persist = sorted(p for s in dvc.values() for p in s["persist"])
    assert persist == sorted(
        ["models/pretrain/checkpoints"]
        + [
            f"models/finetune/{r}/checkpoints"
            for r in yaml.safe_load((REPO / "params.yaml").read_text())["finetune"]["runs"]
        ]
    )


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
