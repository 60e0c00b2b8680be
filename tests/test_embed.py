"""`cola embed` and the HEAR 2021 API, on an encoder saved the way `cola pretrain` saves it."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from cola_audio import cli, embed, hear
from cola_audio.embed import Embedder
from cola_audio.errors import BadInput, InputError, MissingInput
from cola_audio.frontend import FrontEnd
from cola_audio.models.batchnorm import recompute_batchnorm
from cola_audio.models.encoder import Encoder, encoder_metadata, save_encoder

CROP, HOP, STEP, FRAME, SR = 98, hear.TIMESTAMP_HOP_FRAMES, 160, 400, 16000


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """An untrained encoder whose BatchNorm statistics come from real log-mel input (with the
    initial 0/1 statistics every sound gets nearly the same vector, which would hide mix-ups)."""
    torch.manual_seed(0)
    encoder = Encoder()
    encoder.train()
    rng = np.random.default_rng(0)
    sounds = [tone(2.0, hz) for hz in (200.0, 700.0, 2500.0)]
    sounds += [(rng.standard_normal(2 * SR) * a).astype(np.float32) for a in (0.01, 0.3)]
    crops = torch.from_numpy(np.stack([FrontEnd().features(w, SR)[:CROP] for w in sounds]))
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        recompute_batchnorm(norms, lambda: encoder(crops))
    path = tmp_path_factory.mktemp("encoder") / "encoder.safetensors"
    save_encoder(encoder, path, frontend=FrontEnd().__dict__, crop_frames=CROP)
    return path


@pytest.fixture(scope="module")
def model(encoder_file):
    return hear.load_model(str(encoder_file))


def tone(seconds: float, hz: float = 440.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_hear_model_attributes(model):
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == model.timestamp_embedding_size == 1280
    assert isinstance(model, torch.nn.Module)


@pytest.mark.parametrize("n_sounds", [1, 3])
@pytest.mark.parametrize("seconds", [0.5, 1.0, 10.0])
def test_hear_shapes_timestamps_and_scene_pooling(model, n_sounds, seconds):
    audio = torch.from_numpy(np.stack([tone(seconds, 220.0 * (k + 1)) for k in range(n_sounds)]))
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    frames = FrontEnd().n_frames(audio.shape[1])
    expected = max(1, -(-frames // HOP))  # a window centred on every hop-th frame
    assert embeddings.shape == (n_sounds, expected, 1280) and embeddings.dtype == torch.float32
    assert timestamps.shape == (n_sounds, expected) and timestamps.dtype == torch.float32
    # Centres in ms, written out: window k spans frames [k·hop - 49, k·hop + 49).
    first = (np.arange(expected) * HOP - CROP // 2) * STEP
    centres = (first + first + (CROP - 1) * STEP + FRAME) / 2 / SR * 1000
    assert np.allclose(timestamps[0].numpy(), centres)
    assert torch.all(timestamps[:, 1:] > timestamps[:, :-1])
    # hear-validator's coverage rule: stamps from the start to within two hops of the end.
    hop_ms, length_ms = HOP * STEP / SR * 1000, audio.shape[1] / SR * 1000
    assert timestamps[0, 0] <= hop_ms and timestamps[0, -1] >= length_ms - 2 * hop_ms
    assert torch.equal(timestamps, timestamps[:1].expand_as(timestamps))
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (n_sounds, 1280) and scene.dtype == torch.float32
    assert torch.allclose(scene, embeddings.mean(dim=1))
    assert torch.isfinite(embeddings).all()


def test_a_sound_embeds_the_same_alone_and_in_a_batch(model):
    sounds = torch.from_numpy(np.stack([tone(2.0, 300.0), tone(2.0, 900.0), tone(2.0, 2000.0)]))
    together = hear.get_scene_embeddings(sounds, model)
    alone = hear.get_scene_embeddings(sounds[1:2], model)
    assert torch.allclose(together[1:2], alone, atol=1e-5)
    assert not torch.allclose(together[0], together[2])  # different sounds, different vectors


def test_cola_embed_writes_parquet_and_reports_an_unreadable_file(encoder_file, tmp_path, caplog):
    audio = tmp_path / "audio"
    (audio / "speech").mkdir(parents=True)
    sf.write(audio / "speech" / "a.wav", tone(3.0, 500.0, 22050), 22050)
    sf.write(audio / "b.flac", np.stack([tone(2.5, 700.0, 44100)] * 2, axis=1), 44100)
    sf.write(audio / "short.wav", tone(0.5, 800.0), SR)
    shutil.copy(audio / "speech" / "a.wav", audio / "speech" / "a-copy.wav")
    (audio / "broken.mp3").write_bytes(b"\x00" * 3000)
    (audio / "notes.txt").write_text("not audio")
    out = tmp_path / "emb.parquet"
    argv = ["embed", str(audio), "--encoder", str(encoder_file), "--out", str(out)]
    assert cli.main(argv) == 0
    table = pd.read_parquet(out)
    names = [p.rsplit("/", 1)[1] for p in table["path"]]
    assert names == ["b.flac", "short.wav", "a-copy.wav", "a.wav"]  # sorted paths, no .txt
    assert set(table["encoder_md5"]) == {Embedder.load(encoder_file).encoder_md5}
    by_name = dict(zip(names, table.itertuples(), strict=True))
    assert by_name["short.wav"].padded and by_name["short.wav"].n_windows == 1
    assert by_name["a.wav"].n_windows == 3 and not by_name["a.wav"].padded
    assert np.array_equal(by_name["a.wav"].mean, by_name["a-copy.wav"].mean)  # same clip
    assert by_name["a.wav"].sha1 == by_name["a-copy.wav"].sha1
    assert not np.array_equal(by_name["a.wav"].mean, by_name["b.flac"].mean)
    assert len(by_name["a.wav"].mean) == 1280 and len(by_name["a.wav"].max) == 1280
    skipped = pd.read_csv(tmp_path / "emb.parquet.skipped.csv")
    assert list(skipped["path"].str.rsplit("/", n=1).str[1]) == ["broken.mp3"]
    assert "broken.mp3" in caplog.text
    # Again, one row per window: the same clip gives the same vectors run after run.
    windows_out = tmp_path / "windows.parquet"
    assert cli.main([*argv[:-1], str(windows_out), "--windows"]) == 0
    windows = pd.read_parquet(windows_out)
    a = windows[windows["path"].str.endswith("/a.wav")]
    assert list(a["window"]) == [0, 1, 2] and list(a["start_s"]) == [0.0, 0.98, 1.96]
    assert np.allclose(np.stack(a["embedding"]).mean(0), by_name["a.wav"].mean, atol=1e-6)


class CountingEncoder(torch.nn.Module):
    """A stand-in encoder cheap enough for hours of windows: each window's per-frame mean over
    the mels, zero-padded to 1280, so a window cut in the wrong place changes the output. It
    records every batch's size and, while tracemalloc traces, the memory held at the call."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # Embedder.device reads a parameter
        self.batches: list[int] = []
        self.held: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        if tracemalloc.is_tracing():
            self.held.append(tracemalloc.get_traced_memory()[0])
        return torch.nn.functional.pad(x.mean(dim=2), (0, 1280 - x.shape[1]))


@pytest.fixture
def counting(monkeypatch) -> CountingEncoder:
    """`cola embed` on the counting encoder (Embedder.load returns it, whatever the file)."""
    fake = CountingEncoder()
    embedder = Embedder(fake, FrontEnd(), CROP, "0" * 32)
    monkeypatch.setattr(Embedder, "load", lambda *args, **kwargs: embedder)
    return fake


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("cola embed: error:")]


@pytest.mark.parametrize("api", ["timestamp", "scene"])
@pytest.mark.parametrize(
    ("bad", "value"), [([1], float("nan")), ([0, 2], float("inf")), ([2], float("-inf"))]
)
def test_hear_refuses_non_finite_audio_naming_the_sounds(model, api, bad, value):
    audio = torch.from_numpy(np.stack([tone(0.5, 300.0 * (k + 1)) for k in range(3)]))
    for k in bad:
        audio[k, 1234] = value
    embed_fn = hear.get_scene_embeddings if api == "scene" else hear.get_timestamp_embeddings
    with pytest.raises(ValueError, match="NaN or infinite") as caught:
        embed_fn(audio, model)
    assert f"indices {', '.join(map(str, bad))})" in str(caught.value)


@pytest.mark.parametrize(
    ("audio", "error", "words"),
    [
        (torch.zeros(2, 8000, dtype=torch.int16), ValueError, "float samples"),
        (torch.zeros(2, 8000, dtype=torch.bool), ValueError, "float samples"),
        (np.zeros((2, 8000), np.float32), TypeError, "torch.Tensor"),
    ],
)
def test_hear_refuses_audio_of_the_wrong_type(model, audio, error, words):
    with pytest.raises(error, match=words):
        hear.get_timestamp_embeddings(audio, model)


@pytest.mark.parametrize(
    ("n_sounds", "seconds", "batch_size"), [(1, 120.0, 16), (2, 30.0, 7), (3, 2.0, 5)]
)
def test_hear_embeds_a_long_sound_one_batch_of_windows_at_a_time(
    model, n_sounds, seconds, batch_size
):
    """120 s at a 50 ms hop is 2,400 windows (60 MB stacked): the encoder must never get more
    than a batch, nor the windows all be held at once; batching must not change the result."""
    fake = CountingEncoder()
    counting_model = hear.HearModel(dataclasses.replace(model.embedder, encoder=fake))
    audio = torch.from_numpy(np.stack([tone(seconds, 200.0 * (k + 1)) for k in range(n_sounds)]))
    n_windows = n_sounds * -(-FrontEnd().n_frames(audio.shape[1]) // HOP)
    counting_model.batch_size = batch_size
    hear.get_timestamp_embeddings(audio[:, : SR // 10], counting_model)  # imports, caches
    fake.batches.clear()
    tracemalloc.start()
    try:
        batched, _ = hear.get_timestamp_embeddings(audio, counting_model)
    finally:
        tracemalloc.stop()
    assert max(fake.batches) <= batch_size and sum(fake.batches) == n_windows
    assert len(fake.batches) == -(-n_windows // batch_size)
    stacked_bytes = n_windows * CROP * 64 * 4  # every window at once, as a float32 stack
    assert max(fake.held) < stacked_bytes / 2, (max(fake.held), stacked_bytes)
    fake.batches.clear()
    counting_model.batch_size = n_windows
    whole, _ = hear.get_timestamp_embeddings(audio, counting_model)
    assert fake.batches == [n_windows]
    assert torch.allclose(batched, whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_size", [3, 17])
def test_hear_in_batches_equals_the_unbatched_encoder(model, monkeypatch, batch_size):
    """The real encoder, every window at once (cut here from the padded features) versus the API
    in batches of `batch_size` that straddle the two sounds."""
    audio = torch.from_numpy(np.stack([tone(0.5, 400.0), tone(0.5, 1500.0)]))
    embedder, half = model.embedder, CROP // 2
    starts = [k * HOP - half for k in range(-(-FrontEnd().n_frames(audio.shape[1]) // HOP))]
    windows = []
    for wave in audio.numpy():
        features = FrontEnd().features(wave, SR)
        padded = np.concatenate([embedder.silence(half), features, embedder.silence(CROP - half)])
        windows += [padded[s + half : s + half + CROP] for s in starts]
    with torch.no_grad():
        whole = embedder.encoder(torch.from_numpy(np.stack(windows))).reshape(2, len(starts), -1)
    monkeypatch.setattr(model, "batch_size", batch_size)
    batched, _ = hear.get_timestamp_embeddings(audio, model)
    # CPU kernels pick their summation order by batch shape: equal up to float32 rounding.
    assert torch.allclose(batched, whole, rtol=0, atol=1e-5 * float(whole.abs().max()))


@pytest.mark.parametrize("windows", [False, True])
def test_cola_embed_writes_each_files_rows_as_soon_as_they_are_embedded(
    counting, tmp_path, monkeypatch, windows
):
    """One Parquet row group per file, written before the next file is embedded (rows are
    never collected for all files), and a 120 s file embedded at most 16 windows at a time."""
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a-long.wav", tone(120.0, 300.0), SR)
    (audio / "b-broken.mp3").write_bytes(b"\x00" * 3000)
    sf.write(audio / "c.flac", tone(3.0, 600.0, 22050), 22050)
    sf.write(audio / "d-short.wav", tone(0.5, 900.0), SR)
    events: list[tuple[str, ...]] = []
    real_embed_file, real_write = embed.embed_file, pq.ParquetWriter.write_table

    def spy_embed_file(embedder, path, *args):
        events.append(("embed", path.name))
        return real_embed_file(embedder, path, *args)

    def spy_write(writer, table, *args, **kwargs):
        events.append(("write", *sorted({p.rsplit("/", 1)[1] for p in table["path"].to_pylist()})))
        return real_write(writer, table, *args, **kwargs)

    monkeypatch.setattr(embed, "embed_file", spy_embed_file)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", spy_write)
    out = tmp_path / "emb.parquet"
    argv = ["embed", str(audio), "--out", str(out), "--batch-size", "16"]
    assert cli.main([*argv, "--windows"] if windows else argv) == 0
    assert events == [
        ("embed", "a-long.wav"),
        ("write", "a-long.wav"),
        ("embed", "b-broken.mp3"),
        ("embed", "c.flac"),
        ("write", "c.flac"),
        ("embed", "d-short.wav"),
        ("write", "d-short.wav"),
    ]
    assert max(counting.batches) == 16  # 122 windows of the long file in batches of 16
    assert sum(counting.batches) == 122 + 3 + 1
    assert pq.ParquetFile(out).metadata.num_row_groups == 3
    table = pd.read_parquet(out)
    per_window = ["window", "start_s", "embedding"] if windows else ["n_windows", "mean", "max"]
    assert (
        list(table.columns) == ["path", "sha1", "encoder_md5", "duration_s", "padded"] + per_window
    )
    assert len(table) == (122 + 3 + 1 if windows else 3)
    assert not list(tmp_path.glob(".emb.parquet.*"))  # no temporary file left behind


@pytest.mark.parametrize(
    "exc",
    [
        InputError("implausible header: sample rate 1 Hz"),
        BadInput("truncated stream: decoded 10 of 1000 frames"),
        MissingInput("gone since it was listed"),
        PermissionError(13, "Permission denied"),
    ],
    ids=["InputError", "BadInput", "MissingInput", "PermissionError"],
)
def test_cola_embed_skips_a_file_whatever_input_or_os_error_it_raises(
    counting, tmp_path, monkeypatch, exc
):
    """Decoding goes through featurize.check_audio; any InputError or OSError it (or reading the
    file) raises skips that one file, with its reason, and the others are embedded."""
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in ("a.wav", "bad.wav", "c.wav"):
        sf.write(audio / name, tone(1.5, 500.0), SR)
    checked: list[str] = []
    real_check = embed.check_audio

    def check_audio(path, checks):
        checked.append(path.name)
        if path.name == "bad.wav":
            raise exc
        return real_check(path, checks)

    monkeypatch.setattr(embed, "check_audio", check_audio)
    out = tmp_path / "emb.parquet"
    assert cli.main(["embed", str(audio), "--out", str(out)]) == 0
    assert checked == ["a.wav", "bad.wav", "c.wav"]
    assert [p.rsplit("/", 1)[1] for p in pd.read_parquet(out)["path"]] == ["a.wav", "c.wav"]
    skipped = pd.read_csv(tmp_path / "emb.parquet.skipped.csv")
    assert list(skipped["path"].str.rsplit("/", n=1).str[1]) == ["bad.wav"]
    assert str(exc) in skipped["reason"][0]


@pytest.mark.parametrize("contents", [[], ["notes.txt", "sub/data.csv"], ["sub/deeper/"]])
def test_cola_embed_on_a_folder_without_audio_is_a_one_line_error(
    counting, tmp_path, capsys, contents
):
    folder = tmp_path / "audio"
    folder.mkdir()
    for name in contents:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if not name.endswith("/"):
            (folder / name).write_text("not audio")
    out = tmp_path / "emb.parquet"
    assert cli.main(["embed", str(folder), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "Traceback" not in err
    assert str(folder) in line and ".wav" in line and ".flac" in line and "recursively" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio"]  # nothing written
    assert not counting.batches


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-out"])
@pytest.mark.parametrize("windows", [False, True])
@pytest.mark.parametrize(
    "files", [{"broken.mp3": b"\x00" * 3000}, {"empty.wav": b"", "noise.flac": b"fLaC junk"}]
)
def test_cola_embed_when_every_file_is_skipped_is_a_one_line_error(
    counting, tmp_path, capsys, files, windows, stale
):
    """No Parquet file (not even an empty one) under the final name or a temporary one, nor an
    earlier run's left beside this run's skipped CSV; the CSV is written and the error points
    to it (and says the stale file was removed)."""
    folder = tmp_path / "audio"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "emb.parquet"
    if stale:
        out.write_bytes(b"PAR1 an earlier run's embeddings PAR1")
    argv = ["embed", str(folder), "--out", str(out)]
    assert cli.main([*argv, "--windows"] if windows else argv) == 1
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "Traceback" not in err
    skipped_csv = tmp_path / "emb.parquet.skipped.csv"
    assert str(skipped_csv) in line and f"all {len(files)} audio file(s) were skipped" in line
    assert (f"the older {out} from an earlier run was removed" in line) == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio", skipped_csv.name]
    skipped = pd.read_csv(skipped_csv)
    assert sorted(skipped["path"].str.rsplit("/", n=1).str[1]) == sorted(files)
    assert skipped["reason"].str.len().min() > 0


@pytest.mark.parametrize("batch_size", ["0", "-1", "-64"])
def test_cola_embed_batch_size_below_one_is_an_argparse_error(
    encoder_file, tmp_path, capsys, batch_size
):
    sf.write(tmp_path / "a.wav", tone(1.0), SR)
    out = tmp_path / "emb.parquet"
    argv = ["embed", str(tmp_path / "a.wav"), "--encoder", str(encoder_file), "--out", str(out)]
    with pytest.raises(SystemExit) as caught:
        cli.main([*argv, "--batch-size", batch_size])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not out.exists()
    assert f"error: argument --batch-size: {batch_size} is not a positive whole number" in err


def tree(root: Path) -> dict[str, bytes | str]:
    """Every path under `root` with its bytes (regular files) or its kind, to compare."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path)] = f"link to {os.readlink(path)}"
        elif path.is_file():
            found[str(path)] = path.read_bytes()
        else:
            found[str(path)] = "folder" if path.is_dir() else "other"
    return found


@pytest.mark.parametrize(
    ("inputs", "out", "words"),
    [
        (["victim.wav"], "victim.wav", "is the input file"),
        (["clip.dat"], "clip.dat", "is the input file"),  # audio under another name
        (["clip.dat"], "sub/../clip.dat", "is the input file"),
        (["clip.dat"], "link.dat", "is the input file"),  # a symlink to the input
        (["clip.dat"], "hard.dat", "is the input file"),  # a hard link to the input
        (["clip.dat", "victim.wav"], "clip.dat", "is the input file"),
        (["folder"], "folder/inside.wav", "named like audio"),
        (["victim.wav"], "new.WAV", "named like audio"),
        (["victim.wav"], "new.flac", "named like audio"),
        (["victim.wav"], "folder", "is a folder"),
        (["victim.wav"], "notes.txt/emb.parquet", "is not a folder"),
        (["victim.wav"], "notes.txt/deeper/emb.parquet", "is not a folder"),
    ],
)
def test_cola_embed_refuses_an_out_that_would_overwrite_an_input_or_cannot_be_written(
    counting, tmp_path, monkeypatch, capsys, inputs, out, words
):
    """Checked before any file is read or the encoder loaded: one line naming --out and the fix,
    and nothing under the working folder changes (no Parquet, no skipped CSV)."""
    monkeypatch.chdir(tmp_path)
    sf.write("victim.wav", tone(1.5, 500.0), SR)
    shutil.copy("victim.wav", "clip.dat")
    os.symlink("clip.dat", "link.dat")
    os.link("clip.dat", "hard.dat")
    (tmp_path / "sub").mkdir()
    (tmp_path / "folder").mkdir()
    shutil.copy("victim.wav", "folder/inside.wav")
    Path("notes.txt").write_text("not a folder")
    before = tree(tmp_path)
    assert cli.main(["embed", *inputs, "--out", out]) == 1
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "Traceback" not in err
    assert line.startswith(f"cola embed: error: --out {out}: ") and words in line
    assert "choose" in line or "name the Parquet file" in line  # the fix
    assert tree(tmp_path) == before
    assert not counting.batches


class Hung(Exception):
    """Raised by the alarm in a run that blocked."""


@pytest.fixture
def deadline():
    """Fail, not hang, a run that blocks (e.g. opening a FIFO nobody writes to)."""

    def ring(signum, frame):
        raise Hung("cola embed blocked for 60 s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["fifo", "fifo-in-folder", "device"])
def test_cola_embed_skips_a_named_path_that_is_not_a_regular_file_without_opening_it(
    counting, tmp_path, monkeypatch, deadline, kind
):
    """A FIFO named on the command line would block the run on open; a device would be read as
    audio. Named, either is skipped with its reason; inside a folder a FIFO is not listed."""
    folder = tmp_path / "audio"
    folder.mkdir()
    sf.write(folder / "a.wav", tone(1.5, 500.0), SR)
    os.mkfifo(folder / "pipe.wav")
    special = {"fifo": folder / "pipe.wav", "device": Path("/dev/null")}.get(kind)
    real_digest = embed.digest.file_digest
    opened: list[str] = []

    def file_digest(path, algorithm):
        opened.append(str(path))
        return real_digest(path, algorithm)

    monkeypatch.setattr(embed.digest, "file_digest", file_digest)
    out = tmp_path / "emb.parquet"
    named = [str(folder / "a.wav"), str(special)] if special else [str(folder)]
    assert cli.main(["embed", *named, "--out", str(out)]) == 0
    assert [p.rsplit("/", 1)[1] for p in pd.read_parquet(out)["path"]] == ["a.wav"]
    skipped = pd.read_csv(tmp_path / "emb.parquet.skipped.csv")
    if special:
        assert list(skipped["path"]) == [special.as_posix()]
        assert list(skipped["reason"]) == ["not a regular file (a FIFO, socket or device)"]
    else:
        assert skipped.empty
    assert opened == [str(folder / "a.wav")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audio",
        "emb.parquet",
        "emb.parquet.skipped.csv",
    ]  # no temporary file left


@pytest.mark.parametrize("windows", [False, True])
@pytest.mark.parametrize("how", ["in-folder", "named"])
def test_cola_embed_skips_a_file_whose_name_is_not_utf8(counting, tmp_path, how, windows):
    """Parquet strings are UTF-8: such a name would abort the whole run in the writer. It is
    skipped with its reason, its path written to the CSV with the odd byte escaped."""
    folder = tmp_path / "audio"
    folder.mkdir()
    sf.write(folder / "a.wav", tone(1.5, 500.0), SR)
    sf.write(folder / "z.wav", tone(1.5, 900.0), SR)
    odd = os.fsencode(folder) + b"/caf\xe9.wav"
    try:
        os.rename(os.fsencode(folder / "z.wav"), odd)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    out = tmp_path / "emb.parquet"
    named = [str(folder / "a.wav"), os.fsdecode(odd)] if how == "named" else [str(folder)]
    argv = ["embed", *named, "--out", str(out)]
    assert cli.main([*argv, "--windows"] if windows else argv) == 0
    assert {p.rsplit("/", 1)[1] for p in pd.read_parquet(out)["path"]} == {"a.wav"}
    skipped = pd.read_csv(tmp_path / "emb.parquet.skipped.csv")
    assert list(skipped["path"]) == [f"{folder.as_posix()}/caf\\xe9.wav"]
    assert list(skipped["reason"]) == ["file name is not valid UTF-8; rename it"]


@pytest.mark.parametrize(
    ("device", "cuda", "line"),
    [
        (
            "cuda",
            False,
            "--device cuda: no CUDA device here (torch.cuda.is_available() is False); "
            "use --device cpu",
        ),
        (
            "cuda:1",
            False,
            "--device cuda:1: no CUDA device here (torch.cuda.is_available() is False); "
            "use --device cpu",
        ),
        (
            "cuda:3",
            True,
            "--device cuda:3: this machine has 1 CUDA device(s) (cuda:0 to cuda:0); use one of "
            "them, or --device cpu",
        ),
        ("foo", False, "--device foo: not a device torch knows (cpu, cuda, cuda:1, ...)"),
        ("cuda:x", False, "--device cuda:x: not a device torch knows (cpu, cuda, cuda:1, ...)"),
        (
            "mps",
            False,
            "--device mps: no MPS device here (torch.backends.mps.is_available() is False); "
            "use --device cpu",
        ),
        ("meta", False, "--device meta: cannot embed on it; use cpu, cuda, cuda:1 or mps"),
    ],
)
def test_cola_embed_device_torch_lacks_is_a_one_line_error(
    encoder_file, tmp_path, monkeypatch, capsys, device, cuda, line
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    sf.write(tmp_path / "a.wav", tone(1.5), SR)
    out = tmp_path / "emb.parquet"
    argv = ["embed", str(tmp_path / "a.wav"), "--encoder", str(encoder_file), "--out", str(out)]
    assert cli.main([*argv, "--device", device]) == 1
    err = capsys.readouterr().err
    assert error_lines(err) == [f"cola embed: error: {line}"] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav"]
    with pytest.raises(BadInput) as caught:  # the library (and HEAR's load_model) path too
        Embedder.load(encoder_file, device)
    assert str(caught.value) == line


def rewritten_encoder(source: Path, path: Path, **changes: str | None) -> Path:
    """`source` with metadata keys changed (None: removed), as another version might write it."""
    from safetensors.torch import load_file, save_file

    meta = {**encoder_metadata(source), **changes}
    save_file(load_file(source), path, metadata={k: v for k, v in meta.items() if v is not None})
    return path


def frontend_json(**changes) -> str:
    return json.dumps({**FrontEnd().__dict__, **changes}, sort_keys=True)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"frontend": frontend_json(preemphasis=0.97)}, "frontend key 'preemphasis' (value 0.97)"),
        ({"frontend": frontend_json(n_mels="64")}, "frontend n_mels='64' is not of type int"),
        (
            {"frontend": frontend_json(log_floor=None)},
            "frontend log_floor=None is not of type float",
        ),
        ({"frontend": "{not json"}, "frontend '{not json' is not JSON"),
        ({"frontend": "[64, 400]"}, "frontend '[64, 400]' is not a JSON object"),
        ({"crop_frames": "abc"}, "crop_frames 'abc' is not a whole number"),
        ({"crop_frames": "0"}, "crop_frames '0' is not a positive number of frames"),
        ({"crop_frames": "-98"}, "crop_frames '-98' is not a positive number of frames"),
        ({"pooling": "mean"}, "pooling must be 'max' or 'avg', got 'mean'"),
    ],
)
def test_encoder_metadata_from_another_version_is_a_one_line_error(
    encoder_file, tmp_path, capsys, changes, words
):
    encoder = rewritten_encoder(encoder_file, tmp_path / "other.safetensors", **changes)
    sf.write(tmp_path / "a.wav", tone(1.5), SR)
    out = tmp_path / "emb.parquet"
    argv = ["embed", str(tmp_path / "a.wav"), "--encoder", str(encoder), "--out", str(out)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "Traceback" not in err
    assert line.startswith(f"cola embed: error: {encoder}: encoder metadata ") and words in line
    assert "re-export it with this version's `cola pretrain`" in line
    assert not out.exists()
    with pytest.raises(BadInput, match="another version"):
        hear.load_model(str(encoder))


def test_encoder_metadata_with_fewer_frontend_keys_takes_the_defaults(encoder_file, tmp_path):
    """A front-end recorded with fewer keys (an older version) is still read."""
    short = json.dumps({"n_mels": 64, "sample_rate": 16000})
    encoder = rewritten_encoder(encoder_file, tmp_path / "e.safetensors", frontend=short)
    assert Embedder.load(encoder).frontend == FrontEnd()


@pytest.mark.parametrize(
    ("n", "sr", "kept", "samples"),
    [
        (10, SR, False, 10),
        (160, SR, False, 160),  # 0.01 s
        (399, SR, False, 399),
        (1000, 44100, False, 363),  # 363 samples once resampled to 16 kHz
        (199, 8000, False, 398),
        (400, SR, True, None),  # one frame: padded, as any clip under 1 s
        (1102, 44100, True, None),
    ],
)
def test_cola_embed_skips_a_clip_shorter_than_one_analysis_frame(
    counting, tmp_path, n, sr, kept, samples
):
    """Such a clip has no frame at all: its embedding would be pure padding, the same for all."""
    folder = tmp_path / "audio"
    folder.mkdir()
    sf.write(folder / "a.wav", tone(1.5, 500.0), SR)
    sf.write(folder / "b-short.wav", tone(n / sr, 700.0, sr), sr)
    out = tmp_path / "emb.parquet"
    assert cli.main(["embed", str(folder), "--out", str(out)]) == 0
    table = pd.read_parquet(out)
    names = [p.rsplit("/", 1)[1] for p in table["path"]]
    skipped = pd.read_csv(tmp_path / "emb.parquet.skipped.csv")
    if kept:
        assert names == ["a.wav", "b-short.wav"] and list(table["padded"]) == [False, True]
        assert skipped.empty
    else:
        assert names == ["a.wav"]
        assert list(skipped["reason"]) == [
            f"too short for one analysis frame ({samples} samples at {SR} Hz; at least "
            f"{FRAME} needed)"
        ]


@pytest.mark.parametrize("samples", [0, 10, 399])
def test_hear_refuses_sounds_shorter_than_one_analysis_frame(model, samples):
    """Under 400 samples the front-end yields no frame: every such sound got the same embedding
    of silence padding, silently."""
    with pytest.raises(ValueError, match="shorter than one analysis frame"):
        hear.get_timestamp_embeddings(torch.zeros(2, samples), model)
    with pytest.raises(ValueError, match="shorter than one analysis frame"):
        hear.get_scene_embeddings(torch.zeros(1, samples), model)


def test_hear_embeds_a_sound_of_exactly_one_frame(model):
    embeddings, _ = hear.get_timestamp_embeddings(torch.from_numpy(tone(400 / SR))[None], model)
    assert embeddings.shape[0] == 1 and torch.isfinite(embeddings).all()
