"""The device model store: install by sha256, atomic state.json, activate/rollback/pin, corruption."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
from test_agent import build_mlp_package

from edgeship.agent.store import ModelStore, atomic_write_json, file_sha256
from edgeship.errors import IntegrityError, PackageError, SignatureError, StoreError


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory, signing_keys):
    d = tmp_path_factory.mktemp("store-pkgs")
    return {"v1": build_mlp_package(d, "1.0.0", seed=0), "v2": build_mlp_package(d, "2.0.0", seed=1),
            "v3": build_mlp_package(d, "3.0.0", seed=2),
            "signed": build_mlp_package(d, "4.0.0", seed=3, signing_key=signing_keys[0])}


def test_install_unpacks_by_sha_and_is_idempotent(tmp_path, pkgs):
    store = ModelStore(tmp_path)
    sha = store.install(pkgs["v1"])
    assert sha == file_sha256(pkgs["v1"]) and store.has(sha)
    assert (store.files_dir(sha) / "model.onnx").exists() and store.manifest(sha)["version"] == "1.0.0"
    assert store.install(pkgs["v1"]) == sha
    assert [m["sha256"] for m in store.installed()] == [sha]
    assert store.state()["active"] is None and not store.state_path.exists()
    store.verify(sha)
    assert not list(store.root.glob(".tmp-*"))


def test_activate_rollback_pin_and_state_file(tmp_path, pkgs):
    store = ModelStore(tmp_path)
    s1, s2, s3 = (store.install(pkgs[v]) for v in ("v1", "v2", "v3"))
    store.activate(s1)
    store.activate(s2)
    st = json.loads(store.state_path.read_text())
    assert st["active"] == s2 and st["previous"] == s1 and st["format"] == 1
    assert store.rollback() == s1
    assert (store.active, store.previous) == (s1, s2)
    assert store.pin("3.0.0") == s3 and store.pinned == "3.0.0" and store.active == s3
    with pytest.raises(StoreError, match="pinned to version 3.0.0"):
        store.activate(s2)
    store.pin(None)
    store.activate(s2)
    with pytest.raises(StoreError, match="not in the store"):
        store.pin("9.9")
    hist = store.state()["history"]
    assert [h["event"] for h in hist][-3:] == ["pin", "unpin", "activate"]
    # no temp files next to state.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "store"]


def test_gc_keeps_active_previous_and_kept(tmp_path, pkgs):
    store = ModelStore(tmp_path)
    s1, s2, s3 = (store.install(pkgs[v]) for v in ("v1", "v2", "v3"))
    store.activate(s1)
    store.activate(s2)
    assert store.gc(keep=[s3]) == []
    assert store.gc() == [s3] and not store.has(s3)
    with pytest.raises(StoreError, match="active or previous"):
        store.remove(s2)


def test_interrupted_install_is_swept_and_state_is_never_torn(tmp_path, pkgs):
    store = ModelStore(tmp_path)
    leftover = store.root / ".tmp-crashed"
    leftover.mkdir()
    (leftover / "package.edgepkg").write_bytes(b"half")
    store = ModelStore(tmp_path)
    assert not leftover.exists()
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1}


def test_corrupt_or_foreign_state_file(tmp_path):
    store = ModelStore(tmp_path)
    store.state_path.write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        store.state()
    store.state_path.write_text(json.dumps({"format": 99}))
    with pytest.raises(StoreError, match="newer agent"):
        store.state()


def test_verify_detects_corruption_and_startup_falls_back(tmp_path, pkgs):
    store = ModelStore(tmp_path)
    s1 = store.install(pkgs["v1"])
    store.activate(s1)
    s2 = store.install(pkgs["v2"])
    store.activate(s2)
    pkg_file = store.package_path(s2)
    pkg_file.write_bytes(pkg_file.read_bytes() + b"x")
    with pytest.raises(IntegrityError, match="corrupted on disk"):
        store.verify(s2)
    assert store.startup_choice() == s1
    assert store.state()["active"] == s1 and store.state()["previous"] is None
    assert store.state()["history"][-1]["event"] == "fallback"


def test_startup_with_nothing_verified_left(tmp_path, pkgs):
    store = ModelStore(tmp_path)
    s1 = store.install(pkgs["v1"])
    store.activate(s1)
    (store.files_dir(s1) / "model.onnx").unlink()
    with pytest.raises(StoreError, match="no previous verified one"):
        store.startup_choice()
    assert ModelStore(tmp_path / "empty").startup_choice() is None


def test_signatures_are_required_when_keys_are_given(tmp_path, pkgs, signing_keys):
    _, pub = signing_keys
    store = ModelStore(tmp_path)
    sha = store.install(pkgs["signed"], trusted_keys=[pub])
    store.verify(sha, [pub])
    with pytest.raises(SignatureError):
        store.install(pkgs["v1"], trusted_keys=[pub])
    assert not list(store.root.glob(".tmp-*")) and len(store.installed()) == 1


def test_not_a_package(tmp_path):
    bad = tmp_path / "bad.edgepkg"
    bad.write_bytes(b"definitely not a zip")
    store = ModelStore(tmp_path / "st")
    with pytest.raises(PackageError):
        store.install(bad)
    with pytest.raises(StoreError, match="not found"):
        store.install(tmp_path / "missing.edgepkg")
    assert store.installed() == []


def test_state_dir_unwritable(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(StoreError, match="state_dir"):
        ModelStore(ro / "state")


# -- verify once (#21.5) -------------------------------------------------------------

def _two_variant_package(d, signing_key=None):
    """A package with two ONNX variants of different sizes (the MLP, and a wider one)."""
    from models import make_mlp_onnx

    from edgeship import package

    d.mkdir(parents=True, exist_ok=True)
    a = make_mlp_onnx(d / "a.onnx", seed=0)
    b = make_mlp_onnx(d / "b.onnx", hidden=256, seed=1)
    return package.build(d / "two.edgepkg", {"model.onnx": a, "model_wide.onnx": b}, name="two", version="1.0.0",
                         variants=[{"file": "model.onnx", "id": "narrow", "default": True},
                                   {"file": "model_wide.onnx", "id": "wide"}],
                         example_input=np.zeros((1, 64), np.float32), signing_key=signing_key)


def test_install_load_and_variant_switch_hash_each_byte_once(tmp_path, monkeypatch, signing_keys):
    """Install hashes the package file for its identity (once to decide, once as it is copied) and every member
    once as it is unpacked; a load then hashes only the file it loads, a variant switch only the new file."""
    from edgeship import _files
    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config

    key, pub = signing_keys
    pkg = _two_variant_package(tmp_path / "pkg", signing_key=key)
    members = json.loads(zipfile.ZipFile(pkg).read("manifest.json"))["files"]
    narrow, wide = members["model.onnx"]["size"], members["model_wide.onnx"]["size"]
    assert wide > 2 * narrow  # so counting the wrong file would show
    hashed: list[int] = []
    real = _files.sha256_chunks

    def counting(chunks, sink=None):
        digest, n = real(chunks, sink)
        hashed.append(n)
        return digest, n

    monkeypatch.setattr(_files, "sha256_chunks", counting)
    cfg = parse_config({"agent": {"package": str(pkg), "state_dir": str(tmp_path / "state"), "trusted_keys": [str(pub)]},
                        "runtime": {"threads": 1, "warmup": 1}})
    with Agent(cfg) as agent:
        assert sum(hashed) == 2 * pkg.stat().st_size + sum(m["size"] for m in members.values()) + narrow
        hashed.clear()
        handle = agent.load_candidate(agent.model["sha256"], variant="wide")
        agent.switch_to(handle)
        assert agent.handle.variant == "wide" and hashed == [wide]
        assert agent.infer(np.zeros(64, np.float32)).outputs  # it serves
    hashed.clear()
    with Agent(cfg) as agent:  # a restart: the model file only ([agent] package unchanged: known by its stamp)
        assert hashed == [narrow]
