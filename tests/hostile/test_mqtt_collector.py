"""MQTT/collector: hostile and malformed messages against a real Mosquitto, the real collector and a
real fleet DB (SQLite, and PostgreSQL where its server is installed).

Each case publishes its message, then a good canary; once the canary is stored the hostile one
has been handled. Held means: the expected outcome (rejected under the expected reason and
kept as a dead letter, or stored, or never delivered), the collector alive with no crash,
and the canary stored — ingestion went on.
"""
from __future__ import annotations

import base64
import itertools
import json
import random
import time

import pytest
from waiting import wait_until

from edgeship import protocol
from edgeship.fleet.collector import Collector
from edgeship.fleet.db import FleetDB
from edgeship.mqtt import LinkOptions, MqttLink

AREA = "MQTT/collector"
FLEET = "hq"
D = "dev-1"
_ids = itertools.count()


def T(kind: str = "telemetry", device: str = D, fleet: str = FLEET) -> str:
    return f"edgeship/v1/{fleet}/devices/{device}/{kind}"


def body(kind: str = "telemetry", /, **over) -> dict:
    base = {"telemetry": {"window_s": 60, "counts": {"inferences": 3, "errors": 0},
                          "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0}, "model": {"name": "m", "version": "1"}},
            "feedback": {"prediction_id": "p-1", "kind": "incorrect", "model": {"name": "m", "version": "1"}},
            "state": {"online": True, "session": time.time() - 10, "agent_version": "1"},
            "rollout": {"rollout_id": "r1", "state": "active"}}[kind]
    b = protocol.make_message(kind, D, base)
    for k, v in over.items():
        if v is _DROP:
            b.pop(k, None)
        else:
            b[k] = v
    return b


_DROP = object()


def raw(b) -> bytes:
    return json.dumps(b, allow_nan=True).encode()


def deep(n: int, leaf="1", o="[", c="]") -> bytes:
    return (o * n + leaf + c * n).encode()


def b64field(dtype="float32", shape=(2,), data=b"\0" * 8) -> dict:
    return {"dtype": dtype, "shape": list(shape), "b64": base64.b64encode(data).decode()}


# (id, topic, payload, expected) — expected: a reject reason, "stored", "duplicate" or "ignored"
# (the broker never delivers it: not a topic the collector subscribes to).
CASES: list[tuple[str, str, bytes, object]] = [
    # --- wrong types
    ("counts-list", T(), raw(body(counts=[1, 2])), "invalid"),
    ("counts-string-value", T(), raw(body(counts={"inferences": "3"})), "invalid"),
    ("counts-negative", T(), raw(body(counts={"inferences": -1})), "invalid"),
    ("counts-bool", T(), raw(body(counts={"inferences": True})), "invalid"),
    ("counts-null", T(), raw(body(counts=None)), "invalid"),
    ("window-string", T(), raw(body(window_s="60")), "invalid"),
    ("window-negative", T(), raw(body(window_s=-5)), "invalid"),
    ("window-missing", T(), raw(body(window_s=_DROP)), "invalid"),
    ("ts-string", T(), raw(body(ts="yesterday")), "invalid"),
    ("ts-null", T(), raw(body(ts=None)), "invalid"),
    ("ts-bool", T(), raw(body(ts=True)), "invalid"),
    ("ts-negative", T(), raw(body(ts=-1.0)), "invalid"),
    ("ts-missing", T(), raw(body(ts=_DROP)), "invalid"),
    ("msg-id-int", T(), raw(body(msg_id=5)), "invalid"),
    ("msg-id-empty", T(), raw(body(msg_id="")), "invalid"),
    ("msg-id-long", T(), raw(body(msg_id="x" * 200)), "invalid"),
    ("msg-id-missing", T(), raw(body(msg_id=_DROP)), "invalid"),
    ("device-missing", T(), raw(body(device=_DROP)), "invalid"),
    ("device-traversal", T(), raw(body(device="../../etc")), "invalid"),
    ("device-homoglyph", T(), raw(body(device="dev-\u0031\u0430")), "invalid"),
    ("model-list", T(), raw(body(model=["m", "1"])), "invalid"),
    ("feedback-kind-unknown", T("feedback"), raw(body("feedback", kind="pwn")), "invalid"),
    ("feedback-no-prediction", T("feedback"), raw(body("feedback", prediction_id=_DROP)), "invalid"),
    ("feedback-prediction-int", T("feedback"), raw(body("feedback", prediction_id=7)), "invalid"),
    ("feedback-prediction-long", T("feedback"), raw(body("feedback", prediction_id="p" * 1000)), "invalid"),
    ("feedback-input-bad-b64", T("feedback"), raw(body("feedback", input={"x": {"dtype": "float32", "shape": [1],
                                                                                 "b64": "!!!"}})), "invalid"),
    ("feedback-input-short", T("feedback"), raw(body("feedback", input={"x": b64field(shape=(3,))})), "invalid"),
    ("feedback-input-dtype", T("feedback"), raw(body("feedback", input={"x": b64field(dtype="object")})), "invalid"),
    ("feedback-input-9-dims", T("feedback"), raw(body("feedback", input={"x": b64field(shape=(1,) * 9, data=b"\0" * 4)})),
     "invalid"),
    ("feedback-input-huge-shape", T("feedback"), raw(body("feedback", input={"x": b64field(shape=(2**31,))})),
     "invalid"),
    ("feedback-input-not-object", T("feedback"), raw(body("feedback", input=[1, 2])), "invalid"),
    ("state-online-string", T("state"), raw(body("state", online="yes")), "invalid"),
    ("state-model-string", T("state"), raw(body("state", model="m")), "invalid"),
    ("rollout-state-unknown", T("rollout"), raw(body("rollout", state="pwned")), "invalid"),
    ("rollout-reason-huge", T("rollout"), raw(body("rollout", reason="r" * 10_000)), "invalid"),
    ("rollout-no-id", T("rollout"), raw(body("rollout", rollout_id=_DROP)), "invalid"),
    # --- envelope, schema, identity
    ("schema-missing", T(), raw(body(schema=_DROP)), "wrong_schema"),
    ("schema-v2", T(), raw(body(schema="edgeship/v2/telemetry")), "wrong_schema"),
    ("schema-other-kind", T("feedback"), raw(body()), "wrong_schema"),
    ("schema-int", T(), raw(body(schema=1)), "wrong_schema"),
    ("spoofed-device", T(device="victim-01"), raw(body()), "spoofed"),
    ("spoofed-feedback", T("feedback", device="victim-01"), raw(body("feedback")), "spoofed"),
    # --- not JSON objects
    ("json-array", T(), b"[1,2,3]", "malformed"),
    ("json-null", T(), b"null", "malformed"),
    ("json-number", T(), b"42", "malformed"),
    ("json-string", T(), b'"hello"', "malformed"),
    ("empty-payload", T(), b"", "malformed"),
    ("whitespace", T(), b"   \n\t ", "malformed"),
    ("truncated-json", T(), raw(body())[:-7], "malformed"),
    ("trailing-garbage", T(), raw(body()) + b"}}", "malformed"),
    ("bom-prefix", T(), b"\xef\xbb\xbf" + raw(body()), "malformed"),
    ("utf8-encoded-surrogate", T("feedback"), raw(body("feedback", kind="comment", value="@")).replace(b"@", b"\xed\xa0\x80"),
     "malformed"),
    ("utf16", T(), json.dumps(body()).encode("utf-16"), "malformed"),
    ("invalid-utf8", T(), raw(body()).replace(b'"m"', b'"\xff\xfe"'), "malformed"),
    ("huge-int-literal", T(), raw(body()).replace(b'"inferences": 3', b'"inferences": ' + b"9" * 5000), "malformed"),
    ("nan-literal-ts", T(), raw(body()).replace(b'"ts": ', b'"ts": NaN, "x": '), "malformed"),
    ("infinity-literal", T(), raw(body(x=float("inf"))), "malformed"),
    ("neg-infinity-count", T(), raw(body(counts={"inferences": float("-inf")})), "malformed"),
    ("nan-nested", T(), raw(body(drift={"score": float("nan")})), "malformed"),
    # --- numbers out of range (each one used to kill the collector on SQLite)
    ("ts-1e30", T(), raw(body(ts=10**30)), "out_of_range"),
    ("ts-2-63", T(), raw(body(ts=2**63)), "out_of_range"),
    ("ts-1e308", T(), raw(body(ts=1e308)), "out_of_range"),
    ("ts-overflow-literal", T(), raw(body()).replace(b'"ts": ', b'"ts": 1e400, "y": '), "out_of_range"),
    ("extra-overflow-literal", T(), raw(body()).replace(b'"ts": ', b'"y": -1e400, "ts": '), "out_of_range"),
    ("counts-1e20", T(), raw(body(counts={"inferences": 1e20})), "out_of_range"),
    ("counts-2-63", T(), raw(body(counts={"errors": 2**63})), "out_of_range"),
    ("counts-over-max", T(), raw(body(counts={"inferences": protocol.MAX_COUNT + 1})), "out_of_range"),
    ("window-huge", T(), raw(body(window_s=1e9)), "out_of_range"),
    ("session-1e25", T("state"), raw(body("state", session=10**25)), "out_of_range"),
    ("started-at-1e300", T("state"), raw(body("state", started_at=1e300)), "out_of_range"),
    ("latency-1e300", T(), raw(body(latency_ms={"p50": 1e300, "p95": 1, "p99": 1})), "out_of_range"),
    ("extra-neg-2-63", T(), raw(body(extra=-(2**63))), "out_of_range"),
    ("feedback-value-huge", T("feedback"), raw(body("feedback", kind="rating", value=10**20)), "out_of_range"),
    # --- time bounds
    ("ts-future-2h", T(), raw(body(ts=time.time() + 7200)), "future_ts"),
    ("ts-future-year", T("feedback"), raw(body("feedback", ts=time.time() + 365 * 86400)), "future_ts"),
    ("session-future", T("state"), raw(body("state", session=time.time() + 30 * 86400)), "future_ts"),
    ("ts-1970", T(), raw(body(ts=1.0)), "old_ts"),
    ("ts-two-years-ago", T("feedback"), raw(body("feedback", ts=time.time() - 2 * 365 * 86400)), "old_ts"),
    ("state-old-retained-ok", T("state"), raw(body("state", ts=time.time() - 2 * 365 * 86400, session=1.0)), "stored"),
    ("ts-future-small-ok", T(), raw(body(ts=time.time() + 60)), "stored"),
    # --- deep nesting
    ("deep-array-120k", T(), deep(120_000), "too_deep"),
    ("deep-object-40k", T(), deep(40_000, o='{"a":', c="}"), "too_deep"),
    ("deep-500-extra", T(), raw(body()).replace(b'"ts": ', b'"x": ' + deep(500) + b', "ts": '), "too_deep"),
    ("deep-33-extra", T(), raw(body()).replace(b'"ts": ', b'"x": ' + deep(32) + b', "ts": '), "too_deep"),
    ("deep-feedback-value", T("feedback"), raw(body("feedback")).replace(b'"ts": ', b'"value": ' + deep(2000) +
                                                                         b', "ts": '), "too_deep"),
    ("deep-31-ok", T(), raw(body()).replace(b'"ts": ', b'"x": ' + deep(30) + b', "ts": '), "stored"),
    # --- huge strings and sizes
    ("oversized-300k", T(), b'{"a": "' + b"x" * 300_000 + b'"}', "oversized"),
    ("oversized-1m-valid", T(), raw(body(pad="y" * 1_000_000)), "oversized"),
    ("big-string-under-limit", T(), raw(body(note="z" * 200_000)), "stored"),
    ("many-keys", T(), raw(body(extra={f"k{i}": i for i in range(10_000)})), "stored"),
    ("long-counter-name", T(), raw(body(counts={"c" * 5000: 1})), "stored"),
    # --- unicode
    ("unicode-emoji-comment", T("feedback"), raw(body("feedback", kind="comment", value="👍🏽 ok \u202eevil")), "stored"),
    ("unicode-label", T("feedback"), raw(body("feedback", kind="label", value="猫")), "stored"),
    ("lone-surrogate", T("feedback"), raw(body("feedback", kind="comment", value="\ud800")), "malformed"),
    ("lone-surrogate-key", T(), raw(body(extra={"\udfff": 1})), "malformed"),
    ("surrogate-pair-ok", T("feedback"), raw(body("feedback", kind="comment", value="\ud83d\ude00")), "stored"),
    ("nul-in-comment", T("feedback"), raw(body("feedback", kind="comment", value="a\u0000b")), "stored"),
    ("unicode-topic-device", T(device="dév-1"), raw(body(device="dév-1")), "wrong_schema"),
    ("long-topic-device", T(device="d" * 200), raw(body(device="d" * 200)), "wrong_schema"),
    # --- binary garbage
    *[(f"random-bytes-{seed}", T(random.Random(seed).choice(protocol.DEVICE_KINDS)),
       random.Random(seed).randbytes(random.Random(seed + 100).randint(1, 5000)), "malformed") for seed in range(6)],
    ("zero-bytes", T(), b"\0" * 1000, "malformed"),
    ("gzip-magic", T(), b"\x1f\x8b\x08\x00" + b"\0" * 100, "malformed"),
    ("msgpack-ish", T(), b"\x82\xa6schema\xa1x\xa2ts\xcb@\x00", "malformed"),
    # --- topics the collector must not take
    ("topic-unknown-kind", T("commands"), raw(body()), "ignored"),
    ("topic-other-fleet", T(fleet="other"), raw(body()), "ignored"),
    ("topic-extra-level", T() + "/x", raw(body()), "ignored"),
    ("topic-plan", f"edgeship/v1/{FLEET}/rollouts/r1", raw({"schema": "edgeship/v1/plan", "msg_id": "x", "ts": 1,
                                                            "rollout_id": "r1", "plan": {}}), "ignored"),
    ("topic-v2", f"edgeship/v2/{FLEET}/devices/{D}/telemetry", raw(body()), "ignored"),
    # --- valid, for contrast: stored
    ("valid-telemetry", T(), raw(body()), "stored"),
    ("valid-feedback", T("feedback"), raw(body("feedback")), "stored"),
    ("valid-rollout", T("rollout"), raw(body("rollout")), "stored"),
    ("unknown-extra-fields", T(), raw(body(drift={"score": 0.1, "samples": 10}, future_field=[1, "a", None])), "stored"),
]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def rig(request, mosquitto, tmp_path_factory):
    """One collector per backend for all cases, with a publisher; canaries mark each case done."""
    if request.param == "sqlite":
        url = str(tmp_path_factory.mktemp("hostile-mqtt") / "fleet.sqlite")
    else:
        import uuid

        url = request.getfixturevalue("postgres").create_db(f"hostile_{uuid.uuid4().hex[:10]}")
    db = FleetDB.open(url)
    fast = LinkOptions(backoff_base=0.05, backoff_cap=0.5)
    col = Collector(db, mosquitto.url, FLEET, client_id=f"hostile-col-{request.param}", link_options=fast).start()
    pub = MqttLink(mosquitto.url, client_id=f"hostile-pub-{request.param}").start()
    assert col.wait_ready(10) and pub.wait_connected(10)
    yield db, col, pub
    pub.stop()
    col.stop()
    db.close()


def _canary(pub) -> str:
    mid = f"canary-{next(_ids)}"
    msg = protocol.make_message("feedback", "canary", {"prediction_id": mid, "kind": "correct"}, msg_id=mid)
    assert pub.publish(protocol.device_topic(FLEET, "canary", "feedback"), protocol.encode(msg)).wait(10)
    return mid


def _stored(db, mid: str) -> bool:
    return ("canary", mid) in set(db.message_ids("feedback"))


def _settled(col) -> bool:
    """Every message received so far is counted as stored, duplicate or rejected (its batch is done)."""
    s = col.stats()
    return s["stored"] + s["duplicates"] + s["rejected"] == s["received"]


def run_case(rig, topic_name: str, payload: bytes, retain: bool = False) -> dict:
    """Publish one hostile message and a canary; the collector's counter deltas once the canary is in."""
    db, col, pub = rig
    before = col.stats()
    assert pub.publish(topic_name, payload, retain=retain).wait(10)
    mid = _canary(pub)
    assert wait_until(lambda: _stored(db, mid) and _settled(col), 15), f"canary not stored: {col.stats()}"
    after = col.stats()
    assert col.alive and after["crashes"] == 0 and after["error"] is None
    delta = {k: after[k] - before[k] for k in ("stored", "duplicates", "rejected")}
    delta["stored"] -= 1  # the canary
    delta["reasons"] = {r: n - before["rejected_by_reason"].get(r, 0)
                        for r, n in after["rejected_by_reason"].items() if n != before["rejected_by_reason"].get(r, 0)}
    return delta


@pytest.mark.mqtt
@pytest.mark.parametrize("topic_name,payload,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_message(rig, topic_name, payload, expected):
    db = rig[0]
    d = run_case(rig, topic_name, payload)
    if expected == "stored":
        assert d == {"stored": 1, "duplicates": 0, "rejected": 0, "reasons": {}}
    elif expected == "ignored":
        assert d == {"stored": 0, "duplicates": 0, "rejected": 0, "reasons": {}}
    else:
        assert d == {"stored": 0, "duplicates": 0, "rejected": 1, "reasons": {expected: 1}}
        dl = db.dead_letters(limit=1)[0]
        assert dl["reason"] == expected and dl["topic"] == topic_name[:512] and dl["size"] == len(payload)
        assert dl["payload"] == payload[:16 * 1024] and 0 < len(dl["detail"]) <= 1000


@pytest.mark.mqtt
def test_redelivered_copy_is_a_duplicate(rig):
    p = raw(body())
    assert run_case(rig, T(), p)["stored"] == 1
    assert run_case(rig, T(), p) == {"stored": 0, "duplicates": 1, "rejected": 0, "reasons": {}}


@pytest.mark.mqtt
def test_fifty_verdicts_on_one_prediction_count_once(rig):
    db, _, pub = rig
    pid = f"pred-{next(_ids)}"
    t0 = time.time()
    for i in range(50):
        m = protocol.make_message("feedback", "app-dev", {"prediction_id": pid, "kind": "incorrect"}, ts=t0 + i * 0.001)
        assert pub.publish(T("feedback", "app-dev"), protocol.encode(m)).wait(10)
    mid = _canary(pub)
    assert wait_until(lambda: _stored(db, mid), 15)
    assert [r["kind"] for r in db.feedback() if r["prediction_id"] == pid] == ["incorrect"]


@pytest.mark.mqtt
def test_flood_of_junk_then_good_messages_all_good_ones_stored(rig):
    db, col, pub = rig
    rng = random.Random(7)
    before = col.stats()["rejected"]
    for _ in range(300):
        pub.publish(T(rng.choice(protocol.DEVICE_KINDS)), rng.randbytes(rng.randint(0, 300)))
    good = [protocol.make_message("feedback", "flood", {"prediction_id": f"f{i}", "kind": "correct"})
            for i in range(100)]
    for m in good:
        pub.publish(T("feedback", "flood"), protocol.encode(m))
    assert wait_until(lambda: sum(1 for d, _ in db.message_ids("feedback") if d == "flood") == 100
                      and _settled(col), 20)
    assert col.stats()["rejected"] - before == 300 and col.alive


@pytest.mark.mqtt
def test_retained_junk_on_subscribe_is_dead_lettered(mosquitto, tmp_path):
    """Junk retained on a state topic reaches every new collector; it is rejected, not fatal."""
    db = FleetDB.open(tmp_path / "f.sqlite")
    pub = MqttLink(mosquitto.url, client_id="hostile-retain-pub").start()
    junk_topic = T("state", "retained-junk")
    try:
        assert pub.wait_connected(10)
        assert pub.publish(junk_topic, deep(120_000), retain=True).wait(10)
        col = Collector(db, mosquitto.url, FLEET, client_id="hostile-retain-col",
                        link_options=LinkOptions(backoff_base=0.05, backoff_cap=0.5)).start()
        try:
            assert col.wait_ready(10)
            assert wait_until(lambda: col.stats()["rejected_by_reason"].get("too_deep") == 1, 10), col.stats()
            m = protocol.make_message("state", "retained-junk", {"online": True, "session": time.time()})
            assert pub.publish(junk_topic, protocol.encode(m), retain=True).wait(10)
            assert wait_until(lambda: any(r["device"] == "retained-junk" for r in db.devices()), 10)
            assert col.alive
        finally:
            col.stop()
    finally:
        pub.publish(junk_topic, b"", retain=True).wait(10)  # clear it for other tests
        pub.stop()
        db.close()
