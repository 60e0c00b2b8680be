"""The real-archive path, offline: a loopback server serves archives built in the real layout."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
import zipfile

import pytest

from cola_audio import download


class ArchiveServer(http.server.ThreadingHTTPServer):
    """Serves `files` with Range support; `cut_first` names files whose first transfer breaks."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.cut_first: set[str] = set()
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
        body = data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.server.cut_first:
            self.server.cut_first.discard(name)
            self.wfile.write(body[: len(body) // 2])  # then the connection drops
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


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
    extra_members: dict[str, bytes] | None = None,
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
