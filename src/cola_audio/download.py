"""`cola download`: put the FMA release (real or embedded) under data/raw in the release's layout.

Real archives are large (up to 93 GiB) and the server is far away, so a transfer resumes with HTTP
Range after an interruption, retries with backoff, and only gets its final name once its SHA1
matches the official sum. The archives live in data/downloads/, outside the stage's declared output:
Snakemake removes data/raw when the job fails and both tools before they rerun it, and neither must
take verified archives or a `.part` file with it (DVC does not cache them either). Extraction
refuses members that would escape the target folder or sit under another top folder than the
archive's name promises, and checks every file against the archive's own `checksums` file before
the folder appears under its final name.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from cola_audio import digest, fma, folder, fsutil, synthetic
from cola_audio.errors import InputError

log = logging.getLogger(__name__)
CHUNK = 1 << 20
ARCHIVE_DIR = Path("data/downloads")  # the download cache: no stage's output, so never deleted


class DownloadError(InputError, RuntimeError):
    """A transfer that cannot complete: the message names the URL and what to do."""


class ChecksumError(DownloadError):
    """Bytes on disk differ from the official SHA1."""


class UnsafeArchiveError(DownloadError):
    """A zip member would land outside the extraction folder (zip-slip)."""


def _move_aside(path: Path, why: str) -> Path:
    aside = path.with_name(f"{path.name}.{why}")
    os.replace(path, aside)
    return aside


def _transfer(url: str, part: Path, timeout_s: float) -> None:
    """One attempt: append to `part` from its current size; raise on anything short of complete."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left past our offset: the part is complete
            return
        raise
    with response:
        resumed = response.status == 206
        if offset and not resumed:  # server ignored Range: start over rather than duplicate bytes
            offset = 0
        expected = response.headers.get("Content-Length")
        received = 0
        with open(part, "ab" if resumed else "wb") as fh:
            while chunk := response.read(CHUNK):
                fh.write(chunk)
                received += len(chunk)
        if expected is not None and received < int(expected):
            raise http.client.IncompleteRead(b"", int(expected) - received)


def fetch(
    url: str,
    dest: Path,
    sha1: str,
    retries: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> Path:
    """Download `url` to `dest`, verified. Partial bytes live in `dest.part` until verified."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if digest.file_digest(dest, "sha1") == sha1:
            log.info("%s: already present and verified", dest)
            return dest
        aside = _move_aside(dest, "sha1-mismatch")
        log.warning("%s: existing file fails its SHA1; moved to %s, downloading again", dest, aside)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout_s)
            break
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410, 401, 403):
                raise DownloadError(
                    f"{url}: HTTP {exc.code} {exc.reason}. Check download.base_url in params.yaml "
                    "and the archive name."
                ) from exc
            error: Exception = exc
        except (OSError, http.client.HTTPException) as exc:
            error = exc
        if attempt == retries:
            raise DownloadError(
                f"{url}: failed after {retries + 1} attempts ({error}). The partial download is "
                f"kept in {part}; rerun `cola download` to resume it."
            ) from error
        wait = backoff_s * 2**attempt
        log.warning(
            "%s: %s; retrying in %.1f s (attempt %d/%d)", url, error, wait, attempt + 1, retries
        )
        time.sleep(wait)
    got = digest.file_digest(part, "sha1")
    if got != sha1:
        aside = _move_aside(part, "sha1-mismatch")
        raise ChecksumError(
            f"{url}: SHA1 {got} differs from the expected {sha1}; the bytes were moved to {aside}. "
            "Delete it and rerun, or fix data.fma.sha1 if the release changed."
        )
    os.replace(part, dest)
    return dest


def _safe_member(name: str, archive: Path) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would be written outside the extraction folder; refusing "
            "the archive. Delete it and download it again from the official source."
        )
    return path


def extract(archive: Path, root: Path) -> Path:
    """Extract `archive` (its one top folder is its name: fma_small.zip → fma_small/) under
    `root`, verified, atomically."""
    archive, root = Path(archive), Path(root)
    expected = archive.name.removesuffix(".zip")
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DownloadError(
            f"{archive}: not a readable zip ({exc}); it is truncated or corrupt. Delete it "
            "and rerun `cola download`."
        ) from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        paths = [_safe_member(m.filename, archive) for m in members]
        tops = {p.parts[0] for p in paths}
        if len(tops) != 1:
            raise DownloadError(f"{archive}: expected one top-level folder, found {sorted(tops)}")
        top = tops.pop()
        if top != expected:
            raise UnsafeArchiveError(
                f"{archive}: its files sit under {top}/, not {expected}/ as the archive name "
                "promises; refusing it (nothing was removed). Delete it and download it again."
            )
        staging = root / f".{top}.extracting"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            for member, rel in zip(members, paths, strict=True):
                target = staging.joinpath(*rel.parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
        except (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise DownloadError(
                f"{archive}: extraction failed ({exc}); the archive is truncated or corrupt. "
                "Delete it and rerun `cola download`."
            ) from exc
    verify_folder(staging, label=f"{archive}")
    final = root / top
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    return final


def verify_folder(folder: Path, label: str | None = None) -> int:
    """Check every file listed in `folder/checksums`; return how many were checked."""
    sums_path = folder / "checksums"
    label = label or str(folder)
    if not sums_path.is_file():
        raise DownloadError(f"{label}: no `checksums` file inside; cannot verify the extraction")
    sums = fma.read_checksums(sums_path)
    bad = []
    for rel, expected in sorted(sums.items()):
        path = folder / rel
        if not path.is_file():
            bad.append(f"{rel} (missing)")
        elif digest.file_digest(path, "sha1") != expected:
            bad.append(f"{rel} (SHA1 mismatch)")
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ChecksumError(
            f"{label}: {len(bad)} file(s) fail the archive's checksums: {shown}. Delete the "
            "archive and download it again."
        )
    return len(sums)


def archive_names(data: dict[str, Any]) -> list[str]:
    """Metadata plus the fine-tuning and pretraining audio archives, without duplicates."""
    names = [
        "fma_metadata.zip",
        f"fma_{data['finetune_subset']}.zip",
        f"fma_{data['pretrain_subset']}.zip",
    ]
    return list(dict.fromkeys(names))


def download_fma(
    data: dict[str, Any],
    transport: dict[str, Any],
    raw_dir: Path = fma.RAW_DIR,
    archive_dir: Path = ARCHIVE_DIR,
) -> list[Path]:
    """Fetch (or reuse, once verified) each archive into `archive_dir`; extract it to `raw_dir`."""
    folders = []
    for name in archive_names(data):
        if name not in data["fma"]["sha1"]:
            raise DownloadError(f"data.fma.sha1 has no entry for {name}; add its official SHA1")
        url = transport["base_url"].rstrip("/") + "/" + name
        archive = fetch(
            url,
            Path(archive_dir) / name,
            data["fma"]["sha1"][name],
            transport["retries"],
            transport["backoff_s"],
            transport["timeout_s"],
        )
        folders.append(extract(archive, Path(raw_dir)))
    return folders


def run(
    params: dict[str, Any], raw_dir: Path = fma.RAW_DIR, archive_dir: Path = ARCHIVE_DIR
) -> None:
    data, raw_dir = params["data"], Path(raw_dir)
    if data["source"] == "synthetic":
        subsets = [data["finetune_subset"], data["pretrain_subset"]]
        workers = params["features"]["workers"]
        counts = synthetic.generate(data["synthetic"], raw_dir, subsets, workers)
        log.info("embedded dataset written to %s: %s", raw_dir, counts)
    elif data["source"] == "folder":
        table = folder.index(data["folder"], raw_dir)
        log.info(
            "indexed %d files (%s) into %s",
            len(table),
            ", ".join(f"{s} {n}" for s, n in table["split"].value_counts().sort_index().items()),
            raw_dir / folder.INDEX,
        )
    else:
        folders = download_fma(data, params["download"], raw_dir, archive_dir)
        log.info("FMA archives verified and extracted: %s", ", ".join(map(str, folders)))
    fsutil.write_json(raw_dir / "SOURCE.json", {"source": data["source"]})
