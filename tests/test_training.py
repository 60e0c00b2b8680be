"""Lightning runs on the tiny dataset: linear vs finetune, resume, determinism, DDP on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from safetensors.torch import load_file

from cola_audio import finetune, pretrain
from cola_audio.models.encoder import Encoder, save_encoder
from conftest import REPO

QUIET = {"enable_progress_bar": False, "logger": False}


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A saved encoder with non-default BatchNorm statistics, as a pretrained one would have."""
    torch.manual_seed(1)
    enc = Encoder()
    enc.train()
    with torch.no_grad():
        enc(torch.randn(8, 98, 64))
    path = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    save_encoder(enc, path)
    return path


def _finetune(tiny_data, tmp_path, run, encoder=None, **overrides):
    p = json.loads(json.dumps(tiny_data["params"]))
    p["finetune"].update(overrides)
    return finetune.run(
        p,
        run,
        features=tiny_data["features"],
        meta_dir=tiny_data["meta"],
        encoder=encoder or Path("missing"),
        out_dir=tmp_path,
    )


def test_linear_mode_leaves_the_encoder_bit_identical(tiny_data, tmp_path, encoder_file):
    metrics = _finetune(tiny_data, tmp_path, "pretrained-linear", encoder_file)
    before = load_file(str(encoder_file))
    ckpt = torch.load(
        tmp_path / "pretrained-linear" / "checkpoints" / "last.ckpt", weights_only=True
    )
    after = {
        k.removeprefix("encoder."): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("encoder.")
    }
    assert set(after) == set(before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    head = ckpt["state_dict"]["head.weight"]
    assert head.abs().sum() > 0
    assert metrics["mode"] == "linear" and metrics["init"] == "pretrained"


def test_finetune_mode_changes_the_encoder(tiny_data, tmp_path, encoder_file):
    metrics = _finetune(tiny_data, tmp_path, "pretrained-finetune", encoder_file)
    before = load_file(str(encoder_file))
    ckpt = torch.load(
        tmp_path / "pretrained-finetune" / "checkpoints" / "last.ckpt", weights_only=True
    )
    changed = [k for k in before if not torch.equal(before[k], ckpt["state_dict"]["encoder." + k])]
    assert any(k.endswith("_conv_stem.weight") for k in changed)
    out = tmp_path / "pretrained-finetune"
    assert set(metrics) >= {
        "accuracy",
        "macro_f1",
        "per_class_accuracy",
        "confusion_matrix",
        "n_test",
        "selected_epoch",
        "seed",
        "init",
        "mode",
    }
    assert sum(map(sum, metrics["confusion_matrix"])) == metrics["n_test"] > 0
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "predictions.csv").read_text().startswith("track_id,actual,predicted")


def test_pretrained_init_without_an_encoder_is_an_error(tiny_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="cola pretrain"):
        _finetune(tiny_data, tmp_path, "pretrained-finetune", tmp_path / "none.safetensors")
    with pytest.raises(KeyError, match="choose one of scratch-finetune"):
        _finetune(tiny_data, tmp_path, "nonsense")


def test_same_seed_gives_the_same_metrics(tiny_data, tmp_path):
    a = _finetune(tiny_data, tmp_path / "a", "scratch-finetune")
    b = _finetune(tiny_data, tmp_path / "b", "scratch-finetune")
    assert a == b
    c = _finetune(tiny_data, tmp_path / "c", "scratch-finetune", seed=7)
    assert c["seed"] == 7


class _DieAt(pl.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated kill")


class _FirstStep(pl.Callback):
    def __init__(self):
        self.first = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.first is None:
            self.first = trainer.global_step


def test_pretraining_resumes_from_the_saved_step(tiny_data, tmp_path):
    p = json.loads(json.dumps(tiny_data["params"]))
    p["pretrain"].update(max_steps=5, max_epochs=50)
    kw = {"features": tiny_data["features"], "meta_dir": tiny_data["meta"], "out_dir": tmp_path}
    with pytest.raises(RuntimeError, match="simulated kill"):
        pretrain.run(p, callbacks=[_DieAt(3)], **kw)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    first = _FirstStep()
    summary = pretrain.run(p, callbacks=[first], **kw)
    assert first.first == 3
    assert summary["steps"] == 5 and summary["resumed_from"].endswith("last.ckpt")
    assert (tmp_path / "encoder.safetensors").is_file()
    curve = (tmp_path / "curve.csv").read_text().splitlines()
    assert curve[0].startswith("step,train_loss_step,train_acc_step,global_batch")
    steps = [int(row.split(",")[0]) for row in curve[1:]]
    assert min(steps) < 3 <= max(steps)  # the curve spans the kill: logs before it are kept
    # Other parameters: the old checkpoint is not reused.
    p["pretrain"]["lr"] = 5e-4
    assert pretrain.run(p, **kw)["resumed_from"] is None


def test_ddp_on_two_cpu_processes_gathers_negatives(tiny_data, tmp_path):
    """`cola pretrain` under DDP (gloo): logits cover the global batch of both processes."""
    p = json.loads(json.dumps(tiny_data["params"]))
    p["pretrain"].update(max_steps=2, batch_size=4, precise_bn_batches=1)
    p["pretrain"]["trainer"].update(accelerator="cpu", devices=2, strategy="ddp")
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(p))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    cmd = [
        sys.executable,
        "-m",
        "cola_audio.cli",
        "--params",
        str(params_path),
        "pretrain",
        "--features",
        str(tiny_data["features"]),
        "--meta",
        str(tiny_data["meta"]),
        "--out",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["global_batch"] == 8
    curve = (tmp_path / "out" / "curve.csv").read_text().splitlines()
    header = curve[0].split(",")
    widths = {float(row.split(",")[header.index("global_batch")]) for row in curve[1:]}
    assert widths == {8.0}  # 4 anchors per process scored against 8 positives


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; this machine has none")
def test_bf16_pretraining_on_gpu(tiny_data, tmp_path):
    p = json.loads(json.dumps(tiny_data["params"]))
    p["pretrain"]["trainer"].update(accelerator="gpu", devices=1, precision="auto")
    summary = pretrain.run(
        p, features=tiny_data["features"], meta_dir=tiny_data["meta"], out_dir=tmp_path
    )
    assert summary["precision"] == "bf16-mixed"


def test_fingerprint_covers_inputs_and_code(tmp_path, monkeypatch):
    from cola_audio import training

    data = tmp_path / "index.csv"
    data.write_text("a")
    before = training.fingerprint(data)
    data.write_text("b")
    assert training.fingerprint(data) != before
    code = tmp_path / "pkg"
    code.mkdir()
    (code / "module.py").write_text("x = 1")
    monkeypatch.setattr(training, "__file__", str(code / "training.py"))
    first = training.fingerprint(data)
    (code / "module.py").write_text("x = 2")
    assert training.fingerprint(data) != first
