"""edgeship.package: build / sign / open / verify / unpack / inspect, and every bad input of issue 3.

Each bad-input test asserts the specific error *and* that the unpack target
is untouched: a directory that did not exist still does not, one that held
an older package still holds it byte for byte, and no temporary directory
is left beside it.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from models import make_mlp_int8_tflite, make_mlp_onnx

from edgeship import package as P
from edgeship import signing
from edgeship.errors import ConfigError, IntegrityError, ModelError, PackageError, PackageFormatError, SignatureError

LABELS = [f"class{i}" for i in range(10)]


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("pkg_assets")
    onnx_path = make_mlp_onnx(d / "mlp.onnx")
    tfl_path = make_mlp_int8_tflite(d / "mlp_int8.tflite")
    k1 = signing.keygen(d / "k1.key")
    k2 = signing.keygen(d / "k2.key")
    return {"dir": d, "onnx": onnx_path, "tflite": tfl_path, "k1": k1, "k2": k2}


def _build(assets, out: Path, *, sign: bool = True, model_files=None, **kw) -> Path:
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    kwargs = dict(name="mlp", version="1.0.0", labels=LABELS, example_input=x, preprocess={"scale": 1.0},
                  report={"top1": 0.9}, provenance={"teacher": "none", "quantization": {"method": "none"}},
                  signing_key=assets["k1"][0] if sign else None)
    kwargs.update(kw)
    return P.build(out, model_files or assets["onnx"], **kwargs)


@pytest.fixture()
def pkg(assets, tmp_path) -> Path:
    return _build(assets, tmp_path / "mlp.edgepkg")


def _rewrite(src: Path, dst: Path, *, replace=None, drop=(), add=None) -> Path:
    """Copy a zip member by member, replacing/dropping/adding members (raw zip surgery)."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = replace.get(info.filename, zin.read(info.filename))
            zout.writestr(info.filename, data)
        for name, data in (add or {}).items():
            zout.writestr(name, data)
    return dst


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def assert_unpack_refused(pkg_path: Path, tmp_path: Path, good_pkg: Path, exc: type, match: str, keys=None):
    """unpack() raises ``exc`` and leaves both a fresh and an existing target exactly as they were."""
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    fresh = store / "fresh"
    with pytest.raises(exc, match=match):
        P.unpack(pkg_path, fresh, keys)
    assert not fresh.exists()
    # An existing target holding a good package, replaced only if the new one is sound.
    existing = P.unpack(good_pkg, store / "existing", keys)
    before = _tree(existing)
    with pytest.raises(exc, match=match):
        P.unpack(pkg_path, existing, keys, overwrite=True)
    assert _tree(existing) == before
    assert sorted(p.name for p in store.iterdir()) == ["existing"]  # no temp or half-written dirs left


# ----------------------------------------------------------------- happy paths

def test_build_open_verify_roundtrip(assets, pkg):
    p = P.verify(pkg, [assets["k1"][1]])
    assert p.name == "mlp" and p.version == "1.0.0" and p.signed
    assert p.sha256 == P.file_sha256(pkg) and p.size == pkg.stat().st_size
    assert p.verified_key == signing.key_id(signing.load_public_key(assets["k1"][1]))
    m = p.manifest
    assert m["format"] == P.FORMAT == 1
    assert set(m["files"]) == {"model.onnx", "labels.txt", "example_input.npy", "report.json"}
    assert m["files"]["model.onnx"]["sha256"] == P.file_sha256(assets["onnx"])
    assert m["runtime"] == {"model.onnx": "onnxruntime"}
    assert m["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 64]}]
    assert m["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]
    assert m["labels"] == LABELS and p.read("labels.txt").decode().split() == LABELS
    assert p.default_variant["id"] == "onnx-fp32" and p.default_variant["default"] is True
    assert p.example_input().shape == (1, 64)
    assert p.report() == {"top1": 0.9}
    assert m["provenance"]["teacher"] == "none"


def test_int8_tflite_io_quantization_recorded(assets, tmp_path):
    out = P.build(tmp_path / "t.edgepkg", {"model.onnx": assets["onnx"], "model.tflite": assets["tflite"]},
                  name="mlp", version="2", reference_stats={"input_hist": [1, 2, 3]})
    p = P.verify(out)
    onnx_v, tfl_v = p.variants
    assert onnx_v["default"] and not tfl_v["default"]
    assert tfl_v["runtime"] == "tflite" and tfl_v["precision"] == "int8" and tfl_v["id"] == "tflite-int8"
    q = tfl_v["inputs"][0]
    assert q["dtype"] == "int8" and q["shape"] == ["batch", 64]
    assert q["quantization"]["scale"] > 0 and isinstance(q["quantization"]["zero_point"], int)
    assert "quantization" in tfl_v["outputs"][0]
    # the logical (caller-facing) interface stays float
    assert p.manifest["inputs"][0]["dtype"] == "float32"
    assert p.manifest["reference_stats"] == {"input_hist": [1, 2, 3]}
    assert p.variant("tflite") is tfl_v and p.variant("model.tflite") is tfl_v
    with pytest.raises(ConfigError, match="no variant 'nope'"):
        p.variant("nope")


def test_explicit_variants_and_npz_example(assets, tmp_path):
    out = P.build(tmp_path / "v.edgepkg", {"model.onnx": assets["onnx"], "model.tflite": assets["tflite"]},
                  name="mlp", version="3",
                  variants=[{"file": "model.onnx", "id": "fp32", "metrics": {"top1": 0.97}},
                            {"file": "model.tflite", "id": "small", "default": True}],
                  example_input={"input": np.zeros((2, 64), np.float32)})
    p = P.open_package(out)
    assert p.default_variant["id"] == "small"
    assert p.variant("fp32")["metrics"]["top1"] == 0.97
    assert p.manifest["example_input"] == "example_input.npz"
    assert p.example_input()["input"].shape == (2, 64)


def test_sign_adds_only_the_signature(assets, tmp_path):
    out = _build(assets, tmp_path / "u.edgepkg", sign=False)
    assert not P.open_package(out).signed
    with zipfile.ZipFile(out) as z:
        before = {n: z.read(n) for n in z.namelist()}
    P.sign(out, assets["k2"][0])
    with zipfile.ZipFile(out) as z:
        after = {n: z.read(n) for n in z.namelist()}
    assert set(after) == set(before) | {"manifest.sig"}
    assert all(after[n] == before[n] for n in before)
    P.verify(out, [assets["k2"][1]])
    P.sign(out, assets["k1"][0])  # replaces the signature
    P.verify(out, [assets["k1"][1]])
    with pytest.raises(SignatureError):
        P.verify(out, [assets["k2"][1]])
    assert not list(tmp_path.glob(".*tmp"))


def test_unpack_atomic_idempotent_and_loadable_dir(assets, pkg, tmp_path):
    dest = P.unpack(pkg, tmp_path / "store" / "abc", [assets["k1"][1]])
    assert (dest / "model.onnx").read_bytes() == assets["onnx"].read_bytes()
    assert (dest / "manifest.sig").exists()
    opened = P.open_package(dest)
    assert opened.is_dir and opened.sha256 == P.file_sha256(pkg) and opened.size == pkg.stat().st_size
    assert P.unpack(pkg, dest, [assets["k1"][1]]) == dest  # same package: nothing to do
    P.verify(dest, [assets["k1"][1]])
    # a file corrupted on disk after unpacking is caught when the directory is verified
    (dest / "model.onnx").write_bytes(b"x" + (dest / "model.onnx").read_bytes()[1:])
    with pytest.raises(IntegrityError, match="model.onnx does not match its sha256"):
        P.verify(dest)
    other = _build(assets, tmp_path / "other.edgepkg", version="9")
    with pytest.raises(PackageError, match="already exists"):
        P.unpack(other, dest)


def test_inspect_json_and_table(assets, pkg):
    info = P.inspect(pkg)
    json.dumps(info)
    assert info["signed"] and info["integrity_ok"] and info["name"] == "mlp"
    assert {f["name"] for f in info["files"]} >= {"model.onnx", "labels.txt"}
    table = P.format_inspect(info)
    assert "onnx-fp32" in table and "input: float32[batch, 64]" in table and "class0" in table
    assert P.read_manifest_summary(pkg)["sha256"] == P.file_sha256(pkg)


def test_build_from_toml_config(assets, tmp_path):
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    model = tmp_path / "m.onnx"
    model.write_bytes(assets["onnx"].read_bytes())
    cfg = tmp_path / "pkg.toml"
    cfg.write_text('name = "digits"\nversion = "1.2.3"\nmodel = "m.onnx"\nlabels = "labels.txt"\n'
                   'output = "out/digits.edgepkg"\n[preprocess]\nscale = 0.0625\nlayout = "NCHW"\n')
    out = P.build_from_config(cfg, version="1.2.4")
    assert out == tmp_path / "out" / "digits.edgepkg"
    p = P.verify(out)
    assert (p.name, p.version, p.labels) == ("digits", "1.2.4", LABELS)
    assert p.preprocess == {"scale": 0.0625, "layout": "NCHW"}
    cfg.write_text('name = "x"\nversoin = "1"\n')
    with pytest.raises(ConfigError, match="unknown key 'versoin'"):
        P.build_from_config(cfg)


def test_build_rejects_bad_metadata(assets, tmp_path):
    with pytest.raises(ConfigError, match="unknown step 'scal'"):
        P.build(tmp_path / "a.edgepkg", assets["onnx"], name="a", version="1", preprocess={"scal": 2})
    with pytest.raises(ConfigError, match="not among the model files"):
        P.build(tmp_path / "a.edgepkg", assets["onnx"], name="a", version="1", variants=[{"file": "x.onnx"}])
    with pytest.raises(PackageFormatError, match="unsafe member name"):
        P.build(tmp_path / "a.edgepkg", assets["onnx"], name="a", version="1", extra_files={"../evil": b"x"})
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------- bad input (issue 3)

def test_truncated_zip(assets, pkg, tmp_path):
    bad = tmp_path / "trunc.edgepkg"
    bad.write_bytes(pkg.read_bytes()[: pkg.stat().st_size // 2])
    with pytest.raises(PackageFormatError, match="truncated or not a zip"):
        P.open_package(bad)
    assert_unpack_refused(bad, tmp_path, pkg, PackageFormatError, "truncated or not a zip")


def test_path_traversal_member(assets, pkg, tmp_path):
    bad = _rewrite(pkg, tmp_path / "trav.edgepkg", add={"../x": b"owned"})
    with pytest.raises(PackageFormatError, match=r"unsafe member name '\.\./x'"):
        P.verify(bad)
    assert_unpack_refused(bad, tmp_path, pkg, PackageFormatError, "unsafe member name")
    assert not (tmp_path / "x").exists() and not (tmp_path / "store" / "x").exists()


def test_absolute_member_in_manifest(assets, pkg, tmp_path):
    with zipfile.ZipFile(pkg) as z:
        m = json.loads(z.read("manifest.json"))
    m["files"]["/etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    bad = _rewrite(pkg, tmp_path / "abs.edgepkg", replace={"manifest.json": json.dumps(m)})
    assert_unpack_refused(bad, tmp_path, pkg, PackageFormatError, "unsafe member name '/etc/passwd'")


def test_model_bytes_differ_from_manifest_hash(assets, pkg, tmp_path):
    with zipfile.ZipFile(pkg) as z:
        data = bytearray(z.read("model.onnx"))
    data[-5] ^= 0xFF  # same size, different bytes
    bad = _rewrite(pkg, tmp_path / "hash.edgepkg", replace={"model.onnx": bytes(data)})
    with pytest.raises(IntegrityError, match="model.onnx does not match its sha256"):
        P.verify(bad, [assets["k1"][1]])  # the signature (over the manifest) is still valid
    assert_unpack_refused(bad, tmp_path, pkg, IntegrityError, "does not match its sha256", [assets["k1"][1]])


def test_model_size_differs(assets, pkg, tmp_path):
    bad = _rewrite(pkg, tmp_path / "size.edgepkg", replace={"labels.txt": b"extra\n" + "\n".join(LABELS).encode()})
    assert_unpack_refused(bad, tmp_path, pkg, IntegrityError, "labels.txt is .* bytes, the manifest records")


def test_manifest_edited_after_signing(assets, pkg, tmp_path):
    with zipfile.ZipFile(pkg) as z:
        m = json.loads(z.read("manifest.json"))
    m["version"] = "6.6.6"
    bad = _rewrite(pkg, tmp_path / "edited.edgepkg", replace={"manifest.json": json.dumps(m, indent=1)})
    with pytest.raises(SignatureError, match="does not verify with any trusted key"):
        P.verify(bad, [assets["k1"][1]])
    assert_unpack_refused(bad, tmp_path, pkg, SignatureError, "does not verify", [assets["k1"][1]])


def test_signed_by_untrusted_key(assets, pkg, tmp_path):
    with pytest.raises(SignatureError, match="does not verify with any trusted key"):
        P.verify(pkg, [assets["k2"][1]])
    good = _build(assets, tmp_path / "good2.edgepkg", sign=False)
    P.sign(good, assets["k2"][0])
    assert_unpack_refused(pkg, tmp_path, good, SignatureError, "does not verify", [assets["k2"][1]])


def test_unsigned_where_keys_required(assets, pkg, tmp_path):
    bad = _build(assets, tmp_path / "unsigned.edgepkg", sign=False)
    P.verify(bad)  # fine without keys
    with pytest.raises(SignatureError, match="not signed"):
        P.verify(bad, [assets["k1"][1]])
    with pytest.raises(SignatureError, match="no trusted public keys"):
        P.verify(bad, require_signature=True)
    assert_unpack_refused(bad, tmp_path, pkg, SignatureError, "not signed", [assets["k1"][1]])


def test_missing_file(assets, pkg, tmp_path):
    bad = _rewrite(pkg, tmp_path / "missing.edgepkg", drop={"labels.txt"})
    with pytest.raises(IntegrityError, match="missing file labels.txt"):
        P.verify(bad, [assets["k1"][1]])
    assert_unpack_refused(bad, tmp_path, pkg, IntegrityError, "missing file labels.txt")


def test_extra_member_not_in_manifest(assets, pkg, tmp_path):
    bad = _rewrite(pkg, tmp_path / "extra.edgepkg", add={"payload.sh": b"#!/bin/sh\n"})
    assert_unpack_refused(bad, tmp_path, pkg, IntegrityError, "payload.sh is not listed in the manifest",
                          [assets["k1"][1]])


def test_unknown_format_version(assets, pkg, tmp_path):
    with zipfile.ZipFile(pkg) as z:
        m = json.loads(z.read("manifest.json"))
    m["format"] = 99
    bad = _rewrite(pkg, tmp_path / "fmt.edgepkg", replace={"manifest.json": json.dumps(m)})
    with pytest.raises(PackageFormatError, match="unknown package format 99; this edgeship reads format 1"):
        P.open_package(bad)
    assert_unpack_refused(bad, tmp_path, pkg, PackageFormatError, "unknown package format 99")


def test_manifest_not_json_and_no_manifest(assets, pkg, tmp_path):
    bad = _rewrite(pkg, tmp_path / "nj.edgepkg", replace={"manifest.json": b"{not json"})
    assert_unpack_refused(bad, tmp_path, pkg, PackageFormatError, "manifest.json is not valid JSON")
    none = _rewrite(pkg, tmp_path / "nm.edgepkg", drop={"manifest.json"})
    with pytest.raises(PackageFormatError, match="no manifest.json"):
        P.open_package(none)
    with pytest.raises(PackageFormatError, match="no such package file"):
        P.open_package(tmp_path / "nope.edgepkg")


def test_onnx_file_that_is_not_onnx(assets, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ModelError, match="is not an ONNX model onnxruntime can load"):
        P.build(tmp_path / "g.edgepkg", garbage, name="g", version="1")
    assert not (tmp_path / "g.edgepkg").exists()
    # With the IO given, build does not open the model; the runtime refuses it at load time.
    io = {"inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 64]}],
          "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]}
    out = P.build(tmp_path / "g.edgepkg", garbage, name="g", version="1",
                  variants=[{"file": "model.onnx", **io}], **io)
    P.verify(out)
    from edgeship.runtime import load

    with pytest.raises(ModelError, match="is not an ONNX model") as ei:
        load(out)
    assert "\n" not in str(ei.value) and ei.value.__cause__ is not None


def test_unknown_model_suffix(assets, tmp_path):
    f = tmp_path / "m.pt"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="unknown model type .pt"):
        P.build(tmp_path / "m.edgepkg", f, name="m", version="1")


# ----------------------------------------------------------------- issue 17: sizes before reading, deep manifests

def test_oversized_signature_is_refused_before_it_is_read(assets, pkg, tmp_path):
    """#17.14: a manifest.sig inflating to 1 GiB was read whole (2 GB RSS) before the signature check."""
    import tracemalloc

    from hostile.zipcraft import bomb, lie_about_size, rewrite

    bombed = bomb(pkg, tmp_path / "bomb.edgepkg", P.SIGNATURE, 256 << 20)
    assert bombed.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(PackageFormatError, match="manifest.sig declares 268435456 bytes"):
            P.verify(bombed, [assets["k1"][1]])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
    # A member that declares a small size but holds more is refused too, reading no further.
    liar = lie_about_size(rewrite(pkg, tmp_path / "liar.edgepkg", replace={P.SIGNATURE: b"s" * 100_000}),
                          P.SIGNATURE, 64)
    with pytest.raises(PackageFormatError, match="manifest.sig"):
        P.open_package(liar)


def test_member_read_is_bounded_by_the_manifest_size(assets, pkg, tmp_path):
    import shutil

    from hostile.zipcraft import lie_about_size

    p = P.open_package(pkg)
    name = next(n for n in p.files if not n.endswith((".onnx", ".tflite")))  # labels, report or example input
    liar = lie_about_size(Path(shutil.copy(pkg, tmp_path / "l.edgepkg")), name, p.files[name]["size"] + 10_000_000)
    with pytest.raises(PackageFormatError, match="declares"):
        P.open_package(liar).read(name)


@pytest.mark.parametrize("depth", [200, 100_000])
def test_deeply_nested_manifest_is_a_package_error(assets, pkg, tmp_path, depth):
    """#17.15: a deeply nested manifest escaped as RecursionError."""
    from hostile.zipcraft import rewrite

    m = json.loads(P.open_package(pkg).manifest_bytes)
    text = json.dumps({**m, "provenance": "@"}).replace('"@"', "[" * depth + "]" * depth)
    deep = rewrite(pkg, tmp_path / "deep.edgepkg", replace={P.MANIFEST: text.encode()})
    with pytest.raises(PackageFormatError, match="nests deeper than 64 levels"):
        P.verify(deep, [assets["k1"][1]])
    assert_unpack_refused(deep, tmp_path, pkg, PackageFormatError, "nests deeper")
