"""Model shapes beyond one float image tensor (issue 20.4), through the agent and its HTTP API.

The models and packages come from tests/test_model_shapes.py. Every answer
is checked against raw onnxruntime run on that sample (or that stream) alone.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from test_agent_api import call
from test_model_shapes import (
    GRU_HIDDEN,
    KWS_LABELS,
    TEXT_LABELS,
    build_shape_packages,
    gru_reference,
    gru_windows,
    make_zoo_models,
    raw_ort,
)

from edgeship import package as P
from edgeship.agent import Agent
from edgeship.agent.config import parse_config
from edgeship.agent.sources import RawBlock, Source
from edgeship.errors import InputError

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def zoo_models(tmp_path_factory):
    return make_zoo_models(tmp_path_factory.mktemp("zoo-agent"))


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory, zoo_models):
    d = tmp_path_factory.mktemp("shape-pkgs-agent")
    out = build_shape_packages(d, zoo_models)
    out["map"] = P.build(d / "map.edgepkg", zoo_models["det"], name="map", version="1",
                         postprocess={"kind": "threshold", "output": "dense", "threshold": 0.5})
    return out


def make_agent(tmp_path, pkg, api: bool = False, max_delay_ms: float = 20.0, **sections) -> Agent:
    cfg = {"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "st")},
           "batcher": {"max_batch": 8, "max_delay_ms": max_delay_ms}, **sections}
    if api:
        cfg["api"] = {"enabled": True, "port": 0}
    return Agent(parse_config(cfg)).start()


# ------------------------------------------------------------------ state per stream

def test_interleaved_streams_keep_their_own_state(tmp_path, pkgs, zoo_models):
    a, b = gru_windows(6, seed=10), gru_windows(6, seed=11)
    want_a, _ = gru_reference(zoo_models["gru"], a)
    want_b, _ = gru_reference(zoo_models["gru"], b)
    with make_agent(tmp_path, pkgs["gru"]) as agent:
        # Interleaved without waiting: A0 B0 A1 B1 ... queue together, so the batcher packs A and B
        # into the slots of one batch; A's window i+1 must still wait for A's window i.
        futs = []
        for i in range(6):
            futs.append(("a", i, agent.submit(a[i], preprocess=False, stream="a")))
            futs.append(("b", i, agent.submit(b[i], preprocess=False, stream="b")))
        alone = agent.submit(a[3], preprocess=False)  # no stream: from the initial state, stores nothing
        for name, i, f in futs:
            want = (want_a if name == "a" else want_b)[i]
            r = f.result(10)
            np.testing.assert_allclose(r.outputs["logits"], want, atol=1e-4)
            assert set(r.outputs) == {"logits"} and r.label in KWS_LABELS
        np.testing.assert_allclose(alone.result(10).outputs["logits"], gru_reference(zoo_models["gru"], a[3:4])[0][0],
                                   atol=1e-4)
        counts = agent.batcher.policy.counts
        assert counts["batches"] < 13, counts  # streams shared batches (one row each per batch)
        assert sorted(agent.handle.states._rows) == ["a", "b"]

        # Two threads, each waiting for its own answers: the same numbers again after a reset.
        assert agent.reset_stream("a") and agent.reset_stream("b") and not agent.reset_stream("nope")
        got: dict = {"a": [], "b": []}

        def client(name, xs):
            for x in xs:
                got[name].append(agent.infer(x, preprocess=False, stream=name).outputs["logits"])

        threads = [threading.Thread(target=client, args=("a", a)), threading.Thread(target=client, args=("b", b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        np.testing.assert_allclose(np.stack(got["a"]), np.stack(want_a), atol=1e-4)
        np.testing.assert_allclose(np.stack(got["b"]), np.stack(want_b), atol=1e-4)


def test_a_model_switch_resets_every_stream(tmp_path, pkgs, zoo_models):
    w = gru_windows(4, seed=12)
    continued, _ = gru_reference(zoo_models["gru"], w)
    fresh = gru_reference(zoo_models["gru"], w[3:4])[0][0]
    assert not np.allclose(continued[3], fresh, atol=1e-3)  # the test can tell the two apart
    with make_agent(tmp_path, pkgs["gru"], max_delay_ms=0) as agent:
        for i in range(3):
            agent.infer(w[i], preprocess=False, stream="mic")
        sha2 = agent.store.install(pkgs["gru2"])
        agent.switch_to(sha2)
        assert agent.model["version"] == "2"
        np.testing.assert_allclose(agent.infer(w[3], preprocess=False, stream="mic").outputs["logits"], fresh,
                                   atol=1e-4)
        # Back to v1 (its handle kept in memory for the health window): also afresh, not v1's old state.
        agent.rollback()
        assert agent.model["version"] == "1"
        np.testing.assert_allclose(agent.infer(w[3], preprocess=False, stream="mic").outputs["logits"], fresh,
                                   atol=1e-4)


# ------------------------------------------------------------------ dynamic sizes

def test_mixed_detector_sizes_batch_only_when_compatible(tmp_path, pkgs, zoo_models):
    rng = np.random.default_rng(13)
    sizes = [(64, 64), (96, 64), (64, 128)] * 4
    xs = [rng.standard_normal((3, h, w)).astype(np.float32) for h, w in sizes]
    with make_agent(tmp_path, pkgs["det"]) as agent:
        futs = [agent.submit(x, preprocess=False) for x in xs]
        for x, f in zip(xs, futs):
            r = f.result(10)
            want = raw_ort(zoo_models["det"], {"image": x[None]})[0][0]
            np.testing.assert_allclose(r.outputs["dense"], want, atol=1e-4)
            assert all(d["label"] in ("cat", "dog") for d in r.to_dict()["detections"])
        counts = agent.batcher.policy.counts
        # 12 samples of 3 sizes queued together: at least 3 batches (one per size), fewer than 12.
        assert 3 <= counts["batches"] < 12, counts
        with pytest.raises(InputError, match="must be a multiple of 32"):
            agent.submit(np.zeros((3, 64, 40), np.float32), preprocess=False)


def test_scalar_values_never_share_a_batch(tmp_path, pkgs):
    x = np.random.default_rng(14).standard_normal((10, 16)).astype(np.float32)
    rates = [8000.0, 16000.0] * 5
    with make_agent(tmp_path, pkgs["scalar"], cache={"enabled": True}) as agent:
        futs = [agent.submit({"audio": xi, "rate": r}, preprocess=False) for xi, r in zip(x, rates)]
        for xi, r, f in zip(x, rates, futs):
            np.testing.assert_allclose(f.result(10).outputs["scaled"], xi * r / 16000, atol=1e-6)
        assert agent.batcher.policy.counts["batches"] < 10
        # The result cache tells the same audio at another rate apart.
        for r in (8000.0, 16000.0, 8000.0):
            np.testing.assert_allclose(agent.infer({"audio": x[0], "rate": r}, preprocess=False).outputs["scaled"],
                                       x[0] * r / 16000, atol=1e-6)
        assert agent.metrics.counters.snapshot()["cache_hits"] >= 1


# ------------------------------------------------------------------ the HTTP API

def test_http_api_labels_where_there_are_labels_arrays_otherwise(tmp_path, pkgs, zoo_models):
    w = gru_windows(3, seed=15)
    want, _ = gru_reference(zoo_models["gru"], w)
    with make_agent(tmp_path / "gru", pkgs["gru"], api=True, max_delay_ms=0) as agent:
        for i in range(3):
            status, body, _ = call(agent, "POST", "/v1/infer",
                                   json.dumps({"x": w[i].tolist(), "input": "model", "stream": "kitchen"}))
            assert status == 200, body
            np.testing.assert_allclose(body["outputs"]["logits"], want[i], atol=1e-4)
            assert body["label"] == KWS_LABELS[int(np.argmax(want[i]))]
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": w[0].tolist(), "stream": ""}))
        assert status == 400 and "stream must be a non-empty id" in body["error"]
        assert agent.handle.states.state_of("kitchen")[0].shape == (1, 1, GRU_HIDDEN)

    rng = np.random.default_rng(16)
    ids = rng.integers(0, 500, 16).astype(np.int64)
    mask = np.ones(16, np.int64)
    with make_agent(tmp_path / "text", pkgs["text"], api=True, max_delay_ms=0) as agent:
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps(
            {"inputs": {"ids": ids.tolist(), "mask": mask.tolist()}, "input": "model", "outputs": False}))
        want_t = raw_ort(zoo_models["text"], {"ids": ids[None], "mask": mask[None]})[0][0]
        assert status == 200 and body["label"] == TEXT_LABELS[int(np.argmax(want_t))], body
        assert len(body["top"]) == 2 and "outputs" not in body

    img = rng.standard_normal((3, 64, 96)).astype(np.float32)
    with make_agent(tmp_path / "det", pkgs["det"], api=True, max_delay_ms=0) as agent:
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": img.tolist(), "input": "model"}))
        assert status == 200 and isinstance(body["detections"], list) and "label" not in body
        np.testing.assert_allclose(body["outputs"]["dense"], raw_ort(zoo_models["det"], {"image": img[None]})[0][0],
                                   atol=1e-4)
        status, body, _ = call(agent, "POST", "/v1/infer",
                               json.dumps({"x": np.zeros((3, 50, 64)).tolist(), "input": "model"}))
        assert status == 400 and "multiple of 32" in body["error"]
    with make_agent(tmp_path / "map", pkgs["map"], api=True, max_delay_ms=0) as agent:
        status, body, _ = call(agent, "POST", "/v1/infer",
                               json.dumps({"x": img.tolist(), "input": "model", "outputs": False}))
        dense = raw_ort(zoo_models["det"], {"image": img[None]})[0][0]
        assert status == 200 and body["mask"] == (1 / (1 + np.exp(-dense)) >= 0.5).astype(int).tolist()
        assert "outputs" not in body and body["positive"] == pytest.approx(float(np.mean(dense >= 0)), abs=1e-3)

    x = rng.uniform(-3, 3, 64).astype(np.float32)
    with make_agent(tmp_path / "int8", pkgs["int8"], api=True, max_delay_ms=0) as agent:
        status, body, _ = call(agent, "POST", "/v1/infer", json.dumps({"x": x.tolist(), "input": "model"}))
        want_q = agent.handle.runner.run(x[None])["logits"][0]  # the runner: quantize in, dequantize out
        assert status == 200 and body["label"] == f"c{int(np.argmax(want_q))}"
        np.testing.assert_allclose(body["outputs"]["logits"], want_q, atol=1e-4)


class WindowSource(Source):
    """Consecutive windows of one audio stream, read in blocks (a microphone's reader)."""

    kind = "windows"

    def __init__(self, source_id: str, windows: np.ndarray) -> None:
        super().__init__(source_id)
        self.windows = windows
        self.pos = 0

    def read(self, max_n: int, timeout: float) -> RawBlock | None:
        if self.pos >= len(self.windows):
            self.exhausted = True
            return None
        block = self.windows[self.pos:self.pos + min(max_n, 3)]
        self.pos += len(block)
        return RawBlock(data=block, ts=float(self.pos))


class Collect:
    def __init__(self):
        self.rows: dict = {}

    def start(self):
        pass

    def stop(self, timeout):
        pass

    def on_result(self, r):
        self.rows.setdefault(r.source, []).append(r.outputs["logits"])


def test_each_source_of_a_stateful_model_is_one_stream(tmp_path, pkgs, zoo_models):
    a, b = gru_windows(7, seed=20), gru_windows(7, seed=21)
    got = Collect()
    agent = Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkgs["gru"]),
                                          "state_dir": str(tmp_path / "st")},
                                "batcher": {"max_batch": 8, "max_delay_ms": 5}}),
                  components=[got], sources=[WindowSource("mic1", a), WindowSource("mic2", b)])
    with agent:
        assert agent.wait_idle(30)
    for name, xs in (("mic1", a), ("mic2", b)):
        want, _ = gru_reference(zoo_models["gru"], xs)
        np.testing.assert_allclose(np.stack(got.rows[name]), np.stack(want), atol=1e-4)
