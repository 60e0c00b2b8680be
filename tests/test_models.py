"""Encoder, COLA head and loss, classifier: shapes, hand computations, strict and safe loading."""

import json
from types import SimpleNamespace

import pytest
import torch

from cola_audio import checkpoints, optim, params
from cola_audio.errors import BadInput
from cola_audio.models.classifier import GenreClassifier, clip_logits, model_keys
from cola_audio.models.cola import ColaModule, similarity_logits
from cola_audio.models.encoder import (
    EMBED_DIM,
    Encoder,
    StateDictMismatch,
    encoder_metadata,
    load_encoder_weights,
    save_encoder,
    standardize_crops,
)
from cola_audio.models.hparams import hyperparameter_keys
from cola_audio.stages import STAGES
from cola_audio.training import TRAINER_KEYS
from conftest import REPO


def cola_model(**changes):
    """ColaModule from params.yaml's pretrain section with `changes` (it has no defaults)."""
    section = params.load(REPO / "params.yaml")["pretrain"]
    return ColaModule.from_params({**section, **changes})


def classifier(init, mode, n_classes=8):
    section = params.load(REPO / "params.yaml")["finetune"]
    return GenreClassifier.from_params(section, n_classes, init, mode)


@pytest.mark.parametrize("frames", [32, 98, 150, 301])
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_encoder_output_shape(frames, pooling):
    enc = Encoder(pooling).eval()
    with torch.no_grad():
        out = enc(torch.randn(2, frames, 64))
    assert out.shape == (2, EMBED_DIM)


def test_encoder_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\(batch, frames, mels\)"):
        Encoder()(torch.randn(2, 1, 98, 64))


def test_crop_standardisation_removes_waveform_gain():
    x = torch.randn(3, 98, 64)
    assert torch.allclose(standardize_crops(x), standardize_crops(x + 4.2), atol=1e-5)


def test_bilinear_logits_match_a_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.5, -1.0]])
    p = torch.tensor([[0.0, 2.0], [1.0, 1.0], [-1.0, 0.5]])
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    logits = similarity_logits(a, p, w, temperature=1.0)
    expected = torch.empty(2, 3)
    for i in range(2):
        for j in range(3):
            expected[i, j] = sum(a[i, k] * w[k, m] * p[j, m] for k in range(2) for m in range(2))
    assert torch.allclose(logits, expected)
    cos = similarity_logits(a, p, None, temperature=0.5)
    assert torch.isclose(cos[0, 0], torch.tensor(0.0 / 0.5))
    assert torch.isclose(cos[0, 1], torch.tensor((1 / 2**0.5) / 0.5))


def test_contrastive_loss_decreases_when_overfitting_a_tiny_batch():
    torch.manual_seed(0)
    model = cola_model(similarity="cosine", temperature=0.1, dropout=0.0, lr=1e-3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    anchors, positives = torch.randn(8, 64, 64), torch.randn(8, 64, 64)
    positives = anchors + 0.1 * positives  # views that share content
    model.train()
    losses = []
    for _ in range(12):
        loss, _, logits = model.contrastive_step(anchors, positives)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert logits.shape == (8, 8)
    assert losses[-1] < 0.7 * losses[0]


def test_clip_logits_average_windows_per_clip():
    window_logits = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]])
    clip = torch.tensor([0, 0, 1])
    assert torch.equal(clip_logits(window_logits, clip, 2), torch.tensor([[2.0, 1.0], [0.0, 5.0]]))


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    enc = Encoder()
    path = tmp_path / "encoder.safetensors"
    save_encoder(enc, path)
    fresh = Encoder()
    load_encoder_weights(fresh, path)
    for key, value in enc.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)

    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state.pop("net._conv_stem.weight")
    state["net.extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(StateDictMismatch) as info:
        load_encoder_weights(Encoder(), tmp_path / "bad.safetensors")
    assert "missing keys [net._conv_stem.weight]" in str(info.value)
    assert "unexpected keys [net.extra.weight]" in str(info.value)


def test_saving_one_encoder_twice_gives_the_same_bytes(tmp_path):
    """safetensors writes its metadata map in hash order; unsorted, five saves of one encoder
    were (almost surely) several different files to DVC."""
    torch.manual_seed(0)
    enc = Encoder()
    frontend = {"n_mels": 64, "sample_rate": 16000, "fmin_hz": 60.0}
    blobs = set()
    for k in range(5):
        save_encoder(enc, tmp_path / f"{k}.safetensors", frontend=frontend, crop_frames=98)
        blobs.add((tmp_path / f"{k}.safetensors").read_bytes())
    assert len(blobs) == 1
    meta = encoder_metadata(tmp_path / "0.safetensors")
    assert json.loads(meta["frontend"]) == frontend and meta["crop_frames"] == "98"
    restored = Encoder()
    load_encoder_weights(restored, tmp_path / "0.safetensors")
    saved, loaded = enc.state_dict(), restored.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_loading_a_seed_style_encoder_with_other_keys_fails(tmp_path):
    """The seed's encoder had `cnn1` and `efficientnet.` keys; strict loading must refuse it."""
    from safetensors.torch import save_file

    seed_like = {f"efficientnet.{k[4:]}": v.contiguous() for k, v in Encoder().state_dict().items()}
    seed_like["cnn1.weight"] = torch.zeros(3, 1, 3, 3)
    save_file(seed_like, str(tmp_path / "seed.safetensors"))
    with pytest.raises(StateDictMismatch, match="cnn1.weight"):
        load_encoder_weights(Encoder(), tmp_path / "seed.safetensors")


@pytest.mark.parametrize("keep", [0.0, 0.5], ids=["empty", "truncated"])
def test_a_damaged_encoder_file_is_named_with_the_fix(tmp_path, keep):
    path = tmp_path / "encoder.safetensors"
    save_encoder(Encoder(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BadInput, match=rf"{path}: not a readable safetensors file.*dvc pull"):
        load_encoder_weights(Encoder(), path)


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_checkpoint_holding_a_malicious_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Exploit()}, path, pickle_protocol=2)
    with pytest.raises(checkpoints.UnsafeCheckpoint, match="refusing to load"):
        checkpoints.safe_load(path)
    assert "pwned" not in capsys.readouterr().out
    with open(path, "rb") as fh:  # the file really does carry a callable
        assert b"print" in fh.read()


def test_hyperparameters_are_plain_values():
    for mode in ("linear", "finetune"):
        model = classifier("pretrained", mode)
        for value in model.hparams.values():
            assert value is None or isinstance(value, (int, float, str, bool)), value


def test_lr_schedule_warms_up_then_decays():
    f = optim.lr_lambda("cosine", warmup_steps=4, total_steps=20)
    assert f(0) == 0.25 and f(3) == 1.0
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0)
    assert optim.lr_lambda("constant", 0, 20)(15) == 1.0


def test_bilinear_head_starts_as_the_cosine_head_at_its_temperature():
    """W₀ = s·I with s = 1/(τ·E[tanh²]·d): a positive pair's logit a·W₀·a ≈ cos(a, a)/τ = 1/τ."""
    from cola_audio.models.cola import bilinear_init_scale

    model = cola_model(similarity="bilinear", temperature=0.2, embedding_dim=512)
    s = bilinear_init_scale(512, 0.2)
    assert torch.equal(model.bilinear.detach(), torch.eye(512) * s)
    z = torch.tanh(torch.nn.functional.layer_norm(torch.randn(256, 512), (512,)))
    self_logits = torch.einsum("nd,de,ne->n", z, model.bilinear.detach(), z)
    assert self_logits.mean().item() == pytest.approx(1 / 0.2, rel=0.05)


def test_the_bilinear_matrix_trains_at_its_own_learning_rate(monkeypatch):
    from cola_audio.models import cola

    seen = {}
    monkeypatch.setattr(cola, "adam_with_schedule", lambda m, groups, lr: seen.update(g=groups))
    model = cola_model(similarity="bilinear", lr=1e-3, bilinear_lr_scale=0.1)
    model.configure_optimizers()
    lrs = {id(p): g["lr"] for g in seen["g"] for p in g["params"]}
    assert lrs[id(model.bilinear)] == pytest.approx(1e-4)
    assert {lrs[id(p)] for n, p in model.named_parameters() if n != "bilinear"} == {1e-3}
    assert len(lrs) == len(list(model.parameters()))  # every parameter in exactly one group


def test_a_random_frozen_encoder_gets_batchnorm_statistics_from_data_and_stays_frozen():
    torch.manual_seed(0)
    model = classifier("scratch", "linear")
    weights = {k: v.clone() for k, v in model.encoder.named_parameters()}
    crops = [(torch.randn(4, 98, 64) * 3 + 1, torch.zeros(4)) for _ in range(3)]
    stem = model.encoder.net._bn0
    assert torch.equal(stem.running_var, torch.ones_like(stem.running_var))
    model.calibrate_frozen_encoder(crops, n_batches=2)
    assert not torch.equal(stem.running_var, torch.ones_like(stem.running_var))
    assert int(stem.num_batches_tracked) == 2  # a plain average over exactly the batches asked
    for name, p in model.encoder.named_parameters():
        assert torch.equal(p, weights[name]) and not p.requires_grad, name
    model.train()
    assert not model.encoder.training  # still frozen: BatchNorm stays in eval mode


# Another valid value for each model key (test_every_declared_model_key_changes_the_built_model).
OTHER_VALUE = {
    "pooling": {"max": "avg", "avg": "max"},
    "input_norm": {"crop": "none", "none": "crop"},
    "similarity": {"bilinear": "cosine", "cosine": "bilinear"},
    "lr_schedule": {"cosine": "constant", "constant": "cosine"},
}


def _other(key, value):
    if key in OTHER_VALUE:
        return OTHER_VALUE[key][value]
    if isinstance(value, int) and not isinstance(value, bool):
        return value + 2 if key == "warmup_steps" else value // 2
    return value + 0.3 if value < 0.5 else value / 2


def _after_two_steps(model, loss_of):
    """Every parameter and buffer after two optimiser steps (from the model's own
    configure_optimizers, schedule included) on one fixed batch, dropout seeded."""
    model._trainer = SimpleNamespace(estimated_stepping_batches=10, world_size=1)
    optim_cfg = model.configure_optimizers()
    opt, sched = optim_cfg["optimizer"], optim_cfg["lr_scheduler"]["scheduler"]
    torch.manual_seed(0)
    crops = torch.randn(4, 32, 64)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        loss_of(model, crops).backward()
        opt.step()
        sched.step()
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def _cola_loss(model, crops):
    return model.contrastive_step(crops, crops.flip(1))[0]


def _classifier_loss(model, crops):
    return torch.nn.functional.cross_entropy(model(crops), torch.tensor([0, 1, 2, 3]))


def _differs(a, b):
    return len(a) != len(b) or any(
        x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b, strict=False)
    )


def _model_cases():
    defaults = params.load(REPO / "params.yaml")
    pre = {**defaults["pretrain"], "warmup_steps": 0}  # 2 steps: the schedule shows at step 2
    yield "pretrain", pre, hyperparameter_keys(ColaModule), ColaModule.from_params, _cola_loss
    ft = {**defaults["finetune"], "warmup_steps": 0}
    for mode in ("finetune", "linear"):
        keys = list(model_keys(mode).values())

        def build(section, mode=mode):
            return GenreClassifier.from_params(section, 4, "scratch", mode)

        yield mode, ft, keys, build, _classifier_loss


@pytest.mark.parametrize("case", list(_model_cases()), ids=lambda c: c[0])
def test_every_declared_model_key_changes_the_built_model(case):
    """A params key reaches a model only through `from_params`, which passes each of its keys
    by name and has no defaults to fall back on: each declared model key, set to another valid
    value, changes what two training steps make of the same batch. And every key a training
    stage declares is a model key or a Trainer/data key: none is declared for nothing."""
    name, section, keys, build, loss_of = case
    section_name = "pretrain" if name == "pretrain" else "finetune"
    for stage in [s for s in STAGES if s == name or s.startswith(f"{name}_")]:
        declared = {k.split(".", 1)[1] for k in STAGES[stage].params}
        assert declared == set(keys) | (declared & set(TRAINER_KEYS)), (stage, declared - set(keys))
    assert not set(keys) & set(TRAINER_KEYS)
    torch.manual_seed(0)
    base = _after_two_steps(build(section), loss_of)
    for key in keys:
        edited = {**section, key: _other(key, section[key])}
        params.validate({**params.load(REPO / "params.yaml"), section_name: edited})
        torch.manual_seed(0)
        assert _differs(_after_two_steps(build(edited), loss_of), base), key
