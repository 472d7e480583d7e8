"""Drift math (edgeship.drift): PSI, z, reference stats, constant-memory windows."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgeship import drift
from edgeship.errors import DataError, InputError, PackageFormatError


def test_psi_identical_is_zero_and_grows_with_shift():
    e = [10, 20, 30, 40]
    assert drift.psi(e, e) == pytest.approx(0.0, abs=1e-12)
    assert drift.psi(e, [1, 2, 3, 4]) == pytest.approx(0.0, abs=1e-12)  # counts vs proportions: same thing
    small = drift.psi(e, [12, 20, 30, 38])
    big = drift.psi(e, [40, 30, 20, 10])
    assert 0 < small < drift.PSI_WARN < drift.PSI_ALARM < big


def test_psi_matches_formula_and_smooths_empty_bins():
    e, a = np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5])
    got = drift.psi(e, a)
    eps = drift.PSI_EPSILON
    ee = np.maximum(e, eps) / np.maximum(e, eps).sum()
    expect = float(np.sum((a - ee) * np.log(a / ee)))
    assert got == pytest.approx(expect)
    assert math.isfinite(got) and got > 1.0  # mass where the reference had none is a large shift
    assert drift.psi([0, 0], [1, 1]) is None
    with pytest.raises(ValueError):
        drift.psi([1, 2], [1, 2, 3])


def test_psi_from_counts_aligns_labels():
    assert drift.psi_from_counts({"a": 5, "b": 5}, {"b": 5, "a": 5}) == pytest.approx(0.0, abs=1e-12)
    assert drift.psi_from_counts({"a": 10}, {"a": 5, "b": 5}) > drift.PSI_ALARM


def test_mean_shift_z_and_alarm_rule():
    assert drift.mean_shift_z(1.0, 2.0, 2.0) == pytest.approx(0.5)
    assert math.isfinite(drift.mean_shift_z(0.0, 0.0, 1.0))  # constant reference: floored std, finite
    assert drift.is_alarm(psi_value=drift.PSI_ALARM + 0.01)
    assert drift.is_alarm(z_value=-(drift.Z_ALARM + 0.01))
    assert not drift.is_alarm(psi_value=drift.PSI_ALARM - 0.01, z_value=drift.Z_ALARM - 0.01)
    assert not drift.is_alarm()


def _classifier_data(n, rng, shift=0.0):
    x = rng.random((n, 3, 4, 4)).astype(np.float32) + shift
    logits = rng.normal(size=(n, 5))
    logits[np.arange(n), rng.integers(0, 5, n)] += 4.0
    return x, logits


def test_reference_stats_layout_and_json_round_trip():
    rng = np.random.default_rng(0)
    x, logits = _classifier_data(500, rng)
    ref = drift.reference_stats(x, logits, labels=list("abcde"))
    assert json.loads(json.dumps(ref)) == ref  # JSON-ready, nothing numpy left
    g = ref["inputs"]["input"]
    assert g["axis"] == 1 and len(g["groups"]) == 3  # one group per image channel (NCHW)
    for grp in g["groups"]:
        assert grp["mean"] == pytest.approx(0.5, abs=0.03)
        assert sum(grp["hist"]) == 500 * 16 and len(grp["hist"]) == len(grp["edges"]) + 1
    out = ref["outputs"]
    assert out["task"] == "classifier" and sum(out["class_counts"]) == 500 and not out["probabilities"]
    assert sum(out["confidence"]["hist"]) == 500
    # channels-last and wide inputs
    nhwc = drift.reference_stats(np.moveaxis(x, 1, -1), layout="NHWC")
    assert nhwc["inputs"]["input"]["axis"] == -1 and len(nhwc["inputs"]["input"]["groups"]) == 3
    guessed = drift.reference_stats(rng.random((20, 8, 8, 3)))  # a small last axis reads as channels-last
    assert guessed["inputs"]["input"]["axis"] == -1
    wide = drift.reference_stats(rng.random((50, 100)))
    assert wide["inputs"]["input"]["axis"] is None and len(wide["inputs"]["input"]["groups"]) == 1
    reg = drift.reference_stats({"a": rng.random((50, 4))}, rng.random((50, 1)))
    assert reg["outputs"]["task"] == "regressor"


def test_reference_stats_bad_data_errors():
    with pytest.raises(DataError, match="no samples"):
        drift.reference_stats(np.zeros((0, 3)))
    with pytest.raises(DataError, match="rows"):
        drift.reference_stats(np.zeros((5, 3)), np.zeros((4, 2)))
    with pytest.raises(DataError, match="labels"):
        drift.reference_stats(np.zeros((5, 3)), np.zeros((5, 2)), labels=["a"])
    with pytest.raises(PackageFormatError, match="rev"):
        drift.WindowStats({"rev": 99})


def test_window_clean_vs_shifted_classifier():
    rng = np.random.default_rng(1)
    x, logits = _classifier_data(2000, rng)
    ref = json.loads(json.dumps(drift.reference_stats(x, logits)))
    w = drift.WindowStats(ref)
    for _ in range(5):
        xb, lb = _classifier_data(64, rng)
        w.update(xb, lb)
    clean = w.report()
    assert clean["samples"] == 320 and clean["alarm"] is False and clean["alarms"] == []
    assert clean["score"] < drift.PSI_WARN
    w.reset()
    xb, lb = _classifier_data(320, rng, shift=0.4)  # a brighter camera
    w.update(xb, lb)
    shifted = w.report()
    assert shifted["alarm"] is True and "input:input" in shifted["alarms"]
    assert shifted["inputs"]["input"]["psi"] > drift.PSI_ALARM and shifted["inputs"]["input"]["z"] > drift.Z_ALARM
    # predictions: a model suddenly unsure and stuck on one class
    w.reset()
    xb, _ = _classifier_data(320, rng)
    flat = np.zeros((320, 5))
    flat[:, 2] = 0.3
    w.update(xb, flat)
    r = w.report()
    assert "predictions" in r["alarms"] and r["predictions"]["psi"] > drift.PSI_ALARM
    assert r["predictions"]["confidence_psi"] > drift.PSI_ALARM
    assert sum(r["predictions"]["confidence_hist"]["counts"]) == 320


def test_small_window_is_not_judged():
    rng = np.random.default_rng(2)
    x, logits = _classifier_data(500, rng)
    w = drift.WindowStats(drift.reference_stats(x, logits))
    w.update(x[:10] + 5.0, logits[:10])
    r = w.report()
    assert r["alarm"] is None and r["alarms"] == [] and r["score"] > drift.PSI_ALARM  # scores still reported


def test_window_memory_is_constant_and_subsamples_large_batches():
    rng = np.random.default_rng(3)
    ref = drift.reference_stats(rng.random((64, 3, 32, 32), dtype=np.float32))
    w = drift.WindowStats(ref, max_values_per_update=1000)
    before = w.nbytes
    for _ in range(50):
        w.update(rng.random((16, 3, 32, 32), dtype=np.float32))
    assert w.nbytes == before
    acc = w._inputs["input"]
    assert 0 < acc.n[0] <= 50 * 1000  # subsampled: at most max_values per group per batch
    assert w.report()["score"] < drift.PSI_WARN  # the subsample still represents the data


def test_window_regressor_nonfinite_and_errors():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, 4))
    y = x[:, :1] * 2
    ref = drift.reference_stats({"f": x}, {"y": y})
    w = drift.WindowStats(ref)
    xb = x[:200].copy()
    xb[0, 0] = np.nan
    w.update({"f": xb}, {"y": y[:200]})
    r = w.report()
    assert r["nonfinite"] == 1 and r["predictions"]["psi"] < drift.PSI_ALARM
    w.update({"f": x[:200]}, {"y": y[:200] + 10.0})
    assert "predictions" in w.report()["alarms"]
    with pytest.raises(InputError):
        w.update({"f": rng.normal(size=(5, 7))})


def test_merge_equals_one_window():
    rng = np.random.default_rng(5)
    x, logits = _classifier_data(400, rng)
    ref = drift.reference_stats(x, logits)
    a, b, both = drift.WindowStats(ref), drift.WindowStats(ref), drift.WindowStats(ref)
    a.update(x[:100], logits[:100])
    b.update(x[100:250], logits[100:250])
    both.update(x[:100], logits[:100])
    both.update(x[100:250], logits[100:250])
    assert a.merge(b).report() == both.report()


# -- the agent component, with a real agent, package and telemetry outbox ---------------

def test_agent_drift_monitor_reports_clean_and_shifted_windows(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from models import make_mlp_onnx, mlp_reference

    from edgeship import package
    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config
    from edgeship.agent.drift import DriftMonitor
    from edgeship.agent.outbox import Outbox
    from edgeship.agent.telemetry import Telemetry

    rng = np.random.default_rng(0)
    ref_x = rng.normal(size=(2000, 64)).astype(np.float32)
    ref = drift.reference_stats(ref_x, mlp_reference(ref_x), labels=[f"c{i}" for i in range(10)])
    onnx_path = make_mlp_onnx(tmp_path / "mlp.onnx")
    pkg = package.build(tmp_path / "m.edgepkg", onnx_path, name="m", version="1.0.0",
                        labels=[f"c{i}" for i in range(10)], reference_stats=ref)
    agent = Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(tmp_path / "state")}}))
    outbox = Outbox(tmp_path / "outbox.sqlite", 10_000_000)
    tel = Telemetry(outbox, "f", "dev1", window_s=3600, metrics_snapshot=agent.metrics.snapshot)
    with agent:
        monitor = agent.add_component(DriftMonitor(agent))
        tel.add_fields(monitor.telemetry_fields)
        futs = [agent.submit(x) for x in rng.normal(size=(300, 64)).astype(np.float32)]
        [f.result(10) for f in futs]
        clean = tel.flush()["drift"]
        futs = [agent.submit(x) for x in (rng.normal(size=(300, 64)) * 0.2 + 1.5).astype(np.float32)]
        [f.result(10) for f in futs]
        shifted = tel.flush()["drift"]
    outbox.close()
    assert clean["samples"] == 300 and clean["alarm"] is False, clean
    assert clean["model"]["name"] == "m" and clean["model"]["version"] == "1.0.0"
    assert shifted["samples"] == 300 and shifted["alarm"] is True
    assert "input:input" in shifted["alarms"] and shifted["inputs"]["input"]["z"] > drift.Z_ALARM
    assert sum(shifted["predictions"]["confidence_hist"]["counts"]) == 300


# -- the fleet side: report section and the rollout gate ------------------------------

def _telemetry_msg(device, ts, drift_field, version="1.0.0"):
    from edgeship import protocol
    from edgeship.agent.telemetry import WindowData, build_telemetry_body

    w = WindowData(ts - 60)
    w.model = {"name": "m", "version": version, "sha256": "ab" * 32}
    body = build_telemetry_body(w, now=ts, extra={"drift": drift_field})
    msg = protocol.make_message("telemetry", device, body, ts=ts)
    return protocol.parse_message(protocol.device_topic("lab", device, "telemetry"), protocol.encode(msg))


def test_fleet_report_plots_drift_and_flags_devices_whose_inputs_drift(tmp_path):
    from edgeship.fleet.db import FleetDB
    from edgeship.fleet.report import build_report, drift_section

    rng = np.random.default_rng(7)
    x, logits = _classifier_data(3000, rng)
    ref = drift.reference_stats(x, logits)
    thresholds = drift.Thresholds(ref)  # one device's cache: computed once per window size, as the agent does

    def window(shift=0.0, flat=False):
        w = drift.WindowStats(ref, thresholds=thresholds)
        xb, lb = _classifier_data(200, rng, shift=shift)
        if flat:
            lb = np.zeros_like(lb)
        w.update(xb, lb)
        return w.report()

    msgs = []
    t0 = 1_700_000_000.0
    for i in range(8):
        t = t0 + 60 * i
        msgs.append(_telemetry_msg("cam-ok", t, window()))
        msgs.append(_telemetry_msg("cam-knocked", t, window(shift=0.4 if i >= 3 else 0.0)))
        msgs.append(_telemetry_msg("new-world", t, window(flat=i >= 3)))  # predictions change, inputs do not
    with FleetDB.open(tmp_path / "fleet.sqlite") as db:
        db.store_messages(msgs)
        rows = db.drift_windows()
        assert len(rows) == 24 and {r["device"] for r in rows} == {"cam-ok", "cam-knocked", "new-world"}
        rep = build_report(db, out_dir=tmp_path / "report", sections=[drift_section()])
    sec = next(s for s in rep.sections if s.title == "drift")
    assert sec.data["flagged"] == ["cam-knocked"]
    assert sec.data["devices"]["new-world"]["prediction_alarms"] >= 3
    assert "cam-knocked" in sec.text and (tmp_path / "report" / "drift.png").stat().st_size > 1000
    assert "drift" in (tmp_path / "report" / "report.html").read_text()


def test_rollout_prediction_drift_gate_canary_vs_control():
    from edgeship import rollout as ro

    spec = ro.parse_gate("drift")
    assert (spec.threshold, spec.min_samples) == (drift.PSI_ALARM, 200)
    control = ro.CohortFigures(classes={"cat": 500, "dog": 480, "bird": 20})
    same = ro.CohortFigures(classes={"cat": 260, "dog": 230, "bird": 10})
    skewed = ro.CohortFigures(classes={"cat": 450, "dog": 40, "bird": 10})  # the new model calls every dog a cat
    assert ro.evaluate_gate(spec, same, control).verdict == "pass"
    r = ro.evaluate_gate(spec, skewed, control)
    assert r.verdict == "fail" and r.canary > drift.PSI_ALARM and "dog" in r.detail
    assert ro.evaluate_gate(spec, ro.CohortFigures(classes={"cat": 50}), control).verdict == "insufficient"
    plan_gates = (*ro.DEFAULT_GATES, spec)  # optional: only plans that list it are gated on it
    assert [g.name for g in plan_gates][-1] == "drift"


# -- calibrated alarm thresholds (#22): a clean window alarms at the stated rate whatever its size ------------

def _digit_like(n, rng, shift=0.0):
    """Image-like inputs (N, 1, 8, 8) with zeros and a bright stroke, and a classifier's logits whose confidence
    spreads over the whole histogram (a few unsure answers: bins the reference rarely fills)."""
    x = np.where(rng.random((n, 1, 8, 8)) < 0.45 + shift, rng.random((n, 1, 8, 8)) * 0.5 + 0.5 + shift, 0.0)
    logits = rng.normal(size=(n, 10)) * 0.5
    margin = rng.gamma(4.0, 3.0, n) * (1.0 - 0.8 * min(1.0, 4 * shift))  # ~80 % above 0.99, like the demo's v1
    logits[np.arange(n), rng.integers(0, 10, n)] += margin
    return x.astype(np.float32), logits


def _alarm_rate(ref, size, windows, rng, shift=0.0, old_rule=False):
    w = drift.WindowStats(ref)
    alarms = 0
    for _ in range(windows):
        x, lg = _digit_like(size, rng, shift)
        w.update(x, lg)
        r = w.report(min_samples=1)
        if old_rule:  # the fixed thresholds before calibration: PSI 0.2 / |z| 0.5 on every statistic
            p = r["predictions"]
            alarms += drift.is_alarm(r["inputs"]["input"]["psi"], r["inputs"]["input"]["z"]) or \
                drift.is_alarm(p["psi"]) or drift.is_alarm(p["confidence_psi"])
        else:
            alarms += bool(r["alarm"])
        w.reset()
    return alarms / windows


def test_clean_windows_of_any_size_alarm_at_the_stated_rate():
    """Windows drawn from the reference's distribution (fresh samples: the reference's own sampling noise counts)
    alarm at most FALSE_ALARM_RATE, from 50 to 2,000 samples; the fixed 0.2 alarmed on most short windows."""
    rng = np.random.default_rng(22)
    ref = json.loads(json.dumps(drift.reference_stats(*_digit_like(600, rng))))  # a demo-sized reference
    for size, windows in ((50, 400), (120, 400), (400, 200), (2000, 100)):
        rate = _alarm_rate(ref, size, windows, rng)
        assert rate <= drift.FALSE_ALARM_RATE, (size, rate)
    assert _alarm_rate(ref, 50, 200, np.random.default_rng(5), old_rule=True) > 0.5  # what the fixed rule did


def test_shifted_windows_alarm_at_every_size():
    rng = np.random.default_rng(23)
    ref = drift.reference_stats(*_digit_like(600, rng))
    for size in (50, 120, 2000):
        assert _alarm_rate(ref, size, 40, rng, shift=0.15) >= 0.95, size


def test_thresholds_grow_for_short_windows_and_never_undercut_the_rule_of_thumb():
    hist = [0, 0, 0, 4, 6, 5, 10, 18, 13, 29, 512]  # demo v1's confidence histogram: sparse low bins
    small = drift.psi_threshold(hist, 120, 597, 0.0025)
    large = drift.psi_threshold(hist, 5000, 597, 0.0025)
    assert small > 0.3 and large == drift.PSI_ALARM
    assert drift.psi_null_quantile(hist, 120, 597, 0.99) == drift.psi_null_quantile(hist, 120, 597, 0.99)  # seeded
    q50, q99 = (drift.psi_null_quantile(hist, 120, None, q) for q in (0.5, 0.99))
    assert 0.0 < q50 < q99
    assert drift.z_threshold(10, 600, 0.0025) > drift.Z_ALARM == drift.z_threshold(1000, 600, 0.0025)
    assert [drift.n_bucket(n) for n in (5, 16, 120, 127, 128)] == [5, 16, 117, 117, 128]
    th = drift.Thresholds({"samples": 597})
    assert th.psi("c", hist, 121, 0.0025) == th.psi("c", hist, 118, 0.0025)  # one bucket, one computation


def test_window_report_carries_its_thresholds_and_budget():
    rng = np.random.default_rng(24)
    ref = drift.reference_stats(*_digit_like(600, rng))
    w = drift.WindowStats(ref)
    w.update(*_digit_like(150, rng))
    r = w.report()
    assert r["false_alarm_rate"] == drift.FALSE_ALARM_RATE
    assert r["predictions"]["thresholds"]["psi"] > drift.PSI_ALARM  # 150 predictions: above the rule of thumb
    assert len(r["inputs"]["input"]["thresholds"]["psi"]) == 1 and r["inputs"]["input"]["thresholds"]["z"] >= 0.5
    few = drift.WindowStats(ref)
    few.update(*_digit_like(20, rng))
    assert few.report()["alarm"] is None and "thresholds" not in few.report()["predictions"]  # not judged
    with pytest.raises(ValueError):
        drift.WindowStats(ref, false_alarm_rate=0.0)


def test_agent_drift_monitor_also_scores_against_the_replaced_packages_reference(tmp_path):
    """After a switch to a package whose reference holds the shifted data (a retrain on the field), its own score
    is low while the inputs are still shifted; ``vs_previous`` scores them against the replaced package (#22)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from models import make_mlp_onnx, mlp_reference

    from edgeship import package
    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config
    from edgeship.agent.drift import DriftMonitor

    rng = np.random.default_rng(0)
    labels = [f"c{i}" for i in range(10)]
    plain = rng.normal(size=(2000, 64)).astype(np.float32)
    shifted = (rng.normal(size=(2000, 64)) * 0.2 + 1.5).astype(np.float32)
    onnx_path = make_mlp_onnx(tmp_path / "mlp.onnx")
    v1 = package.build(tmp_path / "v1.edgepkg", onnx_path, name="m", version="1.0.0", labels=labels,
                       reference_stats=drift.reference_stats(plain, mlp_reference(plain), labels=labels))
    v2 = package.build(tmp_path / "v2.edgepkg", onnx_path, name="m", version="1.1.0", labels=labels,
                       reference_stats=drift.reference_stats(shifted, mlp_reference(shifted), labels=labels))
    agent = Agent(parse_config({"agent": {"allow_unsigned": True, "package": str(v1),
                                          "state_dir": str(tmp_path / "state")}}))

    def window(x):
        [f.result(10) for f in [agent.submit(row) for row in x]]
        return monitor.telemetry_fields()["drift"]

    with agent:
        monitor = agent.add_component(DriftMonitor(agent))
        first = window(shifted[:300])
        assert first["alarm"] is True and "vs_previous" not in first  # v1 sees the shift; nothing replaced yet
        agent.switch_to(agent.store.install(v2))
        window(shifted[300:310])  # closes the window that straddles the switch
        after = window(shifted[310:610])
    assert after["model"]["version"] == "1.1.0" and after["alarm"] is False  # its own reference holds the shift
    prev = after["vs_previous"]
    assert prev["model"]["version"] == "1.0.0" and prev["samples"] == 300
    assert prev["alarm"] is True and prev["score"] > 10 * after["score"]  # the inputs did not change back
