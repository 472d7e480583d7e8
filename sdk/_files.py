"""File utilities shared by the package format, the device store, downloads and the converters.

* :func:`sha256_chunks` is the one place edgeship hashes file content; every
  other helper here (and every verifier: :mod:`edgeship.package`, the
  device store, downloads) goes through it, so a test can count the bytes
  hashed by wrapping it (tests/test_store.py does, to hold "verify once").
* :func:`fsync_dir`, :func:`write_synced`, :func:`atomic_write_json`: the
  crash-safe write steps (write, fsync, rename, fsync the folder).
* :func:`json_default`: numpy values, paths and ``to_dict()`` objects in JSON.

Standard library and numpy only; no edgeship imports (the lowest layer).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

import numpy as np

__all__ = ["CHUNK", "sha256_chunks", "file_chunks", "file_sha256", "copy_hashed", "fsync_dir", "write_synced",
           "atomic_write_json", "json_default"]

CHUNK = 1 << 20


def sha256_chunks(chunks: Iterable[bytes], sink: IO[bytes] | None = None) -> tuple[str, int]:
    """(sha256 hex, byte count) of ``chunks``, each also written to ``sink`` when given."""
    h = hashlib.sha256()
    size = 0
    for chunk in chunks:
        h.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return h.hexdigest(), size


def file_chunks(path: str | os.PathLike, chunk: int = CHUNK) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(chunk), b"")


def file_sha256(path: str | os.PathLike) -> str:
    return sha256_chunks(file_chunks(path))[0]


def copy_hashed(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Copy ``src`` to ``dst`` (fsynced) and return the sha256 of the bytes copied: one read for both."""
    with open(dst, "wb") as out:
        digest, _ = sha256_chunks(file_chunks(src), sink=out)
        out.flush()
        os.fsync(out.fileno())
    return digest


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, data: dict) -> None:
    """Write JSON so that readers see the old or the new file, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def json_default(o):
    """``json.dumps(..., default=json_default)``: numpy scalars and arrays, paths, objects with ``to_dict()``."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"cannot store {type(o).__name__} as JSON")
