"""Pure pieces of the report and of the DVC/Snakemake sync (`cola sync-dvc`, `cola dvc-commit`)."""

import base64
from html.parser import HTMLParser

import numpy as np
import pytest

from cola_audio import report, stats, sync


def test_classification_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    m = stats.classification_metrics(labels, preds, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.5}
    f1 = [2 * 0.5 * 0.5 / 1.0, 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))


def test_results_table_has_the_baseline_and_published_numbers():
    summaries = {"scratch-finetune": {"accuracy_mean": 0.5, "macro_f1_mean": 0.4, "n_test": 32}}
    specs = {"scratch-finetune": {"init": "scratch", "mode": "finetune"}}
    table = report.results_table(summaries, specs, 8, {"random": 12.5, "scratch-finetune": 51.1})
    assert list(table["run"]) == ["random", "scratch-finetune"]
    assert table.loc[0, "accuracy_mean"] == 0.125
    assert list(table["published_accuracy"]) == [12.5, 51.1]
    assert table.loc[1, "model"] == "scratch encoder, finetune"


VOID = ("img", "meta", "br", "hr", "link")  # elements that never hold others


class _Tree(HTMLParser):
    """Each element's tag with its parent's tag, and every img src: enough to check structure."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.pairs: list[tuple[str, str]] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.pairs.append((self.stack[-1] if self.stack else "", tag))
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:  # `<img ... />` reports an end tag too
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()


def test_report_renders_to_markdown_and_a_self_contained_html_page(tmp_path):
    summaries = {
        "scratch-finetune": {
            "accuracy_mean": 0.5,
            "accuracy_std": 0.02,
            "accuracy_ci_low": 0.4,
            "accuracy_ci_high": 0.6,
            "macro_f1_mean": 0.45,
            "macro_f1_std": 0.03,
            "macro_f1_ci_low": 0.35,
            "macro_f1_ci_high": 0.55,
            "n_test": 208,
        }
    }
    specs = {"scratch-finetune": {"init": "scratch", "mode": "finetune"}}
    table = report.results_table(summaries, specs, 8, {"random": 12.5})
    skipped = [
        {"audio": "data/raw/a.mp3", "reason": "empty file (0 bytes)"},
        {"audio": "data/raw/b.mp3", "reason": "too short: 1.00 s < 2.0"},
        {"audio": "data/raw/c.mp3", "reason": "too short: 1.50 s < 2.0"},
    ]
    context = {
        "source": "synthetic",
        "finetune_subset": "small",
        "pretrain_subset": "large",
        "runs": ["scratch-finetune"],
        "seeds": [0, 1, 2],
        "confidence": 0.95,
        "n_resamples": 100,
        "comparisons": [],
        "pretrain_line": "84 steps.",
        "padded": 2,
        "provenance": {
            "params_hash": "123",
            "features": {
                "featurized": 9,
                "clips": 12,
                "skipped": 3,
                "skipped_by_reason": {"empty file (0 bytes)": 1, "too short": 2},
            },
            "skipped": skipped,
            "hashes": {"data/features/index.csv": "d41d8cd9"},
        },
        "probe": {"label_fractions": [0.1, 1.0], "seeds": [0, 1], "pooling": "mean"},
        "tasks": {
            "tasks": [
                {
                    "task": "genre",
                    "classes": 8,
                    "split_counts": {"train": 40, "val": 20, "test": 20},
                    "excluded": 1,
                    "skipped": 2,
                    "cells": {"pretrained probe": summaries["scratch-finetune"]},
                }
            ],
            "gains": [],
            "average_probe_gain": {
                "difference": 0.1,
                "ci_low": 0.05,
                "ci_high": 0.2,
                "verdict": "better",
            },
        },
    }
    markdown = report.render_markdown(table, context)
    assert "| genre | 8 | 40/20/20 | 50.0 ± 2.0 % [40.0, 60.0] |" in markdown
    assert "genre 1 (validation/test audio pretraining saw, by SHA1) and 2" in markdown
    assert "| scratch encoder, finetune | scratch-finetune | 50.0 ± 2.0 % | [40.0, 60.0] |" in (
        markdown
    )
    figures = tmp_path / "figures"
    figures.mkdir()
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 16
    for name in ("results", "pretrain_curves", "confusion_scratch-finetune", "learning_curves"):
        (figures / f"{name}.png").write_bytes(png)
    tree = _Tree()
    tree.feed(report.render_html(markdown, figures))
    assert not tree.stack  # every element closed
    assert all(parent in ("ul", "ol") for parent, tag in tree.pairs if tag == "li")
    nested = [1 for parent, tag in tree.pairs if parent == "li" and tag == "ul"]
    assert len(nested) == 3  # reasons under "skipped", files under each reason
    rows = [1 for parent, tag in tree.pairs if parent in ("tbody", "thead") and tag == "tr"]
    # header, random, scratch-finetune; header, genre; header, artifact
    assert len(rows) == (1 + 2) + (1 + 1) + (1 + 1)
    assert len(tree.images) == 4
    assert all(base64.b64decode(src.split(",", 1)[1]) == png for src in tree.images)
    assert all(src.startswith("data:image/png;base64,") for src in tree.images)


def test_adopted_are_up_to_date_stages_snakemake_would_redo_and_everything_after_them():
    outs = {
        "download": ["raw"],
        "featurize_shard@0": ["s0"],
        "featurize_shard@1": ["s1"],
        "pretrain": ["enc"],
        "finetune_pretrained@a": ["fa"],
        "finetune_pretrained@b": ["fb"],
        "report": ["r"],
    }
    after = {
        "download": {"featurize_shard@0", "featurize_shard@1", "pretrain", "report"}
        | {"finetune_pretrained@a", "finetune_pretrained@b"},
        "featurize_shard@0": {"pretrain", "finetune_pretrained@a", "finetune_pretrained@b"}
        | {"report"},
        "pretrain": {"finetune_pretrained@a", "finetune_pretrained@b", "report"},
        "finetune_pretrained@a": {"report"},
        "finetune_pretrained@b": {"report"},
    }
    # After `dvc repro` of a fine-tuning edit: Snakemake would redo fine-tuning and the report.
    assert sync.to_adopt(outs, after, set(), {"fa", "fb", "r"}, set()) == [
        "finetune_pretrained@a",
        "finetune_pretrained@b",
        "report",
    ]
    # One run DVC could not restore: its up-to-date sibling is adopted, it and the report are not.
    assert sync.to_adopt(
        outs, after, {"finetune_pretrained@b", "report"}, {"fa", "fb", "r"}, set()
    ) == ["finetune_pretrained@a"]
    # A fresh clone after `dvc pull`: no metadata anywhere, so everything DVC holds is adopted.
    assert sync.to_adopt(outs, after, set(), set(), {"download"}) == sorted(outs)
    # Outputs Snakemake holds up to date are left alone (their mtimes too).
    assert sync.to_adopt(outs, after, set(), set(), set()) == []


def test_headline_metrics_are_few_short_keys_in_points():
    diffs = [
        {"a": "pretrained-finetune", "b": "scratch-finetune", "difference": 0.0801},
        {"a": "pretrained-linear", "b": "random-linear", "difference": 0.2436},
        {"a": "pretrained-linear", "b": "scratch-finetune", "difference": -0.129},
    ]
    assert report.headline_metrics(diffs) == {
        "pretrained-finetune gain": 8.01,
        "pretrained-linear gain over random-linear": 24.36,
        "pretrained-linear gain over scratch-finetune": -12.9,
    }


@pytest.mark.parametrize(
    ("status", "ok"),
    [
        ([{"changed deps": {"params.yaml": {"finetune.lr": 0.002}}}], True),
        ([{"changed deps": {"x": "modified"}}, {"changed outs": {"m.json": "deleted"}}], True),
        ([{"changed outs": {"m.json": "modified"}}], False),  # unsaved work: never overwritten
        ([{"changed outs": {"a": "deleted", "b": "not in cache"}}], False),
        (["changed command", {"changed deps": {"x": "modified"}}], True),
        ([{"changed deps": {"data/raw": "deleted"}}], False),  # its inputs are not there
    ],
)
def test_only_stages_whose_outputs_are_missing_or_unmodified_are_restored(status, ok):
    assert sync.restorable(status) is ok


def test_the_sync_runs_when_dvc_state_or_the_plan_changed_and_adopts_only_for_state(tmp_path):
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):
        (tmp_path / name).write_text(name)
    (tmp_path / "out.npy").write_bytes(b"1")
    assert sync.needed(tmp_path) == "first"
    sync.write_stamp(tmp_path, ["out.npy", "gone.csv"])
    assert sync.needed(tmp_path) is None
    (tmp_path / "params.yaml").write_text("edited")
    assert sync.needed(tmp_path) == "plan"  # restore may apply; Snakemake's records are its own
    sync.write_stamp(tmp_path, ["out.npy", "gone.csv"])
    (tmp_path / "gone.csv").write_text("pulled")
    assert sync.needed(tmp_path) == "state"  # e.g. `dvc pull`, `dvc checkout`
    sync.write_stamp(tmp_path, ["out.npy", "gone.csv"])
    (tmp_path / "dvc.lock").write_text("after dvc repro")
    assert sync.needed(tmp_path) == "state"


@pytest.mark.parametrize(("edit", "adopts"), [("params.yaml", False), ("dvc.lock", True)])
def test_a_param_edit_alone_restores_but_leaves_snakemakes_records_alone(
    tmp_path, monkeypatch, edit, adopts
):
    (tmp_path / ".dvc").mkdir()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml"):
        (tmp_path / name).write_text(name)
    sync.write_stamp(tmp_path, [])
    calls = []
    monkeypatch.setattr(sync, "run", lambda source, repo, adopt_rules: calls.append(adopt_rules))
    monkeypatch.delenv("COLA_DVC_SYNC", raising=False)
    sync.before_planning(set(), True, tmp_path)
    assert calls == []  # nothing changed: milliseconds, no DVC
    (tmp_path / edit).write_text("edited")
    sync.before_planning(set(), False, tmp_path)
    assert calls == []  # a dry run never syncs
    sync.before_planning(set(), True, tmp_path)
    assert calls == [adopts]
    monkeypatch.setenv("COLA_DVC_SYNC", "off")
    sync.before_planning(set(), True, tmp_path)
    assert calls == [adopts]
