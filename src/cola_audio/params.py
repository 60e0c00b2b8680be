"""Load params.yaml and validate it against the schema Snakemake also uses.

One schema file (workflow/schemas/params.schema.yaml) is the single definition of what a valid
configuration is; a bad value stops a stage before any work with the key, the value and what is
allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from cola_audio.errors import InputError
from cola_audio.fma import SUBSET_ORDER

SCHEMA_NAME = "params.schema.yaml"


class ParamsError(InputError, ValueError):
    """params.yaml is missing, unreadable or invalid; the message says which key and how to fix."""


SCHEMA_DIR = Path(__file__).resolve().parents[2] / "workflow" / "schemas"


def load_schema(name: str = SCHEMA_NAME) -> dict[str, Any]:
    """A schema from workflow/schemas/ (the package is installed editable from the repository)."""
    path = SCHEMA_DIR / name
    if not path.is_file():
        raise ParamsError(f"{path}: schema missing; install the package with `pip install -e .`")
    return yaml.safe_load(path.read_text())


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    allowed = error.schema.get("description") if isinstance(error.schema, dict) else None
    if error.validator == "enum":
        allowed = "one of " + ", ".join(map(str, error.validator_value))
    elif error.validator in ("additionalProperties", "unevaluatedProperties"):
        known = sorted((error.schema.get("properties") or {}).keys())
        if not known and error.validator == "unevaluatedProperties":
            known = sorted(_allof_keys(error.schema))
        allowed = "known keys: " + ", ".join(known) if known else None
    value = error.instance if not isinstance(error.instance, dict) else "{...}"
    msg = f"{key} = {value!r} is invalid: {error.message}"
    if allowed:
        msg += f" (allowed: {allowed})"
    return msg


def _allof_keys(schema: dict[str, Any]) -> set[str]:
    keys: set[str] = set()
    for part in schema.get("allOf", []):
        if "$ref" in part:
            name = part["$ref"].rsplit("/", 1)[-1]
            part = load_schema()["$defs"][name]
        keys |= set(part.get("properties", {}))
    return keys


def validate(params: dict[str, Any], source: str = "params.yaml") -> dict[str, Any]:
    """Raise ParamsError listing every violation; return params unchanged when valid."""
    schema = load_schema()
    validator = _strict_integers(jsonschema.validators.validator_for(schema))(schema)
    errors = sorted(validator.iter_errors(params), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n".join(f"  - {_describe(e)}" for e in errors)
        raise ParamsError(f"{source}: invalid parameters:\n{lines}\nFix the values in {source}.")
    _check_cross_field(params, source)
    return params


def _strict_integers(base: type) -> type:
    """JSON Schema counts 4.0 as an integer; Python code downstream does not (range(4.0) fails
    long after validation), so an integer parameter must be written as one."""

    def is_integer(checker: Any, instance: Any) -> bool:
        return isinstance(instance, int) and not isinstance(instance, bool)

    return jsonschema.validators.extend(
        base, type_checker=base.TYPE_CHECKER.redefine("integer", is_integer)
    )


def _check_cross_field(params: dict[str, Any], source: str) -> None:
    """What a JSON schema cannot say: relations between values."""
    problems = [*_feature_problems(params["features"]), *_data_and_run_problems(params)]
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ParamsError(f"{source}: invalid parameters:\n{lines}\nFix the values in {source}.")


def _feature_problems(feats: dict[str, Any]) -> list[str]:
    problems = []
    if feats["fmax_hz"] > feats["sample_rate"] / 2:
        problems.append(
            f"features.fmax_hz = {feats['fmax_hz']} exceeds the Nyquist frequency "
            f"{feats['sample_rate'] / 2} of features.sample_rate"
        )
    if feats["fmin_hz"] >= feats["fmax_hz"]:
        problems.append(f"features.fmin_hz = {feats['fmin_hz']} must be below fmax_hz")
    if feats["fft_length"] < feats["frame_length"]:
        problems.append(
            f"features.fft_length = {feats['fft_length']} must be ≥ frame_length "
            f"{feats['frame_length']}"
        )
    if feats["shards"] != list(range(len(feats["shards"]))):
        n = len(feats["shards"])
        problems.append(
            f"features.shards = {feats['shards']} must be the ids 0..{n - 1} in order "
            f"(for {n} shards: {list(range(n))})"
        )
    return problems


def _data_and_run_problems(params: dict[str, Any]) -> list[str]:
    problems = []
    lo, hi = params["data"]["synthetic"]["clip_seconds"]
    if lo > hi:
        problems.append(f"data.synthetic.clip_seconds = {[lo, hi]} must be [shortest, longest]")
    order = {name: rank for rank, name in enumerate(SUBSET_ORDER)}
    data = params["data"]
    if order[data["pretrain_subset"]] < order[data["finetune_subset"]]:
        problems.append(
            f"data.pretrain_subset = {data['pretrain_subset']!r} is smaller than finetune_subset "
            f"{data['finetune_subset']!r}; pretraining needs the larger subset"
        )
    ft = params["finetune"]
    if ft["val_every_n_epochs"] > ft["max_epochs"]:
        problems.append(
            f"finetune.val_every_n_epochs = {ft['val_every_n_epochs']} exceeds max_epochs "
            f"{ft['max_epochs']}: no validation would ever select a checkpoint"
        )
    runs = ft["runs"]
    if not runs["scratch"] and not runs["pretrained"]:
        problems.append("finetune.runs lists no run under scratch or pretrained")
    if both := sorted(set(runs["scratch"]) & set(runs["pretrained"])):
        problems.append(f"finetune.runs: {', '.join(both)} listed under scratch and pretrained")
    known = set(runs["scratch"]) | set(runs["pretrained"])
    for pair in params["report"]["comparisons"]:
        if unknown := [r for r in pair if r not in known]:
            problems.append(
                f"report.comparisons {pair}: {', '.join(unknown)} not a run of finetune.runs"
            )
    return problems


def finetune_runs(finetune: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Run name → {init, mode}, from params' runs grouped by the encoder they start from."""
    return {
        name: {"init": init, "mode": mode}
        for init in ("scratch", "pretrained")
        for name, mode in sorted(finetune["runs"][init].items())
    }


# Keys that change how fast a stage runs, never what it computes. No stage declares them, so an
# edit reruns nothing in either tool. (`download` as a whole is transport: mirror, retries,
# timeouts; the archives' SHA1s, under data.fma, fix what is downloaded.) `num_workers` is not
# one: loader workers draw the random crops from their own seeded generators, so the crops, and
# the trained weights, depend on it.
SPEED_KEYS = {"features": ("workers",)}


def declared_params(
    params: dict[str, Any], section: str, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`section.key` → value for every key of a stage's section that can change its result,
    as both orchestrators declare them (one entry per key, as DVC's get-started example does)."""
    skip = SPEED_KEYS.get(section, ()) + skip
    return {f"{section}.{k}": v for k, v in params[section].items() if k not in skip}


def pick(params: dict[str, Any], *keys: str) -> dict[str, Any]:
    """`section.key` → value for each dotted key named."""
    out = {}
    for key in keys:
        value: Any = params
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def data_params(params: dict[str, Any]) -> dict[str, Any]:
    """The data keys that decide which audio lands in data/raw: the source, the two subsets and
    that source's own section (data.synthetic or data.fma), never the other source's."""
    source = params["data"]["source"]
    return pick(
        params, "data.source", "data.finetune_subset", "data.pretrain_subset", f"data.{source}"
    )


def report_params(params: dict[str, Any]) -> dict[str, Any]:
    """What the report reads from params: its own section, which runs and seeds to score, and
    how the data was sourced. The stages upstream are traced by their outputs' hashes and each
    run's identity, not by their params again."""
    return pick(
        params,
        "report",
        "finetune.runs",
        "finetune.seeds",
        "finetune.crop_frames",
        "data.source",
        "data.finetune_subset",
        "data.pretrain_subset",
    )


def load(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found. Run from the repository root or pass --params PATH.")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return validate(params, str(path))
