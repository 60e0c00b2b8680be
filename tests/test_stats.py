"""Uncertainty in the report: bootstrap intervals, paired differences, and the words they allow."""

import numpy as np
import pytest

from cola_audio import report, stats

N_CLASSES = 8


def _runs(accuracies: list[float], n_clips: int = 208, seed: int = 0) -> stats.Scored:
    """One run whose seeds get each clip right with the given probabilities."""
    rng = np.random.default_rng(seed)
    labels = np.random.default_rng(99).integers(0, N_CLASSES, n_clips)
    wrong = (labels + rng.integers(1, N_CLASSES, (len(accuracies), n_clips))) % N_CLASSES
    right = rng.random((len(accuracies), n_clips)) < np.asarray(accuracies)[:, None]
    return stats.Scored(labels, np.where(right, labels, wrong), N_CLASSES)


def test_batched_macro_f1_equals_the_per_run_formula():
    runs = _runs([0.3, 0.6, 0.9])
    expected = [
        stats.classification_metrics(runs.labels, p, list("abcdefgh"))["macro_f1"]
        for p in runs.preds
    ]
    got = stats.batched_macro_f1(runs.labels, runs.preds, N_CLASSES)
    assert got == pytest.approx(expected)


def test_run_summary_gives_seed_mean_std_and_an_interval_around_the_mean():
    runs = _runs([0.5, 0.6, 0.7])
    summary = stats.run_summary(runs, 0.95, 1000, seed=0)
    per_seed = (runs.preds == runs.labels).mean(1)
    assert summary["accuracy_mean"] == pytest.approx(per_seed.mean())
    assert summary["accuracy_std"] == pytest.approx(per_seed.std(ddof=1))
    assert summary["accuracy_ci_low"] < summary["accuracy_mean"] < summary["accuracy_ci_high"]
    # 208 clips: a 95 % interval of a proportion near 0.6 is about ±6.5 points wide.
    width = summary["accuracy_ci_high"] - summary["accuracy_ci_low"]
    assert 0.06 < width < 0.2
    assert summary["seeds"] == 3 and summary["n_test"] == 208


def test_paired_difference_finds_a_real_gap_and_not_a_spurious_one():
    labels = np.random.default_rng(99).integers(0, N_CLASSES, 400)
    good = _runs([0.8, 0.8, 0.8], 400, seed=1)
    bad = _runs([0.5, 0.5, 0.5], 400, seed=2)
    twin = _runs([0.8, 0.8, 0.8], 400, seed=3)
    assert np.array_equal(good.labels, labels)
    gap = stats.paired_difference(good, bad, 0.95, 1000, seed=0)
    assert gap["ci_low"] > 0.2 and stats.verdict(gap["ci_low"], gap["ci_high"]) == "better"
    none = stats.paired_difference(good, twin, 0.95, 1000, seed=0)
    assert none["ci_low"] < 0 < none["ci_high"]
    assert stats.verdict(none["ci_low"], none["ci_high"]) == "no detectable difference"
    worse = stats.paired_difference(bad, good, 0.95, 1000, seed=0)
    assert stats.verdict(worse["ci_low"], worse["ci_high"]) == "worse"


def test_pairing_narrows_the_interval_when_runs_share_clip_difficulty():
    """Two runs that fail on the same hard clips: the paired interval of their difference is far
    narrower than the unpaired spread of each run's accuracy."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, N_CLASSES, 300)
    easy = rng.random(300) < 0.6
    flip = (labels + 1) % N_CLASSES
    a = np.where(easy, labels, flip)[None]
    b = np.where(easy & (rng.random(300) < 0.95), labels, flip)[None]
    ra, rb = stats.Scored(labels, a, N_CLASSES), stats.Scored(labels, b, N_CLASSES)
    diff = stats.paired_difference(ra, rb, 0.95, 1000, seed=0)
    single = stats.run_summary(ra, 0.95, 1000, seed=0)
    assert diff["ci_high"] - diff["ci_low"] < 0.5 * (
        single["accuracy_ci_high"] - single["accuracy_ci_low"]
    )


def test_runs_scored_on_other_clips_cannot_be_paired():
    a, b = _runs([0.5]), _runs([0.5], n_clips=100)
    with pytest.raises(ValueError, match="same test clips"):
        stats.paired_difference(a, b, 0.95, 100, seed=0)


@pytest.mark.parametrize(
    ("low", "high", "words"),
    [
        (-0.02, 0.05, "no detectable difference"),
        (0.01, 0.05, "is better than"),
        (-0.09, -0.01, "is worse than"),
    ],
)
def test_the_report_sentence_follows_the_interval(low, high, words):
    d = {"a": "x", "b": "y", "difference": (low + high) / 2, "ci_low": low, "ci_high": high}
    d["verdict"] = stats.verdict(low, high)
    sentence = report.comparison_sentence(d, 0.95)
    assert words in sentence
    assert f"[{100 * low:+.1f}, {100 * high:+.1f}]" in sentence
