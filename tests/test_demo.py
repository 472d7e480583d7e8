"""``edgeship demo``: the pure parts directly, and ``edgeship demo --fast`` end to end through the CLI.

The end-to-end test runs the real command in a subprocess (real training,
real packages, the embedded amqtt broker, real agents, the real collector,
controller and package server) and then checks what it left behind — the
fleet DB, the devices' state folders and the report files — not what it
printed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from edgeship import demo

# ----------------------------------------------------------------------------- pure parts

def test_degrade_labels_shifts_only_the_chosen_digits():
    y = np.arange(10).repeat(3)
    out = demo.degrade_labels(y)
    assert out.tolist()[:15] == [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3 + [0] * 3
    assert out.tolist()[15:] == y.tolist()[15:]
    assert y.tolist() == np.arange(10).repeat(3).tolist()  # input untouched
    # A model that learns these labels is wrong on exactly the permuted digits.
    assert np.mean(out != y) == pytest.approx(len(demo.DEGRADED_CLASSES) / 10)


def test_judge_compares_prediction_with_the_true_label_in_the_ref():
    assert demo.judge("7", "123:7") == "correct"
    assert demo.judge("1", "123:7") == "incorrect"
    assert demo.judge(None, "123:7") is None
    assert demo.judge("7", None) is None
    assert demo.judge("7", "no-label") is None


def test_settings_fast_is_small_and_devices_are_checked():
    fast, full = demo.demo_settings(True), demo.demo_settings(False)
    assert fast.devices < full.devices and fast.soak_s < full.soak_s
    assert fast.teacher_epochs < full.teacher_epochs
    assert fast.stages_v2[-1] == 100 and fast.stages_v3[-1] == 100
    assert demo.demo_settings(True, devices=4).devices == 4
    with pytest.raises(demo.ConfigError, match="at least 2"):
        demo.demo_settings(True, devices=1)


def test_demo_gates_and_health_are_valid_for_the_rollout_logic():
    from edgeship import rollout as ro

    for fast in (True, False):
        s = demo.demo_settings(fast)
        gates = {g.name: g for g in map(ro.parse_gate, demo.demo_gates(s))}
        assert gates["negative_feedback"].min_samples == s.min_samples
        assert gates["negative_feedback"].threshold <= 0.05
        policy = ro.HealthPolicy(**demo.demo_health(s))
        assert policy.window_s == s.health_window_s


def test_digits_stream_rows_carry_their_true_label():
    images = np.arange(5 * 64, dtype=np.float32).reshape(5, 1, 8, 8)
    labels = np.array([3, 1, 4, 1, 5])
    src = demo.DigitsStream("d", images, labels, rate_hz=0, seed=1)
    src.open()
    block = src.read(32, timeout=0.1)
    assert block is not None and len(block) == 32 and len(block.refs) == 32
    for row, ref in zip(block.data, block.refs):
        i, lab = ref.split(":")
        assert np.array_equal(row, images[int(i)]) and int(lab) == labels[int(i)]
    src.close()


def test_digits_stream_is_rate_limited():
    images = np.zeros((3, 1, 8, 8), dtype=np.float32)
    src = demo.DigitsStream("d", images, np.array([0, 1, 2]), rate_hz=50.0)
    src.open()
    got, deadline = 0, time.monotonic() + 0.5
    while time.monotonic() < deadline:
        b = src.read(256, timeout=0.05)
        got += len(b) if b is not None else 0
    src.close()
    assert 10 <= got <= 40  # ~25 in 0.5 s at 50 Hz, never a burst of 256


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_demo_fast_end_to_end(tmp_path):
    from edgeship.fleet.db import FleetDB

    work, cache = tmp_path / "work", tmp_path / "cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "edgeship.cli", "demo", "--fast", "--workdir", str(work),
                           "--cache-dir", str(cache)], capture_output=True, text=True, timeout=240, env=env)
    took = time.monotonic() - t0
    assert proc.returncode == 0, f"demo failed after {took:.0f} s:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    result = json.loads((work / "demo.json").read_text())
    versions = result["versions"]
    v1, v2, v3 = versions["v1"], versions["v2"], versions["v3"]
    n_devices = len(result["devices"])
    assert n_devices >= 8

    with FleetDB.open(work / "fleet.sqlite") as db:
        rollouts = {r["package_version"]: r for r in db.rollouts_all()}
        assert set(rollouts) == {v1, v2, v3}

        # v2: promoted through every stage to 100 %, every device healthy on it.
        r2 = rollouts[v2]
        plan2 = json.loads(r2["plan"])
        assert r2["state"] == "completed"
        assert r2["stage_index"] == len(plan2["stages"]) - 1 and plan2["stages"][-1]["percent"] == 100
        assert len(plan2["stages"]) >= 2
        last2 = _last_report_per_device(db, r2["rollout_id"])
        assert len(last2) == n_devices
        assert {s for s in last2.values()} == {"healthy"}, last2

        # v3: aborted on the negative-feedback gate; every device that switched went back.
        r3 = rollouts[v3]
        assert r3["state"] == "aborted"
        assert "negative_feedback" in r3["reason"], r3["reason"]
        reports3 = db.rollout_reports(r3["rollout_id"])
        switched = {r["device"] for r in reports3 if r["state"] in ("active", "healthy")}
        assert switched, "no device ever ran v3: the gate had nothing to judge"
        last3 = _last_report_per_device(db, r3["rollout_id"])
        # Rolled back on the abort (or, for a device whose own health check tripped first, by itself).
        assert all(last3[d] in ("rolled_back", "failed") for d in switched), last3
        assert "rolled_back" in last3.values()
        fails = [g for e in db.rollout_gate_evals(r3["rollout_id"]) for g in _gates(e)
                 if g.get("name") == "negative_feedback" and g.get("verdict") == "fail"]
        assert fails and fails[0]["canary"] > fails[0]["control"]

        # Every device ends on v2, as the fleet DB (retained state) sees it ...
        devices = db.devices("demo")
        assert len(devices) == n_devices
        assert {d["model_version"] for d in devices} == {v2}, devices
        # ... and the field saw v3 as worse than v2.
        neg = {}
        for f in db.feedback():
            if f["kind"] in ("correct", "incorrect"):
                a = neg.setdefault(f["model_version"], [0, 0])
                a[0] += f["kind"] == "incorrect"
                a[1] += 1
        assert neg[v3][0] / neg[v3][1] > neg[v2][0] / neg[v2][1] + 0.2, neg

    # ... and as each device's own store says (state.json), v2 is active.
    v2_sha = json.loads(r2["plan"])["package"]["sha256"]
    for dev in result["devices"]:
        state = json.loads((work / "devices" / dev / "state.json").read_text())
        assert state["active"] == v2_sha, (dev, state)

    # The report: table + PNG plots + HTML, and a summary naming all three versions.
    report = work / "report"
    html = (report / "report.html").read_text()
    pngs = sorted(report.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    for p in pngs:
        assert p.name in html
    summary = json.loads((report / "summary.json").read_text())
    assert {v["version"] for v in summary["versions"]} >= {v1, v2, v3}
    assert str(report / "report.html") in proc.stdout


def _last_report_per_device(db, rollout_id: str) -> dict[str, str]:
    last: dict[str, str] = {}
    for r in db.rollout_reports(rollout_id):  # oldest first
        last[r["device"]] = r["state"]
    return last


def _gates(evaluation: dict) -> list[dict]:
    res = evaluation.get("results")
    if isinstance(res, str):
        res = json.loads(res)
    return res or []
