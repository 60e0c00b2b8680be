"""The HEAR 2021 common API (hearbenchmark.com/hear-api.html) for a cola-audio encoder.

    from cola_audio import hear
    model = hear.load_model("models/pretrain/encoder.safetensors")
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)  # audio: (n, samples)
    scene = hear.get_scene_embeddings(audio, model)

Audio is a float32 tensor (n_sounds, n_samples) at `model.sample_rate` (16 kHz), on the model's
device. Timestamp embeddings come from 1 s windows centred every TIMESTAMP_HOP_FRAMES frames
(50 ms, as HEAR suggests for event detection) from the first frame to the last, the audio padded
with silence (the log floor) by half a window at both ends, each stamped at its centre in
milliseconds. A scene embedding is the mean of the sound's timestamp embeddings.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cola_audio.embed import DEFAULT_ENCODER, Embedder
from cola_audio.models.encoder import EMBED_DIM

TIMESTAMP_HOP_FRAMES = 5  # 50 ms at the front-end's 10 ms hop


class HearModel(torch.nn.Module):
    """The encoder and its front-end, with the attributes the HEAR API asks for."""

    scene_embedding_size = EMBED_DIM
    timestamp_embedding_size = EMBED_DIM

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.embedder = embedder
        self.encoder = embedder.encoder  # a submodule, so .to(device) moves the weights
        self.sample_rate = embedder.frontend.sample_rate


def load_model(model_file_path: str = "") -> HearModel:
    """The encoder saved by `cola pretrain` (default: models/pretrain/encoder.safetensors), in
    eval mode, on a GPU when one is present."""
    return HearModel(Embedder.load(model_file_path or DEFAULT_ENCODER))


def get_timestamp_embeddings(
    audio: torch.Tensor, model: HearModel
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_sounds, n_timestamps, 1280) embeddings and (n_sounds, n_timestamps) centres in ms."""
    if audio.ndim != 2:
        raise ValueError(f"audio must be (n_sounds, n_samples), got shape {tuple(audio.shape)}")
    embedder, device = model.embedder, audio.device
    crop, hop, half = embedder.crop_frames, TIMESTAMP_HOP_FRAMES, embedder.crop_frames // 2
    frames = embedder.frontend.n_frames(audio.shape[1])
    starts = [k * hop - half for k in range(max(1, math.ceil(frames / hop)))]  # may be < 0
    windows = []
    for wave in audio.detach().float().cpu().numpy():
        features = embedder.frontend.features(wave, model.sample_rate)
        padded = np.concatenate([embedder.silence(half), features, embedder.silence(crop - half)])
        windows += [padded[s + half : s + half + crop] for s in starts]
    flat = embedder.embed(np.stack(windows)) if windows else np.zeros((0, EMBED_DIM), np.float32)
    embeddings = torch.from_numpy(flat.reshape(len(audio), len(starts), EMBED_DIM))
    centres = torch.from_numpy(embedder.centres_ms(starts).astype(np.float32))
    timestamps = centres.expand(len(audio), -1).contiguous()
    return embeddings.to(device), timestamps.to(device)


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """(n_sounds, 1280): the mean over each sound's timestamp embeddings."""
    embeddings, _ = get_timestamp_embeddings(audio, model)
    return embeddings.mean(dim=1)
