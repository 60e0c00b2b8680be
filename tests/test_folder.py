"""`data.source: folder`: indexing, grouped stratified splits, bad trees named, metadata."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

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
                # every file's bytes differ: copies are a case of their own
                value = 0.1 * (t + 1) + 0.001 * s
                sf.write(path, np.full(800 + 100 * c, value, np.float32), 8000)


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


def paths_of(root):
    return sorted(p.as_posix() for p in root.rglob("*.wav"))


def link(root, name, target):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


@pytest.mark.parametrize(
    "links",
    [
        [("dog/loop", "..")],
        [("dog/sub/up", "../..")],
        [("dog/up.wav", ".")],
        [("dog/self.wav", "self.wav")],
        [("rain/a.flac", "b.flac"), ("rain/b.flac", "a.flac")],
        [("siren/gone.wav", "missing.wav")],
    ],
    ids=["to-root", "two-up", "audio-named-to-itself", "self-loop", "mutual", "dangling"],
)
def test_symlink_loops_and_dangling_links_are_skipped_and_named(tmp_path, caplog, links):
    """rglob returned links named like audio that loop, lead to a folder or lead nowhere, and
    hashing them crashed (ELOOP, IsADirectoryError, FileNotFoundError); a loop is now named."""
    write_tree(tmp_path / "audio")
    expected = paths_of(tmp_path / "audio")
    for name, target in links:
        link(tmp_path / "audio", name, target)
    with caplog.at_level(logging.WARNING, logger="cola_audio.folder"):
        table = folder.index(cfg(tmp_path / "audio"), tmp_path / "raw")
    assert sorted(table["path"]) == expected
    assert "skipped" in caplog.text and links[0][0] in caplog.text


def test_symlinks_that_resolve_are_followed_once(tmp_path, caplog):
    """A linked class folder, a linked subfolder of a class and a linked file are indexed; a
    second path to a folder already walked adds nothing."""
    write_tree(tmp_path / "audio")
    expected = paths_of(tmp_path / "audio")
    for i, where in enumerate(["owls/0000_nohash_0.wav", "more/0001_nohash_5.wav", "one.wav"]):
        (tmp_path / where).parent.mkdir(exist_ok=True)
        sf.write(tmp_path / where, np.full(3000 + i, 0.3, np.float32), 8000)
    for s in range(1, 6):  # the linked class needs enough speakers for the three splits
        sf.write(tmp_path / f"owls/{s:04x}_nohash_0.wav", np.full(3100 + s, 0.3, np.float32), 8000)
    link(tmp_path / "audio", "owl", tmp_path / "owls")
    link(tmp_path / "audio", "dog/more", tmp_path / "more")
    link(tmp_path / "audio", "rain/0005_nohash_7.wav", tmp_path / "one.wav")
    link(tmp_path / "audio", "siren/again", ".")
    with caplog.at_level(logging.WARNING, logger="cola_audio.folder"):
        table = folder.index(cfg(tmp_path / "audio"), tmp_path / "raw")
    audio = (tmp_path / "audio").as_posix()
    added = [f"{audio}/{p}" for p in ["dog/more/0001_nohash_5.wav", "rain/0005_nohash_7.wav"]]
    owls = [f"{audio}/owl/{s:04x}_nohash_0.wav" for s in range(6)]
    assert sorted(table["path"]) == sorted(expected + added + owls)
    assert "siren/again" in caplog.text and "matches" not in caplog.text


@pytest.mark.parametrize(
    ("folders", "inner"),
    [
        (["dog/clip.wav"], []),
        (["rain/LOUD.MP3", "siren/x.flac"], []),
        (["siren/deep/nest.ogg"], []),
        (["dog/box.aiff"], ["dog/box.aiff/0003_nohash_9.wav"]),
    ],
    ids=["empty", "upper-case-and-two", "nested", "holding-audio"],
)
def test_a_folder_named_like_audio_is_not_a_file(tmp_path, folders, inner):
    """It was listed as audio and hashing it raised IsADirectoryError; the audio inside counts."""
    write_tree(tmp_path / "audio")
    expected = paths_of(tmp_path / "audio")
    for name in folders:
        (tmp_path / "audio" / name).mkdir(parents=True)
    for i, name in enumerate(inner):
        sf.write(tmp_path / "audio" / name, np.full(5000 + i, 0.2, np.float32), 8000)
    table = folder.index(cfg(tmp_path / "audio"), tmp_path / "raw")
    assert sorted(table["path"]) == sorted(expected + [f"{tmp_path}/audio/{n}" for n in inner])
    assert all(os.path.isfile(p) for p in table["path"])


@pytest.mark.parametrize(
    ("denied", "expected"),
    [
        (["audio/dog/0000_nohash_0.wav"], r"1 file\(s\) cannot be read"),
        (
            [f"audio/{c}/0001_nohash_{t}.wav" for c in ("dog", "rain") for t in (0, 1)],
            r"4 file\(s\) cannot be read .* and 1 more",
        ),
        (["extra/x.wav"], r"extra: 1 file\(s\) cannot be read"),
    ],
    ids=["one", "four", "unlabelled"],
)
def test_unreadable_files_are_refused_in_one_line(tmp_path, monkeypatch, denied, expected):
    """A PermissionError while hashing was a traceback naming only the first file (simulated:
    the tests run as root, whom chmod does not stop)."""
    write_tree(tmp_path / "audio")
    (tmp_path / "extra").mkdir()
    sf.write(tmp_path / "extra" / "x.wav", np.zeros(4000, np.float32), 8000)
    refused = {(tmp_path / p).as_posix() for p in denied}
    real = folder.digest.file_digest

    def file_digest(path, algorithm="sha1"):
        if str(path) in refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, algorithm)

    monkeypatch.setattr(folder.digest, "file_digest", file_digest)
    with pytest.raises(BadInput, match=expected) as info:
        folder.index(
            cfg(tmp_path / "audio", unlabelled_path=str(tmp_path / "extra")), tmp_path / "raw"
        )
    message = str(info.value)
    assert "\n" not in message and sorted(refused)[0] in message and "chmod" in message


@pytest.mark.parametrize("denied", ["dog/sub", "rain"])
def test_an_unreadable_folder_is_refused_not_skipped(tmp_path, monkeypatch, denied):
    """rglob skipped a folder it could not list: its audio silently left the data set."""
    write_tree(tmp_path / "audio")
    (tmp_path / "audio" / "dog" / "sub").mkdir()
    refused = (tmp_path / "audio" / denied).as_posix()
    real = os.scandir

    def scandir(path="."):
        if Path(path).as_posix() == refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(folder.os, "scandir", scandir)
    with pytest.raises(BadInput, match=f"cannot be listed: {re.escape(refused)} \\(Permission"):
        folder.index(cfg(tmp_path / "audio"), tmp_path / "raw")


def split_of(speaker):
    return "train" if speaker < 4 else ("val" if speaker == 4 else "test")


def one_label_csv(tmp_path, splits):
    rows = [(f"dog/{s:04x}_nohash_{t}.wav", "dog", split_of(s)) for s in range(6) for t in range(2)]
    table = pd.DataFrame(rows, columns=["path", "label", "split"])
    (table if splits else table.drop(columns="split")).to_csv(tmp_path / "labels.csv", index=False)
    return {"labels_csv": str(tmp_path / "labels.csv")}


@pytest.mark.parametrize(
    "setup",
    [
        lambda tmp_path: write_tree(tmp_path / "audio", classes=("dog",)) or {},
        lambda tmp_path: (
            write_tree(tmp_path / "audio", classes=("dog", "_background_noise_", ".cache")) or {}
        ),
        lambda tmp_path: write_tree(tmp_path / "audio") or one_label_csv(tmp_path, False),
        lambda tmp_path: write_tree(tmp_path / "audio") or one_label_csv(tmp_path, True),
    ],
    ids=["one-class-folder", "one-class-beside-non-classes", "csv", "csv-with-splits"],
)
def test_a_single_class_is_refused(tmp_path, setup):
    """One class indexed, split and trained a classifier whose accuracy is 1.0 by construction."""
    extra = setup(tmp_path)
    with pytest.raises(BadInput, match="needs at least 2 classes, found 1: dog;"):
        folder.index(cfg(tmp_path / "audio", **extra), tmp_path / "raw")


@pytest.mark.parametrize("pattern", ["([a-z", "(?P<spk", "a{2,1}", "*_nohash", "(?<=a+)_"])
def test_an_invalid_group_pattern_is_named(tmp_path, pattern):
    """re.error escaped as a traceback from wherever the pattern was first used."""
    write_tree(tmp_path / "audio")
    expected = f"group_pattern {re.escape(repr(pattern))} is not a valid regular expression \\("
    with pytest.raises(BadInput, match=expected):
        folder.group_of("dog/0000_nohash_0.wav", pattern)
    with pytest.raises(BadInput, match=expected):
        folder.index(cfg(tmp_path / "audio", group_pattern=pattern), tmp_path / "raw")


@pytest.mark.parametrize(
    "renamed",
    [
        ["dog/0000_nohash_0.wav"],
        ["rain/0003_nohash_1.wav", "siren/0005_nohash_0.wav", "dog/0002_nohash_1.wav"],
        [f"siren/{s:04x}_nohash_{t}.wav" for s in range(6) for t in range(2)],
    ],
    ids=["one", "three-in-three-classes", "a-whole-class"],
)
def test_a_pattern_matching_only_some_names_is_warned_about(tmp_path, caplog, renamed):
    """The unmatched files silently became one-file groups, so their speaker could span
    splits; the matching is kept, and the counts and two unmatched names are logged."""
    write_tree(tmp_path / "audio")
    for i, name in enumerate(renamed):
        path = tmp_path / "audio" / name
        path.rename(path.with_name(f"rec-{i:02d}.wav"))
    with caplog.at_level(logging.WARNING, logger="cola_audio.folder"):
        table = folder.labelled_files(cfg(tmp_path / "audio"), tmp_path / "audio")
    total = len(table)
    assert f"matches {total - len(renamed)} of {total} file names" in caplog.text
    assert "not e.g. rec-00.wav" + (", rec-01.wav" if len(renamed) > 1 else "") in caplog.text
    unmatched = table["path"].str.contains("/rec-")
    assert (table["group"][unmatched] == table["path"][unmatched]).all()
    assert set(table["group"][~unmatched]) <= {f"{s:04x}" for s in range(6)}


def copy(root, pairs):
    for src, dst in pairs:
        shutil.copyfile(root / src, root / dst)


@pytest.mark.parametrize(
    ("pattern", "pairs", "copies"),
    [
        (SPEAKER, [("dog/0000_nohash_0.wav", "dog/0004_nohash_1.wav")], 1),
        (
            SPEAKER,
            [
                ("rain/0000_nohash_0.wav", "rain/0001_nohash_0.wav"),
                ("siren/0001_nohash_1.wav", "siren/0004_nohash_1.wav"),
            ],
            2,
        ),
        (None, [("dog/0000_nohash_0.wav", "dog/0004_nohash_0.wav")], 1),
        (
            None,
            [
                ("rain/0001_nohash_0.wav", "rain/0002_nohash_0.wav"),
                ("rain/0001_nohash_0.wav", "rain/0005_nohash_1.wav"),
            ],
            2,
        ),
    ],
    ids=["two-speakers", "a-chain-of-three-speakers", "no-pattern", "no-pattern-three-copies"],
)
def test_copies_within_a_class_are_kept_in_one_split(tmp_path, caplog, pattern, pairs, copies):
    """Byte-identical clips were split apart: a val/test clip was also a training clip."""
    write_tree(tmp_path / "audio")
    copy(tmp_path / "audio", pairs)
    with caplog.at_level(logging.WARNING, logger="cola_audio.folder"):
        table = folder.index(cfg(tmp_path / "audio", group_pattern=pattern), tmp_path / "raw")
    assert (table.groupby("sha1")[["split", "group"]].nunique() == 1).all().all()
    assert f"{copies} file(s) repeat the bytes of another file of their class" in caplog.text
    folder.check_splits(table, "index")  # each class still in every split, no group split


def csv_for(tmp_path, extra=(), splits=True):
    rows = [
        (f"{label}/{s:04x}_nohash_{t}.wav", label, split_of(s))
        for label in ("dog", "rain", "siren")
        for s in range(6)
        for t in range(2)
    ] + list(extra)
    table = pd.DataFrame(rows, columns=["path", "label", "split"])
    (table if splits else table.drop(columns="split")).to_csv(tmp_path / "labels.csv", index=False)
    return {"labels_csv": str(tmp_path / "labels.csv")}


def extra_copy(tmp_path, src, dst, label, split):
    (tmp_path / "audio" / dst).parent.mkdir(exist_ok=True)
    shutil.copyfile(tmp_path / "audio" / src, tmp_path / "audio" / dst)
    return csv_for(tmp_path, [(dst, label, split)], splits=split is not None)


@pytest.mark.parametrize(
    ("setup", "expected", "named"),
    [
        (
            lambda t: copy(t / "audio", [("dog/0000_nohash_0.wav", "rain/0002_nohash_1.wav")]),
            "1 audio content.* under different labels",
            ["dog/0000_nohash_0.wav (dog)", "rain/0002_nohash_1.wav (rain)"],
        ),
        (
            lambda t: link(t / "audio", "dog/cats", "../rain"),
            "12 audio content.* under different labels",
            ["dog/cats/0000_nohash_0.wav (dog) = ", "rain/0000_nohash_0.wav (rain)"],
        ),
        (
            lambda t: extra_copy(t, "rain/0000_nohash_0.wav", "extra/a.wav", "dog", None),
            "1 audio content.* under different labels",
            ["extra/a.wav (dog)", "rain/0000_nohash_0.wav (rain)"],
        ),
        (
            lambda t: (
                copy(t / "audio", [("dog/0000_nohash_0.wav", "dog/0005_nohash_0.wav")])
                or csv_for(t)
            ),
            "1 audio content.* in two splits",
            ["dog/0000_nohash_0.wav (train)", "dog/0005_nohash_0.wav (test)"],
        ),
        (
            lambda t: extra_copy(t, "siren/0004_nohash_1.wav", "extra/b.wav", "siren", "train"),
            "1 audio content.* in two splits",
            ["extra/b.wav (train)", "siren/0004_nohash_1.wav (val)"],
        ),
    ],
    ids=["two-class-folders", "a-class-linked-in-a-class", "csv-labels", "csv-splits", "csv-extra"],
)
def test_copies_across_labels_or_given_splits_are_refused(tmp_path, setup, expected, named):
    """One clip under two classes, or a test clip that is also a training clip, was indexed."""
    write_tree(tmp_path / "audio")
    extra = setup(tmp_path) or {}
    with pytest.raises(BadInput, match=expected) as info:
        folder.index(cfg(tmp_path / "audio", **extra), tmp_path / "raw")
    for fragment in named:
        assert fragment in str(info.value)


def test_merge_groups_joins_every_group_sharing_bytes():
    groups = ["a", "b", "c", "d", "e", "b"]
    hashes = ["1", "2", "1", "3", "2", "4"]  # a~c by bytes, b~e; d alone
    assert folder.merge_groups(groups, hashes) == ["a", "b", "a", "d", "b", "b"]
    assert folder.merge_groups(["z", "y", "x"], ["1", "1", "1"]) == ["x", "x", "x"]


@pytest.mark.parametrize(
    "pattern",
    [r"^(?:([0-9a-f]+)_nohash_)?", r"^([0-9a-f]+)_nohash_|^rec", r"^([0-9a-f]*)"],
    ids=["optional-group", "group-in-one-branch", "empty-capture"],
)
def test_a_match_whose_group_caught_nothing_counts_as_no_match(tmp_path, caplog, pattern):
    """Group 1 did not take part (or was empty) for the renamed files: their group became None
    (or ""), so they got no split, were written with split "" and broke prepare later."""
    write_tree(tmp_path / "audio")
    renamed = ["dog/0000_nohash_0.wav", "rain/0003_nohash_1.wav", "siren/0005_nohash_0.wav"]
    for i, name in enumerate(renamed):
        path = tmp_path / "audio" / name
        path.rename(path.with_name(f"rec-{i:02d}.wav"))
    with caplog.at_level(logging.WARNING, logger="cola_audio.folder"):
        table = folder.index(cfg(tmp_path / "audio", group_pattern=pattern), tmp_path / "raw")
    written = folder.read_index(tmp_path / "raw")
    assert set(written["split"]) == set(folder.SPLITS) == set(table["split"])
    unmatched = written["path"].str.contains("/rec-")
    assert unmatched.sum() == len(renamed)
    assert (written["group"][unmatched] == written["path"][unmatched]).all()
    assert set(written["group"][~unmatched]) <= {f"{s:04x}" for s in range(6)}
    total = len(written)
    assert f"matches {total - len(renamed)} of {total} file names" in caplog.text


def labels_csv_at(tmp_path, kind):
    csv = tmp_path / "labels.csv"
    if kind == "folder":
        csv.mkdir()
    elif kind == "empty":
        csv.write_bytes(b"")
    elif kind == "latin-1":
        csv.write_bytes("path,label\ndog/0000_nohash_0.wav,chien é\n".encode("latin-1"))
    elif kind == "ragged":
        csv.write_text("path,label\ndog/0000_nohash_0.wav,dog\ndog/0000_nohash_1.wav,dog,x,y\n")
    return csv


@pytest.mark.parametrize(
    ("kind", "error", "fix"),
    [
        ("missing", MissingInput, "no such file; give the path of a CSV"),
        ("folder", BadInput, "is a folder, not a CSV file"),
        ("empty", BadInput, "the file is empty; it needs a header line path,label"),
        ("latin-1", BadInput, r"not UTF-8 text \(line 2 holds byte b'\\xe9'\); save it as UTF-8"),
        ("ragged", BadInput, "not a readable CSV .*line 3.*fix it"),
    ],
)
def test_an_unreadable_labels_csv_is_named_in_one_line(tmp_path, kind, error, fix):
    write_tree(tmp_path / "audio")
    csv = labels_csv_at(tmp_path, kind)
    with pytest.raises(error, match=f"^data.folder.labels_csv {re.escape(str(csv))}: {fix}"):
        folder.index(cfg(tmp_path / "audio", labels_csv=str(csv)), tmp_path / "raw")


@pytest.mark.parametrize(
    ("where", "shown_as"),
    [
        ("dog/caf\xe9.wav", r"b'dog/caf\\xe9.wav'"),
        ("chat\xe9/0000_nohash_0.wav", r"b'chat\\xe9'"),
        ("extra/caf\xe9.wav", r"b'caf\\xe9.wav'"),
    ],
    ids=["file-in-a-class", "class-folder", "unlabelled-file"],
)
def test_names_that_are_not_utf8_are_refused_before_hashing(tmp_path, monkeypatch, where, shown_as):
    """pandas failed writing the index with a UnicodeEncodeError, after hashing everything."""
    write_tree(tmp_path / "audio")
    (tmp_path / "extra").mkdir()
    base = tmp_path if where.startswith("extra/") else tmp_path / "audio"
    bad = os.fsencode(base) + b"/" + where.encode("latin-1")
    os.makedirs(os.path.dirname(bad), exist_ok=True)
    with open(bad, "wb") as fh:
        sf.write(fh, np.full(800, 0.3, np.float32), 8000, format="WAV")
    hashed = []
    real = folder.digest.file_digest

    def file_digest(path, algorithm="sha1"):
        hashed.append(str(path))
        return real(path, algorithm)

    monkeypatch.setattr(folder.digest, "file_digest", file_digest)
    with pytest.raises(BadInput, match="1 file name.* not valid UTF-8: ") as info:
        folder.index(
            cfg(tmp_path / "audio", unlabelled_path=str(tmp_path / "extra")), tmp_path / "raw"
        )
    assert re.search(shown_as, str(info.value)) and "rename them" in str(info.value)
    assert not (tmp_path / "raw" / folder.INDEX).exists()
    if where.startswith("extra/"):
        assert not any("/extra/" in p for p in hashed)
    else:
        assert hashed == []
