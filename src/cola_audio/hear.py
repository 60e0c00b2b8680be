"""The HEAR 2021 common API (hearbenchmark.com/hear-api.html) for a cola-audio encoder.

    from cola_audio import hear
    model = hear.load_model("models/pretrain/encoder.safetensors")
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)  # audio: (n, samples)
    scene = hear.get_scene_embeddings(audio, model)

Audio is a float32 tensor (n_sounds, n_samples) at `model.sample_rate` (16 kHz), on the model's
device. Timestamp embeddings come from 1 s windows every TIMESTAMP_HOP_FRAMES frames (250 ms),
each stamped at its centre in milliseconds; a sound shorter than 1 s gives one window padded with
silence. A scene embedding is the mean of the sound's timestamp embeddings.
"""

from __future__ import annotations

import numpy as np
import torch

from cola_audio.embed import DEFAULT_ENCODER, Embedder
from cola_audio.models.encoder import EMBED_DIM

TIMESTAMP_HOP_FRAMES = 25  # 250 ms at the front-end's 10 ms hop


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
    sounds = audio.detach().float().cpu().numpy()
    features = [embedder.frontend.features(wave, model.sample_rate) for wave in sounds]
    starts = embedder.starts(len(features[0]) if features else 0, TIMESTAMP_HOP_FRAMES)
    windows = [embedder.windows(f, TIMESTAMP_HOP_FRAMES) for f in features]
    flat = embedder.embed(np.concatenate(windows)) if windows else np.zeros((0, EMBED_DIM))
    embeddings = torch.from_numpy(flat.reshape(len(sounds), len(starts), EMBED_DIM))
    centres = torch.from_numpy(embedder.centres_ms(starts).astype(np.float32))
    timestamps = centres.expand(len(sounds), -1).contiguous()
    return embeddings.to(device), timestamps.to(device)


def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    """(n_sounds, 1280): the mean over each sound's timestamp embeddings."""
    embeddings, _ = get_timestamp_embeddings(audio, model)
    return embeddings.mean(dim=1)
