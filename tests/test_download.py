"""Resumable download against the real package server: cuts, resume, corrupt bytes, signature."""
from __future__ import annotations

import hashlib
import os
import threading

import pytest
from test_agent import build_mlp_package

from edgeship.agent.download import download, verify_package
from edgeship.errors import DownloadError, IntegrityError, SignatureError
from edgeship.fleet.server import PackageServer


@pytest.fixture()
def blob(tmp_path):
    d = tmp_path / "srv"
    d.mkdir()
    data = os.urandom(400_000)
    (d / "b.edgepkg").write_bytes(data)
    return d, data, hashlib.sha256(data).hexdigest()


def test_download_resumes_after_cuts(blob, tmp_path):
    d, data, sha = blob
    with PackageServer(d) as srv:
        srv.cut_next(150_000, responses=1)
        res = download(f"{srv.url}/packages/sha256/{sha}", tmp_path / "out" / "b.edgepkg", sha256=sha,
                       size=len(data), backoff_base=0.01)
        assert srv.counters == {"full": 1, "partial": 1, "cut": 1}  # the second read resumed with Range
    assert res.path.read_bytes() == data and res.attempts == 2
    assert not (tmp_path / "out" / "b.edgepkg.part").exists()


def test_partial_file_from_before_a_power_cut_is_resumed(blob, tmp_path):
    d, data, sha = blob
    dest = tmp_path / "b.edgepkg"
    (tmp_path / "b.edgepkg.part").write_bytes(data[:123_456])
    with PackageServer(d) as srv:
        res = download(f"{srv.url}/packages/b.edgepkg", dest, sha256=sha, size=len(data))
    assert res.resumed_from == 123_456 and dest.read_bytes() == data


def test_corrupt_bytes_are_refused_and_never_renamed(blob, tmp_path):
    d, data, sha = blob
    (d / "b.edgepkg").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with PackageServer(d) as srv, pytest.raises(IntegrityError, match="sha256"):
        download(f"{srv.url}/packages/b.edgepkg", tmp_path / "b.edgepkg", sha256=sha, size=len(data),
                 retries=1, backoff_base=0.01)
    assert not (tmp_path / "b.edgepkg").exists()


def test_http_errors_are_bounded(tmp_path):
    with PackageServer(tmp_path) as srv, pytest.raises(DownloadError, match="404"):
        download(f"{srv.url}/packages/none.edgepkg", tmp_path / "x", retries=2, backoff_base=0.01)
    with pytest.raises(DownloadError, match="after 2 attempts"):
        download("http://127.0.0.1:9/x", tmp_path / "y", retries=1, backoff_base=0.01, timeout=1)


def test_bandwidth_limit_slows_the_download(blob, tmp_path):
    d, data, sha = blob
    with PackageServer(d) as srv:
        stop = threading.Event()
        seen = []
        res = download(f"{srv.url}/packages/b.edgepkg", tmp_path / "b.edgepkg", sha256=sha, size=len(data),
                       bandwidth_kbps=8000, stop=stop, on_progress=lambda n, t: seen.append(n))
    # 400 kB at 1 MB/s: at least several progress steps, same bytes
    assert res.path.read_bytes() == data and len(seen) >= 5 and seen[-1] == len(data)


def test_verify_package_signature(tmp_path, signing_keys):
    from edgeship import signing

    priv, pub = signing_keys
    good = build_mlp_package(tmp_path / "p", "2.0.0", seed=1, signing_key=priv)
    assert verify_package(good, [pub])["version"] == "2.0.0"
    other, _ = signing.keygen(tmp_path / "k" / "other.key")
    bad = build_mlp_package(tmp_path / "q", "2.0.0", seed=1, signing_key=other)
    with pytest.raises(SignatureError):
        verify_package(bad, [pub])
