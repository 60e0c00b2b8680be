"""`data.source: folder`: indexing, grouped stratified splits, bad trees named, metadata."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from cola_audio import folder, prepare
from cola_audio.errors import BadInput, MissingInput

SPEAKER = r"^([0-9a-f]+)_nohash_"


def cfg(path, **kw):
    base = {
        "path": str(path),
        "demo": False,
        "labels_csv": None,
        "group_pattern": SPEAKER,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "split_seed": 0,
        "unlabelled_path": None,
    }
    return {**base, **kw}


def write_tree(root, classes=("dog", "rain", "siren"), speakers=6, takes=2):
    for c, label in enumerate(classes):
        for s in range(speakers):
            for t in range(takes):
                path = root / label / f"{s:04x}_nohash_{t}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, np.full(800 + 100 * c, 0.1 * (t + 1), np.float32), 8000)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    return raw, folder.index(cfg("unused", demo=True), raw)


def test_demo_is_written_byte_identically(demo, tmp_path):
    raw, table = demo
    again = folder.index(cfg("unused", demo=True), tmp_path)
    assert list(again["sha1"]) == list(table["sha1"])
    suffixes = {p.rsplit(".", 1)[1] for p in table["path"]}
    assert suffixes == {"wav", "flac"}
    assert len(set(table["label"])) == len(folder.DEMO_CLASSES)


def test_no_group_spans_two_splits_and_every_class_is_in_each(demo):
    _, table = demo
    groups = table["path"].map(lambda p: re.match(SPEAKER, p.rsplit("/", 1)[1]).group(1))
    assert (table.groupby(groups)["split"].nunique() == 1).all()
    assert (table.groupby("label")["split"].nunique() == 3).all()
    shares = table["split"].value_counts(normalize=True)
    assert 0.55 <= shares["train"] <= 0.8 and shares["val"] > 0.1 and shares["test"] > 0.1


def test_the_index_is_what_prepare_reads(demo):
    raw, table = demo
    docs = prepare.build_folder(folder.read_index(raw))
    ft, pt = docs["finetune"], docs["pretrain"]
    assert docs["labels"]["genres"] == sorted(folder.DEMO_CLASSES)
    assert [t["track_id"] for t in ft["tracks"]] == list(range(1, len(table) + 1))
    assert [t["audio"] for t in ft["tracks"]] == sorted(table["path"])
    held_out = {t["track_id"] for t in ft["tracks"] if t["split"] != "train"}
    assert held_out and held_out.isdisjoint(t["track_id"] for t in pt["tracks"])
    assert prepare.validate_meta(docs) is None


def test_a_labels_csv_gives_splits_and_unlabelled_audio_joins_pretraining(tmp_path):
    write_tree(tmp_path / "audio")
    rows = [
        (
            f"{label}/{s:04x}_nohash_{t}.wav",
            label,
            "train" if s < 4 else ("val" if s == 4 else "test"),
        )
        for label in ("dog", "rain", "siren")
        for s in range(6)
        for t in range(2)
    ]
    csv = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(csv, index=False)
    (tmp_path / "extra").mkdir()
    sf.write(tmp_path / "extra" / "x.wav", np.zeros(4000, np.float32), 8000)
    table = folder.index(
        cfg(tmp_path / "audio", labels_csv=str(csv), unlabelled_path=str(tmp_path / "extra")),
        tmp_path / "raw",
    )
    assert table["split"].value_counts().to_dict() == {
        "train": 24,
        "val": 6,
        "test": 6,
        "unlabelled": 1,
    }
    docs = prepare.build_folder(folder.read_index(tmp_path / "raw"))
    assert docs["pretrain"]["tracks"][-1]["audio"].endswith("extra/x.wav")
    assert len(docs["pretrain"]["tracks"]) == 24 + 1


def test_bad_trees_are_named(tmp_path):
    write_tree(tmp_path / "audio")
    (tmp_path / "audio" / "cat").mkdir()
    with pytest.raises(BadInput, match="class folder.* without audio files: cat"):
        folder.index(cfg(tmp_path / "audio"), tmp_path / "raw")
    (tmp_path / "audio" / "cat").rmdir()
    with pytest.raises(MissingInput, match="no class subfolders"):
        folder.index(cfg(tmp_path / "nowhere"), tmp_path / "raw")
    few = tmp_path / "few"
    write_tree(few, classes=("dog", "owl"), speakers=2, takes=1)
    with pytest.raises(BadInput, match="lack files in train, val or test"):
        folder.index(cfg(few), tmp_path / "raw")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\ndog/0000_nohash_0.wav,dog\ndog/missing.wav,dog\n")
    with pytest.raises(BadInput, match=r"labels.csv: 1 listed file\(s\) do not exist: .*missing"):
        folder.index(cfg(tmp_path / "audio", labels_csv=str(csv)), tmp_path / "raw")


def test_csv_groups_are_kept_and_blank_ones_come_from_the_file_name(tmp_path):
    write_tree(tmp_path / "audio")
    rows = [
        (f"{label}/{s:04x}_nohash_{t}.wav", f" {label} ", "take-a" if t == 0 else "")
        for label in ("dog", "rain", "siren")
        for s in range(6)
        for t in range(2)
    ]
    csv = tmp_path / "labels.csv"
    pd.DataFrame(rows, columns=["path", "label", "group"]).to_csv(csv, index=False)
    table = folder.labelled_files(cfg(tmp_path / "audio", labels_csv=str(csv)), tmp_path / "audio")
    assert set(table["label"]) == {"dog", "rain", "siren"}  # stripped
    assert set(table["group"][table["path"].str.endswith("_0.wav")]) == {"take-a"}
    assert set(table["group"][table["path"].str.endswith("_1.wav")]) == {
        f"{s:04x}" for s in range(6)
    }


def test_unlabelled_copies_of_labelled_audio_stay_out_of_pretraining(tmp_path):
    write_tree(tmp_path / "audio")
    table = folder.index(
        cfg(tmp_path / "audio", unlabelled_path=str(tmp_path / "audio")), tmp_path / "raw"
    )
    assert (table["split"] != "unlabelled").all()  # every "unlabelled" file is a labelled one
    with pytest.raises(MissingInput, match="unlabelled_path is not a folder"):
        folder.index(cfg(tmp_path / "audio", unlabelled_path=str(tmp_path / "no")), tmp_path / "r")


def test_hidden_and_underscore_folders_are_not_classes_and_a_dead_pattern_is_named(tmp_path):
    write_tree(tmp_path / "audio")
    (tmp_path / "audio" / "_background_noise_").mkdir()
    sf.write(tmp_path / "audio" / "_background_noise_" / "n.wav", np.zeros(800, np.float32), 8000)
    (tmp_path / "audio" / ".ipynb_checkpoints").mkdir()
    table = folder.labelled_files(cfg(tmp_path / "audio"), tmp_path / "audio")
    assert set(table["label"]) == {"dog", "rain", "siren"}
    with pytest.raises(BadInput, match="group_pattern .* matches no file name"):
        folder.labelled_files(
            cfg(tmp_path / "audio", group_pattern="^spk(\\d+)_"), tmp_path / "audio"
        )


def test_a_changed_folder_changes_its_listing(tmp_path):
    write_tree(tmp_path / "audio")
    before = folder.listing(cfg(tmp_path / "audio"))
    assert folder.listing(cfg(tmp_path / "audio")) == before
    sf.write(tmp_path / "audio" / "dog" / "new.wav", np.zeros(800, np.float32), 8000)
    assert folder.listing(cfg(tmp_path / "audio")) != before
