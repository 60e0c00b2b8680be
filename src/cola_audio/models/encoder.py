"""EfficientNet-B0 over log-mel crops, pooled to the 1280-d representation COLA transfers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from efficientnet_pytorch import EfficientNet
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from cola_audio import fsutil
from cola_audio.errors import BadInput, InputError, MissingInput

EMBED_DIM = 1280


class Encoder(torch.nn.Module):
    """(batch, frames, mels) log-mel → (batch, 1280).

    One input channel straight into EfficientNet-B0 (the official code; the seed's extra 1→3
    channel convolution is not needed). Built from scratch: no weights are downloaded.
    """

    def __init__(
        self,
        pooling: str = "max",
        input_norm: str = "crop",
        bn_momentum: float = 0.1,
        drop_connect_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
        if input_norm not in ("crop", "none"):
            raise ValueError(f"input_norm must be 'crop' or 'none', got {input_norm!r}")
        self.pooling, self.input_norm = pooling, input_norm
        self.frozen = False
        # efficientnet_pytorch takes TF's convention: torch momentum = 1 - batch_norm_momentum.
        self.net = EfficientNet.from_name(
            "efficientnet-b0",
            in_channels=1,
            include_top=False,
            drop_connect_rate=drop_connect_rate,
            batch_norm_momentum=1.0 - bn_momentum,
        )
        # NHWC: oneDNN's depthwise convolutions run 1.4x (training) to 1.9x (inference) faster
        # on CPU in this layout (measured here on batches of 1 s crops); same numbers to 1e-17.
        self.net.to(memory_format=torch.channels_last)

    def freeze(self) -> Encoder:
        """Linear evaluation: no gradients and BatchNorm statistics fixed, whoever calls train()."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Encoder:
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3:
            raise ValueError(f"expected (batch, frames, mels), got shape {tuple(x.shape)}")
        if self.input_norm == "crop":
            x = standardize_crops(x)
        fmap = self.net.extract_features(
            x.unsqueeze(1).contiguous(memory_format=torch.channels_last)
        )
        return fmap.amax(dim=(2, 3)) if self.pooling == "max" else fmap.mean(dim=(2, 3))


def standardize_crops(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per crop.

    A waveform gain is a constant added to every log-mel value, so this makes the input invariant
    to how the waveform was normalised (whole clip, as stored, or each crop, as the official
    downstream input): the two agree exactly after it.
    """
    mean = x.mean(dim=(1, 2), keepdim=True)
    std = x.std(dim=(1, 2), keepdim=True).clamp(min=1e-5)
    return (x - mean) / std


class StateDictMismatch(InputError, ValueError):
    """A saved encoder does not fit this architecture; the message lists the keys."""


def save_encoder(
    encoder: Encoder,
    path: str | Path,
    frontend: dict[str, Any] | None = None,
    crop_frames: int | None = None,
) -> None:
    """Plain tensors in safetensors: loadable anywhere without unpickling. The metadata says how
    to feed it (front-end settings, input normalisation, window length), so `cola embed` and the
    HEAR API need nothing but the file."""
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    metadata = {
        "format": "cola-audio encoder",
        "pooling": encoder.pooling,
        "input_norm": encoder.input_norm,
    }
    if frontend is not None:
        metadata["frontend"] = json.dumps(frontend, sort_keys=True)
    if crop_frames is not None:
        metadata["crop_frames"] = str(crop_frames)
    with fsutil.atomic_path(path, suffix=".safetensors") as tmp:
        Path(tmp).write_bytes(sorted_metadata(save(state, metadata=metadata)))


def sorted_metadata(blob: bytes) -> bytes:
    """Pure: a safetensors file with its metadata map in sorted key order.

    safetensors writes that map in hash order, different at every save (seen: three saves of one
    state, three byte strings), so equal encoders were different files to DVC and to the report's
    md5 table. The tensors and their offsets are untouched.
    """
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8 bytes
    return len(text).to_bytes(8, "little") + text + blob[8 + size :]


@contextlib.contextmanager
def _open_encoder(path: Path) -> Iterator[Any]:
    """safetensors' reader on a saved encoder; a missing or damaged file is named with the fix."""
    if not path.is_file():
        raise MissingInput(f"{path}: no pretrained encoder; run `cola pretrain` or `dvc pull`")
    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh
    except SafetensorError as exc:
        raise BadInput(
            f"{path}: not a readable safetensors file ({exc}); it is truncated or damaged. "
            "Rerun `cola pretrain` or `dvc pull` to restore it"
        ) from exc


def encoder_metadata(path: str | Path) -> dict[str, str]:
    """The metadata save_encoder wrote (empty for a file without any)."""
    with _open_encoder(Path(path)) as fh:
        return dict(fh.metadata() or {})


class FrontEndMismatch(BadInput):
    """An encoder used on features made by another front-end than the one it was trained on."""


def check_frontend(path: str | Path, features: dict[str, Any], features_label: str) -> None:
    """Refuse an encoder whose stored front-end differs from the features it is about to see:
    EfficientNet takes any number of mel bands, so a 40-mel encoder trains on 64-mel features
    without a shape error and reports a number that means nothing."""
    stored = encoder_metadata(path).get("frontend")
    if stored is None:
        return  # written before encoders recorded their front-end: nothing to compare
    trained = json.loads(stored)
    differ = sorted(
        k for k in trained.keys() | features.keys() if trained.get(k) != features.get(k)
    )
    if differ:
        shown = "; ".join(
            f"{k}: {trained.get(k)!r} in the encoder, {features.get(k)!r} in the features"
            for k in differ
        )
        raise FrontEndMismatch(
            f"{path} was trained on another front-end than {features_label} ({shown}). "
            "Pretrain on these features (`cola pretrain`) or featurize with the encoder's values."
        )


def load_encoder_weights(encoder: Encoder, path: str | Path) -> None:
    """Strict load: any missing or unexpected key is an error naming the keys."""
    path = Path(path)
    with _open_encoder(path) as fh:
        state = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 (a reader, not a dict)
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" … ({len(keys)} in all)" if len(keys) > 8 else "")

        raise StateDictMismatch(
            f"{path} does not match the encoder: missing keys [{show(missing)}], unexpected keys "
            f"[{show(unexpected)}], shape mismatches [{show(shapes)}]. Re-export it with "
            "`cola pretrain` using the same architecture."
        )
    encoder.load_state_dict(state, strict=True)
