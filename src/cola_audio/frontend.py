"""The official COLA log-mel front-end, as pure functions of a waveform.

google-research `cola/data.py` computes `tf.signal.stft` (periodic Hann on 400 samples, frames
zero-padded at their end to 1024, no centring), magnitudes, a mel matrix built by
`tf.signal.linear_to_mel_weight_matrix` (HTK mel, triangles linear in mel, no area
normalisation, DC excluded) and `log(max(mel, 1e-5))`.

Here the STFT is scipy's pocketfft over a strided view of the frames (no copies per frame, about
half the time of librosa.stft), and the mel product is a sparse matrix product: each band has a
few dozen non-zero weights, and scipy's sparse kernel sums them in one fixed order, with no BLAS
involved, so the features do not depend on which BLAS kernel the CPU gets or how many threads run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import librosa
import numpy as np
import scipy.fft
import scipy.signal
import scipy.sparse


@functools.lru_cache(maxsize=8)
def tf_mel_matrix(
    sample_rate: int,
    fft_length: int,
    n_mels: int,
    fmin_hz: float,
    fmax_hz: float,
    dtype: type = np.float64,
) -> np.ndarray:
    """Cached: featurization builds a FrontEnd per clip, and this matrix costs ~1.7 ms to make."""
    n_bins = fft_length // 2 + 1
    hz = np.linspace(0.0, sample_rate / 2, n_bins)[1:]  # DC row stays zero
    # librosa's HTK mel is 2595·log10(1 + f/700) = 1127·ln(1 + f/700) up to a constant factor,
    # which cancels in the slopes below, so the triangles are exactly TF's.
    bins_mel = librosa.hz_to_mel(hz, htk=True)[:, None]
    edges = np.linspace(
        librosa.hz_to_mel(fmin_hz, htk=True), librosa.hz_to_mel(fmax_hz, htk=True), n_mels + 2
    )
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel - lower) / (center - lower)
    falling = (upper - bins_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    matrix = np.vstack([np.zeros((1, n_mels)), weights]).astype(dtype)
    matrix.flags.writeable = False  # shared by every caller
    return matrix


BLOCK_FRAMES = 1 << 14  # frames per spectrum block (~164 s at a 10 ms hop); clips fit in one


@dataclass(frozen=True)
class FrontEnd:
    sample_rate: int = 16000
    frame_length: int = 400
    frame_step: int = 160
    fft_length: int = 1024
    n_mels: int = 64
    fmin_hz: float = 60.0
    fmax_hz: float = 7800.0
    log_floor: float = 1e-5
    waveform_norm: str = "clip_l2"

    @classmethod
    def from_params(cls, features: dict[str, Any]) -> FrontEnd:
        names = (
            "sample_rate",
            "frame_length",
            "frame_step",
            "fft_length",
            "n_mels",
            "fmin_hz",
            "fmax_hz",
            "log_floor",
            "waveform_norm",
        )
        return cls(**{name: features[name] for name in names})

    def n_frames(self, n_samples: int) -> int:
        """Frames TF's stft (pad_end=False) yields for `n_samples` at the front-end's rate."""
        if n_samples < self.frame_length:
            return 0
        return 1 + (n_samples - self.frame_length) // self.frame_step

    @property
    def mel_matrix(self) -> np.ndarray:
        """(fft_length // 2 + 1, n_mels) weights, float64, to tf.signal's formula."""
        return tf_mel_matrix(
            self.sample_rate, self.fft_length, self.n_mels, self.fmin_hz, self.fmax_hz
        )

    @property
    def mel_operator(self) -> scipy.sparse.csr_matrix:
        """The transposed mel matrix, float32 and sparse: (n_mels, fft_length // 2 + 1)."""
        return _mel_operator(
            self.sample_rate, self.fft_length, self.n_mels, self.fmin_hz, self.fmax_hz
        )

    def magnitude(self, wave: np.ndarray) -> np.ndarray:
        """|STFT| as (frames, fft_length // 2 + 1), frames placed exactly as tf.signal.stft:
        frame k is samples [k·step, k·step + frame_length), windowed, zero-padded at its end."""
        frames = np.lib.stride_tricks.sliding_window_view(wave, self.frame_length)
        windowed = frames[:: self.frame_step] * _periodic_hann(self.frame_length)
        return np.abs(scipy.fft.rfft(windowed, n=self.fft_length, axis=1))

    def normalise(self, wave: np.ndarray) -> np.ndarray:
        """The official clip-level L2 normalisation (or none)."""
        if self.waveform_norm == "none":
            return wave
        wave64 = wave.astype(np.float64)
        norm = float(np.sqrt(np.sum(wave64 * wave64)))  # numpy's pairwise sum, not BLAS
        return wave / max(norm, 1e-9)

    def log_mel(self, wave: np.ndarray) -> np.ndarray:
        """(frames, n_mels) float32 natural-log mel magnitudes of a mono waveform at sample_rate,
        BLOCK_FRAMES frames at a time: an hour's spectrum at once held ~1.5 GB."""
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"expected a mono waveform, got shape {wave.shape}")
        frames = self.n_frames(len(wave))
        out = np.empty((frames, self.n_mels), dtype=np.float32)
        for start in range(0, frames, BLOCK_FRAMES):
            stop = min(frames, start + BLOCK_FRAMES)
            block = wave[start * self.frame_step : (stop - 1) * self.frame_step + self.frame_length]
            mel = (self.mel_operator @ self.magnitude(block).T).T
            out[start:stop] = np.log(np.clip(mel, self.log_floor, 1e8))
        return out

    def features(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono waveform at any rate → resampled, normalised, log-mel features."""
        if sample_rate != self.sample_rate:
            wave = librosa.resample(
                wave, orig_sr=sample_rate, target_sr=self.sample_rate, res_type="soxr_hq"
            )
        return self.log_mel(self.normalise(np.asarray(wave, dtype=np.float32)))


@functools.lru_cache(maxsize=8)
def _mel_operator(
    sample_rate: int, fft_length: int, n_mels: int, fmin_hz: float, fmax_hz: float
) -> scipy.sparse.csr_matrix:
    matrix = tf_mel_matrix(sample_rate, fft_length, n_mels, fmin_hz, fmax_hz, np.float32)
    return scipy.sparse.csr_matrix(matrix.T)


@functools.lru_cache(maxsize=4)
def _periodic_hann(length: int) -> np.ndarray:
    """tf.signal.hann_window(periodic=True), float32."""
    window = scipy.signal.get_window("hann", length, fftbins=True).astype(np.float32)
    window.flags.writeable = False
    return window
