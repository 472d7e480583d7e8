"""Field loop, prove (#22.4): the retrained model's rollout is gated on the field signal that raised the alarm —
negative feedback and the input drift score, canary vs control — and completes only on evidence.

Choice: the loop's rollouts run with ``on_insufficient = "wait"``, so a rollout that gets no field feedback holds
its stage (never completes). The plain default (``promote``) still completes at the end of the soak but says
"completed without evidence" instead of "every gate holding" (the #16 rule)."""
from __future__ import annotations

import time

import pytest
from rollout_fleet import wait_for
from test_agent import build_mlp_package
from test_rollout_fleet import Fleet

from edgeship import rollout as ro

NO_EVIDENCE_GATES = ["negative_feedback:0.05:20", "drift_score:1.0:3:0.95:0.05", "failures:0.1:1"]


def _plan(on_insufficient: str) -> ro.Plan:
    return ro.Plan(rollout_id="r", fleet="f", package=ro.PackageRef("m", "1.1.0", "0" * 64, 1, "http://x/m.edgepkg"),
                   stages=(ro.Stage(50.0, 1.0), ro.Stage(100.0, 1.0)),
                   gates=tuple(ro.parse_gate(g) for g in NO_EVIDENCE_GATES), salt="s", created=0.0,
                   on_insufficient=on_insufficient, percent=100.0, stage_index=1)


def test_drift_score_gate_canary_vs_control():
    g = ro.parse_gate("drift_score")
    assert (g.threshold, g.min_samples, g.slack) == (1.0, 10, 0.05) and g.unit == "ratio"
    worse = ro.CohortFigures(errors=ro.RateFigures(0, 0), negative=ro.RateFigures(0, 0),
                             metrics={ro.DRIFT_SCORE_FIELD: ro.MeanFigures(20, 0.9, 0.01)})
    control = ro.CohortFigures(errors=ro.RateFigures(0, 0), negative=ro.RateFigures(0, 0),
                               metrics={ro.DRIFT_SCORE_FIELD: ro.MeanFigures(20, 0.3, 0.01)})
    assert ro.evaluate_gate(g, worse, control).verdict == "fail"
    assert ro.evaluate_gate(g, control, worse).verdict == "pass"  # the retrained model drifts less: fine
    few = ro.CohortFigures(errors=ro.RateFigures(0, 0), negative=ro.RateFigures(0, 0),
                           metrics={ro.DRIFT_SCORE_FIELD: ro.MeanFigures(3, 0.9, 0.01)})
    assert ro.evaluate_gate(g, few, control).verdict == "insufficient"
    with pytest.raises(ro.RolloutError):
        ro.parse_gate("drift_scores:1")


def test_no_field_feedback_never_completes_as_healthy():
    empty = ro.CohortFigures(errors=ro.RateFigures(0, 1000), negative=ro.RateFigures(0, 0))
    plan = _plan("wait")
    results = ro.evaluate_gates(plan.gates, empty, empty)
    assert {r.name: r.verdict for r in results}["negative_feedback"] == "insufficient"
    d = ro.decide(plan, results, now=100.0, stage_started=0.0)
    assert d.action == "wait" and "waiting for enough samples: negative_feedback, drift_score" in d.reason
    # The default completes at the end of the soak, but never as "every gate holding".
    d = ro.decide(_plan("promote"), results, now=100.0, stage_started=0.0)
    assert d.action == "complete" and "without evidence" in d.reason and "every gate holding" not in d.reason


@pytest.mark.mqtt
def test_rollout_without_field_feedback_holds_its_stage(tmp_path, mosquitto, signing_keys):
    """Real agents, Mosquitto, controller and SQLite; nobody sends feedback: the rollout stays running at its
    first stage past several soaks, waiting for evidence, and says so."""
    d = tmp_path / "pkgs"
    pkgs = {"v1": build_mlp_package(d, "1.0.0", seed=0, signing_key=signing_keys[0]),
            "v2": build_mlp_package(d, "1.1.0", seed=1, signing_key=signing_keys[0])}
    f = Fleet(tmp_path / "f", mosquitto, pkgs, signing_keys, 6, "quiet")
    try:
        ctl = f.controller_start()
        st = ctl.start_rollout(pkgs["v2"], stages="50,100", soak_s=1.0, gates=NO_EVIDENCE_GATES, salt="q",
                               on_insufficient="wait")
        rid = st["rollout_id"]
        wait_for(lambda: "waiting for enough samples" in ctl.status(rid)["decision"]["reason"], 60, step=0.3,
                 what="the controller to wait for evidence")
        # Several soak times later it has not moved: no evidence, no promotion.
        started = wait_for(lambda: ctl.status(rid)["stage_started"], 30, what="the first stage fully published")
        wait_for(lambda: time.time() > started + 5.0, 10, step=0.2, what="five soak times")
        s = ctl.status(rid)
        assert s["state"] == "running" and s["stage_index"] == 0, (s["state"], s["reason"])
        assert "negative_feedback" in s["decision"]["reason"]
        gates = {g["name"]: g for g in s["gates"]}
        assert gates["negative_feedback"]["verdict"] == "insufficient" and gates["negative_feedback"]["canary_n"] == 0
    finally:
        f.close()
