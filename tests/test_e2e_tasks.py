"""A labelled folder added as a downstream task to the built tiny pipeline, through both tools.

Its own module and build: it needs both tools up to date when it starts, which test_e2e.py's
sequence of edits does not give every test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from dag import snakemake_stages
from test_e2e import dvc_changed, edited_params

from cola_audio import digest
from conftest import sh, tiny_checkout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("e2e-tasks")
    return {"repo": tiny_checkout(base / "repo")}


def test_the_tiny_pipeline_builds_and_both_tools_agree(work):
    repo = work["repo"]
    sh("snakemake --cores 2", repo)
    assert dvc_changed(repo) == set()
    assert set(snakemake_stages(repo, forceall=False)) == set()


def labelled_folder(root: Path, leaked: Path) -> Path:
    """Two classes of tones in WAV, split by a labels CSV; one test clip of class `high` is a
    copy of `leaked` (a pretraining clip) under another name."""
    import numpy as np
    import soundfile as sf

    rows = ["path,label,split"]
    rng = np.random.default_rng(5)
    for label, base in (("low", 300.0), ("high", 2400.0)):
        for k, split in enumerate(["train"] * 5 + ["val"] * 2 + ["test"] * 2):
            t = np.arange(16000) / 16000
            wave = 0.5 * np.sin(2 * np.pi * base * rng.uniform(0.8, 1.2) * t)
            (root / label).mkdir(parents=True, exist_ok=True)
            sf.write(root / label / f"{k}.wav", wave.astype(np.float32), 16000)
            rows.append(f"{label}/{k}.wav,{label},{split}")
    shutil.copy(leaked, root / "high" / "renamed.mp3")
    rows.append("high/renamed.mp3,high,test")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_a_folder_task_runs_only_its_jobs_and_keeps_its_eval_audio_out_of_pretraining(
    work, tmp_path
):
    """Issue 19: pretraining stays on the synthetic corpus; a labelled folder added under `tasks`
    schedules only its own jobs and the report in both tools, the report lists it, dvc status
    ends clean, and no validation/test clip of it holds the bytes of any pretraining clip, even
    one copied into it under another name. Removing the task reruns only the report."""
    repo = work["repo"]
    pretraining = json.loads((repo / "data/meta/pretrain.json").read_text())["tracks"]
    leaked = repo / pretraining[0]["audio"]
    folder = labelled_folder(tmp_path / "mine", leaked)
    task = {
        "source": "folder",
        "demo": None,
        "demo_clips_per_class": 12,
        "path": str(folder),
        "labels_csv": str(folder / "labels.csv"),
        "group_pattern": None,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "split_seed": 0,
        "min_seconds": 0.1,
    }
    own = {f"{s}@mine" for s in ("task_data", "embed_pretrained", "embed_random", "probe")}
    with edited_params(repo, lambda p: p["tasks"].__setitem__("mine", task)):
        assert set(snakemake_stages(repo, forceall=False)) == own | {"report"}
        assert dvc_changed(repo) == own | {"report"}
        sh("snakemake --cores 2", repo)
        assert dvc_changed(repo) == set()
        clips = pd.read_csv(repo / "data/tasks/mine/data/clips.csv", dtype=str)
        excluded = pd.read_csv(repo / "data/tasks/mine/data/excluded.csv", dtype=str)
        assert [Path(p).name for p in excluded["path"]] == ["renamed.mp3"]
        seen = {digest.file_digest(repo / t["audio"], "sha1") for t in pretraining}
        held_out = clips[clips["split"].isin(["val", "test"])]
        assert len(held_out) == 8
        assert not {digest.file_digest(p, "sha1") for p in held_out["path"]} & seen
        assert "| mine | 2 | 10/4/4 |" in (repo / "reports/report.md").read_text()
    assert set(snakemake_stages(repo, forceall=False)) == {"report"}
    assert dvc_changed(repo) == {"report"}
    # neither tool deletes a removed job's outputs; later tests start from the build as it was
    shutil.rmtree(repo / "data/tasks/mine")
    shutil.rmtree(repo / "models/probe/mine")
    sh("snakemake --cores 2", repo)
    assert dvc_changed(repo) == set()
    assert set(snakemake_stages(repo, forceall=False)) == set()
