"""`cola download`: put the FMA release (real or embedded) under data/raw in the release's layout,
and the SHA1 of every file there in data/raw.sha1sums (what the stages reading the audio depend on).

Real archives are large (up to 93 GiB) and the server is far away, so a transfer resumes with HTTP
Range after an interruption, retries with backoff, and only gets its final name once its SHA1
matches the official sum. The archives live in data/downloads/, outside the stage's declared output:
Snakemake removes data/raw when the job fails and both tools before they rerun it, and neither must
take verified archives or a `.part` file with it (DVC does not cache them either). A resumed
response is used only where its Content-Range starts at or before the bytes we hold.

Extraction refuses, before it writes anything: members that would escape the target folder or sit
under another top folder than the archive's name promises, symlinks and other non-regular files,
names given twice, members compressed with a method or encrypted in a way zipfile cannot read, a
member whose declared size is over MAX_RATIO times its compressed size (a zip
bomb), an archive whose declared sizes exceed the free space, and a `checksums` file that does not
list exactly the archive's files (only README.txt and checksums itself go unlisted, as in the
release). Each file's SHA1 is checked as it streams out, and the folder appears under its final name
only when all match; on any failure the staging folder is removed. An earlier extraction there is
renamed aside first and deleted only once the new folder is in place, so a delete that fails partway
never leaves a mix of the two.
"""

from __future__ import annotations

import errno
import http.client
import io
import logging
import lzma
import os
import re
import shutil
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

from cola_audio import digest, fma, folder, fsutil, synthetic
from cola_audio.errors import InputError

log = logging.getLogger(__name__)
CHUNK = 1 << 20
ARCHIVE_DIR = Path("data/downloads")  # the download cache: no stage's output, so never deleted
MAX_RATIO = 200  # declared size / compressed size; the release's MP3s are ~1:1, its CSVs ~10:1
BOMB_MIN_SIZE = 1 << 20  # smaller members may compress better (a short README) without harm
UNLISTED = {"README.txt", "checksums"}  # the only members the release's checksums do not list
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
URL_SCHEMES = ("http", "https", "file")
# What zipfile can decompress; the release uses BZIP2. Other methods are named when refused.
READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
METHOD_NAMES = {
    6: "Implode",
    9: "Deflate64",
    10: "PKWARE DCL",
    93: "Zstandard",
    95: "XZ",
    98: "PPMd",
}
ENCRYPTED = 0x1  # general purpose flag bit 0
# What a corrupt member raises from zipfile's decompressors, besides OSError (bz2) and EOFError.
CORRUPT = (zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile, lzma.LZMAError, zlib.error)


class DownloadError(InputError, RuntimeError):
    """A transfer that cannot complete: the message names the URL and what to do."""


class ChecksumError(DownloadError):
    """Bytes on disk differ from the official SHA1."""


class UnsafeArchiveError(DownloadError):
    """A zip member extraction must not write: zip-slip, a symlink, a duplicate, a zip bomb."""


class ListingError(ChecksumError):
    """The archive's `checksums` file does not list exactly its members, so some go unverified."""


class NoSpaceError(DownloadError):
    """The extraction does not fit on its file system; the verified archive is kept."""


class _BadRange(http.client.HTTPException):
    """A 206 whose Content-Range we cannot append: `fetch` retries it from byte 0."""


def _move_aside(path: Path, why: str) -> Path:
    aside = path.with_name(f"{path.name}.{why}")
    os.replace(path, aside)
    return aside


def _start_byte(response: http.client.HTTPResponse, offset: int) -> int:
    """Where the body starts in the file: 0 on a 200 (the server ignored Range); on a 206 the
    first byte of its Content-Range, if at or before `offset`. One that starts later, or has no
    readable Content-Range, would append garbage that fails the SHA1 and wastes the transfer."""
    if response.status != 206:
        return 0
    header = response.headers.get("Content-Range")
    match = _CONTENT_RANGE.fullmatch((header or "").strip())
    if match and int(match[1]) <= offset:
        return int(match[1])
    raise _BadRange(
        f"a resumed response for bytes from {offset} carries Content-Range {header!r}; "
        "discarding the partial download to start over from byte 0"
    )


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
        try:
            start = _start_byte(response, offset)
        except _BadRange:
            part.write_bytes(b"")  # the retry starts over from byte 0
            raise
        expected = response.headers.get("Content-Length")
        received = 0
        with open(part, "ab") as fh:
            fh.truncate(start)  # drop what the server sends again (everything on a 200)
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
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise DownloadError(
            f"{url}: download.base_url must be an http://, https:// or file:// URL "
            f"(the scheme here is {scheme or 'missing'!r}); fix it in params.yaml"
        )
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
            held = part.stat().st_size if part.exists() else 0
            kept = (
                f"The partial download ({_size(held)}) is kept in {part}; rerun `cola download` "
                "to resume it."
                if held
                else "Nothing was downloaded; check the network and download.base_url, then rerun "
                "`cola download`."
            )
            raise DownloadError(
                f"{url}: failed after {retries + 1} attempts ({error}). {kept}"
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


def _refusal(archive: Path, problem: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"{archive}: {problem}; refusing the archive (nothing was written). Delete it and "
        "download it again from the official source."
    )


def _safe_member(info: zipfile.ZipInfo, archive: Path) -> PurePosixPath:
    """The member's path, refused where writing it could land outside its folder or not be a
    plain file: the release holds only regular files under one top folder."""
    name, path = info.filename, PurePosixPath(info.filename)
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise _refusal(archive, f"member {name!r} would be written outside the extraction folder")
    if len(path.parts) < 2:
        raise _refusal(archive, f"member {name!r} sits outside the archive's top folder")
    mode = info.external_attr >> 16  # unix st_mode where the zip was made on unix, else 0
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        kind = "symlink" if stat.S_ISLNK(mode) else "special file"
        raise _refusal(archive, f"member {name!r} is a {kind}, not a regular file")
    return path


def _check_readable(files: dict[str, zipfile.ZipInfo], archive: Path) -> None:
    """Refuse, before a byte is written, members zipfile cannot decompress (Deflate64 and others
    raise NotImplementedError mid-extraction) or that are encrypted (RuntimeError)."""
    encrypted = [rel for rel, info in sorted(files.items()) if info.flag_bits & ENCRYPTED]
    unreadable = [
        f"{rel} ({METHOD_NAMES.get(info.compress_type, f'method {info.compress_type}')})"
        for rel, info in sorted(files.items())
        if info.compress_type not in READABLE_METHODS and rel not in encrypted
    ]
    if encrypted or unreadable:
        what = " and ".join(
            kind
            for kind, found in (("a compression method", unreadable), ("encryption", encrypted))
            if found
        )
        named = [f"{rel} (encrypted)" for rel in encrypted] + unreadable
        raise DownloadError(
            f"{archive}: {len(named)} member(s) use {what} this Python's zipfile cannot read "
            f"({_examples(named)}); it is not the official release (nothing was written). Delete "
            "it and download it again from the official source."
        )


def _members(zf: zipfile.ZipFile, archive: Path) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """The top folder and the files by their path under it. A name given twice (also as `a//b`
    or `a/./b`) is refused: zipfile would silently keep the last one."""
    files: dict[PurePosixPath, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        if info.is_dir():
            continue
        path = _safe_member(info, archive)
        if path in files:
            raise _refusal(archive, f"member {path.as_posix()!r} appears more than once")
        if any(part != part.strip() for part in path.parts):
            raise _refusal(
                archive, f"member {info.filename!r} has a name beginning or ending in a space"
            )
        files[path] = info
    if clash := next((p for p in files for q in p.parents if q in files), None):
        folder = next(q for q in clash.parents if q in files)
        raise _refusal(
            archive,
            f"member {folder.as_posix()!r} is a file and the folder of {clash.as_posix()!r}",
        )
    tops, expected = {p.parts[0] for p in files}, archive.name.removesuffix(".zip")
    if len(tops) != 1:
        raise DownloadError(f"{archive}: expected one top-level folder, found {sorted(tops)}")
    top = tops.pop()
    if top != expected:
        raise UnsafeArchiveError(
            f"{archive}: its files sit under {top}/, not {expected}/ as the archive name "
            "promises; refusing it (nothing was removed). Delete it and download it again."
        )
    return top, {PurePosixPath(*p.parts[1:]).as_posix(): info for p, info in files.items()}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _free_bytes(root: Path) -> int:
    """Free space on the file system that will hold `root`, which may not exist yet."""
    probe = root.absolute()
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _check_sizes(files: dict[str, zipfile.ZipInfo], archive: Path, root: Path) -> None:
    """Refuse a zip bomb, or an archive that cannot fit, from the declared sizes alone, before a
    byte is written. zipfile never returns more than a member declares (it stops at `file_size`
    and checks the CRC), so the declared sizes bound what extraction writes."""
    for info in files.values():
        if info.file_size > BOMB_MIN_SIZE and info.file_size > MAX_RATIO * info.compress_size:
            raise _refusal(
                archive,
                f"member {info.filename!r} declares {_size(info.file_size)} from "
                f"{_size(info.compress_size)} (over {MAX_RATIO}:1, while the release's files "
                "compress about 10:1 at most); it is likely a zip bomb",
            )
    need, free = sum(info.file_size for info in files.values()), _free_bytes(root)
    if need > free:
        raise NoSpaceError(
            f"{archive}: extracting it needs {_size(need)}, {_size(free)} free at {root}. The "
            "verified archive is kept; free space there and rerun `cola download`."
        )


def _examples(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _corrupt(archive: Path, exc: BaseException) -> DownloadError:
    return DownloadError(
        f"{archive}: extraction failed ({exc}); the archive is truncated or corrupt. Delete it "
        "and rerun `cola download`."
    )


def _read_sums(
    zf: zipfile.ZipFile, files: dict[str, zipfile.ZipInfo], archive: Path
) -> dict[str, str]:
    """The archive's own `checksums` ({path under the top folder: sha1}), read from the zip so
    that a bad listing is refused before anything is written."""
    if "checksums" not in files:
        raise ListingError(
            f"{archive}: no `checksums` file inside, so it cannot be verified. Delete the archive "
            "and download it again."
        )
    sums: dict[str, str] = {}
    with zf.open(files["checksums"]) as raw:
        for lineno, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8"), 1):
            if not line.strip():
                continue
            sha1, sep, name = line.rstrip("\n").partition("  ")
            if not sep or len(sha1) != 40:
                raise ListingError(
                    f"{archive}: checksums line {lineno} is not a `sha1  path` line: {line!r}. "
                    "Delete the archive and download it again."
                )
            sums[PurePosixPath(name.strip()).as_posix()] = sha1.lower()
    return sums


def _check_listing(files: dict[str, zipfile.ZipInfo], sums: dict[str, str], archive: Path) -> None:
    """Every file extracted is one the checksums vouch for, and every one they list is there."""
    unlisted = sorted(set(files) - set(sums) - UNLISTED)
    absent = sorted(set(sums) - set(files))
    problems = [] if sums else ["its checksums file lists no files"]
    if absent:
        absent = [repr(name) for name in absent]  # quoted: a stray space shows
        problems.append(f"{len(absent)} listed file(s) are absent from it ({_examples(absent)})")
    if unlisted:
        problems.append(
            f"{len(unlisted)} member(s) are not in its checksums "
            f"({_examples([repr(name) for name in unlisted])})"
        )
    if problems:
        raise ListingError(
            f"{archive}: {'; '.join(problems)}. Its checksums file must list every member; the "
            "archive is incomplete or not the official release (nothing was written). Delete the "
            "archive and download it again."
        )


def _write_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> str:
    """Copy one member out, hashing as it goes, so no file is read twice; return its SHA1."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(target, "wb") as dst:
        return digest.copy_digest(src, dst, "sha1")


def _write_error(exc: Exception, archive: Path, staging: Path) -> DownloadError:
    """Name the real cause: a full disk or a locked folder is no reason to delete the archive."""
    errno_ = getattr(exc, "errno", None)
    if errno_ in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(
            f"{archive}: no space left on device while extracting to {staging}. The verified "
            "archive is kept; free space there and rerun `cola download`."
        )
    if errno_ in (errno.EACCES, errno.EPERM):
        return DownloadError(
            f"{archive}: permission denied writing {getattr(exc, 'filename', None) or staging}. "
            "The verified archive is kept; make that folder writable and rerun `cola download`."
        )
    if isinstance(exc, OSError) and exc.filename:  # a local file operation, not the zip's data
        return DownloadError(
            f"{archive}: could not write {exc.filename} ({exc.strerror}). The verified archive is "
            "kept; fix that and rerun `cola download`."
        )
    return _corrupt(archive, exc)


def _extract_verified(
    zf: zipfile.ZipFile,
    files: dict[str, zipfile.ZipInfo],
    sums: dict[str, str],
    archive: Path,
    staging: Path,
) -> None:
    """Write every member under `staging`, each checked against `sums` as it streams out."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        got = {rel: _write_member(zf, info, staging / rel) for rel, info in files.items()}
    except CORRUPT as exc:
        raise _write_error(exc, archive, staging) from exc
    bad = [f"{rel} (SHA1 mismatch)" for rel, want in sorted(sums.items()) if got[rel] != want]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ChecksumError(
            f"{archive}: {len(bad)} file(s) fail the archive's checksums: {shown}. Delete the "
            "archive and download it again."
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _install(staging: Path, final: Path, aside: Path, archive: Path) -> None:
    """Put the verified `staging` folder in `final`'s place. An earlier extraction there is
    renamed to `aside` first (atomic on one file system) and deleted only once the new folder is
    in place: a delete that fails partway (a file another user owns, EBUSY on NFS) then leaves
    `final` complete. If the new folder cannot be moved in, the old one goes back."""
    if not final.exists() and not final.is_symlink():
        os.replace(staging, final)
        return
    try:
        if aside.exists() or aside.is_symlink():
            _remove(aside)  # left by an earlier run whose delete failed
        os.replace(final, aside)
    except OSError as exc:
        raise DownloadError(
            f"{archive}: could not move the earlier extraction {final} aside to {aside} ({exc}); "
            f"{final} is unchanged and the verified archive is kept. Remove {aside} (and {final} "
            "if you no longer want it) and rerun `cola download`."
        ) from exc
    try:
        os.replace(staging, final)
    except BaseException as exc:
        os.replace(aside, final)
        if isinstance(exc, OSError):
            raise DownloadError(
                f"{archive}: could not move the verified extraction into {final} ({exc}); the "
                f"earlier extraction is back in {final} and the archive is kept. Fix that and "
                "rerun `cola download`."
            ) from exc
        raise
    try:
        _remove(aside)
    except OSError as exc:
        log.warning(
            "%s is complete, but the earlier extraction moved aside to %s could not be deleted "
            "(%s); delete %s by hand",
            final,
            aside,
            exc,
            aside,
        )


def extract(archive: Path, root: Path) -> Path:
    """Extract `archive` (its one top folder is its name: fma_small.zip → fma_small/) under
    `root`, verified, atomically: its staging folder goes on any failure, Ctrl-C included."""
    archive, root = Path(archive), Path(root)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DownloadError(
            f"{archive}: not a readable zip ({exc}); it is truncated or corrupt. Delete it "
            "and rerun `cola download`."
        ) from exc
    with zf:
        top, files = _members(zf, archive)
        _check_readable(files, archive)
        _check_sizes(files, archive, root)
        try:
            sums = _read_sums(zf, files, archive)
        except (*CORRUPT, UnicodeDecodeError) as exc:
            raise _corrupt(archive, exc) from exc
        _check_listing(files, sums, archive)
        staging, final = root / f".{top}.extracting", root / top
        try:
            _extract_verified(zf, files, sums, archive, staging)
            _install(staging, final, root / f".{top}.old", archive)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


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
    write_manifest(raw_dir)


def manifest_path(raw_dir: Path) -> Path:
    """data/raw → data/raw.sha1sums, beside the folder it lists."""
    return Path(raw_dir).with_name(f"{Path(raw_dir).name}.sha1sums")


def write_manifest(raw_dir: Path) -> Path:
    """`sha1  path` of every file under `raw_dir`, sorted, as `sha1sum` writes them (check with
    `cd data/raw && sha1sum -c ../raw.sha1sums`): the one file the stages reading the audio
    depend on, in both tools. DVC hashes a folder dependency anew for every stage declaring it, so
    `dvc status` grew with files × stages (a 30,000-file data/raw behind 6 stages: 9.5 s; behind
    32 shards at fma_large scale it would be minutes: benchmarks/scale.py, docs/storage.md).
    data/raw is download's output and nothing else writes there, so its bytes change only when
    download reruns, and download rewrites this list each time; edited by hand, data/raw shows
    as download's changed output and a rerun puts the verified bytes back."""
    raw_dir = Path(raw_dir)
    files = sorted(p for p in raw_dir.rglob("*") if p.is_file())
    lines = [f"{digest.file_digest(p)}  {p.relative_to(raw_dir).as_posix()}\n" for p in files]
    path = manifest_path(raw_dir)
    fsutil.write_text(path, "".join(lines))
    return path
