"""`cola finetune --mode finetune|linear --run NAME --seed S [--encoder PATH]`: genre classification
from a random encoder or, given --encoder, from the COLA encoder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cola_audio import checkpoints, curves, fsutil, training
from cola_audio.data import GenreData
from cola_audio.errors import BadInput, MissingInput
from cola_audio.models.classifier import GenreClassifier
from cola_audio.models.encoder import check_frontend, load_encoder_weights
from cola_audio.stats import classification_metrics
from cola_audio.store import FeatureStore

log = logging.getLogger(__name__)


def run_dir(out_dir: Path, run_name: str, seed: int) -> Path:
    return Path(out_dir) / run_name / f"seed-{seed}"


def run(
    params: dict[str, Any],
    run_name: str,
    seed: int,
    mode: str,
    features: Path = Path("data/features"),
    meta_dir: Path = Path("data/meta"),
    encoder: Path | None = None,
    out_dir: Path = Path("models/finetune"),
    callbacks: list | None = None,
    **trainer_overrides: Any,
) -> dict[str, Any]:
    """Wire data and model, fit (resuming only the same interrupted run), test the checkpoint
    with the best validation accuracy, write metrics, predictions and the curve. The run starts
    from `encoder` when one is given (init pretrained), else from a random encoder."""
    cfg = params["finetune"]
    if mode not in ("finetune", "linear"):
        raise BadInput(f"--mode {mode!r}: choose finetune or linear")
    job = Job(
        cfg,
        {"init": "scratch" if encoder is None else "pretrained", "mode": mode},
        run_name,
        seed,
        Path(features),
        Path(meta_dir),
        None if encoder is None else Path(encoder),
        run_dir(out_dir, run_name, seed),
    )
    if job.encoder is not None:
        _check_encoder(job.encoder, job.features)
    with checkpoints.exclusive(job.out):
        return _run(job, callbacks, trainer_overrides)


def _check_encoder(encoder: Path, features: Path) -> None:
    """Before the run folder exists: the encoder is there and fits the features' front-end."""
    if not encoder.is_file():
        raise MissingInput(f"{encoder}: no pretrained encoder; run `cola pretrain` first")
    summary = features / "summary.json"
    check_frontend(encoder, fsutil.read_json(summary)["frontend"], str(summary))


@dataclass(frozen=True)
class Job:
    """One run × seed: its params section, how it starts (init, mode), and where it reads and
    writes."""

    cfg: dict[str, Any]
    spec: dict[str, str]
    run_name: str
    seed: int
    features: Path
    meta_dir: Path
    encoder: Path | None
    out: Path


def _run(job: Job, callbacks: list | None, trainer_overrides: dict[str, Any]) -> dict[str, Any]:
    """Wire data and model → fit → test the checkpoint validation selected → write."""
    data, model, identity = _wire(job)
    resume = checkpoints.resume_point(job.out, identity)
    trainer, best_cb = _fit(job, data, model, resume, callbacks, trainer_overrides)
    best = _load_best(job.out, best_cb, job.cfg["max_steps"], job.run_name)
    model.load_state_dict(best["state_dict"], strict=True)
    trainer.test(model, datamodule=data, verbose=False)
    outputs = {k: v.numpy() for k, v in model.test_outputs.items()}
    metrics = _metrics(job, data, outputs, best, best_cb, trainer, identity)
    if trainer.is_global_zero:
        _write_outputs(job.out, metrics, outputs, data.genres)
        checkpoints.finish(job.out)
        log.info(
            "%s seed %d: test accuracy %.3f, macro-F1 %.3f on %d clips (selected epoch %d)",
            job.run_name,
            job.seed,
            metrics["accuracy"],
            metrics["macro_f1"],
            metrics["n_test"],
            metrics["selected_epoch"],
        )
    return metrics


def _metrics(
    job: Job,
    data: GenreData,
    outputs: dict[str, np.ndarray],
    best: dict[str, Any],
    best_cb: Any,
    trainer: Any,
    identity: str,
) -> dict[str, Any]:
    """metrics.json: test scores of the selected checkpoint, what was selected, and from what."""
    return {
        **scalar_metrics(classification_metrics(outputs["labels"], outputs["preds"], data.genres)),
        "run": job.run_name,
        **job.spec,
        "seed": job.seed,
        "n_test": int(len(outputs["labels"])),
        "n_test_skipped": data.missing["test"],
        "n_train": len(data.splits["train"]),
        "n_val": len(data.splits["val"]),
        "selected_epoch": int(best["epoch"]),
        "best_val_acc": float(best_cb.best_model_score),
        "steps": int(trainer.global_step),
        "run_identity": identity,
    }


def _wire(job: Job) -> tuple[GenreData, GenreClassifier, str]:
    """The seeded data module, the model (with the pretrained encoder's weights where the run
    starts from it) and the run's identity over its params, inputs and code."""
    cfg, spec = job.cfg, job.spec
    training.seed_everything(job.seed, cfg["threads"])
    data = GenreData(
        job.features,
        job.meta_dir,
        cfg["crop_frames"],
        cfg["batch_size"],
        cfg["eval_batch_size"],
        cfg["num_workers"],
        job.seed,
    )
    data.setup()
    inputs = [*FeatureStore.files(job.features), job.meta_dir / "finetune.json"]
    if job.encoder is not None:
        inputs.append(job.encoder)
    identity = checkpoints.run_identity(
        cfg,
        inputs,
        "finetune",
        ignore=("seeds", "runs"),
        run=job.run_name,
        seed=job.seed,
        **spec,
    )
    model = GenreClassifier.from_params(
        cfg, len(data.genres), spec["init"], spec["mode"], run_identity=identity
    )
    if job.encoder is not None:
        load_encoder_weights(model.encoder, job.encoder)
    return data, model, identity


def _fit(
    job: Job,
    data: GenreData,
    model: GenreClassifier,
    resume: Path | None,
    callbacks: list | None,
    trainer_overrides: dict[str, Any],
) -> tuple[Any, Any]:
    """Train (continuing `resume`, the same run's last epoch end, if any); returns the trainer
    and the callback that tracked the best validation accuracy."""
    cfg = job.cfg
    if resume is None and job.spec == {"init": "scratch", "mode": "linear"}:
        model.calibrate_frozen_encoder(data.train_dataloader(), cfg["precise_bn_batches"])
    curves.prepare_logs(job.out, resume)
    best_cb, savers = checkpoints.checkpoint_callbacks(job.out, "val_acc", "max")
    frozen_pretrained = job.spec == {"init": "pretrained", "mode": "linear"}
    trainer = training.make_trainer(
        cfg,
        job.out,
        job.seed,
        [*savers, *(callbacks or [])],
        0 if frozen_pretrained else cfg["precise_bn_batches"],  # no BatchNorm of it trains
        **{"check_val_every_n_epoch": cfg["val_every_n_epochs"], **trainer_overrides},
    )
    trainer.fit(model, data, ckpt_path=resume, weights_only=True)
    return trainer, best_cb


def _load_best(out: Path, best_cb: Any, max_steps: int, run_name: str) -> dict[str, Any]:
    """The best-validation checkpoint of this run, by its place in this run's folder (a resumed
    callback may remember an absolute path from another checkout)."""
    path = Path(out) / "checkpoints" / "best.ckpt"
    if best_cb.best_model_score is None or not path.is_file():
        raise BadInput(
            f"{run_name}: training stopped before the first validation (finetune.max_steps = "
            f"{max_steps} ends inside epoch 0); raise max_steps or set it to -1"
        )
    return checkpoints.safe_load(path)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json keeps: numbers only, so `dvc metrics show` and `dvc exp show` stay
    readable (per-class numbers and the confusion matrix follow from predictions.csv)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def _write_outputs(
    out: Path, metrics: dict[str, Any], outputs: dict[str, np.ndarray], genres: list[str]
) -> None:
    fsutil.write_json(out / "metrics.json", metrics)
    predictions = pd.DataFrame(
        {
            "track_id": outputs["track_ids"],
            "actual": [genres[i] for i in outputs["labels"]],
            "predicted": [genres[i] for i in outputs["preds"]],
        }
    )
    with fsutil.atomic_path(out / "predictions.csv") as tmp:
        predictions.to_csv(tmp, index=False, lineterminator="\n")
    curves.export_curve(
        out,
        ["train_loss_epoch", "train_acc_epoch", "val_acc", "val_loss"],
        out / "curve.csv",
        x="epoch",
    )
