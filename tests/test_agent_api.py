"""The local HTTP API over real sockets (127.0.0.1 and a Unix socket)."""
from __future__ import annotations

import http.client
import io
import json
import socket

import numpy as np
import pytest

from edgeship.agent import Agent
from edgeship.agent.api import prometheus_text
from edgeship.agent.config import parse_config

from test_agent import build_mlp_package, ref


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
    agent = Agent(parse_config({"agent": {"package": str(pkg), "state_dir": str(tmp_path / "st")},
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
    agent = Agent(parse_config({"agent": {"package": str(pkg), "state_dir": str(tmp_path / "st")},
                                "api": {"enabled": True, "port": 0}})).start()
    try:
        status, body, _ = call(agent, "POST", "/v1/feedback", json.dumps({"prediction_id": "x", "kind": "correct"}))
    finally:
        agent.stop()
    assert status == 503 and "feedback is not enabled" in body["error"]


def test_overload_is_503_with_retry_after(tmp_path, pkg):
    agent = Agent(parse_config({"agent": {"package": str(pkg), "state_dir": str(tmp_path / "st")},
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
    agent = Agent(parse_config({"agent": {"package": str(pkg), "state_dir": str(tmp_path / "st")},
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
