"""Outbox guarantees against real SQLite files, a real Mosquitto and the embedded broker."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
from waiting import wait_until

from edgeship import protocol
from edgeship.agent.outbox import Forwarder, Outbox, TokenBucket
from edgeship.agent.telemetry import Telemetry
from edgeship.errors import TransportError
from edgeship.fleet.collector import Collector
from edgeship.fleet.db import FleetDB
from edgeship.mqtt import LinkOptions, MqttLink

FLEET = "tf"
FAST = LinkOptions(backoff_base=0.05, backoff_cap=0.5)


def fb_msg(device: str, i: int) -> tuple[str, bytes, str]:
    m = protocol.make_message("feedback", device, {"prediction_id": f"p{i}", "kind": "correct"})
    return protocol.device_topic(FLEET, device, "feedback"), protocol.encode(m), m["msg_id"]


def tel_msg(device: str, i: int, pad: int = 0) -> tuple[str, bytes, str]:
    m = protocol.make_message("telemetry", device, {"window_s": 60.0, "counts": {"inferences": i}, "pad": "x" * pad})
    return protocol.device_topic(FLEET, device, "telemetry"), protocol.encode(m), m["msg_id"]


def collector(db, url: str, name: str) -> Collector:
    c = Collector(db, url, FLEET, client_id=name, link_options=FAST).start()
    assert c.wait_ready(10)
    return c


# ----------------------------------------------------------------- pure / local

def test_token_bucket():
    b = TokenBucket(rate=10, burst=2, now=0.0)
    assert b.take(0.0) == 0 and b.take(0.0) == 0
    assert b.take(0.0) == pytest.approx(0.1)
    assert b.take(0.1) == 0  # refilled one token after 0.1 s
    assert TokenBucket(0).take(0.0) == 0  # unlimited


def test_put_peek_ack_in_order_and_persistent(tmp_path):
    path = tmp_path / "outbox.sqlite"
    with Outbox(path, 1_000_000) as ob:
        ids = [ob.put("feedback", *fb_msg("d1", i)[:2]) for i in range(10)]
        assert ids == sorted(ids) and len(ob) == 10
        rows = ob.peek(0, 4)
        assert [r.id for r in rows] == ids[:4]
        ob.ack([rows[0].id, rows[1].id])
        assert [r.id for r in ob.peek(0, 100)] == ids[2:]
    with Outbox(path, 1_000_000) as ob:  # reopened: what was not acked is still there, in order
        assert [r.id for r in ob.peek(0, 100)] == ids[2:]
        assert ob.bytes > 0 and len(ob) == 8


def test_cap_drops_oldest_telemetry_first_never_feedback(tmp_path):
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path, max_bytes=20_000)
    fb_ids, tel_ids = [], []
    for i in range(60):
        tel_ids.append(ob.put("telemetry", *tel_msg("d1", i, pad=300)[:2]))
        if i % 3 == 0:
            fb_ids.append(ob.put("feedback", *fb_msg("d1", i)[:2]))
    assert ob.bytes <= 20_000
    kept = {r.id: r.kind for r in ob.peek(0, 10_000)}
    assert all(i in kept for i in fb_ids), "feedback is never dropped"
    kept_tel = sorted(i for i, k in kept.items() if k == "telemetry")
    assert kept_tel == tel_ids[-len(kept_tel):], "the oldest telemetry goes first"
    dropped = len(tel_ids) - len(kept_tel)
    assert dropped > 0 and ob.stats()["dropped_unreported"] == dropped
    ob.close()
    ob = Outbox(path, max_bytes=20_000)  # the unreported count survives a restart
    assert ob.take_dropped() == dropped
    assert ob.take_dropped() == 0
    ob.close()


def test_cap_full_of_feedback_refuses_past_the_hard_limit(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", max_bytes=8_192, hard_max_bytes=12_000)
    with pytest.raises(TransportError, match="outbox .* is full"):
        for i in range(1000):
            ob.put("feedback", *fb_msg("d1", i)[:2])
    assert 8_192 < ob.bytes <= 12_000
    # Telemetry that does not fit is dropped (counted), not raised.
    assert ob.put("telemetry", *tel_msg("d1", 0)[:2]) == -1
    assert ob.take_dropped() == 1
    ob.close()


def test_state_replaces_unsent_state(tmp_path):
    ob = Outbox(tmp_path / "o.sqlite", 1_000_000)
    t = protocol.device_topic(FLEET, "d1", "state")
    for online in (True, False, True):
        ob.put("state", t, protocol.encode(protocol.make_message("state", "d1", {"online": online})), retain=True)
    rows = ob.peek(0, 10)
    assert len(rows) == 1 and rows[0].retain and b'"online":true' in rows[0].payload
    ob.close()


# ----------------------------------------------------------------- guarantees with a real broker

@pytest.mark.mqtt
def test_broker_restart_during_load_every_message_exactly_once(mosquitto_private, tmp_path):
    url = mosquitto_private.url
    db = FleetDB.open(tmp_path / "fleet.sqlite")
    col = collector(db, url, "col-restart")
    ob = Outbox(tmp_path / "outbox.sqlite", 50_000_000)
    link = MqttLink(url, FAST, client_id="dev-restart").start()
    fw = Forwarder(ob, link, rate=0).start()
    accepted: list[str] = []
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set():
            make = fb_msg if i % 2 else tel_msg
            topic, payload, mid = make("dev-restart", i)
            ob.put("feedback" if i % 2 else "telemetry", topic, payload)
            accepted.append(mid)
            i += 1
            stop.wait(0.002)

    t = threading.Thread(target=produce)
    t.start()
    try:
        assert wait_until(lambda: len(db.message_ids()) > 100, 10)
        mosquitto_private.stop()          # broker down while devices keep producing
        k = len(accepted)
        assert wait_until(lambda: len(accepted) >= k + 150, 10)  # accepted during the outage
        mosquitto_private.start()
        k = len(accepted)
        assert wait_until(lambda: len(accepted) >= k + 150, 10)  # and while everyone reconnects
        stop.set()
        t.join(5)
        assert fw.drain(30), f"outbox not drained: {ob.stats()}"
        want = set(accepted)
        ok = wait_until(lambda: len(db.message_ids()) >= len(want), 30)
        ids = db.message_ids()
        missing = want - {m for _, m in ids}
        assert ok, f"{len(missing)} of {len(want)} accepted messages never arrived"
        assert len(ids) == len(set(ids)) == len(want)
        assert {m for _, m in ids} == want
        counts = db.message_counts()
        assert counts["feedback"] + counts["telemetry"] == len(want)
        assert link.health()["connects"] >= 2
    finally:
        stop.set()
        fw.stop()
        link.stop()
        col.stop()
        ob.close()
        db.close()


_CHILD = textwrap.dedent("""
    import sys, time
    from edgeship import protocol
    from edgeship.agent.outbox import Outbox, Forwarder
    from edgeship.mqtt import MqttLink
    path, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ob = Outbox(path, 50_000_000)
    for i in range(n):
        m = protocol.make_message("feedback", "dev-kill", {"prediction_id": "p%d" % i, "kind": "incorrect"},
                                  msg_id="m%06d" % i)
        ob.put("feedback", protocol.device_topic("tf", "dev-kill", "feedback"), protocol.encode(m))
    print("accepted", flush=True)
    link = MqttLink(url, client_id="dev-kill").start()
    Forwarder(ob, link, rate=400).start()   # slow on purpose: SIGKILL lands mid-flush
    time.sleep(120)
""")


@pytest.mark.mqtt
def test_sigkill_with_messages_in_outbox_delivered_after_restart_once(mosquitto, tmp_path):
    n = 1500
    db = FleetDB.open(tmp_path / "fleet.sqlite")
    col = collector(db, mosquitto.url, "col-kill")
    path = tmp_path / "outbox.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), mosquitto.url, str(n)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "accepted"
        assert wait_until(lambda: len(db.message_ids()) >= 200, 20)
        os.kill(proc.pid, signal.SIGKILL)  # mid-flush, with rows sent but not yet deleted
        proc.wait(10)
        got_before = len(db.message_ids())
        assert got_before < n, "the kill must land before everything was delivered"
        ob = Outbox(path, 50_000_000)  # "restart": same file
        assert 0 < len(ob) <= n - got_before + 200
        link = MqttLink(mosquitto.url, client_id="dev-kill").start()
        fw = Forwarder(ob, link, rate=0).start()
        try:
            assert fw.drain(30)
            assert wait_until(lambda: len(db.message_ids()) >= n, 20)
            ids = db.message_ids("feedback")
            assert sorted(m for _, m in ids) == [f"m{i:06d}" for i in range(n)]  # all, and each once
        finally:
            fw.stop()
            link.stop()
            ob.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        col.stop()
        db.close()


@pytest.mark.mqtt
def test_outage_cap_keeps_feedback_drops_oldest_telemetry_reports_count(mosquitto_private, tmp_path):
    url = mosquitto_private.url
    db = FleetDB.open(tmp_path / "fleet.sqlite")
    col = collector(db, url, "col-cap")  # its persistent session holds what arrives while it reconnects
    mosquitto_private.stop()  # the outage: the device starts with no broker
    ob = Outbox(tmp_path / "outbox.sqlite", max_bytes=40_000)
    link = MqttLink(url, FAST, client_id="dev-cap").start()
    fw = Forwarder(ob, link, rate=0).start()
    tel = Telemetry(ob, FLEET, "dev-cap", window_s=3600)
    fb_ids, tel_ids = [], []
    for i in range(80):
        topic, payload, mid = tel_msg("dev-cap", i, pad=400)
        ob.put("telemetry", topic, payload)
        tel_ids.append(mid)
        if i % 4 == 0:
            topic, payload, mid = fb_msg("dev-cap", i)
            ob.put("feedback", topic, payload)
            fb_ids.append(mid)
    dropped = ob.stats()["dropped_unreported"]
    assert dropped > 0
    report = tel.flush()  # the next telemetry window carries the drop count
    assert report["counts"]["outbox_dropped"] == dropped
    # Storing that window made room by dropping one more old telemetry: reported in the window after.
    dropped_more = ob.stats()["dropped_unreported"]
    pending = len(ob)
    mosquitto_private.start()
    try:
        assert fw.drain(30)
        assert pending == len(fb_ids) + (len(tel_ids) - dropped - dropped_more) + 1
        assert wait_until(lambda: len(db.message_ids()) >= pending, 20)
        got = {m for _, m in db.message_ids()}
        assert len(got) == pending
        assert set(fb_ids) <= got, "every feedback message arrived"
        gone = dropped + dropped_more
        assert set(tel_ids[gone:]) <= got and not set(tel_ids[:gone]) & got, "the oldest telemetry was dropped"
        rows = [r for r in db.telemetry() if r["msg_id"] == report["msg_id"]]
        assert rows and rows[0]["outbox_dropped"] == dropped
    finally:
        fw.stop()
        link.stop()
        col.stop()
        ob.close()
        db.close()


def test_forward_through_embedded_amqtt_exactly_once(tmp_path):
    from edgeship.fleet.embedded_broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        db = FleetDB.open(tmp_path / "fleet.sqlite")
        col = collector(db, b.url, "col-amqtt")
        ob = Outbox(tmp_path / "outbox.sqlite", 10_000_000)
        want = []
        for i in range(300):
            topic, payload, mid = fb_msg("dev-amqtt", i)
            ob.put("feedback", topic, payload)
            want.append(mid)
        # The same message twice on the wire (a resend after a lost PUBACK) is stored once.
        ob.put("feedback", topic, payload)
        link = MqttLink(b.url, client_id="dev-amqtt").start()
        fw = Forwarder(ob, link, rate=0).start()
        try:
            assert fw.drain(30)
            assert wait_until(lambda: col.stats()["stored"] + col.stats()["duplicates"] >= 301, 20)
            ids = db.message_ids()
            assert sorted(m for _, m in ids) == sorted(want)
            assert col.stats()["duplicates"] == 1
        finally:
            fw.stop()
            link.stop()
            col.stop()
            ob.close()
            db.close()


def _http(url: str, path: str, obj: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    import http.client
    import json
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        if obj is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, body=json.dumps(obj), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.mqtt
def test_agent_process_sigkilled_during_outage_delivers_after_restart(mosquitto_private, tmp_path):
    """The real `edgeship agent run`: feedback + telemetry accepted while the broker is down, SIGKILL,
    broker back, agent restarted: every accepted message reaches the fleet DB exactly once."""
    import sqlite3

    from conftest import free_port
    from test_agent import build_mlp_package

    pkg = build_mlp_package(tmp_path / "pkg", "1.0.0")
    db = FleetDB.open(tmp_path / "fleet.sqlite")
    col = collector(db, mosquitto_private.url, "col-agent-kill")
    mosquitto_private.stop()
    port = free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\nallow_unsigned = true\npackage = "{pkg}"\nstate_dir = "{tmp_path / "state"}"\ndevice_id = "pi-k"\n'
                   f'fleet = "{FLEET}"\n[api]\nenabled = true\nport = {port}\n'
                   f'[mqtt]\nbroker = "{mosquitto_private.url}"\n[telemetry]\nwindow_s = 0.2\n')
    url = f"http://127.0.0.1:{port}"

    def start_agent():
        p = subprocess.Popen([sys.executable, "-m", "edgeship.cli", "agent", "run", "--config", str(cfg)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: _ok(url), 30), "agent API did not come up"
        return p

    proc = start_agent()
    try:
        for i in range(10):
            code, r = _http(url, "/v1/infer?outputs=0", {"x": [float(i)] * 64})
            assert code == 200
            code, f = _http(url, "/v1/feedback", {"prediction_id": r["prediction_id"], "kind": "incorrect"})
            assert code == 200 and f["msg_id"]
        outbox = tmp_path / "state" / "outbox.sqlite"

        def kept() -> dict[str, str]:
            with sqlite3.connect(f"file:{outbox}?mode=ro", uri=True) as c:
                import json as _json

                return {_json.loads(p)["msg_id"]: k for k, p in c.execute("SELECT kind, payload FROM outbox")}

        assert wait_until(lambda: list(kept().values()).count("telemetry") >= 3, 15)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        accepted = kept()
        assert list(accepted.values()).count("feedback") == 10
        mosquitto_private.start()
        proc = start_agent()
        # A newer state replaces an unsent older one (retained: only the latest matters); the rest must arrive.
        must = {m for m, k in accepted.items() if k != "state"}
        assert wait_until(lambda: must <= {m for _, m in db.message_ids()}, 30)
    finally:
        proc.terminate()
        proc.wait(10)
        col.stop()
    ids = db.message_ids()
    assert len(ids) == len(set(ids))  # the ledger holds each message once; redeliveries were skipped
    fb = db.feedback()
    assert len(fb) == 10 and all(r["model_version"] == "1.0.0" for r in fb)
    db.close()


def _ok(url: str) -> bool:
    try:
        return _http(url, "/v1/health", timeout=1)[0] == 200
    except OSError:
        return False


# ----------------------------------------------------------------- receipts (#17.7), no network

def test_rows_carry_their_msg_id_and_a_receipt_deletes_only_what_it_names(tmp_path):
    with Outbox(tmp_path / "o.sqlite") as ob:
        sent = [fb_msg("d", i) for i in range(5)]
        for t, p, _ in sent:
            ob.put("feedback", t, p)
        size = ob.bytes
        assert ob.confirm([sent[1][2], sent[3][2], "unknown", sent[1][2]]) == 2
        assert ob.confirm([sent[1][2]]) == 0  # a repeated receipt deletes nothing more
        assert [r.payload for r in ob.peek(0, 10)] == [sent[i][1] for i in (0, 2, 4)]
        assert len(ob) == 3 and 0 < ob.bytes < size


def test_unreceipted_rows_are_resent_on_a_doubling_capped_schedule(tmp_path):
    with Outbox(tmp_path / "o.sqlite") as ob:
        t, p, _ = fb_msg("d", 0)
        rid = ob.put("feedback", t, p)
        waits = []
        for _ in range(8):
            ob.mark_sent([rid], 1000.0, 2.0, 30.0)
            waits.append(ob.next_due() - 1000.0)
        assert waits == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
        assert ob.peek(0, 10) == []  # awaiting its receipt: not a fresh row any more
        assert ob.due_rows(1000.0 + 29.0) == [] and [r.id for r in ob.due_rows(1000.0 + 30.0)] == [rid]


def test_receipt_mode_is_remembered_and_turning_it_off_makes_awaiting_rows_fresh(tmp_path):
    path = tmp_path / "o.sqlite"
    with Outbox(path) as ob:
        assert ob.receipt_mode is None
        ob.set_receipt_mode(True)
        t, p, _ = fb_msg("d", 0)
        rid = ob.put("feedback", t, p)
        ob.mark_sent([rid], 1000.0, 2.0, 30.0)
    with Outbox(path) as ob:  # an agent restart
        assert ob.receipt_mode is True and ob.peek(0, 10) == [] and len(ob) == 1
        ob.set_receipt_mode(False)
        assert [r.id for r in ob.peek(0, 10)] == [rid]
    with Outbox(path) as ob:
        assert ob.receipt_mode is False


def test_a_put_maintains_no_msg_id_index_and_receipts_find_rows_before_and_after_their_puback(tmp_path):
    """#21 A/B: a full index on msg_id cost 40 % more CPU per put. Rows are indexed by msg_id only once
    they await a receipt; a receipt that overtakes its row's PUBACK still deletes it."""
    import sqlite3

    path = tmp_path / "o.sqlite"
    db = sqlite3.connect(path)  # a file from the first receipts release: full msg_id index
    db.executescript("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
                     "topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, "
                     "size INTEGER NOT NULL, created REAL NOT NULL, msg_id TEXT, due REAL NOT NULL DEFAULT 0, "
                     "tries INTEGER NOT NULL DEFAULT 0); CREATE INDEX outbox_msg_id ON outbox(msg_id);")
    db.close()
    with Outbox(path) as ob:
        sent = [fb_msg("d", i) for i in range(4)]
        rids = [ob.put("feedback", t, p) for t, p, _ in sent]
        ob.mark_sent(rids[:2], 1000.0, 2.0, 30.0)  # PUBACKed: awaiting receipts
        con = sqlite3.connect(path)
        sql = {n: q for n, q in con.execute("SELECT name, sql FROM sqlite_master WHERE type='index'")}
        assert "outbox_msg_id" not in sql
        assert [q for q in sql.values() if q and "(msg_id)" in q and "WHERE due > 0" not in q] == []
        plan = " ".join(r[-1] for r in con.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM outbox WHERE due > 0 AND msg_id IN ('x')"))
        assert "outbox_msg_id_awaiting" in plan
        con.close()
        # one awaiting its receipt, one whose receipt overtook its PUBACK (due 0), one unknown
        assert ob.confirm([sent[0][2], sent[2][2], "unknown"]) == 2
        assert ob.confirm([sent[0][2], sent[2][2]]) == 0
        assert sorted(r.payload for r in ob.due_rows(2000.0)) == [sent[1][1]]
        assert [r.payload for r in ob.peek(0, 10)] == [sent[3][1]]
        assert len(ob) == 2


def test_an_outbox_file_from_before_receipts_is_upgraded_in_place(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    t, p, _ = fb_msg("d", 0)
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
                     "topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, "
                     "size INTEGER NOT NULL, created REAL NOT NULL);")
    db.execute("INSERT INTO outbox(kind, topic, payload, qos, retain, size, created) VALUES "
               "('feedback', ?, ?, 1, 0, 100, 0)", (t, p))
    db.commit()
    db.close()
    with Outbox(path) as ob:
        assert [r.payload for r in ob.peek(0, 10)] == [p]  # the old row is kept, sent as before
        assert ob.receipt_mode is None


def test_envelope_msg_id_reads_the_top_level_id_only():
    m = protocol.make_message("rollout", "d", {"rollout_id": "r", "state": "failed",
                                                "reason": 'log said "msg_id":"not-this"'})
    assert protocol.envelope_msg_id(protocol.encode(m)) == m["msg_id"]
    nested = protocol.encode(protocol.make_message("feedback", "d", {"prediction_id": "p", "kind": "comment",
                                                                     "value": {"msg_id": "nested"}}))
    assert protocol.envelope_msg_id(nested) == protocol.parse_message(
        protocol.device_topic(FLEET, "d", "feedback"), nested).msg_id
    assert protocol.envelope_msg_id(b"{") is None and protocol.envelope_msg_id(b"[1]") is None
