"""Telemetry windows (pure aggregation, deltas, percentiles) and the retained state + last will."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edgeship import protocol
from edgeship.agent.outbox import Outbox
from edgeship.agent.telemetry import (
    TELEMETRY_REV,
    Telemetry,
    WindowAggregator,
    build_telemetry_body,
    counter_delta,
    hist_delta,
)
from edgeship.metrics import BATCH_BOUNDS, Histogram


def test_window_aggregation_and_reset():
    agg = WindowAggregator(now=100.0, max_classes=3)
    model = {"name": "m", "version": "2", "sha256": "ab"}
    for i in range(100):
        agg.record(float(i + 1), label=f"c{i % 5}", model=model)
    agg.record_batch(10, 5.0, labels=["c0"] * 10, model=model)
    agg.record_batch(3, np.array([1.0, 2.0, 3.0]), labels=None, model=model)
    w = agg.take(160.0)
    assert w.inferences == 113 and w.latency.count == 113
    # Only max_classes distinct labels are kept; the rest count as _other, nothing is lost.
    assert len(w.classes) == 4 and sum(w.classes.values()) == 110 and w.classes["_other"] == 40
    body = build_telemetry_body(w, now=160.0, counters={"errors": 2, "rejected": 1, "cache_hits": 3,
                                                       "cache_misses": 1, "batches": 9},
                                outbox_dropped=4, queue_depth=7, cpu_percent=12.5, rss_bytes=1000,
                                extra={"drift": {"score": 0.1}, "counts": "must not overwrite"})
    assert body["rev"] == TELEMETRY_REV and body["window_s"] == 60.0
    assert body["counts"] == {"inferences": 113, "errors": 2, "rejected": 1, "dropped": 0, "outbox_dropped": 4,
                              "cache_hits": 3, "cache_misses": 1, "batches": 9}
    assert body["cache_hit_rate"] == 0.75 and body["drift"] == {"score": 0.1}
    assert body["model"] == model
    # A valid v1 message that the collector accepts (JSON, schema).
    msg = protocol.make_message("telemetry", "d1", body)
    assert protocol.parse_message(protocol.device_topic("f", "d1", "telemetry"), protocol.encode(msg)).kind == "telemetry"
    nxt = agg.take(220.0)  # the next window starts empty, model carried over
    assert nxt.inferences == 0 and nxt.latency.count == 0 and nxt.model == model


def test_percentiles_of_a_window():
    agg = WindowAggregator(now=0.0)
    for v in np.linspace(1.0, 100.0, 1000):
        agg.record(float(v))
    lat = build_telemetry_body(agg.take(60.0), now=60.0)["latency_ms"]
    assert lat["p50"] == pytest.approx(50.5, rel=0.08)
    assert lat["p95"] == pytest.approx(95.0, rel=0.08)
    assert lat["p99"] == pytest.approx(99.0, rel=0.08)
    assert lat["p50"] <= lat["p95"] <= lat["p99"] <= 100.0
    assert Histogram.from_dict(lat["hist"]).count == 1000


def test_counter_and_histogram_deltas():
    assert counter_delta({"errors": 5, "x": 3, "flag": True}, {"errors": 2}) == {"errors": 3, "x": 3}
    assert counter_delta({"errors": 1}, {"errors": 9}) == {"errors": 1}  # agent restarted: counters reset
    h1, h2 = Histogram(BATCH_BOUNDS), Histogram(BATCH_BOUNDS)
    for v in (1, 2, 4):
        h1.add(v)
        h2.add(v)
    for v in (8, 8, 32):
        h2.add(v)
    d = Histogram.from_dict(hist_delta(h2.to_dict(), h1.to_dict()))
    assert d.count == 3 and d.percentile(50) == pytest.approx(8, abs=1)
    assert hist_delta(None, None) is None


def test_telemetry_flush_uses_agent_metrics_deltas(tmp_path):
    from edgeship.agent.agent import AgentMetrics

    m = AgentMetrics()
    m.counters.inc("errors", 4)  # before the window: not reported
    ob = Outbox(tmp_path / "o.sqlite", 1_000_000)
    tel = Telemetry(ob, "f", "d1", window_s=3600, metrics_snapshot=m.snapshot)
    m.counters.inc("errors", 2)
    m.counters.inc("rejected", 5)
    m.record_batch(8, 1.0, [(2.0, 8)])
    msg = tel.flush()
    assert msg["counts"]["errors"] == 2 and msg["counts"]["rejected"] == 5
    assert Histogram.from_dict(msg["batch_size"]["hist"]).count == 1
    assert msg["cpu_percent"] is not None and msg["rss_bytes"] > 0
    row = ob.peek(0, 10)[-1]
    assert row.kind == "telemetry" and json.loads(row.payload)["msg_id"] == msg["msg_id"]
    msg2 = tel.flush()
    assert msg2["counts"]["errors"] == 0 and msg2["batch_size"]["hist"]["count"] == 0
    ob.close()


@pytest.mark.mqtt
def test_state_online_then_will_offline_then_back_online(mosquitto, tmp_path):
    from edgeship.agent.link import FleetLink
    from edgeship.fleet.collector import Collector
    from edgeship.fleet.db import FleetDB
    from edgeship.mqtt import LinkOptions

    db = FleetDB.open(tmp_path / "f.sqlite")
    col = Collector(db, mosquitto.url, "st", client_id="col-state", link_options=LinkOptions(backoff_cap=0.5)).start()
    assert col.wait_ready(10)
    fl = FleetLink(state_dir=tmp_path / "state", fleet="st", device="pi-1", broker=mosquitto.url,
                   link_options=LinkOptions(backoff_base=0.2, backoff_cap=0.5, keepalive=5),
                   model_fn=lambda: {"name": "m", "version": "3", "sha256": "cd"})

    def online():
        rows = db.devices()
        return rows[0]["online"] if rows else None

    def wait_for(value, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and online() != value:
            time.sleep(0.05)
        return online() == value

    try:
        fl.start()
        assert wait_for(1)
        assert db.devices()[0]["model_version"] == "3"
        fl.link._client.socket().close()  # noqa: SLF001 - the network dies under the device
        assert wait_for(0), "the last will marks the device offline"
        assert wait_for(1), "after reconnecting, a newer session's online state wins"
        assert fl.link.health()["connects"] >= 2
    finally:
        fl.stop()
    assert wait_for(0), "a clean stop stores online: false"
    col.stop()
    db.close()
