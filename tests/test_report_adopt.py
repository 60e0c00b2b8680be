"""Pure pieces of the report and of `cola adopt-dvc`."""

import numpy as np
import pytest

from cola_audio import adopt, report, stats


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


def test_adoptable_takes_only_rules_whose_every_stage_is_up_to_date():
    outs = {
        "featurize_shard@000": ["s0"],
        "featurize_shard@001": ["s1"],
        "pretrain": ["enc"],
        "finetune_pretrained@a": ["fa"],
        "finetune_pretrained@b": ["fb"],
        "report": ["r"],
    }
    rules, files = adopt.adoptable(outs, {"finetune_pretrained@b", "report"})
    assert rules == ["featurize_shard", "pretrain"]
    assert files == ["enc", "s0", "s1"]
    assert adopt.adoptable(outs, set()) == (
        sorted({"featurize_shard", "pretrain", "finetune_pretrained", "report"}),
        sorted(["s0", "s1", "enc", "fa", "fb", "r"]),
    )


def test_dvc_commit_takes_only_stages_snakemake_holds_up_to_date():
    from cola_audio import dvc_commit

    summary = (
        "output_file\tdate\trule\tlog-file(s)\tstatus\tplan\n"
        "data/meta/a.json\tMon\tprepare\t-\tok\tno update\n"
        "models/x/metrics.json\tMon\tfinetune\t-\tparams changed\tupdate pending\n"
        "models/x/predictions.csv\tMon\tfinetune\t-\tok\tno update\n"
        "reports/r.md\t-\treport\t-\tmissing\tupdate pending\n"
    )
    fresh = dvc_commit.up_to_date_outputs(summary)
    assert fresh == {"data/meta/a.json", "models/x/predictions.csv"}
    stages = {
        "prepare": ["data/meta/a.json"],
        "finetune@x": ["models/x/metrics.json", "models/x/predictions.csv"],  # one output stale
        "report": ["reports/r.md"],
        "empty": [],
    }
    assert dvc_commit.vouched_stages(stages, fresh) == ["prepare"]
