"""`cola pretrain`: COLA on the unlabelled pretraining set; exports the encoder as safetensors."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from cola_audio import checkpoints, curves, fsutil, training
from cola_audio.data import PretrainData
from cola_audio.models.cola import ColaModule
from cola_audio.models.encoder import save_encoder
from cola_audio.store import FeatureStore

log = logging.getLogger(__name__)


def run(
    params: dict[str, Any],
    features: Path = Path("data/features"),
    meta_dir: Path = Path("data/meta"),
    out_dir: Path = Path("models/pretrain"),
    callbacks: list | None = None,
    **trainer_overrides: Any,
) -> dict[str, Any]:
    out_dir = Path(out_dir)
    with checkpoints.exclusive(out_dir):
        return _run(params["pretrain"], features, meta_dir, out_dir, callbacks, trainer_overrides)


def _run(
    cfg: dict[str, Any],
    features: Path,
    meta_dir: Path,
    out_dir: Path,
    callbacks: list | None,
    trainer_overrides: dict[str, Any],
) -> dict[str, Any]:
    """Wire data and model, fit (resuming only the same interrupted run), export the encoder."""
    training.seed_everything(cfg["seed"], cfg["threads"])
    data = PretrainData(
        features, meta_dir, cfg["crop_frames"], cfg["batch_size"], cfg["num_workers"], cfg["seed"]
    )
    data.setup()
    identity = checkpoints.run_identity(
        cfg, [*FeatureStore.files(features), Path(meta_dir) / "pretrain.json"], "pretrain"
    )
    model = ColaModule.from_params(cfg, run_identity=identity)
    resume = checkpoints.resume_point(out_dir, identity)
    curves.prepare_logs(out_dir, resume)
    _, savers = checkpoints.checkpoint_callbacks(out_dir, "train_loss_epoch", "min")
    trainer = training.make_trainer(
        cfg,
        out_dir,
        cfg["seed"],
        [*savers, *(callbacks or [])],
        cfg["precise_bn_batches"],
        **trainer_overrides,
    )
    start = time.perf_counter()
    trainer.fit(model, data, ckpt_path=resume, weights_only=True)
    log.info("trained in %.1f s", time.perf_counter() - start)
    summary = _summary(cfg, trainer, data, identity, resume)
    if trainer.is_global_zero:
        _export(cfg, model, Path(features), out_dir, summary)
        checkpoints.finish(out_dir)
        log.info("pretraining done: %s", summary)
    return summary


def _summary(
    cfg: dict[str, Any],
    trainer: Any,
    data: PretrainData,
    identity: str,
    resume: Path | None,
) -> dict[str, Any]:
    """What summary.json records of a finished pretraining: its size, device, final metrics (no
    wall time: the file is a function of the run, the same bytes at every rebuild)."""
    assert data.dataset is not None
    return {
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "clips": len(data.dataset),
        "clips_padded": data.dataset.n_padded,
        "clips_missing": data.n_missing,
        "global_batch": int(cfg["batch_size"] * trainer.world_size),
        "precision": str(trainer.precision),
        "accelerator": type(trainer.accelerator).__name__,
        "devices": trainer.world_size,
        "final": {k: round(float(v), 5) for k, v in trainer.callback_metrics.items()},
        "run_identity": identity,
        "resumed_from": str(resume) if resume else None,
    }


def _export(
    cfg: dict[str, Any], model: ColaModule, features: Path, out_dir: Path, summary: dict[str, Any]
) -> None:
    """The encoder (safetensors, with the front-end it was trained on), curve and summary."""
    save_encoder(
        model.encoder,
        out_dir / "encoder.safetensors",
        frontend=fsutil.read_json(features / "summary.json")["frontend"],
        crop_frames=cfg["crop_frames"],
    )
    curves.export_curve(
        out_dir, ["train_loss_step", "train_acc_step", "global_batch"], out_dir / "curve.csv"
    )
    fsutil.write_json(out_dir / "summary.json", summary)
