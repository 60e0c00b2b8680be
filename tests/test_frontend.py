"""Parity with the official TensorFlow front-end and the real FMA clip."""

import hashlib
import tracemalloc

import numpy as np
import pytest

from cola_audio import featurize, frontend
from cola_audio.frontend import FrontEnd
from conftest import FMA_REAL, FRONTEND_FIXTURE, require


def test_matches_the_official_tf_frontend_within_1e4():
    signal = np.load(require(FRONTEND_FIXTURE / "signal16k.npy"))
    reference = np.load(require(FRONTEND_FIXTURE / "tf_logmel_signal.npy"))
    ours = FrontEnd(waveform_norm="none").log_mel(signal)
    assert ours.shape == reference.shape == (298, 64)
    assert np.abs(ours - reference).max() < 1e-4


def test_mel_triangles_are_linear_in_mel_not_hz():
    fe = FrontEnd()
    m = fe.mel_matrix
    assert m.shape == (513, 64)
    assert np.all(m[0] == 0)  # DC excluded
    assert m.max() <= 1.0 and np.all(m.sum(axis=0) > 0)
    import librosa

    hz_linear = librosa.filters.mel(
        sr=16000, n_fft=1024, n_mels=64, fmin=60, fmax=7800, htk=True, norm=None
    ).T
    assert not np.allclose(m, hz_linear, atol=1e-3)
    # Each triangle peaks at the FFT bin nearest its centre, and the centres are equally spaced in
    # mel (TF's 1127·ln(1 + f/700)) from fmin to fmax: within one bin, converted to mel.
    bin_hz = 16000 / 1024
    peaks = np.arange(513)[m.argmax(axis=0)] * bin_hz
    mel = lambda hz: 1127.0 * np.log1p(hz / 700.0)  # noqa: E731
    centres = np.linspace(mel(60.0), mel(7800.0), 64 + 2)[1:-1]
    assert np.all(np.abs(mel(peaks) - centres) <= 1127.0 / (700.0 + peaks) * bin_hz)
    spacing = np.diff(peaks)
    assert spacing[-1] > 5 * spacing[0]  # in Hz the triangles widen with frequency


@pytest.mark.parametrize(
    ("n_samples", "frames"),
    [(399, 0), (400, 1), (16000, 98), (48000, 298), (48079, 298), (48080, 299)],
)
def test_frame_count_follows_tf_stft(n_samples, frames):
    fe = FrontEnd()
    assert fe.n_frames(n_samples) == frames
    assert fe.log_mel(np.zeros(n_samples, np.float32)).shape == (frames, 64)


def test_clip_l2_normalisation_is_a_constant_shift_in_log_mel():
    rng = np.random.default_rng(1)
    wave = rng.standard_normal(16000).astype(np.float32) * 0.3
    raw = FrontEnd(waveform_norm="none").features(wave, 16000)
    normed = FrontEnd(waveform_norm="clip_l2").features(wave, 16000)
    shift = raw - normed
    assert np.allclose(shift, np.log(np.linalg.norm(wave)), atol=1e-3)


def test_real_fma_clip(default_params):
    path = require(FMA_REAL / "fma_small" / "000" / "000002.mp3")
    assert hashlib.sha1(path.read_bytes()).hexdigest() == "6976e70271234351250ada3fc49c5afd69ba9864"
    wave, sr, header = featurize.decode(path)
    assert (len(wave), sr, header) == (1_321_967, 44_100, 1_321_967)
    result = featurize.featurize_file(2, str(path), default_params["features"])
    assert result.reason is None
    n16k = int(np.ceil(1_321_967 * 16_000 / 44_100))  # librosa.resample's output length
    assert result.features.shape == (FrontEnd().n_frames(n16k), 64) == (2996, 64)
    assert result.features.dtype == np.float16
    assert np.isfinite(result.features).all()


@pytest.mark.parametrize("frames", [frontend.BLOCK_FRAMES - 1, 2 * frontend.BLOCK_FRAMES + 7])
def test_a_long_wave_is_featurized_block_by_block_to_the_same_bytes(frames, monkeypatch):
    """An hour's spectrum at once held ~1.5 GB; blocks of BLOCK_FRAMES frames give the same
    bytes as one pass, with a peak bounded by the block, not by the length."""
    fe = FrontEnd()
    rng = np.random.default_rng(0)
    wave = (rng.standard_normal((frames - 1) * fe.frame_step + fe.frame_length + 99) * 0.1).astype(
        np.float32
    )
    blocked = fe.log_mel(wave)
    monkeypatch.setattr(frontend, "BLOCK_FRAMES", 10**9)  # one block: the computation before
    assert blocked.shape == (frames, fe.n_mels)
    assert blocked.tobytes() == fe.log_mel(wave).tobytes()
    monkeypatch.setattr(frontend, "BLOCK_FRAMES", 1 << 10)
    tracemalloc.start()
    fe.log_mel(wave)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    one_pass = frames * (fe.fft_length // 2 + 1) * 8  # the complex spectrum alone
    assert peak < one_pass / 4 + blocked.nbytes
