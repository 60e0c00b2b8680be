"""The sharded feature store: faults recorded, reruns identical, kills never look complete."""

import hashlib
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from cola_audio import featurize, synthetic
from cola_audio.data import ClipWindows, window_starts
from cola_audio.store import FeatureStore


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_store_layout_and_index(tiny_data):
    features = tiny_data["features"]
    p = tiny_data["params"]["features"]
    index = pd.read_csv(features / "index.csv")
    assert list(index.columns) == ["track_id", "shard", "offset", "frames"]
    assert (index["shard"] == index["track_id"] % len(p["shards"])).all()
    assert index["track_id"].is_monotonic_increasing
    for shard in p["shards"]:
        mm = np.load(features / "shards" / f"{shard}.npy", mmap_mode="r")
        rows = index[index["shard"] == shard]
        assert mm.dtype == np.float16 and mm.shape == (rows["frames"].sum(), 64)
        assert (rows["offset"].diff().dropna() == rows["frames"].iloc[:-1].to_numpy()).all()


def test_faulty_clips_are_listed_with_reasons(tiny_data):
    skipped = pd.read_csv(tiny_data["features"] / "skipped.csv")
    reasons = " | ".join(skipped["reason"])
    assert len(skipped) == 4
    for expected in ("empty file (0 bytes)", "undecodable", "truncated stream", "too short"):
        assert expected in reasons
    summary = json.loads((tiny_data["features"] / "summary.json").read_text())
    assert summary["skipped"] == 4 and summary["featurized"] + 4 == summary["clips"]


def test_store_crops_read_the_right_frames(tiny_data):
    store = FeatureStore(tiny_data["features"])
    tid = int(store.track_ids[3])
    clip = np.asarray(store.clip(tid), dtype=np.float32)
    assert np.array_equal(store.crop(tid, 5, 20), clip[5:25])
    tail = store.crop(tid, len(clip) - 10, 30)
    assert np.array_equal(tail[:10], clip[-10:])
    assert np.all(tail[10:] == np.float32(np.log(1e-5)))  # padded with silence
    skipped = int(pd.read_csv(tiny_data["features"] / "skipped.csv")["track_id"].iloc[0])
    with pytest.raises(KeyError, match=f"track {skipped}"):
        store.crop(skipped, 0, 10)


def test_rerun_is_byte_identical(tiny_data, tmp_path):
    p = tiny_data["params"]
    for shard in reversed(p["features"]["shards"]):  # any order, any worker count
        featurize.run(
            p, shard=shard, meta_dir=tiny_data["meta"], out_dir=tmp_path, workers=1 + shard % 2
        )
    featurize.run(p, gather_only=True, meta_dir=tiny_data["meta"], out_dir=tmp_path)
    assert _digest(tmp_path) == _digest(tiny_data["features"])


def _write_faulty(folder: Path) -> dict[int, str]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    good = synthetic.synth_clip(synthetic.SIGNATURES["Pop"], 4.0, 22050, rng)
    sf.write(folder / "good.mp3", good, 22050, format="MP3")
    (folder / "empty.mp3").write_bytes(b"")
    (folder / "id3.mp3").write_bytes(synthetic.id3_only_bytes())
    data = (folder / "good.mp3").read_bytes()
    (folder / "truncated.mp3").write_bytes(data[: len(data) // 3])
    (folder / "garbage.mp3").write_bytes(rng.bytes(5000))
    sf.write(folder / "short.wav", good[:22050], 22050)
    return {
        i + 1: str(folder / name)
        for i, name in enumerate(
            [
                "good.mp3",
                "empty.mp3",
                "id3.mp3",
                "truncated.mp3",
                "garbage.mp3",
                "short.wav",
                "missing.mp3",
            ]
        )
    }


def test_each_bad_input_gets_its_reason(tmp_path, default_params):
    files = _write_faulty(tmp_path / "audio")
    feats = default_params["features"]
    reasons = {
        tid: featurize.featurize_file(tid, path, feats).reason for tid, path in files.items()
    }
    assert reasons[1] is None
    assert reasons[2] == "empty file (0 bytes)"
    assert reasons[3].startswith("undecodable")
    assert reasons[4].startswith("truncated stream: decoded")
    assert reasons[5].startswith("undecodable") or reasons[5].startswith("truncated")
    assert reasons[6].startswith("too short: 1.00 s")
    assert reasons[7] == "missing file"


def _flac_announcing(path: Path, wave: np.ndarray, sr: int, frames: int) -> None:
    """A FLAC whose STREAMINFO claims `frames` samples (a 36-bit field) whatever it holds."""
    sf.write(path, wave, sr)
    data = bytearray(path.read_bytes())
    start = 8 + 10  # 'fLaC', block header; then rate(20) channels(3) bits(5) total(36) bits
    packed = int.from_bytes(data[start : start + 8], "big")
    packed = (packed & ~((1 << 36) - 1)) | frames
    data[start : start + 8] = packed.to_bytes(8, "big")
    path.write_bytes(bytes(data))


def test_a_header_announcing_absurd_length_is_skipped_not_a_crash(tmp_path, default_params):
    """2^36 - 1 frames announced for 3 s of audio: reading it in one piece was a MemoryError of
    hundreds of GB that crashed the shard; now it is a skipped clip with its reason."""
    wave = np.sin(np.arange(48000, dtype=np.float32) / 10) * 0.1
    _flac_announcing(tmp_path / "liar.flac", wave, 16000, (1 << 36) - 1)
    with sf.SoundFile(tmp_path / "liar.flac") as fh:
        assert fh.frames == (1 << 36) - 1  # the file really lies
    result = featurize.featurize_file(1, str(tmp_path / "liar.flac"), default_params["features"])
    assert result.features is None
    assert result.reason.startswith("truncated stream: decoded")
    assert "68719476735 frames the header announces" in result.reason


def _wav_with_header(path: Path, offset: int, fmt: str, value: int) -> None:
    """A valid 1 s 16 kHz WAV whose fmt chunk then says `value` at `offset` (22: channels,
    24: sample rate)."""
    sf.write(path, np.sin(np.arange(16000, dtype=np.float32) / 10) * 0.1, 16000, "PCM_16")
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "reason"),
    [
        (24, "<I", 1, "sample rate 1 Hz"),
        (24, "<I", 3, "sample rate 3 Hz"),
        (24, "<I", 2**31 - 1, "sample rate 2147483647 Hz"),
        (22, "<H", 1000, "1000 channels"),
    ],
    ids=["rate-1Hz", "rate-3Hz", "rate-2^31", "1000-channels"],
)
def test_a_lying_header_is_skipped_before_anything_grows_with_it(
    tmp_path, default_params, offset, fmt, value, reason
):
    """16,000 frames announced at 1 Hz are 4.4 hours: resampling them to 16 kHz asked for a
    gigabyte and killed the shard. Such values are refused as the header is read."""
    path = tmp_path / "liar.wav"
    _wav_with_header(path, offset, fmt, value)
    result = featurize.featurize_file(1, str(path), default_params["features"])
    assert result.features is None
    assert result.reason.startswith("implausible header") and reason in result.reason


def test_a_directory_named_like_audio_is_skipped_as_a_directory(tmp_path, default_params):
    (tmp_path / "clip.wav").mkdir()
    result = featurize.featurize_file(1, str(tmp_path / "clip.wav"), default_params["features"])
    assert result.reason == "a directory, not an audio file"


@pytest.mark.parametrize("with_sha1", [False, True], ids=["decode", "sha1-check"])
def test_an_unreadable_file_is_skipped_with_its_reason(
    tmp_path, default_params, monkeypatch, with_sha1
):
    """Permission denied while hashing or decoding is a skipped clip, not a dead shard (root
    reads every file, so the denial is simulated)."""
    path = tmp_path / "locked.wav"
    _wav_with_header(path, 24, "<I", 16000)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    # libsndfile itself says only "System error." for a denied open: the file is opened first
    monkeypatch.setattr(featurize.digest, "file_digest", denied)
    monkeypatch.setattr(Path, "open", denied)
    sha1 = "0" * 40 if with_sha1 else None
    result = featurize.featurize_file(1, str(path), default_params["features"], sha1)
    assert result.features is None and result.reason.startswith("unreadable: permission denied")


@pytest.mark.parametrize(
    ("kept", "declared_size", "reason"),
    [
        (1 / 3, None, "truncated stream: the WAV header's data chunk declares"),
        (0.5, None, "truncated stream: the WAV header's data chunk declares"),
        (0.95, None, None),  # within features.min_decoded_fraction
        (1 / 3, 0xFFFFFFFF, None),  # a streamed WAV: its size was never known
    ],
    ids=["third", "half", "95-percent", "streamed"],
)
def test_a_wav_cut_short_is_skipped_not_featurized_as_a_shorter_clip(
    tmp_path, default_params, kept, declared_size, reason
):
    """libsndfile sizes a WAV by the bytes present: a 30 s file cut to its first third was
    featurized as a complete 10 s clip. Its header's data chunk says how long it was."""
    path = tmp_path / "cut.wav"
    sf.write(path, np.sin(np.arange(30 * 16000, dtype=np.float32) / 10) * 0.1, 16000, "PCM_16")
    data = bytearray(path.read_bytes())
    if declared_size is not None:
        struct.pack_into("<I", data, 40, declared_size)  # the data chunk's size field
    path.write_bytes(bytes(data[: 44 + int((len(data) - 44) * kept)]))
    result = featurize.featurize_file(1, str(path), default_params["features"])
    if reason is None:
        assert result.reason is None and result.features is not None
    else:
        assert result.features is None and result.reason.startswith(reason)


def test_a_fifo_named_like_audio_is_skipped_without_being_opened(tmp_path, default_params):
    """Opening a FIFO blocks until a writer comes: the shard would hang."""
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    done: list = []
    worker = threading.Thread(
        target=lambda: done.append(
            featurize.featurize_file(1, str(fifo), default_params["features"])
        ),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=30)
    if not done:  # unblock the reader so the thread ends
        with open(fifo, "wb"):
            pass
        pytest.fail("featurize_file blocked on a FIFO")
    assert done[0].reason == "not a regular file (a FIFO, socket or device)"


def test_non_finite_samples_are_skipped_with_their_reason(tmp_path, default_params):
    wave = np.sin(np.arange(48000, dtype=np.float32) / 10) * 0.1
    wave[1000] = np.nan
    sf.write(tmp_path / "nan.wav", wave, 16000, subtype="FLOAT")
    result = featurize.featurize_file(1, str(tmp_path / "nan.wav"), default_params["features"])
    assert result.features is None
    assert result.reason == "non-finite samples (NaN or infinity) in the decoded stream"


def test_threshold_fails_the_stage_naming_the_files(tmp_path, default_params):
    files = _write_faulty(tmp_path / "audio")
    feats = dict(default_params["features"], shards=[0], max_skipped_fraction=0.5)
    featurize.featurize_shard(files, 0, feats, tmp_path / "features", workers=1)
    with pytest.raises(featurize.TooManySkipped) as info:
        featurize.gather(feats, tmp_path / "features")
    message = str(info.value)
    assert "6 of 7 clips" in message
    for name in ("empty.mp3", "id3.mp3", "truncated.mp3", "missing.mp3"):
        assert name in message
    assert (tmp_path / "features" / "skipped.csv").is_file()
    assert not (tmp_path / "features" / "index.csv").exists()


def test_a_killed_shard_never_looks_complete(tiny_data, tmp_path, monkeypatch):
    p = tiny_data["params"]
    out = tmp_path / "features"
    shutil.copytree(tiny_data["features"], out)
    calls = {"n": 0}
    real = featurize.featurize_file

    def dies_midway(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("killed")
        return real(*args)

    monkeypatch.setattr(featurize, "featurize_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        featurize.run(p, shard=0, workers=1, meta_dir=tiny_data["meta"], out_dir=out)
    assert not (out / "shards" / "0.json").exists()
    assert not any(f.name.startswith(".") for f in (out / "shards").iterdir())
    with pytest.raises(FileNotFoundError, match="shard 0 is missing or incomplete"):
        featurize.gather(p["features"], out)


def test_shard_out_of_range_is_refused(tiny_data):
    with pytest.raises(ValueError, match=r"not one of features.shards = \[0, 1, 2, 3\]"):
        featurize.run(tiny_data["params"], shard=4)


def test_batched_crops_are_slices_of_each_clip_padded_with_silence(tiny_data):
    store = FeatureStore(tiny_data["features"])
    ids = store.track_ids[[0, 5, 9, 2, 5]]
    lengths = store.lengths[[0, 5, 9, 2, 5]]
    starts = np.array([0, 7, lengths[2] - 30, 3, lengths[4] - 1])
    batch = store.crops(ids, starts, 60)
    for row, (tid, start) in enumerate(zip(ids, starts, strict=True)):
        clip = np.asarray(store.clip(int(tid)), dtype=np.float32)[start : start + 60]
        expected = np.full((60, store.n_mels), store.pad_value, np.float32)
        expected[: len(clip)] = clip
        assert np.array_equal(batch[row], expected)
    assert np.all(batch[4, 1:] == store.pad_value)  # past the end: silence


def test_evaluation_windows_cover_each_clip_without_overlap(tiny_data):
    assert window_starts(300, 98) == [0, 98, 196]  # the last 8 frames make no full window
    assert window_starts(98, 98) == [0] and window_starts(40, 98) == [0]
    store = FeatureStore(tiny_data["features"])
    long_id = int(store.track_ids[0])
    windows, label, tid = ClipWindows(store, [{"track_id": long_id, "label": 3}], 98)[0]
    clip = np.asarray(store.clip(long_id), dtype=np.float32)
    n = len(clip) // 98
    assert windows.shape == (n, 98, store.n_mels) and (label, tid) == (3, long_id)
    assert np.array_equal(windows.numpy().reshape(-1, store.n_mels), clip[: n * 98])
    short, _, _ = ClipWindows(store, [{"track_id": long_id, "label": 0}], len(clip) + 10)[0]
    assert short.shape == (1, len(clip) + 10, store.n_mels)
    assert np.all(short[0, len(clip) :].numpy() == store.pad_value)


FEATURIZE_IN_SUBPROCESS = """
import sys
from pathlib import Path
import yaml
from cola_audio import featurize
params = yaml.safe_load(Path(sys.argv[1]).read_text())
meta, out, workers = Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
featurize.run(params, workers=workers, meta_dir=meta, out_dir=out)
"""


@pytest.mark.parametrize(("kernel", "workers"), [("Sandybridge", 1), ("Katmai", 2)])
def test_shard_bytes_do_not_depend_on_the_blas_kernel_or_worker_count(
    tiny_data, tmp_path, kernel, workers
):
    """OpenBLAS picks its kernels per CPU (FMA or not, vector width); a float32 product through
    it gave other bytes on another CPU. Features must be the same bytes on any x86 CPU."""
    import os
    import subprocess
    import sys

    import yaml

    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(tiny_data["params"]))
    out = tmp_path / "features"
    env = dict(os.environ, OPENBLAS_CORETYPE=kernel, OPENBLAS_VERBOSE="2")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            FEATURIZE_IN_SUBPROCESS,
            str(params_path),
            str(tiny_data["meta"]),
            str(out),
            str(workers),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Core: {kernel}" in result.stdout + result.stderr  # the kernel really was switched
    assert _digest(out / "shards") == _digest(tiny_data["features"] / "shards")


def test_stray_shards_of_a_longer_count_are_removed_by_the_shard_jobs_not_by_gather(
    tiny_data, tmp_path
):
    """After features.shards shrinks, the old higher-numbered shard files would enter DVC's hash
    of the shards folder. The shard jobs remove them (each reruns on a count change); gather must
    not: the folder is its input, and a job that changes its input records no build."""
    p = json.loads(json.dumps(tiny_data["params"]))
    p["features"]["shards"] = [0, 1]
    out = tmp_path / "features"
    (out / "shards").mkdir(parents=True)
    stray = [out / "shards" / "2.npy", out / "shards" / "2.json"]
    for path in stray:
        path.write_text("from an earlier count")
    featurize.run(p, shard=1, workers=1, meta_dir=tiny_data["meta"], out_dir=out)
    assert not any(path.exists() for path in stray)
    featurize.run(p, shard=0, workers=1, meta_dir=tiny_data["meta"], out_dir=out)
    stray[0].write_text("left by hand")
    featurize.run(p, gather_only=True, out_dir=out)
    assert stray[0].exists()
