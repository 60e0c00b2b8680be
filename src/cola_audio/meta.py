"""The metadata documents under data/meta/ (labels, finetune, pretrain), checked on both sides.

One schema (workflow/schemas/meta.schema.yaml) checks them when `cola prepare` writes them and
again wherever a stage reads them, so a damaged or hand-edited file is named with the fix instead
of failing deep inside featurization or training.
"""

from __future__ import annotations

from collections import Counter
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from cola_audio import fsutil
from cola_audio.errors import BadInput
from cola_audio.params import load_schema


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = load_schema("meta.schema.yaml")
    sub = {"$defs": schema["$defs"], **schema["properties"][name]}
    return jsonschema.validators.validator_for(sub)(sub)


def problem(name: str, doc: Any) -> str | None:
    """What is wrong with document `name`, or None: its schema, then unique track ids."""
    error = jsonschema.exceptions.best_match(_validator(name).iter_errors(doc))
    if error is not None:
        where = ".".join(map(str, error.absolute_path)) or "(top level)"
        return f"invalid at {where}: {error.message}"
    ids = Counter(t["track_id"] for t in doc.get("tracks", []))
    if dupes := sorted(t for t, n in ids.items() if n > 1):
        return f"track ids listed more than once: {', '.join(map(str, dupes[:10]))}"
    return None


def read_labelled(meta_dir: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Class names and fine-tuning tracks, each track's label checked against labels.json (the
    documents are written together; a hand edit of one would silently relabel clips)."""
    ids = read(meta_dir, "labels")["ids"]
    tracks = read(meta_dir, "finetune")["tracks"]
    wrong = [t["track_id"] for t in tracks if ids.get(t["genre"]) != t["label"]]
    if wrong:
        shown = ", ".join(map(str, wrong[:10]))
        raise BadInput(
            f"{Path(meta_dir) / 'finetune.json'}: label ids of track(s) {shown} disagree with "
            "labels.json; rerun `cola prepare`"
        )
    return sorted(ids, key=ids.__getitem__), tracks


def read(meta_dir: str | Path, name: str) -> dict[str, Any]:
    """data/meta/<name>.json, checked: a bad file is a one-line error naming it and the fix."""
    path = Path(meta_dir) / f"{name}.json"
    doc = fsutil.read_json(path)
    if (why := problem(name, doc)) is not None:
        raise BadInput(f"{path}: {why}. It was damaged or edited; rerun `cola prepare`")
    return doc
