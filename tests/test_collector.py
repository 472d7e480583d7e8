"""Collector + fleet DB against a real Mosquitto and real SQLite files."""
from __future__ import annotations

import json

import pytest

from edgeship import protocol
from edgeship.fleet.collector import Collector, classify_error
from edgeship.fleet.db import MIGRATIONS, FleetDB
from edgeship.mqtt import Inbound, LinkOptions, MqttLink

from waiting import wait_until

FLEET = "tc"
FAST = LinkOptions(backoff_base=0.05, backoff_cap=0.5)


def enc(kind: str, device: str, body: dict, **kw) -> tuple[str, bytes]:
    return protocol.device_topic(FLEET, device, kind), protocol.encode(protocol.make_message(kind, device, body, **kw))


# ----------------------------------------------------------------- DB (no broker)

def test_db_migrates_once_and_reopens(tmp_path):
    path = tmp_path / "f.sqlite"
    with FleetDB.open(path) as db:
        assert db.schema_version() == max(v for v, _, _ in MIGRATIONS)
    with FleetDB.open(f"sqlite:///{path}") as db:  # URL form, idempotent migrate
        assert db.schema_version() == max(v for v, _, _ in MIGRATIONS)
    from edgeship.errors import FleetDBError

    with pytest.raises(FleetDBError, match="fleet DB"):  # nothing listens there: one clear error
        FleetDB.open("postgresql://u@127.0.0.1:1/db")
    with pytest.raises(FleetDBError, match="not understood"):
        FleetDB.open("mysql://u@127.0.0.1/db")


def test_store_dedups_and_orders_state(fleet_db_url):
    db = FleetDB.open(fleet_db_url)
    msgs = [protocol.parse_message(*enc("telemetry", "d1", {"window_s": 60, "counts": {"inferences": 5},
                                                             "model": {"name": "m", "version": "1"},
                                                             "latency_ms": {"p50": 1.0, "p95": 2.0}},
                                        msg_id="a"))]
    r1 = db.store_messages(msgs)
    r2 = db.store_messages(msgs)
    assert (r1.stored, r1.duplicates, r2.stored, r2.duplicates) == (1, 0, 0, 1)
    assert db.telemetry()[0]["inferences"] == 5 and db.telemetry()[0]["p95_ms"] == 2.0
    # State: a will from an older connection (session) never overrides a newer online state.
    st = lambda online, session, ts, will=False, mid=None: protocol.parse_message(*enc(  # noqa: E731
        "state", "d1", {"online": online, "session": session, **({"will": True} if will else {})}, ts=ts, msg_id=mid))
    db.store_messages([st(True, 100.0, 101.0, mid="s1")])
    db.store_messages([st(True, 200.0, 201.0, mid="s2")])
    db.store_messages([st(False, 100.0, 100.0, will=True, mid="w1")])  # late will of connection 1
    assert db.devices()[0]["online"] == 1
    db.store_messages([st(False, 200.0, 200.0, will=True, mid="w2")])  # will of the current connection
    assert db.devices()[0]["online"] == 0
    assert db.devices()[0]["model_version"] == "1"
    db.close()


def test_classify_error_buckets():
    def reason(topic, payload):
        try:
            protocol.parse_message(topic, payload)
        except protocol.MessageError as exc:
            return classify_error(exc)
        return None

    t = protocol.device_topic(FLEET, "d1", "feedback")
    assert reason(t, b"{not json") == "malformed"
    assert reason(t, b"x" * (protocol.MAX_PAYLOAD + 1)) == "oversized"
    assert reason(t, json.dumps({"schema": "edgeship/v9/feedback"}).encode()) == "wrong_schema"
    assert reason(t, enc("feedback", "d2", {"prediction_id": "p", "kind": "correct"})[1]) == "spoofed"
    assert reason(t, protocol.encode({**json.loads(enc("feedback", "d1", {"prediction_id": "p", "kind": "correct"})[1]),
                                      "ts": "yesterday"})) == "invalid"


def test_process_counts_bad_messages_without_a_broker(fleet_db_url):
    db = FleetDB.open(fleet_db_url)
    col = Collector(db, "mqtt://127.0.0.1:1", FLEET, client_id="offline")
    t, p = enc("feedback", "d1", {"prediction_id": "p", "kind": "correct"})
    _, nul = enc("feedback", "d1", {"prediction_id": "p\u0000x", "kind": "correct"})
    col.process([Inbound(t, p, 1, False, 1), Inbound(t, b"[]", 1, False, 2),
                 Inbound(protocol.device_topic("otherfleet", "d1", "feedback"), p, 1, False, 3),
                 Inbound(t, nul, 1, False, 4)])
    s = col.stats()
    if db.dialect == "postgresql":  # PostgreSQL text cannot hold NUL: that one message is refused, alone
        assert s["stored"] == 1 and s["rejected"] == 3 and s["rejected_by_reason"]["unstorable"] == 1
    else:
        assert s["stored"] == 2 and s["rejected"] == 2
    db.close()


# ----------------------------------------------------------------- with Mosquitto

@pytest.mark.mqtt
def test_hostile_messages_counted_and_skipped(mosquitto, tmp_path, caplog):
    db = FleetDB.open(tmp_path / "f.sqlite")
    col = Collector(db, mosquitto.url, FLEET, client_id="col-hostile", link_options=FAST).start()
    pub = MqttLink(mosquitto.url, client_id="hostile").start()
    try:
        assert col.wait_ready(10) and pub.wait_connected(10)
        good_t, good_p = enc("feedback", "d1", {"prediction_id": "p1", "kind": "incorrect"})
        fb_t = protocol.device_topic(FLEET, "d1", "feedback")
        tel_t = protocol.device_topic(FLEET, "d1", "telemetry")
        bad = [
            (fb_t, b"\xff\xfe not json"),                                                  # malformed
            (fb_t, b'{"schema": "edgeship/v1/feedback", "msg_id": "x", ' + b'"a": "' + b"y" * 400_000 + b'"}'),  # oversized
            (tel_t, enc("telemetry", "d1", {"window_s": 60, "counts": {}})[1].replace(b'"counts":{}', b'"counts":[1]')),
            (tel_t, enc("telemetry", "d1", {"window_s": 60, "counts": {"inferences": 1}})[1]
             .replace(b"edgeship/v1/telemetry", b"edgeship/v7/telemetry")),               # unknown schema
            (fb_t, enc("feedback", "d2", {"prediction_id": "p", "kind": "correct"})[1]),    # d2 speaking on d1's topic
            (fb_t, b"null"),
            (fb_t, b'{"schema": "edgeship/v1/feedback", "msg_id": 5, "device": "d1", "ts": 1}'),  # wrong types
        ]
        for t, p in bad:
            assert pub.publish(t, p).wait(10)
        assert pub.publish(good_t, good_p).wait(10)
        assert pub.publish(good_t, good_p).wait(10)  # duplicate: stored once
        done = lambda: (lambda s: s["stored"] + s["duplicates"] + s["rejected"])(col.stats())  # noqa: E731
        assert wait_until(lambda: done() >= len(bad) + 2, 10)
        s = col.stats()
        assert s["rejected"] == len(bad)
        assert s["rejected_by_reason"] == {"malformed": 2, "oversized": 1, "invalid": 2, "wrong_schema": 1,
                                           "spoofed": 1}
        assert s["stored"] == 1 and s["duplicates"] == 1
        assert db.message_counts() == {"feedback": 1}
        lines = [r.getMessage() for r in caplog.records if r.name == "edgeship.fleet.collector"]
        assert len(lines) == len(bad) and all("\n" not in ln and len(ln) < 600 for ln in lines)
        assert col.alive  # still running
    finally:
        pub.stop()
        col.stop()
        db.close()


@pytest.mark.mqtt
def test_shared_subscription_splits_stream_without_duplicates(mosquitto, tmp_path):
    db = FleetDB.open(tmp_path / "f.sqlite")
    cols = [Collector(db, mosquitto.url, FLEET, share_group="g1", client_id=f"col-share-{i}", link_options=FAST).start()
            for i in range(2)]
    pub = MqttLink(mosquitto.url, client_id="share-pub").start()
    try:
        assert all(c.wait_ready(10) for c in cols) and pub.wait_connected(10)
        n = 400
        for i in range(n):
            t, p = enc("feedback", f"d{i % 7}", {"prediction_id": f"p{i}", "kind": "correct"})
            pub.publish(t, p)
        assert wait_until(lambda: sum(c.stats()["stored"] for c in cols) >= n, 20)
        assert sum(c.stats()["received"] for c in cols) == n  # each message went to one collector only
        assert all(c.stats()["stored"] > 0 for c in cols)
        assert db.message_counts()["feedback"] == n
    finally:
        pub.stop()
        for c in cols:
            c.stop()
        db.close()


@pytest.mark.mqtt
@pytest.mark.parametrize("proto", ["3.1.1", "5"])
def test_collector_down_messages_wait_in_its_persistent_session(mosquitto, tmp_path, proto):
    db = FleetDB.open(tmp_path / "f.sqlite")
    opts = LinkOptions(backoff_base=0.05, backoff_cap=0.5, protocol=proto)
    col = Collector(db, mosquitto.url, FLEET, client_id=f"col-persist-{proto}", link_options=opts).start()
    assert col.wait_ready(10)
    col.stop()
    pub = MqttLink(mosquitto.url, client_id=f"persist-pub-{proto}", protocol=proto).start()
    try:
        assert pub.wait_connected(10)
        for i in range(50):
            assert pub.publish(*enc("feedback", "d1", {"prediction_id": f"p{i}", "kind": "correct"})).wait(10)
        col = Collector(db, mosquitto.url, FLEET, client_id=f"col-persist-{proto}", link_options=opts).start()
        assert wait_until(lambda: db.message_counts().get("feedback", 0) == 50, 10)
    finally:
        pub.stop()
        col.stop()
        db.close()
