"""Field loop, one command (#22.5): the pure parts of `edgeship demo --loop`, then the command end to end
(real training, embedded broker, real agents with keep_inputs, collector, controller, SQLite, report)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from edgeship import demo_loop as dl
from edgeship import rollout as ro
from edgeship.converters import field as cf

# ----------------------------------------------------------------------------- pure parts

def test_shift_turns_and_thickens_digits():
    x = np.zeros((2, 1, 8, 8), np.float32)
    x[:, 0, 1, 2] = 16.0  # one dot, row 1, column 2
    r = dl.shift_digits(x, "rotate")
    assert r.shape == x.shape and r[0, 0, 5, 1] == 16.0 and r.sum() == x.sum()  # a quarter turn anticlockwise
    t = dl.shift_digits(x, "thick")
    assert t[0, 0, 1:3, 2:4].min() == 16.0 and t.sum() == 4 * x.sum()  # a 2x2 pen
    both = dl.shift_digits(x)
    assert both.max() <= 16.0 and both.sum() == 4 * x.sum() and not np.array_equal(both, t)
    assert x[0, 0, 1, 2] == 16.0 and x.sum() == 32.0  # input untouched
    with pytest.raises(ValueError):
        dl.shift_digits(x, "blur")


def test_partition_gives_every_device_its_own_digits():
    parts = [dl.partition(103, 8, i) for i in range(8)]
    allidx = np.concatenate(parts)
    assert len(allidx) == 103 and len(set(allidx.tolist())) == 103
    with pytest.raises(ValueError):
        dl.partition(10, 3, 3)


def test_mix_and_dedup():
    idx = cf.mix(700, 30, 0.3, seed=1)
    assert len(idx) == 300 and np.bincount(idx, minlength=30).min() == 10  # 30 samples, each 10 times
    assert len(cf.mix(700, 1000, 0.3)) == 300 and len(set(cf.mix(700, 1000, 0.3).tolist())) == 300  # subsampled
    assert len(cf.mix(700, 30, 0.0)) == 0 and len(cf.mix(700, 0, 0.5)) == 0
    with pytest.raises(ValueError):
        cf.mix(10, 10, 1.0)
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    keys = cf.row_keys({"x": np.concatenate([a, a[:1]])})
    assert keys[0] == keys[4] and len(set(keys)) == 4
    keep, dropped = cf.dedup(keys, exclude={keys[1]})
    assert keep == [0, 2, 3] and dropped == 2


def test_field_verdict_needs_a_gain_on_the_field_and_no_regression():
    ok = cf.field_verdict(original_new=95, original_serving=96, field_new=90, field_serving=60, min_gain=0,
                          max_regress=1.5, field_samples=100, original_samples=400)
    assert ok.ok and "better on the field" in ok.reason
    flat = cf.field_verdict(original_new=97, original_serving=96, field_new=60, field_serving=60, min_gain=0,
                            max_regress=1.5, field_samples=100, original_samples=400)
    assert not flat.ok and "does not beat the serving one" in flat.reason and "60.00 vs serving 60.00" in flat.reason
    worse = cf.field_verdict(original_new=90, original_serving=96, field_new=90, field_serving=60, min_gain=0,
                             max_regress=1.5, field_samples=100, original_samples=400)
    assert not worse.ok and "regresses on the original test set" in worse.reason
    none = cf.field_verdict(original_new=97, original_serving=96, field_new=0, field_serving=0, min_gain=0,
                            max_regress=1.5, field_samples=0, original_samples=400)
    assert not none.ok and "no held-out field samples" in none.reason


def test_phase_figures_per_phase_and_version():
    fb = [{"ts": 1, "device": "a", "kind": "correct", "model_version": "1.0.0"},
          {"ts": 2, "device": "b", "kind": "label", "value": "3", "predicted": "3", "model_version": "1.0.0"},
          {"ts": 11, "device": "a", "kind": "label", "value": "3", "predicted": "5", "model_version": "1.0.0"},
          {"ts": 12, "device": "b", "kind": "correct", "model_version": "1.0.0"},
          {"ts": 13, "device": "a", "kind": "rating", "value": 2, "model_version": "1.0.0"},
          {"ts": 21, "device": "a", "kind": "correct", "model_version": "1.1.0"}]
    tel = [{"ts": 5, "device": "a", "model_version": "1.0.0", "body": json.dumps({"drift": {"score": 0.1}})},
           {"ts": 15, "device": "a", "model_version": "1.0.0", "body": {"drift": {"score": 2.0, "alarm": True}}},
           {"ts": 16, "device": "b", "model_version": "1.0.0", "body": {"drift": {"score": 0.2, "alarm": False}}},
           {"ts": 17, "device": "b", "model_version": "1.0.0", "body": {"drift": {"enabled": False}}},
           # after the switch: low against its own reference, high against the one it replaced (v1's)
           {"ts": 22, "device": "a", "model_version": "1.1.0",
            "body": {"drift": {"score": 0.05, "alarm": False, "vs_previous": {"score": 3.0, "alarm": True}}}}]
    rows = dl.phase_figures(fb, tel, {"before": (0, 10), "shift": (10, 20), "after": (20, 30)}, shifted={"a"})
    by = {(r["phase"], r["version"]): r for r in rows}
    assert [r["phase"] for r in rows] == ["before", "shift", "after"]
    assert by["before", "1.0.0"]["negative_rate"] == 0.0 and by["before", "1.0.0"]["drift_score"] == 0.1
    s = by["shift", "1.0.0"]
    assert s["feedback"] == 2 and s["negative_rate"] == 0.5 and s["negative_rate_shifted"] == 1.0
    assert s["drift_score"] == pytest.approx(1.1) and s["drift_score_shifted"] == 2.0 and s["alarm_windows"] == 1
    a = by["after", "1.1.0"]
    assert a["negative_rate"] == 0.0 and a["drift_score"] == 0.05 and a["drift_score_vs_previous"] == 3.0
    assert s["drift_score_vs_previous"] is None  # nothing replaced yet
    table = dl.phase_table(rows)
    assert table.splitlines()[0].startswith("phase") and "50.0%" in table and "vs v1's reference" in table


def test_loop_settings_and_gates():
    from edgeship.drift import MIN_ALARM_SAMPLES

    for fast in (True, False):
        s = dl.loop_settings(fast)
        assert s.window_s * s.rate_hz >= MIN_ALARM_SAMPLES  # a window holds enough samples for a drift verdict
        gates = {g.name: g for g in map(ro.parse_gate, dl.loop_gates(s))}
        assert {"negative_feedback", "drift_score", "failures"} <= set(gates)
        assert s.stages[-1] == 100 and 0 < s.shift_share < 1
    with pytest.raises(dl.ConfigError):
        dl.loop_settings(True, devices=3)


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_demo_loop_fast_end_to_end(tmp_path):
    from edgeship.fleet.db import FleetDB

    work, cache = tmp_path / "work", tmp_path / "cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "edgeship.cli", "demo", "--loop", "--fast", "--workdir", str(work),
                           "--cache-dir", str(cache)], capture_output=True, text=True, timeout=420, env=env)
    took = time.monotonic() - t0
    assert proc.returncode == 0, f"demo --loop failed after {took:.0f} s:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    res = json.loads((work / "loop.json").read_text())
    events = [e["event"] for e in res["timeline"]]
    order = ["start", "shift", "alarm", "feedback", "export", "retrain", "retrained", "rollout", "completed",
             "recovered"]
    assert [e for e in events if e in order] == order
    # Collect: the export has provenance and held-out devices apart from the training ones.
    ex = res["export"]
    assert ex["samples"] >= 600 and ex["holdout"] > 0 and set(ex["holdout_devices"]) < set(ex["devices"])
    prov = json.loads((work / "field" / "field.json").read_text())
    assert {r["split"] for r in prov["samples"] if r["device"] in ex["holdout_devices"]} == {"holdout"}
    # Retrain: beats v1 on the held-out field set, within budget on the original test set.
    g = res["retrain"]["gate"]
    assert g["ok"] and g["field_new"] > g["field_serving"] and g["original_new"] >= g["original_serving"] - 3.0
    # Prove: the rollout ran on the field gates, waited for evidence, completed, every device on the new version.
    with FleetDB.open(work / "fleet.sqlite") as db:
        r = next(x for x in db.rollouts_all() if x["package_version"] == dl.RETRAINED_VERSION)
        plan = json.loads(r["plan"])
        assert r["state"] == "completed" and plan["on_insufficient"] == "wait"
        assert {"negative_feedback", "drift_score"} <= {x["name"] for x in plan["gates"]}
    assert "without evidence" not in (res["rollout"]["reason"] or "")
    neg = next(x for x in res["rollout"]["gates"] if x["name"] == "negative_feedback")
    assert neg["verdict"] == "pass" and neg["canary_n"] >= 30 and neg["canary"] < neg["control"]
    assert set(res["devices"].values()) == {dl.RETRAINED_VERSION}
    # Notice and recover: negative feedback and drift rise under the shift on v1, and fall on the new version.
    fig = {(x["phase"], x["version"]): x for x in res["figures"]}
    before, under = fig["before", dl.SERVING_VERSION], fig["shift", dl.SERVING_VERSION]
    after = fig["after", dl.RETRAINED_VERSION]
    assert under["negative_rate"] > before["negative_rate"] + 0.15
    assert under["drift_score_shifted"] > 3 * before["drift_score"]
    # The alarms are calibrated for the window's size: few before the shift (the fixed PSI 0.2 alarmed on most
    # windows of this size), and the loop acted on the first one after it (no 3x-baseline workaround).
    assert before["windows"] >= 8 and before["alarm_windows"] <= 0.3 * before["windows"], before
    # After the rollout the inputs are still shifted: lower against 1.1.0's reference (it holds the field data)
    # than against the one it replaced (the devices' vs_previous). Measured ratios: 5.4, 2.1, 1.48 (CI) and 1.43
    # (benchmark), so only the order is asserted: a 1.5x bound failed CI once.
    assert after["drift_score_vs_previous"] > after["drift_score"], after
    assert after["negative_rate"] < under["negative_rate"] - 0.15
    assert after["negative_rate_shifted"] < under["negative_rate_shifted"] - 0.3
    html = (work / "report" / "report.html").read_text()
    assert "Field loop" in html and "negative feedback" in html and "drift score" in html and "Timeline" in html
    assert "[7/7] after the rollout" in proc.stdout


def test_stage_salt_gives_every_stage_a_canary_and_a_control():
    """With 12 devices a 25 % stage is empty under about one salt in 30, and a rollout that waits for evidence
    then waits forever (a benchmark run hung so at stage 1); the loop picks a salt where every stage adds a device."""
    from edgeship.rollout import bucket

    devices = [f"pi-{i:02d}" for i in range(1, 13)]
    stages = (25, 50, 100)
    empty = next(f"r{k}" for k in range(2000) if min(bucket(d, f"r{k}") for d in devices) >= 25)  # such salts exist
    salt = dl.stage_salt(devices, stages, empty)
    assert salt != empty and salt.startswith(empty + "/")
    b = sorted(bucket(d, salt) for d in devices)
    assert b[0] < 25 and any(25 <= x < 50 for x in b) and b[-1] >= 50
    assert dl.stage_salt(devices, stages, empty) == salt  # reproducible
    ok = next(f"r{k}" for k in range(2000) if dl.stage_salt(devices, stages, f"r{k}") == f"r{k}")
    assert ok  # a salt that already works is kept
    with pytest.raises(dl.ConfigError):
        dl.stage_salt(devices[:2], (10, 20, 30, 100), "x", tries=50)
