"""The device agent end to end with real onnxruntime sessions: results, bad input, faults, overload, swaps.

``build_mlp_package`` is shared by the other agent test modules (imported from here).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from models import make_mlp_onnx, mlp_reference

from edgeship.agent import Agent
from edgeship.agent.config import parse_config
from edgeship.agent.results import Result
from edgeship.agent.sources import RawBlock, Source, SyntheticSource
from edgeship.errors import ConfigError, InputError, OverloadError, StoreError

LABELS = [f"c{i}" for i in range(10)]


def build_mlp_package(out_dir: Path, version: str = "1.0.0", seed: int = 0, *, dynamic_batch: bool = True,
                      name: str = "sensor", signing_key=None) -> Path:
    """A real .edgepkg holding the 64->64->10 MLP of tests/models.py (weights from ``seed``)."""
    from edgeship import package

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = make_mlp_onnx(out_dir / f"mlp-{version}-{seed}-{int(dynamic_batch)}.onnx", seed=seed,
                              dynamic_batch=dynamic_batch)
    return package.build(out_dir / f"{name}-{version}-{seed}-{int(dynamic_batch)}.edgepkg", onnx_path, name=name,
                         version=version, labels=LABELS, example_input=np.zeros((1, 64), np.float32),
                         signing_key=signing_key)


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pkgs")
    return {"v1": build_mlp_package(d, "1.0.0", seed=0), "v2": build_mlp_package(d, "2.0.0", seed=1),
            "fixed1": build_mlp_package(d, "1.0.0-b1", seed=0, dynamic_batch=False)}


def make_agent(tmp_path, pkg, sink_objects=(), **sections) -> Agent:
    data = {"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "state")}}
    for k, v in sections.items():
        data[k] = v
    return Agent(parse_config(data), sinks=sink_objects)


def ref(x, seed=0):
    return mlp_reference(np.asarray(x, np.float32).reshape(-1, 64), seed=seed)


# -- results ------------------------------------------------------------------------

def test_infer_returns_a_complete_result(tmp_path, pkgs):
    x = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    with make_agent(tmp_path, pkgs["v1"]) as agent:
        r = agent.infer(x)
    assert isinstance(r, Result)
    np.testing.assert_allclose(r.outputs["logits"], ref(x)[0], rtol=1e-4, atol=1e-5)
    assert r.label == LABELS[int(ref(x)[0].argmax())] and 0 < r.score <= 1
    assert r.model["name"] == "sensor" and r.model["version"] == "1.0.0" and len(r.model["sha256"]) == 64
    assert r.prediction_id.startswith(agent.run_id) and r.source == "api" and r.latency_ms > 0
    assert [lab for lab, _ in r.top][0] == r.label
    json.dumps(r.to_dict())  # serialisable


def test_concurrent_submits_get_their_own_rows(tmp_path, pkgs):
    xs = np.random.default_rng(2).standard_normal((400, 64)).astype(np.float32)
    with make_agent(tmp_path, pkgs["v1"], batcher={"max_batch": 16, "max_delay_ms": 1.0}) as agent:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futs = list(pool.map(lambda x: agent.submit(x), xs))
        outs = np.stack([f.result(10).outputs["logits"] for f in futs])
        ids = {f.result().prediction_id for f in futs}
        hist = agent.metrics.batch_size
    np.testing.assert_allclose(outs, ref(xs), rtol=1e-4, atol=1e-4)
    assert len(ids) == 400
    assert hist.max > 1  # requests from several threads were batched together


def test_fixed_batch_model_pads_and_runs_one_by_one(tmp_path, pkgs):
    xs = np.random.default_rng(3).standard_normal((10, 64)).astype(np.float32)
    with make_agent(tmp_path, pkgs["fixed1"], batcher={"max_batch": 8}) as agent:
        assert agent.handle.model_batch == 1
        futs = [agent.submit(x) for x in xs]
        outs = np.stack([f.result(10).outputs["logits"] for f in futs])
    np.testing.assert_allclose(outs, ref(xs), rtol=1e-4, atol=1e-4)


# -- bad input from the API ------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (np.zeros(63, np.float32), "shape"),
    (np.array(["a"] * 64), "not numeric"),
    (np.full(64, np.nan, np.float32), "NaN"),
    (np.zeros((2, 64), np.float32), "shape"),
])
def test_bad_api_input_is_rejected_counted_and_agent_keeps_serving(tmp_path, pkgs, bad, match):
    with make_agent(tmp_path, pkgs["v1"]) as agent:
        with pytest.raises(InputError, match=match):
            agent.submit(bad)
        assert agent.metrics.counters["rejected"] == 1
        r = agent.infer(np.ones(64, np.float32))
        assert r.label is not None and agent.health()["status"] == "ok"


# -- bad input and faults from sources ----------------------------------------------------

@pytest.mark.parametrize("reader", ["thread", "process"])
def test_bad_rows_from_a_source_are_rejected_with_reasons(tmp_path, pkgs, caplog, reader):
    good = np.random.default_rng(4).standard_normal((20, 64)).round(3)
    lines = ["[" + ",".join(map(str, r)) + "]" for r in good]
    lines.insert(3, "[" + ",".join(["1.0"] * 63) + "]")         # wrong width
    lines.insert(7, "[" + ",".join(["NaN"] + ["1.0"] * 63) + "]")  # NaN
    lines.insert(11, "not json at all")
    src = tmp_path / "s.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    agent = make_agent(tmp_path, pkgs["v1"],
                       sources=[{"type": "jsonl", "id": "imu", "path": str(src), "reader": reader}],
                       sinks=[{"type": "jsonl", "path": str(out), "outputs": True}])
    with caplog.at_level(logging.WARNING, "edgeship.agent"), agent:
        assert agent.wait_idle(20)
        counters = agent.metrics.counters.snapshot()
        health = agent.health()
        r = agent.infer(good[0].astype(np.float32))  # still serving
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    api_rows = [row for row in rows if row["source"] == "api"]
    src_rows = [row for row in rows if row["source"] == "imu"]
    assert len(src_rows) == 20 and len(api_rows) == 1 and counters["rejected"] == 3
    np.testing.assert_allclose(np.array([row["outputs"]["logits"] for row in src_rows]), ref(good), atol=1e-3)
    reasons = " ".join(x["reason"] for x in health["recent_rejects"]) + caplog.text
    assert "NaN" in reasons and ("shape" in reasons or "JSON" in reasons)
    assert r.label is not None


class FlakySource(Source):
    """Raises on its second read for its first ``failures`` openings, then reads normally."""

    kind = "flaky"

    def __init__(self, source_id, failures=2, total=50):
        super().__init__(source_id)
        self.failures, self.total, self.opens, self.made, self.reads = failures, total, 0, 0, 0

    def open(self):
        super().open()
        self.opens += 1
        self.reads = 0

    def read(self, max_n, timeout):
        self.reads += 1
        if self.opens <= self.failures and self.reads == 2:
            raise OSError("sensor unplugged")
        n = min(5, self.total - self.made)
        if n <= 0:
            self.exhausted = True
            return None
        self.made += n
        return RawBlock(data=np.ones((n, 64), np.float32), ts=time.time())


class StallingSource(Source):
    kind = "stalling"

    def __init__(self, source_id):
        super().__init__(source_id)
        self.release = threading.Event()
        self.entered = threading.Event()

    def read(self, max_n, timeout):
        self.entered.set()
        self.release.wait(60)  # ignores its timeout: a badly written plug-in
        return None


def test_source_that_raises_restarts_with_backoff_and_others_continue(tmp_path, pkgs):
    flaky = FlakySource("flaky", failures=2, total=50)
    steady = SyntheticSource("steady", shape=[64], count=300)
    with make_agent(tmp_path, pkgs["v1"]) as agent:
        pf = agent.add_source(flaky, backoff_base_s=0.01, block_size=5)
        agent.add_source(steady, block_size=50)
        assert agent.wait_idle(20)
        h = {s["id"]: s for s in agent.health()["sources"]}
    assert h["flaky"]["restarts"] == 2 and h["flaky"]["errors"] == 2 and "unplugged" in h["flaky"]["last_error"]
    assert h["flaky"]["samples"] == 50 and h["steady"]["samples"] == 300
    assert agent.metrics.counters["inferences"] == 350 and pf.finished


def test_source_that_stalls_is_reported_and_does_not_block_others_or_stop(tmp_path, pkgs):
    stall = StallingSource("stuck")
    steady = SyntheticSource("steady", shape=[64], count=200)
    agent = make_agent(tmp_path, pkgs["v1"]).start()
    try:
        agent.add_source(stall, stall_s=0.1)
        agent.add_source(steady)
        assert stall.entered.wait(5)
        deadline = time.monotonic() + 10
        while agent.metrics.counters["inferences"] < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert agent.metrics.counters["inferences"] == 200
        deadline = time.monotonic() + 5
        while agent.health()["status"] != "degraded" and time.monotonic() < deadline:
            time.sleep(0.02)
        h = agent.health()
        assert h["status"] == "degraded" and {s["id"]: s["state"] for s in h["sources"]}["stuck"] == "stalled"
        t0 = time.monotonic()
    finally:
        agent.stop(2.0)
    assert time.monotonic() - t0 < 8  # the stuck thread is abandoned, stop() returns
    stall.release.set()


def test_unreadable_images_are_rejected_others_answered(tmp_path):
    from PIL import Image

    from edgeship import package

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    good = folder / "ok0.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[:30])
    onnx_path = make_mlp_onnx(tmp_path / "img.onnx")
    pkg = package.build(tmp_path / "img.edgepkg", onnx_path, name="img", version="1", labels=LABELS,
                        preprocess={"scale": 1 / 255, "color": "L"}, example_input=np.zeros((1, 64), np.float32))
    out = tmp_path / "out.jsonl"
    agent = make_agent(tmp_path, pkg, sources=[{"type": "folder", "id": "cam", "path": str(folder), "workers": 2}],
                       sinks=[{"type": "jsonl", "path": str(out), "outputs": True}])
    with agent:
        assert agent.wait_idle(20)
        rejected = agent.metrics.counters["rejected"]
        reasons = [r["reason"] for r in agent.health()["recent_rejects"]]
    rows = {json.loads(line)["ref"]: json.loads(line) for line in out.read_text().splitlines()}
    assert sorted(rows) == ["ok0.png", "ok1.png", "ok2.png"] and rejected == 2
    assert all("decode" in r or "unreadable" in r for r in reasons)
    x = np.asarray(Image.open(folder / "ok1.png"), np.float32).reshape(1, 64) / 255
    np.testing.assert_allclose(rows["ok1.png"]["outputs"]["logits"], ref(x)[0], atol=1e-4)


# -- overload ----------------------------------------------------------------------------

def _flood(agent, n, threads=4):
    # Several producers: one alone never overflows the queue, because a submit
    # that finds the runner free runs its batch on the caller's thread.
    lock = threading.Lock()
    refused, futs = [0], []

    def produce(k):
        mine, bad = [], 0
        for i in range(k, n, threads):
            try:
                mine.append(agent.submit(np.full(64, i % 7, np.float32)))
            except OverloadError:
                bad += 1
        with lock:
            futs.extend(mine)
            refused[0] += bad

    ts = [threading.Thread(target=produce, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return futs, refused[0]


@pytest.mark.parametrize("policy", ["reject", "drop_oldest", "block"])
def test_request_flood_applies_policy_with_exact_counts(tmp_path, pkgs, policy):
    import tracemalloc

    pause = threading.Event()

    class SlowSink:  # ~1 ms per batch: the producer below is always faster, so the queue fills
        def write(self, batch):
            pause.wait(0.001)

        def close(self):
            pass

    agent = make_agent(tmp_path, pkgs["v1"], [SlowSink()],
                       batcher={"max_batch": 1, "max_delay_ms": 0, "queue_size": 32, "overload": policy,
                                "block_timeout_ms": 1})
    with agent:
        tracemalloc.start()
        futs, refused = _flood(agent, 3000)
        done, _ = concurrent.futures.wait(futs, timeout=30)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        answered = sum(1 for f in futs if f.exception() is None)
        dropped_f = sum(1 for f in futs if isinstance(f.exception(), OverloadError))
        c = agent.metrics.counters.snapshot()
        pc = agent.batcher.policy.counts
    assert len(done) == len(futs)
    assert answered + dropped_f + refused == 3000
    assert c["inferences"] == answered and c["overload_rejected"] == refused == pc["rejected"]
    assert c["dropped"] == dropped_f == pc["dropped"]
    assert pc["accepted"] == answered + dropped_f
    if policy == "drop_oldest":
        assert refused == 0 and dropped_f > 0
    else:
        assert dropped_f == 0 and refused > 0
    # bounded: the futures we hold are most of it; the queue never held more than 32 samples
    assert peak < 20_000_000


# -- cache ------------------------------------------------------------------------------

def test_result_cache_hits_skip_inference(tmp_path, pkgs):
    out = tmp_path / "out.jsonl"
    agent = make_agent(tmp_path, pkgs["v1"], cache={"enabled": True, "max_entries": 16},
                       sinks=[{"type": "jsonl", "path": str(out)}])
    with agent:
        # the 4 distinct samples once (all misses), then 400 repeats of them (all hits)
        agent.add_source(SyntheticSource("warm", shape=[64], count=4, distinct=4, seed=7))
        assert agent.wait_idle(20)
        agent.add_source(SyntheticSource("rep", shape=[64], count=400, distinct=4, seed=7), block_size=50)
        assert agent.wait_idle(20)
        x = np.ones(64, np.float32)
        first, second = agent.infer(x), agent.infer(x)
        c = agent.metrics.counters.snapshot()
        stats = agent.cache.stats()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 406
    assert c["inferences"] == 5 and c["cache_hits"] == 401 and c["cache_misses"] == 5
    assert stats["hits"] == 401 and stats["entries"] == 5
    assert second.cached and np.allclose(first.outputs["logits"], second.outputs["logits"])
    cached_rows = [r for r in rows if r.get("cached")]
    assert len(cached_rows) == 401 and all(r["source"] in ("rep", "api") for r in cached_rows)


# -- sinks and components ---------------------------------------------------------------------

class Recorder:
    """A component as the telemetry engineer writes one: start/stop plus a result hook."""

    def __init__(self, per_batch: bool):
        self.started = self.stopped = False
        self.rows = 0
        self.results: list = []
        if per_batch:
            self.on_batch = self._on_batch
        else:
            self.on_result = self.results.append

    def _on_batch(self, batch):
        self.rows += batch.n

    def start(self):
        self.started = True

    def stop(self, timeout):
        self.stopped = True

    def health(self):
        return {"rows": self.rows}


def test_components_and_callback_sink_see_every_result(tmp_path, pkgs):
    got = []
    per_batch, per_result = Recorder(True), Recorder(False)
    cfg = parse_config({"agent": {"allow_unsigned": True, "package": str(pkgs["v1"]), "state_dir": str(tmp_path / "st")},
                        "sources": [{"type": "synthetic", "id": "syn", "shape": [64], "count": 100}],
                        "sinks": [{"type": "callback", "name": "app"}]})
    agent = Agent(cfg, callbacks={"app": got.append}, components=[per_batch])
    with agent:
        agent.add_component(per_result)
        assert per_result.started
        assert agent.wait_idle(20)
        agent.infer(np.zeros(64, np.float32))
        assert agent.health()["components"]["Recorder"]["rows"] == 101
    assert per_batch.rows == 101 and per_batch.stopped and per_result.stopped
    assert len(got) == 101 and all(isinstance(r, Result) for r in got)
    assert len({r.prediction_id for r in got}) == 101
    assert len(per_result.results) >= 1



class SlowInputHook:
    """A component that reads each batch's inputs slowly, as a drift monitor on a busy device might."""

    def __init__(self):
        self.pairs = []

    def start(self):
        pass

    def stop(self):
        pass

    def on_batch_inputs(self, batch, inputs):
        time.sleep(0.002)  # the runner meanwhile packs and runs the next batches
        self.pairs.append((inputs[0].copy(), batch.outputs[0].copy()))


def test_input_hooks_see_their_own_batch_while_the_next_one_runs(tmp_path, pkgs):
    hook = SlowInputHook()
    cfg = parse_config({"agent": {"allow_unsigned": True, "package": str(pkgs["v1"]), "state_dir": str(tmp_path / "st")},
                        "batcher": {"max_batch": 8, "max_delay_ms": 0},
                        "sources": [{"type": "synthetic", "id": "syn", "shape": [64], "count": 400}]})
    with Agent(cfg, components=[hook]) as agent:
        assert agent.wait_idle(30)
    assert sum(len(x) for x, _ in hook.pairs) == 400 and len(hook.pairs) >= 50
    for x, out in hook.pairs:  # inputs and outputs of one batch belong together
        np.testing.assert_allclose(out, ref(x), rtol=1e-4, atol=1e-5)


def test_feedback_without_component_says_so(tmp_path, pkgs):
    from edgeship.agent.agent import FeedbackUnavailableError

    with make_agent(tmp_path, pkgs["v1"]) as agent:
        r = agent.infer(np.zeros(64, np.float32))
        with pytest.raises(FeedbackUnavailableError, match="not enabled"):
            agent.feedback(r.prediction_id, "correct")


# -- model swaps -----------------------------------------------------------------------------

def test_switch_under_load_drops_nothing_and_never_mixes_models(tmp_path, pkgs):
    from edgeship.agent.store import ModelStore

    store = ModelStore(tmp_path / "state")
    sha2 = store.install(pkgs["v2"])
    agent = make_agent(tmp_path, pkgs["v1"], batcher={"max_batch": 8, "max_delay_ms": 0.5}).start()
    results, errors = [], []
    stop = threading.Event()
    x = np.random.default_rng(6).standard_normal((1, 64)).astype(np.float32)

    def load():
        while not stop.is_set():
            try:
                results.append(agent.infer(x[0]))
            except Exception as exc:  # recorded and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        while len(results) < 50:
            time.sleep(0.005)
        handle = agent.load_candidate(sha2)
        n_before = len(results)
        agent.switch_to(handle)
        while len(results) < n_before + 50:
            time.sleep(0.005)
        agent.rollback()
        n_rb = len(results)
        while len(results) < n_rb + 50:
            time.sleep(0.005)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        agent.stop()
    assert not errors
    expect = {"1.0.0": ref(x, seed=0)[0], "2.0.0": ref(x, seed=1)[0]}
    versions = [r.model["version"] for r in results]
    assert "2.0.0" in versions and versions[-1] == "1.0.0"
    for r in results:  # every answer comes from exactly the model it names
        np.testing.assert_allclose(r.outputs["logits"], expect[r.model["version"]], atol=1e-4)
    assert ModelStore(tmp_path / "state").state()["active"] == agent.model["sha256"]
    assert agent.metrics.counters["switches"] == 1 and agent.metrics.counters["rollbacks"] == 1


def test_restart_keeps_the_switched_model(tmp_path, pkgs):
    from edgeship.agent.store import ModelStore

    with make_agent(tmp_path, pkgs["v1"]) as agent:
        sha2 = agent.store.install(pkgs["v2"])
        agent.switch_to(sha2)
    # [agent] package still names v1, but the store's active model (v2) wins on restart
    with make_agent(tmp_path, pkgs["v1"]) as agent:
        assert agent.model["version"] == "2.0.0"
    assert ModelStore(tmp_path / "state").previous is not None


# -- corrupt package at start -----------------------------------------------------------------

def _corrupt(store, sha):
    f = store.files_dir(sha) / "model.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def test_corrupt_active_package_falls_back_to_previous(tmp_path, pkgs, caplog):
    from edgeship.agent.store import ModelStore

    store = ModelStore(tmp_path / "state")
    sha1 = store.install(pkgs["v1"])
    store.activate(sha1)
    sha2 = store.install(pkgs["v2"])
    store.activate(sha2)
    _corrupt(store, sha2)
    with caplog.at_level(logging.ERROR, "edgeship.agent"):
        agent = Agent(parse_config({"agent": {"allow_unsigned": True, "state_dir": str(tmp_path / "state")}}))
        with agent:
            assert agent.model["sha256"] == sha1
            assert agent.infer(np.zeros(64, np.float32)).model["version"] == "1.0.0"
    refusal = [r for r in caplog.records if "refusing the active model" in r.getMessage()]
    assert len(refusal) == 1 and "\n" not in refusal[0].getMessage() and "sha256" in refusal[0].getMessage()
    st = ModelStore(tmp_path / "state").state()
    assert st["active"] == sha1 and not (tmp_path / "state" / "store" / sha2).exists()


def test_corrupt_active_package_without_fallback_refuses_to_start(tmp_path, pkgs):
    from edgeship.agent.store import ModelStore

    store = ModelStore(tmp_path / "state")
    sha1 = store.install(pkgs["v1"])
    store.activate(sha1)
    _corrupt(store, sha1)
    agent = Agent(parse_config({"agent": {"allow_unsigned": True, "state_dir": str(tmp_path / "state")}}))
    with pytest.raises(StoreError) as err:
        agent.start()
    assert "corrupt" in str(err.value) and "\n" not in str(err.value)
    assert not agent.running


def test_empty_store_without_package_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match=r"\[agent\] package"):
        Agent(parse_config({"agent": {"allow_unsigned": True, "state_dir": str(tmp_path / "st")}})).start()


# -- config --------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, key", [
    ({"batcher": {"max_batch": 0}}, "[batcher] max_batch"),
    ({"batcher": {"overload": "panic"}}, "[batcher] overload"),
    ({"batcher": {"max_batch": "8"}}, "[batcher] max_batch"),
    ({"agent": {"colour": 1}}, "[agent] colour"),
    ({"mqtt": {"broker": "tcp://x"}}, "[mqtt] broker"),
    ({"sinks": [{"type": "jsonl"}]}, "[sinks.0] path"),
    ({"sources": [{"id": "a"}]}, "[sources.0] type"),
    ({"nonsense": {}}, "[nonsense]"),
])
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert str(err.value).startswith(key)


def test_example_config_parses_and_cli_prints_it(tmp_path):
    import tomllib

    from conftest import run_cli

    from edgeship.agent.config import EXAMPLE_CONFIG, load_config

    cfg = parse_config(tomllib.loads(EXAMPLE_CONFIG))
    assert cfg.batcher.max_batch == 32 and cfg.sources[0].options["path"] == "/run/sensors/imu.jsonl"
    assert cfg.mqtt.keepalive == 30 and cfg.outbox.max_bytes == 50_000_000 and cfg.adapt.latency_budget_ms is None
    out = run_cli("agent", "config", "--example").stdout
    assert out == EXAMPLE_CONFIG
    p = tmp_path / "agent.toml"
    p.write_text(out.replace('state_dir = "/var/lib/edgeship"', 'state_dir = "st"'))
    assert load_config(p).agent.state_dir == str(tmp_path / "st")
    bad = tmp_path / "bad.toml"
    bad.write_text("[batcher]\nmax_batch = -1\n")
    proc = run_cli("agent", "run", "--config", str(bad), check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: [batcher] max_batch: must be >= 1 (got -1)"


def test_import_is_light():
    code = ("import sys, edgeship.agent.agent, edgeship.agent.api, edgeship.agent.sources, edgeship.agent.store;"
            "bad=[m for m in ('torch','onnx','tensorflow','edgeship.converters') if m in sys.modules];"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stderr


def test_bench_cli_reports_every_figure(pkgs):
    from conftest import run_cli

    out = json.loads(run_cli("bench", str(pkgs["v1"]), "--json", "--seconds", "0.1").stdout)
    assert out["backend"].startswith("onnxruntime") and out["load_s"] > 0 and out["warmup_s"] >= 0
    assert set(out["raw_throughput"]) == set(out["agent_throughput"]) == {"1", "8", "32"}
    assert all(v > 0 for v in [*out["raw_throughput"].values(), *out["agent_throughput"].values()])
    for key in ("raw_latency_ms_b1", "agent_latency_ms_b1"):
        s = out[key]
        assert 0 < s["p50"] <= s["p95"] <= s["p99"]
    assert out["rss_mb_agent"] > 10
    text = run_cli("bench", str(pkgs["v1"]), "--seconds", "0.05").stdout
    assert "p50" in text and "through the agent" in text and "RSS" in text


def test_lazy_result_fields_match_the_batch_computation():
    # API results leave label/score/top to the caller's first read; they must equal
    # what the batch path (sinks) computes for the same rows.
    from edgeship.agent.results import Result, ResultBatch

    rng = np.random.default_rng(7)
    logits = rng.standard_normal((6, 10)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)  # a model with a softmax at the end
    for outs in (logits, probs):
        batch = ResultBatch(model={"name": "m", "version": "1"}, output_names=["logits"], outputs=[outs], n=6,
                            id_prefix="r-", id_base=0, source="s", ts=0.0, latency_ms=1.0, labels=LABELS)
        for i, eager in enumerate(batch.results()):
            lazy = Result(eager.prediction_id, {"logits": outs[i]}, eager.model, 1.0, "s", 0.0, labels=LABELS)
            assert lazy.label == eager.label and lazy.score == pytest.approx(eager.score, rel=1e-5)
            assert [lab for lab, _ in lazy.top] == [lab for lab, _ in eager.top]
            assert lazy.to_dict(outputs=False)["label"] == eager.label
    two = Result("x", {"a": outs[0], "b": outs[1]}, {}, 1.0, "s", 0.0, labels=LABELS)
    assert two.label is None and two.score is None and two.top is None  # not a single classifier output
