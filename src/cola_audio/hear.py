"""The HEAR 2021 common API (hearbenchmark.com/hear-api.html) for a cola-audio encoder.

    from cola_audio import hear
    model = hear.load_model("models/pretrain/encoder.safetensors")
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)  # audio: (n, samples)
    scene = hear.get_scene_embeddings(audio, model)

Audio is a float32 tensor (n_sounds, n_samples) at `model.sample_rate` (16 kHz), on the model's
device, every sample finite (NaN or infinity would make every embedding NaN, so it is refused
with the sounds' indices). Timestamp embeddings come from 1 s windows centred every
TIMESTAMP_HOP_FRAMES frames (50 ms, as HEAR suggests for event detection) from the first frame to
the last, the audio padded with silence (the log floor) by half a window at both ends, each stamped
at its centre in milliseconds. Windows are cut from one sound's padded features at a time and
embedded `model.batch_size` at a time, so an hour of audio (72,000 windows, 1.8 GB stacked) never
holds more than one batch of windows. A scene embedding is the mean of the sound's timestamp
embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from cola_audio.embed import DEFAULT_ENCODER, Embedder
from cola_audio.models.encoder import EMBED_DIM

TIMESTAMP_HOP_FRAMES = 5  # 50 ms at the front-end's 10 ms hop
BATCH_SIZE = 64  # windows per forward pass; set model.batch_size to trade memory for speed


class HearModel(torch.nn.Module):
    """The encoder and its front-end, with the attributes the HEAR API asks for."""

    scene_embedding_size = EMBED_DIM
    timestamp_embedding_size = EMBED_DIM

    def __init__(self, embedder: Embedder, batch_size: int = BATCH_SIZE) -> None:
        super().__init__()
        self.embedder = embedder
        self.encoder = embedder.encoder  # a submodule, so .to(device) moves the weights
        self.sample_rate = embedder.frontend.sample_rate
        self.batch_size = batch_size


def load_model(model_file_path: str = "") -> HearModel:
    """The encoder saved by `cola pretrain` (default: models/pretrain/encoder.safetensors), in
    eval mode, on a GPU when one is present."""
    return HearModel(Embedder.load(model_file_path or DEFAULT_ENCODER))


def validate_audio(audio: torch.Tensor) -> None:
    """Raise, naming the fix, for audio the API cannot embed: not a (n_sounds, n_samples) float
    tensor, or sounds holding NaN or infinity (their embeddings would all be NaN, silently)."""
    if not isinstance(audio, torch.Tensor):
        raise TypeError(
            f"audio must be a torch.Tensor (n_sounds, n_samples), got {type(audio).__name__}; "
            "convert it with torch.as_tensor"
        )
    if audio.ndim != 2:
        raise ValueError(f"audio must be (n_sounds, n_samples), got shape {tuple(audio.shape)}")
    if not audio.is_floating_point():
        raise ValueError(
            f"audio must hold float samples (float32), got {audio.dtype}; convert integer PCM "
            "first, e.g. audio.float() / 32768 for int16"
        )
    bad = [k for k, sound in enumerate(audio) if not bool(torch.isfinite(sound).all())]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (
            f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        )
        raise ValueError(
            f"audio: {len(bad)} of {len(audio)} sound(s) hold NaN or infinite samples "
            f"(indices {shown}); repair or drop them first (e.g. torch.nan_to_num)"
        )


def get_timestamp_embeddings(
    audio: torch.Tensor, model: HearModel
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_sounds, n_timestamps, 1280) embeddings and (n_sounds, n_timestamps) centres in ms."""
    validate_audio(audio)
    embedder = model.embedder
    hop, half = TIMESTAMP_HOP_FRAMES, embedder.crop_frames // 2
    frames = embedder.frontend.n_frames(audio.shape[1])
    if len(audio) and frames == 0:
        raise ValueError(
            f"audio: sounds of {audio.shape[1]} samples are shorter than one analysis frame "
            f"({embedder.frontend.frame_length} samples at {model.sample_rate} Hz), so their "
            "embeddings would be the silence padding alone; pad the sounds or drop them"
        )
    starts = [k * hop - half for k in range(max(1, math.ceil(frames / hop)))]  # may be < 0
    flat = np.empty((len(audio) * len(starts), EMBED_DIM), np.float32)
    done = 0
    for vectors in embedder.embed_batches(_windows(audio, model, starts), model.batch_size):
        flat[done : done + len(vectors)] = vectors
        done += len(vectors)
    embeddings = torch.from_numpy(flat.reshape(len(audio), len(starts), EMBED_DIM))
    centres = torch.from_numpy(embedder.centres_ms(starts).astype(np.float32))
    timestamps = centres.expand(len(audio), -1).contiguous()
    return embeddings.to(audio.device), timestamps.to(audio.device)


def _windows(audio: torch.Tensor, model: HearModel, starts: list[int]) -> Iterator[np.ndarray]:
    """Each sound's windows at `starts` (frame of the unpadded features, < 0 in the padding), as
    views of its padded features: one sound's features are held at a time, no window copied."""
    embedder = model.embedder
    crop, half = embedder.crop_frames, embedder.crop_frames // 2
    for sound in audio:
        features = embedder.frontend.features(
            sound.detach().float().cpu().numpy(), model.sample_rate
        )
        padded = np.concatenate([embedder.silence(half), features, embedder.silence(crop - half)])
        del features  # only the padded copy is needed while this sound's windows are embedded
        for start in starts:
            yield padded[start + half : start + half + crop]


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """(n_sounds, 1280): the mean over each sound's timestamp embeddings."""
    embeddings, _ = get_timestamp_embeddings(audio, model)
    return embeddings.mean(dim=1)
