"""Receipts: hostile, repeated and malformed receipts/announcements against a real agent outbox.

A device in receipt mode deletes an outbox row only when a receipt names its msg_id (#17.7). Each
case publishes one message on the device's receipt topic (or the collector announcement topic)
through a real Mosquitto, then a good receipt for a canary row; once the canary is gone the case
has been handled. Held means: the forwarder is alive with no error, no row was deleted that the
case did not legitimately confirm, the device is still in receipt mode, and the bad message was
counted (rejected, or its ids counted as unknown).
"""
from __future__ import annotations

import itertools
import json

import pytest
from waiting import wait_until

from edgeship import protocol
from edgeship.agent.outbox import Forwarder, Outbox
from edgeship.mqtt import LinkOptions, MqttLink

AREA = "MQTT/receipts"
FLEET = "hr"
DEV = "victim"
RT = protocol.receipt_topic(FLEET, DEV)
AT = protocol.collector_topic(FLEET)
_n = itertools.count()


def rc(**over) -> bytes:
    b = {"schema": "edgeship/v1/receipt", "msg_id": f"r-{next(_n)}", "device": DEV, "ts": 1.0, "ids": ["x"]}
    b.update(over)
    return json.dumps(b, allow_nan=True).encode()


# (id, topic, payload or callable(rows) -> payload, expected)
# expected: "rejected" (counted, nothing deleted), "unknown" (ids counted unknown, nothing deleted),
# "ignored" (never delivered to this device), "confirm1" (exactly the named row deleted, repeats once).
CASES = [
    ("empty", RT, b"", "rejected"),
    ("not-json", RT, b"{", "rejected"),
    ("binary", RT, b"\xff\xfe\x00\x01", "rejected"),
    ("json-null", RT, b"null", "rejected"),
    ("json-list", RT, b"[]", "rejected"),
    ("json-string", RT, b'"ids"', "rejected"),
    ("deep-json", RT, b"[" * 100_000 + b"]" * 100_000, "rejected"),
    ("nan", RT, rc(ts=float("nan")), "rejected"),
    ("huge-number", RT, rc(ts=10**30), "rejected"),
    ("exp-number", RT, b'{"schema":"edgeship/v1/receipt","device":"victim","ts":1e400,"ids":["x"]}', "rejected"),
    ("oversized", RT, rc(pad="x" * 300_000), "rejected"),
    ("wrong-schema", RT, rc(schema="edgeship/v1/feedback"), "rejected"),
    ("no-schema", RT, json.dumps({"device": DEV, "ids": ["x"]}).encode(), "rejected"),
    ("other-device", RT, lambda rows: rc(device="someone-else", ids=rows[:1]), "rejected"),
    ("no-device", RT, lambda rows: rc(device=None, ids=rows[:1]), "rejected"),
    ("ids-missing", RT, rc(ids=None), "rejected"),
    ("ids-string", RT, lambda rows: rc(ids=rows[0]), "rejected"),
    ("ids-dict", RT, lambda rows: rc(ids={rows[0]: 1}), "rejected"),
    ("ids-empty", RT, rc(ids=[]), "rejected"),
    ("ids-number", RT, rc(ids=[1, 2]), "rejected"),
    ("ids-null-item", RT, lambda rows: rc(ids=[rows[0], None]), "rejected"),
    ("ids-too-long-item", RT, lambda rows: rc(ids=[rows[0], "y" * 129]), "rejected"),
    ("ids-too-many", RT, lambda rows: rc(ids=rows[:1] + [f"u{i}" for i in range(1001)]), "rejected"),
    ("unknown-ids", RT, rc(ids=[f"never-sent-{i}" for i in range(50)]), "unknown"),
    ("other-devices-ids", RT, rc(ids=["dev-2-msg-1", "dev-3-msg-9"]), "unknown"),
    ("duplicate-receipt", RT, lambda rows: [rc(ids=rows[:1]), rc(ids=rows[:1])], "confirm1"),
    ("id-repeated-1000x", RT, lambda rows: rc(ids=rows[:1] * 1000), "confirm1"),
    ("receipt-on-other-device-topic", protocol.receipt_topic(FLEET, "dev-2"), lambda rows: rc(ids=rows), "ignored"),
    ("receipt-other-fleet", protocol.receipt_topic("other", DEV), lambda rows: rc(ids=rows), "ignored"),
    ("announce-not-json", AT, b"{", "rejected"),
    ("announce-receipts-string", AT, json.dumps({"schema": "edgeship/v1/collector", "receipts": "no"}).encode(),
     "rejected"),
    ("announce-wrong-schema", AT, json.dumps({"schema": "edgeship/v1/state", "receipts": False}).encode(),
     "rejected"),
    ("announce-deep", AT, b"{" * 50_000, "rejected"),
]


@pytest.fixture(scope="module")
def rig(mosquitto, tmp_path_factory):
    ob = Outbox(tmp_path_factory.mktemp("hostile-receipts") / "outbox.sqlite")
    fast = LinkOptions(backoff_base=0.05, backoff_cap=0.5)
    link = MqttLink(mosquitto.url, fast, client_id="hr-victim").start()
    # A long timeout: no resend during a case, so only receipts delete rows.
    fw = Forwarder(ob, link, rate=0, fleet=FLEET, device=DEV, receipt_timeout_s=600).start()
    pub = MqttLink(mosquitto.url, client_id="hr-attacker").start()
    assert pub.wait_connected(10)
    assert pub.publish(AT, protocol.encode(protocol.make_announcement()), retain=True).wait(10)
    assert wait_until(lambda: ob.receipt_mode is True, 10)
    yield ob, fw, pub
    pub.publish(AT, b"", retain=True).wait(5)
    pub.stop()
    fw.stop()
    link.stop()
    ob.close()


def _put(ob, n: int) -> list[str]:
    out = []
    for _ in range(n):
        msg = protocol.make_message("feedback", DEV, {"prediction_id": f"p-{next(_n)}", "kind": "correct"})
        ob.put("feedback", protocol.device_topic(FLEET, DEV, "feedback"), protocol.encode(msg))
        out.append(msg["msg_id"])
    return out


def _present(ob, ids: list[str]) -> set[str]:
    with ob._lock:  # noqa: SLF001 - the test reads the file's rows directly
        rows = ob._db.execute(f"SELECT msg_id FROM outbox WHERE msg_id IN ({','.join('?' * len(ids))})",  # noqa: SLF001
                              ids).fetchall()
    return {r[0] for r in rows}


@pytest.mark.mqtt
@pytest.mark.parametrize("topic_name,payload,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_receipt(rig, topic_name, payload, expected):
    ob, fw, pub = rig
    acked = fw.acked
    rows = _put(ob, 3)
    canary = _put(ob, 1)
    assert wait_until(lambda: fw.acked >= acked + 4, 10), fw.health()  # all four await their receipt
    before = dict(fw.receipts)
    payloads = payload(rows) if callable(payload) else payload
    for p in payloads if isinstance(payloads, list) else [payloads]:
        assert pub.publish(topic_name, p).wait(10)
    assert pub.publish(RT, protocol.encode(protocol.make_receipt(DEV, canary))).wait(10)
    assert wait_until(lambda: not _present(ob, canary), 10), f"canary receipt not applied: {fw.health()}"
    h = fw.health()
    assert fw.alive and h["last_error"] is None and h["confirm_on"] == "receipt"
    delta = {k: fw.receipts[k] - before[k] for k in before}
    left = _present(ob, rows)
    if expected == "rejected":
        assert left == set(rows) and delta["rejected"] == 1 and delta["confirmed"] == 1, delta
    elif expected == "unknown":
        assert left == set(rows) and delta["rejected"] == 0 and delta["unknown_ids"] > 0, delta
    elif expected == "ignored":
        assert left == set(rows) and delta == {"received": 1, "confirmed": 1, "unknown_ids": 0, "rejected": 0}
    else:  # confirm1: the named row goes once; repeats are counted unknown, nothing else deleted
        assert left == set(rows[1:]) and delta["confirmed"] == 2 and delta["rejected"] == 0, delta
    fw.outbox.confirm(rows)  # clean up for the next case
