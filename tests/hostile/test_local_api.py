"""Hostile-input corpus: the agent's local HTTP API (issue 17).

Every case goes to a real agent over a real socket and asserts two things:
the server answers it correctly (status and a one-line reason), and it
keeps serving good requests afterwards. The agent has a token, so every
case also passes through authentication.
"""
from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from test_agent import build_mlp_package
from test_agent_api import GOOD, connect, multipart, npy_bytes, png_bytes, raw, read_response, start_agent, strict_loads
from waiting import wait_until

AREA = "local API"  # tests/hostile/ counts tried/held per area

TOKEN = "hostile-corpus-token-0123456789"
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-api")
    pkg = build_mlp_package(d / "pkg")
    a = start_agent(d, pkg, token=TOKEN, max_body_bytes=100_000, max_batch=4, max_connections=8,
                    read_timeout_s=1.0, timeout_s=5.0)
    yield a
    a.stop()


def serves(agent) -> bool:
    status, _, body = raw(agent, req("POST", "/v1/infer", GOOD))
    return status == 200 and body["label"].startswith("c") and body["input"] == "raw"


def req(method, path, body=b"", ctype="application/json", headers=b"", auth=True, length=True) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + (AUTH if auth else b"") + headers
    if body or length:
        head += f"Content-Type: {ctype}\r\n".encode()
        if length:
            head += f"Content-Length: {len(body)}\r\n".encode()
    return head + b"\r\n" + body


def infer(body, ctype="application/json", path="/v1/infer", **kw):
    return req("POST", path, body, ctype, **kw)


def chunked(body_chunks, headers=b"") -> bytes:
    out = b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in body_chunks) + b"0\r\n\r\n"
    return (b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n" + headers
            + b"\r\n" + out)


def npy_header(header: bytes, data: bytes = b"\0" * 64, version=b"\x01\x00") -> bytes:
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY" + version + len(header).to_bytes(2, "little") + header + data


def png_claiming(width: int, height: int) -> bytes:
    """A real PNG whose IHDR (with a valid CRC) claims ``width`` x ``height`` pixels."""
    png = bytearray(png_bytes(np.zeros((4, 4), np.uint8)))
    ihdr = bytearray(png[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    png[12:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(png)


def tiff_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="TIFF")
    return buf.getvalue()


GOOD_MODEL = json.dumps({"x": [0.5] * 64, "input": "model"}).encode()
ROW = [0.5] * 64

# (case id, request bytes (or a function of nothing), expected status, a word the one-line reason holds)
CASES = [
    # -- lengths and framing
    ("length-negative", lambda: infer(GOOD, length=False, headers=b"Content-Length: -1\r\n"), 400, "Content-Length"),
    ("length-plus-sign", lambda: infer(GOOD, length=False, headers=b"Content-Length: +64\r\n"), 400, "Content-Length"),
    ("length-hex", lambda: infer(GOOD, length=False, headers=b"Content-Length: 0x40\r\n"), 400, "Content-Length"),
    ("length-30-digits", lambda: infer(GOOD, length=False, headers=b"Content-Length: " + b"9" * 30 + b"\r\n"), 400,
     "Content-Length"),
    ("length-200MiB-declared", lambda: infer(b"", length=False, headers=b"Content-Length: 209715200\r\n"), 413,
     "max_body_bytes"),
    ("length-two-values", lambda: infer(GOOD, length=False, headers=b"Content-Length: 10\r\nContent-Length: 11\r\n"),
     400, "Content-Length"),
    ("length-and-chunked", lambda: infer(GOOD, headers=b"Transfer-Encoding: chunked\r\n"), 400, "not both"),
    ("transfer-encoding-gzip", lambda: infer(GOOD, length=False, headers=b"Transfer-Encoding: gzip\r\n"), 501,
     "gzip"),
    ("chunk-size-not-hex", lambda: chunked([]).replace(b"0\r\n\r\n", b"zz\r\n\r\n"), 400, "chunk"),
    ("chunked-over-the-cap", lambda: chunked([b"[" + b"1," * 30_000 + b"1]"] * 2), 413, "max_body_bytes"),
    ("post-without-length", lambda: infer(b"", length=False), 411, "Content-Length"),
    # -- JSON
    ("json-truncated", lambda: infer(b'{"x": [1, 2'), 400, "not valid JSON"),
    ("json-nested-40k-deep", lambda: infer(b"[" * 40_000 + b"]" * 40_000), 400, "nested too deeply"),
    ("json-nan-literal", lambda: infer(b'{"x": [NaN' + b", 0" * 63 + b"]}"), 400, "NaN"),
    ("json-strings-as-numbers", lambda: infer(json.dumps({"x": ["1"] * 64}).encode()), 400, "number"),
    ("json-ragged", lambda: infer(json.dumps({"x": [[1, 2], [3]]}).encode()), 400, "rectangular"),
    ("json-int-beyond-64-bits", lambda: infer(json.dumps({"x": [10 ** 30] * 64}).encode()), 400, "64 bits"),
    ("json-overflow-to-infinity", lambda: infer(b'{"x": [1e999' + b", 0" * 63 + b"]}"), 400, "infinity"),
    ("json-not-utf8", lambda: infer(b'{"x": "\xff\xfe"}'), 400, "not valid JSON"),
    ("json-unknown-key", lambda: infer(json.dumps({"x": ROW, "inptu": "model"}).encode()), 400, "inptu"),
    ("json-x-and-samples", lambda: infer(json.dumps({"x": ROW, "samples": [ROW]}).encode()), 400, "exactly one"),
    ("json-samples-not-a-list", lambda: infer(json.dumps({"samples": {"a": ROW}}).encode()), 400, "list"),
    ("json-too-many-samples", lambda: infer(json.dumps({"samples": [ROW] * 5}).encode()), 400, "max_batch"),
    ("json-empty-batch", lambda: infer(json.dumps({"samples": []}).encode()), 400, "no sample"),
    ("json-wrong-shape", lambda: infer(json.dumps({"x": [0.5] * 63}).encode()), 400, "shape"),
    ("json-wrong-rank-model-input", lambda: infer(json.dumps({"x": [[0.5] * 8] * 8, "input": "model"}).encode()),
     400, "shape"),
    ("json-bool-input-kind", lambda: infer(json.dumps({"x": ROW, "input": True}).encode()), 400, "raw"),
    ("json-deadline-nan", lambda: infer(json.dumps({"x": ROW, "deadline_ms": "NaN"}).encode()), 400,
     "deadline_ms"),
    ("json-deadline-negative", lambda: infer(json.dumps({"x": ROW, "deadline_ms": -5}).encode()), 400,
     "deadline_ms"),
    ("json-contradicting-input-kinds", lambda: infer(json.dumps({"x": ROW, "input": "raw", "preprocess": False})
                                                     .encode()), 400, "preprocess"),
    # -- .npy
    ("npy-header-2**40-elements", lambda: infer(npy_header(b"{'descr': '<f4', 'fortran_order': False, "
                                                           b"'shape': (1099511627776,), }"), "application/x-npy"),
     400, "1099511627776"),
    ("npy-object-dtype", lambda: infer(npy_header(b"{'descr': '|O', 'fortran_order': False, 'shape': (8,), }"),
                                       "application/x-npy"), 400, "dtype"),
    ("npy-structured-dtype", lambda: infer(npy_header(b"{'descr': [('a', '<f4')], 'fortran_order': False, "
                                                      b"'shape': (16,), }"), "application/x-npy"), 400, "dtype"),
    ("npy-truncated-data", lambda: infer(npy_bytes(np.zeros(64, np.float32))[:-10], "application/x-npy"), 400,
     "bytes follow"),
    ("npy-unknown-version", lambda: infer(npy_header(b"{'descr': '<f4', 'fortran_order': False, 'shape': (16,), }",
                                                     version=b"\x09\x00"), "application/x-npy"), 400, ".npy"),
    ("npy-header-is-code", lambda: infer(npy_header(b"__import__('os').system('true')"), "application/x-npy"),
     400, ".npy"),
    ("npy-nan-values", lambda: infer(npy_bytes(np.full(64, np.nan, np.float32)), "application/x-npy"), 400, "NaN"),
    ("npy-big-endian-ok-shape-wrong", lambda: infer(npy_bytes(np.zeros(65, ">f4")), "application/x-npy"), 400,
     "shape"),
    # -- images
    ("image-garbage", lambda: infer(b"\x89PNG\r\n\x1a\nnot really", "image/png"), 400, "cannot decode"),
    ("image-25-megapixels-claimed", lambda: infer(png_claiming(5000, 5000), "image/png"), 400, "pixel"),
    ("image-tiff-refused", lambda: infer(tiff_bytes(), "image/tiff"), 400, "cannot decode"),
    ("image-as-model-input", lambda: infer(png_bytes(np.zeros((8, 8), np.uint8)), "image/png",
                                           path="/v1/infer?input=model"), 400, "raw input"),
    # -- multipart
    ("multipart-no-boundary", lambda: infer(b"--x\r\n\r\n--x--", "multipart/form-data"), 400, "boundary"),
    ("multipart-unclosed", lambda: infer(multipart([("f", "a.npy", "application/x-npy",
                                                     npy_bytes(np.zeros(64, np.float32)))])[0][:-10],
                                         multipart([])[1]), 400, "closing boundary"),
    ("multipart-too-many-parts", lambda: infer(*multipart([("f", f"{i}.npy", "application/x-npy",
                                                            npy_bytes(np.zeros(64, np.float32)))
                                                           for i in range(20)])), 400, "parts"),
    ("multipart-no-file", lambda: infer(*multipart([("input", None, None, b"raw")])), 400, "no file part"),
    ("multipart-unknown-field", lambda: infer(*multipart([("inptu", None, None, b"model"),
                                                          ("f", "a.npy", "application/x-npy",
                                                           npy_bytes(np.zeros(64, np.float32)))])), 400, "inptu"),
    ("multipart-no-disposition", lambda: infer(b"--b\r\nContent-Type: image/png\r\n\r\nxx\r\n--b--\r\n",
                                               "multipart/form-data; boundary=b"), 400, "Content-Disposition"),
    # -- URLs, methods, request lines, headers
    ("path-traversal", lambda: req("GET", "/v1/../../../etc/passwd", length=False), 404, "no route"),
    ("path-traversal-encoded", lambda: req("GET", "/v1/%2e%2e/%2e%2e/etc/passwd", length=False), 404, "no route"),
    ("path-absolute-url-traversal", lambda: req("GET", "http://evil.example/v1/../etc/passwd", length=False), 404,
     "no route"),
    ("url-70k-long", lambda: req("GET", "/v1/health?" + "a" * 70_000, length=False), 414, "URI"),
    ("query-flood", lambda: infer(GOOD, path="/v1/infer?" + "&".join(f"p{i}=1" for i in range(40))), 400,
     "fields"),
    ("query-unknown-param", lambda: infer(GOOD, path="/v1/infer?inptu=model"), 400, "inptu"),
    ("method-put", lambda: req("PUT", "/v1/infer", GOOD), 405, "not allowed"),
    ("method-delete", lambda: req("DELETE", "/v1/health", length=False), 405, "not allowed"),
    ("method-made-up", lambda: req("BREW", "/v1/infer", GOOD), 501, "BREW"),
    ("request-line-garbage", lambda: b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n", 400, "request"),
    ("headers-150", lambda: req("GET", "/v1/health", length=False,
                                headers=b"".join(b"X-H%d: 1\r\n" % i for i in range(150))), 431, "header"),
    ("header-line-70k", lambda: req("GET", "/v1/health", length=False, headers=b"X-Big: " + b"a" * 70_000 + b"\r\n"),
     431, "too long"),
    # -- authentication
    ("auth-missing", lambda: infer(GOOD, auth=False), 401, "Bearer"),
    ("auth-wrong-token", lambda: infer(GOOD, auth=False, headers=b"Authorization: Bearer not-the-token\r\n"), 401,
     "Bearer"),
    ("auth-token-prefix", lambda: infer(GOOD, auth=False, headers=AUTH[:-5] + b"\r\n"), 401, "Bearer"),
    ("auth-basic-scheme", lambda: infer(GOOD, auth=False, headers=b"Authorization: Basic " + TOKEN.encode() + b"\r\n"),
     401, "Bearer"),
    ("auth-on-health-too", lambda: req("GET", "/v1/health", auth=False, length=False), 401, "Bearer"),
    # -- feedback
    ("feedback-deep-json", lambda: infer(b"[" * 40_000 + b"]" * 40_000, path="/v1/feedback"), 400, "nested"),
    ("feedback-id-not-a-string", lambda: infer(json.dumps({"prediction_id": {"a": 1}, "kind": "correct"}).encode(),
                                               path="/v1/feedback"), 400, "prediction_id"),
]


@pytest.mark.parametrize("case, build, status, word", CASES, ids=[c[0] for c in CASES])
def test_hostile_request_is_answered_and_the_api_keeps_serving(agent, case, build, status, word):
    got, headers, body = raw(agent, build(), timeout=10)
    assert got == status, (case, body)
    assert isinstance(body, dict) and word.lower() in body["error"].lower(), (case, body)
    assert "\n" not in body["error"] and len(body["error"]) <= 500
    assert headers["content-type"] == "application/json"
    assert {401: "www-authenticate", 405: "allow"}.get(status, "content-length") in headers
    assert serves(agent)


def test_accepted_variants_are_served(agent):
    """The lenient corners that are accepted on purpose: lower-case scheme, chunked, batch with a bad sample."""
    status, _, body = raw(agent, infer(GOOD, auth=False, headers=f"Authorization: bearer {TOKEN}\r\n".encode()))
    assert status == 200
    status, _, body = raw(agent, chunked([GOOD[:10], GOOD[10:]]))
    assert status == 200 and body["label"].startswith("c")
    status, _, body = raw(agent, infer(json.dumps({"samples": [ROW, [1.0] * 3, ROW]}).encode()))
    assert status == 200 and body["errors"] == 1 and body["results"][1]["kind"] == "InputError"
    # Model outputs that overflow are answered as strict JSON.
    status, _, body = raw(agent, infer(json.dumps({"x": [3e38] * 64, "input": "model"}).encode()))
    assert status == 200 and body["nonfinite"] is True


# -- connection-level faults ---------------------------------------------------------------------

def test_slowloris_gets_408_and_frees_its_thread(agent):
    before = agent.metrics.counters["api_timeouts"]
    s = connect(agent, timeout=5)
    t0 = time.monotonic()
    try:
        for b in b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200:
            s.sendall(bytes([b]))
            if wait_readable(s, 0.1) or time.monotonic() - t0 > 5:
                break
        status = read_response(s)[0]
    finally:
        s.close()
    assert status == 408 and time.monotonic() - t0 < 4
    assert agent.metrics.counters["api_timeouts"] == before + 1 and serves(agent)


def test_slow_body_gets_408(agent):
    s = connect(agent, timeout=5)
    try:
        s.sendall(infer(GOOD)[:-20])  # the headers and most of the body, then nothing
        status = read_response(s)[0]
    finally:
        s.close()
    assert status == 408 and serves(agent)


def test_silent_connection_is_closed_after_the_read_timeout(agent):
    s = connect(agent, timeout=5)
    t0 = time.monotonic()
    try:
        assert s.recv(100) == b""  # the server closes it: EOF, not a hang
    finally:
        s.close()
    assert 0.8 < time.monotonic() - t0 < 4 and serves(agent)


def test_client_reset_mid_body_is_one_counted_drop(agent):
    before = agent.metrics.counters["api_dropped"]
    s = connect(agent)
    s.sendall(infer(b"[0.5, 0.5" + b" " * 500)[:-300])
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    assert wait_until(lambda: agent.metrics.counters["api_dropped"] == before + 1, 5)
    assert serves(agent)


def test_too_many_clients_get_503_retry_after_not_resets(agent):
    held = [connect(agent) for _ in range(8)]
    try:
        for s in held:
            s.sendall(infer(GOOD))
            assert read_response(s)[0] == 200
        status, headers, body = raw(agent, infer(GOOD))
        assert status == 503 and headers["retry-after"] == "1" and "max_connections" in body["error"]
        assert agent.metrics.counters["api_busy"] >= 1
    finally:
        for s in held:
            s.close()
    assert wait_until(lambda: serves(agent), 5)


def test_pipelined_requests_on_one_connection(agent):
    s = connect(agent)
    try:
        s.sendall(infer(GOOD) + req("GET", "/v1/health", length=False) + infer(b"{bad"))
        f = s.makefile("rb")  # one buffer for the three answers
        answers = []
        for _ in range(3):
            status = int(f.readline().split()[1])
            headers = dict(line.decode().split(":", 1) for line in iter(f.readline, b"\r\n"))
            answers.append((status, strict_loads(f.read(int(headers["Content-Length"])))))
        f.close()
    finally:
        s.close()
    assert [a[0] for a in answers] == [200, 200, 400]
    assert answers[0][1]["label"].startswith("c") and answers[1][1]["status"] == "ok" and serves(agent)


def test_a_flood_of_concurrent_bad_requests(agent):
    bad = [infer(b"[" * 30_000), infer(b"", length=False, headers=b"Content-Length: -1\r\n"),
           infer(npy_header(b"{'descr': '<f8', 'fortran_order': False, 'shape': (2, 1099511627776), }"),
                 "application/x-npy")]
    outcomes = []
    lock = threading.Lock()

    def client(i):
        try:
            out = raw(agent, bad[i % 3], timeout=10)[0]
        except OSError as exc:
            out = type(exc).__name__
        with lock:
            outcomes.append(out)

    ts = [threading.Thread(target=client, args=(i,)) for i in range(30)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert len(outcomes) == 30 and set(outcomes) <= {400, 503}, outcomes
    assert wait_until(lambda: serves(agent), 5)


def wait_readable(s, timeout):
    import select

    return bool(select.select([s], [], [], timeout)[0])


def test_client_that_never_reads_its_answers_is_cut(agent):
    """Pipelined requests whose answers are never read: the server's send blocks; the watchdog cuts it."""
    before = agent.metrics.counters["api_dropped"]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    s.settimeout(10)
    s.connect(("127.0.0.1", agent.api.port))
    t0 = time.monotonic()
    try:
        try:
            s.sendall(req("GET", "/v1/health", length=False) * 20_000)  # MBs of answers, never read
        except OSError:
            pass  # the server cut the connection while we were still sending
        assert wait_until(lambda: agent.metrics.counters["api_dropped"] == before + 1, 10)
    finally:
        s.close()
    assert time.monotonic() - t0 < 12 and serves(agent)
