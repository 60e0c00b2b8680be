"""`cola embed` and the HEAR 2021 API, on an encoder saved the way `cola pretrain` saves it."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from cola_audio import cli, hear
from cola_audio.embed import Embedder
from cola_audio.frontend import FrontEnd
from cola_audio.models.batchnorm import recompute_batchnorm
from cola_audio.models.encoder import Encoder, save_encoder

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
