"""Metadata JSON: official split, stable labels, no evaluation audio in pretraining."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from cola_audio import featurize, fma, meta, prepare
from cola_audio.errors import BadInput
from conftest import FMA_REAL, require

REAL_FORMAT_TRACKS = """\
,album,album,artist,artist,set,set,track,track,track,track,track,track
,id,title,id,bio,split,subset,bit_rate,duration,genre_top,genres,genres_all,title
track_id,,,,,,,,,,,,
2,1,AWOL - A Way Of Life,1,"A line
with a quoted newline, like the release",training,small,256000,168,Hip-Hop,[21],[21],Food
5,1,AWOL - A Way Of Life,1,,training,small,256000,206,Hip-Hop,[21],[21],This World
10,6,Constant Hitmaker,6,,test,small,192000,161,Pop,[10],[10],Freeway
140,61,Ashes,54,,validation,small,128000,253,Folk,[17],[17],Queen Of The Wires
141,60,Ashes,54,,validation,small,128000,182,Folk,[17],[17],Ohio
148,66,Gilles,58,,training,medium,256000,230,Experimental,[1],"[1, 38]",Blackout 2
150,66,Gilles,58,,test,large,256000,100,,"[4, 12]","[4, 12]",No root
182,66,Gilles,58,,training,large,256000,100,Rock,[25],"[12, 25]",Punk song
"""


@pytest.fixture
def real_format_root(tmp_path):
    meta = tmp_path / "raw" / "fma_metadata"
    meta.mkdir(parents=True)
    (meta / "tracks.csv").write_text(REAL_FORMAT_TRACKS)
    shutil.copy(require(FMA_REAL / "fma_metadata" / "genres.csv"), meta / "genres.csv")
    return tmp_path


def _params(default_params, **data):
    p = json.loads(json.dumps(default_params))
    p["data"].update(data)
    return p


def test_reads_the_release_format(real_format_root):
    tracks = fma.read_tracks(real_format_root / "raw" / "fma_metadata" / "tracks.csv")
    assert tracks.index.name == "track_id"
    assert tracks.loc[2, ("artist", "bio")].startswith("A line\nwith")
    assert tracks.loc[148, ("track", "genres_all")] == [1, 38]
    assert tracks.loc[150, ("track", "genre_top")] == ""
    subset = tracks[("set", "subset")]
    assert list(tracks.index[subset <= "medium"]) == [2, 5, 10, 140, 141, 148]
    genres = fma.read_genres(real_format_root / "raw" / "fma_metadata" / "genres.csv")
    assert len(genres) == 163 and (genres["parent"] == 0).sum() == 16


def test_metadata_documents(real_format_root, default_params):
    p = _params(default_params)
    raw = real_format_root / "raw"
    docs = prepare.run(p, out_dir=real_format_root / "meta", raw_dir=raw)
    ft = docs["finetune"]
    assert docs["labels"]["genres"] == ["Folk", "Hip-Hop", "Pop"]
    by_id = {t["track_id"]: t for t in ft["tracks"]}
    assert by_id[2] == {
        "track_id": 2,
        "genre": "Hip-Hop",
        "label": 1,
        "split": "train",
        "audio": f"{raw.as_posix()}/fma_small/000/000002.mp3",
    }
    assert by_id[140]["split"] == "val" and by_id[10]["split"] == "test"
    assert ft["split_counts"] == {"train": 2, "val": 2, "test": 1}
    pretrain_ids = [t["track_id"] for t in docs["pretrain"]["tracks"]]
    assert pretrain_ids == [2, 5, 148, 150, 182]  # 10, 140, 141 are fine-tuning val/test
    on_disk = json.loads((real_format_root / "meta" / "finetune.json").read_text())
    assert on_disk == ft


def test_medium_subset_and_empty_genre_top(real_format_root, default_params):
    p = _params(default_params, finetune_subset="medium")
    docs = prepare.run(p, out_dir=real_format_root / "meta", raw_dir=real_format_root / "raw")
    ids = [t["track_id"] for t in docs["finetune"]["tracks"]]
    assert ids == [2, 5, 10, 140, 141, 148]
    p = _params(default_params, finetune_subset="large")
    docs = prepare.build(
        fma.read_tracks(real_format_root / "raw/fma_metadata/tracks.csv"), p["data"], p["prepare"]
    )
    assert docs["finetune"]["dropped_without_genre_top"] == [150]


def test_label_ids_do_not_depend_on_row_order(tiny_data):
    p = tiny_data["params"]
    tracks = fma.read_tracks(tiny_data["raw"] / "fma_metadata" / "tracks.csv")
    shuffled = tracks.sample(frac=1.0, random_state=np.random.RandomState(3))
    a = prepare.build(tracks, p["data"], p["prepare"], tiny_data["raw"])
    b = prepare.build(shuffled, p["data"], p["prepare"], tiny_data["raw"])
    assert a == b
    assert a["labels"]["genres"] == sorted(a["labels"]["genres"])


def test_pretraining_set_excludes_evaluation_audio(tiny_data):
    finetune = json.loads((tiny_data["meta"] / "finetune.json").read_text())["tracks"]
    pretrain = json.loads((tiny_data["meta"] / "pretrain.json").read_text())["tracks"]
    held_out = {t["track_id"] for t in finetune if t["split"] in ("val", "test")}
    train = {t["track_id"] for t in finetune if t["split"] == "train"}
    pretrain_ids = {t["track_id"] for t in pretrain}
    assert held_out and pretrain_ids.isdisjoint(held_out)
    assert train <= pretrain_ids  # unlabelled use of training audio is fine


def test_guard_off_lets_evaluation_audio_in(tiny_data):
    p = tiny_data["params"]
    tracks = fma.read_tracks(tiny_data["raw"] / "fma_metadata" / "tracks.csv")
    guard = {"exclude_eval_from_pretrain": False, "exclude_eval_artists": False}
    docs = prepare.build(tracks, p["data"], guard)
    assert docs["pretrain"]["excluded_eval_tracks"] == 0
    assert len(docs["pretrain"]["tracks"]) == len(tracks)


def test_bad_tracks_csv_is_named(tmp_path, default_params):
    meta = tmp_path / "raw" / "fma_metadata"
    meta.mkdir(parents=True)
    pd.DataFrame({"a": [1]}).to_csv(meta / "tracks.csv")
    p = _params(default_params)
    with pytest.raises(ValueError, match=r"tracks.csv: not an FMA tracks.csv"):
        prepare.run(p, out_dir=tmp_path / "meta", raw_dir=tmp_path / "raw")
    with pytest.raises(FileNotFoundError, match="cola download"):
        fma.read_tracks(tmp_path / "nope.csv")


def test_duplicate_track_ids_are_an_error_naming_them(real_format_root, default_params):
    """Two rows for track 10 would put one clip twice into the metadata (and into two splits)."""
    tracks_csv = real_format_root / "raw" / "fma_metadata" / "tracks.csv"
    row_10 = next(line for line in REAL_FORMAT_TRACKS.splitlines() if line.startswith("10,"))
    tracks_csv.write_text(REAL_FORMAT_TRACKS + row_10.replace(",test,", ",training,") + "\n")
    with pytest.raises(BadInput, match=r"tracks.csv: 1 track id\(s\) listed more than once \(10\)"):
        prepare.run(default_params, real_format_root / "meta", real_format_root / "raw")
    assert not (real_format_root / "meta").exists()


def test_artist_guard_leaves_out_other_tracks_by_evaluation_artists(
    real_format_root, default_params
):
    """Track 200 (fma_large only, training) is by artist 54, whose tracks 140/141 are fine-tuning
    validation: the stricter guard keeps it out of pretraining, the track guard alone does not."""
    tracks_csv = real_format_root / "raw" / "fma_metadata" / "tracks.csv"
    extra = "200,61,Ashes,54,,training,large,128000,100,Folk,[17],[17],Ohio again\n"
    tracks_csv.write_text(REAL_FORMAT_TRACKS + extra)
    tracks = fma.read_tracks(tracks_csv)
    strict = prepare.build(tracks, default_params["data"], default_params["prepare"])
    assert default_params["prepare"]["exclude_eval_artists"]  # on by default
    assert [t["track_id"] for t in strict["pretrain"]["tracks"]] == [2, 5, 148, 150, 182]
    assert strict["pretrain"]["excluded_eval_artist_tracks"] == 1
    loose_guard = {"exclude_eval_from_pretrain": True, "exclude_eval_artists": False}
    loose = prepare.build(tracks, default_params["data"], loose_guard)
    assert [t["track_id"] for t in loose["pretrain"]["tracks"]] == [2, 5, 148, 150, 182, 200]
    assert loose["pretrain"]["excluded_eval_artist_tracks"] == 0


@pytest.mark.parametrize(
    ("name", "damage", "why"),
    [
        ("finetune", lambda d: d["tracks"][0].update(label="rock"), "invalid at tracks.0.label"),
        ("pretrain", lambda d: d["tracks"].append(d["tracks"][0]), "listed more than once"),
        ("labels", lambda d: d.pop("genres"), "'genres' is a required property"),
    ],
)
def test_a_damaged_metadata_file_is_named_where_it_is_read(tiny_data, tmp_path, name, damage, why):
    meta_dir = tmp_path / "meta"
    shutil.copytree(tiny_data["meta"], meta_dir)
    doc = json.loads((meta_dir / f"{name}.json").read_text())
    damage(doc)
    (meta_dir / f"{name}.json").write_text(json.dumps(doc))
    with pytest.raises(BadInput, match=rf"{name}.json: .*{why}.*rerun `cola prepare`"):
        meta.read(meta_dir, name)
    if name != "labels":
        with pytest.raises(BadInput, match=rf"{name}.json"):
            featurize.tracks_to_featurize(meta_dir)


def test_a_label_id_that_disagrees_with_labels_json_is_named(tiny_data, tmp_path):
    meta_dir = tmp_path / "meta"
    shutil.copytree(tiny_data["meta"], meta_dir)
    doc = json.loads((meta_dir / "finetune.json").read_text())
    genres, _ = meta.read_labelled(meta_dir)
    assert genres == json.loads((meta_dir / "labels.json").read_text())["genres"]
    doc["tracks"][3]["label"] = (doc["tracks"][3]["label"] + 1) % len(genres)
    (meta_dir / "finetune.json").write_text(json.dumps(doc))
    tid = doc["tracks"][3]["track_id"]
    with pytest.raises(BadInput, match=rf"finetune.json: label ids of track\(s\) {tid} disagree"):
        meta.read_labelled(meta_dir)
