"""Generated downstream tasks for the default demo, each needing other cues than music genre.

- `sounds`: the folder demo's six event classes (chirps, clicks, tones, noise bursts), scaled up,
  with each "speaker" at its own pitch, gain and noise level: the classes differ in spectral shape
  and time structure.
- `pitch`: which of eight pitches (three semitones apart from C3) an instrument plays, with the
  instrument's own timbre (harmonic amplitudes), vibrato and noise: global pooling discards where
  in frequency energy lies, so the cue is the harmonic pattern's spacing.
- `timbre`: which of eight instrument families (harmonic pattern, inharmonic partials, envelope,
  breath noise) plays a note at any pitch over two octaves: the cue is timbre, not pitch.

Each writes `<root>/<class>/<group>_nohash_<take>.wav` (the group a speaker or an instrument, kept
in one split by `group_pattern`), the same bytes on every run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf

from cola_audio import fsutil
from cola_audio.folder import DEMO_CLASSES, demo_clip

SAMPLE_RATE = 16000
GROUP_PATTERN = r"^([0-9a-f]{8})_nohash_"  # the group id the file names start with
# eight pitches a minor third apart from C3, by their semitones above it
SEMITONES = {"c3": 0, "d-sharp3": 3, "f-sharp3": 6, "a3": 9, "c4": 12, "d-sharp4": 15}
SEMITONES |= {"f-sharp4": 18, "a4": 21}


def _group_id(k: int, salt: int) -> str:
    return f"{(k * 2654435761 + salt) % 2**32:08x}"


def sounds_clip(kind: str, rng: np.random.Generator, noise: float) -> np.ndarray:
    seconds = float(rng.uniform(0.6, 2.0))
    wave = demo_clip(kind, seconds, SAMPLE_RATE, rng).astype(np.float64)
    return wave + noise * rng.standard_normal(len(wave))


def pitch_clip(note: str, rng: np.random.Generator, timbre: np.ndarray, noise: float) -> np.ndarray:
    seconds = float(rng.uniform(0.8, 1.6))
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 130.81 * 2 ** (SEMITONES[note] / 12)
    vibrato = 1 + 0.004 * np.sin(2 * np.pi * rng.uniform(4, 7) * t)
    phase = 2 * np.pi * f0 * np.cumsum(vibrato) / SAMPLE_RATE
    wave = sum(a * np.sin((h + 1) * phase) for h, a in enumerate(timbre) if (h + 1) * f0 < 7000)
    envelope = np.minimum(1, t / 0.02) * np.exp(-t * rng.uniform(0.5, 3.0))
    return wave * envelope + noise * rng.standard_normal(len(t))


def _write(path: Path, wave: np.ndarray, rng: np.random.Generator) -> None:
    gain = rng.uniform(0.2, 0.9)
    wave = (gain * wave / max(np.abs(wave).max(), 1e-9)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.atomic_path(path, suffix=".wav") as tmp:
        sf.write(tmp, wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")


def write_sounds(root: Path, clips_per_class: int, takes: int = 3) -> None:
    rng = np.random.default_rng(23)
    for k in range(-(-clips_per_class // takes)):
        speaker, noise = _group_id(k, 1), float(rng.uniform(0.02, 0.25))
        for kind in DEMO_CLASSES:
            for take in range(takes):
                wave = sounds_clip(kind, rng, noise)
                _write(root / kind / f"{speaker}_nohash_{take}.wav", wave, rng)


def write_pitch(root: Path, clips_per_class: int, takes: int = 3) -> None:
    rng = np.random.default_rng(29)
    for k in range(-(-clips_per_class // takes)):
        instrument, noise = _group_id(k, 2), float(rng.uniform(0.02, 0.3))
        timbre = rng.uniform(0, 1, 8) * rng.uniform(0.3, 1.0) ** np.arange(8)
        for note in SEMITONES:
            for take in range(takes):
                wave = pitch_clip(note, rng, timbre, noise)
                _write(root / note / f"{instrument}_nohash_{take}.wav", wave, rng)


TIMBRES = ("bell", "brass", "breathy", "clarinet", "organ", "pluck", "saw", "sine")


def timbre_clip(kind: str, rng: np.random.Generator, jitter: float, noise: float) -> np.ndarray:
    """One note of an instrument family at a random pitch (two octaves), loudness and length."""
    seconds = float(rng.uniform(0.8, 1.6))
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = 130.81 * 2 ** rng.uniform(0, 2)
    n = np.arange(1, 17, dtype=np.float64)
    ratios, decay, attack = n, np.full(16, 1.5), 0.01
    if kind == "sine":
        amps = np.where(n == 1, 1.0, np.where(n == 2, 0.05, 0.0))
    elif kind == "clarinet":
        amps = np.where(n % 2 == 1, 1 / n, 0.0)
    elif kind == "saw":
        amps = 1 / n
    elif kind == "pluck":
        amps, decay = 1 / n, 4 + 1.5 * n
    elif kind == "bell":
        ratios = np.array([1, 2.76, 5.40, 8.93, 13.34, 18.64, *[0] * 10], dtype=np.float64)
        amps, decay = np.where(ratios > 0, 1 / np.maximum(np.arange(1, 17), 1), 0.0), 1 + 0.5 * n
    elif kind == "organ":
        amps = np.where(np.isin(n, [1, 2, 4, 8, 16]), 1.0, 0.0)
    elif kind == "brass":
        amps, attack = np.exp(-((n - 4) ** 2) / 8), 0.08
    else:  # breathy: a soft fundamental in noise
        amps = np.where(n <= 2, 1 / n, 0.0)
    amps = amps * rng.uniform(1 - jitter, 1 + jitter, 16)
    phase = 2 * np.pi * f0 * np.cumsum(1 + 0.003 * np.sin(2 * np.pi * 5 * t)) / SAMPLE_RATE
    wave = np.zeros_like(t)
    for r, a, d in zip(ratios, amps, decay, strict=True):
        if a > 0 and 0 < r * f0 < 7000:
            wave += a * np.sin(r * phase) * np.exp(-d * t)
    wave = wave * np.minimum(1, t / attack)
    if kind == "breathy":
        wave += 0.5 * np.abs(wave).max() * rng.standard_normal(len(t))
    return wave + noise * np.abs(wave).max() * rng.standard_normal(len(t))


def write_timbre(root: Path, clips_per_class: int, takes: int = 3) -> None:
    rng = np.random.default_rng(31)
    for k in range(-(-clips_per_class // takes)):
        player, jitter, noise = _group_id(k, 3), rng.uniform(0.1, 0.5), rng.uniform(0.01, 0.1)
        for kind in TIMBRES:
            for take in range(takes):
                wave = timbre_clip(kind, rng, float(jitter), float(noise))
                _write(root / kind / f"{player}_nohash_{take}.wav", wave, rng)


WRITERS: dict[str, Callable[[Path, int], None]] = {
    "sounds": write_sounds,
    "pitch": write_pitch,
    "timbre": write_timbre,
}
