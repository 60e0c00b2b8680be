"""The embedded dataset must look like the FMA release to every reader downstream."""

import hashlib
import itertools

import numpy as np
import pandas as pd
import soundfile as sf

from cola_audio import fma, synthetic
from conftest import FMA_REAL, require


def test_tracks_csv_has_the_release_layout(tiny_data):
    path = tiny_data["raw"] / "fma_metadata" / "tracks.csv"
    lines = path.read_text().splitlines()
    assert lines[0].startswith(",album,album,artist")
    assert lines[1].startswith(",id,title,id")
    assert lines[2].startswith("track_id,,,")
    tracks = fma.read_tracks(path)
    for col in [
        ("set", "split"),
        ("set", "subset"),
        ("track", "genre_top"),
        ("track", "genres"),
        ("track", "genres_all"),
        ("track", "duration"),
        ("track", "bit_rate"),
        ("track", "title"),
        ("artist", "id"),
        ("album", "id"),
    ]:
        assert col in tracks.columns, col
    assert isinstance(tracks[("track", "genres")].iloc[0], list)
    assert set(tracks[("set", "subset")].unique()) >= {"small", "large"}


def test_genres_use_the_real_ids_and_schema(tiny_data):
    ours = fma.read_genres(tiny_data["raw"] / "fma_metadata" / "genres.csv")
    real = fma.read_genres(require(FMA_REAL / "fma_metadata" / "genres.csv"))
    assert list(ours.columns) == list(real.columns)
    for gid, row in ours.iterrows():
        assert real.loc[gid, "title"] == row["title"]
        assert real.loc[gid, "parent"] == row["parent"]
    small = fma.read_tracks(tiny_data["raw"] / "fma_metadata" / "tracks.csv")
    small_genres = set(small.loc[small[("set", "subset")] == "small", ("track", "genre_top")])
    assert small_genres == {
        "Electronic",
        "Experimental",
        "Folk",
        "Hip-Hop",
        "Instrumental",
        "International",
        "Pop",
        "Rock",
    }
    assert small_genres <= set(real.loc[real["parent"] == 0, "title"])


def test_audio_folders_and_checksums(tiny_data):
    raw = tiny_data["raw"]
    tracks = fma.read_tracks(raw / "fma_metadata" / "tracks.csv")
    small = fma.read_checksums(raw / "fma_small" / "checksums")
    large = fma.read_checksums(raw / "fma_large" / "checksums")
    assert set(small) == {
        fma.audio_relpath(t) for t in tracks.index[tracks[("set", "subset")] == "small"]
    }
    assert set(small) < set(large)  # small ⊂ large, like the release
    assert len(large) == len(tracks)
    for rel, digest in large.items():
        data = (raw / "fma_large" / rel).read_bytes()
        assert hashlib.sha1(data).hexdigest() == digest
        if rel in small:
            assert (raw / "fma_small" / rel).read_bytes() == data


def test_formats_vary_and_faults_are_planted(tiny_data):
    raw = tiny_data["raw"]
    rates, channels = set(), set()
    for path in sorted((raw / "fma_large").glob("*/*.mp3"))[:40]:
        try:
            info = sf.info(path)
        except sf.LibsndfileError:
            continue
        rates.add(info.samplerate)
        channels.add(info.channels)
    assert len(rates) >= 2 and channels == {1, 2}
    _, plans = synthetic.plan_dataset(tiny_data["params"]["data"]["synthetic"])
    assert sorted(p.fault for p in plans if p.fault) == sorted(synthetic.FAULTS)
    empty = next(p for p in plans if p.fault == "empty")
    assert (raw / "fma_large" / fma.audio_relpath(empty.track_id)).stat().st_size == 0


def test_each_artist_stays_in_one_split(tiny_data):
    tracks = fma.read_tracks(tiny_data["raw"] / "fma_metadata" / "tracks.csv")
    small = tracks[tracks[("set", "subset")] == "small"]
    per_artist = small[("set", "split")].groupby(small[("artist", "id")]).nunique()
    assert (per_artist == 1).all()
    counts = small[("set", "split")].value_counts()
    assert counts["training"] > counts["validation"] > 0 and counts["test"] > 0


def test_plan_and_render_are_deterministic(tiny_params):
    cfg = tiny_params["data"]["synthetic"]
    t1, p1 = synthetic.plan_dataset(cfg)
    t2, p2 = synthetic.plan_dataset(cfg)
    pd.testing.assert_frame_equal(t1, t2)
    assert p1 == p2
    plan = next(p for p in p1 if p.fault is None)
    assert synthetic.render_track(plan) == synthetic.render_track(plan)
    other = dict(cfg, seed=cfg["seed"] + 1)
    assert synthetic.plan_dataset(other)[1] != p1


def test_genre_signatures_differ_but_overlap():
    """Spectral centroids separate genres on average, yet their ranges overlap."""
    rng = np.random.default_rng(0)
    centroids = {}
    for genre in ("Hip-Hop", "Rock", "Instrumental"):
        values = []
        for _ in range(6):
            clip = synthetic.synth_clip(synthetic.SIGNATURES[genre], 3.0, 16000, rng)
            spec = np.abs(np.fft.rfft(clip))
            freqs = np.fft.rfftfreq(len(clip), 1 / 16000)
            values.append(float((spec * freqs).sum() / spec.sum()))
        centroids[genre] = values
    means = {g: np.mean(v) for g, v in centroids.items()}
    assert len({round(m, -1) for m in means.values()}) == 3
    assert max(means.values()) / min(means.values()) > 1.2
    ranges = {g: (min(v), max(v)) for g, v in centroids.items()}
    overlapping = [
        (a, b)
        for a, b in itertools.combinations(ranges, 2)
        if ranges[a][0] <= ranges[b][1] and ranges[b][0] <= ranges[a][1]
    ]
    assert overlapping, ranges  # no genre is told apart by its centroid alone
