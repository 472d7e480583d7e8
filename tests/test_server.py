"""The package server over real HTTP on 127.0.0.1: ranges, ETag, HEAD, 404/416."""
from __future__ import annotations

import hashlib
import http.client
import os

import pytest

from edgeship.fleet.server import PackageServer, parse_range


@pytest.fixture()
def served(tmp_path):
    data = os.urandom(300_000)
    (tmp_path / "demo-1.0.0.edgepkg").write_bytes(data)
    with PackageServer(tmp_path) as srv:
        yield srv, data, hashlib.sha256(data).hexdigest()


def _req(srv, method, path, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    c.close()
    return r, body


def test_parse_range_pure():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-4", 10) == (0, 4)
    assert parse_range("bytes=5-", 10) == (5, 9)
    assert parse_range("bytes=-3", 10) == (7, 9)
    assert parse_range("bytes=3-100", 10) == (3, 9)
    assert parse_range("bytes=10-", 10) == "unsatisfiable"
    assert parse_range("bytes=0-1,4-5", 10) is None  # multi-range: ignored, full body


def test_get_by_name_and_sha_with_etag(served):
    srv, data, sha = served
    r, body = _req(srv, "GET", "/packages/demo-1.0.0.edgepkg")
    assert r.status == 200 and body == data and r.getheader("ETag") == f'"{sha}"'
    assert r.getheader("Accept-Ranges") == "bytes"
    r, body = _req(srv, "GET", f"/packages/sha256/{sha}")
    assert r.status == 200 and body == data
    r, _ = _req(srv, "GET", "/packages/demo-1.0.0.edgepkg", {"If-None-Match": f'"{sha}"'})
    assert r.status == 304


def test_ranged_reads_resume_to_the_whole_file(served):
    srv, data, sha = served
    got = b""
    while len(got) < len(data):
        r, body = _req(srv, "GET", f"/packages/sha256/{sha}", {"Range": f"bytes={len(got)}-{len(got) + 99_999}"})
        assert r.status == 206
        assert r.getheader("Content-Range") == f"bytes {len(got)}-{len(got) + len(body) - 1}/{len(data)}"
        got += body
    assert got == data
    r, body = _req(srv, "GET", f"/packages/sha256/{sha}", {"Range": "bytes=-10"})
    assert r.status == 206 and body == data[-10:]
    # If-Range with another validator: the whole file, 200
    r, body = _req(srv, "GET", f"/packages/sha256/{sha}", {"Range": "bytes=5-", "If-Range": '"other"'})
    assert r.status == 200 and body == data


def test_head_404_416(served):
    srv, data, sha = served
    r, body = _req(srv, "HEAD", "/packages/demo-1.0.0.edgepkg")
    assert r.status == 200 and body == b"" and int(r.getheader("Content-Length")) == len(data)
    assert _req(srv, "GET", "/packages/nope.edgepkg")[0].status == 404
    assert _req(srv, "GET", "/packages/sha256/" + "0" * 64)[0].status == 404
    assert _req(srv, "GET", "/packages/../etc/passwd")[0].status == 404
    r, _ = _req(srv, "GET", f"/packages/sha256/{sha}", {"Range": f"bytes={len(data)}-"})
    assert r.status == 416 and r.getheader("Content-Range") == f"bytes */{len(data)}"


def test_replaced_file_gets_a_new_etag(served, tmp_path):
    srv, data, sha = served
    p = tmp_path / "demo-1.0.0.edgepkg"
    p.write_bytes(b"new bytes")
    os.utime(p, ns=(1, 1))
    r, body = _req(srv, "GET", "/packages/demo-1.0.0.edgepkg")
    assert body == b"new bytes" and r.getheader("ETag") == f'"{hashlib.sha256(b"new bytes").hexdigest()}"'
