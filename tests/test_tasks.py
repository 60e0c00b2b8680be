"""Downstream tasks: clips kept out of pretraining by content, label fractions, probes, the
demos, the tasks section's statistics, and the params that schedule them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cola_audio import digest, probe, stats, task_report, tasks
from cola_audio.demo_tasks import WRITERS
from cola_audio.params import ParamsError, validate
from cola_audio.stages import STAGES, unwatched_by_dvc


def _clips(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"clip": p, "path": p, "label": "a", "split": split, "sha1": sha1}
            for p, split, sha1 in rows
        ]
    )


def test_val_and_test_clips_holding_pretraining_bytes_are_left_out_whatever_their_name():
    clips = _clips(
        [("mine/x.wav", "test", "1" * 40), ("mine/y.wav", "val", "2" * 40)]
        + [("mine/z.wav", "train", "1" * 40), ("mine/w.wav", "test", "3" * 40)]
    )
    seen = {"1" * 40: "data/raw/fma_large/000/000002.mp3", "2" * 40: "other/name.flac"}
    kept, excluded = tasks.split_off_seen(clips, seen)
    assert list(excluded["path"]) == ["mine/x.wav", "mine/y.wav"]
    assert "data/raw/fma_large/000/000002.mp3" in excluded["reason"].iloc[0]
    # a training clip may share pretraining audio (pretraining saw it unlabelled): kept
    assert list(kept["path"]) == ["mine/z.wav", "mine/w.wav"]


def test_pretraining_sha1s_come_from_metadata_checksums_or_the_file(tmp_path):
    unlisted = tmp_path / "c.wav"
    unlisted.write_bytes(b"audio")
    pretrain = {
        "tracks": [
            {"track_id": 1, "audio": "a.mp3", "sha1": "a" * 40},
            {"track_id": 2, "audio": "b.mp3"},
            {"track_id": 3, "audio": unlisted.as_posix()},
        ]
    }
    found = tasks.pretraining_sha1s(pretrain, {"b.mp3": "b" * 40})
    assert found == {
        "a" * 40: "a.mp3",
        "b" * 40: "b.mp3",
        digest.file_digest(unlisted, "sha1"): unlisted.as_posix(),
    }


def test_a_class_left_without_test_clips_is_one_line_naming_the_task():
    clips = _clips([("x", "train", "1" * 40), ("y", "val", "2" * 40)])
    with pytest.raises(ValueError, match=r"tasks\.mine: class\(es\) a have no clip left"):
        tasks.check_task(clips, "mine")


def test_a_folder_tasks_bad_audio_folder_or_pattern_is_refused_naming_its_own_keys(
    default_params, tmp_path
):
    """A task's folder is indexed as data.folder is, but the fix is in tasks.<name>."""
    task = {**default_params["tasks"]["sounds"], "demo": None, "path": str(tmp_path / "none")}
    with pytest.raises(FileNotFoundError, match=r"set tasks\.mine\.path to a folder"):
        tasks.folder_clips(task, tmp_path / "out", "tasks.mine")
    WRITERS["sounds"](tmp_path / "audio", 1)  # a class folder per sound, one clip each
    task |= {"path": str(tmp_path / "audio"), "group_pattern": "^nomatch_(\\d+)"}
    with pytest.raises(ValueError, match=r"tasks\.mine\.group_pattern '.*' matches no file"):
        tasks.folder_clips(task, tmp_path / "out", "tasks.mine")


def test_a_label_fraction_is_stratified_seeded_and_keeps_a_clip_of_every_class():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 3)
    subset = probe.fraction_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[subset]).tolist() == [5, 3, 1]
    assert np.array_equal(subset, probe.fraction_subset(labels, 0.1, seed=0))
    assert not np.array_equal(subset, probe.fraction_subset(labels, 0.1, seed=1))
    assert np.array_equal(probe.fraction_subset(labels, 1.0, seed=3), np.arange(len(labels)))


def test_a_probe_picks_its_regularisation_on_validation_and_scores_test():
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        return rng.normal(size=(n, 5)) + y[:, None] * [3, 0, 0, 0, 0], y

    (xtr, ytr), (xv, yv), (xt, yt) = split(60), split(40), split(40)
    fit = probe.fit_probe(
        {"train": xtr, "val": xv, "test": xt}, {"train": ytr, "val": yv, "test": yt}, [1e-4, 1.0]
    )
    # at C=1e-4 the probe is nearly constant; the separable feature needs the weaker penalty
    assert fit["C"] == 1.0 and fit["test_accuracy"] > 0.9
    assert fit["test_accuracy"] == float((fit["predicted"] == yt).mean())


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_each_demo_task_writes_the_same_bytes_every_run(tmp_path, kind):
    digests = []
    for run in ("a", "b"):
        WRITERS[kind](tmp_path / run, 6)
        files = sorted((tmp_path / run).rglob("*.wav"))
        digests.append(
            [
                (f.relative_to(tmp_path / run).as_posix(), digest.file_digest(f, "sha1"))
                for f in files
            ]
        )
    assert digests[0] == digests[1]
    classes = {Path(name).parts[0] for name, _ in digests[0]}
    assert len(classes) >= 6 and len(digests[0]) == 6 * len(classes)


def _scored(correct: list[list[bool]]) -> stats.Scored:
    labels = np.zeros(len(correct[0]), dtype=int)
    return stats.Scored(labels, np.where(np.array(correct), 0, 1), 2)


def test_the_average_gain_over_tasks_is_the_mean_of_their_gains_with_an_interval():
    a1, b1 = _scored([[True] * 8 + [False] * 2]), _scored([[True] * 5 + [False] * 5])
    a2, b2 = _scored([[True] * 6 + [False] * 4]), _scored([[True] * 6 + [False] * 4])
    avg = task_report.average_difference([(a1, b1), (a2, b2)], 0.95, 500, 0)
    assert avg["difference"] == pytest.approx((0.3 + 0.0) / 2)
    assert avg["ci_low"] <= avg["difference"] <= avg["ci_high"]
    same = task_report.average_difference([(a2, b2)], 0.95, 500, 0)
    assert same == {"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0}


def test_the_default_demo_has_three_tasks_of_different_kinds(default_params):
    kinds = {
        t["source"] if t["source"] == "release" else t["demo"]
        for t in default_params["tasks"].values()
    }
    assert len(default_params["tasks"]) >= 3 and len(kinds) == len(default_params["tasks"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t["genre"].pop("min_seconds"), "min_seconds"),
        (lambda t: t["sounds"].__setitem__("demo", "birds"), "demo"),
        (lambda t: t.__setitem__("Bad_Name", {"source": "release", "min_seconds": 1}), "Bad_Name"),
        (lambda t: t["genre"].__setitem__("path", "x"), "path"),
        (lambda t: t["sounds"].__setitem__("demo", None), r"tasks\.sounds: no audio"),
        (lambda t: t["sounds"].__setitem__("group_pattern", "(x"), "not a valid regular"),
        (lambda t: t["sounds"].update(demo=None, labels_csv="l.csv"), "no audio"),
        (lambda t: t.__setitem__(2020, {"source": "release", "min_seconds": 1}), "2020"),
    ],
)
def test_a_bad_task_entry_is_refused_naming_it(default_params, edit, message):
    """Each a ParamsError, one line, before any job: a missing or unknown key, a name that is
    no folder name, a folder task without audio, a pattern that does not compile."""
    params = copy.deepcopy(default_params)
    edit(params["tasks"])
    with pytest.raises(ParamsError, match=message):
        validate(params)


def test_a_task_job_declares_its_own_task_entry_and_no_other(default_params):
    """Adding, editing or removing one task reruns only its own jobs (and the report)."""
    for name in ("task_data", "embed_pretrained", "embed_random"):
        stage = STAGES[name]
        for item in stage.items(default_params):
            keys = [k for k in stage.keys(default_params, item) if k.startswith("tasks")]
            assert keys == [f"tasks.{item['task']}"], (name, item)
    assert "tasks" in STAGES["report"].keys(default_params)
    assert not [k for k in STAGES["probe"].params if k.startswith("tasks")]
    json.dumps(STAGES["embed_random"].declared(default_params, {"task": "genre"}))


def test_probe_label_fractions_must_include_all_labels(default_params):
    params = copy.deepcopy(default_params)
    params["probe"]["label_fractions"] = [0.05, 0.2]
    with pytest.raises(ParamsError, match="lacks 1.0"):
        validate(params)


def test_a_class_left_without_test_clips_after_embedding_stops_the_probes_naming_the_task():
    clips = pd.DataFrame(
        {"clip": list("abcdef"), "label": ["x"] * 3 + ["y"] * 3}
        | {"split": ["train", "val", "test", "train", "val", "val"]}
    )
    with pytest.raises(ValueError, match=r"tasks\.mine: .* class\(es\) y lack"):
        probe.check_splits(clips, "mine")
    probe.check_splits(clips.assign(split=["train", "val", "test"] * 2), "mine")


def test_only_a_folder_tasks_own_audio_is_kept_from_dvcs_restore_and_run_cache(default_params):
    """Files outside the repository are fingerprinted by Snakemake alone: the sync must not
    restore or adopt the job reading them, nor may DVC's run cache key a run without them."""
    params = copy.deepcopy(default_params)
    assert unwatched_by_dvc(params) == set()
    params["tasks"]["mine"] = {**params["tasks"]["sounds"], "demo": None, "path": "x"}
    params["data"]["source"] = "folder"
    assert unwatched_by_dvc(params) == {"download", "task_data@mine"}
