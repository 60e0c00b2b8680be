"""`cola dvc-yaml`: dvc.yaml rendered from the stage table (stages.py), never written by hand.

Each stage's matrix stays DVC templating over params.yaml lists (`${features.shards}`,
`${finetune.runs.finetune.scratch}`, `${finetune.seeds}`), so a params edit needs no new render;
the file changes only with the table, the schema's keys or the code's imports, and
`cola dvc-yaml --check` (in CI) fails when the committed file is not what the table renders.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

from cola_audio.stages import STAGES, Stage

HEADER = """\
# Rendered by `cola dvc-yaml` from the stage table (src/cola_audio/stages.py), which the Snakemake
# rules read too: edit the table, never this file (`cola dvc-yaml --check` in CI fails on drift).
# Each stage depends on its code (its module's import closure) and on each param key that can
# change its result; speed knobs (features.workers, the download section) are declared nowhere.
"""

PLOTS = [
    {
        "pretraining": {
            "template": "simple",
            "x": "step",
            "y": {"models/pretrain/curve.csv": ["train_loss_step", "train_acc_step"]},
        }
    },
    "reports/figures",
]


def _dvc_template(text: str) -> str:
    """Wildcards {w} as DVC's matrix items ${item.w}."""
    return re.sub(r"\{(\w+)\}", lambda m: "${item." + m.group(1) + "}", text)


def stage_entry(stage: Stage) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if stage.matrix:
        entry["matrix"] = {w: "${" + key + "}" for w, key in stage.matrix.items()}
    entry["cmd"] = _dvc_template(stage.command())
    entry["deps"] = [*stage.code(), *(_dvc_template(d) for d in stage.dvc_deps())]
    entry["params"] = list(stage.params)
    for kind in ("outs", "metrics", "plots"):
        outs = [o for o in stage.outs.values() if o.dvc == kind]
        if outs:
            entry[kind] = [
                {_dvc_template(o.path): o.plot} if o.plot else _dvc_template(o.path) for o in outs
            ]
    return entry


def render() -> str:
    body = {"stages": {s.name: stage_entry(s) for s in STAGES.values()}, "plots": PLOTS}
    return HEADER + yaml.safe_dump(body, sort_keys=False, width=100, allow_unicode=True)


def run(path: Path = Path("dvc.yaml"), check: bool = False) -> bool:
    """Write dvc.yaml (or, with check, compare); True when the file already was the render."""
    rendered = render()
    current = path.read_text() if path.is_file() else ""
    if current == rendered:
        return True
    if check:
        diff = "".join(
            difflib.unified_diff(
                current.splitlines(True), rendered.splitlines(True), str(path), "rendered"
            )
        )
        print(diff, end="")
        return False
    path.write_text(rendered)
    return False
