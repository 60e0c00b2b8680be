import copy
import errno
import importlib.util
import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml
from pytorch_lightning.utilities.exceptions import SIGTERMException

from cola_audio import cli, params
from conftest import REPO


def test_default_params_are_valid(default_params):
    assert default_params["data"]["source"] == "synthetic"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("features", "n_mels"), "many", ["features.n_mels", "'many'", "not of type 'integer'"]),
        (("features", "shards"), [], ["features.shards", "[]", "should be non-empty"]),
        (("features", "shards"), [0, 2], ["features.shards", "ids 0..1 in order", "[0, 1]"]),
        (
            ("data", "finetune_subset"),
            "tiny",
            ["data.finetune_subset", "'tiny'", "one of small, medium, large"],
        ),
        (("pretrain", "similarity"), "dot", ["pretrain.similarity", "bilinear, cosine"]),
        (("pretrain", "trainer", "precision"), "64", ["pretrain.trainer.precision"]),
        (("features", "fmax_hz"), 9000.0, ["features.fmax_hz", "Nyquist"]),
        (("features", "shards"), [0, 1.0], ["features.shards.1", "1.0", "not of type 'integer'"]),
        (("features", "workers"), 2.0, ["features.workers", "not of type 'integer'"]),
        (("pretrain", "max_steps"), 0, ["pretrain.max_steps", "-1 lets max_epochs"]),
        (("finetune", "seeds"), [0, 0], ["finetune.seeds", "non-unique"]),
        (("finetune", "val_every_n_epochs"), 99, ["finetune.val_every_n_epochs", "max_epochs"]),
        (("report", "comparisons"), [["a", "b"]], ["report.comparisons", "not a run"]),
        (("data", "pretrain_subset"), "small", None),  # valid: small ⊂ small
    ],
)
def test_bad_values_name_key_value_and_allowed(default_params, path, value, expected):
    bad = copy.deepcopy(default_params)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    if expected is None:
        params.validate(bad)
        return
    with pytest.raises(params.ParamsError) as info:
        params.validate(bad)
    for fragment in expected:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p["pretrain"].update(batch_size=1), "needs at least 2 clips"),
        (lambda p: p["report"]["comparisons"].append(p["report"]["comparisons"][0]), "more than"),
        (
            lambda p: p["report"]["comparisons"].append(["random-linear", "random-linear"]),
            "compares a run with itself",
        ),
    ],
    ids=["batch-without-negatives", "duplicate-comparison", "self-comparison"],
)
def test_params_that_make_no_sense_are_refused(default_params, edit, expected):
    """Each passed the schema and then produced a meaningless result: a contrastive loss of 0
    with accuracy 1.0, a metrics key written twice, "no detectable difference" of a run from
    itself."""
    bad = copy.deepcopy(default_params)
    edit(bad)
    with pytest.raises(params.ParamsError, match=expected):
        params.validate(bad)


@pytest.mark.parametrize("pattern", ["([a-z", "(?P<spk", "a{2,1}", "*_nohash", "(?<=a+)_"])
def test_an_invalid_group_pattern_is_refused_before_any_job(default_params, pattern):
    """It passed the schema (any string) and raised re.error mid-`cola download`."""
    bad = copy.deepcopy(default_params)
    bad["data"]["folder"]["group_pattern"] = pattern
    with pytest.raises(params.ParamsError) as info:
        params.validate(bad)
    with pytest.raises(re.error) as reason:
        re.compile(pattern)
    expected = f"data.folder.group_pattern = {pattern!r} is not a valid regular expression"
    assert f"{expected} ({reason.value})" in str(info.value)


@pytest.mark.parametrize("pattern", [r"^([0-9a-f]+)_nohash_", r"spk\d+", None])
def test_a_valid_group_pattern_passes(default_params, pattern):
    good = copy.deepcopy(default_params)
    good["data"]["folder"]["group_pattern"] = pattern
    assert params.validate(good) is good


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("pretrain", "batch_size", "abc"), ("finetune", "lr", "x"), ("finetune", "seeds", 3)],
)
def test_a_type_error_in_a_shared_section_names_only_the_bad_value(
    default_params, section, key, value
):
    """pretrain and finetune extend a shared schema with allOf; one bad value made the validator
    report every valid key of the section as an "unexpected" property too."""
    bad = copy.deepcopy(default_params)
    bad[section][key] = value
    with pytest.raises(params.ParamsError) as info:
        params.validate(bad)
    message = str(info.value)
    assert f"{section}.{key} = {value!r} is invalid" in message
    assert "unexpected" not in message and "unknown key" not in message
    assert message.count("\n  - ") == 1


@pytest.mark.parametrize(
    ("mangle", "expected"),
    [
        (
            lambda text: text.replace("  lr: 1.0e-3\n", "  lr: 1.0e-3\n  lr: 3.0e-4\n", 1),
            r"key 'lr' given twice \(lines \d+ and \d+\)",
        ),
        (lambda text: text + "report:\n  confidence: 0.9\n", r"key 'report' given twice"),
        (lambda text: text.replace("  lr: 1.0e-3\n", "  lr: 1e-3\n", 1), r"write it with a dot"),
    ],
    ids=["key-twice", "section-twice", "1e-3-is-text"],
)
def test_a_key_given_twice_or_a_number_yaml_reads_as_text_is_named(tmp_path, mangle, expected):
    """YAML keeps the last of a repeated key silently (the run trained with whichever `lr`
    came last); `1e-3` is a string to YAML 1.1, which the schema refused without saying why."""
    path = tmp_path / "params.yaml"
    path.write_text(mangle((REPO / "params.yaml").read_text()))
    with pytest.raises(params.ParamsError, match=expected):
        params.load(path)


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"# caf\xe9\n" + (REPO / "params.yaml").read_bytes())
    assert cli.main(["--params", str(path), "prepare", "--out", str(tmp_path / "m")]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err


def test_unknown_key_is_named_with_the_known_ones(default_params):
    bad = copy.deepcopy(default_params)
    bad["features"]["n_mel"] = 64
    with pytest.raises(params.ParamsError, match=r"n_mel.*known keys: .*n_mels"):
        params.validate(bad)
    bad = copy.deepcopy(default_params)
    bad["pretrain"]["learning_rate"] = 0.1
    with pytest.raises(params.ParamsError, match=r"learning_rate.*known keys: .*\blr\b"):
        params.validate(bad)


def test_smaller_pretraining_subset_is_refused(default_params):
    bad = copy.deepcopy(default_params)
    bad["data"]["finetune_subset"] = "medium"
    bad["data"]["pretrain_subset"] = "small"
    with pytest.raises(params.ParamsError, match="pretrain_subset"):
        params.validate(bad)


def test_cli_stops_before_work_on_bad_params(tmp_path: Path, capsys):
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["features"]["workers"] = -1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    assert cli.main(["--params", str(path), "prepare", "--out", str(tmp_path / "meta")]) == 2
    err = capsys.readouterr().err
    assert "features.workers = -1" in err and str(path) in err
    assert not (tmp_path / "meta").exists()


def test_snakemake_can_use_the_same_schema():
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / "params.yaml").read_text())
    validate(config, str(REPO / "workflow" / "schemas" / "params.schema.yaml"))
    config["features"]["shards"] = "four"
    with pytest.raises(Exception, match="shards|four"):
        validate(config, str(REPO / "workflow" / "schemas" / "params.schema.yaml"))


def test_cli_gives_bad_input_one_line_but_a_bug_its_traceback(tmp_path: Path, capsys, monkeypatch):
    """The stage's own error types (bad input the user can fix) become one line and exit 1; any
    other exception is a bug and must propagate with its traceback, not be printed as one line."""
    from cola_audio import finetune
    from cola_audio.errors import MissingInput

    def missing(*args, **kwargs):
        raise MissingInput("models/pretrain/encoder.safetensors: missing; run `cola pretrain`")

    def bug(*args, **kwargs):
        raise ValueError("a bug deep inside")

    argv = ["--params", str(REPO / "params.yaml"), "finetune", "--mode", "finetune"]
    argv += ["--run", "scratch-finetune", "--seed", "0", "--out", str(tmp_path)]
    monkeypatch.setattr(finetune, "run", missing)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "cola finetune: error: models/pretrain/encoder.safetensors: missing; run `cola pretrain`"
    )
    monkeypatch.setattr(finetune, "run", bug)
    with pytest.raises(ValueError, match="a bug deep inside"):
        cli.main(argv)


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EACCES, "permission denied"),
        (errno.EROFS, "read-only file system"),
    ],
)
@pytest.mark.parametrize("stage", ["prepare", "finetune", "report"])
def test_an_environment_failure_in_any_stage_is_one_line_naming_the_path(
    tmp_path, capsys, monkeypatch, stage, code, said
):
    """A full disk or a locked folder is the machine, not a bug: one line with the path and
    the fix, exit 1 (it was a traceback from whichever write met it)."""
    from cola_audio import finetune, prepare, report

    where = str(tmp_path / "out" / "metrics.json")

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code), where)

    module = {"prepare": prepare, "finetune": finetune, "report": report}[stage]
    monkeypatch.setattr(module, "run", full)
    argv = {
        "prepare": ["prepare", "--out", str(tmp_path / "meta")],
        "finetune": ["finetune", "--mode", "finetune", "--run", "scratch-finetune", "--seed", "0"],
        "report": ["report", "--out", str(tmp_path / "reports")],
    }[stage]
    assert cli.main(["--params", str(REPO / "params.yaml"), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cola {stage}: error: {said}: {where}; ") and "\n" not in err


@pytest.mark.parametrize(
    ("raised", "code"), [(KeyboardInterrupt(), 130), (SIGTERMException(), 143)], ids=["int", "term"]
)
def test_an_interrupted_stage_says_so_in_one_line_and_fails(
    tmp_path, capsys, monkeypatch, raised, code
):
    """Lightning ends a fit on SIGTERM by raising SIGTERMException, a SystemExit without a code:
    the stage exited 0 without its outputs."""
    from cola_audio import prepare

    def interrupted(*args, **kwargs):
        raise raised

    monkeypatch.setattr(prepare, "run", interrupted)
    argv = ["--params", str(REPO / "params.yaml"), "prepare", "--out", str(tmp_path / "m")]
    assert cli.main(argv) == code
    assert capsys.readouterr().err.strip().startswith("cola prepare: interrupted;")


def test_sigterm_ends_a_stage_like_ctrl_c_leaving_no_temporary_file(tmp_path, capsys, monkeypatch):
    """Python's default SIGTERM exits at once, so `atomic_path` left its temporary file (seen
    with `cola embed`); it now unwinds as Ctrl-C does and exits 143 in one line."""
    from cola_audio import fsutil, prepare

    out = tmp_path / "m"

    def killed_mid_write(*args, **kwargs):
        with fsutil.atomic_path(out / "finetune.json") as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal arrives first

    monkeypatch.setattr(prepare, "run", killed_mid_write)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        code = cli.main(["--params", str(REPO / "params.yaml"), "prepare", "--out", str(out)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143
    assert capsys.readouterr().err.strip().startswith("cola prepare: interrupted;")
    assert list(out.iterdir()) == []


def test_a_full_disk_without_a_path_names_what_the_stage_writes(tmp_path, capsys, monkeypatch):
    """A write() on a full disk carries no file name; the stage's --out is named instead."""
    from cola_audio import prepare

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prepare, "run", full)
    out = tmp_path / "meta"
    assert cli.main(["--params", str(REPO / "params.yaml"), "prepare", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    said = f"no space left on device: while writing {out}; free space there and rerun"
    assert err == f"cola prepare: error: {said}"


def test_a_missing_file_inside_the_code_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the machine's errors become one line; any other OSError is a bug to read in full."""
    from cola_audio import prepare

    def bug(*args, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file", "/nonexistent/bug")

    monkeypatch.setattr(prepare, "run", bug)
    argv = ["--params", str(REPO / "params.yaml"), "prepare", "--out", str(tmp_path / "m")]
    with pytest.raises(FileNotFoundError):
        cli.main(argv)


def test_data_root_is_no_longer_a_knob(tmp_path: Path):
    """data.root was accepted and then ignored (every rule writes data/raw); it is refused now,
    naming the keys that exist."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data"]["root"] = "elsewhere/raw"
    with pytest.raises(
        params.ParamsError, match=r"'root' was unexpected.*known keys: finetune_subset"
    ):
        params.validate(p)


@pytest.mark.parametrize(
    "job",
    [
        ["finetune", "--mode", "linear", "--run", "scratch-finetune", "--seed", "0"],  # wrong mode
        ["finetune", "--mode", "finetune", "--run", "scratch-finetune", "--seed", "7"],  # no seed 7
        ["featurize", "--shard", "9"],  # no shard 9
    ],
)
def test_a_job_params_yaml_does_not_list_is_refused_before_any_work(tmp_path, capsys, job):
    """A hand-run job must be one both tools know: a listed run under its own mode (else its
    outputs would be another run's, trained otherwise), a listed seed, a listed shard."""
    argv = ["--params", str(REPO / "params.yaml"), *job, "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 1
    assert "is not a job of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n", [1000, 3000, 30_000, 106_574])
def test_the_scale_benchmarks_params_are_valid_and_hold_n_clips(n):
    """benchmarks/scale.py edits params.yaml for each corpus size: a schema change that breaks
    those edits is caught here, not after the benchmark's first hour."""
    spec = importlib.util.spec_from_file_location("scale", REPO / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    edited = params.validate(scale.scaled_params(n))
    synthetic = edited["data"]["synthetic"]
    assert 8 * synthetic["small_tracks_per_genre"] + synthetic["large_only_tracks"] == n
    assert list(edited["tasks"]) == ["genre"]
