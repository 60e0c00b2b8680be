"""Load params.yaml and validate it against the schema Snakemake also uses.

One schema file (workflow/schemas/params.schema.yaml) is the single definition of what a valid
configuration is; a bad value stops a stage before any work with the key, the value and what is
allowed.
"""

from __future__ import annotations

import functools
import re
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


# libyaml's parser where PyYAML has it: the pure-Python one takes 0.1 s for the schema alone
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeys(YAML_LOADER):  # type: ignore[misc,valid-type]
    """YAML keeps the last of a key given twice, silently: an `lr` written twice trained with
    whichever came last. Refused instead, naming both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in lines:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} given twice (lines {lines[key]} and "
                    f"{key_node.start_mark.line + 1}); keep one",
                    key_node.start_mark,
                )
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A params file as data; duplicate keys, bad YAML and non-UTF-8 text are ParamsErrors."""
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)
    except UnicodeDecodeError as exc:
        raise ParamsError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc


@functools.cache
def load_schema(name: str = SCHEMA_NAME) -> dict[str, Any]:
    """A schema from workflow/schemas/ (the package is installed editable from the repository);
    read once per process, never to be modified."""
    path = SCHEMA_DIR / name
    if not path.is_file():
        raise ParamsError(f"{path}: schema missing; install the package with `pip install -e .`")
    return yaml.load(path.read_text(), Loader=YAML_LOADER)


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    allowed = error.schema.get("description") if isinstance(error.schema, dict) else None
    if error.validator == "enum":
        allowed = "one of " + ", ".join(map(str, error.validator_value))
    elif error.validator in ("additionalProperties", "unevaluatedProperties"):
        known = sorted(_known_keys(error.schema))
        allowed = "known keys: " + ", ".join(known) if known else None
    value = error.instance if not isinstance(error.instance, dict) else "{...}"
    msg = f"{key} = {value!r} is invalid: {error.message}"
    if error.validator == "type" and _reads_as_number(error.instance):
        msg += f" (YAML reads {value} as text; write it with a dot, e.g. 1.0e-3)"
    if error.validator == "unevaluatedProperties":  # name only keys the schema does not know
        unknown = ", ".join(repr(k) for k in sorted(set(error.instance) - set(known)))
        msg = f"{key} has unknown key(s) {unknown}"
    if allowed:
        msg += f" (allowed: {allowed})"
    return msg


def _reads_as_number(value: Any) -> bool:
    """`1e-3`: a number to Python, a string to YAML 1.1 (no dot in the mantissa)."""
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _known_keys(schema: dict[str, Any]) -> set[str]:
    return set(schema.get("properties") or {}) | _allof_keys(schema)


def _spurious(error: jsonschema.ValidationError) -> bool:
    """An unevaluatedProperties error raised only because a sibling value failed its own check:
    the keys of a failing allOf branch count as unevaluated, though the schema knows them."""
    return error.validator == "unevaluatedProperties" and not (
        set(error.instance) - _known_keys(error.schema)
    )


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
    errors = sorted(
        (e for e in validator.iter_errors(params) if not _spurious(e)),
        key=lambda e: list(map(str, e.absolute_path)),
    )
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
    if (pattern := data["folder"]["group_pattern"]) is not None:
        try:  # the schema takes any string; re.error would otherwise stop `cola download` late
            re.compile(pattern)
        except re.error as exc:
            problems.append(
                f"data.folder.group_pattern = {pattern!r} is not a valid regular expression ({exc})"
            )
    ft = params["finetune"]
    if ft["val_every_n_epochs"] > ft["max_epochs"]:
        problems.append(
            f"finetune.val_every_n_epochs = {ft['val_every_n_epochs']} exceeds max_epochs "
            f"{ft['max_epochs']}: no validation would ever select a checkpoint"
        )
    names = [n for by_init in ft["runs"].values() for ns in by_init.values() for n in ns]
    if not names:
        problems.append("finetune.runs lists no run")
    if twice := sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"finetune.runs: {', '.join(twice)} listed more than once")
    if params["pretrain"]["batch_size"] < 2:
        problems.append(
            f"pretrain.batch_size = {params['pretrain']['batch_size']}: a contrastive batch "
            "needs at least 2 clips (the others are each clip's negatives)"
        )
    return (
        problems
        + _comparison_problems(params["report"]["comparisons"], names)
        + _task_problems(params["tasks"], params["probe"])
    )


def _task_problems(tasks: dict[str, Any], probe: dict[str, Any]) -> list[str]:
    """Task names are strings; a folder task needs audio (a demo, or a path: class subfolders,
    or the folder its labels CSV's paths are relative to) and a group pattern that compiles; the
    report's table and gains use the probes fitted on all labels."""
    problems = []
    if 1.0 not in probe["label_fractions"]:
        problems.append(
            f"probe.label_fractions = {probe['label_fractions']} lacks 1.0: the report's table "
            "and gains are the probes fitted on all training labels"
        )
    for name, task in tasks.items():
        if not isinstance(name, str):
            problems.append(f"tasks: the name {name!r} must be a string (quote it in YAML)")
            continue
        if task["source"] != "folder":
            continue
        if task["demo"] is None and task["path"] is None:
            problems.append(
                f"tasks.{name}: no audio: set demo (sounds, pitch, timbre) or path (a folder of "
                "class subfolders, or the folder labels_csv's paths are relative to)"
            )
        if (pattern := task["group_pattern"]) is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                problems.append(
                    f"tasks.{name}.group_pattern = {pattern!r} is not a valid regular "
                    f"expression ({exc})"
                )
    return problems


def _comparison_problems(comparisons: list[list[str]], names: list[str]) -> list[str]:
    """Each pair names two different runs, once: a self comparison has no difference to find
    and a repeated pair would write one metrics key twice."""
    problems, seen = [], set()
    for pair in comparisons:
        if unknown := [r for r in pair if r not in names]:
            problems.append(
                f"report.comparisons {pair}: {', '.join(unknown)} not a run of finetune.runs"
            )
        if pair[0] == pair[1]:
            problems.append(f"report.comparisons {pair}: compares a run with itself")
        elif tuple(pair) in seen:
            problems.append(f"report.comparisons {pair}: listed more than once")
        seen.add(tuple(pair))
    return problems


def finetune_runs(finetune: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Run name → {init, mode}, from params' run lists grouped by mode, then by the encoder the
    run starts from."""
    return {
        name: {"init": init, "mode": mode}
        for mode, by_init in finetune["runs"].items()
        for init, names in by_init.items()
        for name in names
    }


def overrides(config: dict[str, Any], path: str | Path = "params.yaml") -> list[str]:
    """Pure but for reading `path`: the dotted keys whose value in `config` (what Snakemake made
    of params.yaml plus --config/--configfile) differs from the file's."""
    on_disk = read_yaml(Path(path))

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [
                k
                for key in sorted({*a, *b}, key=str)
                for k in walk(a.get(key, _MISSING), b.get(key, _MISSING), f"{prefix}{key}.")
            ]
        return [] if a == b and type(a) is type(b) else [prefix.rstrip(".")]

    return walk(config, on_disk, "")


_MISSING = object()


def refuse_overrides(config: dict[str, Any], path: str | Path = "params.yaml") -> None:
    """Stop before any job when --config/--configfile changed a value: every job reads params.yaml
    (as DVC does), so the override would be ignored by the computation while Snakemake and
    dvc.lock recorded it."""
    keys = overrides(config, path)
    if keys:
        shown = ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise ParamsError(
            f"--config/--configfile override {shown}, but every job reads {path}: edit {path} "
            f"instead, or try a variant with `dvc exp run -S {keys[0]}=VALUE` (an experiment "
            "DVC records); nothing was run"
        )


def load(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found. Run from the repository root or pass --params PATH.")
    params = read_yaml(path)
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return validate(params, str(path))
