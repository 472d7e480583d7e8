"""The local HTTP API over real sockets (127.0.0.1 and a Unix socket)."""
from __future__ import annotations

import http.client
import io
import json
import logging
import select
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from models import make_image_mlp_onnx, make_mlp_onnx, mlp_reference
from test_agent import LABELS, build_mlp_package, ref
from waiting import wait_until

from edgeship.agent import Agent
from edgeship.agent.api import prometheus_text
from edgeship.agent.config import parse_config
from edgeship.errors import ConfigError


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return build_mlp_package(tmp_path_factory.mktemp("api-pkg"))


class FeedbackStore:
    """A feedback component with the interface the telemetry engineer implements."""

    def __init__(self):
        self.items = []

    def start(self):
        pass

    def stop(self, timeout):
        pass

    def feedback(self, prediction_id, kind, value=None):
        from edgeship.errors import InputError

        if kind not in ("correct", "incorrect", "label"):
            raise InputError(f"unknown feedback kind {kind!r}")
        self.items.append((prediction_id, kind, value))
        return {"msg_id": f"m{len(self.items)}"}


@pytest.fixture()
def api_agent(tmp_path, pkg):
    fb = FeedbackStore()
    agent = Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "st")},
                                "api": {"enabled": True, "port": 0, "max_body_bytes": 100_000}}),
                  components=[fb]).start()
    agent.feedback_store = fb
    yield agent
    agent.stop()


def call(agent, method, path, body=None, ctype="application/json"):
    conn = http.client.HTTPConnection("127.0.0.1", agent.api.port, timeout=10)
    headers = {"Content-Type": ctype} if body is not None else {}
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    ct = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(data) if ct.startswith("application/json") else data.decode()), resp


def test_infer_json_and_npy(api_agent):
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    status, body, _ = call(api_agent, "POST", "/v1/infer", json.dumps({"x": x.tolist()}))
    assert status == 200
    np.testing.assert_allclose(body["outputs"]["logits"], ref(x)[0], atol=1e-4)
    assert body["model"]["version"] == "1.0.0" and body["label"].startswith("c") and body["source"] == "http"
    buf = io.BytesIO()
    np.save(buf, x)
    status, body2, _ = call(api_agent, "POST", "/v1/infer?outputs=0", buf.getvalue(), "application/x-npy")
    assert status == 200 and "outputs" not in body2 and body2["label"] == body["label"]
    status, body3, _ = call(api_agent, "POST", "/v1/infer", json.dumps(x.tolist()))
    assert status == 200 and body3["prediction_id"] != body["prediction_id"]


@pytest.mark.parametrize("payload, ctype, match", [
    (json.dumps({"x": [1.0] * 63}), "application/json", "shape"),
    (json.dumps({"x": [None] * 64}), "application/json", "number"),
    ('{"x": [1, 2', "application/json", "not valid JSON"),
    (json.dumps({"x": ["NaN"] * 64}), "application/json", "number"),
    (b"\x93NUMPY garbage", "application/x-npy", ".npy"),
    (json.dumps({"y": 1}), "application/json", '"x"'),
])
def test_bad_input_is_400_with_reason_and_counted(api_agent, payload, ctype, match):
    status, body, _ = call(api_agent, "POST", "/v1/infer", payload, ctype)
    assert status == 400 and match in body["error"] and body["kind"] == "InputError"
    status, _, _ = call(api_agent, "POST", "/v1/infer", json.dumps({"x": [0.5] * 64}))
    assert status == 200


def test_nan_through_npy_is_rejected_and_counted(api_agent):
    buf = io.BytesIO()
    np.save(buf, np.full(64, np.nan, np.float32))
    status, body, _ = call(api_agent, "POST", "/v1/infer", buf.getvalue(), "application/x-npy")
    assert status == 400 and "NaN" in body["error"]
    assert api_agent.metrics.counters["rejected"] == 1


def test_body_limit_and_unknown_routes(api_agent):
    status, body, _ = call(api_agent, "POST", "/v1/infer", b"[" + b"1," * 60_000 + b"1]")
    assert status == 413 and "max_body_bytes" in body["error"]
    assert call(api_agent, "GET", "/v1/nope")[0] == 404


def test_health_metrics_and_feedback(api_agent):
    status, body, _ = call(api_agent, "POST", "/v1/infer", json.dumps({"x": [0.1] * 64}))
    pid = body["prediction_id"]
    status, health, _ = call(api_agent, "GET", "/v1/health")
    assert status == 200 and health["status"] == "ok" and health["model"]["name"] == "sensor"
    status, text, resp = call(api_agent, "GET", "/v1/metrics")
    assert status == 200 and resp.getheader("Content-Type").startswith("text/plain")
    assert "edgeship_inferences_total 1" in text and 'edgeship_latency_ms_bucket{le="+Inf"} 1' in text
    assert 'edgeship_model_info{name="sensor",version="1.0.0"' in text
    status, body, _ = call(api_agent, "POST", "/v1/feedback", json.dumps({"prediction_id": pid, "kind": "correct"}))
    assert status == 200 and body == {"ok": True, "msg_id": "m1"}
    assert api_agent.feedback_store.items == [(pid, "correct", None)]
    status, body, _ = call(api_agent, "POST", "/v1/feedback", json.dumps({"prediction_id": pid, "kind": "meh"}))
    assert status == 400 and "meh" in body["error"]


def test_feedback_without_component_is_503(tmp_path, pkg):
    agent = Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "st")},
                                "api": {"enabled": True, "port": 0}})).start()
    try:
        status, body, _ = call(agent, "POST", "/v1/feedback", json.dumps({"prediction_id": "x", "kind": "correct"}))
    finally:
        agent.stop()
    assert status == 503 and "feedback is not enabled" in body["error"]


def test_overload_is_503_with_retry_after(tmp_path, pkg):
    agent = Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "st")},
                                "api": {"enabled": True, "port": 0}})).start()
    port = agent.api.port
    agent.batcher.stop(0.5)  # the batcher refuses new work from now on: what a stopping agent does
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/v1/infer", body=json.dumps({"x": [0.0] * 64}), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
    finally:
        agent.stop()
    assert resp.status == 503 and resp.getheader("Retry-After") == "1" and "accepts no new" in body["error"]


def test_unix_socket(tmp_path, pkg):
    sock_path = str(tmp_path / "agent.sock")
    agent = Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "st")},
                                "api": {"enabled": True, "unix_socket": sock_path}})).start()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
    finally:
        agent.stop()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["status"] == "ok"


def test_prometheus_text_is_pure():
    from edgeship.metrics import Histogram

    h = Histogram([1, 2])
    h.add_many([0.5, 1.5, 3])
    text = prometheus_text({"counters": {"errors": 2}, "queue_depth": 3, "latency_ms": h.to_dict()})
    assert "edgeship_errors_total 2" in text and "edgeship_queue_depth 3" in text
    assert 'edgeship_latency_ms_bucket{le="1"} 1' in text and 'edgeship_latency_ms_bucket{le="2"} 2' in text
    assert 'edgeship_latency_ms_bucket{le="+Inf"} 3' in text and "edgeship_latency_ms_count 3" in text


# -- helpers for the hardening tests (tests/hostile/test_local_api.py uses them too) ------------------

def start_agent(tmp_path, pkg, components=(), **api):
    """An agent with the API on a free port (or ``unix_socket``) and the ``[api]`` keys given."""
    section = {"enabled": True, "port": 0, **api}
    return Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "st")}, "api": section}),
                 components=list(components)).start()


def connect(agent, timeout=10.0):
    if agent.api.cfg.unix_socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(agent.api.cfg.unix_socket)
    else:
        s = socket.create_connection(("127.0.0.1", agent.api.port), timeout=timeout)
    return s


def read_response(s):
    """(status, headers dict lower-cased, body bytes) of one HTTP response on socket ``s``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response head: {data[:200]!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body[:n]


def raw(agent, data: bytes, timeout=10.0):
    """Send raw bytes, return (status, headers, parsed JSON body or text) of the answer."""
    s = connect(agent, timeout)
    try:
        s.sendall(data)
        status, headers, body = read_response(s)
    finally:
        s.close()
    parsed = strict_loads(body) if headers.get("content-type", "").startswith("application/json") else body.decode()
    return status, headers, parsed


def strict_loads(data):
    def no_constant(name):
        raise ValueError(f"not strict JSON: bare {name}")
    return json.loads(data, parse_constant=no_constant)


def post(path, body: bytes, ctype="application/json", extra=b""):
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n".encode()
            + extra + b"\r\n" + body)


GOOD = json.dumps({"x": [0.5] * 64}).encode()


def still_serves(agent, headers=None):
    """A good request on a new connection is answered 200 with a result."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.api.port, timeout=10) if not agent.api.cfg.unix_socket \
        else None
    if conn is None:
        status, _, body = raw(agent, post("/v1/infer", GOOD))
    else:
        conn.request("POST", "/v1/infer", body=GOOD, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        status, body = resp.status, strict_loads(resp.read())
        conn.close()
    return status == 200 and body["label"].startswith("c")


def npy_bytes(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def png_bytes(a):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def multipart(parts, boundary="edgeship-test-boundary"):
    """``parts``: (name, filename or None, content type or None, bytes) -> (body, content type)."""
    out = b""
    for name, filename, ctype, data in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# -- issue 16 item 7: input semantics, batches, images ---------------------------------------------

@pytest.fixture(scope="module")
def scaled_pkg(tmp_path_factory):
    """The MLP with a preprocess that matters: raw digits 0..16 are scaled by 1/16."""
    from edgeship import package

    d = tmp_path_factory.mktemp("scaled-pkg")
    return package.build(d / "scaled.edgepkg", make_mlp_onnx(d / "mlp.onnx"), name="scaled", version="1.0.0",
                         labels=LABELS, example_input=np.zeros((1, 64), np.float32), preprocess={"scale": 0.0625})


@pytest.fixture(scope="module")
def image_pkg(tmp_path_factory):
    """An 8x8 grey-image model whose preprocess decodes, resizes and scales images."""
    from edgeship import package

    d = tmp_path_factory.mktemp("image-pkg")
    return package.build(d / "image.edgepkg", make_image_mlp_onnx(d / "img.onnx"), name="img", version="1.0.0",
                         labels=LABELS, example_input=np.zeros((1, 1, 8, 8), np.float32),
                         preprocess={"color": "L", "resize": [8, 8], "scale": 1 / 255, "layout": "NCHW"})


def test_raw_vs_model_input_is_explicit_in_request_and_response(tmp_path, scaled_pkg):
    raw_x = np.random.default_rng(1).integers(0, 17, 64).astype(np.float32)
    model_x = raw_x * 0.0625
    agent = start_agent(tmp_path, scaled_pkg)
    try:
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": raw_x.tolist()}))
        assert status == 200 and body["input"] == "raw"
        np.testing.assert_allclose(body["outputs"]["logits"], ref(model_x)[0], atol=1e-4)
        # Model-ready rows said so: no second scaling (the old API scaled them again, silently).
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": model_x.tolist(), "input": "model"}))
        assert status == 200 and body["input"] == "model"
        np.testing.assert_allclose(body["outputs"]["logits"], ref(model_x)[0], atol=1e-4)
        status, body, _ = call(agent, "POST", "/v1/infer?input=model", npy_bytes(model_x), "application/x-npy")
        assert status == 200 and body["input"] == "model"
        np.testing.assert_allclose(body["outputs"]["logits"], ref(model_x)[0], atol=1e-4)
        # The older spelling still works and is echoed in the new one; contradictions and typos are refused.
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": model_x.tolist(), "preprocess": False}))
        assert status == 200 and body["input"] == "model"
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": raw_x.tolist(), "input": "model",
                                                                       "preprocess": True}))
        assert status == 400 and "not both" not in body["error"] and "preprocess" in body["error"]
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": raw_x.tolist(), "inptu": "model"}))
        assert status == 400 and "unknown key 'inptu'" in body["error"]
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": raw_x.tolist(), "input": "cooked"}))
        assert status == 400 and '"raw"' in body["error"] and '"model"' in body["error"]
    finally:
        agent.stop()


def test_a_batch_of_samples_in_one_request(tmp_path, scaled_pkg):
    xs = np.random.default_rng(2).integers(0, 17, (3, 64)).astype(np.float32)
    agent = start_agent(tmp_path, scaled_pkg, max_batch=4)
    try:
        samples = [xs[0].tolist(), xs[1].tolist(), [1.0] * 63, xs[2].tolist()]
        status, body, _ = call(agent, "POST", "/v1/infer?outputs=1", json.dumps({"samples": samples}))
        assert status == 200 and body["input"] == "raw" and body["count"] == 4 and body["errors"] == 1
        res = body["results"]
        for i, k in ((0, 0), (1, 1), (3, 2)):
            np.testing.assert_allclose(res[i]["outputs"]["logits"], ref(xs[k] * 0.0625)[0], atol=1e-4)
        assert "shape" in res[2]["error"] and res[2]["kind"] == "InputError"
        assert len({r["prediction_id"] for r in res if "prediction_id" in r}) == 3
        # A .npy batch: the first axis is the samples.
        status, body, _ = call(agent, "POST", "/v1/infer?batch=1&input=model", npy_bytes(xs * 0.0625),
                               "application/x-npy")
        assert status == 200 and body["count"] == 3 and body["input"] == "model"
        np.testing.assert_allclose([r["outputs"]["logits"] for r in body["results"]], ref(xs * 0.0625), atol=1e-4)
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"samples": [xs[0].tolist()] * 5}))
        assert status == 400 and "max_batch" in body["error"]
    finally:
        agent.stop()


def test_image_upload_raw_bytes_and_multipart(tmp_path, image_pkg):
    from edgeship.preprocess import Preprocessor

    spec = {"color": "L", "resize": [8, 8], "scale": 1 / 255, "layout": "NCHW"}
    imgs = [np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8) for i in range(2)]
    pngs = [png_bytes(a) for a in imgs]
    want = [mlp_reference(Preprocessor(spec, (-1, 1, 8, 8)).one(p).reshape(1, 64))[0] for p in pngs]
    agent = start_agent(tmp_path, image_pkg)
    try:
        status, body, _ = call(agent, "POST", "/v1/infer", pngs[0], "image/png")
        assert status == 200 and body["input"] == "raw"
        np.testing.assert_allclose(body["outputs"]["logits"], want[0], atol=1e-4)
        data, ctype = multipart([("image", "a.png", "image/png", pngs[0])])
        status, body, _ = call(agent, "POST", "/v1/infer", data, ctype)
        assert status == 200 and "results" not in body
        np.testing.assert_allclose(body["outputs"]["logits"], want[0], atol=1e-4)
        data, ctype = multipart([("image", "a.png", "image/png", pngs[0]), ("image", "b.png", None, pngs[1]),
                                 ("deadline_ms", None, None, b"500")])
        status, body, _ = call(agent, "POST", "/v1/infer", data, ctype)
        assert status == 200 and body["count"] == 2 and body["errors"] == 0
        for r, w in zip(body["results"], want):
            np.testing.assert_allclose(r["outputs"]["logits"], w, atol=1e-4)
        status, body, _ = call(agent, "POST", "/v1/infer?input=model", pngs[0], "image/png")
        assert status == 400 and "raw input" in body["error"]
        status, body, _ = call(agent, "POST", "/v1/infer", b"\x89PNG\r\n\x1a\n broken", "image/png")
        assert status == 400 and "cannot decode" in body["error"]
    finally:
        agent.stop()


def test_http_api_doc_is_linked_and_names_every_key():
    from dataclasses import fields

    from edgeship.agent.config import ApiSection

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "http-api.md").read_text()
    assert "docs/http-api.md" in (root / "README.md").read_text()
    for f in fields(ApiSection):
        assert f"`{f.name}`" in doc, f"docs/http-api.md does not document [api] {f.name}"
    for word in ('"input"', '"samples"', "multipart/form-data", "image/", "application/x-npy", '"NaN"',
                 "Retry-After", "Authorization: Bearer", "nonfinite"):
        assert word in doc


# -- issue 17 items 8-13: the API under hostile or faulty clients ---------------------------------

@pytest.mark.parametrize("length", ["-1", "+64", "1_0", "abc", "99999999999999999999", "64, 65"])
def test_content_length_must_be_one_plain_number_within_the_limit(api_agent, length):
    # Old code: int("-1") passed the limit check and rfile.read(-1) read until the client closed.
    data = (f"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode() + GOOD
    status, headers, body = raw(api_agent, data, timeout=5)
    assert status == 400 and "Content-Length" in body["error"] and headers["connection"] == "close"
    assert api_agent.metrics.counters["api_bad_requests"] == 1
    assert still_serves(api_agent)


def test_oversized_length_is_refused_before_reading_and_chunked_bodies_are_capped(api_agent):
    s = connect(api_agent, timeout=5)
    try:  # declares 200 MiB and sends none of it: answered at once, nothing read
        s.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n\r\n")
        status, _, body = read_response(s)
    finally:
        s.close()
    assert status == 413 and "max_body_bytes" in json.loads(body)["error"]
    chunk = b"[" + b"1," * 30_000 + b"1]"  # 60 kB per chunk, limit 100 kB
    data = (b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
    status, _, body = raw(api_agent, data, timeout=5)
    assert status == 413 and "max_body_bytes" in body["error"]
    # A chunked body within the limit is read whole.
    data = (b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(GOOD[:50]) + GOOD[:50] + b"\r\n" + b"%x\r\n" % len(GOOD[50:]) + GOOD[50:]
            + b"\r\n0\r\n\r\n")
    status, _, body = raw(api_agent, data, timeout=5)
    assert status == 200 and body["label"].startswith("c")


def test_slow_client_gets_408_and_one_log_line(tmp_path, pkg, caplog):
    agent = start_agent(tmp_path, pkg, read_timeout_s=0.6)
    try:
        s = connect(agent, timeout=5)
        t0 = time.monotonic()
        status = None
        try:  # slowloris: a header byte every 0.2 s, never finishing, until the server answers
            for b in b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                if select.select([s], [], [], 0.2)[0] or time.monotonic() - t0 > 4:
                    break
                s.sendall(bytes([b]))
        except OSError:
            pass
        try:
            status, _, _ = read_response(s)
        except OSError:
            pass
        s.close()
        assert status == 408 and time.monotonic() - t0 < 4
        assert agent.metrics.counters["api_timeouts"] == 1
        lines = [r for r in caplog.records if r.name == "edgeship.agent.api" and r.levelno >= logging.INFO
                 and "read_timeout_s" in r.getMessage()]
        assert len(lines) == 1 and lines[0].exc_info is None
        assert still_serves(agent)
    finally:
        agent.stop()


def test_dropped_connection_is_one_counted_log_line_not_a_traceback(tmp_path, pkg, caplog, capfd):
    caplog.set_level(logging.INFO, logger="edgeship.agent.api")
    agent = start_agent(tmp_path, pkg)
    try:
        s = connect(agent)
        s.sendall(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n[0.5, 0.5")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        s.close()
        assert wait_until(lambda: agent.metrics.counters["api_dropped"] == 1, 5)
        assert still_serves(agent)
    finally:
        agent.stop()
    lines = [r for r in caplog.records if r.name == "edgeship.agent.api" and "dropped" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "Traceback" not in capfd.readouterr().err


def test_connections_are_bounded_and_the_next_gets_503_retry_after(tmp_path, pkg):
    agent = start_agent(tmp_path, pkg, max_connections=2)
    held = [connect(agent) for _ in range(2)]
    try:
        for s in held:  # both connections have a thread: each answers on its keep-alive connection
            s.sendall(post("/v1/infer", GOOD))
            assert read_response(s)[0] == 200
        threads_before = threading.active_count()
        status, headers, body = raw(agent, post("/v1/infer", GOOD))
        assert status == 503 and headers["retry-after"] == "1" and "max_connections" in body["error"]
        assert agent.metrics.counters["api_busy"] == 1 and threading.active_count() <= threads_before
        assert "edgeship_api_busy_total 1" in prometheus_text(agent.metrics.snapshot())
        held.pop().close()
        assert wait_until(lambda: raw(agent, post("/v1/infer", GOOD))[0] == 200, 5)
    finally:
        for s in held:
            s.close()
        agent.stop()


def test_a_burst_beyond_the_bound_gets_answers_not_resets(tmp_path, pkg):
    agent = start_agent(tmp_path, pkg, max_connections=4)
    assert agent.api._server.request_queue_size == 128  # socketserver's default is 5
    outcomes = []
    lock = threading.Lock()
    go = threading.Event()

    def client():
        go.wait(5)
        try:
            out = raw(agent, post("/v1/infer", GOOD), timeout=10)[0]
        except OSError as exc:
            out = type(exc).__name__
        with lock:
            outcomes.append(out)

    ts = [threading.Thread(target=client) for _ in range(64)]
    try:
        for t in ts:
            t.start()
        go.set()
        for t in ts:
            t.join(30)
    finally:
        agent.stop()
    assert len(outcomes) == 64 and set(outcomes) <= {200, 503}, outcomes
    assert outcomes.count(200) >= 4 and agent.metrics.counters["api_busy"] == outcomes.count(503) > 0


def test_deep_json_and_a_huge_npy_header_get_400(api_agent):
    status, _, body = raw(api_agent, post("/v1/infer", b"[" * 40_000 + b"]" * 40_000), timeout=5)
    assert status == 400 and "deep" in body["error"] and "\n" not in body["error"]
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }"
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 64
    status, _, body = raw(api_agent, post("/v1/infer", npy, "application/x-npy"), timeout=5)
    assert status == 400 and "1099511627776" in body["error"]
    assert still_serves(api_agent)


def test_nonfinite_outputs_are_strict_json_strings_with_a_flag(api_agent):
    # Finite float32 inputs this large overflow the MLP's sums: its outputs are inf/NaN.
    x = [3e38] * 32 + [-3e38] * 32
    conn = http.client.HTTPConnection("127.0.0.1", api_agent.api.port, timeout=10)
    conn.request("POST", "/v1/infer", body=json.dumps({"x": x, "input": "model"}),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    body = strict_loads(resp.read())  # old code: bare NaN, refused by a strict parser
    conn.close()
    assert resp.status == 200 and body["nonfinite"] is True
    vals = body["outputs"]["logits"]
    assert set(map(type, vals)) <= {str, float} and {v for v in vals if isinstance(v, str)} <= {
        "NaN", "Infinity", "-Infinity"} and any(isinstance(v, str) for v in vals)
    with np.errstate(over="ignore", invalid="ignore"):
        want = ref(np.asarray(x, np.float32))[0]
    np.testing.assert_array_equal(np.isfinite(np.array(vals, dtype=float)), np.isfinite(want))
    status, body, _ = call(api_agent, "POST", "/v1/infer", json.dumps({"x": [0.5] * 64}))
    assert status == 200 and "nonfinite" not in body


def test_token_auth_on_tcp(tmp_path, pkg):
    agent = start_agent(tmp_path, pkg, token="s3cret-token-0123456789")
    try:
        for hdr in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
            for method, path, body in (("GET", "/v1/health", None), ("POST", "/v1/infer", GOOD),
                                       ("GET", "/v1/metrics", None)):
                conn = http.client.HTTPConnection("127.0.0.1", agent.api.port, timeout=10)
                conn.request(method, path, body=body, headers=hdr)
                resp = conn.getresponse()
                data = json.loads(resp.read())
                conn.close()
                assert resp.status == 401 and resp.getheader("WWW-Authenticate").startswith("Bearer")
                assert "Authorization: Bearer" in data["error"]
        assert agent.metrics.counters["api_unauthorized"] == 9 and agent.metrics.counters["inferences"] == 0
        assert still_serves(agent, {"Authorization": "Bearer s3cret-token-0123456789"})
    finally:
        agent.stop()


def test_token_file_over_a_unix_socket(tmp_path, pkg):
    tok = tmp_path / "token"
    tok.write_text("from-a-file-0123456789\n")
    agent = start_agent(tmp_path, pkg, unix_socket=str(tmp_path / "a.sock"), token_file=str(tok))
    try:
        status, _, body = raw(agent, post("/v1/infer", GOOD))
        assert status == 401
        status, _, body = raw(agent, post("/v1/infer", GOOD, extra=b"Authorization: Bearer from-a-file-0123456789\r\n"))
        assert status == 200 and body["label"].startswith("c")
    finally:
        agent.stop()
    with pytest.raises(ConfigError, match="token or token_file"):
        start_agent(tmp_path, pkg, token="x", token_file=str(tok))
    with pytest.raises(ConfigError, match="cannot read"):
        start_agent(tmp_path, pkg, token_file=str(tmp_path / "missing"))


def test_feedback_cli_sends_the_configured_token(tmp_path, pkg):
    from conftest import run_cli

    fb = FeedbackStore()
    agent = start_agent(tmp_path, pkg, components=[fb], token="cli-token-0123456789")
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[api]\nenabled = true\ntoken = "cli-token-0123456789"\n')
    try:
        api = f"http://127.0.0.1:{agent.api.port}"
        res = run_cli("agent", "feedback", "p1", "--correct", "--config", str(cfg), "--api", api)
        assert "msg_id m1" in res.stdout
        res = run_cli("agent", "feedback", "p2", "--correct", "--api", api, check=False)
        assert res.returncode != 0 and "401" in res.stderr and "Traceback" not in res.stderr
    finally:
        agent.stop()
    assert fb.items == [("p1", "correct", None)]
