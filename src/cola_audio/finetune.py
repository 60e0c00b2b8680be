"""`cola finetune --run NAME`: genre classification from scratch or from the COLA encoder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cola_audio import fsutil, training
from cola_audio.data import GenreData
from cola_audio.models.classifier import GenreClassifier
from cola_audio.models.encoder import load_encoder_weights

log = logging.getLogger(__name__)
HPARAM_KEYS = (
    "pooling",
    "input_norm",
    "bn_momentum",
    "dropout",
    "lr",
    "linear_lr",
    "weight_decay",
    "lr_schedule",
    "warmup_steps",
)


def classification_metrics(
    labels: np.ndarray, preds: np.ndarray, genres: list[str]
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class accuracy (recall) and the confusion matrix; pure."""
    n = len(genres)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, preds), 1)
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    tp = np.diag(confusion)
    recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(n), where=predicted > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n), where=denom > 0)
    present = support > 0
    return {
        "accuracy": float(tp.sum() / max(1, len(labels))),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class_accuracy": {g: float(r) for g, r in zip(genres, recall, strict=True)},
        "confusion_matrix": confusion.tolist(),
        "labels": genres,
    }


def run(
    params: dict[str, Any],
    run_name: str,
    features: Path = Path("data/features"),
    meta_dir: Path = Path("data/meta"),
    encoder: Path = Path("models/pretrain/encoder.safetensors"),
    out_dir: Path = Path("models/finetune"),
    callbacks: list | None = None,
    **trainer_overrides: Any,
) -> dict[str, Any]:
    cfg = params["finetune"]
    if run_name not in cfg["runs"]:
        raise KeyError(
            f"--run {run_name!r} is not in finetune.runs; choose one of {', '.join(cfg['runs'])}"
        )
    spec = cfg["runs"][run_name]
    out = Path(out_dir) / run_name
    training.seed_everything(cfg["seed"])
    data = GenreData(
        features,
        meta_dir,
        cfg["crop_frames"],
        cfg["batch_size"],
        cfg["eval_batch_size"],
        cfg["num_workers"],
        cfg["seed"],
    )
    data.setup()
    inputs = [Path(features) / "index.csv", Path(meta_dir) / "finetune.json"]
    if spec["init"] == "pretrained":
        inputs.append(Path(encoder))
    if not Path(encoder).is_file() and spec["init"] == "pretrained":
        raise FileNotFoundError(f"{encoder}: no pretrained encoder; run `cola pretrain` first")
    model = GenreClassifier(
        n_classes=len(data.genres),
        init=spec["init"],
        mode=spec["mode"],
        **{k: cfg[k] for k in HPARAM_KEYS},
        inputs_fingerprint=training.fingerprint(*inputs),
    )
    if spec["init"] == "pretrained":
        load_encoder_weights(model.encoder, encoder)
    resume = training.resumable(out / "checkpoints" / "last.ckpt", dict(model.hparams))
    training.prepare_logs(out, resume)
    best_cb, checkpoints = training.checkpoint_callbacks(out, "val_acc", "max")
    trainer = training.make_trainer(
        cfg, out, [*checkpoints, *(callbacks or [])], **trainer_overrides
    )
    trainer.fit(model, data, ckpt_path=resume, weights_only=True)

    # Model selection on validation accuracy; the test set is scored once, with that model.
    if not best_cb.best_model_path:
        raise RuntimeError(
            f"{run_name}: training stopped before the first validation (finetune.max_steps = "
            f"{cfg['max_steps']} ends inside epoch 0); raise max_steps or set it to -1"
        )
    best = training.safe_load(best_cb.best_model_path)
    model.load_state_dict(best["state_dict"], strict=True)
    trainer.test(model, datamodule=data, verbose=False)
    outputs = {k: v.numpy() for k, v in model.test_outputs.items()}
    metrics = classification_metrics(outputs["labels"], outputs["preds"], data.genres)
    metrics.update(
        {
            "run": run_name,
            "init": spec["init"],
            "mode": spec["mode"],
            "seed": cfg["seed"],
            "n_test": int(len(outputs["labels"])),
            "n_test_skipped": data.missing["test"],
            "n_train": len(data.splits["train"]),
            "n_val": len(data.splits["val"]),
            "selected_epoch": int(best["epoch"]),
            "best_val_acc": float(best_cb.best_model_score),
            "steps": int(trainer.global_step),
        }
    )
    if trainer.is_global_zero:
        fsutil.write_json(out / "metrics.json", metrics)
        predictions = pd.DataFrame(
            {
                "track_id": outputs["track_ids"],
                "actual": [data.genres[i] for i in outputs["labels"]],
                "predicted": [data.genres[i] for i in outputs["preds"]],
            }
        )
        with fsutil.atomic_path(out / "predictions.csv") as tmp:
            predictions.to_csv(tmp, index=False, lineterminator="\n")
        training.export_curve(
            out,
            ["train_loss_epoch", "train_acc_epoch", "val_acc", "val_loss"],
            out / "curve.csv",
            x="epoch",
        )
        log.info(
            "%s: test accuracy %.3f, macro-F1 %.3f on %d clips (selected epoch %d)",
            run_name,
            metrics["accuracy"],
            metrics["macro_f1"],
            metrics["n_test"],
            metrics["selected_epoch"],
        )
    return metrics
