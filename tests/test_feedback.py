"""Feedback: pure checks, and the whole loop through a real agent, Mosquitto, collector and export."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import run_cli

from edgeship.agent.feedback import FeedbackManager, PredictionRing, check_feedback
from edgeship.agent.outbox import Outbox
from edgeship.errors import InputError


def test_check_feedback_values():
    assert check_feedback("correct", None) is None
    assert check_feedback("label", 7) == "7"
    assert check_feedback("rating", "4") == 4 and check_feedback("rating", 3.5) == 3.5
    assert check_feedback("comment", "blurry") == "blurry"
    for kind, value, match in [("great", None, "not one of"), ("label", None, "needs the correct label"),
                               ("rating", "five", "must be a number"), ("rating", float("nan"), "finite"),
                               ("comment", "  ", "non-empty"), ("incorrect", "x", "takes no value")]:
        with pytest.raises(InputError, match=match):
            check_feedback(kind, value)


def test_prediction_ring_is_bounded():
    r = PredictionRing(3)
    for i in range(5):
        r.add(f"p{i}", {"label": i})
    assert len(r) == 3 and r.get("p0") is None and r.get("p4") == {"label": 4}


def test_feedback_manager_attaches_kept_input(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", 1_000_000)
    fm = FeedbackManager(ob, "f", "d1", ring_size=10, inputs_dir=tmp_path / "inputs", max_input_bytes=10_000).start()
    try:
        x = np.arange(64, dtype=np.float32).reshape(1, 64)
        fm.remember("p1", label="c3", model={"name": "m", "version": "1"}, inputs={"input": x[0]})
        msg = fm.feedback("p1", "label", "c5")
        assert msg["predicted"] == "c3" and msg["value"] == "c5" and msg["model"]["version"] == "1"
        from edgeship.protocol import parse_array_field

        dtype, shape, raw = parse_array_field(msg["input"]["input"])
        assert (dtype, shape) == ("float32", (64,)) and np.array_equal(np.frombuffer(raw, np.float32), x[0])
        assert "input" not in fm.feedback("p1", "rating", 2)  # ratings do not carry the input
        with pytest.raises(InputError, match="not among the last 10"):
            fm.feedback("nope", "correct")
        assert len(ob) == 2
        # The byte cap holds: old batches' files are deleted.
        for i in range(50):
            fm.remember(f"q{i}", inputs={"input": x[0]})
        fm.stop(5)
        assert sum(p.stat().st_size for p in (tmp_path / "inputs").glob("*.npz")) <= 10_000
    finally:
        fm.stop(5)
        ob.close()


@pytest.mark.mqtt
def test_agent_feedback_loop_to_fleet_db_and_export(mosquitto, tmp_path):
    from test_agent import LABELS, build_mlp_package

    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config
    from edgeship.agent.link import FleetLink
    from edgeship.fleet.collector import Collector
    from edgeship.fleet.db import FleetDB
    from edgeship.mqtt import LinkOptions

    pkg = build_mlp_package(tmp_path / "pkg", "1.0.0")
    db_path = tmp_path / "fleet.sqlite"
    db = FleetDB.open(db_path)
    col = Collector(db, mosquitto.url, "fb", client_id="col-fb", link_options=LinkOptions(backoff_cap=0.5)).start()
    assert col.wait_ready(10)
    cfg = parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "state"), "device_id": "pi-7",
                                  "fleet": "fb"},
                        "api": {"enabled": True, "port": 0},
                        "mqtt": {"broker": mosquitto.url},
                        "telemetry": {"window_s": 3600},
                        "feedback": {"keep_inputs": True, "ring_size": 100}})
    agent = Agent(cfg)
    link = FleetLink.from_config(cfg).attach(agent)
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((20, 64)).astype(np.float32)
    try:
        agent.start()
        results = [agent.infer(x) for x in xs]
        assert link.link.wait_connected(10)
        # Python API, then the CLI through the agent's local HTTP API.
        agent.feedback(results[0].prediction_id, "label", "c3")
        agent.feedback(results[1].prediction_id, "correct")
        out = run_cli("agent", "feedback", results[2].prediction_id, "--incorrect", "--api", agent.api.url)
        assert "feedback stored" in out.stdout
        bad = run_cli("agent", "feedback", "no-such-id", "--correct", "--api", agent.api.url, check=False)
        assert bad.returncode == 1 and bad.stderr.startswith("error:") and "not among the last" in bad.stderr
        link.telemetry.flush()
    finally:
        agent.stop()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (db.message_counts().get("feedback", 0) < 3
                                               or not db.telemetry() or db.devices()[0]["online"]):
            time.sleep(0.05)
        fb = {r["prediction_id"]: r for r in db.feedback()}
        assert set(fb) == {r.prediction_id for r in results[:3]}
        assert all(r["model_version"] == "1.0.0" for r in fb.values())
        assert fb[results[0].prediction_id]["has_input"] == 1 and fb[results[2].prediction_id]["kind"] == "incorrect"
        tel = db.telemetry()
        assert sum(t["inferences"] for t in tel) == 20 and tel[0]["model_version"] == "1.0.0"
        body = json.loads(tel[0]["body"])  # the agent's own metrics ride along in the window
        assert body["batch_size"]["hist"]["count"] >= 1 and body["queue_depth"] == 0
        assert sum(body["classes"].values()) == 20 and body["latency_ms"]["p99"] > 0
        dev = db.devices()[0]
        assert dev["device"] == "pi-7" and dev["online"] == 0 and dev["model_version"] == "1.0.0"
    finally:
        col.stop()
        db.close()
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    out = run_cli("fleet", "export-feedback", "--db", str(db_path), "--out", str(tmp_path / "field.npz"),
                  "--labels", str(labels))
    assert "wrote 2 labelled samples" in out.stdout
    with np.load(tmp_path / "field.npz") as z:
        assert sorted(z.files) == ["input", "labels"]
        assert z["input"].shape == (2, 64) and z["labels"].dtype == np.int64
        assert z["labels"][0] == 3 and np.allclose(z["input"][0], xs[0])  # the corrected label, the real input
        assert z["labels"][1] == LABELS.index(results[1].label) and np.allclose(z["input"][1], xs[1])
    from edgeship.converters.data import load_data  # the layout the converters read

    ds = load_data(tmp_path / "field.npz", input_names=["input"])
    assert len(ds.labels) == 2
