"""Packages: hostile .edgepkg files against the real package code and the device's model store.

Held means: ``verify`` refuses the file with the expected PackageError subclass in one clear
line (no RecursionError, MemoryError or traceback), the device store refuses to install it and
keeps the model it had active, no half-written directory is left, and reading stays bounded
(bombs are checked under tracemalloc).
"""
from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from pathlib import Path

import pytest
from test_agent import build_mlp_package

from edgeship import package as P
from edgeship import signing
from edgeship.errors import IntegrityError, PackageError, PackageFormatError, SignatureError
from hostile import zipcraft as Z

AREA = "packages"
MODEL = "model.onnx"


@pytest.fixture(scope="module")
def good(tmp_path_factory, signing_keys):
    d = tmp_path_factory.mktemp("hostile-pkg")
    pkg = build_mlp_package(d, signing_key=signing_keys[0])
    return pkg, signing_keys


def _manifest(pkg: Path) -> dict:
    return json.loads(P.open_package(pkg).manifest_bytes)


def _model_name(pkg: Path) -> str:
    return next(n for n in P.open_package(pkg).files if n.endswith(".onnx"))


def _resign(src: Path, dst: Path, manifest: dict | bytes, key) -> Path:
    """A validly signed package whose manifest is ``manifest`` (the attacker holds no key: wrong key)."""
    mbytes = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    return Z.rewrite(src, dst, replace={P.MANIFEST: mbytes, P.SIGNATURE: signing.sign(mbytes, key)})


def _other_key(tmp: Path):
    return signing.keygen(tmp / "attacker.key")[0]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


def _truncated(keep: float):
    return lambda p, k, t: Z.truncate(p, t / "h.edgepkg", keep)


# Each builder: (good package, its signing key path, tmp dir) -> hostile package path.
def _m(edit):
    def build(pkg, key, tmp):
        m = _manifest(pkg)
        edit(m, pkg)
        return Z.rewrite(pkg, tmp / "h.edgepkg", replace={P.MANIFEST: json.dumps(m).encode()})
    return build


CASES = [
    # --- bombs and lying sizes (bounded reads)
    ("sig-bomb-256m", lambda p, k, t: Z.bomb(p, t / "h.edgepkg", P.SIGNATURE, 256 << 20), PackageFormatError,
     "declares"),
    ("manifest-bomb-64m", lambda p, k, t: Z.bomb(p, t / "h.edgepkg", P.MANIFEST, 64 << 20), PackageFormatError,
     "declares"),
    ("model-bomb-64m", lambda p, k, t: Z.bomb(p, t / "h.edgepkg", _model_name(p), 64 << 20), IntegrityError,
     "bytes, the manifest records"),
    ("extra-member-bomb", lambda p, k, t: Z.bomb(p, t / "h.edgepkg", "extra.bin", 64 << 20), IntegrityError,
     "not listed"),
    ("sig-declares-less", lambda p, k, t: Z.lie_about_size(
        Z.rewrite(p, t / "h.edgepkg", replace={P.SIGNATURE: os.urandom(3000)}), P.SIGNATURE, 64),
     PackageFormatError, "manifest.sig"),
    ("manifest-declares-less", lambda p, k, t: Z.lie_about_size(Path(shutil.copy(p, t / "h.edgepkg")), P.MANIFEST, 10),
     PackageFormatError, "manifest.json"),
    ("manifest-declares-more", lambda p, k, t: Z.lie_about_size(Path(shutil.copy(p, t / "h.edgepkg")), P.MANIFEST,
                                                                17 << 20), PackageFormatError, "declares"),
    ("model-declares-more", lambda p, k, t: Z.lie_about_size(Path(shutil.copy(p, t / "h.edgepkg")), _model_name(p),
                                                             1 << 30), IntegrityError, "manifest records"),
    ("sig-oversized-plain", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={P.SIGNATURE: b"s" * 10_000}),
     PackageFormatError, "declares"),
    # --- names
    ("traversal-dotdot", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", add=[("../evil.sh", b"x")]),
     PackageFormatError, "unsafe member name"),
    ("traversal-nested", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", add=[("a/../../evil", b"x")]),
     PackageFormatError, "unsafe member name"),
    ("absolute-name", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", add=[("/etc/cron.d/evil", b"x")]),
     PackageFormatError, "unsafe member name"),
    ("backslash-name", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", add=[("..\\evil", b"x")]),
     PackageFormatError, "unsafe member name"),
    ("unicode-homoglyph-name", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", add=[("mоdel.onnx", b"x")]),
     PackageFormatError, "unsafe member name"),
    ("directory-entry", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", add=[("dir/", b"")]),
     PackageFormatError, "unsafe member name|directory"),
    ("symlink-extra", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", add=[("link", Z.symlink_entry("link"))]),
     IntegrityError, "not listed"),
    ("symlink-replaces-labels", lambda p, k, t: Z.rewrite(
        p, t / "h.edgepkg", drop=("labels.txt",), add=[("labels.txt", Z.symlink_entry("labels.txt"))]),
     IntegrityError, "labels.txt"),
    ("manifest-lists-traversal", _m(lambda m, p: m["files"].update({"../x": {"sha256": "0" * 64, "size": 1}})),
     PackageFormatError, "unsafe member name"),
    ("manifest-lists-reserved", _m(lambda m, p: m["files"].update({P.SIGNATURE: {"sha256": "0" * 64, "size": 1}})),
     PackageFormatError, "reserved"),
    # --- duplicates
    ("duplicate-manifest", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", add=[(P.MANIFEST, b"{}")]),
     PackageFormatError, "appears twice"),
    ("duplicate-model", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", add=[(_model_name(p), b"evil")]),
     PackageFormatError, "appears twice"),
    ("duplicate-signature", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", add=[(P.SIGNATURE, os.urandom(64))]),
     PackageFormatError, "appears twice"),
    # --- signatures and tampering
    ("tampered-version", _m(lambda m, p: m.update(version="9.9.9")), SignatureError, ""),
    ("tampered-hash", _m(lambda m, p: m["files"][_model_name(p)].update(sha256="a" * 64)), SignatureError, ""),
    ("tampered-whitespace", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={
        P.MANIFEST: P.open_package(p).manifest_bytes + b" "}), SignatureError, ""),
    ("random-signature", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={P.SIGNATURE: os.urandom(64)}),
     SignatureError, ""),
    ("empty-signature", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={P.SIGNATURE: b""}), SignatureError, ""),
    ("short-signature", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={P.SIGNATURE: os.urandom(63)}),
     SignatureError, ""),
    ("long-signature", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={P.SIGNATURE: os.urandom(65)}),
     SignatureError, ""),
    ("unsigned", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", drop=(P.SIGNATURE,)), SignatureError, "not signed"),
    ("signed-by-attacker", lambda p, k, t: _resign(p, t / "h.edgepkg", _manifest(p), _other_key(t)), SignatureError,
     ""),
    ("attacker-swaps-model", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={_model_name(p): b"\0" * 1000}),
     IntegrityError, ""),
    ("model-bitflip", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={
        _model_name(p): _flip(P.open_package(p).read(_model_name(p)), 100)}), IntegrityError, "sha256"),
    ("missing-model", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", drop=(_model_name(p),)), IntegrityError,
     "missing file"),
    # --- manifest content
    ("deep-manifest-100k", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={
        P.MANIFEST: b"[" * 100_000 + b"]" * 100_000}), PackageFormatError, "nests deeper"),
    ("deep-manifest-65", _m(lambda m, p: m.update(provenance=json.loads("[" * 65 + "]" * 65))), PackageFormatError,
     "nests deeper"),
    ("manifest-not-object", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={P.MANIFEST: b"[1]"}),
     PackageFormatError, "JSON object"),
    ("manifest-not-json", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={P.MANIFEST: b"\xff\xfe{"}),
     PackageFormatError, "not valid JSON"),
    ("manifest-format-999", _m(lambda m, p: m.update(format=999)), PackageFormatError, "unknown package format"),
    ("manifest-size-1e30", _m(lambda m, p: m["files"][_model_name(p)].update(size=10**30)), SignatureError, ""),
    ("manifest-huge-int-literal", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={
        P.MANIFEST: b'{"format": ' + b"9" * 5000 + b"}"}), PackageFormatError, "not valid JSON"),
    ("no-manifest", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", drop=(P.MANIFEST,)), PackageFormatError,
     "no manifest"),
    # --- not a zip / truncated
    *[(f"truncated-{int(f * 100)}", _truncated(f), PackageFormatError, "") for f in (0.1, 0.5, 0.9, 0.999)],
    ("empty-file", lambda p, k, t: Z.write(t / "h.edgepkg", b""), PackageFormatError, "not a valid"),
    ("random-bytes", lambda p, k, t: Z.write(t / "h.edgepkg", os.urandom(5000)), PackageFormatError, "not a valid"),
    ("zip-header-only", lambda p, k, t: Z.write(t / "h.edgepkg", b"PK\x05\x06" + b"\0" * 18), PackageFormatError,
     "no manifest"),
    ("zip-of-zip", lambda p, k, t: Z.rewrite(p, t / "h.edgepkg", replace={P.MANIFEST: p.read_bytes()}),
     PackageFormatError, "not valid JSON|declares"),
]


@pytest.mark.parametrize("build,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_package(good, tmp_path, build, exc, match):
    from edgeship.agent.store import ModelStore

    pkg, (key, pub) = good
    store = ModelStore(tmp_path / "state")
    sha = store.install(pkg, [pub])
    store.activate(sha)
    bad = build(pkg, key, tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(exc, match=match or None) as err:
            P.verify(bad, [pub])
        with pytest.raises(PackageError):
            store.install(bad, [pub])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = str(err.value)
    assert "\n" not in text and len(text) < 700, text
    assert peak < 40 << 20, f"{peak / 2**20:.0f} MiB held while refusing it"
    assert store.active == sha and [i["sha256"] for i in store.installed()] == [sha]
    leftovers = [n.name for n in (tmp_path / "state").rglob("*") if "tmp" in n.name or "partial" in n.name]
    assert not leftovers, leftovers
    fresh = tmp_path / "unpacked"
    with pytest.raises(PackageError):
        P.unpack(bad, fresh, [pub])
    assert not fresh.exists()
