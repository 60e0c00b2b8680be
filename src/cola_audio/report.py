"""`cola report`: results table, curves, confusion matrices and provenance, as Markdown and HTML.

Every number in the report is read from an artifact of the pipeline, and the provenance section
names the parameters (a hash), each run's identity (its params, input bytes and code) and the data
(file hashes as DVC computes them) it came from. The report's bytes are a function of its declared
inputs alone: no clock, no git commit (dvc.lock, committed beside it, pins the code).
"""

from __future__ import annotations

import base64
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from markdown_it import MarkdownIt  # noqa: E402

from cola_audio import digest, fsutil, meta, stats, task_report  # noqa: E402
from cola_audio.errors import BadInput  # noqa: E402
from cola_audio.params import finetune_runs  # noqa: E402
from cola_audio.store import FeatureStore  # noqa: E402

log = logging.getLogger(__name__)


def params_hash(params: dict[str, Any]) -> str:
    return digest.json_digest(params)[:12]


def load_scored(
    models: Path, runs: list[str], seeds: list[int], genres: list[str]
) -> dict[str, stats.Scored]:
    """Each run's test predictions for every seed, aligned on track id (the same clips for all)."""
    code = {g: i for i, g in enumerate(genres)}
    scored: dict[str, stats.Scored] = {}
    reference: np.ndarray | None = None
    for run in runs:
        frames = []
        for seed in seeds:
            path = Path(models) / "finetune" / run / f"seed-{seed}" / "predictions.csv"
            frame = pd.read_csv(path).sort_values("track_id", kind="stable")
            ids = frame["track_id"].to_numpy()
            if reference is None:
                reference = ids
            elif not np.array_equal(ids, reference):
                raise BadInput(
                    f"{path}: scored other test clips than the first run; rerun `cola finetune`"
                )
            frames.append(frame)
        labels = frames[0]["actual"].map(code).to_numpy()
        preds = np.stack([f["predicted"].map(code).to_numpy() for f in frames])
        scored[run] = stats.Scored(labels, preds, len(genres))
    return scored


def results_table(
    summaries: dict[str, dict[str, Any]],
    specs: dict[str, dict[str, str]],
    n_classes: int,
    published: dict[str, float],
) -> pd.DataFrame:
    """Pure: one row per run, the random-guess baseline first."""
    chance = 1.0 / n_classes
    rows = [
        {
            "model": "random guess",
            "run": "random",
            "accuracy_mean": chance,
            "macro_f1_mean": chance,
        }
    ]
    for name, summary in summaries.items():
        spec = specs[name]
        rows.append({"model": f"{spec['init']} encoder, {spec['mode']}", "run": name, **summary})
    table = pd.DataFrame(rows)
    table["published_accuracy"] = [published.get(r) for r in table["run"]]
    return table


def comparisons_table(
    scored: dict[str, stats.Scored], pairs: list[list[str]], confidence: float, n: int, seed: int
) -> list[dict[str, Any]]:
    """Each `[a, b]` of report.comparisons: a − b in accuracy, its paired interval, the verdict."""
    rows = []
    for a, b in pairs:
        diff = stats.paired_difference(scored[a], scored[b], confidence, n, seed)
        rows.append(
            {"a": a, "b": b, **diff, "verdict": stats.verdict(diff["ci_low"], diff["ci_high"])}
        )
    return rows


def headline_metrics(diffs: list[dict[str, Any]]) -> dict[str, float]:
    """Pure: what DVC compares across experiments (`dvc metrics show`, `dvc exp show`): each
    comparison's gain in accuracy points, keyed "<a> gain" ("<a> gain over <b>" where a run is
    compared twice). Per-run and per-seed numbers stay in results.json and each run's
    metrics.json: as DVC metrics they made `dvc exp show` 189 columns wide."""
    counts = Counter(d["a"] for d in diffs)
    return {
        (f"{d['a']} gain" if counts[d["a"]] == 1 else f"{d['a']} gain over {d['b']}"): round(
            100 * d["difference"], 2
        )
        for d in diffs
    }


def task_section(
    params: dict[str, Any],
    scored: dict[str, stats.Scored],
    boot: dict[str, Any],
    models: Path,
    figures: Path,
) -> dict[str, Any]:
    """Every task's probes (and, for the release's task, its fine-tuning runs) summarised, and
    the label-efficiency curves drawn."""
    probes = {name: task_report.load_probes(models / "probe" / name) for name in params["tasks"]}
    finetuned = {
        name: scored for name, task in params["tasks"].items() if task["source"] == "release"
    }
    tasks = task_report.summarise(probes, finetuned, boot)
    task_report.plot_learning_curves(tasks["curves"], figures / "learning_curves.png")
    return tasks


def task_metrics(tasks: dict[str, Any]) -> dict[str, float]:
    """Pure: each task's gains and the average probe gain, in accuracy points, for DVC."""
    metrics = {
        f"{g['task']}: pretrained probe gain": round(100 * g["difference"], 2)
        for g in tasks["gains"]
        if g["a"] == "pretrained probe"
    }
    metrics["average pretrained probe gain"] = round(
        100 * tasks["average_probe_gain"]["difference"], 2
    )
    return metrics


def plot_results(
    table: pd.DataFrame, scored: dict[str, stats.Scored], diffs: list[dict[str, Any]], path: Path
) -> None:
    """Accuracy per run (seeds as dots, seed-mean with its interval) and the paired differences."""
    runs = table[table["run"] != "random"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    for y, r in enumerate(runs.itertuples()):
        seeds = scored[r.run].per_seed("accuracy")
        ax.plot(100 * seeds, [y] * len(seeds), "o", color="tab:grey", alpha=0.6, ms=4)
        ax.errorbar(
            100 * r.accuracy_mean,
            y,
            xerr=[
                [100 * (r.accuracy_mean - r.accuracy_ci_low)],
                [100 * (r.accuracy_ci_high - r.accuracy_mean)],
            ],
            fmt="D",
            color="tab:blue",
            capsize=4,
        )
    chance = 100 * float(table.loc[table["run"] == "random", "accuracy_mean"].iloc[0])
    ax.axvline(chance, ls="--", color="grey", label="chance")
    ax.set_yticks(range(len(runs)), list(runs["run"]))
    ax.set(xlabel="test accuracy (%)", title="per run: seeds (dots), mean and 95 % CI")
    ax.legend(loc="lower right")
    ax = axes[1]
    for y, d in enumerate(diffs):
        ax.errorbar(
            100 * d["difference"],
            y,
            xerr=[
                [100 * (d["difference"] - d["ci_low"])],
                [100 * (d["ci_high"] - d["difference"])],
            ],
            fmt="D",
            color="tab:green"
            if d["verdict"] == "better"
            else "tab:red"
            if d["verdict"] == "worse"
            else "tab:grey",
            capsize=4,
        )
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(diffs)), [f"{d['a']}\n− {d['b']}" for d in diffs], fontsize=8)
    ax.set(xlabel="accuracy difference (points)", title="paired differences, 95 % CI")
    fig.tight_layout()
    with fsutil.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_pretraining(curve: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(curve["step"], curve["train_loss_step"], color="tab:blue")
    if "global_batch" in curve:
        chance = np.log(curve["global_batch"].dropna().iloc[0])
        axes[0].axhline(chance, ls="--", color="grey", label=f"chance = ln {int(np.exp(chance))}")
        axes[0].legend()
    axes[0].set(xlabel="step", ylabel="contrastive loss", title="COLA pretraining loss")
    axes[1].plot(curve["step"], curve["train_acc_step"], color="tab:green")
    axes[1].set(xlabel="step", ylabel="accuracy", title="contrastive accuracy (in-batch)")
    fig.tight_layout()
    with fsutil.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_confusion(matrix: list[list[int]], labels: list[str], title: str, path: Path) -> None:
    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i, j in np.ndindex(cm.shape):
        ax.text(
            j,
            i,
            str(cm[i, j]),
            ha="center",
            va="center",
            fontsize=7,
            color="white" if cm[i, j] > cm.max() / 2 else "black",
        )
    ax.set(xlabel="predicted", ylabel="actual", title=title)
    fig.tight_layout()
    with fsutil.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f} %"


def _ci(low: float | None, high: float | None) -> str:
    if low is None or pd.isna(low):
        return "—"
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def _mean_std(mean: float, std: float | None) -> str:
    if std is None or pd.isna(std):
        return _pct(mean)
    return f"{100 * mean:.1f} ± {100 * std:.1f} %"


def comparison_sentence(d: dict[str, Any], confidence: float) -> str:
    """The words follow the interval: a direction only where it excludes zero."""
    low, high = 100 * d["ci_low"], 100 * d["ci_high"]
    span = f"{100 * d['difference']:+.1f} points, {confidence:.0%} CI [{low:+.1f}, {high:+.1f}]"
    if d["verdict"] == "no detectable difference":
        return (
            f"**{d['a']}** vs **{d['b']}**: no detectable difference ({span}; the interval "
            "covers 0)."
        )
    return f"**{d['a']}** is {d['verdict']} than **{d['b']}** ({span})."


def task_tables(tasks: dict[str, Any], confidence: float) -> dict[str, Any]:
    """Pure: the tasks section's cells and sentences, formatted: a task × run table (— where a
    run is not made for a task), each paired gain in words that follow its interval, the
    average probe gain over tasks."""
    runs = list(dict.fromkeys(run for t in tasks["tasks"] for run in t["cells"]))
    rows = []
    for t in tasks["tasks"]:
        cells = []
        for run in runs:
            c = t["cells"].get(run)
            cells.append(
                "—"
                if c is None
                else f"{_mean_std(c['accuracy_mean'], c['accuracy_std'])} "
                f"{_ci(c['accuracy_ci_low'], c['accuracy_ci_high'])}"
            )
        counts = t["split_counts"]
        rows.append(
            {
                "task": t["task"],
                "classes": t["classes"],
                "split": f"{counts['train']}/{counts['val']}/{counts['test']}",
                "cells": cells,
                "excluded": t["excluded"],
                "skipped": t["skipped"],
            }
        )
    gains = [f"{g['task']}: " + comparison_sentence(g, confidence) for g in tasks["gains"]]
    average = {"a": "pretrained probe", "b": "random-init probe", **tasks["average_probe_gain"]}
    return {
        "runs": runs,
        "rows": rows,
        "gains": gains,
        "average": comparison_sentence(average, confidence),
        "n_tasks": len(rows),
    }


TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("cola_audio", "templates"),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,  # Markdown out; markdown-it-py escapes for the HTML page (html: False)
)


def render_markdown(table: pd.DataFrame, context: dict[str, Any]) -> str:
    """report.md from templates/report.md.j2: the table's numbers formatted, the words of each
    comparison following its interval, skipped files grouped under their reason."""
    prov = context["provenance"]
    skipped: dict[str, list[dict[str, Any]]] = {
        r: [] for r in prov["features"]["skipped_by_reason"]
    }
    for row in prov["skipped"]:
        skipped.setdefault(row["reason"].split(":")[0], []).append(row)
    rows = [
        {
            "model": r.model,
            "run": r.run,
            "accuracy": _mean_std(r.accuracy_mean, r.accuracy_std),
            "accuracy_ci": _ci(r.accuracy_ci_low, r.accuracy_ci_high),
            "macro_f1": _mean_std(r.macro_f1_mean, r.macro_f1_std),
            "macro_f1_ci": _ci(r.macro_f1_ci_low, r.macro_f1_ci_high),
            "n_test": "—" if pd.isna(r.n_test) else str(int(r.n_test)),
            "published": "—"
            if r.published_accuracy is None or pd.isna(r.published_accuracy)
            else f"{r.published_accuracy:.1f} %",
        }
        for r in table.itertuples()
    ]
    return TEMPLATES.get_template("report.md.j2").render(
        **{k: context[k] for k in ("source", "finetune_subset", "pretrain_subset", "seeds")},
        **{k: context[k] for k in ("n_resamples", "runs", "pretrain_line", "padded")},
        conf=f"{context['confidence']:.0%}",
        rows=rows,
        comparisons=[comparison_sentence(d, context["confidence"]) for d in context["comparisons"]],
        tasks=task_tables(context["tasks"], context["confidence"]),
        probe=context["probe"],
        params_hash=prov["params_hash"],
        features=prov["features"],
        skipped=skipped,
        hashes=prov["hashes"],
    )


def render_html(markdown: str, figures: Path) -> str:
    """A self-contained page: the Markdown rendered by markdown-it-py (CommonMark and tables),
    each figure inlined as base64 so the file can be mailed or archived alone."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(markdown)
    for token in tokens:
        for child in token.children or []:
            if child.type == "image":
                png = (Path(figures).parent / str(child.attrGet("src"))).read_bytes()
                child.attrSet("src", "data:image/png;base64," + base64.b64encode(png).decode())
    body = md.renderer.render(tokens, md.options, {})
    return TEMPLATES.get_template("report.html.j2").render(body=body)


def run(
    params: dict[str, Any],
    out_dir: Path = Path("reports"),
    models: Path = Path("models"),
    features: Path = Path("data/features"),
    meta_dir: Path = Path("data/meta"),
) -> str:
    """Score every run × seed from its predictions, compare, plot, and write the report."""
    out_dir, figures, cfg = Path(out_dir), Path(out_dir) / "figures", params["report"]
    boot = {"confidence": cfg["confidence"], "n": cfg["bootstrap_resamples"], "seed": 0}
    specs = finetune_runs(params["finetune"])
    seeds = sorted(params["finetune"]["seeds"])
    genres = meta.read(meta_dir, "labels")["genres"]
    scored = load_scored(Path(models), list(specs), seeds, genres)
    summaries = {
        name: stats.run_summary(s, boot["confidence"], boot["n"], boot["seed"])
        for name, s in scored.items()
    }
    # The seed repository's numbers are FMA-small's: beside another dataset they would mislead.
    published = {} if params["data"]["source"] == "folder" else cfg["published"]
    table = results_table(summaries, specs, len(genres), published)
    diffs = comparisons_table(scored, cfg["comparisons"], **boot)
    plot_results(table, scored, diffs, figures / "results.png")
    plot_pretraining(
        pd.read_csv(Path(models) / "pretrain" / "curve.csv"), figures / "pretrain_curves.png"
    )
    for name, s in scored.items():
        confusion = sum(stats.confusion_matrix(s.labels, p, len(genres)) for p in s.preds)
        plot_confusion(confusion.tolist(), genres, name, figures / f"confusion_{name}.png")
    tasks = task_section(params, scored, boot, Path(models), figures)
    context = _context(params, list(specs), seeds, boot, diffs, Path(features), Path(models))
    context["tasks"] = tasks
    markdown = render_markdown(table, context)
    fsutil.write_text(out_dir / "report.md", markdown)
    fsutil.write_text(out_dir / "report.html", render_html(markdown, figures))
    fsutil.write_json(
        out_dir / "results.json",
        {
            "rows": json.loads(table.to_json(orient="records")),
            "comparisons": diffs,
            "tasks": tasks,
            "source": context["source"],
            "provenance": context["provenance"],
        },
    )
    fsutil.write_json(out_dir / "metrics.json", headline_metrics(diffs) | task_metrics(tasks))
    log.info("report written to %s", out_dir / "report.html")
    return markdown


def _context(
    params: dict[str, Any],
    runs: list[str],
    seeds: list[int],
    boot: dict[str, Any],
    diffs: list[dict[str, Any]],
    features: Path,
    models: Path,
) -> dict[str, Any]:
    """What the report's templates read besides the results table."""
    crop = params["finetune"]["crop_frames"]
    return {
        "source": params["data"]["source"],
        "finetune_subset": params["data"]["finetune_subset"],
        "pretrain_subset": params["data"]["pretrain_subset"],
        "runs": runs,
        "seeds": seeds,
        "confidence": boot["confidence"],
        "n_resamples": boot["n"],
        "comparisons": diffs,
        "pretrain_line": pretrain_line(fsutil.read_json(models / "pretrain" / "summary.json")),
        "probe": {k: params["probe"][k] for k in ("label_fractions", "seeds", "pooling")},
        "provenance": provenance(params, features, models),
        "padded": int((pd.read_csv(features / "index.csv")["frames"] < crop).sum()),
    }


def pretrain_line(pre: dict[str, Any]) -> str:
    final = pre["final"]
    return (
        f"{pre['steps']} steps over {pre['epochs']} epochs on {pre['clips']} clips "
        f"(global batch {pre['global_batch']}, {pre['precision']}, {pre['accelerator']}); "
        f"final contrastive loss {final.get('train_loss_epoch', float('nan')):.3f}, "
        f"in-batch accuracy {_pct(final.get('train_acc_epoch'))} "
        f"(chance {_pct(1 / pre['global_batch'])})."
    )


def provenance(params: dict[str, Any], features: Path, models: Path) -> dict[str, Any]:
    """Code, parameters and data hashes every number in the report comes from: the params the
    report reads itself, and the identity of each run it scores (which covers that stage's
    params, every input byte and the code), so upstream params are traced without the report
    declaring them."""
    runs = sorted(finetune_runs(params["finetune"]))
    identities = {
        "pretrain": fsutil.read_json(models / "pretrain" / "summary.json").get("run_identity"),
        **{
            f"{run}/seed-{seed}": fsutil.read_json(
                models / "finetune" / run / f"seed-{seed}" / "metrics.json"
            ).get("run_identity")
            for run in runs
            for seed in sorted(params["finetune"]["seeds"])
        },
    }
    tracked = [
        features / "index.csv",
        # the shards summary.json lists, not whatever lies in the folder
        *(p for p in FeatureStore.files(features) if p.suffix == ".npy"),
        models / "pretrain" / "encoder.safetensors",
    ]
    return {
        "params_hash": params_hash(params),
        "run_identities": identities,
        "features": fsutil.read_json(features / "summary.json"),
        "skipped": pd.read_csv(features / "skipped.csv").to_dict("records"),
        "hashes": {p.as_posix(): digest.file_digest(p, "md5") for p in tracked if p.is_file()},
    }
