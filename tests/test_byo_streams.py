"""Restarting a stateful model's stream through the HTTP API (#20.4), checked against raw onnxruntime.

``"reset": true`` on an infer request restarts the stream with that sample;
``POST /v1/streams/reset`` forgets a stream (or every stream) without a
sample. After either, the stream's output equals a fresh stream's, computed by
onnxruntime alone from the initial (zero) state.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from models import make_mlp_onnx, make_stateful_onnx
from test_agent_api import call

from edgeship import package as P
from edgeship.agent import Agent
from edgeship.agent.config import parse_config
from edgeship.agent.streams import FreshStream
from edgeship.errors import InputError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

F = 4
STATE = [{"input": "state_in", "output": "state_out", "batch_axis": 0}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("rnn")
    path = make_stateful_onnx(d / "rnn.onnx", features=F)
    return path, P.build(d / "rnn.edgepkg", path, name="rnn", version="1", state=STATE)


def raw_stream(path, xs: np.ndarray) -> list[np.ndarray]:
    """onnxruntime alone: the windows of one stream in order, from the zero state."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    h = np.zeros((1, F), np.float32)
    out = []
    for x in xs:
        y, h = sess.run(["y", "state_out"], {"x": x[None], "state_in": h})
        out.append(y[0])
    return out


def make_agent(tmp_path, pkg, max_delay_ms: float = 0.0) -> Agent:
    return Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "st")},
                               "batcher": {"max_batch": 8, "max_delay_ms": max_delay_ms},
                               "api": {"enabled": True, "port": 0}})).start()


def infer(agent, x, **opts):
    status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": x.tolist(), "input": "model", **opts}))
    assert status == 200, body
    return np.asarray(body["outputs"]["y"], np.float32)


def test_reset_option_restarts_a_stream_equal_to_raw_onnxruntime(tmp_path, model):
    path, pkg = model
    xs = np.random.default_rng(0).standard_normal((6, F)).astype(np.float32)
    continued = raw_stream(path, xs)
    fresh = raw_stream(path, xs[3:])  # the stream restarted at window 3
    assert not np.allclose(continued[3], fresh[0], atol=1e-3)  # the test can tell the two apart
    agent = make_agent(tmp_path, pkg)
    try:
        got = [infer(agent, xs[i], stream="mic") for i in range(3)]
        got += [infer(agent, xs[3], stream="mic", reset=True)]
        got += [infer(agent, xs[i], stream="mic") for i in (4, 5)]
        np.testing.assert_allclose(np.stack(got[:3]), np.stack(continued[:3]), atol=1e-5)
        np.testing.assert_allclose(np.stack(got[3:]), np.stack(fresh), atol=1e-5)
        # In the query string too, and a reset needs a stream to restart: one line, 400.
        status, body, _ = call(agent, "POST", "/v1/infer?input=model&stream=mic&reset=1",
                               json.dumps({"x": xs[3].tolist()}))
        assert status == 200 and np.allclose(body["outputs"]["y"], fresh[0], atol=1e-5)
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": xs[0].tolist(), "reset": True}))
        assert status == 400 and "give the stream id" in body["error"] and "\n" not in body["error"]
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": xs[0].tolist(), "stream": "a",
                                                                        "reset": "maybe"}))
        assert status == 400 and "reset must be true or false" in body["error"]
    finally:
        agent.stop()


def test_reset_is_ordered_behind_windows_still_queued(tmp_path, model):
    """Windows queued before the restarting one still continue the old state; the restart then
    starts afresh (forgetting the state first would let a queued window store it back)."""
    path, pkg = model
    xs = np.random.default_rng(1).standard_normal((5, F)).astype(np.float32)
    continued = raw_stream(path, xs[:3])
    fresh = raw_stream(path, xs[3:])
    agent = make_agent(tmp_path, pkg, max_delay_ms=50.0)  # everything below queues together
    try:
        futs = [agent.submit(xs[i], preprocess=False, stream="s") for i in range(3)]
        futs.append(agent.submit(xs[3], preprocess=False, stream="s", reset=True))
        futs.append(agent.submit(xs[4], preprocess=False, stream="s"))
        got = [f.result(10).outputs["y"] for f in futs]
        np.testing.assert_allclose(np.stack(got[:3]), np.stack(continued), atol=1e-5)
        np.testing.assert_allclose(np.stack(got[3:]), np.stack(fresh), atol=1e-5)
        assert agent.batcher.policy.counts["batches"] == 5  # one row of the stream per batch, in order
        with pytest.raises(InputError, match="give the id of the stream"):
            agent.submit(xs[0], preprocess=False, reset=True)
    finally:
        agent.stop()


def test_streams_reset_route_forgets_one_stream_or_all(tmp_path, model):
    path, pkg = model
    xs = np.random.default_rng(2).standard_normal((3, F)).astype(np.float32)
    continued = raw_stream(path, xs)
    fresh = raw_stream(path, xs[2:])
    agent = make_agent(tmp_path, pkg)
    try:
        for name in ("a", "b"):
            infer(agent, xs[0], stream=name)
            infer(agent, xs[1], stream=name)
        status, body, _ = call(agent, "POST", "/v1/streams/reset", json.dumps({"stream": "a"}))
        assert status == 200 and body == {"ok": True, "stream": "a", "had_state": True}
        np.testing.assert_allclose(infer(agent, xs[2], stream="a"), fresh[0], atol=1e-5)
        np.testing.assert_allclose(infer(agent, xs[2], stream="b"), continued[2], atol=1e-5)  # b untouched
        status, body, _ = call(agent, "POST", "/v1/streams/reset", "{}")
        assert status == 200 and body["had_state"] is True and len(agent.handle.states) == 0
        status, body, _ = call(agent, "POST", "/v1/streams/reset", json.dumps({"stream": "nobody"}))
        assert status == 200 and body["had_state"] is False
        for bad in ('{"stream": 3}', '{"stream": "a", "x": 1}', "[1]", "{"):
            status, body, _ = call(agent, "POST", "/v1/streams/reset", bad)
            assert status == 400 and "\n" not in body["error"], (bad, body)
    finally:
        agent.stop()


def test_streams_reset_on_a_stateless_model_says_so(tmp_path):
    pkg = P.build(tmp_path / "mlp.edgepkg", make_mlp_onnx(tmp_path / "mlp.onnx"), name="mlp", version="1")
    agent = make_agent(tmp_path, pkg)
    try:
        status, body, _ = call(agent, "POST", "/v1/streams/reset", "{}")
        assert status == 409 and "keeps no stream state" in body["error"]
    finally:
        agent.stop()


def test_fresh_stream_is_the_plain_id_to_the_batch_policy():
    s = FreshStream("mic")
    assert s == "mic" and hash(s) == hash("mic") and type(str(s)) is str
