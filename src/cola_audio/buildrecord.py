"""What a job's outputs were built from, written by the job itself: the ground truth for dvc.lock.

`cola <stage>` records, for the exact command both tools run (stages.by_command), the values of the
stage's declared params it ran with, the state of each of its dependencies when it started (path,
size and mtime of every file, as DVC sees a folder: .dvcignore applies) and the content (md5) of
its outputs when it finished. If a dependency changed while it ran, nothing is recorded.

`cola dvc-commit` commits a stage only when its record matches DVC's view now: the same params
values for the stage's keys, and every dependency and output still in the recorded state. So
dvc.lock never pairs outputs with params, code or inputs they were not built from, whatever
Snakemake's own records say (`--touch`, `--rerun-triggers mtime`, lost metadata), and DVC's run
cache gets no false entry. Records live in .cola/builds/, one JSON per job (DVC's addressing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cola_audio import digest, fsutil

RECORDS = Path(".cola") / "builds"


def _ignored(repo: Path) -> Any:
    """A matcher for .dvcignore's patterns (gitignore syntax), as DVC applies them."""
    import pathspec

    path = repo / ".dvcignore"
    lines = path.read_text().splitlines() if path.is_file() else []
    return pathspec.GitIgnoreSpec.from_lines(lines)


def state(paths: list[str], repo: Path = Path("."), outputs: bool = False) -> dict[str, str | None]:
    """path → digest of (relative path, size, mtime) of every file it holds (None: missing).

    Outputs are identified by their bytes (md5, as DVC hashes them) instead of their mtime:
    Snakemake touches every output after its job, and nothing but the content says that the
    files committed are the files this job wrote (an inode can be reused, a file edited in
    place). Dependencies keep their mtime, which any write moves: `cola dvc-commit` may relink
    an upstream output (a new inode) and puts its mtime back."""
    repo = Path(repo)

    def identity(path: str) -> list[object]:
        st = (repo / path).stat()
        return [
            path,
            st.st_size,
            digest.file_digest(repo / path, "md5") if outputs else st.st_mtime_ns,
        ]

    ignored = _ignored(repo)
    out: dict[str, str | None] = {}
    for rel in paths:
        root = repo / rel
        if root.is_file():
            out[rel] = digest.json_digest(identity(rel))
        elif root.is_dir():
            entries = []
            for dirpath, dirnames, filenames in os.walk(root):
                base = Path(dirpath).relative_to(repo)
                dirnames[:] = sorted(
                    d for d in dirnames if not ignored.match_file(f"{(base / d).as_posix()}/")
                )
                for name in sorted(filenames):
                    path = (base / name).as_posix()
                    if not ignored.match_file(path):
                        entries.append(identity(path))
            out[rel] = digest.json_digest(entries)
        else:
            out[rel] = None
    return out


def path_for(addressing: str, repo: Path = Path(".")) -> Path:
    return Path(repo) / RECORDS / f"{addressing}.json"


def write(
    addressing: str,
    params: dict[str, Any],
    deps_at_start: dict[str, str | None],
    deps: list[str],
    outs: list[str],
    repo: Path = Path("."),
) -> bool:
    """Record a finished job, unless a dependency changed while it ran (then False)."""
    if state(deps, repo) != deps_at_start:
        return False
    record = {"params": params, "deps": deps_at_start, "outs": state(outs, repo, outputs=True)}
    fsutil.write_json(path_for(addressing, repo), record)
    return True


def mismatch(
    addressing: str,
    params: dict[str, Any],
    deps: list[str],
    outs: list[str],
    repo: Path = Path("."),
) -> str | None:
    """Why the outputs in the checkout are not known to be built from these params and deps
    (None when they are): no record, or what differs from it."""
    path = path_for(addressing, repo)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return "no build record (not built by its `cola` command in this checkout)"
    if record.get("params") != params:
        old = record.get("params") or {}
        keys = sorted(k for k in {*old, *params} if old.get(k, ...) != params.get(k, ...))
        return f"built with other values of {', '.join(keys)}"
    for kind, paths in (("deps", deps), ("outs", outs)):
        now, then = state(paths, repo, outputs=kind == "outs"), record.get(kind) or {}
        if now != then:
            changed = sorted(p for p in {*now, *then} if now.get(p, "") != then.get(p, ""))
            what = "inputs" if kind == "deps" else "outputs"
            return f"{what} changed since it was built: {', '.join(changed)}"
    return None
