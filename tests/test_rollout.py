"""Pure rollout logic: buckets, plan signing, gate statistics, stage machine, ramp."""
from __future__ import annotations

import random

import pytest

from edgeship import rollout as ro
from edgeship.errors import RolloutError, SignatureError

SHA = "ab" * 32


def make_plan(**kw) -> ro.Plan:
    base = dict(rollout_id="r1", fleet="f", package=ro.PackageRef("digits", "2.0.0", SHA, 1234, "http://x/p"),
                stages=ro.parse_stages("1,10,50,100", "10s"), salt="s1", created=1.0, updated=1.0)
    base.update(kw)
    return ro.Plan(**base)


def test_bucket_is_stable_uniform_and_salted():
    b = [ro.bucket(f"dev-{i}", "salt") for i in range(4000)]
    assert b[:5] == [ro.bucket(f"dev-{i}", "salt") for i in range(5)]
    assert all(0 <= x < 100 for x in b)
    # Roughly uniform: each decile holds 10% +- 2.5%
    for d in range(10):
        share = sum(1 for x in b if d * 10 <= x < (d + 1) * 10) / len(b)
        assert 0.075 < share < 0.125
    other = [ro.bucket(f"dev-{i}", "other") for i in range(100)]
    assert other != b[:100]
    assert ro.in_stage(4.9, 5) and not ro.in_stage(5.0, 5)


def test_parse_stages_gate_duration():
    st = ro.parse_stages("1,10,50,100", "30m")
    assert [s.percent for s in st] == [1, 10, 50, 100] and all(s.soak_s == 1800 for s in st)
    assert [s.soak_s for s in ro.parse_stages("5,100", "1s,2h")] == [1, 7200]
    assert ro.parse_duration("500ms") == 0.5
    with pytest.raises(RolloutError):
        ro.parse_duration("soon")
    with pytest.raises(RolloutError, match="one per stage"):
        ro.parse_stages("1,100", "1s,2s,3s")
    g = ro.parse_gate("negative_feedback:0.1:40")
    assert (g.name, g.threshold, g.min_samples) == ("negative_feedback", 0.1, 40)
    assert ro.parse_gate("metric:cpu.load:1.2:10").name == "metric:cpu.load"
    with pytest.raises(RolloutError, match="unknown gate"):
        ro.parse_gate("accuracy:0.1")
    with pytest.raises(RolloutError, match="increasing"):
        make_plan(stages=ro.parse_stages("10,5,100", 0))


def test_plan_sign_verify_roundtrip_and_tamper(signing_keys, tmp_path):
    from edgeship import signing

    priv, pub = signing_keys
    trust = signing.TrustStore.from_paths([pub])
    plan = make_plan(percent=1.0, seq=3)
    body = ro.sign_plan(plan, priv)
    assert ro.verify_plan_message(body, trust) == plan
    assert ro.Plan.from_dict(plan.to_dict()) == plan
    bad = {**body, "plan": {**body["plan"], "percent": 100.0}}
    with pytest.raises(SignatureError):
        ro.verify_plan_message(bad, trust)
    other_priv, other_pub = signing.keygen(tmp_path / "other.key")
    with pytest.raises(SignatureError, match="not trusted"):
        ro.verify_plan_message(ro.sign_plan(plan, other_priv), trust)
    with pytest.raises(SignatureError, match="not signed"):
        ro.verify_plan_message({"plan": plan.to_dict()}, trust)


def test_wilson_and_newcombe_match_known_values():
    lo, hi = ro.wilson_interval(10, 100, 1.959964)
    assert lo == pytest.approx(0.0552, abs=1e-3) and hi == pytest.approx(0.1744, abs=1e-3)
    # Newcombe 1998, example: 56/70 vs 48/80 -> (0.0524, 0.3339)
    lo, hi = ro.newcombe_interval(56, 70, 48, 80, 1.959964)
    assert lo == pytest.approx(0.0524, abs=1e-3) and hi == pytest.approx(0.3339, abs=1e-3)


def _cohort(neg=None, err=None, fail=None, lat=None):
    return ro.CohortFigures(failures=fail, errors=err, negative=neg, latency=lat)


def test_negative_feedback_gate_verdicts():
    spec = ro.GateSpec("negative_feedback", threshold=0.05, min_samples=50)
    control = _cohort(neg=ro.RateFigures(100, 1000))
    assert ro.evaluate_gate(spec, _cohort(neg=ro.RateFigures(3, 30)), control).verdict == "insufficient"
    assert ro.evaluate_gate(spec, _cohort(neg=ro.RateFigures(11, 100)), control).verdict == "pass"
    # 18% vs 10% on 100 samples: worse than allowed by the point estimate, but not conclusive.
    r = ro.evaluate_gate(spec, _cohort(neg=ro.RateFigures(18, 100)), control)
    assert r.verdict == "hold" and r.lower < 0.05 < r.canary - r.control
    r = ro.evaluate_gate(spec, _cohort(neg=ro.RateFigures(60, 100)), control)
    assert r.verdict == "fail" and r.lower > 0.05 and "negative_feedback" == r.name and "control" in r.detail


def test_failures_gate_is_canary_only():
    spec = ro.GateSpec("failures", threshold=0.05, min_samples=1)
    empty = _cohort()
    assert ro.evaluate_gate(spec, _cohort(fail=ro.RateFigures(0, 0)), empty).verdict == "insufficient"
    assert ro.evaluate_gate(spec, _cohort(fail=ro.RateFigures(0, 5)), empty).verdict == "pass"
    assert ro.evaluate_gate(spec, _cohort(fail=ro.RateFigures(3, 3)), empty).verdict == "fail"
    assert ro.evaluate_gate(spec, _cohort(fail=ro.RateFigures(1, 10)), empty).verdict == "hold"


def test_latency_gate_uses_quantile_bounds_and_slack():
    spec = ro.GateSpec("latency_p95", threshold=1.5, min_samples=100, slack=5.0)
    k = ro.LatencyFigures(1000, 10.0, 9.5, 10.5)
    assert ro.evaluate_gate(spec, _cohort(lat=ro.LatencyFigures(1000, 11.0, 10.4, 11.6)), _cohort(lat=k)).verdict == "pass"
    assert ro.evaluate_gate(spec, _cohort(lat=ro.LatencyFigures(1000, 40.0, 38.0, 42.0)), _cohort(lat=k)).verdict == "fail"
    # ratio 2 but only 1 ms apart: below the slack, noise on a fast model
    tiny = ro.LatencyFigures(1000, 1.0, 0.9, 1.1)
    assert ro.evaluate_gate(spec, _cohort(lat=ro.LatencyFigures(1000, 2.0, 1.9, 2.1)), _cohort(lat=tiny)).verdict == "pass"
    assert ro.evaluate_gate(spec, _cohort(lat=ro.LatencyFigures(10, 40.0)), _cohort(lat=k)).verdict == "insufficient"
    lo, hi = ro.quantile_rank_bounds(1000, 0.95, 1.645)
    assert 93.5 < lo < 95 < hi < 96.5


def test_metric_gate_and_hook():
    spec = ro.GateSpec("metric:temp", threshold=1.1, min_samples=5)
    k = ro.CohortFigures(metrics={"temp": ro.MeanFigures(50, 50.0, 1.0)})
    assert ro.evaluate_gate(spec, ro.CohortFigures(metrics={"temp": ro.MeanFigures(50, 51.0, 1.0)}), k).verdict == "pass"
    assert ro.evaluate_gate(spec, ro.CohortFigures(metrics={"temp": ro.MeanFigures(50, 70.0, 1.0)}), k).verdict == "fail"
    drift = ro.GateSpec("drift", threshold=0.2, min_samples=1)
    assert ro.evaluate_gate(drift, k, k).verdict == "insufficient"
    hook = {"drift": lambda s, c, ctl: ro.GateResult("drift", "fail", 0.5, 0.1, 10, 10, s.threshold, 1, "rate")}
    assert ro.evaluate_gate(drift, k, k, hook).verdict == "fail"


def _res(verdict, name="g"):
    return ro.GateResult(name, verdict, 0.1, 0.1, 10, 10, 0.05, 1, "rate", detail="d")


def test_decide_stage_machine():
    p = make_plan(percent=1.0)
    assert ro.decide(p, [_res("pass")], now=5, stage_started=0).action == "wait"          # soaking
    assert ro.decide(p, [_res("pass")], now=11, stage_started=0).action == "promote"
    assert ro.decide(p, [_res("hold")], now=11, stage_started=0).action == "wait"
    assert ro.decide(p, [_res("insufficient")], now=11, stage_started=0).action == "promote"
    assert ro.decide(p.evolve(on_insufficient="wait"), [_res("insufficient")], now=11, stage_started=0).action == "wait"
    d = ro.decide(p, [_res("fail", "negative_feedback")], now=1, stage_started=0)
    assert d.action == "abort" and "negative_feedback" in d.reason
    assert ro.decide(p.evolve(on_fail="pause"), [_res("fail")], now=1, stage_started=0).action == "pause"
    assert ro.decide(p.evolve(percent=0.5), [_res("pass")], now=99, stage_started=None).action == "wait"  # ramping
    last = p.evolve(stage_index=3, percent=100.0)
    assert ro.decide(last, [_res("pass")], now=11, stage_started=0).action == "complete"
    assert ro.decide(p.evolve(state="paused"), [_res("pass")], now=99, stage_started=0).action == "wait"


def test_ramp_percent_rate_limit():
    rng = random.Random(1)
    buckets = [rng.uniform(0, 100) for _ in range(1000)]
    assert ro.ramp_percent(buckets, 10, 50, 0, 0) == 50
    p0 = ro.ramp_percent(buckets, 10, 50, 100, 0)
    assert ro.count_in_range(buckets, 10, p0) == 100
    p1 = ro.ramp_percent(buckets, 10, 50, 100, 60)
    assert ro.count_in_range(buckets, 10, p1) == 200 and p1 > p0
    assert ro.ramp_percent(buckets, 10, 50, 100, 3600) == 50


def test_local_health():
    pol = ro.HealthPolicy(max_error_rate=0.05, max_latency_ratio=2, latency_slack_ms=5, min_inferences=10)
    assert ro.local_health(pol, inferences=100, errors=0, p95_new=2, p95_old=1)[0] is True
    assert ro.local_health(pol, inferences=100, errors=20, p95_new=1, p95_old=1)[0] is False
    assert ro.local_health(pol, inferences=100, errors=0, p95_new=50, p95_old=10)[0] is False
    assert ro.local_health(pol, inferences=0, errors=0, p95_new=None, p95_old=None, crashed=True)[0] is False


def test_version_mismatches_only_for_completed_plans_and_devices_that_went_back():
    plan = make_plan(percent=100.0)
    old = "1" * 64
    devs = [{"device": "a", "model_version": "2", "model_sha256": plan.package.sha256, "state_ts": 50},
            {"device": "b", "model_version": "1", "model_sha256": old, "state_ts": 50},   # went back
            {"device": "c", "model_version": "1", "model_sha256": old, "state_ts": 50},   # failed under it
            {"device": "d", "model_version": "1", "model_sha256": old, "state_ts": 5},    # state older than report
            {"device": "e", "model_version": "1", "model_sha256": old, "state_ts": 50}]   # never switched
    reports = {"a": {"state": "healthy", "ts": 10}, "b": {"state": "healthy", "ts": 10},
               "c": {"state": "failed", "ts": 10}, "d": {"state": "active", "ts": 10}}
    assert ro.version_mismatches(plan, devs, reports) == []  # running: each device's own reports decide
    got = ro.version_mismatches(plan.evolve(state="completed"), devs, reports)
    assert [(m["device"], m["reported"], m["desired"]) for m in got] == [("b", "1", "2.0.0")]
