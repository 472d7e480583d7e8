"""Faults: a full state disk on the device, a full fleet-DB disk, a broker restart.

Each case fills a real filesystem (a 4 MiB tmpfs) or restarts a real Mosquitto, and asserts the
system held: a clear error that says what is wrong, health that says it, nothing accepted lost.
"""
from __future__ import annotations

import http.client
import json

import pytest
from waiting import wait_until

from edgeship import protocol
from edgeship.errors import TransportError
from edgeship.fleet.collector import Collector
from edgeship.fleet.db import FleetDB
from edgeship.mqtt import LinkOptions, MqttLink

AREA = "faults"
FLEET = "hf"
FAST = LinkOptions(backoff_base=0.05, backoff_cap=0.5)


def _fb(device: str, i: int) -> tuple[str, bytes]:
    msg = protocol.make_message("feedback", device, {"prediction_id": f"p{i}", "kind": "correct"}, msg_id=f"m{i}")
    return protocol.device_topic(FLEET, device, "feedback"), protocol.encode(msg)


def test_outbox_on_a_full_disk_says_so_and_recovers(tiny_disk):
    """#17.19: the error read "cannot rollback - no transaction is active"."""
    from edgeship.agent.outbox import Outbox

    ob = Outbox(tiny_disk.path / "outbox.sqlite", 1 << 20)
    try:
        ob.put("feedback", "t", b"x" * 100)
        tiny_disk.fill()
        with pytest.raises(TransportError) as err:
            for _ in range(2000):  # SQLite may still have a free page or two
                ob.put("feedback", "t", b"y" * 2000)
        assert "state disk is full" in str(err.value) and "cannot rollback" not in str(err.value)
        assert ob.disk_error and ob.disk_full_count == 1
        tiny_disk.free()
        ob.put("feedback", "t", b"z" * 100)
        assert ob.disk_error is None and len(ob) >= 2  # what was accepted before is still there
    finally:
        ob.close()


def test_agent_health_and_telemetry_report_a_full_state_disk(tiny_disk, tmp_path):
    """#17.19: /v1/health said "ok" while the state disk was full."""
    from test_agent import build_mlp_package

    from edgeship.agent import Agent
    from edgeship.agent.config import parse_config
    from edgeship.agent.link import FleetLink

    pkg = build_mlp_package(tmp_path / "pkg")
    state = tiny_disk.path / "state"
    agent = Agent(parse_config({"agent": {"package": str(pkg), "state_dir": str(state), "allow_unsigned": True},
                                "api": {"enabled": True, "port": 0}}))
    fl = FleetLink(state_dir=state, fleet=FLEET, device="pi-1", broker=None, window_s=3600).attach(agent)
    agent.start()
    try:
        def health():
            conn = http.client.HTTPConnection("127.0.0.1", agent.api.port, timeout=10)
            conn.request("GET", "/v1/health")
            resp = conn.getresponse()
            body = json.loads(resp.read())
            conn.close()
            return resp.status, body

        status, h = health()
        assert h["status"] == "ok" and h["disk"]["full"] is False and h["disk"]["free_bytes"] > 0
        tiny_disk.fill()
        with pytest.raises(TransportError, match="state disk is full"):
            for _ in range(2000):
                fl.feedback_manager.outbox.put("feedback", "t", b"y" * 2000)
        status, h = health()
        assert status == 200 and h["status"] == "degraded"
        assert h["disk"]["full"] is True and "state disk is full" in h["disk"]["error"]
        assert h["components"]["FleetLink"]["disk"]["write_failures"] >= 1
        tiny_disk.free()
        msg = fl.telemetry.flush()  # the first window stored after the fault tells the fleet about it
        assert msg["disk"]["write_failures"] >= 1 and "state disk is full" in msg["disk"]["error"]
        assert health()[1]["status"] == "ok"
    finally:
        tiny_disk.free()
        agent.stop()


@pytest.mark.mqtt
def test_collector_on_a_full_db_disk_retries_and_loses_nothing(tiny_disk, mosquitto):
    db = FleetDB.open(tiny_disk.path / "fleet.sqlite")
    col = Collector(db, mosquitto.url, FLEET, client_id="hostile-fulldb", link_options=FAST).start()
    pub = MqttLink(mosquitto.url, client_id="hostile-fulldb-pub").start()
    try:
        assert col.wait_ready(10) and pub.wait_connected(10)
        tiny_disk.fill()
        for i in range(300):
            pub.publish(*_fb("d1", i))
        assert wait_until(lambda: col.stats()["db_errors"] >= 1, 20), col.stats()
        assert col.stats()["rejected"] == 0  # a full disk is not the messages' fault: none dead-lettered
        tiny_disk.free()
        assert wait_until(lambda: db.message_counts().get("feedback") == 300, 30), db.message_counts()
        assert col.alive and col.stats()["crashes"] == 0
    finally:
        tiny_disk.free()
        pub.stop()
        col.stop()
        db.close()


@pytest.mark.mqtt
def test_collector_rides_through_a_broker_restart(mosquitto_private, tmp_path):
    db = FleetDB.open(tmp_path / "f.sqlite")
    col = Collector(db, mosquitto_private.url, FLEET, client_id="hostile-restart", link_options=FAST).start()
    pub = MqttLink(mosquitto_private.url, client_id="hostile-restart-pub", backoff_base=0.05, backoff_cap=0.5).start()
    try:
        assert col.wait_ready(10) and pub.wait_connected(10)
        for i in range(50):
            assert pub.publish(*_fb("d1", i)).wait(10)
        assert wait_until(lambda: db.message_counts().get("feedback") == 50, 10)
        mosquitto_private.restart()
        assert wait_until(lambda: col.link.connected and pub.connected, 20)
        for i in range(50, 100):
            assert pub.publish(*_fb("d1", i)).wait(10)
        assert wait_until(lambda: db.message_counts().get("feedback") == 100, 20)
        assert col.alive and col.stats()["rejected"] == 0
    finally:
        pub.stop()
        col.stop()
        db.close()
