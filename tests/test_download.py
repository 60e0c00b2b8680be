"""The real-archive path, offline: a loopback server serves archives built in the real layout."""

from __future__ import annotations

import errno
import hashlib
import http.server
import io
import logging
import os
import random
import re
import shutil
import socket
import stat
import subprocess
import threading
import types
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from cola_audio import download


class ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves `files` with Range support; `cut_first` names files whose first transfer breaks,
    `range_fault` files whose ranged replies are broken (see `_ranged_reply`)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.cut_first: set[str] = set()
        self.range_fault: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ArchiveServer

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        self.server.requests.append((name, rng))
        if name not in self.server.files:
            self.send_error(404, "Not Found")
            return
        data = self.server.files[name]
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if start >= len(data):
            self.send_error(416, "Range Not Satisfiable")
            return
        first, content_range = (
            _ranged_reply(self.server.range_fault.get(name), start, len(data)) if rng else (0, None)
        )
        body = data[first:]
        self.send_response(206 if rng else 200)
        if content_range is not None:
            self.send_header("Content-Range", content_range)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.server.cut_first:
            self.server.cut_first.discard(name)
            self.wfile.write(body[: len(body) // 2])  # then the connection drops
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


def _ranged_reply(fault: str | None, start: int, size: int) -> tuple[int, str | None]:
    """(first byte sent, Content-Range) for a Range request from `start`: honest, unless `fault`
    names a broken server or proxy: one that answers from later ("ahead") or earlier ("behind")
    with a true header, or sends everything as a 206 with no ("missing") or a "garbled" header;
    "star" is honest with an unknown total (`/*`)."""
    first = {"ahead": start + 1000, "behind": start - 1000, "missing": 0, "garbled": 0}
    sent = first.get(fault or "", start)
    headers = {
        "missing": None,
        "garbled": "bytes lots-of/nonsense",
        "star": f"bytes {sent}-{size - 1}/*",
    }
    return sent, headers.get(fault or "", f"bytes {sent}-{size - 1}/{size}")


@pytest.fixture
def server():
    srv = ArchiveServer({})
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def make_zip(
    top: str,
    files: dict[str, bytes],
    checksums: dict[str, str] | None = None,
    extra_members: dict[str | zipfile.ZipInfo, bytes] | None = None,
) -> bytes:
    """A BZIP2 zip like the release: `top/README.txt`, `top/checksums`, `top/<files>`."""
    import io

    sums = (
        checksums
        if checksums is not None
        else {name: hashlib.sha1(data).hexdigest() for name, data in files.items()}
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_BZIP2) as zf:
        zf.writestr(f"{top}/README.txt", "This .zip archive is part of the FMA.\n")
        zf.writestr(f"{top}/checksums", "".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))
        for name, data in sorted(files.items()):
            zf.writestr(f"{top}/{name}", data)
        for name, data in (extra_members or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def fast(**kw):
    return {"retries": 3, "backoff_s": 0.01, "timeout_s": 5.0, **kw}


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    blob = bytes(range(256)) * 5000
    server.files["fma_small.zip"] = blob
    server.cut_first.add("fma_small.zip")
    dest = tmp_path / "fma_small.zip"
    download.fetch(server.url + "fma_small.zip", dest, sha1(blob), **fast())
    assert dest.read_bytes() == blob
    assert not dest.with_name("fma_small.zip.part").exists()
    ranges = [r for name, r in server.requests if name == "fma_small.zip"]
    assert ranges[0] is None and ranges[1] == f"bytes={len(blob) // 2}-"


def test_partial_download_never_sits_under_the_final_name(server, tmp_path):
    blob = b"x" * 100_000
    server.files["a.zip"] = blob
    server.cut_first.add("a.zip")
    dest = tmp_path / "a.zip"
    with pytest.raises(download.DownloadError, match="resume"):
        download.fetch(server.url + "a.zip", dest, sha1(blob), **fast(retries=0))
    assert not dest.exists()
    assert dest.with_name("a.zip.part").stat().st_size == len(blob) // 2
    download.fetch(server.url + "a.zip", dest, sha1(blob), **fast(retries=0))  # resumes
    assert dest.read_bytes() == blob
    assert server.requests[-1] == ("a.zip", f"bytes={len(blob) // 2}-")


def test_wrong_checksum_is_an_error_and_the_file_is_moved_aside(server, tmp_path):
    server.files["fma_small.zip"] = b"not what the release holds"
    dest = tmp_path / "fma_small.zip"
    with pytest.raises(download.ChecksumError, match="differs from the expected 0000") as info:
        download.fetch(server.url + "fma_small.zip", dest, "0" * 40, **fast())
    assert "fma_small.zip.part.sha1-mismatch" in str(info.value)
    assert not dest.exists()
    assert (tmp_path / "fma_small.zip.part.sha1-mismatch").is_file()


def test_missing_url_is_a_clear_error_without_retries(server, tmp_path):
    with pytest.raises(download.DownloadError, match=r"nope.zip: HTTP 404.*download.base_url"):
        download.fetch(server.url + "nope.zip", tmp_path / "nope.zip", "0" * 40, **fast())
    assert len(server.requests) == 1


def test_truncated_zip_is_refused(tmp_path):
    blob = make_zip("fma_small", {"000/000002.mp3": b"a" * 5000, "000/000005.mp3": b"b" * 5000})
    archive = tmp_path / "fma_small.zip"
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(download.DownloadError, match="truncated or corrupt"):
        download.extract(archive, tmp_path / "raw")
    assert not (tmp_path / "raw" / "fma_small").exists()


@pytest.mark.parametrize("evil", ["../evil.txt", "/abs/evil.txt", "fma_small/../../evil.txt"])
def test_zip_slip_member_is_refused(tmp_path, evil):
    blob = make_zip("fma_small", {"000/000002.mp3": b"a"}, extra_members={evil: b"pwned"})
    archive = tmp_path / "fma_small.zip"
    archive.write_bytes(blob)
    with pytest.raises(download.UnsafeArchiveError, match="outside the extraction folder"):
        download.extract(archive, tmp_path / "raw")
    assert not list(tmp_path.rglob("evil.txt"))


def test_archive_whose_top_folder_is_not_its_name_is_refused_before_anything_is_removed(tmp_path):
    """A correct-SHA1 fma_small.zip whose files sit under fma_metadata/ must not replace (rmtree)
    the fma_metadata folder already extracted."""
    raw = tmp_path / "raw"
    (raw / "fma_metadata").mkdir(parents=True)
    (raw / "fma_metadata" / "tracks.csv").write_text("keep me")
    archive = tmp_path / "fma_small.zip"
    archive.write_bytes(make_zip("fma_metadata", {"tracks.csv": b"other"}))
    with pytest.raises(download.UnsafeArchiveError, match=r"under fma_metadata/, not fma_small/"):
        download.extract(archive, raw)
    assert (raw / "fma_metadata" / "tracks.csv").read_text() == "keep me"


def test_member_failing_the_archive_checksums_is_named(tmp_path):
    files = {"000/000002.mp3": b"a" * 10, "000/000005.mp3": b"b" * 10}
    sums = {name: sha1(data) for name, data in files.items()}
    sums["000/000005.mp3"] = "f" * 40
    archive = tmp_path / "fma_small.zip"
    archive.write_bytes(make_zip("fma_small", files, checksums=sums))
    with pytest.raises(download.ChecksumError, match=r"000/000005.mp3 \(SHA1 mismatch\)"):
        download.extract(archive, tmp_path / "raw")
    assert not (tmp_path / "raw" / "fma_small").exists()


@pytest.mark.parametrize(
    ("fault", "starts_over"),
    [("ahead", True), ("missing", True), ("garbled", True), ("behind", False), ("star", False)],
)
def test_resumed_bytes_are_placed_where_content_range_says_or_the_transfer_starts_over(
    server, tmp_path, caplog, fault, starts_over
):
    """A 206 from before our offset overwrites the overlap; one from after it, or without a
    readable Content-Range, is not used: the part is emptied and the retry fetches from byte 0."""
    blob = bytes(range(256)) * 5000
    server.files["fma_small.zip"] = blob
    server.cut_first.add("fma_small.zip")
    server.range_fault["fma_small.zip"] = fault
    dest = tmp_path / "fma_small.zip"
    with caplog.at_level(logging.WARNING, logger="cola_audio.download"):
        download.fetch(server.url + "fma_small.zip", dest, sha1(blob), **fast())  # SHA1-checked
    assert dest.read_bytes() == blob
    ranges = [r for _, r in server.requests]
    assert ranges == [None, f"bytes={len(blob) // 2}-"] + ([None] if starts_over else [])
    assert ("start over from byte 0" in caplog.text) == starts_over


MP3S = {"000/000002.mp3": b"a" * 5000, "000/000005.mp3": b"b" * 5000}
SUMS = {name: sha1(data) for name, data in MP3S.items()}


def noise(size: int) -> bytes:
    """Incompressible bytes, as MP3 frames nearly are."""
    return random.Random(size).randbytes(size)


def write_archive(tmp_path: Path, blob: bytes) -> Path:
    archive = tmp_path / "fma_small.zip"
    archive.write_bytes(blob)
    return archive


@pytest.mark.parametrize(
    ("sums", "extra", "named"),
    [
        pytest.param({}, {}, "lists no files", id="empty-checksums"),
        pytest.param(
            {"000/000002.mp3": SUMS["000/000002.mp3"]}, {}, "000/000005.mp3", id="unlisted"
        ),
        pytest.param({**SUMS, "000/000010.mp3": "0" * 40}, {}, "000/000010.mp3", id="absent"),
        pytest.param(
            SUMS, {"fma_small/000/README.txt": b"x"}, "000/README.txt", id="readme-deeper"
        ),
        pytest.param(
            SUMS,
            {f"fma_small/extra/{i}.txt": b"x" for i in range(8)},
            "8 member(s) are not in its checksums ('extra/0.txt', 'extra/1.txt', 'extra/2.txt' "
            "and 5",
            id="many-unlisted",
        ),
    ],
)
def test_archive_whose_checksums_do_not_list_exactly_its_files_is_refused(
    tmp_path, sums, extra, named
):
    """Only top-level README.txt and checksums may go unlisted, as in the release; anything
    else unlisted would be extracted unverified."""
    archive = write_archive(tmp_path, make_zip("fma_small", MP3S, sums, extra_members=extra))
    with pytest.raises(download.DownloadError, match="must list every member") as info:
        download.extract(archive, tmp_path / "raw")
    assert isinstance(info.value, download.ListingError)
    assert str(archive) in str(info.value) and named in str(info.value)
    assert "Delete the archive and download it again" in str(info.value)
    assert not (tmp_path / "raw").exists()  # refused before anything was written


def symlink(name: str) -> zipfile.ZipInfo:
    """A member as `zip --symlinks` stores it on unix: S_IFLNK in the high bits, target as data."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize(
    ("member", "problem"),
    [
        pytest.param(symlink("fma_small/000/000009.mp3"), "is a symlink", id="symlink"),
        pytest.param("fma_small/000/000002.mp3", "appears more than once", id="duplicate"),
        pytest.param("fma_small/000//000002.mp3", "appears more than once", id="dup-slashes"),
        pytest.param("fma_small/./000/000002.mp3", "appears more than once", id="dup-dot"),
    ],
)
def test_symlink_or_duplicate_member_is_refused(tmp_path, member, problem):
    """Listed with the right SHA1, so only the member's kind or name gives it away: a symlink
    would be written as a regular file and a duplicate would silently replace the first."""
    data = b"/etc/passwd"
    name = member.filename if isinstance(member, zipfile.ZipInfo) else member
    sums = {**SUMS, PurePosixPath(name).relative_to("fma_small").as_posix(): sha1(data)}
    archive = write_archive(tmp_path, make_zip("fma_small", MP3S, sums, {member: data}))
    with pytest.raises(download.UnsafeArchiveError, match=problem):
        download.extract(archive, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    ("data", "refused"),
    [
        pytest.param(bytes(64 << 20), True, id="64MiB-of-zeros"),
        pytest.param(bytes(1 << 20), False, id="1MiB-of-zeros-under-the-ratio-floor"),
        pytest.param(noise(2 << 20), False, id="mp3-like-1-to-1"),
    ],
)
def test_zip_bomb_is_refused_before_anything_is_written(tmp_path, data, refused):
    archive = write_archive(tmp_path, make_zip("fma_small", {"000/000002.mp3": data}))
    if not refused:
        download.extract(archive, tmp_path / "raw")
        assert (tmp_path / "raw" / "fma_small" / "000" / "000002.mp3").read_bytes() == data
        return
    with pytest.raises(download.UnsafeArchiveError, match=r"64.0 MiB from .* likely a zip bomb"):
        download.extract(archive, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("short_by", [1, 0])
def test_archive_larger_than_the_free_space_is_refused_before_anything_is_written(
    tmp_path, monkeypatch, short_by
):
    archive = write_archive(tmp_path, make_zip("fma_small", MP3S))
    with zipfile.ZipFile(archive) as zf:
        need = sum(info.file_size for info in zf.infolist())
    probed = []

    def disk_usage(path):
        probed.append(Path(path))
        return types.SimpleNamespace(total=1 << 40, used=0, free=need - short_by)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    raw = tmp_path / "raw"
    if not short_by:
        assert download.extract(archive, raw) == raw / "fma_small"
        return
    free_at = (
        rf"needs 9.9 KiB, 9.9 KiB free at {re.escape(str(raw))}\. The verified archive is kept"
    )
    with pytest.raises(download.DownloadError, match=free_at) as info:
        download.extract(archive, raw)
    assert isinstance(info.value, download.NoSpaceError)
    assert probed == [tmp_path]  # raw does not exist yet: its nearest existing parent
    assert not raw.exists()


def declare_size(blob: bytes, size: int, name: bytes = b"fma_small/000/000002.mp3") -> bytes:
    """`blob` with `name`'s uncompressed size in the central directory (what zipfile trusts)
    set to `size`."""
    out = bytearray(blob)
    entry = out.index(b"PK\x01\x02")  # central-directory entries: name at +46, size at +24
    while out[entry + 46 : entry + 46 + len(name)] != name:
        entry = out.index(b"PK\x01\x02", entry + 4)
    out[entry + 24 : entry + 28] = size.to_bytes(4, "little")
    return bytes(out)


@pytest.mark.parametrize("declared", [2 << 20, 1])
def test_member_is_never_written_past_its_declared_size(tmp_path, monkeypatch, declared):
    """The central directory declares less than the member holds: zipfile stops at the declared
    size (then fails the CRC), so the free-space and bomb checks bound what is written."""
    blob = make_zip("fma_small", {"000/000002.mp3": noise(3 << 20)})
    archive = write_archive(tmp_path, declare_size(blob, declared))
    written: list[tuple[str, int]] = []
    record_writes(monkeypatch, written)
    with pytest.raises(download.DownloadError, match="truncated or corrupt"):
        download.extract(archive, tmp_path / "raw")
    assert sum(n for path, n in written if path.endswith("000002.mp3")) <= declared
    assert not list((tmp_path / "raw").iterdir())


class _BrokenFile:
    """A file opened for writing whose writes fail, or are logged to `log` when `exc` is None."""

    def __init__(self, fh, exc: BaseException | None, log: list | None = None) -> None:
        self.fh, self.exc, self.log = fh, exc, log

    def __enter__(self) -> _BrokenFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.fh.close()

    def write(self, data: bytes) -> int:
        if self.exc is not None:
            raise self.exc
        self.log.append((self.fh.name, len(data)))
        return self.fh.write(data)


def patch_open(monkeypatch, wrap) -> None:
    """Route the download module's open(…, "wb") through `wrap(fh, path)` (extraction writes
    members with the builtin open)."""
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return wrap(fh, path) if "w" in mode else fh

    monkeypatch.setattr(download, "open", fake_open, raising=False)


def record_writes(monkeypatch, log: list[tuple[str, int]]) -> None:
    patch_open(monkeypatch, lambda fh, path: _BrokenFile(fh, None, log))


def break_writes(monkeypatch, exc: BaseException) -> None:
    patch_open(monkeypatch, lambda fh, path: _BrokenFile(fh, exc))


def deny_opens(monkeypatch, code: int) -> None:
    def wrap(fh, path):
        fh.close()
        raise PermissionError(code, os.strerror(code), str(path))

    patch_open(monkeypatch, wrap)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.ENOSPC, "no space left on device while extracting to"),
        (errno.EDQUOT, "no space left on device while extracting to"),
        (errno.EACCES, "permission denied writing"),
        (errno.EPERM, "permission denied writing"),
    ],
)
def test_full_disk_or_locked_folder_keeps_the_archive_and_says_so(
    tmp_path, monkeypatch, code, message
):
    """Neither is the archive's fault: the message must not send the user to delete it."""
    archive = write_archive(tmp_path, make_zip("fma_small", MP3S))
    if code in (errno.ENOSPC, errno.EDQUOT):
        break_writes(monkeypatch, OSError(code, os.strerror(code)))  # write() has no filename
    else:
        deny_opens(monkeypatch, code)
    raw = tmp_path / "raw"
    with pytest.raises(download.DownloadError, match=message) as info:
        download.extract(archive, raw)
    text = str(info.value)
    assert str(raw / ".fma_small.extracting") in text and "archive is kept" in text
    assert "corrupt" not in text and "Delete" not in text
    assert archive.is_file() and not list(raw.iterdir())


@pytest.mark.parametrize(
    ("failure", "raised"),
    [("sha1-mismatch", download.ChecksumError), ("ctrl-c", KeyboardInterrupt)],
)
def test_staging_folder_goes_on_every_failure_and_the_old_folder_stays(
    tmp_path, monkeypatch, failure, raised
):
    raw = tmp_path / "raw"
    (raw / "fma_small").mkdir(parents=True)
    (raw / "fma_small" / "keep.txt").write_text("earlier extraction")
    sums = {**SUMS, "000/000005.mp3": "f" * 40} if failure == "sha1-mismatch" else SUMS
    archive = write_archive(tmp_path, make_zip("fma_small", MP3S, sums))
    if failure == "ctrl-c":
        break_writes(monkeypatch, KeyboardInterrupt())
    with pytest.raises(raised):
        download.extract(archive, raw)
    assert sorted(p.name for p in raw.iterdir()) == ["fma_small"]
    assert (raw / "fma_small" / "keep.txt").read_text() == "earlier extraction"


def test_download_fma_end_to_end(server, tmp_path, tiny_data, default_params):
    """Archives built from the embedded dataset, served over loopback, land in the same layout."""
    raw = tiny_data["raw"]

    def folder_zip(top: str) -> bytes:
        files = {
            p.relative_to(raw / top).as_posix(): p.read_bytes()
            for p in sorted((raw / top).rglob("*"))
            if p.is_file() and p.name not in ("checksums", "README.txt")
        }
        return make_zip(top, files)

    archives = {f"{top}.zip": folder_zip(top) for top in ("fma_metadata", "fma_small", "fma_large")}
    server.files.update(archives)
    data = dict(default_params["data"], source="fma")
    data["fma"] = {"sha1": {name: sha1(blob) for name, blob in archives.items()}}
    params = {**default_params, "data": data, "download": {"base_url": server.url, **fast()}}
    where = {"raw_dir": tmp_path / "raw", "archive_dir": tmp_path / "downloads"}
    download.run(params, **where)
    for top in ("fma_metadata", "fma_small", "fma_large"):
        ours = sorted(p.relative_to(raw / top) for p in (raw / top).rglob("*.mp3"))
        got = sorted(
            p.relative_to(tmp_path / "raw" / top) for p in (tmp_path / "raw" / top).rglob("*.mp3")
        )
        assert got == ours
    assert (tmp_path / "raw" / "fma_metadata" / "tracks.csv").read_bytes() == (
        raw / "fma_metadata" / "tracks.csv"
    ).read_bytes()
    before = len(server.requests)
    download.run(params, **where)  # verified archives are not fetched again
    assert len(server.requests) == before


def test_unknown_archive_checksum_is_named(default_params, tmp_path):
    data = dict(default_params["data"], source="fma", fma={"sha1": {}})
    with pytest.raises(download.DownloadError, match="data.fma.sha1 has no entry for fma_metadata"):
        download.download_fma(data, default_params["download"], tmp_path, tmp_path)
    assert download.archive_names(dict(data, finetune_subset="medium")) == [
        "fma_metadata.zip",
        "fma_medium.zip",
        "fma_large.zip",
    ]


def test_a_failed_download_keeps_verified_archives_and_the_rerun_fetches_only_the_rest(
    server, tmp_path, default_params
):
    """Snakemake deletes data/raw when download fails (and both tools before a rerun); the
    archives live outside it, so the rerun asks the server only for what is still missing."""
    archives = {
        "fma_metadata.zip": make_zip("fma_metadata", {"tracks.csv": b"t" * 100}),
        "fma_small.zip": make_zip("fma_small", {"000/000002.mp3": b"a" * 3000}),
        "fma_large.zip": make_zip("fma_large", {"000/000002.mp3": b"a" * 3000}),
    }
    data = dict(default_params["data"], source="fma")
    data["fma"] = {"sha1": {name: sha1(blob) for name, blob in archives.items()}}
    params = {**default_params, "data": data, "download": {"base_url": server.url, **fast()}}
    raw, cache = tmp_path / "data" / "raw", tmp_path / "data" / "downloads"
    server.files.update({k: v for k, v in archives.items() if k != "fma_large.zip"})
    with pytest.raises(download.DownloadError, match="fma_large.zip: HTTP 404"):
        download.run(params, raw_dir=raw, archive_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == ["fma_metadata.zip", "fma_small.zip"]
    shutil.rmtree(raw)  # what Snakemake does with a failed job's output
    server.files["fma_large.zip"] = archives["fma_large.zip"]
    server.requests.clear()
    download.run(params, raw_dir=raw, archive_dir=cache)
    assert [name for name, _ in server.requests] == ["fma_large.zip"]
    assert sorted(p.name for p in raw.iterdir()) == [
        "SOURCE.json",
        "fma_large",
        "fma_metadata",
        "fma_small",
    ]


@pytest.mark.slow
def test_snakemake_keeps_verified_archives_when_download_fails(server, tmp_path):
    """The real orchestrator, fma mode, loopback mirror: a 404 on the third archive fails the job
    and Snakemake removes data/raw, yet the two verified archives stay and the rerun fetches only
    the missing one."""
    import yaml

    from conftest import sh, tiny_checkout

    archives = {
        "fma_metadata.zip": make_zip("fma_metadata", {"tracks.csv": b"t" * 100}),
        "fma_small.zip": make_zip("fma_small", {"000/000002.mp3": b"a" * 3000}),
        "fma_large.zip": make_zip("fma_large", {"000/000002.mp3": b"a" * 3000}),
    }
    repo = tiny_checkout(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = "fma"
    params["data"]["fma"]["sha1"] = {name: sha1(blob) for name, blob in archives.items()}
    params["download"].update(base_url=server.url, retries=0, backoff_s=0.01)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    server.files.update({k: v for k, v in archives.items() if k != "fma_large.zip"})
    failed = sh("snakemake --cores 1 --until download", repo, check=False)
    assert failed.returncode != 0
    assert not (repo / "data" / "raw").exists()  # Snakemake removed the failed job's output
    cache = repo / "data" / "downloads"
    assert sorted(p.name for p in cache.iterdir()) == ["fma_metadata.zip", "fma_small.zip"]
    server.files["fma_large.zip"] = archives["fma_large.zip"]
    server.requests.clear()
    sh("snakemake --cores 1 --until download", repo)
    assert [name for name, _ in server.requests] == ["fma_large.zip"]
    assert (repo / "data" / "raw" / "fma_large" / "000" / "000002.mp3").is_file()


def closed_port() -> int:
    """A loopback port nothing listens on: every connection is refused before a byte arrives."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("empty_part", [False, True], ids=["no-part", "empty-part"])
def test_a_transfer_that_never_started_does_not_claim_a_partial_download(
    tmp_path, monkeypatch, empty_part
):
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    dest = tmp_path / "fma_small.zip"
    part = tmp_path / "fma_small.zip.part"
    if empty_part:
        part.write_bytes(b"")
    url = f"http://127.0.0.1:{closed_port()}/fma_small.zip"
    with pytest.raises(download.DownloadError, match="failed after 2 attempts") as info:
        download.fetch(url, dest, "0" * 40, **fast(retries=1))
    text = str(info.value)
    assert "Nothing was downloaded" in text and "download.base_url" in text
    assert "kept" not in text and "resume" not in text
    assert not dest.exists() and (not part.exists() or part.stat().st_size == 0)


@pytest.mark.parametrize(
    "url",
    [
        "htp:/nonsense/fma_small.zip",
        f"ftp://127.0.0.1:{closed_port()}/fma_small.zip",
        "example.org/fma/fma_small.zip",
    ],
    ids=["typo", "ftp", "no-scheme"],
)
def test_a_url_whose_scheme_is_not_http_or_file_is_refused_without_retries(
    tmp_path, monkeypatch, url
):
    sleeps: list[float] = []
    monkeypatch.setattr(download.time, "sleep", sleeps.append)
    with pytest.raises(download.DownloadError, match=r"download\.base_url must be an http") as info:
        download.fetch(url, tmp_path / "fma_small.zip", "0" * 40, **fast())
    assert str(info.value).startswith(url) and "\n" not in str(info.value)
    assert sleeps == [] and not list(tmp_path.iterdir())


def test_a_file_url_is_still_fetched(tmp_path):
    blob = b"release bytes" * 100
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "fma_small.zip").write_bytes(blob)
    dest = tmp_path / "out" / "fma_small.zip"
    url = (tmp_path / "mirror" / "fma_small.zip").as_uri()
    assert download.fetch(url, dest, sha1(blob), **fast()).read_bytes() == blob


def files_under(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


OLD_TREE = {f"{i:03d}/old.mp3": f"old {i}".encode() for i in range(4)}


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        ("delete-old", errno.EACCES),
        ("delete-old", errno.EBUSY),
        ("move-new-in", errno.EBUSY),
        ("move-new-in", errno.EXDEV),
    ],
)
def test_replacing_an_earlier_extraction_never_leaves_a_mix(
    tmp_path, monkeypatch, caplog, failure, code
):
    """The old folder was deleted before the new one moved in: a delete failing partway (a file
    another user owns, EBUSY on NFS) left it half gone and the verified staging folder removed."""
    raw = tmp_path / "raw"
    final, aside = raw / "fma_small", raw / ".fma_small.old"
    for rel, data in OLD_TREE.items():
        (final / rel).parent.mkdir(parents=True, exist_ok=True)
        (final / rel).write_bytes(data)
    archive = write_archive(tmp_path, make_zip("fma_small", MP3S))
    new_names = {*MP3S, "README.txt", "checksums"}
    real_rmtree, real_replace = shutil.rmtree, os.replace

    def rmtree(path, *args, **kwargs):  # removes one file of the old folder, then fails
        path = Path(path)
        if path.parent == raw and not path.name.endswith(".extracting"):
            doomed = sorted(path.rglob("old.mp3"))
            doomed[0].unlink()
            raise OSError(code, os.strerror(code), str(doomed[1]))
        return real_rmtree(path, *args, **kwargs)

    def replace(src, dst):
        if Path(src).name == ".fma_small.extracting":
            raise OSError(code, os.strerror(code), str(src), str(dst))
        return real_replace(src, dst)

    if failure == "delete-old":
        monkeypatch.setattr(shutil, "rmtree", rmtree)
    else:
        monkeypatch.setattr(os, "replace", replace)
    with caplog.at_level(logging.WARNING, logger="cola_audio.download"):
        try:
            download.extract(archive, raw)
            message, outcome = caplog.text, "new"
        except download.DownloadError as exc:
            message, outcome = str(exc), "old"
    found = files_under(final)
    if outcome == "new":
        assert set(found) == new_names and all(found[k] == v for k, v in MP3S.items())
    else:
        assert found == OLD_TREE
    assert outcome == ("new" if failure == "delete-old" else "old")
    assert str(aside if failure == "delete-old" else final) in message
    assert not (raw / ".fma_small.extracting").exists()
    assert archive.is_file()


def set_header_bits(blob: bytes, *, method: int | None = None, flags: int = 0) -> bytes:
    """Rewrite every member's compression method and OR `flags` into its general purpose flags,
    in both the local and the central directory headers."""
    out = bytearray(blob)
    for signature, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        at = out.find(signature)
        while at != -1:
            old = int.from_bytes(out[at + flag_at : at + flag_at + 2], "little")
            out[at + flag_at : at + flag_at + 2] = (old | flags).to_bytes(2, "little")
            if method is not None:
                out[at + method_at : at + method_at + 2] = method.to_bytes(2, "little")
            at = out.find(signature, at + 4)
    return bytes(out)


def compressed_zip(files: dict[str, bytes], compression: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        zf.writestr("fma_small/checksums", "".join(f"{sha1(d)}  {n}\n" for n, d in files.items()))
        for name, data in files.items():
            zf.writestr(f"fma_small/{name}", data)
    return buf.getvalue()


def corrupt_middle(blob: bytes) -> bytes:
    out, mid = bytearray(blob), len(blob) // 2
    for k in range(mid, mid + 40):
        out[k] ^= 0x55
    return bytes(out)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        pytest.param(
            corrupt_middle(
                compressed_zip({"000/000002.mp3": noise(3000) + b"a" * 50_000}, zipfile.ZIP_LZMA)
            ),
            "truncated or corrupt",
            id="corrupt-lzma",
        ),
        pytest.param(
            set_header_bits(compressed_zip(MP3S, zipfile.ZIP_STORED), method=9),
            r"use a compression method this Python's zipfile cannot read \(000/000002.mp3 "
            r"\(Deflate64\).*not the official release",
            id="deflate64",
        ),
        pytest.param(
            set_header_bits(compressed_zip(MP3S, zipfile.ZIP_STORED), method=93),
            r"use a compression method this Python's zipfile cannot read .*\(Zstandard\)",
            id="zstandard",
        ),
        pytest.param(
            set_header_bits(compressed_zip(MP3S, zipfile.ZIP_STORED), flags=0x1),
            r"use encryption this Python's zipfile cannot read \(000/000002.mp3 \(encrypted\)"
            r".*not the official release",
            id="encrypted",
        ),
    ],
)
def test_members_zipfile_cannot_read_are_refused_in_one_line(tmp_path, blob, message):
    archive = write_archive(tmp_path, blob)
    raw = tmp_path / "raw"
    with pytest.raises(download.DownloadError, match=message) as info:
        download.extract(archive, raw)
    assert "\n" not in str(info.value) and str(archive) in str(info.value)
    assert not raw.exists() or not list(raw.iterdir())
    assert archive.is_file()


@pytest.mark.parametrize(
    ("members", "said"),
    [
        (
            {"fma_small/000/000002.mp3 ": b"a"},
            "member 'fma_small/000/000002.mp3 ' has a name beginning or ending in a space",
        ),
        (
            {"fma_small/000": b"a", "fma_small/000/000002.mp3": b"b"},
            "member 'fma_small/000' is a file and the folder of 'fma_small/000/000002.mp3'",
        ),
    ],
    ids=["trailing-space", "file-and-folder"],
)
def test_a_member_no_file_system_can_hold_as_named_is_refused_before_writing(
    tmp_path, members, said
):
    """A name with a trailing space was reported as both absent and unlisted (the two looked
    identical); a member that is also another's folder failed while writing, with advice to
    "fix that and rerun", which cannot help: the archive is at fault."""
    files = {name.split("/", 1)[1]: data for name, data in members.items()}
    archive = tmp_path / "fma_small.zip"
    archive.write_bytes(
        make_zip(
            "fma_small", {}, checksums={n: sha1(d) for n, d in files.items()}, extra_members=members
        )
    )
    with pytest.raises(download.UnsafeArchiveError) as info:
        download.extract(archive, tmp_path / "raw")
    assert said in str(info.value) and "nothing was written" in str(info.value)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_download_lists_every_raw_file_with_its_sha1_in_sha1sums_format(tmp_path):
    """data/raw.sha1sums is what the stages reading the audio depend on: every file, its SHA1,
    sorted, in the format `sha1sum -c` checks, rewritten from the folder's bytes each time."""
    from cola_audio import stages

    raw = tmp_path / "data" / "raw"
    files = {"fma_small/000/000002.mp3": b"a", "fma_metadata/tracks.csv": b"b", "SOURCE.json": b"c"}
    for rel, data in files.items():
        (raw / rel).parent.mkdir(parents=True, exist_ok=True)
        (raw / rel).write_bytes(data)
    path = download.write_manifest(raw)
    assert path.relative_to(tmp_path).as_posix() == stages.RAW_SUMS
    expected = "".join(f"{hashlib.sha1(files[r]).hexdigest()}  {r}\n" for r in sorted(files))
    assert path.read_text() == expected
    (raw / "fma_small/000/000002.mp3").write_bytes(b"other")
    assert download.write_manifest(raw).read_text() != expected
    if shutil.which("sha1sum"):
        assert subprocess.run(["sha1sum", "-c", "--quiet", path], cwd=raw).returncode == 0


def test_only_download_holds_the_audio_folder_the_others_depend_on_its_sums():
    """A folder dependency costs DVC a walk of all its files for each stage declaring it (6 stages
    over 30,000 files: `dvc status` 9.5 s, benchmarks/scale.py): only download, which writes it,
    may name data/raw; the stages reading the audio depend on data/raw.sha1sums."""
    from cola_audio import stages

    for stage in stages.STAGES.values():
        assert stages.RAW not in stage.dvc_deps(), stage.name
    readers = {s.name for s in stages.STAGES.values() if stages.RAW_SUMS in s.dvc_deps()}
    assert readers == {"prepare", "featurize_shard", "task_data"}
    assert stages.STAGES["download"].outs["sums"].path == stages.RAW_SUMS
