"""One figure, one number: the console, the CLI and ``fleet report`` on the same fleet DB (issue 16 item 8).

Each test fills a real SQLite fleet DB through the real ``FleetDB.store_messages``
(what the collector calls) and the real rollout controller, then asks the
console (a real uvicorn serving the console app, token auth), the ``edgeship``
CLI in a subprocess and ``edgeship fleet report`` for the same figure.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from conftest import run_cli  # noqa: E402
from test_agent import build_mlp_package  # noqa: E402

from edgeship import protocol  # noqa: E402
from edgeship.fleet import figures  # noqa: E402
from edgeship.fleet.console import auth  # noqa: E402
from edgeship.fleet.console.app import create_app  # noqa: E402
from edgeship.fleet.console.config import ConsoleConfig  # noqa: E402
from edgeship.fleet.console.data import ConsoleData  # noqa: E402
from edgeship.fleet.console.server import ConsoleServer  # noqa: E402
from edgeship.fleet.controller import RolloutController  # noqa: E402
from edgeship.fleet.db import FleetDB  # noqa: E402
from edgeship.metrics import Histogram  # noqa: E402


def _msg(fleet: str, kind: str, device: str, body: dict, ts: float) -> protocol.Message:
    m = protocol.make_message(kind, device, body, ts=ts)
    return protocol.parse_message(protocol.device_topic(fleet, device, kind), protocol.encode(m))


class Console:
    """The console app under uvicorn over ``db``; ``get`` speaks to its JSON API with a bearer token."""

    def __init__(self, db, controller=None) -> None:
        self.token = auth.new_token()
        cfg = ConsoleConfig(password_hash=auth.hash_password("pw-figures-1"),
                            token_sha256=auth.token_digest(self.token))
        self.server = ConsoleServer(create_app(cfg, ConsoleData(db, controller=controller)), cfg, port=0).start()

    def get(self, path: str, as_json: bool = True):
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=10)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        assert resp.status == 200, (path, resp.status, body[:200])
        return json.loads(body) if as_json else body.decode()

    def stop(self) -> None:
        self.server.stop()


@contextlib.contextmanager
def _served(db, db_path):
    """(db, db_path, console) with a console over ``db``; both closed after."""
    console = Console(db)
    try:
        yield db, db_path, console
    finally:
        console.stop()
        db.close()


def _report_row(out: str, version: str) -> dict:
    """The row of ``version`` in ``edgeship fleet report``'s table, by column name."""
    lines = out.splitlines()
    head = [h.strip() for h in lines[0].split("  ") if h.strip()]
    row = next(ln for ln in lines[2:] if ln.split()[0] == version)
    return dict(zip(head, row.split()))


# ----------------------------------------------------------------- devices: negative feedback and p95

@pytest.fixture()
def device_fleet(tmp_path):
    db_path = tmp_path / "fleet.sqlite"
    db = FleetDB.open(db_path)
    now = time.time()
    model = {"name": "digits", "version": "1.0.0"}
    msgs = [_msg("f", "state", "pi-a", {"online": True, "model": model}, now - 400)]
    for i, (n, lat) in enumerate(((65, 3.0), (66, 9.0))):
        h = Histogram()
        h.add_repeated(lat, n)
        msgs.append(_msg("f", "telemetry", "pi-a", {
            "window_s": 60, "counts": {"inferences": n, "errors": 0}, "model": model,
            "latency_ms": {"p50": lat, "p95": lat, "p99": lat, "hist": h.to_dict()}}, now - 300 + 100 * i))
    # The latest window was idle: no latency figures at all (what an agent sends for an empty window).
    msgs.append(_msg("f", "telemetry", "pi-a", {
        "window_s": 60, "counts": {"inferences": 0, "errors": 0}, "model": model,
        "latency_ms": {"p50": None, "p95": None, "p99": None, "hist": Histogram().to_dict()}}, now - 60))
    # One confirmed prediction, one label that agrees with the prediction, one incorrect: 1 of 3 negative.
    for j, (kind, value) in enumerate((("correct", None), ("label", "3"), ("incorrect", "5"))):
        msgs.append(_msg("f", "feedback", "pi-a", {"prediction_id": f"p{j}", "kind": kind, "value": value,
                                                   "predicted": "3", "model": model}, now - 50 + j))
    assert db.store_messages(msgs).stored == len(msgs)
    with _served(db, db_path) as parts:
        yield parts


def test_negative_feedback_is_the_same_on_the_device_list_the_feedback_page_and_the_report(device_fleet):
    db, db_path, console = device_fleet
    listed = {d["device"]: d for d in console.get("/api/v1/devices")["items"]}
    on_feedback_page = {v["version"]: v for v in console.get("/api/v1/feedback")["versions"]}
    report = _report_row(run_cli("fleet", "report", "--db", str(db_path)).stdout, "1.0.0")
    # The label "3" confirms the prediction "3": only the incorrect one is negative.
    assert listed["pi-a"]["negative_rate"] == pytest.approx(1 / 3)
    assert on_feedback_page["1.0.0"]["negative_rate"] == pytest.approx(1 / 3)
    assert report["negative"] == "33.3%"
    html = console.get("/devices", as_json=False)
    assert "33.3 %" in html and "66.7 %" not in html


def test_p95_covers_every_window_not_only_the_last(device_fleet):
    db, db_path, console = device_fleet
    dev = {d["device"]: d for d in console.get("/api/v1/devices")["items"]}["pi-a"]
    report = _report_row(run_cli("fleet", "report", "--db", str(db_path)).stdout, "1.0.0")
    assert dev["inferences"] == 131 == int(report["inferences"])
    # An idle last window must not blank the figure of the 131 inferences before it.
    assert dev["p95_ms"] is not None
    assert f"{dev['p95_ms']:.3g}" == report["p95 ms"]
    assert dev["p95_ms"] == pytest.approx(figures.latency_percentile(db.telemetry(device="pi-a"), 95))
    assert dev["p95_ms"] > 5.0  # the 66 slow inferences are in it


# ----------------------------------------------------------------- rollouts: devices per state, audit, evidence

class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _devices(db, fleet: str, n: int, ts: float) -> list[str]:
    devs = [f"{fleet}-{i:02d}" for i in range(n)]
    db.store_messages([_msg(fleet, "state", d, {"online": True, "session": 1.0,
                                                 "model": {"name": "sensor", "version": "1.0.0"}}, ts) for d in devs])
    return devs


def _reports(db, fleet: str, rid: str, states: dict[str, str], ts: float) -> None:
    db.store_messages([_msg(fleet, "rollout", d, {"rollout_id": rid, "state": s,
                                                  "reason": "health window failed" if s == "failed" else ""}, ts)
                       for d, s in states.items()])


@pytest.fixture(scope="module")
def rollout_fleet(tmp_path_factory, signing_keys):
    priv, _ = signing_keys
    tmp = tmp_path_factory.mktemp("rollout-figures")
    pkg = build_mlp_package(tmp / "p", "2.0.0", seed=1, signing_key=priv)
    db_path = tmp / "fleet.sqlite"
    db = FleetDB.open(db_path)
    t0 = time.time() - 600
    clock = Clock(t0)
    # Fleet "fa": 5 devices take 2.0.0, two fail their health window, the controller aborts by itself,
    # and the devices then roll back (reports the controller's last stored status never saw).
    ctl = RolloutController(db, None, "fa", signing_key=priv, package_base_url="http://127.0.0.1:1", clock=clock)
    devs = _devices(db, "fa", 5, t0)
    ctl.start_rollout(pkg, stages="100", soak_s=3600, rollout_id="r-abort", who="alice")
    _reports(db, "fa", "r-abort", {d: ("failed" if i >= 3 else "active") for i, d in enumerate(devs)}, t0 + 5)
    clock.t = t0 + 10
    ctl.tick()
    assert db.rollout_get("r-abort")["state"] == "aborted"
    row = db.rollout_get("r-abort")
    db.rollout_mark_published("r-abort", row["seq"])  # as the broker's ack would: the controller stops re-storing
    _reports(db, "fa", "r-abort", {d: "rolled_back" for d in devs}, t0 + 20)
    clock.t = t0 + 30
    ctl.tick()
    # Fleet "fb": 4 devices report healthy, the soak is zero: the last stage completes while three of the
    # four gates have no samples at all (no telemetry, no feedback).
    ctl_b = RolloutController(db, None, "fb", signing_key=priv, package_base_url="http://127.0.0.1:1", clock=clock)
    devs_b = _devices(db, "fb", 4, t0)
    ctl_b.start_rollout(pkg, stages="100", soak_s=0, rollout_id="r-blind", who="bob")
    _reports(db, "fb", "r-blind", {d: "healthy" for d in devs_b}, t0 + 40)
    clock.t = t0 + 50
    ctl_b.tick()
    assert db.rollout_get("r-blind")["state"] == "completed"
    with _served(db, db_path) as parts:  # a read-only console: what it shows comes from the DB
        yield parts


def test_rollout_devices_per_state_are_counted_now_everywhere(rollout_fleet):
    db, db_path, console = rollout_fleet
    page = console.get("/api/v1/rollouts/r-abort")
    cli = json.loads(run_cli("fleet", "rollout", "status", "r-abort", "--db", str(db_path), "--json").stdout)
    report = run_cli("fleet", "report", "--db", str(db_path), "--rollout", "r-abort").stdout
    assert cli["devices_per_state"] == {"rolled_back": 5}
    assert page["devices_per_state"] == cli["devices_per_state"]
    assert "devices: rolled_back 5" in report
    html = console.get("/rollouts/r-abort", as_json=False)
    assert "data-state='rolled_back'" in html.replace('"', "'") and "data-state='active'" not in html.replace('"', "'")


def test_the_controllers_automatic_abort_is_in_the_audit_log(rollout_fleet):
    db, db_path, console = rollout_fleet
    cli = json.loads(run_cli("fleet", "rollout", "status", "r-abort", "--db", str(db_path), "--json").stdout)
    aborts = [e for e in cli["events"] if e["kind"] == "abort"]
    assert len(aborts) == 1 and aborts[0]["who"] == "controller"
    audit = [a for a in console.get("/api/v1/audit")["items"] if a["target"] == "rollout/r-abort"]
    entry = [a for a in audit if a["action"] == "rollout.abort"]
    assert len(entry) == 1, audit
    assert entry[0]["who"] == "controller" and entry[0]["outcome"] == cli["reason"]
    assert "gate failures failed" in entry[0]["outcome"]
    assert "rollout.abort" in console.get("/audit", as_json=False)


def test_a_rollout_completed_without_samples_says_so(rollout_fleet):
    db, db_path, console = rollout_fleet
    out = run_cli("fleet", "rollout", "status", "r-blind", "--db", str(db_path)).stdout
    report = run_cli("fleet", "report", "--db", str(db_path), "--rollout", "r-blind").stdout
    page = console.get("/api/v1/rollouts/r-blind")
    said = ("completed without evidence: 3 of 4 gates had too few samples "
            "(error_rate, latency_p95, negative_feedback)")
    assert "state completed" in out
    for text in (out, report, page["reason"]):
        assert said in text
        assert "every gate holding" not in text
    # The evaluation the decision was made on: the failures gate had its samples, the other three none.
    verdicts = {g["name"]: g["verdict"] for g in json.loads(db.rollout_events("r-blind")[-1]["detail"])["gates"]}
    assert verdicts == {"failures": "pass", "error_rate": "insufficient", "latency_p95": "insufficient",
                        "negative_feedback": "insufficient"}
