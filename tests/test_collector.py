"""Collector + fleet DB against a real Mosquitto and real SQLite files."""
from __future__ import annotations

import json

import pytest
from waiting import wait_until

from edgeship import protocol
from edgeship.fleet.collector import Collector, classify_error
from edgeship.fleet.db import MIGRATIONS, FleetDB
from edgeship.mqtt import Inbound, LinkOptions, MqttLink

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


# ----------------------------------------------------------------- issue 17: poison messages, skew, verdicts

def _body(kind: str, device: str = "d1", **over) -> dict:
    base = {"telemetry": {"window_s": 60, "counts": {"inferences": 1}},
            "feedback": {"prediction_id": "p", "kind": "correct"},
            "state": {"online": True, "session": 1.0}}[kind]
    b = protocol.make_message(kind, device, base)
    b.update(over)
    return b


def _poison() -> list[tuple[str, str, bytes]]:
    """(expected reason, topic, payload): each one killed the collector thread before issue 17."""
    tel = protocol.device_topic(FLEET, "d1", "telemetry")
    st = protocol.device_topic(FLEET, "d1", "state")
    raw = lambda b: json.dumps(b).encode()  # noqa: E731 - not protocol.encode: that refuses some of these
    return [
        ("too_deep", tel, b"[" * 120_000 + b"]" * 120_000),
        ("too_deep", tel, b'{"a":' * 40_000 + b"1" + b"}" * 40_000),
        ("out_of_range", tel, raw(_body("telemetry", ts=10**30))),
        ("out_of_range", tel, raw(_body("telemetry", ts=2**63))),
        ("out_of_range", tel, raw(_body("telemetry", counts={"inferences": 1e20}))),
        ("out_of_range", st, raw(_body("state", session=10**25))),
    ]


@pytest.mark.parametrize("reason,topic_name,payload", _poison(), ids=lambda v: str(v)[:20])
def test_check_bounds_refuses_poison_numbers_and_depth(reason, topic_name, payload):
    with pytest.raises(protocol.MessageError) as err:
        protocol.parse_message(topic_name, payload)
    assert err.value.reason == reason and classify_error(err.value) == reason


def test_check_bounds_pure():
    now = 1_700_000_000.0
    ok = _body("telemetry", ts=now)
    protocol.check_bounds("telemetry", ok, received=now)  # holds
    for over, reason in [({"ts": now + 3601}, "future_ts"), ({"ts": now - 366 * 86400}, "old_ts"),
                         ({"counts": {"inferences": protocol.MAX_COUNT + 1}}, "out_of_range"),
                         ({"window_s": 8 * 86400}, "out_of_range"), ({"x": float("inf")}, "out_of_range"),
                         ({"x": -2**60}, "out_of_range"), ({"started_at": now + 86400}, "future_ts")]:
        with pytest.raises(protocol.MessageError) as err:
            protocol.check_bounds("telemetry", {**ok, **over}, received=now)
        assert err.value.reason == reason, over
    # Configured skew; a retained state may be old, but not from the future.
    protocol.check_bounds("telemetry", {**ok, "ts": now + 7000}, received=now, skew=protocol.Skew(future_s=7200))
    protocol.check_bounds("state", _body("state", ts=now - 400 * 86400, session=1.0), received=now)
    with pytest.raises(protocol.MessageError, match="session"):
        protocol.check_bounds("state", _body("state", ts=now, session=now + 86400), received=now)
    # Without a receive time (the agent parsing plans) only the value bounds apply.
    protocol.check_bounds("telemetry", {**ok, "ts": now + 10 * 86400})
    deep: object = 1
    for _ in range(protocol.MAX_DEPTH):
        deep = [deep]
    with pytest.raises(protocol.MessageError, match="nested"):
        protocol.check_bounds("telemetry", {**ok, "x": deep})


@pytest.mark.mqtt
def test_poison_messages_are_dead_lettered_acked_and_ingestion_goes_on(mosquitto, fleet_db_url):
    """#17.1: each poison message used to kill the collector thread, unacked, redelivered on every restart."""
    db = FleetDB.open(fleet_db_url)
    cid = f"col-poison-{db.dialect}"
    col = Collector(db, mosquitto.url, FLEET, client_id=cid, link_options=FAST).start()
    pub = MqttLink(mosquitto.url, client_id=f"poison-pub-{db.dialect}").start()
    try:
        assert col.wait_ready(10) and pub.wait_connected(10)
        poison = _poison()
        for _, t, p in poison:
            assert pub.publish(t, p).wait(10)
        good_t, good_p = enc("feedback", "d1", {"prediction_id": "after", "kind": "correct"})
        assert pub.publish(good_t, good_p).wait(10)
        settled = lambda s: s["stored"] + s["duplicates"] + s["rejected"] == s["received"]  # noqa: E731
        assert wait_until(lambda: col.stats()["stored"] >= 1 and settled(col.stats()), 15), col.stats()
        s = col.stats()
        assert s["rejected"] == len(poison) and s["alive"] and s["crashes"] == 0
        dead = db.dead_letters(limit=50)
        assert sorted(d["reason"] for d in dead) == sorted(r for r, _, _ in poison)
        assert all(d["topic"].startswith("edgeship/v1/") and d["detail"] and d["size"] > 0
                   and len(d["payload"]) <= 16 * 1024 for d in dead)
        col.stop()
        # Acked: a new session of the same collector gets none of them again.
        col = Collector(db, mosquitto.url, FLEET, client_id=cid, link_options=FAST).start()
        assert col.wait_ready(10)
        assert pub.publish(*enc("feedback", "d1", {"prediction_id": "later", "kind": "correct"})).wait(10)
        assert wait_until(lambda: col.stats()["stored"] >= 1 and settled(col.stats()), 10)
        assert col.stats()["rejected"] == 0 and len(db.dead_letters(limit=50)) == len(poison)
    finally:
        pub.stop()
        col.stop()
        db.close()


@pytest.mark.mqtt
def test_future_timestamps_are_refused_with_their_reason(mosquitto, tmp_path):
    """#17.2: a ts far in the future was stored and counted in every later window."""
    import time as _time

    db = FleetDB.open(tmp_path / "f.sqlite")
    col = Collector(db, mosquitto.url, FLEET, client_id="col-skew", link_options=FAST,
                    skew=protocol.Skew(future_s=600)).start()
    pub = MqttLink(mosquitto.url, client_id="skew-pub").start()
    try:
        assert col.wait_ready(10) and pub.wait_connected(10)
        now = _time.time()
        body = {"window_s": 60, "counts": {"inferences": 7}}
        assert pub.publish(*enc("telemetry", "d1", body, ts=now + 30 * 86400, msg_id="far")).wait(10)
        assert pub.publish(*enc("telemetry", "d1", body, ts=now + 120, msg_id="near")).wait(10)
        assert wait_until(lambda: col.stats()["stored"] + col.stats()["rejected"] >= 2, 10)
        assert [r["msg_id"] for r in db.telemetry()] == ["near"]
        assert col.stats()["rejected_by_reason"] == {"future_ts": 1}
        assert "ahead of the receive time" in db.dead_letters()[0]["detail"]
    finally:
        pub.stop()
        col.stop()
        db.close()


class _AckFailsOnce(MqttLink):
    """A real link whose first ack raises: the loop failure a bug or a broken client could cause."""

    failed = False

    def ack(self, msg):
        if not self.failed:
            self.failed = True
            raise RuntimeError("ack failed (injected)")
        super().ack(msg)


class _GetAlwaysFails(MqttLink):
    def get(self, timeout):
        raise RuntimeError("link broken (injected)")


@pytest.mark.mqtt
def test_loop_failure_restarts_with_the_same_batch(mosquitto, tmp_path):
    """#17.1: a failing loop used to end the thread silently; now it restarts and keeps ingesting."""
    db = FleetDB.open(tmp_path / "f.sqlite")
    link = _AckFailsOnce(mosquitto.url, LinkOptions(client_id="col-flaky", persistent_session=True, manual_ack=True,
                                                    backoff_base=0.05, backoff_cap=0.5)).start()
    col = Collector(db, link, FLEET).start()
    pub = MqttLink(mosquitto.url, client_id="flaky-pub").start()
    try:
        assert link.wait_connected(10) and pub.wait_connected(10)
        assert pub.publish(*enc("feedback", "d1", {"prediction_id": "p1", "kind": "correct"})).wait(10)
        assert wait_until(lambda: col.stats()["crashes"] == 1, 10)
        assert pub.publish(*enc("feedback", "d1", {"prediction_id": "p2", "kind": "correct"})).wait(10)
        assert wait_until(lambda: db.message_counts().get("feedback") == 2, 10)
        assert col.alive and col.stats()["stored"] == 2
        col.check()  # does not raise
    finally:
        pub.stop()
        col.stop()
        link.stop()
        db.close()


def test_loop_that_keeps_failing_keeps_restarting_by_default(tmp_path):
    db = FleetDB.open(tmp_path / "f.sqlite")
    col = Collector(db, _GetAlwaysFails("mqtt://127.0.0.1:1"), FLEET).start()
    try:
        assert wait_until(lambda: col.stats()["crashes"] >= 3, 10)
        assert col.alive and col.stats()["error"] is None
        col.check()
    finally:
        col.stop()
        db.close()


def test_loop_that_keeps_failing_gives_up_loudly(tmp_path):
    from edgeship.fleet.collector import CollectorError

    db = FleetDB.open(tmp_path / "f.sqlite")
    col = Collector(db, _GetAlwaysFails("mqtt://127.0.0.1:1"), FLEET, max_crashes=1).start()
    try:
        assert wait_until(lambda: not col.alive, 10)
        with pytest.raises(CollectorError, match="link broken"):
            col.check()
        assert col.stats()["crashes"] == 2 and "link broken" in col.stats()["error"]
    finally:
        col.stop()
        db.close()


def test_one_verdict_per_prediction_the_newest(fleet_db_url):
    """#17.3: the same prediction marked incorrect 50 times counted 50 times."""
    from edgeship.fleet.report import summarize

    db = FleetDB.open(fleet_db_url)
    t0 = 1_700_000_000.0
    fb = lambda kind, i, pid="p1", device="d1", **kw: protocol.parse_message(*enc(  # noqa: E731
        "feedback", device, {"prediction_id": pid, "kind": kind, "model": {"name": "m", "version": "2"}, **kw},
        ts=t0 + i, msg_id=f"{pid}-{kind}-{i}"))
    db.store_messages([fb("incorrect", i) for i in range(50)])
    db.store_messages([fb("correct", 100), fb("correct", 1, pid="p2"), fb("rating", 2, pid="p2", value=4)])
    db.store_messages([fb("incorrect", 60)])  # older than the newest verdict: history, not counted
    db.store_messages([fb("incorrect", 3, pid="p1", device="d2")])  # another device's prediction p1
    rows = db.feedback()
    assert sorted((r["device"], r["prediction_id"], r["kind"]) for r in rows) == [
        ("d1", "p1", "correct"), ("d1", "p2", "correct"), ("d1", "p2", "rating"), ("d2", "p1", "incorrect")]
    v = summarize([], rows)["versions"][0]
    assert (v.verdicts, v.negative) == (3, 1)
    db.store_messages([fb("label", 200, value="cat")])  # a newer verdict replaces the current one
    assert [r["kind"] for r in db.feedback() if r["device"] == "d1" and r["prediction_id"] == "p1"] == ["label"]
    from edgeship.fleet.figures import feedback_counts  # what the console, the CLI and the report count

    assert feedback_counts([r for r in db.feedback() if r["device"] == "d1"]) == (2, 1)
    assert db.console_device_history("d1")["feedback_counts"] == {"label": 1, "correct": 1, "rating": 1}
    assert len(db.console_latest_feedback("incorrect")) == 1  # d2's only
    db.close()


def test_migration_keeps_the_newest_verdict_of_existing_feedback(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = FleetDB.open(path, migrate=False)
    assert db.schema_version() == 0
    assert db.migrate(to=3) == 3  # an existing DB at migration 3
    db.close()
    conn = sqlite3.connect(path)
    for i, kind in enumerate(["incorrect"] * 5 + ["correct"]):
        conn.execute("INSERT INTO feedback(device, msg_id, ts, prediction_id, kind, body) VALUES (?,?,?,?,?,?)",
                     ("d1", f"m{i}", 100.0 + i, "p1", kind, "{}"))
    conn.commit()
    conn.close()
    db = FleetDB.open(path)
    assert [r["kind"] for r in db.feedback()] == ["correct"]
    db.close()


def test_cli_dead_letters_lists_refused_messages(tmp_path):
    from conftest import run_cli

    db_path = tmp_path / "f.sqlite"
    db = FleetDB.open(db_path)
    col = Collector(db, "mqtt://127.0.0.1:1", FLEET, client_id="offline")
    t = protocol.device_topic(FLEET, "d1", "telemetry")
    col.process([Inbound(t, b"[" * 120_000, 1, False, 1), Inbound(t, b"\xff junk", 1, False, 2)])
    db.close()
    out = run_cli("fleet", "dead-letters", "--db", str(db_path)).stdout
    assert "refused by reason: malformed 1, too_deep 1" in out and "nested deeper than 32" in out
    js = json.loads(run_cli("fleet", "dead-letters", "--db", str(db_path), "--json", "--reason", "malformed").stdout)
    assert js["counts"] == {"malformed": 1, "too_deep": 1} and len(js["dead_letters"]) == 1
    assert run_cli("fleet", "dead-letters", "--db", str(tmp_path / "empty.sqlite")).stdout.startswith("no dead letters")


def test_fleet_collect_exits_non_zero_when_its_collector_gives_up(tmp_path):
    """#17.1: the CLI kept running and printed nothing while its collector thread was dead."""
    import subprocess
    import sys

    # Fault injection in the real CLI process: every read from the link fails.
    script = ("import sys, edgeship.mqtt as m\n"
              "def broken(self, timeout): raise RuntimeError('link broken (injected)')\n"
              "m.MqttLink.get = broken\n"
              "from edgeship.cli import main\n"
              "main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", script, "fleet", "collect", "--quiet", "--duration", "60",
                           "--db", str(tmp_path / "f.sqlite"), "--broker", "mqtt://127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "the collector stopped" in last and "link broken" in last and "Traceback" not in proc.stderr


def test_dead_letters_are_bounded(fleet_db_url):
    db = FleetDB.open(fleet_db_url)
    db.store_dead_letters([{"received": 1000.0 + i, "topic": "t\x00x", "reason": "malformed", "detail": "d",
                            "size": 3, "payload": b"\xff\x00x"} for i in range(30)])
    assert db.dead_letters_prune(10) == 20
    rows = db.dead_letters(limit=100)
    assert [r["received"] for r in rows] == [1029.0 - i for i in range(10)]
    assert rows[0]["payload"] == b"\xff\x00x" and rows[0]["topic"] == "t\\0x"  # NUL kept visible, storable
    db.close()
