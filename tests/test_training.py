"""Lightning runs on the tiny dataset: linear vs finetune, resume, determinism, DDP on CPU."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
import yaml
from safetensors.torch import load_file

from cola_audio import cpu_kernels, finetune, pretrain
from cola_audio.errors import BadInput
from cola_audio.models.encoder import Encoder, FrontEndMismatch, save_encoder
from cola_audio.params import finetune_runs
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


def _finetune(tiny_data, tmp_path, run, encoder=None, seed=0, callbacks=None, **overrides):
    """One run × seed as its stage runs it: the mode from params' run lists, the encoder only
    for a run listed under pretrained."""
    p = json.loads(json.dumps(tiny_data["params"]))
    if "max_epochs" in overrides:  # epochs asked for: the tiny config's max_steps ends one
        overrides.setdefault("max_steps", -1)
    p["finetune"].update(overrides)
    spec = finetune_runs(p["finetune"])[run]
    return finetune.run(
        p,
        run,
        seed,
        spec["mode"],
        features=tiny_data["features"],
        meta_dir=tiny_data["meta"],
        encoder=(encoder or Path("missing")) if spec["init"] == "pretrained" else None,
        out_dir=tmp_path,
        callbacks=callbacks,
    )


class _FinalState(pl.Callback):
    """The weights at the end of training (a finished run deletes its checkpoints)."""

    state: dict[str, torch.Tensor] = {}

    def on_train_end(self, trainer, module):
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_linear_mode_leaves_the_encoder_bit_identical(tiny_data, tmp_path, encoder_file):
    final = _FinalState()
    metrics = _finetune(tiny_data, tmp_path, "pretrained-linear", encoder_file, callbacks=[final])
    before = load_file(str(encoder_file))
    after = {
        k.removeprefix("encoder."): v for k, v in final.state.items() if k.startswith("encoder.")
    }
    assert set(after) == set(before)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert final.state["head.weight"].abs().sum() > 0
    assert metrics["mode"] == "linear" and metrics["init"] == "pretrained"


def test_finetune_mode_changes_the_encoder(tiny_data, tmp_path, encoder_file):
    final = _FinalState()
    metrics = _finetune(tiny_data, tmp_path, "pretrained-finetune", encoder_file, callbacks=[final])
    before = load_file(str(encoder_file))
    changed = [k for k in before if not torch.equal(before[k], final.state["encoder." + k])]
    assert any(k.endswith("_conv_stem.weight") for k in changed)
    out = tmp_path / "pretrained-finetune" / "seed-0"
    assert set(metrics) >= {
        "accuracy",
        "macro_f1",
        "n_test",
        "selected_epoch",
        "seed",
        "init",
        "mode",
        "run_identity",
    }
    assert "confusion_matrix" not in metrics  # metrics.json stays one short line per number
    assert json.loads((out / "metrics.json").read_text()) == metrics
    predictions = (out / "predictions.csv").read_text().splitlines()
    assert predictions[0] == "track_id,actual,predicted"
    assert len(predictions) - 1 == metrics["n_test"] > 0
    assert not (out / "checkpoints").exists()  # a finished run leaves nothing to resume


def test_pretrained_init_without_an_encoder_is_an_error(tiny_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="cola pretrain"):
        _finetune(tiny_data, tmp_path, "pretrained-finetune", tmp_path / "none.safetensors")
    with pytest.raises(BadInput, match="choose finetune or linear"):
        finetune.run(tiny_data["params"], "x", 0, "probe", out_dir=tmp_path)


@pytest.mark.parametrize(
    ("key", "value"), [("n_mels", 40), ("sample_rate", 22050), ("waveform_norm", "none")]
)
@pytest.mark.parametrize("run", ["pretrained-finetune", "pretrained-linear"])
def test_an_encoder_trained_on_another_front_end_is_refused_naming_both_values(
    tiny_data, tmp_path, run, key, value
):
    """EfficientNet takes any number of mel bands: a 40-mel encoder fine-tuned on 64-mel
    features trained and reported a number. Its stored front-end is compared first."""
    summary = tiny_data["features"] / "summary.json"
    frontend = json.loads(summary.read_text())["frontend"]
    path = tmp_path / "other.safetensors"
    save_encoder(Encoder(), path, frontend={**frontend, key: value})
    with pytest.raises(FrontEndMismatch) as info:
        _finetune(tiny_data, tmp_path / "out", run, path)
    message = str(info.value)
    assert f"{key}: {value!r} in the encoder, {frontend[key]!r} in the features" in message
    assert str(path) in message and str(summary) in message
    assert not (tmp_path / "out" / run).exists()


def test_same_seed_gives_the_same_metrics_and_another_seed_other_training(tiny_data, tmp_path):
    a = _finetune(tiny_data, tmp_path / "a", "scratch-finetune")
    b = _finetune(tiny_data, tmp_path / "b", "scratch-finetune")
    assert a == b
    seeds = tiny_data["params"]["finetune"]["seeds"]
    c = _finetune(tiny_data, tmp_path / "c", "scratch-finetune", seed=seeds[1])
    assert c["seed"] == seeds[1]
    curve = "scratch-finetune/seed-{}/curve.csv"
    assert (tmp_path / "a" / curve.format(0)).read_text() != (
        tmp_path / "c" / curve.format(seeds[1])
    ).read_text()  # other crops and initial weights: another training trajectory


def _weights(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _SecondValidationIsWorse(pl.Callback):
    """Scores epoch 1's validation below epoch 0's, so the best checkpoint is not the last, and
    records the weights after each validation, at the end of training and when testing starts."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, torch.Tensor]] = {}

    def on_validation_epoch_end(self, trainer, module):
        if trainer.current_epoch == 1:
            trainer.callback_metrics["val_acc"] = torch.tensor(-1.0)

    # ModelCheckpoint saves at validation end or at train epoch end (Lightning decides from the
    # validation schedule); checkpoint callbacks run after this one, so both see the low score.
    on_train_epoch_end = on_validation_epoch_end

    def on_validation_end(self, trainer, module):
        self.states[f"validated-{trainer.current_epoch}"] = _weights(module)

    def on_train_end(self, trainer, module):
        self.states["last"] = _weights(module)

    def on_test_start(self, trainer, module):
        self.states["tested"] = _weights(module)


def test_test_metrics_come_from_the_best_validation_checkpoint_not_the_last(tiny_data, tmp_path):
    spy = _SecondValidationIsWorse()
    metrics = _finetune(tiny_data, tmp_path, "scratch-finetune", callbacks=[spy], max_epochs=2)
    assert metrics["selected_epoch"] == 0
    tested, best, last = spy.states["tested"], spy.states["validated-0"], spy.states["last"]
    assert all(torch.equal(tested[k], best[k]) for k in best)
    assert not all(torch.equal(tested[k], last[k]) for k in last)


def test_precise_batchnorm_changes_what_evaluation_sees(tiny_data, tmp_path):
    """Recomputed BatchNorm statistics change eval-mode outputs (the validation curve); with the
    recomputation off, or doing nothing, the two runs would be identical."""
    on = _finetune(tiny_data, tmp_path / "on", "scratch-finetune", precise_bn_batches=2)
    off = _finetune(tiny_data, tmp_path / "off", "scratch-finetune", precise_bn_batches=0)
    assert on["steps"] == off["steps"]
    curve = Path("scratch-finetune") / "seed-0" / "curve.csv"
    val_loss = [pd.read_csv(tmp_path / run / curve)["val_loss"].dropna() for run in ("on", "off")]
    assert not val_loss[0].equals(val_loss[1])


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


def _kill_in_second_epoch(run, steps_per_epoch):
    """Run until one step into the second epoch and die there, as a SIGKILL would (nothing is
    saved on the way down); return the step the surviving last.ckpt holds."""
    with pytest.raises(RuntimeError, match="simulated kill"):
        run([_DieAt(steps_per_epoch + 1)])


def test_a_killed_pretraining_resumes_to_the_same_encoder_as_an_uninterrupted_one(
    tiny_data, tmp_path
):
    """Issue 8.5: the resumed run restarts at the last epoch boundary and, with every random
    stream seeded by the epoch number, ends bit-identical to the run that was never killed."""
    p = json.loads(json.dumps(tiny_data["params"]))
    p["pretrain"].update(max_steps=-1, max_epochs=2, batch_size=4)
    kw = {"features": tiny_data["features"], "meta_dir": tiny_data["meta"]}
    whole = pretrain.run(p, out_dir=tmp_path / "whole", **kw)
    per_epoch = whole["steps"] // 2
    assert per_epoch >= 2  # the kill below lands inside an epoch

    _kill_in_second_epoch(
        lambda cbs: pretrain.run(p, out_dir=tmp_path / "killed", callbacks=cbs, **kw), per_epoch
    )
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == per_epoch
    first = _FirstStep()
    resumed = pretrain.run(p, out_dir=tmp_path / "killed", callbacks=[first], **kw)
    assert first.first == per_epoch and resumed["resumed_from"].endswith("last.ckpt")
    encoder = "encoder.safetensors"
    assert (tmp_path / "killed" / encoder).read_bytes() == (
        tmp_path / "whole" / encoder
    ).read_bytes()
    assert (tmp_path / "killed" / "curve.csv").read_text() == (
        tmp_path / "whole" / "curve.csv"
    ).read_text()  # the curve spans the kill: rows logged before it are kept, none twice
    assert not (tmp_path / "killed" / "checkpoints").exists()
    # A finished run is never resumed: the same params train every step again.
    again = _FirstStep()
    assert (
        pretrain.run(p, out_dir=tmp_path / "killed", callbacks=[again], **kw)["resumed_from"]
        is None
    )
    assert again.first == 0


def test_the_encoder_does_not_depend_on_the_cores_a_job_is_granted(tiny_data, tmp_path):
    """Snakemake runs a job with OMP_NUM_THREADS = min(threads, --cores) and DVC with torch's
    default (every core): the weights must not follow either, only `pretrain.threads` (two thread
    counts round the encoder's float sums differently)."""
    p = json.loads(json.dumps(tiny_data["params"]))
    kw = {"features": tiny_data["features"], "meta_dir": tiny_data["meta"]}

    def encoder(threads: int, granted: int) -> bytes:
        torch.set_num_threads(granted)
        out = tmp_path / f"threads-{threads}-granted-{granted}"
        pretrain.run({**p, "pretrain": {**p["pretrain"], "threads": threads}}, out_dir=out, **kw)
        assert torch.get_num_threads() == threads
        return (out / "encoder.safetensors").read_bytes()

    ambient = torch.get_num_threads()
    try:
        two_threads = encoder(threads=2, granted=2)
        if encoder(threads=1, granted=1) == two_threads:
            pytest.skip("1 and 2 threads round alike here: nothing for the param to pin")
        assert encoder(threads=2, granted=1) == two_threads
    finally:
        torch.set_num_threads(ambient)


# What a CPU without AVX2 (or with other kernels) would make each library choose: its most basic
LOWEST_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
LOWEST_KERNELS |= {"MKL_CBWR": "COMPATIBLE"}
UNPINNED = (  # pretraining as a stage runs it, but without `cola`'s cap on the kernels
    "import json, sys; from pathlib import Path; from cola_audio import pretrain; "
    "p, f, m, o = map(Path, sys.argv[1:]); "
    "pretrain.run(json.loads(p.read_text()), features=f, meta_dir=m, out_dir=o)"
)


def test_the_kernel_cap_is_set_on_x86_only_and_never_after_torch_loaded():
    assert not cpu_kernels.pin(environ := {}, machine="aarch64") and environ == {}
    assert "torch" in sys.modules  # this module imported it: too late to choose kernels
    assert not cpu_kernels.pin(environ, machine="x86_64") and environ == {}


@pytest.mark.skipif(
    platform.machine().lower() not in cpu_kernels.X86, reason="the cap is for x86 kernels"
)
def test_cola_pretrain_trains_one_encoder_whatever_kernels_the_environment_asks_for(
    tiny_data, tmp_path
):
    """Issue 21: torch, oneDNN and MKL each pick kernels by CPU kind, and those round differently
    (an AVX-512 CPU trained another encoder). The variables through which each library chooses
    can only lower its choice, so what is simulated is a CPU with other kernels than this one's:
    the most basic ones give another encoder without the cap (checked first), and `cola
    pretrain`, which caps all three before torch loads, trains one encoder whatever the
    environment asks for. (That the cap is this machine's own choice, so its dvc.lock keeps its
    bytes, is checked by rebuilding the lock, not here: on an Intel CPU MKL's AVX2 branch is not
    its default.)"""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_data["params"]))
    (tmp_path / "params.json").write_text(json.dumps(tiny_data["params"]))
    data = [str(tiny_data["features"]), str(tiny_data["meta"])]
    env = {k: v for k, v in os.environ.items() if k not in LOWEST_KERNELS} | {
        "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "1",
    }

    def encoder(name: str, command: list[str], kernels: dict[str, str]) -> bytes:
        out = tmp_path / name
        subprocess.run(
            [sys.executable, *command, str(out)], env=env | kernels, check=True, timeout=600
        )
        return (out / "encoder.safetensors").read_bytes()

    unpinned = ["-c", UNPINNED, str(tmp_path / "params.json"), *data]
    if encoder("native", unpinned, {}) == encoder("lowest", unpinned, LOWEST_KERNELS):
        pytest.skip("this CPU's kernels and the most basic ones round alike: nothing to pin")
    cola = ["-c", "import sys; from cola_audio.cli import main; sys.exit(main(sys.argv[1:]))"]
    cola += ["--params", str(params), "pretrain", "--features", data[0], "--meta", data[1]]
    cola.append("--out")
    assert encoder("cola-native", cola, {}) == encoder("cola-lowest", cola, LOWEST_KERNELS)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_killed_finetune_resumes_to_the_same_metrics_as_an_uninterrupted_one(
    tiny_data, tmp_path, workers
):
    """With a loader worker too: its crops come from a generator seeded per epoch and worker."""
    whole_state, resumed_state = _FinalState(), _FinalState()

    def run(folder, callbacks):
        return _finetune(
            tiny_data,
            tmp_path / folder,
            "scratch-finetune",
            callbacks=callbacks,
            max_epochs=2,
            num_workers=workers,
        )

    whole = run("whole", [whole_state])
    whole_state = dict(whole_state.state)
    per_epoch = whole["steps"] // 2
    assert per_epoch >= 2  # the kill below lands inside an epoch
    _kill_in_second_epoch(lambda cbs: run("killed", cbs), per_epoch)
    first = _FirstStep()
    resumed = run("killed", [first, resumed_state])
    assert first.first == per_epoch
    assert resumed == whole
    assert all(torch.equal(whole_state[k], resumed_state.state[k]) for k in whole_state)
    folder = Path("scratch-finetune") / "seed-0"
    for name in ("predictions.csv", "curve.csv"):
        assert (tmp_path / "killed" / folder / name).read_bytes() == (
            tmp_path / "whole" / folder / name
        ).read_bytes(), name


def test_a_copied_checkout_resumes_with_its_own_checkpoints(tiny_data, tmp_path):
    """Lightning saves the best checkpoint's absolute path in last.ckpt; a copied checkout (the
    original deleted) once resumed from, then crashed on, the other checkout's path."""
    first_checkout, copy = tmp_path / "a", tmp_path / "b"
    with pytest.raises(RuntimeError, match="simulated kill"):
        _finetune(
            tiny_data, first_checkout, "scratch-finetune", callbacks=[_DieAt(4)], max_epochs=2
        )
    assert (first_checkout / "scratch-finetune" / "seed-0" / "checkpoints" / "best.ckpt").is_file()
    shutil.copytree(first_checkout, copy)
    shutil.rmtree(first_checkout)
    resumed = _FirstStep()
    metrics = _finetune(tiny_data, copy, "scratch-finetune", callbacks=[resumed], max_epochs=2)
    assert 0 < resumed.first < metrics["steps"]  # resumed at the end of the first epoch
    assert not first_checkout.exists()  # nothing was written back to the original place


@pytest.mark.parametrize(
    "edit", [{"seed": 1}, {"batch_size": 2}, {"max_steps": 6}, {"precise_bn_batches": 1}]
)
def test_an_interrupted_run_is_not_resumed_after_a_param_edit(tiny_data, tmp_path, edit, caplog):
    p = json.loads(json.dumps(tiny_data["params"]))
    p["pretrain"].update(max_steps=16, max_epochs=50, batch_size=4)  # 13 steps an epoch
    kw = {"features": tiny_data["features"], "meta_dir": tiny_data["meta"], "out_dir": tmp_path}
    with pytest.raises(RuntimeError, match="simulated kill"):
        pretrain.run(p, callbacks=[_DieAt(14)], **kw)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # a resume point exists
    p["pretrain"].update(edit)
    first = _FirstStep()
    summary = pretrain.run(p, callbacks=[first], **kw)
    assert summary["resumed_from"] is None and first.first == 0
    assert summary["steps"] == p["pretrain"]["max_steps"]
    assert "belongs to another run" in caplog.text


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


def test_run_identity_covers_params_inputs_and_code(tmp_path, monkeypatch):
    from cola_audio import checkpoints, codedeps

    section = {"lr": 1e-3, "seed": 0, "num_workers": 0, "max_steps": -1}
    data = tmp_path / "shard.npy"
    data.write_bytes(b"a")
    base = checkpoints.run_identity(section, [data], "pretrain")
    # num_workers included: loader workers draw the crops from their own seeded generators.
    for key, value in [("lr", 2e-3), ("seed", 1), ("max_steps", 5), ("num_workers", 4)]:
        assert checkpoints.run_identity({**section, key: value}, [data], "pretrain") != base, key
    assert checkpoints.run_identity(section, [data], "pretrain", seed=1) != base
    data.write_bytes(b"b")
    assert checkpoints.run_identity(section, [data], "pretrain") != base
    # The code is the stage's import closure, the files both orchestrators declare.
    repo = tmp_path / "repo"
    for rel in codedeps.closure("pretrain"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text((codedeps.REPO / rel).read_text())
    monkeypatch.setattr(codedeps, "REPO", repo)
    first = checkpoints.run_identity(section, [data], "pretrain")
    with open(repo / "src/cola_audio/frontend.py", "a") as fh:  # imported via store → featurize
        fh.write("\n# edited\n")
    assert checkpoints.run_identity(section, [data], "pretrain") != first


def test_a_damaged_resume_point_is_moved_aside_and_the_run_starts_afresh(tmp_path, caplog):
    from cola_audio import checkpoints

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")  # what a full disk leaves
    assert checkpoints.resume_point(tmp_path, "abc") is None
    aside = list(folder.glob("last.ckpt.unreadable-*"))
    assert len(aside) == 1 and not (folder / "last.ckpt").exists()
    assert str(folder / "last.ckpt") in caplog.text and "starting afresh" in caplog.text


def test_a_malformed_metrics_log_does_not_block_a_resume(tmp_path, caplog):
    """A kill during Lightning's CSV rewrite can leave rows wider than the header."""
    from cola_audio import curves

    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.csv").write_text("epoch,step\n0,0\n0,1,0.5,0.7\n")
    curves.prepare_logs(tmp_path, resume=tmp_path / "checkpoints" / "last.ckpt")
    assert not (logs / "metrics.csv").exists()
    assert len(list(logs.glob("metrics.csv.unreadable-*"))) == 1
    assert "unreadable" in caplog.text


def test_two_processes_never_train_into_one_run_folder(tiny_data, tmp_path):
    """A killed Snakemake leaves its job running; a rerun must not train beside it."""
    import fcntl

    from cola_audio import checkpoints

    folder = tmp_path / "scratch-finetune" / "seed-0"
    folder.mkdir(parents=True)
    with open(folder / ".lock", "a+") as held:  # what the orphaned process holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(checkpoints.RunFolderBusy, match="in use by another training process"):
            _finetune(tiny_data, tmp_path, "scratch-finetune")
    assert not (folder / "metrics.json").exists()
    assert _finetune(tiny_data, tmp_path, "scratch-finetune")["n_test"] > 0  # free again
