"""The whole pipeline on a labelled audio folder (`data.source: folder`) through both tools:
the embedded demo set, mixed formats and rates, clips under 1 s, one undecodable file, groups
by speaker."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from conftest import sh, tiny_checkout

pytestmark = pytest.mark.slow
SPEAKER = r"^([0-9a-f]+)_nohash_"


def test_a_labelled_folder_runs_end_to_end_in_both_tools(tmp_path):
    repo = tiny_checkout(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = "folder"
    params["data"]["folder"].update(demo=True, group_pattern=SPEAKER)
    params["features"]["min_seconds"] = 0.1  # keep the clips under 1 s: they are padded
    params["tasks"]["genre"]["min_seconds"] = 0.1  # the release task is this folder's labels
    params["finetune"].update(max_epochs=1, max_steps=-1)  # one epoch, of more steps than 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git commit -qam 'folder source'", repo)
    sh("snakemake --cores 2", repo)

    report = (repo / "reports" / "report.md").read_text()
    assert "a labelled audio folder" in report
    padded = int(re.search(r"padded with silence: (\d+)", report).group(1))
    assert padded > 0
    assert "deadbeef_nohash_9.wav" in report  # the undecodable file, listed with its reason
    labels = json.loads((repo / "data" / "meta" / "labels.json").read_text())
    assert len(labels["genres"]) == 6
    tracks = json.loads((repo / "data" / "meta" / "finetune.json").read_text())["tracks"]
    split_of: dict[str, set[str]] = {}
    for t in tracks:
        speaker = re.match(SPEAKER, t["audio"].rsplit("/", 1)[1]).group(1)
        split_of.setdefault(speaker, set()).add(t["split"])
    assert all(len(splits) == 1 for splits in split_of.values()), split_of
    results = json.loads((repo / "reports" / "results.json").read_text())
    assert all(r["published_accuracy"] is None for r in results["rows"][1:])

    assert json.loads(sh("dvc status --json", repo).stdout or "{}") == {}
    assert "Running stage" not in sh("dvc repro", repo).stdout
