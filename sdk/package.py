"""The model package (``.edgepkg``): build, sign, open, verify, unpack, inspect.

A package is a zip holding ``manifest.json``, the model file(s), optional
``labels.txt``, ``report.json``, ``example_input.npy|npz``, extra files and
``manifest.sig`` (raw Ed25519 signature over the exact bytes of
``manifest.json``). The manifest lists every other member's sha256 and size,
so the signature covers the whole package. See docs/architecture.md for the
manifest (format 1).

    pkg = build("digits.edgepkg", "model.onnx", name="digits", version="1.0.0", signing_key="k.key")
    verify("digits.edgepkg", ["k.pub"])          # raises PackageError subclasses
    unpack("digits.edgepkg", "store/<sha>", ["k.pub"])

Only numpy and the standard library are imported at module level; model
inspection (onnxruntime, a TFLite interpreter) and signing (cryptography)
load lazily.
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import _files
from ._files import file_sha256, fsync_dir, json_default, write_synced
from .errors import ConfigError, IntegrityError, PackageError, PackageFormatError, SignatureError
from .tensorspec import spec_from_dict, specs_from_dicts, specs_to_dicts

__all__ = ["FORMAT", "SUPPORTED_FORMATS", "MANIFEST", "SIGNATURE", "Package", "build", "sign", "open_package",
           "verify", "read_verified", "unpack", "inspect", "format_inspect", "read_manifest_summary", "file_sha256",
           "load_build_config", "build_from_config"]

FORMAT = 1
SUPPORTED_FORMATS = (1,)
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
# Written beside the members by unpack(): which package a directory came from.
UNPACKED_MARKER = ".edgepkg.json"
_RESERVED = {MANIFEST, SIGNATURE, UNPACKED_MARKER}
_MEMBER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*$")
_MAX_MANIFEST = 16 * 1024 * 1024  # a manifest larger than this is an attack, not a model
_MAX_SIGNATURE = 4096  # an Ed25519 signature is 64 bytes; room for a future envelope, no more
_MAX_JSON_DEPTH = 64  # a real manifest nests a handful of levels; deeper only crashes recursive code
_CHUNK = 1 << 20


# ----------------------------------------------------------------- helpers

def _check_member_name(name: str, pkg: str = "package") -> None:
    """Reject anything that could escape the target directory or collide on disk."""
    if (not isinstance(name, str) or not name or len(name) > 255 or "\\" in name or "\x00" in name
            or name.startswith("/") or ".." in PurePosixPath(name).parts or not _MEMBER_RE.match(name)):
        raise PackageFormatError(f"{pkg}: unsafe member name {name!r} (absolute, '..', backslash or odd "
                                 "characters); refusing to open it")


def _read_member(zf: zipfile.ZipFile, name: str, limit: int, where: str) -> bytes:
    """Read one zip member of at most ``limit`` bytes, checking before and while reading.

    The declared (central directory) size is checked before a byte is inflated, and the read
    stops at ``limit + 1`` bytes whatever the member inflates to: a 1 MB ``manifest.sig`` that
    inflates to 1 GiB must cost nothing, not 2 GB of memory before its signature is checked.
    """
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise PackageFormatError(f"{where}: {name} declares {info.file_size} bytes, more than the {limit} allowed; "
                                 "refusing to read it (not a package edgeship built)")
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise PackageFormatError(f"{where}: cannot read {name} ({exc}); the package is truncated or corrupt, "
                                 "download it again") from exc
    if len(data) > limit or len(data) != info.file_size:
        raise PackageFormatError(f"{where}: {name} inflates to {len(data)}{'+' if len(data) > limit else ''} bytes, "
                                 f"not the {info.file_size} it declares; the package is corrupt or hostile")
    return data


def _read_file(path: Path, limit: int, where: str) -> bytes:
    """``path.read_bytes()`` for a file of at most ``limit`` bytes (an unpacked package's small files)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1)
    if size > limit or len(data) > limit:
        raise PackageFormatError(f"{where}: {path.name} is {max(size, len(data))} bytes, more than the {limit} "
                                 "allowed; refusing to read it")
    return data


def _json_depth_ok(value: Any, limit: int) -> bool:
    """True if ``value`` nests at most ``limit`` levels (iterative: deep input must not recurse)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return False
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _atomic_write_zip(out: Path, members: Sequence[tuple[str, bytes, int]]) -> None:
    """Write ``members`` (name, data, compression) to ``out`` via a temp file + fsync + rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w") as zf:
                for name, data, comp in members:
                    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                    info.compress_type = comp
                    info.external_attr = 0o644 << 16
                    zf.writestr(info, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _load_signing_key(key):
    from . import signing

    if isinstance(key, (str, os.PathLike)):
        return signing.load_private_key(key)
    return key


def _trust_store(trusted_keys):
    """None/empty -> None; a TrustStore as is; paths (files or dirs of .pub) -> TrustStore."""
    if trusted_keys is None:
        return None
    from .signing import TrustStore

    if isinstance(trusted_keys, TrustStore):
        return trusted_keys if len(trusted_keys) else None
    if isinstance(trusted_keys, (str, os.PathLike)):
        trusted_keys = [trusted_keys]
    from .signing import load_public_key

    keys = []
    for k in trusted_keys:
        if isinstance(k, (str, os.PathLike)):
            p = Path(k)
            keys.extend(load_public_key(f) for f in (sorted(p.glob("*.pub")) if p.is_dir() else [p]))
        else:
            keys.append(k)
    store = TrustStore(keys)
    return store if len(store) else None


# ----------------------------------------------------------------- Package

class Package:
    """An opened package (a ``.edgepkg`` zip, or a directory written by :func:`unpack`).

    Opening parses the manifest and checks its schema; it does **not** check
    hashes or the signature (that is :func:`verify`).
    """

    def __init__(self, path: Path, manifest: dict, manifest_bytes: bytes, signature: bytes | None,
                 members: Sequence[str], *, is_dir: bool, sha256: str | None = None) -> None:
        self.path = path
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes
        self.signature = signature
        self.members = list(members)
        self.is_dir = is_dir
        self._sha256 = sha256
        self.verified_key: str | None = None  # set by verify(): id of the key that signed it

    # identity -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def sha256(self) -> str | None:
        """sha256 of the ``.edgepkg`` file bytes: the identity used by the store and rollouts.

        For an unpacked directory, the value recorded by :func:`unpack` (None if unknown)."""
        if self._sha256 is None and not self.is_dir:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def size(self) -> int | None:
        if self.is_dir:
            marker = self.path / UNPACKED_MARKER
            try:
                return json.loads(marker.read_text()).get("size")
            except (OSError, ValueError):
                return None
        return self.path.stat().st_size

    @property
    def signed(self) -> bool:
        return self.signature is not None

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest["files"]

    @property
    def variants(self) -> list[dict]:
        return self.manifest["variants"]

    @property
    def default_variant(self) -> dict | None:
        vs = self.variants
        return next((v for v in vs if v.get("default")), vs[0] if vs else None)

    def variant(self, which: str | None = None) -> dict:
        """A variant by id, by file name, or by runtime (``"onnxruntime"``/``"tflite"``); default if None."""
        if which is None:
            v = self.default_variant
            if v is None:
                raise PackageFormatError(f"{self.path}: the package has no model variant")
            return v
        for key in ("id", "file", "runtime"):
            for v in self.variants:
                if v.get(key) == which:
                    return v
        ids = ", ".join(str(v.get("id")) for v in self.variants)
        raise ConfigError(f"{self.path}: no variant {which!r}; this package has: {ids}")

    @property
    def labels(self) -> list[str] | None:
        return self.manifest.get("labels")

    @property
    def preprocess(self) -> dict | None:
        return self.manifest.get("preprocess")

    # content --------------------------------------------------------------
    def read(self, member: str) -> bytes:
        if member not in self.members:
            raise PackageFormatError(f"{self.path}: no member {member!r} in the package")
        # A listed member is never larger than the manifest says (checked before reading).
        limit = self.files[member]["size"] if member in self.files else _MAX_MANIFEST
        if self.is_dir:
            return _read_file(self.path / member, limit, str(self.path))
        try:
            with zipfile.ZipFile(self.path) as zf:
                return _read_member(zf, member, limit, str(self.path))
        except (zipfile.BadZipFile, zlib.error) as exc:
            raise IntegrityError(f"{self.path}: member {member} is corrupt ({exc}); "
                                 "download the package again") from exc

    def example_input(self) -> np.ndarray | dict[str, np.ndarray] | None:
        name = self.manifest.get("example_input")
        if not name:
            return None
        data = self.read(name)
        try:
            loaded = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise PackageFormatError(f"{self.path}: {name} is not a numpy file: {exc}") from exc
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {k: loaded[k] for k in loaded.files}
        return loaded

    def report(self) -> dict | None:
        if "report.json" not in self.members:
            return None
        try:
            return json.loads(self.read("report.json"))
        except RecursionError as exc:
            raise PackageFormatError(f"{self.path}: report.json is nested too deeply to be real") from exc
        except ValueError as exc:
            raise PackageFormatError(f"{self.path}: report.json is not JSON: {exc}") from exc

    def __repr__(self) -> str:
        return f"<Package {self.manifest.get('name')} {self.manifest.get('version')} at {self.path}>"


# ------------------------------------------------------------ manifest schema

def _check_manifest(m: Any, where: str) -> dict:
    if not isinstance(m, dict):
        raise PackageFormatError(f"{where}: manifest.json must be a JSON object")
    fmt = m.get("format")
    if fmt not in SUPPORTED_FORMATS or isinstance(fmt, bool):
        supported = ", ".join(str(s) for s in SUPPORTED_FORMATS)
        raise PackageFormatError(f"{where}: unknown package format {fmt!r}; this edgeship reads format {supported} "
                                 "(upgrade edgeship, or rebuild the package with this version)")
    for key in ("name", "version"):
        if not isinstance(m.get(key), str) or not m[key]:
            raise PackageFormatError(f"{where}: manifest.json needs a non-empty string {key!r}")
    files = m.get("files")
    if not isinstance(files, dict):
        raise PackageFormatError(f"{where}: manifest.json needs a 'files' object (member -> sha256, size)")
    for name, entry in files.items():
        _check_member_name(name, where)
        if name in _RESERVED:
            raise PackageFormatError(f"{where}: manifest lists reserved member {name!r}")
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or len(entry["sha256"]) != 64 or not isinstance(entry.get("size"), int) or entry["size"] < 0):
            raise PackageFormatError(f"{where}: manifest entry for {name!r} needs sha256 (64 hex) and size")
    runtime = m.get("runtime")
    if not isinstance(runtime, dict) or not runtime:
        raise PackageFormatError(f"{where}: manifest.json needs a 'runtime' object (model file -> runtime)")
    for name, rt in runtime.items():
        if name not in files:
            raise PackageFormatError(f"{where}: runtime names {name!r}, which is not in 'files'")
        if rt not in ("onnxruntime", "tflite"):
            raise PackageFormatError(f"{where}: unknown runtime {rt!r} for {name}; expected onnxruntime or tflite")
    variants = m.get("variants")
    if not isinstance(variants, list) or not variants:
        raise PackageFormatError(f"{where}: manifest.json needs a non-empty 'variants' list")
    ids = set()
    for v in variants:
        if not isinstance(v, dict) or v.get("file") not in runtime:
            raise PackageFormatError(f"{where}: every variant needs a 'file' listed in 'runtime', got {v!r}")
        if v.get("id") in ids:
            raise PackageFormatError(f"{where}: duplicate variant id {v.get('id')!r}")
        ids.add(v.get("id"))
        specs_from_dicts(v.get("inputs"), where)
        specs_from_dicts(v.get("outputs"), where)
    if sum(1 for v in variants if v.get("default")) > 1:
        raise PackageFormatError(f"{where}: more than one variant is marked default")
    specs_from_dicts(m.get("inputs"), where)
    specs_from_dicts(m.get("outputs"), where)
    ex = m.get("example_input")
    if ex is not None and ex not in files:
        raise PackageFormatError(f"{where}: example_input {ex!r} is not in 'files'")
    labels = m.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise PackageFormatError(f"{where}: 'labels' must be a list of strings")
    pre = m.get("preprocess")
    if pre is not None and not isinstance(pre, dict):
        raise PackageFormatError(f"{where}: 'preprocess' must be an object")
    return m


def _parse_manifest(data: bytes, where: str) -> dict:
    try:
        m = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PackageFormatError(f"{where}: manifest.json is not valid JSON ({str(exc)[:200]})") from exc
    except RecursionError:  # the JSON decoder recurses once per level
        m = None
    if m is None or not _json_depth_ok(m, _MAX_JSON_DEPTH):
        raise PackageFormatError(f"{where}: manifest.json nests deeper than {_MAX_JSON_DEPTH} levels; "
                                 "not a manifest edgeship wrote, refusing it")
    return _check_manifest(m, where)


# ------------------------------------------------------------------- open

def open_package(path: str | os.PathLike | Package) -> Package:
    """Open a ``.edgepkg`` (or an unpacked package directory) and check its manifest schema.

    No hashes or signature are checked: use :func:`verify` for that.
    """
    if isinstance(path, Package):
        return path
    p = Path(path)
    if p.is_dir():
        return _open_dir(p)
    where = str(p)
    try:
        zf = zipfile.ZipFile(p)
    except FileNotFoundError as exc:
        raise PackageFormatError(f"{where}: no such package file") from exc
    except IsADirectoryError as exc:  # pragma: no cover - handled by is_dir above
        raise PackageFormatError(f"{where}: is a directory") from exc
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise PackageFormatError(f"{where}: not a valid .edgepkg (truncated or not a zip: {exc}); "
                                 "download or build it again") from exc
    with zf:
        names = zf.namelist()
        seen = set()
        for info in zf.infolist():
            _check_member_name(info.filename, where)
            if info.filename in seen:
                raise PackageFormatError(f"{where}: member {info.filename!r} appears twice; refusing to open it")
            seen.add(info.filename)
            if info.is_dir():
                raise PackageFormatError(f"{where}: unexpected directory entry {info.filename!r}")
        if MANIFEST not in seen:
            raise PackageFormatError(f"{where}: no manifest.json; this is not an edgeship package")
        try:
            mbytes = _read_member(zf, MANIFEST, _MAX_MANIFEST, where)
            sig = _read_member(zf, SIGNATURE, _MAX_SIGNATURE, where) if SIGNATURE in seen else None
        except OSError as exc:
            raise PackageFormatError(f"{where}: cannot read the manifest ({exc}); the package is truncated or "
                                     "corrupt, download it again") from exc
    manifest = _parse_manifest(mbytes, where)
    members = [n for n in names if n not in (MANIFEST, SIGNATURE)]
    return Package(p, manifest, mbytes, sig, members, is_dir=False)


def _open_dir(p: Path) -> Package:
    where = str(p)
    mpath = p / MANIFEST
    try:
        mbytes = _read_file(mpath, _MAX_MANIFEST, where)
    except FileNotFoundError as exc:
        raise PackageFormatError(f"{where}: no manifest.json; not an unpacked edgeship package") from exc
    manifest = _parse_manifest(mbytes, where)
    sig_path = p / SIGNATURE
    sig = _read_file(sig_path, _MAX_SIGNATURE, where) if sig_path.is_file() else None
    sha = None
    try:
        sha = json.loads((p / UNPACKED_MARKER).read_text()).get("sha256")
    except (OSError, ValueError):
        pass
    members = [n for n in manifest["files"] if (p / n).is_file()]
    return Package(p, manifest, mbytes, sig, members, is_dir=True, sha256=sha)


# ----------------------------------------------------------------- verify

def _check_signature(pkg: Package, store, require: bool) -> None:
    if store is None:
        if require:
            raise SignatureError(f"{pkg.path}: a signature is required but no trusted public keys are configured")
        return
    if pkg.signature is None:
        raise SignatureError(f"{pkg.path}: the package is not signed and this device requires signed packages; "
                             "sign it with `edgeship package sign`")
    pkg.verified_key = store.verify(pkg.manifest_bytes, pkg.signature, what=f"{pkg.path} manifest")


def _zip_chunks(zf: zipfile.ZipFile, name: str, where: str):
    try:
        with zf.open(name) as f:
            yield from iter(lambda: f.read(_files.CHUNK), b"")
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise IntegrityError(f"{where}: {name} is corrupt in the zip ({exc}); download the package again") from exc


def _reopen(pkg: Package) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(pkg.path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackageFormatError(f"{pkg.path}: cannot reopen the package ({exc})") from exc


def _size_error(pkg: Package, name: str, size: int) -> IntegrityError:
    return IntegrityError(f"{pkg.path}: {name} is {size} bytes, the manifest records {pkg.files[name]['size']}; "
                          "the package was altered, rebuild or download it again")


def _check_digest(pkg: Package, name: str, digest: str, size: int) -> None:
    if size != pkg.files[name]["size"]:
        raise _size_error(pkg, name, size)
    if digest != pkg.files[name]["sha256"]:
        raise IntegrityError(f"{pkg.path}: {name} does not match its sha256 in the manifest; "
                             "the package was altered or corrupted, rebuild or download it again")


def _limited(chunks: Iterable[bytes], pkg: Package, name: str) -> Iterable[bytes]:
    # Stop at the first byte beyond the recorded size: a member cannot stream on unchecked.
    limit = pkg.files[name]["size"]
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise IntegrityError(f"{pkg.path}: {name} is larger than the {limit} bytes the manifest records; "
                                 "the package was altered, rebuild or download it again")
        yield chunk


def _check_member(pkg: Package, name: str, zf: zipfile.ZipFile | None = None, *, hash: bool = True,
                  sink=None) -> None:
    """One member against its manifest entry; the one place verify, unpack and loads check a member.

    Its size first — from the zip directory or the file system, before a
    byte is read — then, with ``hash``, the sha256 of the bytes as they
    stream (copied to ``sink`` when given: unpack writes while it hashes).
    """
    if zf is None:
        fp = pkg.path / name
        if not fp.is_file():
            raise IntegrityError(f"{pkg.path}: missing file {name} listed in the manifest; unpack the package again")
        size = fp.stat().st_size
        chunks = _files.file_chunks(fp)
    else:
        size = zf.getinfo(name).file_size
        chunks = _zip_chunks(zf, name, str(pkg.path))
    if size != pkg.files[name]["size"]:
        raise _size_error(pkg, name, size)
    if hash:
        _check_digest(pkg, name, *_files.sha256_chunks(_limited(chunks, pkg, name), sink=sink))


def read_verified(pkg: Package, member: str) -> bytes:
    """A member's bytes, checked against the manifest: the size before reading, the sha256 of what was read.

    What a runtime loads from: the bytes it hashed are the bytes it runs,
    so a file swapped after a check is caught, and the file is read once.
    """
    if member not in pkg.files:
        raise IntegrityError(f"{pkg.path}: {member} is not listed in the manifest")
    if pkg.is_dir:
        _check_member(pkg, member, hash=False)
    else:
        with _reopen(pkg) as zf:
            _check_member(pkg, member, zf, hash=False)
    data = pkg.read(member)
    _check_digest(pkg, member, *_files.sha256_chunks([data]))
    _check_self_contained(pkg, member, data)
    return data


def _verify_member(pkg: Package, name: str, zf: zipfile.ZipFile | None, hash: bool) -> None:
    """:func:`_check_member`, and for a hashed ONNX graph also that its weights are inside it
    (the bytes are kept while they are hashed, so the graph is read once)."""
    graph = hash and pkg.manifest["runtime"].get(name) == "onnxruntime"
    sink = io.BytesIO() if graph else None
    _check_member(pkg, name, zf, hash=hash, sink=sink)
    if sink is not None:
        _check_self_contained(pkg, name, sink.getvalue())


def _check_members(pkg: Package) -> None:
    where = str(pkg.path)
    listed = set(pkg.files)
    present = set(pkg.members)
    missing = sorted(listed - present)
    if missing:
        raise IntegrityError(f"{where}: missing file {missing[0]} listed in the manifest; "
                             "the package is incomplete, rebuild or download it again")
    extra = sorted(present - listed)
    if extra:
        raise IntegrityError(f"{where}: member {extra[0]} is not listed in the manifest (added after build?); "
                             "refusing to use the package")


def verify(path: str | os.PathLike | Package, trusted_keys=None, *, require_signature: bool | None = None,
           members: Iterable[str] | None = None) -> Package:
    """Check a package and return it opened.

    * schema and member names (:class:`PackageFormatError`),
    * the signature over ``manifest.json`` with ``trusted_keys`` — a
      :class:`edgeship.signing.TrustStore`, or ``.pub`` paths / directories
      (:class:`SignatureError`); ``require_signature`` defaults to True when
      keys are given, so an unsigned package is refused,
    * no missing and no extra member, every member's size, and the sha256
      of the members in ``members`` (default: all) (:class:`IntegrityError`),
    * of each hashed ONNX graph, that no tensor keeps its bytes in an
      external data file (:class:`IntegrityError`): the runtime loads the
      graph from memory, so such a package would load nowhere.
      ``members=()`` hashes nothing: for a directory that :func:`unpack`
      verified, or before a step that hashes as it reads (:func:`unpack`,
      :func:`read_verified`), so no byte is hashed twice.
    """
    pkg = open_package(path)
    store = _trust_store(trusted_keys)
    require = (store is not None) if require_signature is None else require_signature
    # Signature first: if the manifest was altered, that is the thing to report.
    _check_signature(pkg, store, require)
    hashed = set(pkg.files) if members is None else set(members)
    unknown = sorted(hashed - set(pkg.files))
    if unknown:
        raise IntegrityError(f"{pkg.path}: {unknown[0]} is not listed in the manifest")
    if pkg.is_dir:
        for name in pkg.files:
            _verify_member(pkg, name, None, name in hashed)
        return pkg
    _check_members(pkg)
    with _reopen(pkg) as zf:
        for name in pkg.files:
            _verify_member(pkg, name, zf, name in hashed)
    return pkg


# ----------------------------------------------------------------- unpack

def unpack(path: str | os.PathLike, dest_dir: str | os.PathLike, trusted_keys=None, *,
           require_signature: bool | None = None, overwrite: bool = False, sha256: str | None = None) -> Path:
    """Verify the package while extracting it, so that ``dest_dir`` appears complete and verified or not at all.

    The signature, the member list and every size are checked first; each
    file is then hashed as it is written to a temporary directory beside
    ``dest_dir`` (each byte read and hashed once), fsynced, and the
    directory is renamed into place only when every file matched.
    On any error ``dest_dir`` is left as it was. If ``dest_dir`` already
    holds this exact package it is returned as is; holding anything else is
    an error unless ``overwrite``. ``sha256``: the package file's sha256
    when the caller has it (the store does), recorded in the marker without
    hashing the file again.
    """
    dest = Path(dest_dir)
    pkg = verify(path, trusted_keys, require_signature=require_signature, members=())
    if pkg.is_dir:
        raise PackageFormatError(f"{pkg.path} is already unpacked; give the .edgepkg file")
    if sha256 is not None:
        pkg._sha256 = sha256
    if dest.exists():
        try:
            same = (dest / MANIFEST).read_bytes() == pkg.manifest_bytes and \
                json.loads((dest / UNPACKED_MARKER).read_text()).get("sha256") == pkg.sha256
        except (OSError, ValueError):
            same = False
        if same:
            return dest
        if dest.is_dir() and not any(dest.iterdir()):
            pass  # an empty directory may be replaced
        elif not overwrite:
            raise PackageError(f"{dest} already exists and holds something else; remove it or unpack elsewhere")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    old: Path | None = None
    try:
        with _reopen(pkg) as zf:
            for name in pkg.files:
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as f:
                    _check_member(pkg, name, zf, sink=f)
                    f.flush()
                    os.fsync(f.fileno())
                if pkg.manifest["runtime"].get(name) == "onnxruntime":
                    # Refused before it reaches the store, not at its first load on the device.
                    _check_self_contained(pkg, name, target.read_bytes())
        write_synced(tmp / MANIFEST, pkg.manifest_bytes)
        if pkg.signature is not None:
            write_synced(tmp / SIGNATURE, pkg.signature)
        marker = {"sha256": pkg.sha256, "size": pkg.size, "name": pkg.name, "version": pkg.version,
                  "source": pkg.path.name, "signed_by": pkg.verified_key, "unpacked": _now()}
        write_synced(tmp / UNPACKED_MARKER, json.dumps(marker, indent=1).encode())
        for d in {(tmp / n).parent for n in pkg.files} | {tmp}:
            fsync_dir(d)
        if dest.exists():
            # Move the old one aside first: rename() cannot replace a non-empty directory.
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dest.exists():
            os.replace(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


# ------------------------------------------------------------------ sign

def sign(pkg_path: str | os.PathLike, private_key_or_path) -> Path:
    """Add or replace ``manifest.sig`` (nothing else changes), atomically."""
    from . import signing

    p = Path(pkg_path)
    pkg = open_package(p)
    if pkg.is_dir:
        raise PackageFormatError(f"{p}: sign the .edgepkg file, not an unpacked directory")
    key = _load_signing_key(private_key_or_path)
    sig = signing.sign(pkg.manifest_bytes, key)
    members: list[tuple[str, bytes, int]] = []
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if info.filename == SIGNATURE:
                    continue
                members.append((info.filename, zf.read(info.filename), info.compress_type))
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise IntegrityError(f"{p}: a member is corrupt ({exc}); rebuild the package") from exc
    members.append((SIGNATURE, sig, zipfile.ZIP_STORED))
    _atomic_write_zip(p, members)
    return p


# ------------------------------------------------------------------ build

def _as_member_map(model_files) -> dict[str, Path]:
    if isinstance(model_files, (str, os.PathLike)):
        p = Path(model_files)
        return {"model" + p.suffix.lower(): p}
    if isinstance(model_files, Mapping):
        return {str(k): Path(v) for k, v in model_files.items()}
    if isinstance(model_files, (list, tuple)):
        out: dict[str, Path] = {}
        for v in model_files:
            p = Path(v)
            name = "model" + p.suffix.lower()
            if name in out:
                name = p.name
            out[name] = p
        return out
    raise ConfigError(f"model_files must be a path or {{member: path}}, got {type(model_files).__name__}")


def _self_contained_onnx(data: bytes, src: Path) -> bytes:
    """An ONNX graph with its external data (``model.onnx.data`` beside it) stored inline.

    Inlined rather than shipped beside the graph: the runtime loads a model
    from the bytes it hashed (:func:`read_verified`), so one self-contained
    member is what every loader can use, and an edge model is far below
    protobuf's 2 GB limit. A data file missing now fails the build.
    """
    from ._onnx_external import external_refs, inline_external_data

    refs = external_refs(data)
    if not refs:
        return data
    files = sorted({r.location for r in refs})
    try:
        return inline_external_data(data, src.parent, what=str(src))
    except FileNotFoundError as exc:
        raise ConfigError(f"{src}: its weights are in external data file(s) {', '.join(files)} "
                          f"({len(refs)} tensors) but {exc} does not exist; put the data file beside the model "
                          "(as the exporter wrote it) and build again; no package written") from exc
    except ImportError as exc:
        raise ConfigError(f"{src}: keeps its weights in external data ({', '.join(files)}); inlining them needs "
                          "the onnx package: pip install 'edgeship[convert]'") from exc
    except ValueError as exc:
        raise ConfigError(f"{src}: {exc}; too large for a package") from exc


def _check_self_contained(pkg: "Package", member: str, data: bytes) -> None:
    """Refuse an ONNX member whose weights live in files outside it (the runtime loads from memory)."""
    from ._onnx_external import external_refs

    if pkg.manifest["runtime"].get(member) != "onnxruntime":
        return
    refs = external_refs(data)
    if not refs:
        return
    where = sorted({r.location for r in refs})
    present = [loc for loc in where if loc in pkg.files]
    state = "is in the package, but edgeship loads a graph from memory and needs it inline" if present else \
        "is not in the package"
    raise IntegrityError(f"{pkg.path}: {member} keeps {len(refs)} tensors (e.g. {refs[0].tensor!r}) in external "
                         f"data file {where[0]}, which {state}; rebuild the package with `edgeship package build` "
                         "from the folder holding the data file (it inlines the weights)")


def inspect_model(data: bytes, runtime: str, what: str = "model") -> tuple[list, list]:
    """(inputs, outputs) TensorSpecs read from a model file's bytes by its runtime."""
    from .runtime import _backends

    if runtime == "onnxruntime":
        sess, _ = _backends.open_ort(data, threads=1, optimization="disable", what=what)
        return _backends.ort_specs(sess)
    interp, _ = _backends.open_tflite(data, threads=1, what=what)
    return _backends.tflite_specs(interp)


def _guess_precision(data: bytes, runtime: str, inputs, outputs) -> str:
    """int8 / fp16 / fp32 from the model itself (pass ``precision`` in a variant to say it outright)."""
    if any(s.dtype in ("int8", "uint8") and s.quantization for s in [*inputs, *outputs]):
        return "int8"
    if runtime == "onnxruntime":
        # Op names are plain strings inside the protobuf: a cheap check that needs no onnx package.
        markers = (b"QuantizeLinear", b"QLinear", b"MatMulInteger", b"ConvInteger")
        return "int8" if any(mk in data for mk in markers) else "fp32"
    from .runtime import _backends

    interp, _ = _backends.open_tflite(data, threads=1)
    dtypes = {str(d["dtype"].__name__) for d in interp.get_tensor_details()}
    if dtypes & {"int8", "uint8"}:
        return "int8"
    return "fp16" if "float16" in dtypes else "fp32"


def _load_json_arg(value, what: str):
    if value is None or isinstance(value, (dict, list)):
        return value
    p = Path(value)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {what} from {p}: {exc}") from exc


def _labels_arg(labels) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        try:
            text = Path(labels).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read labels file {labels}: {exc}") from exc
        return [ln.strip() for ln in text.splitlines() if ln.strip()]
    return [str(x) for x in labels]


def _example_arg(example_input) -> tuple[str, bytes] | None:
    if example_input is None:
        return None
    if isinstance(example_input, (str, os.PathLike)):
        p = Path(example_input)
        try:
            loaded = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read example input {p}: {exc} (give a .npy or .npz file)") from exc
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                example_input = {k: loaded[k] for k in loaded.files}
        else:
            example_input = loaded
    buf = io.BytesIO()
    if isinstance(example_input, Mapping):
        np.savez(buf, **{k: np.asarray(v) for k, v in example_input.items()})
        return "example_input.npz", buf.getvalue()
    arr = np.asarray(example_input)
    if arr.dtype == object:
        raise ConfigError("example_input must be a numeric array (or {name: array})")
    np.save(buf, arr, allow_pickle=False)
    return "example_input.npy", buf.getvalue()


def _read_source(src: Path, what: str) -> bytes:
    try:
        return src.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what}: no such file {src}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {src}: {exc}") from exc


def build(out_path: str | os.PathLike, model_files, *, name: str, version: str,
          inputs: Sequence | None = None, outputs: Sequence | None = None, preprocess: Mapping | None = None,
          labels=None, example_input=None, report=None, provenance: Mapping | None = None,
          variants: Sequence[Mapping] | None = None, reference_stats: Mapping | None = None,
          extra_files: Mapping[str, Any] | None = None, signing_key=None, state: Sequence | None = None,
          postprocess: Mapping | None = None) -> Path:
    """Write a ``.edgepkg`` and return its path.

    ``model_files``: a path (stored as ``model.onnx``/``model.tflite``) or
    ``{member: path}``. ``inputs``/``outputs``: the logical float interface
    (TensorSpec or dicts); read from the default variant's model when None.
    ``variants``: dicts with at least ``file``; ``id``, ``runtime``,
    ``precision``, ``inputs``/``outputs`` are filled in from the file when
    missing; when None, one variant per model file, the first default.
    ``labels``: list or a text file (one per line). ``report``: dict or a
    JSON file. ``example_input``: ndarray, ``{name: ndarray}`` or a .npy/.npz
    path. ``extra_files``: ``{member: path | bytes}``. ``signing_key``: a
    private key or its path; the package is signed when given.
    ``state``: a stateful model's ``[{"input", "output", "batch_axis"}]``
    (see :mod:`edgeship.runtime.state`; ``[]`` = stateless on purpose); a
    model that looks stateful without it is refused. ``postprocess``: a
    built-in hook (see :mod:`edgeship.runtime.postprocess`). An input dict
    may carry ``multiple_of`` for its variable axes.
    """
    from .runtime._backends import runtime_for

    out = Path(out_path)
    if not isinstance(name, str) or not name.strip() or not isinstance(version, str) or not version.strip():
        raise ConfigError("a package needs a non-empty name and version")
    mmap = _as_member_map(model_files)
    if not mmap:
        raise ConfigError("a package needs at least one model file")
    members: dict[str, bytes] = {}
    runtimes: dict[str, str] = {}
    io_cache: dict[str, tuple[list, list]] = {}
    for member, src in mmap.items():
        _check_member_name(member, "build")
        if member in _RESERVED:
            raise ConfigError(f"{member!r} is a reserved member name")
        runtimes[member] = runtime_for(member)
        members[member] = _read_source(src, "model file")
        if runtimes[member] == "onnxruntime":
            members[member] = _self_contained_onnx(members[member], src)

    def model_io(member: str):
        if member not in io_cache:
            io_cache[member] = inspect_model(members[member], runtimes[member], what=f"{mmap[member]}")
        return io_cache[member]

    # variants ---------------------------------------------------------------
    if variants is None:
        variants = [{"file": m} for m in mmap]
    out_variants: list[dict] = []
    for i, v in enumerate(variants):
        v = dict(v)
        f = v.get("file")
        if f not in members:
            raise ConfigError(f"variant {v.get('id', i)!r} names file {f!r}, which is not among the model files "
                              f"({', '.join(members)})")
        v.setdefault("runtime", runtimes[f])
        if v["runtime"] != runtimes[f]:
            raise ConfigError(f"variant {v.get('id', i)!r}: {f} is a {runtimes[f]} model, not {v['runtime']}")
        if "inputs" not in v or "outputs" not in v:
            vin, vout = model_io(f)
            v.setdefault("inputs", vin)
            v.setdefault("outputs", vout)
        v["inputs"] = specs_to_dicts(specs_from_dicts(v["inputs"], f"variant {f}"))
        v["outputs"] = specs_to_dicts(specs_from_dicts(v["outputs"], f"variant {f}"))
        if "precision" not in v:
            v["precision"] = _guess_precision(members[f], v["runtime"], specs_from_dicts(v["inputs"]),
                                              specs_from_dicts(v["outputs"]))
        v.setdefault("id", f"{'onnx' if v['runtime'] == 'onnxruntime' else 'tflite'}-{v['precision']}")
        v["default"] = bool(v.get("default", False))
        v["metrics"] = dict(v.get("metrics") or {})
        v["metrics"].setdefault("size", len(members[f]))
        head = ("id", "file", "runtime", "precision", "default")
        out_variants.append({**{k: v[k] for k in head if k in v}, **{k: x for k, x in v.items() if k not in head}})
    ids = [v["id"] for v in out_variants]
    if len(set(ids)) != len(ids):
        # Two variants got the same default id: suffix them so each stays addressable.
        seen: dict[str, int] = {}
        for v in out_variants:
            n = seen.get(v["id"], 0)
            seen[v["id"]] = n + 1
            if n:
                v["id"] = f"{v['id']}-{n + 1}"
    defaults = [v for v in out_variants if v.get("default")]
    if len(defaults) > 1:
        raise ConfigError("more than one variant is marked default")
    for j, v in enumerate(out_variants):
        v["default"] = bool(v is defaults[0]) if defaults else j == 0
    default = next(v for v in out_variants if v["default"])

    # logical interface: the default variant's, with quantized tensors as float
    if inputs is None:
        inputs = [s.logical() for s in specs_from_dicts(default["inputs"])]
    if outputs is None:
        outputs = [s.logical() for s in specs_from_dicts(default["outputs"])]

    manifest: dict[str, Any] = {
        "format": FORMAT, "name": name, "version": version, "created": _now(),
        "files": {}, "runtime": runtimes, "variants": out_variants,
        "inputs": specs_to_dicts(specs_from_dicts(list(inputs), "inputs")),
        "outputs": specs_to_dicts(specs_from_dicts(list(outputs), "outputs")),
    }
    _shape_fields(manifest, state, postprocess, f"build {out}")
    pre = _load_json_arg(preprocess, "preprocess")
    if pre is not None:
        from .preprocess import check_preprocess

        manifest["preprocess"] = check_preprocess(pre)
    labs = _labels_arg(labels)
    if labs is not None:
        manifest["labels"] = labs
        members["labels.txt"] = ("\n".join(labs) + "\n").encode("utf-8")
    ex = _example_arg(example_input)
    if ex is not None:
        manifest["example_input"] = ex[0]
        members[ex[0]] = ex[1]
    rep = _load_json_arg(report, "report")
    if rep is not None:
        members["report.json"] = json.dumps(rep, indent=1, sort_keys=True, default=json_default).encode()
    if provenance is not None:
        manifest["provenance"] = json.loads(json.dumps(dict(provenance), default=json_default))
    if reference_stats is not None:
        manifest["reference_stats"] = json.loads(json.dumps(dict(reference_stats), default=json_default))
    for mname, content in (extra_files or {}).items():
        _check_member_name(mname, "build")
        if mname in _RESERVED or mname in members:
            raise ConfigError(f"extra file {mname!r} collides with a package member")
        members[mname] = bytes(content) if isinstance(content, (bytes, bytearray)) else _read_source(
            Path(content), f"extra file {mname}")
    for mname, data in members.items():
        manifest["files"][mname] = {"sha256": _files.sha256_chunks([data])[0], "size": len(data)}
    mbytes = json.dumps(manifest, indent=1, sort_keys=False, default=json_default).encode("utf-8")
    _check_manifest(json.loads(mbytes), f"build {out}")
    entries = [(MANIFEST, mbytes, zipfile.ZIP_DEFLATED)]
    entries += [(n, d, zipfile.ZIP_DEFLATED) for n, d in members.items()]
    if signing_key is not None:
        from . import signing

        entries.append((SIGNATURE, signing.sign(mbytes, _load_signing_key(signing_key)), zipfile.ZIP_STORED))
    _atomic_write_zip(out, entries)
    return out


def _shape_fields(manifest: dict, state, postprocess, where: str) -> None:
    """Check and record ``state`` and ``postprocess`` against the logical IO (one line when wrong)."""
    from .runtime.postprocess import check_postprocess
    from .runtime.state import check_declared

    ins, outs = specs_from_dicts(manifest["inputs"]), specs_from_dicts(manifest["outputs"])
    if state is not None:
        manifest["state"] = [dict(d) for d in state]
    try:
        pairs = check_declared(manifest, ins, outs, where)
        post = check_postprocess(_load_json_arg(postprocess, "postprocess"), outs, where)
    except PackageFormatError as exc:
        raise ConfigError(str(exc)) from None
    if state is not None:
        manifest["state"] = [p.to_dict() for p in pairs]
    if post is not None:
        manifest["postprocess"] = post


# ---------------------------------------------------------------- inspect

def inspect(path: str | os.PathLike) -> dict:
    """A JSON-able summary of a package (no verification; see ``verified``/``problem``)."""
    pkg = open_package(path)
    problem = None
    try:
        verify(pkg)
        verified = True
    except PackageError as exc:
        verified, problem = False, str(exc)
    m = pkg.manifest
    return {
        "path": str(pkg.path), "name": pkg.name, "version": pkg.version, "format": m["format"],
        "created": m.get("created"), "sha256": pkg.sha256, "size": pkg.size, "signed": pkg.signed,
        "integrity_ok": verified, "problem": problem,
        "files": [{"name": n, **e} for n, e in m["files"].items()],
        "variants": [{k: v.get(k) for k in ("id", "file", "runtime", "precision", "default", "metrics")}
                     for v in pkg.variants],
        "inputs": m.get("inputs", []), "outputs": m.get("outputs", []),
        "preprocess": m.get("preprocess"), "labels": m.get("labels"),
        "state": m.get("state"), "postprocess": m.get("postprocess"),
        "example_input": m.get("example_input"), "provenance": m.get("provenance"),
        "has_reference_stats": "reference_stats" in m,
    }


def read_manifest_summary(path: str | os.PathLike) -> dict:
    """name/version/sha256/size/created of a package, for listings (no verification)."""
    pkg = open_package(path)
    return {"file": Path(path).name, "name": pkg.name, "version": pkg.version, "sha256": pkg.sha256,
            "size": pkg.size, "created": pkg.manifest.get("created"), "signed": pkg.signed}


def _fmt_spec(d: Mapping) -> str:
    return str(spec_from_dict(d))


def format_inspect(info: Mapping) -> str:
    """The human table printed by ``edgeship package inspect``."""
    rows = [("name", info["name"]), ("version", info["version"]), ("format", info["format"]),
            ("created", info.get("created") or "-"), ("sha256", info.get("sha256") or "-"),
            ("size", f"{info.get('size')} bytes"), ("signed", "yes" if info.get("signed") else "no"),
            ("integrity", "ok" if info.get("integrity_ok") else f"FAILED: {info.get('problem')}")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append("files:")
    fw = max((len(f["name"]) for f in info["files"]), default=4)
    for f in info["files"]:
        lines.append(f"  {f['name']:<{fw}}  {f['size']:>10}  {f['sha256'][:16]}")
    lines.append("variants:")
    for v in info["variants"]:
        met = ", ".join(f"{k}={_short(val)}" for k, val in (v.get("metrics") or {}).items())
        lines.append(f"  {'*' if v.get('default') else ' '} {v.get('id')}  {v.get('file')}  {v.get('runtime')}  "
                     f"{v.get('precision')}  {met}")
    lines.append("inputs:")
    lines.extend(f"  {_fmt_spec(s)}" for s in info["inputs"])
    lines.append("outputs:")
    lines.extend(f"  {_fmt_spec(s)}" for s in info["outputs"])
    for key in ("preprocess", "state", "postprocess"):
        if info.get(key):
            lines.append(f"{key}: {json.dumps(info[key])}")
    labels = info.get("labels")
    if labels:
        shown = ", ".join(labels[:10]) + (f", ... ({len(labels)} in all)" if len(labels) > 10 else "")
        lines.append(f"labels: {shown}")
    if info.get("example_input"):
        lines.append(f"example input: {info['example_input']}")
    if info.get("provenance"):
        lines.append(f"provenance: {json.dumps(info['provenance'], default=str)[:300]}")
    return "\n".join(lines)


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ----------------------------------------------------------- build config

_CONFIG_KEYS = {"name", "version", "model", "models", "output", "inputs", "outputs", "preprocess", "labels",
                "example_input", "report", "provenance", "variants", "reference_stats", "extra_files", "key",
                "state", "postprocess"}


def load_build_config(path: str | os.PathLike) -> dict:
    """Read a package TOML (``edgeship package build --config pkg.toml``) into :func:`build` kwargs.

    Keys: ``name``, ``version``, ``model`` (a path) or ``[models]``
    (member = path), ``output``, ``labels`` (list or file), ``example_input``,
    ``report``, ``key`` (paths relative to the TOML file), tables
    ``[preprocess]``, ``[provenance]``, ``[reference_stats]``,
    ``[extra_files]``, ``[postprocess]``, and ``[[variants]]``, ``[[state]]``.
    """
    import tomllib

    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read package config {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    unknown = sorted(set(data) - _CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"{p}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(_CONFIG_KEYS))}")
    base = p.parent

    def rel(v):
        return str(base / v) if isinstance(v, str) else v

    out: dict[str, Any] = {}
    if "model" in data and "models" in data:
        raise ConfigError(f"{p}: give either 'model' or [models], not both")
    if "model" in data:
        out["model_files"] = rel(data["model"])
    elif "models" in data:
        if not isinstance(data["models"], dict):
            raise ConfigError(f"{p}: [models] must map member names to paths")
        out["model_files"] = {k: rel(v) for k, v in data["models"].items()}
    for key in ("name", "version", "inputs", "outputs", "preprocess", "provenance", "variants", "reference_stats",
                "state", "postprocess"):
        if key in data:
            out[key] = data[key]
    for key in ("example_input", "report", "output"):
        if key in data:
            out[key] = rel(data[key])
    if "key" in data:
        out["signing_key"] = rel(data["key"])
    if "labels" in data:
        out["labels"] = rel(data["labels"]) if isinstance(data["labels"], str) else data["labels"]
    if "extra_files" in data:
        out["extra_files"] = {k: rel(v) for k, v in data["extra_files"].items()}
    return out


def build_from_config(config: str | os.PathLike | None = None, **overrides) -> Path:
    """:func:`build` from a TOML file, with keyword ``overrides`` (None values ignored) taking precedence."""
    kwargs = load_build_config(config) if config is not None else {}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    out = kwargs.pop("output", None) or kwargs.pop("out_path", None)
    missing = [k for k in ("model_files", "name", "version") if not kwargs.get(k)]
    if missing:
        flag = {"model_files": "a model file", "name": "--name", "version": "--version"}[missing[0]]
        raise ConfigError(f"package build needs {flag} (on the command line or in the config)")
    if out is None:
        mf = kwargs["model_files"]
        first = Path(mf if isinstance(mf, (str, os.PathLike)) else next(iter(mf.values())))
        out = first.with_name(f"{kwargs['name']}-{kwargs['version']}.edgepkg")
    return build(out, **kwargs)
