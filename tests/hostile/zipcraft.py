"""Raw zip surgery for hostile-package cases: bombs, lying sizes, duplicates, links, truncation."""
from __future__ import annotations

import stat
import struct
import warnings
import zipfile
from pathlib import Path


def members(src: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(src) as z:
        return [(i, z.read(i.filename)) for i in z.infolist()]


def rewrite(src: Path, dst: Path, *, replace=None, drop=(), add=None, order=None) -> Path:
    """Copy a zip member by member, replacing/dropping/adding members (``add`` may repeat a name)."""
    replace = replace or {}
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)  # duplicates are the point
        for info, data in members(src):
            if info.filename in drop:
                continue
            zout.writestr(info.filename, replace.get(info.filename, data))
        for name, data in (add or []):
            if isinstance(data, zipfile.ZipInfo):  # pre-built entry (links, odd attributes)
                zout.writestr(data, b"target")
            else:
                zout.writestr(name, data)
    return dst


def bomb(src: Path, dst: Path, name: str, inflated: int) -> Path:
    """``src`` with member ``name`` replaced by ``inflated`` zero bytes, deflated (a few hundred KB)."""
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info, data in members(src):
            if info.filename != name:
                zout.writestr(info.filename, data)
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zout.open(info, "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            left = inflated
            while left > 0:
                f.write(chunk[:min(left, len(chunk))])
                left -= len(chunk)
    return dst


def lie_about_size(path: Path, name: str, declared: int) -> Path:
    """Patch the local and central headers of ``name`` to declare ``declared`` bytes (data unchanged)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    struct.pack_into("<I", data, info.header_offset + 22, declared)  # local header: uncompressed size
    enc = name.encode()
    pos = 0
    while True:
        pos = data.index(b"PK\x01\x02", pos)
        n = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46:pos + 46 + n]) == enc:
            struct.pack_into("<I", data, pos + 24, declared)  # central directory: uncompressed size
            break
        pos += 4
    path.write_bytes(bytes(data))
    return path


def symlink_entry(name: str, target: str = "/etc/passwd") -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def write(dst: Path, data: bytes) -> Path:
    dst.write_bytes(data)
    return dst


def truncate(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * keep)])
    return dst
