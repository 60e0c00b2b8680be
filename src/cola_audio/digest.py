"""Every digest the project takes, in one place: of a file, of bytes, of a JSON-able value."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Any


def file_digest(path: str | Path, algorithm: str = "sha1") -> str:
    """Hex digest of a file's bytes (sha1 for FMA's checksums, md5 as DVC records outputs)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, algorithm).hexdigest()


def copy_digest(src: IO[bytes], dst: IO[bytes], algorithm: str = "sha1") -> str:
    """Copy `src` to `dst` and return the digest of what was copied: one read, not two."""
    hasher = hashlib.new(algorithm)
    while chunk := src.read(1 << 20):
        hasher.update(chunk)
        dst.write(chunk)
    return hasher.hexdigest()


def bytes_digest(data: bytes) -> str:
    """SHA1 of `data`, as FMA's checksums files list them."""
    return hashlib.sha1(data).hexdigest()


def json_digest(value: Any) -> str:
    """SHA1 of `value`'s canonical JSON (sorted keys, no spaces; anything else JSON cannot hold
    as its str): equal values give equal digests on any machine, whatever the dict order."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(canonical.encode()).hexdigest()
