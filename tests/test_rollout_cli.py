"""Controller commands without a broker (DB only), the CLI, the audit trail and the rollout report."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from conftest import free_port, run_cli, wait_port
from test_agent import build_mlp_package

from edgeship import rollout as ro
from edgeship.errors import RolloutError
from edgeship.fleet.controller import RolloutController
from edgeship.fleet.db import FleetDB


@pytest.fixture()
def setup(tmp_path, signing_keys):
    priv, pub = signing_keys
    pkg = build_mlp_package(tmp_path / "p", "2.0.0", seed=1, signing_key=priv)
    db_path = tmp_path / "fleet.sqlite"
    db = FleetDB.open(db_path)
    ctl = RolloutController(db, None, "f", signing_key=priv, package_base_url="http://127.0.0.1:1")
    yield ctl, db, db_path, pkg, priv
    db.close()


def test_commands_transitions_and_audit(setup):
    ctl, db, _, pkg, _ = setup
    st = ctl.start_rollout(pkg, stages="10,50,100", soak_s=60, rollout_id="r1", who="alice")
    assert st["state"] == "running" and st["percent"] == 10 and st["published_seq"] == 0  # no broker: stored only
    assert st["package"]["url"].endswith(st["package"]["sha256"])
    with pytest.raises(RolloutError, match="already exists"):
        ctl.start_rollout(pkg, rollout_id="r1")
    with pytest.raises(RolloutError, match="--force"):
        ctl.promote("r1")
    assert ctl.pause("r1", who="bob")["state"] == "paused"
    with pytest.raises(RolloutError, match="paused"):
        ctl.pause("r1")
    assert ctl.resume("r1")["state"] == "running"
    st = ctl.promote("r1", force=True, who="carol")
    assert st["stage_index"] == 1 and st["percent"] == 50
    assert ctl.abort("r1", who="dave", reason="field complaints")["state"] == "aborted"
    with pytest.raises(RolloutError, match="aborted"):
        ctl.resume("r1")
    kinds = [e["kind"] for e in db.rollout_events("r1")]
    assert kinds == ["start", "pause", "resume", "force_promote", "abort"]
    audit = {(a["who"], a["action"]) for a in db.audit_list()}
    assert {("alice", "rollout.start"), ("carol", "rollout.promote"), ("dave", "rollout.abort")} <= audit
    # The signed plan stored for publishing carries the latest seq and verifies.
    from edgeship import signing

    row = db.rollout_get("r1")
    plan = ro.verify_plan_message(json.loads(row["signed"]), signing.TrustStore.from_paths([ctl_pub(setup)]))
    assert plan.state == "aborted" and plan.seq == row["seq"] == 5


def ctl_pub(setup):
    return str(setup[4]).replace(".key", ".pub")


def test_transitions_are_compare_and_set(setup):
    ctl, db, _, pkg, priv = setup
    ctl.start_rollout(pkg, stages="10,100", soak_s=0, rollout_id="r2")
    other = RolloutController(db, None, "f", signing_key=priv)
    row = db.rollout_get("r2")
    plan = ctl._plan(row)  # noqa: SLF001 - two controllers acting on the same snapshot
    d = ro.Decision("promote", "test")
    assert ctl._apply(row, plan, d, who="a") is True  # noqa: SLF001
    assert other._apply(row, plan, d, who="b") is False  # noqa: SLF001 - stale seq: refused
    assert [e["kind"] for e in db.rollout_events("r2")].count("promote") == 1


def test_refuses_unsigned_or_untrusted_package(tmp_path, setup):
    ctl, *_ = setup
    unsigned = build_mlp_package(tmp_path / "u", "2.1.0", seed=2)
    with pytest.raises(RolloutError, match="refusing to roll out"):
        ctl.start_rollout(unsigned)


def test_cli_status_list_pause_promote_report(setup, tmp_path):
    ctl, db, db_path, pkg, priv = setup
    ctl.start_rollout(pkg, stages="10,100", soak_s=60, rollout_id="r3")
    ctl.tick()  # one evaluation stored (status + gate history) as a running controller would
    out = run_cli("fleet", "rollout", "status", "r3", "--db", str(db_path)).stdout
    assert "r3" in out and "negative_feedback" in out and "state running" in out
    listed = json.loads(run_cli("fleet", "rollout", "list", "--db", str(db_path), "--json").stdout)
    assert [r["rollout_id"] for r in listed] == ["r3"]
    out = run_cli("fleet", "rollout", "pause", "r3", "--db", str(db_path)).stdout
    assert "paused" in out and "stored" in out
    bad = run_cli("fleet", "rollout", "promote", "r3", "--db", str(db_path), check=False)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "--force" in bad.stderr
    out = run_cli("fleet", "rollout", "promote", "r3", "--force", "--db", str(db_path)).stdout
    assert "stage 2/2" in out
    rep = run_cli("fleet", "report", "--db", str(db_path), "--rollout", "r3", "--out", str(tmp_path / "rep")).stdout
    assert "force_promote" in rep and "pause" in rep
    assert (tmp_path / "rep" / "rollout_timeline.png").stat().st_size > 1000
    assert (tmp_path / "rep" / "rollout_gates.png").exists()


def test_cli_serve_and_agent_pin(tmp_path, signing_keys):
    pkg = build_mlp_package(tmp_path / "www", "1.0.0", seed=0)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgeship.cli", "fleet", "serve", str(tmp_path / "www"),
                             "--port", str(port)], stderr=subprocess.DEVNULL)
    try:
        assert wait_port("127.0.0.1", port, 20)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/packages/{pkg.name}", timeout=5) as r:
            assert r.read() == pkg.read_bytes()
    finally:
        proc.terminate()
        proc.wait(10)
    from edgeship.agent.store import ModelStore

    store = ModelStore(tmp_path / "state")
    store.install(pkg)
    out = run_cli("agent", "pin", "1.0.0", "--state-dir", str(tmp_path / "state")).stdout
    assert "pinned to 1.0.0" in out and ModelStore(tmp_path / "state").pinned == "1.0.0"
    run_cli("agent", "pin", "--clear", "--state-dir", str(tmp_path / "state"))
    assert ModelStore(tmp_path / "state").pinned is None


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _add_devices(db, n: int, fleet: str = "f", ts: float = 1_800_000_000.0) -> list[str]:
    from edgeship import protocol

    msgs = []
    for i in range(n):
        dev = f"dev{i:03d}"
        body = protocol.make_message("state", dev, {"online": True, "session": 1.0}, ts=ts)
        msgs.append(protocol.parse_message(protocol.device_topic(fleet, dev, "state"), protocol.encode(body)))
    db.store_messages(msgs)
    return [f"dev{i:03d}" for i in range(n)]


def test_rate_limit_ramps_stage_by_devices_per_minute(tmp_path, signing_keys):
    priv, _ = signing_keys
    pkg = build_mlp_package(tmp_path / "p", "2.0.0", seed=1, signing_key=priv)
    clock = Clock()
    with FleetDB.open(tmp_path / "fleet.sqlite") as db:
        devs = _add_devices(db, 200)
        ctl = RolloutController(db, None, "f", signing_key=priv, package_base_url="http://x", clock=clock)
        st = ctl.start_rollout(pkg, stages="50,100", soak_s=0, max_new_per_min=10, rollout_id="rl", salt="s", report_timeout_s=1e6,
                               gates=["failures:0.5:1"])
        buckets = [ro.bucket(d, "s") for d in devs]

        def assigned():
            return sum(1 for b in buckets if ro.in_stage(b, ctl.status("rl")["percent"]))

        assert assigned() == 10 and st["stage_started"] is None  # soak waits until the stage is fully open
        for minute in range(1, 4):
            clock.t += 60
            ctl.tick()
            assert assigned() == 10 * (minute + 1)
            assert ctl.status("rl")["stage_index"] == 0
        clock.t += 3600
        ctl.tick()  # the whole 50% opens, its zero soak is over at once: the next stage ramps from 50%
        st = ctl.status("rl")
        assert st["stage_index"] == 1 and sum(1 for b in buckets if 50 <= b < st["percent"]) == 10
        kinds = [e["kind"] for e in db.rollout_events("rl")]
        assert kinds == ["start", "ramp", "ramp", "ramp", "ramp", "promote"]


def test_devices_that_never_report_time_out_and_fail_the_rollout(tmp_path, signing_keys):
    priv, _ = signing_keys
    pkg = build_mlp_package(tmp_path / "p", "2.0.0", seed=1, signing_key=priv)
    clock = Clock()
    with FleetDB.open(tmp_path / "fleet.sqlite") as db:
        _add_devices(db, 20)
        ctl = RolloutController(db, None, "f", signing_key=priv, package_base_url="http://x", clock=clock)
        ctl.start_rollout(pkg, stages="50,100", soak_s=600, report_timeout_s=30, rollout_id="to", salt="s")
        clock.t += 10
        ctl.tick()
        st = ctl.status("to")
        assert st["timed_out"] == [] and st["state"] == "running"
        clock.t += 30
        ctl.tick()
        st = ctl.status("to")
        assert len(st["timed_out"]) == sum(1 for i in range(20) if ro.bucket(f"dev{i:03d}", "s") < 50) > 0
        assert st["state"] == "aborted" and "failures" in st["reason"]


def test_controller_state_on_each_db_backend(fleet_db_url, tmp_path, signing_keys):
    priv, _ = signing_keys
    pkg = build_mlp_package(tmp_path / "p", "2.0.0", seed=1, signing_key=priv)
    with FleetDB.open(fleet_db_url) as db:
        _add_devices(db, 5)
        ctl = RolloutController(db, None, "f", signing_key=priv, package_base_url="http://x")
        ctl.start_rollout(pkg, stages="10,100", soak_s=60, rollout_id="pg")
        ctl.tick()
        assert ctl.pause("pg")["state"] == "paused"
        assert ctl.promote("pg", force=True)["stage_index"] == 1
        row = db.rollout_get("pg")
        assert db.rollout_transition("pg", row["seq"] - 1, {"state": "aborted"}, None) is False  # stale
        assert ctl.abort("pg")["state"] == "aborted"
        assert [e["kind"] for e in db.rollout_events("pg")] == ["start", "pause", "force_promote", "abort"]
        assert db.rollout_gate_evals("pg") and db.rollout_status("pg")["rollout_id"] == "pg"
        assert [r["rollout_id"] for r in db.rollouts_list()] == ["pg"]


def test_restarted_controller_serves_again_and_repoints_the_plan(tmp_path, signing_keys):
    priv, _ = signing_keys
    pkg = build_mlp_package(tmp_path / "p", "2.0.0", seed=1, signing_key=priv)
    with FleetDB.open(tmp_path / "fleet.sqlite") as db:
        a = RolloutController(db, None, "f", signing_key=priv)
        url_a = a.start_rollout(pkg, stages="100", soak_s=60, rollout_id="sv")["package"]["url"]
        with urllib.request.urlopen(url_a, timeout=5) as r:
            assert r.read() == pkg.read_bytes()
        a.stop()
        b = RolloutController(db, None, "f", signing_key=priv).start()
        try:
            st = b.status("sv")
            assert st["package"]["url"] != url_a and st["seq"] == 2
            with urllib.request.urlopen(st["package"]["url"], timeout=5) as r:
                assert r.read() == pkg.read_bytes()
        finally:
            b.stop()
