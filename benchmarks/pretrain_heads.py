"""Which COLA head learns in the CPU budget: in-batch contrastive accuracy after N steps.

Not a test: one run per variant on the built feature store (run `snakemake --until
featurize_gather` first), printed as a table. Usage: python benchmarks/pretrain_heads.py [--steps N]
The variants are the measurements behind the pretraining defaults (README, "Pretraining").
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from cola_audio import params, training
from cola_audio.data import PretrainData
from cola_audio.models.cola import ColaModule

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any]] = {
    "bilinear, W ~ N(0, 1e-3), W at lr (before)": {"bilinear_lr_scale": 1.0, "w_init": "normal"},
    "bilinear, W ~ N(0, 1e-3), W at lr/100": {"bilinear_lr_scale": 0.01, "w_init": "normal"},
    "bilinear, W = s·I, W at lr": {"bilinear_lr_scale": 1.0},
    "bilinear, W = s·I, W at lr/10 (default)": {},
    "cosine, τ = 0.2": {"similarity": "cosine"},
}


class Record(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        self.rows.append((float(m["train_loss_step"]), float(m["train_acc_step"])))


def run_variant(cfg: dict[str, Any], variant: dict[str, Any], steps: int) -> dict[str, float]:
    variant = dict(variant)
    w_init = variant.pop("w_init", "identity")
    training.seed_everything(cfg["seed"], cfg["threads"])
    data = PretrainData(REPO / "data/features", REPO / "data/meta", cfg["crop_frames"], 64, 0, 0)
    model = ColaModule.from_params({**cfg, **variant})
    if w_init == "normal" and model.bilinear is not None:
        torch.nn.init.normal_(model.bilinear, std=1e-3)
    record = Record()
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=10_000,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=[record],
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    last = record.rows[-10:]
    return {
        "peak_loss": max(loss for loss, _ in record.rows[:10]),
        "loss": sum(loss for loss, _ in last) / len(last),
        "acc": sum(acc for _, acc in last) / len(last),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    cfg = params.load(REPO / "params.yaml")["pretrain"]
    print(f"{args.steps} steps, batch 64 (chance 1.6 %, ln 64 = 4.16); mean of the last 10 steps")
    print(f"{'variant':46s} {'peak loss':>9s} {'loss':>6s} {'accuracy':>9s} {'s':>5s}")
    for name, variant in VARIANTS.items():
        r = run_variant(cfg, variant, args.steps)
        print(
            f"{name:46s} {r['peak_loss']:9.2f} {r['loss']:6.2f} {100 * r['acc']:8.1f}% "
            f"{r['seconds']:5.0f}"
        )


if __name__ == "__main__":
    main()
