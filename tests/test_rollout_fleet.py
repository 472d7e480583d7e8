"""Rollout acceptance: a simulated fleet of real agents, real Mosquitto, HTTP and SQLite.

Choice (see tests/rollout_fleet.py): every device is a real Agent with its
own state dir, store, outbox and MQTT client running a tiny ONNX MLP under
onnxruntime, all in this one test process (50 processes with onnxruntime
would not fit the time budget on 2 cores).
"""
from __future__ import annotations

import json
import random
import subprocess
import time

import pytest
from rollout_fleet import Device, Users, wait_for
from test_agent import build_mlp_package

from edgeship import rollout as ro
from edgeship.fleet.collector import Collector
from edgeship.fleet.controller import RolloutController
from edgeship.fleet.db import FleetDB

pytestmark = pytest.mark.mqtt

GATES = ["negative_feedback:0.1:40", "error_rate:0.02:200", "latency_p95:3:200:0.95:25", "failures:0.05:1"]


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory, signing_keys):
    from edgeship import signing

    priv, _ = signing_keys
    d = tmp_path_factory.mktemp("rollout-pkgs")
    other, _ = signing.keygen(d / "keys" / "unknown.key")
    return {"v1": build_mlp_package(d, "1.0.0", seed=0, signing_key=priv),
            "v2": build_mlp_package(d, "2.0.0", seed=1, signing_key=priv),
            "v3": build_mlp_package(d, "3.0.0", seed=2, signing_key=priv),
            "unknown_key": build_mlp_package(d / "u", "2.6.0", seed=3, signing_key=other),
            "unknown_pub": d / "keys" / "unknown.pub"}


class Fleet:
    def __init__(self, root, broker, pkgs, keys, n: int, fleet: str) -> None:
        self.root, self.fleet = root, fleet
        self.priv, self.pub = keys
        self.db = FleetDB.open(root / "fleet.sqlite")
        self.collector = Collector(self.db, broker.url, fleet, client_id=f"col-{fleet}").start()
        self.devices = [Device(root / "devices", f"d{i:03d}", fleet, broker.url, pkgs["v1"], self.pub)
                        for i in range(n)]
        for d in self.devices:
            d.start()
        self.broker = broker
        self.controller: RolloutController | None = None
        self.users: Users | None = None
        wait_for(lambda: len(self.db.devices(fleet)) == n, 30, what="every device seen by the collector")

    def controller_start(self, **kw) -> RolloutController:
        self.controller = RolloutController(self.db, self.broker.url, self.fleet, signing_key=self.priv, tick_s=0.3,
                                            **kw).start()
        return self.controller

    def users_start(self, bad: dict) -> Users:
        self.users = Users(self.devices, bad)
        self.users.start()
        return self.users

    def close(self) -> None:
        if self.users is not None:
            self.users.stop()
        if self.controller is not None:
            self.controller.stop(2)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as ex:  # each stop drains its outbox: in parallel
            list(ex.map(lambda d: d.stop(), self.devices))
        self.collector.stop(2)
        self.db.close()


@pytest.fixture()
def make_fleet(tmp_path, mosquitto, pkgs, signing_keys):
    made = []

    def make(n: int, name: str) -> Fleet:
        f = Fleet(tmp_path / name, mosquitto, pkgs, signing_keys, n, name)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def _spawner(request, cmd: list[str]):
    """A function that starts ``cmd`` again each call; whatever still runs is killed when the test ends."""
    procs: list[subprocess.Popen] = []

    def spawn() -> subprocess.Popen:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    def cleanup() -> None:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)

    request.addfinalizer(cleanup)
    return spawn


def _sha(path) -> str:
    from edgeship.agent.store import file_sha256

    return file_sha256(path)


def test_good_model_promoted_through_every_stage(make_fleet, pkgs):
    f = make_fleet(50, "good")
    users = f.users_start({"2.0.0": 0.1, "1.0.0": 0.1})
    ctl = f.controller_start()
    st = ctl.start_rollout(pkgs["v2"], stages="1,10,50,100", soak_s=1.5, gates=GATES, salt="good-salt")
    rid = st["rollout_id"]
    wait_for(lambda: ctl.status(rid)["state"] != "running", 90, step=0.5, what="the rollout to finish")
    s = ctl.status(rid)
    assert s["state"] == "completed", (s["reason"], s["gates"])
    kinds = [(e["kind"], e["stage_index"]) for e in s["events"]]
    assert [k for k in kinds if k[0] in ("promote", "complete")] == [("promote", 1), ("promote", 2), ("promote", 3),
                                                                     ("complete", 3)]
    wait_for(lambda: all(d.version == "2.0.0" for d in f.devices), 30, what="every device on 2.0.0")
    wait_for(lambda: ctl.status(rid)["devices_per_state"].get("healthy") == 50, 30, step=0.5,
             what="50 healthy reports")
    users.stop()
    assert users.failed == 0 and users.ok > 1000, users.errors[:3]


def test_worse_model_aborted_at_first_stage_with_enough_feedback(make_fleet, pkgs):
    f = make_fleet(50, "bad")
    users = f.users_start({"3.0.0": 0.6, "1.0.0": 0.1})
    ctl = f.controller_start()
    # A 3 s soak: the canary's feedback has to travel agent -> 0.5 s telemetry window -> MQTT -> collector
    # after the devices switch, and 1.5 s let a loaded machine promote the 50 % stage before 40 samples
    # arrived (abort only at 100 %: the CI failure of 2026-12-03).
    rid = ctl.start_rollout(pkgs["v3"], stages="1,10,50,100", soak_s=3, gates=GATES, salt="bad-salt")["rollout_id"]
    wait_for(lambda: ctl.status(rid)["state"] != "running", 90, step=0.5, what="the rollout to stop")
    s = ctl.status(rid)
    assert s["state"] == "aborted" and "negative_feedback" in s["reason"], s["reason"]
    abort_pct = s["percent"]
    assert abort_pct < 100
    # Every stage promoted before the abort had too few feedback samples to judge the new model.
    for e in f.db.rollout_events(rid):
        if e["kind"] == "promote":
            gates = {g["name"]: g for g in json.loads(e["detail"])["gates"]}
            assert gates["negative_feedback"]["verdict"] == "insufficient", gates["negative_feedback"]
    gate = next(g for g in s["gates"] if g["name"] == "negative_feedback")
    assert gate["verdict"] == "fail" and gate["canary_n"] >= 40
    sha = _sha(pkgs["v3"])
    wait_for(lambda: all(d.version == "1.0.0" for d in f.devices), 30, what="every device back on 1.0.0")
    switched = [d for d in f.devices if d.activated(sha)]
    assert switched, "some devices ran the new model before the abort"
    for d in f.devices:
        b = ro.bucket(d.device, "bad-salt")
        if not ro.in_stage(b, abort_pct):
            assert not d.activated(sha), f"{d.device} (bucket {b:.2f}) activated it outside the stage"
    wait_for(lambda: ctl.status(rid)["devices_per_state"].get("rolled_back", 0) == len(switched), 30, step=0.5,
             what="rolled_back reports from every switched device")
    users.stop()
    assert users.failed == 0, users.errors[:3]


@pytest.mark.parametrize("case", ["corrupt", "unknown_key"])
def test_bad_package_is_refused_never_activated_and_counted(make_fleet, pkgs, tmp_path, case, request):
    f = make_fleet(8, f"refuse-{case.replace('_', '-')}")
    if case == "corrupt":
        from edgeship.fleet.server import PackageServer

        (tmp_path / "www").mkdir()
        data = bytearray(pkgs["v2"].read_bytes())
        data[len(data) // 2] ^= 0xFF  # the copy on the server differs from the package the plan signs
        (tmp_path / "www" / "served.edgepkg").write_bytes(bytes(data))
        srv = PackageServer(tmp_path / "www").start()
        request.addfinalizer(srv.stop)
        ctl = f.controller_start()
        rid = ctl.start_rollout(pkgs["v2"], stages="50,100", soak_s=30, gates=GATES, salt="s",
                                url=f"{srv.url}/packages/served.edgepkg")["rollout_id"]
        sha = ctl.status(rid)["package"]["sha256"]
    else:
        # The controller trusts the key (a misconfigured controller); the devices do not.
        ctl = f.controller_start(trusted_keys=[str(pkgs["unknown_pub"])])
        rid = ctl.start_rollout(pkgs["unknown_key"], stages="50,100", soak_s=30, gates=GATES, salt="s")["rollout_id"]
        sha = _sha(pkgs["unknown_key"])
    wait_for(lambda: ctl.status(rid)["state"] == "aborted", 60, step=0.5, what="the abort")
    s = ctl.status(rid)
    assert "failures" in s["reason"] and s["failures"]["total"] >= 1, s
    reasons = " ".join(s["failures"]["by_reason"])
    assert ("IntegrityError" in reasons) if case == "corrupt" else ("SignatureError" in reasons), reasons
    assert all(d.version == "1.0.0" and not d.activated(sha) and not d.agent.store.has(sha) for d in f.devices)


def test_download_cut_halfway_resumes_and_activates(make_fleet, pkgs, request):
    from edgeship.fleet.server import PackageServer

    f = make_fleet(6, "cut")
    srv = PackageServer(pkgs["v2"].parent).start()
    request.addfinalizer(srv.stop)
    size = pkgs["v2"].stat().st_size
    srv.cut_next(size // 2, responses=6)  # the first downloads all break halfway
    ctl = f.controller_start()
    rid = ctl.start_rollout(pkgs["v2"], stages="100", soak_s=0.5, gates=GATES, salt="s",
                            url=f"{srv.url}/packages/{pkgs['v2'].name}")["rollout_id"]
    wait_for(lambda: all(d.version == "2.0.0" for d in f.devices), 60, what="every device on 2.0.0")
    assert srv.counters["cut"] == 6 and srv.counters["partial"] >= 6  # cut, then resumed with Range
    wait_for(lambda: ctl.status(rid)["state"] == "completed", 30, step=0.5, what="completion")
    assert ctl.status(rid)["failures"]["total"] == 0


def test_controller_killed_mid_stage_resumes_without_double_promotion(make_fleet, pkgs):
    f = make_fleet(10, "restart")
    f.users_start({})
    ctl = f.controller_start()
    rid = ctl.start_rollout(pkgs["v2"], stages="20,60,100", soak_s=2.0, gates=GATES, salt="r")["rollout_id"]
    wait_for(lambda: ctl.status(rid)["stage_index"] == 1, 60, step=0.2, what="stage 2")
    ctl.stop(2)  # gone mid-stage, soak half done
    before = f.db.rollout_get(rid)
    # Two controllers come back at once (a restarted one and a stray one): still one promotion per stage.
    c1 = f.controller_start()
    c2 = RolloutController(f.db, f.broker.url, f.fleet, signing_key=f.priv, tick_s=0.3).start()
    try:
        wait_for(lambda: c1.status(rid)["state"] == "completed", 60, step=0.5, what="completion after restart")
    finally:
        c2.stop(2)
    ev = [e["kind"] for e in f.db.rollout_events(rid)]
    assert ev.count("promote") == 2 and ev.count("complete") == 1, ev
    assert f.db.rollout_get(rid)["stage_started"] != before["stage_started"]  # the next stage opened afresh
    wait_for(lambda: all(d.version == "2.0.0" for d in f.devices), 30, what="every device on 2.0.0")


def test_pinned_device_is_respected_and_reported(make_fleet, pkgs):
    f = make_fleet(4, "pin")
    f.devices[0].agent.store.pin("1.0.0")
    ctl = f.controller_start()
    rid = ctl.start_rollout(pkgs["v2"], stages="100", soak_s=0.5, gates=GATES, salt="p")["rollout_id"]
    wait_for(lambda: all(d.version == "2.0.0" for d in f.devices[1:]), 60, what="unpinned devices on 2.0.0")
    wait_for(lambda: ctl.status(rid)["pinned"] == ["d000"], 30, step=0.5, what="the pin reported")
    assert f.devices[0].version == "1.0.0" and not f.devices[0].agent.store.has(_sha(pkgs["v2"]))


@pytest.mark.parametrize("instant", ["after_activate", "before_activate", "second_crash_in_window"])
def test_device_killed_mid_switch_resumes(make_fleet, pkgs, instant):
    """The files a kill leaves at each instant of a switch; the restarted agent must resume right."""
    f = make_fleet(1, f"kill-{instant.replace('_', '-')}")
    dev = f.devices[0]
    ctl = f.controller_start()
    # A long health window: the device stays "active" (in its window) while we kill it.
    rid = ctl.start_rollout(pkgs["v2"], stages="100", soak_s=60, gates=GATES, salt="k",
                            health={"window_s": 30})["rollout_id"]
    sha2 = _sha(pkgs["v2"])
    wait_for(lambda: dev.version == "2.0.0", 30, what="the switch")
    wait_for(lambda: (dev.client.state.get("phase") or {}).get("step") == "active", 10, what="phase active")
    dev.stop()
    st_path = dev.state_dir / "rollout.json"
    state = json.loads(st_path.read_text())
    state["clean_stop"] = False  # what SIGKILL leaves: stop() never ran
    if instant == "after_activate":
        state["phase"]["step"] = "switching"  # state.json already names the new package
    elif instant == "before_activate":
        state["phase"]["step"] = "switching"
        dev.agent.store.rollback()  # state.json still names the old package
    else:
        state["phase"]["unclean"] = 1  # it already died once inside this health window
    st_path.write_text(json.dumps(state))
    # Shorter window for the restarted agent's judgement (the plan's window is 30 s): a new plan.
    ctl.pause(rid)
    ctl.resume(rid)
    again = Device(f.root / "devices", dev.device, f.fleet, f.broker.url, pkgs["v1"], f.pub)
    f.devices[0] = again
    again.start()
    if instant == "second_crash_in_window":
        wait_for(lambda: again.version == "1.0.0", 30, what="the rollback after a crash loop")
        wait_for(lambda: ctl.status(rid)["devices_per_state"].get("failed") == 1, 30, step=0.3, what="failed report")
        assert "restarted uncleanly" in " ".join(ctl.status(rid)["failures"]["by_reason"]) or \
            "crashed" in json.dumps(f.db.rollout_reports(rid))
    else:
        assert again.agent.store.has(sha2)
        wait_for(lambda: again.version == "2.0.0", 30, what="the switch to resume")
        wait_for(lambda: (again.client.state["phase"] or {}).get("step") == "active", 10, what="phase active again")
        reports = [r["state"] for r in f.db.rollout_reports(rid) if r["device"] == dev.device]
        assert "failed" not in reports
        assert json.loads((again.state_dir / "state.json").read_text())["active"] == sha2


def test_zero_drop_switch_under_steady_flow(tmp_path):
    """Requests keep flowing through repeated swaps: none lost, none failed, none answered by the old model late."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from switch import run

    res = run(rate=300, switches=4, between_s=0.25, workdir=tmp_path)
    assert res["submitted"] > 300
    assert res["failed"] == 0 and res["lost"] == 0 and res["old_after_new"] == 0, res
    assert len(res["gaps_ms"]) == 4


def test_controller_process_sigkilled_mid_stage_resumes(make_fleet, pkgs, request):
    """`edgeship fleet rollout run` killed with SIGKILL mid-stage; a new one finishes the rollout exactly once."""
    import sys

    from edgeship.fleet.server import PackageServer

    f = make_fleet(6, "sigkill")
    srv = PackageServer(pkgs["v2"].parent).start()
    request.addfinalizer(srv.stop)
    # Stored only (no broker here): the controller process signs and publishes it.
    RolloutController(f.db, None, f.fleet, signing_key=f.priv, package_base_url=srv.url).start_rollout(
        pkgs["v2"], stages="20,60,100", soak_s=2.0, gates=GATES, rollout_id="sk", salt="k")
    cmd = [sys.executable, "-m", "edgeship.cli", "fleet", "rollout", "run", "--broker", f.broker.url,
           "--db", f.db.where, "--fleet", f.fleet, "--key", str(f.priv)]
    spawn = _spawner(request, cmd)
    first = spawn()
    wait_for(lambda: f.db.rollout_get("sk")["stage_index"] == 1, 60, step=0.2, what="stage 2 opened")
    first.kill()
    first.wait(10)
    spawn()
    wait_for(lambda: f.db.rollout_get("sk")["state"] == "completed", 60, step=0.3, what="completion")
    ev = [e["kind"] for e in f.db.rollout_events("sk")]
    assert ev.count("promote") == 2 and ev.count("complete") == 1, ev
    wait_for(lambda: all(d.version == "2.0.0" for d in f.devices), 30, what="every device on 2.0.0")


def test_agent_process_sigkilled_around_the_switch_resumes(make_fleet, pkgs, tmp_path, request):
    """A real `edgeship agent run` (rollout client wired from its config) is SIGKILLed right around its switch."""
    import sys

    f = make_fleet(0, "agent-kill")
    state = tmp_path / "agent-state"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f"""
[agent]
device_id = "k1"
fleet = "{f.fleet}"
state_dir = "{state}"
package = "{pkgs['v1']}"
trusted_keys = ["{f.pub}"]

[runtime]
threads = 1
warmup = 1

[mqtt]
broker = "{f.broker.url}"

[telemetry]
window_s = 0.5

[rollout]
health_window_s = 1
jitter_s = 0

[[sources]]
type = "synthetic"
id = "syn"
shape = [64]
rate_hz = 100
""")
    spawn = _spawner(request, [sys.executable, "-m", "edgeship.cli", "agent", "run", "--config", str(cfg)])
    first = spawn()
    wait_for(lambda: f.db.devices(f.fleet), 30, what="the agent online")
    ctl = f.controller_start()
    rid = ctl.start_rollout(pkgs["v2"], stages="100", soak_s=60, gates=GATES, salt="k")["rollout_id"]
    sha2 = _sha(pkgs["v2"])

    def reported(state):
        return any(r["state"] == state for r in f.db.rollout_reports(rid))

    wait_for(lambda: reported("verified"), 30, step=0.02, what="the package verified")
    time.sleep(random.Random().uniform(0, 0.05))  # somewhere in load/warm/swap/state.json
    first.kill()
    first.wait(10)
    on_disk = json.loads((state / "state.json").read_text())["active"]
    assert on_disk in (sha2, _sha(pkgs["v1"]))  # either complete package, never a torn state
    spawn()
    wait_for(lambda: reported("healthy"), 60, step=0.2, what="a healthy report after the restart")
    assert json.loads((state / "state.json").read_text())["active"] == sha2
    assert not reported("failed") and not list((state / "store").glob(".tmp-*"))


def test_cleared_newest_plan_cannot_downgrade_a_restarted_device(make_fleet, pkgs):
    """#17.4: clearing the newest rollout's retained plan must not let an older signed plan win after a restart."""
    f = make_fleet(1, "floor")
    dev = f.devices[0]
    ctl = f.controller_start()
    r2 = ctl.start_rollout(pkgs["v2"], stages="100", soak_s=0.3, gates=GATES, salt="f2")["rollout_id"]
    wait_for(lambda: dev.version == "2.0.0", 30, what="the switch to 2.0.0")
    wait_for(lambda: ctl.status(r2)["state"] == "completed", 30, step=0.3, what="rollout 2 completed")
    r3 = ctl.start_rollout(pkgs["v3"], stages="100", soak_s=0.3, gates=GATES, salt="f3")["rollout_id"]
    wait_for(lambda: dev.version == "3.0.0", 30, what="the switch to 3.0.0")
    wait_for(lambda: ctl.status(r3)["state"] == "completed", 30, step=0.3, what="rollout 3 completed")
    ctl.stop(2)
    f.controller = None
    dev.stop()
    # The attack: anyone on the broker clears the retained plan of the newest rollout.
    import paho.mqtt.client as mqtt
    from paho.mqtt import publish

    publish.single(f"edgeship/v1/{f.fleet}/rollouts/{r3}", payload=None, qos=1, retain=True,
                   hostname=f.broker.host, port=f.broker.port,
                   protocol=mqtt.MQTTv311)
    again = Device(f.root / "devices", dev.device, f.fleet, f.broker.url, pkgs["v1"], f.pub)
    f.devices[0] = again
    again.start()
    # The older signed plan (2.0.0) arrives and is refused as older than the newest plan the device has seen.
    wait_for(lambda: again.client.counters.get("plans_stale", 0) >= 1 or again.version != "3.0.0", 30,
             what="the older plan refused (or, wrongly, installed)")
    time.sleep(1.0)  # give a (wrong) switch time to happen
    assert again.version == "3.0.0"
    assert "older than" in (again.client.last_error or "")
    # A deliberate rollback stays possible: a newer signed plan of the older package.
    ctl = f.controller_start()
    back = ctl.start_rollout(pkgs["v2"], stages="100", soak_s=0.3, gates=GATES, salt="f4")["rollout_id"]
    wait_for(lambda: again.version == "2.0.0", 30, what="the deliberate rollback to 2.0.0")
    assert again.client.state["floor"]["rollout_id"] == back


def test_fleet_flags_a_device_that_runs_another_model_than_a_completed_rollout(make_fleet, pkgs):
    """#17.4: desired vs reported version per device; a mismatch is an alert (audit log + rollout status)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt import publish

    from edgeship import protocol

    f = make_fleet(2, "shadow")
    ctl = f.controller_start()
    rid = ctl.start_rollout(pkgs["v2"], stages="100", soak_s=0.3, gates=GATES, salt="s")["rollout_id"]
    wait_for(lambda: all(d.version == "2.0.0" for d in f.devices), 30, what="both devices on 2.0.0")
    wait_for(lambda: ctl.status(rid)["state"] == "completed", 30, step=0.3, what="the rollout completed")
    wait_for(lambda: all(d["model_version"] == "2.0.0" for d in f.db.devices(f.fleet)), 30,
             what="both devices reporting 2.0.0")
    assert ctl.status(rid)["version_mismatch"] == []
    # d001 goes away and something reports it back on 1.0.0 (a downgrade by whatever means).
    victim = f.devices.pop(1)
    victim.stop()
    body = {"online": True, "session": time.time() + 10, "agent_version": "x", "started_at": time.time(),
            "model": {"name": "mlp", "version": "1.0.0", "sha256": _sha(pkgs["v1"])}}
    msg = protocol.make_message("state", "d001", body)
    publish.single(protocol.device_topic(f.fleet, "d001", "state"), protocol.encode(msg), qos=1, retain=True,
                   hostname=f.broker.host, port=f.broker.port, protocol=mqtt.MQTTv311)
    wait_for(lambda: any(a["action"] == "device.version_mismatch" for a in f.db.audit_list()), 20, step=0.3,
             what="the mismatch alert in the audit log")
    alert = next(a for a in f.db.audit_list() if a["action"] == "device.version_mismatch")
    assert alert["target"] == "device/d001" and "1.0.0" in alert["outcome"] and "2.0.0" in alert["outcome"]
    mism = ctl.status(rid)["version_mismatch"]
    assert [(m["device"], m["reported"], m["desired"]) for m in mism] == [("d001", "1.0.0", "2.0.0")]
    # One alert per device and reported model, not one per tick.
    time.sleep(1.0)
    assert sum(a["action"] == "device.version_mismatch" for a in f.db.audit_list()) == 1


def test_plans_expire_unless_the_controller_re_signs_them(make_fleet, pkgs):
    """#17.4: an old signed plan cannot install on a device that never saw a newer one once it has lapsed."""
    f = make_fleet(1, "ttl")
    ctl = f.controller_start(plan_ttl_s=3.0)
    rid = ctl.start_rollout(pkgs["v2"], stages="100", soak_s=0.3, gates=GATES, salt="t")["rollout_id"]
    wait_for(lambda: f.devices[0].version == "2.0.0", 30, what="the switch to 2.0.0")
    wait_for(lambda: ctl.status(rid)["state"] == "completed", 30, step=0.3, what="the rollout completed")
    # While the controller runs it keeps the newest plan alive: re-signed before it lapses.
    wait_for(lambda: any(e["kind"] == "refresh" for e in f.db.rollout_events(rid)), 10, step=0.3,
             what="a refresh of the plan")
    ctl.stop(2)
    f.controller = None
    time.sleep(3.5)  # the last published plan lapses
    newcomer = Device(f.root / "devices", "d001", f.fleet, f.broker.url, pkgs["v1"], f.pub)
    f.devices.append(newcomer)
    newcomer.start()
    wait_for(lambda: newcomer.client.counters.get("plans_expired", 0) >= 1, 20, what="the lapsed plan refused")
    assert newcomer.version == "1.0.0" and "expired" in newcomer.client.last_error
    # The controller back: it re-signs the newest plan and the newcomer follows it.
    f.controller_start(plan_ttl_s=3.0)
    wait_for(lambda: newcomer.version == "2.0.0", 30, what="the newcomer on 2.0.0 after the re-signed plan")


def test_plan_and_package_keys_have_separate_roles_and_rotate(make_fleet, pkgs, tmp_path):
    """#17.17: packages verify with the package key, plans with the plan key; a plan key rotates."""
    from edgeship import signing

    f = make_fleet(0, "roles")
    plan_old, plan_old_pub = signing.keygen(tmp_path / "plans-2026.key")
    plan_new, plan_new_pub = signing.keygen(tmp_path / "plans-2027.key")

    def device(name, plan_keys):
        d = Device(f.root / "devices", name, f.fleet, f.broker.url, pkgs["v1"], f.pub, plan_keys=plan_keys)
        f.devices.append(d)
        return d.start()

    # d-old trusts only the old plan key; d-both trusts both during the rotation.
    d_old, d_both = device("d-old", [plan_old_pub]), device("d-both", [plan_old_pub, plan_new_pub])
    wait_for(lambda: len(f.db.devices(f.fleet)) == 2, 30, what="both devices seen")

    # 1. A plan signed with the *package* key is not a plan key: refused by both.
    ctl = f.controller_start()  # signs plans with the package key (the one-key set-up)
    ctl.start_rollout(pkgs["v2"], stages="100", soak_s=0.3, gates=GATES, salt="r1")
    wait_for(lambda: all(d.client.counters["plans_refused"] >= 1 for d in (d_old, d_both)), 20,
             what="the package-key plan refused")
    assert d_old.version == d_both.version == "1.0.0"
    ctl.stop(2)

    # 2. The new plan key, the package still verified with the package key: only d-both follows.
    f.controller = RolloutController(f.db, f.broker.url, f.fleet, signing_key=plan_new, trusted_keys=[f.pub],
                                     tick_s=0.3).start()
    f.controller.start_rollout(pkgs["v3"], stages="100", soak_s=0.3, gates=GATES, salt="r2")
    wait_for(lambda: d_both.version == "3.0.0", 30, what="d-both on 3.0.0 under the new plan key")
    wait_for(lambda: d_old.client.counters["plans_refused"] >= 2, 20, what="d-old refusing the new plan key")
    assert d_old.version == "1.0.0"
    assert "not trusted" in (d_old.client.last_error or "")
    # 3. A package signed with the plan key is not a package: the controller refuses to roll it out.
    from edgeship.errors import RolloutError

    bad = build_mlp_package(tmp_path / "bad", "4.0.0", seed=4, signing_key=plan_new)
    with pytest.raises(RolloutError, match="refusing to roll out"):
        f.controller.start_rollout(bad, stages="100", soak_s=0.3, gates=GATES, salt="r3")
