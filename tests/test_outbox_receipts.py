"""#17.7: end-to-end receipts. Nothing accepted is lost even when the broker keeps nothing.

The device outbox deletes a row only on the collector's receipt (sent after the fleet DB commit),
not on the broker's PUBACK, and resends what is not receipted in time. Real Mosquitto *without*
persistence, the real embedded amqtt broker, real SQLite fleet DB and outbox: the broker, the
collector and the agent are each stopped/killed mid-stream, and every message must be in the DB
exactly once. Without receipts (the old code) the rows were gone on PUBACK and the broker's restart
lost them.
"""
from __future__ import annotations

import threading

import pytest
from conftest import MosquittoBroker, wait_port
from waiting import wait_until

from edgeship import protocol
from edgeship.agent.outbox import Forwarder, Outbox
from edgeship.fleet.collector import Collector
from edgeship.fleet.db import FleetDB
from edgeship.mqtt import LinkOptions, MqttLink

pytestmark = pytest.mark.mqtt

FLEET = "rc"
FAST = LinkOptions(backoff_base=0.1, backoff_cap=0.5)


@pytest.fixture()
def bare_mosquitto(tmp_path):
    """Mosquitto with Mosquitto's default ``persistence false``: a restart forgets everything."""
    broker = MosquittoBroker(tmp_path / "mosquitto")
    broker.conf.write_text(broker.conf.read_text().replace("persistence true", "persistence false"))
    broker.start()
    yield broker
    broker.stop()


def kill_and_restart(broker: MosquittoBroker) -> None:
    broker.proc.kill()  # SIGKILL: nothing is saved, even with persistence configured
    broker.proc.wait(10)
    broker.proc.stderr.close()
    broker.proc = None
    assert wait_port(broker.host, broker.port, timeout=5, up=False)
    broker.start()


class Device:
    """The agent's sending half: outbox + link + forwarder, stoppable like a killed agent."""

    def __init__(self, url: str, state, name: str = "dev-1", timeout_s: float = 1.0) -> None:
        self.url, self.state, self.name, self.timeout_s = url, state, name, timeout_s
        self.outbox = Outbox(state / "outbox.sqlite")
        self.start()

    def start(self) -> "Device":
        self.link = MqttLink(self.url, FAST, client_id=f"agent-{self.name}").start()
        self.fw = Forwarder(self.outbox, self.link, rate=0, fleet=FLEET, device=self.name,
                            receipt_timeout_s=self.timeout_s, receipt_backoff_cap_s=2.0).start()
        return self

    def put(self, i: int) -> str:
        msg = protocol.make_message("feedback", self.name, {"prediction_id": f"p-{i}", "kind": "correct"})
        self.outbox.put("feedback", protocol.device_topic(FLEET, self.name, "feedback"), protocol.encode(msg))
        return msg["msg_id"]

    def kill(self) -> None:
        """Like SIGKILL of the agent: stop without draining or flushing, then reopen the outbox file."""
        self.fw.stop(5)
        self.link.stop(5, flush=False)
        self.outbox.close()
        self.outbox = Outbox(self.state / "outbox.sqlite")

    def stop(self) -> None:
        self.fw.stop(5)
        self.link.stop(5)
        self.outbox.close()


def collector(db, url: str) -> Collector:
    col = Collector(db, url, FLEET, client_id="rc-collector", link_options=FAST).start()
    assert col.wait_ready(10)
    return col


def ids_in_db(db) -> list[str]:
    return [m for _, m in db.message_ids("feedback")]


class Rig:
    """A fleet DB, its collector (replaceable: ``rig.col = collector(...)``) and one device."""

    def __init__(self, url: str, tmp_path, **device_kw) -> None:
        self.db = FleetDB.open(tmp_path / "fleet.sqlite")
        self.col = collector(self.db, url)
        self.dev = Device(url, tmp_path / "agent", **device_kw)
        assert wait_until(lambda: self.dev.outbox.receipt_mode is True, 10), "the announcement never arrived"

    def all_arrive_once(self, sent: list[str]) -> None:
        """The outbox empties (every row receipted) and the DB holds each sent message exactly once."""
        assert wait_until(lambda: len(self.dev.outbox) == 0, 40), (self.dev.fw.health(), self.col.stats())
        got = ids_in_db(self.db)
        assert len(got) == len(set(got)) and set(got) == set(sent), (len(got), len(sent))

    def close(self) -> None:
        self.dev.stop()
        self.col.stop()
        self.db.close()


@pytest.fixture()
def rig(tmp_path):
    made: list[Rig] = []
    yield lambda url, **kw: made.append(Rig(url, tmp_path, **kw)) or made[-1]
    for r in made:
        r.close()


def test_broker_without_persistence_restarted_while_the_collector_is_away_loses_nothing(bare_mosquitto, rig):
    """Broker restart + collector restart + agent restart: every message once in the DB."""
    r = rig(bare_mosquitto.url)
    dev = r.dev
    r.col.stop()  # the collector is away; its session queues in the broker (in memory only)
    sent = [dev.put(i) for i in range(40)]
    assert wait_until(lambda: dev.fw.acked >= 40, 10), dev.fw.health()
    assert len(dev.outbox) == 40, "rows must stay until their receipt, not go on PUBACK"
    dev.kill()  # the agent dies with every row awaiting a receipt
    assert len(dev.outbox) == 40 and dev.outbox.receipt_mode is True
    kill_and_restart(bare_mosquitto)  # the broker forgets the collector's queue
    dev.start()
    r.col = collector(r.db, bare_mosquitto.url)
    r.all_arrive_once(sent)
    assert dev.fw.resends >= 40  # they came back from the outbox, not from the broker


def test_broker_killed_mid_stream_every_message_exactly_once(bare_mosquitto, rig):
    r = rig(bare_mosquitto.url)
    dev = r.dev
    sent: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        for i in range(400):
            if stop.wait(0.004):
                return
            sent.append(dev.put(i))

    t = threading.Thread(target=produce)
    t.start()
    try:
        assert wait_until(lambda: r.col.stats()["stored"] >= 100, 20), r.col.stats()
        kill_and_restart(bare_mosquitto)
    finally:
        t.join(30)
        stop.set()
    assert len(sent) == 400
    r.all_arrive_once(sent)
    s = r.col.stats()
    assert s["stored"] == 400 and s["rejected"] == 0


def test_embedded_amqtt_broker_restart_while_the_collector_is_away_loses_nothing(rig):
    pytest.importorskip("amqtt")
    from edgeship.fleet.embedded_broker import EmbeddedBroker

    brokers = [EmbeddedBroker().start()]
    try:
        r = rig(brokers[0].url)
        r.col.stop()
        sent = [r.dev.put(i) for i in range(30)]
        assert wait_until(lambda: r.dev.fw.acked >= 30, 10), r.dev.fw.health()
        brokers[0].stop()
        brokers.append(EmbeddedBroker(port=brokers[0].port).start())
        r.col = collector(r.db, brokers[1].url)
        r.all_arrive_once(sent)
    finally:
        for b in brokers:
            b.stop()


def test_collector_down_for_a_while_rows_stay_in_the_outbox_and_arrive_after(mosquitto, rig):
    r = rig(mosquitto.url, name="dev-away", timeout_s=0.5)
    r.col.stop()
    sent = [r.dev.put(i) for i in range(25)]
    assert wait_until(lambda: r.dev.fw.acked >= 25, 10)
    # Several resend timers pass while the collector is away: the rows stay, bounded resends.
    assert not wait_until(lambda: len(r.dev.outbox) < 25, 3)
    assert r.dev.fw.health()["confirm_on"] == "receipt"
    r.col = collector(r.db, mosquitto.url)
    r.all_arrive_once(sent)
    assert r.col.stats()["receipted"] >= 25


def test_without_an_announcement_the_outbox_keeps_pubback_behaviour(mosquitto, tmp_path):
    """An old collector never sends receipts: the outbox must not wait for them and grow forever."""
    db = FleetDB.open(tmp_path / "fleet.sqlite")
    col = Collector(db, mosquitto.url, "rc-old", client_id="rc-old-collector", receipts=False).start()
    assert col.wait_ready(10)
    link = MqttLink(mosquitto.url, FAST, client_id="agent-old").start()
    ob = Outbox(tmp_path / "outbox.sqlite")
    fw = Forwarder(ob, link, rate=0, fleet="rc-old", device="d1", receipt_timeout_s=0.5).start()
    try:
        for i in range(20):
            msg = protocol.make_message("feedback", "d1", {"prediction_id": f"p-{i}", "kind": "correct"})
            ob.put("feedback", protocol.device_topic("rc-old", "d1", "feedback"), protocol.encode(msg))
        assert wait_until(lambda: len(ob) == 0, 10), fw.health()
        assert ob.receipt_mode is None and fw.health()["confirm_on"] == "puback"
        assert wait_until(lambda: col.stats()["stored"] == 20, 10)
        assert col.stats()["receipts"] == 0
    finally:
        fw.stop()
        link.stop()
        ob.close()
        col.stop()
        db.close()


def test_a_cleared_announcement_turns_receipts_off_and_awaiting_rows_go_out_again(mosquitto, tmp_path):
    """Downgrade path: clearing the retained announcement (mosquitto_pub -r -n) returns devices to PUBACK."""
    ob = Outbox(tmp_path / "outbox.sqlite")
    link = MqttLink(mosquitto.url, FAST, client_id="agent-clear").start()
    fw = Forwarder(ob, link, rate=0, fleet="rc-clear", device="d1", receipt_timeout_s=60).start()
    admin = MqttLink(mosquitto.url, client_id="rc-admin").start()
    topic = protocol.collector_topic("rc-clear")
    try:
        assert admin.wait_connected(10)
        assert admin.publish(topic, protocol.encode(protocol.make_announcement()), retain=True).wait(10)
        assert wait_until(lambda: ob.receipt_mode is True, 10)
        for i in range(10):
            msg = protocol.make_message("feedback", "d1", {"prediction_id": f"p-{i}", "kind": "correct"})
            ob.put("feedback", protocol.device_topic("rc-clear", "d1", "feedback"), protocol.encode(msg))
        assert wait_until(lambda: fw.acked >= 10, 10) and len(ob) == 10
        assert admin.publish(topic, b"", retain=True).wait(10)
        assert wait_until(lambda: len(ob) == 0, 10), fw.health()  # resent and deleted on PUBACK
        assert ob.receipt_mode is False and fw.acked >= 20
    finally:
        admin.stop()
        fw.stop()
        link.stop()
        ob.close()


def test_stop_flushes_what_publish_accepted(mosquitto):
    """MqttLink.stop() used to drop accepted-but-unsent publishes silently; now it flushes them first."""
    sub = MqttLink(mosquitto.url, client_id="flush-sub", subscriptions=(("flush/t", 1),)).start()
    pub = MqttLink(mosquitto.url, client_id="flush-pub", max_inflight=20).start()
    try:
        assert sub.wait_connected(10) and pub.wait_connected(10)
        # 500 with 20 in flight: 25 round trips, enough that the old stop() dropped most of them, and
        # a flush bound (half of stop's 60 s) a loaded CI machine cannot run out of.
        for i in range(500):
            pub.publish("flush/t", b"%d" % i, qos=1)
        pub.stop(60)
        got = set()
        wait_until(lambda: (got.update(m.payload for m in iter(lambda: sub.get_nowait(), None))
                            or len(got) == 500), 20)
        assert len(got) == 500, f"{500 - len(got)} accepted publishes were dropped at stop"
        assert pub.counters["dropped_at_stop"] == 0
    finally:
        sub.stop()


def test_flush_is_bounded_and_says_what_is_left(tmp_path):
    broker = f"mqtt://127.0.0.1:{_dead_port()}"
    link = MqttLink(broker, client_id="flush-dead").start()
    try:
        link.publish("t/x", b"1", qos=1)
        assert link.pending() == 1
        assert link.flush(0.2) is False
    finally:
        link.stop(0.5)
    assert link.counters["dropped_at_stop"] == 1


def _dead_port() -> int:
    from conftest import free_port

    return free_port()


def test_a_busy_devices_ids_share_receipts(mosquitto, rig):
    """One receipt per device per batch cost a third of the ingest CPU in a flood: ids are gathered."""
    r = rig(mosquitto.url, name="dev-busy", timeout_s=10)
    sent = [r.dev.put(i) for i in range(300)]
    r.all_arrive_once(sent)
    s = r.col.stats()
    assert s["receipted"] == 300 and s["receipts"] <= 10, s
