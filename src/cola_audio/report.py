"""`cola report`: results table, curves, confusion matrices and provenance, as Markdown and HTML.

Every number in the report is read from an artifact of the pipeline, and the provenance section
names the code (git commit), the parameters (a hash) and the data (file hashes as DVC computes them)
it came from.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cola_audio import fsutil  # noqa: E402

log = logging.getLogger(__name__)


def md5_file(path: Path) -> str:
    """The hash DVC records for a file output."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def params_hash(params: dict[str, Any]) -> str:
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(canonical.encode()).hexdigest()[:12]


def git_state(repo: Path = Path(".")) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"commit": "unknown (not a git checkout)", "dirty": None}
    return {"commit": commit, "dirty": dirty}


def results_table(
    runs: dict[str, dict[str, Any]], n_classes: int, published: dict[str, float]
) -> pd.DataFrame:
    """Pure: one row per model, the random-guess baseline first."""
    rows = [
        {
            "model": "random guess",
            "run": "random",
            "accuracy": 1.0 / n_classes,
            "macro_f1": 1.0 / n_classes,
            "n_test": None,
        }
    ]
    for name, m in runs.items():
        rows.append(
            {
                "model": f"{m['init']} encoder, {m['mode']}",
                "run": name,
                "accuracy": m["accuracy"],
                "macro_f1": m["macro_f1"],
                "n_test": m["n_test"],
            }
        )
    table = pd.DataFrame(rows)
    table["published_accuracy"] = [published.get(r) for r in table["run"]]
    return table


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


def render_markdown(table: pd.DataFrame, context: dict[str, Any]) -> str:
    lines = ["# cola-audio report", ""]
    if context["source"] == "synthetic":
        lines += [
            "> **Data: the embedded synthetic dataset in FMA's layout, not the real FMA.** "
            "Our numbers measure the pipeline on it; the published column is the seed "
            "repository's result on real FMA-small and is shown for reference only.",
            "",
        ]
    else:
        lines += [
            f"> Data: real FMA (`fma_{context['finetune_subset']}` for fine-tuning, "
            f"`fma_{context['pretrain_subset']}` for pretraining).",
            "",
        ]
    lines += [
        "## Results (test set, clip-level: logits averaged over 1 s windows)",
        "",
        "| model | run | accuracy | macro-F1 | n_test | published (seed repo, real FMA) |",
        "|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        pub = (
            "—"
            if r.published_accuracy is None or pd.isna(r.published_accuracy)
            else (f"{r.published_accuracy:.1f} %")
        )
        n_test = "—" if r.n_test is None or pd.isna(r.n_test) else str(int(r.n_test))
        lines.append(
            f"| {r.model} | {r.run} | {_pct(r.accuracy)} | {_pct(r.macro_f1)} | {n_test} | {pub} |"
        )
    lines += [
        "",
        "## Pretraining",
        "",
        context["pretrain_line"],
        "",
        "![pretraining curves](figures/pretrain_curves.png)",
        "",
        "## Confusion matrices",
        "",
    ]
    for name in context["runs"]:
        lines += [f"### {name}", "", f"![confusion {name}](figures/confusion_{name}.png)", ""]
    prov = context["provenance"]
    lines += [
        "## Provenance",
        "",
        f"- git commit: `{prov['git']['commit']}`"
        + (" (uncommitted changes)" if prov["git"]["dirty"] else ""),
        f"- params hash (sha1 of the resolved params.yaml): `{prov['params_hash']}`",
        f"- data source: `{context['source']}`",
        f"- clips featurized: {prov['features']['featurized']} of "
        f"{prov['features']['clips']}; skipped {prov['features']['skipped']}",
    ]
    for reason, count in prov["features"]["skipped_by_reason"].items():
        lines.append(f"  - {count} × {reason}")
    for row in prov["skipped"]:
        lines.append(f"    - `{row['audio']}`: {row['reason']}")
    lines += ["", "| artifact | md5 (as in dvc.lock) |", "|---|---|"]
    for path, digest in prov["hashes"].items():
        lines.append(f"| `{path}` | `{digest}` |")
    return "\n".join(lines) + "\n"


def render_html(markdown: str, figures: Path) -> str:
    """A self-contained page: the Markdown's structure as HTML, figures inlined as base64."""
    body: list[str] = []
    in_table = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            alt, src = line[2:].split("](")
            data = base64.b64encode((figures.parent / src.rstrip(")")).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("> "):
            body.append(f"<blockquote>{_inline(line[2:])}</blockquote>")
        elif line.strip().startswith("- "):
            body.append(f"<li>{_inline(line.strip()[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    style = (
        "body{font-family:sans-serif;max-width:960px;margin:2em auto;}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        "blockquote{background:#fff4d6;padding:8px;border-left:4px solid #e0a800}"
        "img{max-width:100%}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>cola-audio report</title>"
        f"<style>{style}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )


def _inline(text: str) -> str:
    out = html.escape(text)
    parts = out.split("`")
    out = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
    parts = out.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def run(
    params: dict[str, Any],
    params_path: Path = Path("params.yaml"),
    out_dir: Path = Path("reports"),
    models: Path = Path("models"),
    features: Path = Path("data/features"),
    meta_dir: Path = Path("data/meta"),
) -> str:
    out_dir = Path(out_dir)
    figures = out_dir / "figures"
    runs = {
        name: fsutil.read_json(Path(models) / "finetune" / name / "metrics.json")
        for name in params["finetune"]["runs"]
    }
    genres = fsutil.read_json(Path(meta_dir) / "labels.json")["genres"]
    table = results_table(runs, len(genres), params["report"]["published"])
    curve = pd.read_csv(Path(models) / "pretrain" / "curve.csv")
    plot_pretraining(curve, figures / "pretrain_curves.png")
    for name, m in runs.items():
        plot_confusion(m["confusion_matrix"], m["labels"], name, figures / f"confusion_{name}.png")
    pre = fsutil.read_json(Path(models) / "pretrain" / "summary.json")
    feature_summary = fsutil.read_json(Path(features) / "summary.json")
    skipped = pd.read_csv(Path(features) / "skipped.csv").to_dict("records")
    tracked = [
        Path(features) / "index.csv",
        *sorted((Path(features) / "shards").glob("*.npy")),
        Path(models) / "pretrain" / "encoder.safetensors",
    ]
    context = {
        "source": params["data"]["source"],
        "finetune_subset": params["data"]["finetune_subset"],
        "pretrain_subset": params["data"]["pretrain_subset"],
        "runs": list(runs),
        "pretrain_line": (
            f"{pre['steps']} steps over {pre['epochs']} epochs on {pre['clips']} clips "
            f"(global batch {pre['global_batch']}, {pre['precision']}, {pre['accelerator']}); "
            f"final contrastive loss {pre['final'].get('train_loss_epoch', float('nan')):.3f}, "
            f"accuracy {_pct(pre['final'].get('train_acc_epoch'))} "
            f"(chance {_pct(1 / pre['global_batch'])})."
        ),
        "provenance": {
            "git": git_state(),
            "params_hash": params_hash(params),
            "features": feature_summary,
            "skipped": skipped,
            "hashes": {p.as_posix(): md5_file(p) for p in tracked if p.is_file()},
        },
    }
    markdown = render_markdown(table, context)
    fsutil.write_text(out_dir / "report.md", markdown)
    fsutil.write_text(out_dir / "report.html", render_html(markdown, figures))
    fsutil.write_json(
        out_dir / "results.json",
        {
            "rows": json.loads(table.to_json(orient="records")),
            "source": context["source"],
            "provenance": context["provenance"],
        },
    )
    log.info("report written to %s", out_dir / "report.html")
    return markdown
