"""MQTT protocol version 1: topics and message schemas (DESIGN.md).

Pure code: no network, no threads. The agent builds messages with
:func:`make_message`; the collector checks what arrives with
:func:`parse_message`, which never raises anything but :class:`MessageError`.

Every message is a JSON object with ``schema`` (``edgeship/v1/<kind>``),
``msg_id`` (unique per device, used for de-duplication), ``device`` and
``ts`` (seconds since the epoch, float). Fields beyond those listed here are
allowed and kept, so later versions can add fields (e.g. drift scores)
without breaking older collectors.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import EdgeshipError

__all__ = [
    "PROTOCOL",
    "KINDS",
    "DEVICE_KINDS",
    "ROLLOUT_DEVICE_STATES",
    "FEEDBACK_KINDS",
    "MAX_PAYLOAD",
    "MAX_DEPTH",
    "MAX_NUMBER",
    "MAX_COUNT",
    "MAX_WINDOW_S",
    "Skew",
    "MessageError",
    "Message",
    "topic",
    "device_topic",
    "rollout_plan_topic",
    "subscriptions",
    "parse_topic",
    "make_message",
    "encode",
    "parse_message",
    "check_bounds",
    "new_msg_id",
    "valid_id",
    "array_field",
    "parse_array_field",
    "MAX_RECEIPT_IDS",
    "receipt_topic",
    "collector_topic",
    "make_receipt",
    "parse_receipt",
    "make_announcement",
    "parse_announcement",
    "envelope_msg_id",
]

PROTOCOL = "edgeship/v1"
# Kinds sent by a device on edgeship/v1/{fleet}/devices/{device}/{kind}.
DEVICE_KINDS = ("state", "telemetry", "feedback", "rollout")
# "plan" is sent by the controller on edgeship/v1/{fleet}/rollouts/{rollout_id}.
KINDS = DEVICE_KINDS + ("plan",)
ROLLOUT_DEVICE_STATES = (
    "assigned", "downloading", "prefetched", "verified", "active",
    "healthy", "failed", "rolled_back",
)
FEEDBACK_KINDS = ("correct", "incorrect", "label", "rating", "comment")
# A Pi sends small JSON; anything larger than this is hostile or broken.
MAX_PAYLOAD = 256 * 1024
# Bounds on what a message may hold (check_bounds). JSON nesting beyond a few levels is never sent by
# an agent, and a deep one crashes recursive code (json.loads at ~1000 levels); numbers are kept in
# the JSON-safe integer range, which also fits every 64-bit column of SQLite and PostgreSQL (a bare
# 10**30 made the SQLite driver raise OverflowError and killed the collector).
MAX_DEPTH = 32
MAX_NUMBER = 2**53
# A count per window: a million inferences a second for MAX_WINDOW_S still fits, and summing a
# million windows cannot overflow a 64-bit SUM() in the fleet DB's reports.
MAX_COUNT = 2**40
MAX_WINDOW_S = 7 * 86400.0
RETAINED = {"state": True, "telemetry": False, "feedback": False, "rollout": False, "plan": True}

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class MessageError(EdgeshipError):
    """A message does not follow the v1 protocol; the text says which field.

    ``reason`` is a short bucket name (e.g. ``too_deep``, ``out_of_range``, ``future_ts``) when the
    check knows it; the collector counts rejected messages under it.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Skew:
    """How far a message's ``ts`` may be from the time it was received.

    ``future_s``: a device clock ahead by more than this is refused (a far-future ``ts`` would
    count in every later window and pin a device's state). ``past_s``: older than this is refused
    too (``None``: no bound). The default past bound is generous because a device may hold
    messages in its outbox through a long outage; what it catches is a clock never set (1970).
    """

    future_s: float = 3600.0
    past_s: float | None = 365 * 86400.0


@dataclass(frozen=True)
class Message:
    kind: str
    fleet: str
    device: str | None  # None for plan messages
    body: dict[str, Any]

    @property
    def msg_id(self) -> str:
        return self.body["msg_id"]


def valid_id(value: object) -> bool:
    """Fleet, device and rollout ids: safe in a topic level and a file name."""
    return isinstance(value, str) and bool(_ID_RE.match(value))


def _check_id(what: str, value: str) -> str:
    if not valid_id(value):
        raise MessageError(f"{what} {value!r} is not a valid id: use letters, digits and _.:- (max 128)")
    return value


def device_topic(fleet: str, device: str, kind: str) -> str:
    if kind not in DEVICE_KINDS:
        raise MessageError(f"unknown device topic kind {kind!r}; expected one of {', '.join(DEVICE_KINDS)}")
    return f"{PROTOCOL}/{_check_id('fleet', fleet)}/devices/{_check_id('device', device)}/{kind}"


def rollout_plan_topic(fleet: str, rollout_id: str) -> str:
    return f"{PROTOCOL}/{_check_id('fleet', fleet)}/rollouts/{_check_id('rollout id', rollout_id)}"


def topic(fleet: str, kind: str, device: str | None = None, rollout_id: str | None = None) -> str:
    """Topic for a message kind; ``plan`` needs ``rollout_id``, the others ``device``."""
    if kind == "plan":
        return rollout_plan_topic(fleet, rollout_id or "")
    return device_topic(fleet, device or "", kind)


def subscriptions(fleet: str, kinds: tuple[str, ...] = DEVICE_KINDS,
                  share_group: str | None = None) -> list[str]:
    """Topic filters a collector subscribes to (shared subscription when grouped)."""
    filters = [f"{PROTOCOL}/{_check_id('fleet', fleet)}/devices/+/{k}" for k in kinds]
    if share_group:
        filters = [f"$share/{_check_id('share group', share_group)}/{f}" for f in filters]
    return filters


def parse_topic(topic_name: str) -> tuple[str, str, str | None]:
    """Return (kind, fleet, device-or-rollout-id) for a v1 topic, else MessageError."""
    parts = topic_name.split("/")
    if len(parts) == 6 and parts[:2] == ["edgeship", "v1"] and parts[3] == "devices" and parts[5] in DEVICE_KINDS:
        if valid_id(parts[2]) and valid_id(parts[4]):
            return parts[5], parts[2], parts[4]
    if len(parts) == 5 and parts[:2] == ["edgeship", "v1"] and parts[3] == "rollouts":
        if valid_id(parts[2]) and valid_id(parts[4]):
            return "plan", parts[2], parts[4]
    raise MessageError(f"topic {topic_name[:200]!r} is not an edgeship/v1 topic")


def new_msg_id() -> str:
    return uuid.uuid4().hex


def make_message(kind: str, device: str, body: dict[str, Any] | None = None, *,
                 msg_id: str | None = None, ts: float | None = None) -> dict[str, Any]:
    """Build a message dict with the envelope fields filled in and checked."""
    if kind not in KINDS:
        raise MessageError(f"unknown message kind {kind!r}")
    msg = dict(body or {})
    msg["schema"] = f"{PROTOCOL}/{kind}"
    msg["msg_id"] = msg_id or msg.get("msg_id") or new_msg_id()
    msg["device"] = device
    msg["ts"] = float(ts if ts is not None else msg.get("ts", time.time()))
    _validate(kind, msg)
    return msg


def encode(msg: dict[str, Any]) -> bytes:
    data = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_PAYLOAD:
        raise MessageError(f"message of {len(data)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return data


def parse_message(topic_name: str, payload: bytes, *, received: float | None = None,
                  skew: Skew | None = None) -> Message:
    """Decode and validate one received message.

    Checks size, JSON, envelope, that the schema matches the topic kind and
    that the device in the payload is the device in the topic (a device must
    not speak for another), then the kind's own required fields, then
    :func:`check_bounds` (with ``received``, the time checks as well).
    """
    if len(payload) > MAX_PAYLOAD:
        raise MessageError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    kind, fleet, ident = parse_topic(topic_name)
    try:
        # Strict UTF-8 (RFC 8259): json.loads(bytes) would also take UTF-16, a BOM and encoded
        # lone surrogates, which no agent sends and no database stores.
        body = _decode_bounded(payload)
        if b"\\u" in payload and _has_lone_surrogate(body):
            raise ValueError("a \\u escape makes a lone surrogate, which is not Unicode text")
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"payload is not valid JSON: {str(exc)[:200]}") from exc
    except RecursionError as exc:  # the C decoder recurses once per level
        raise MessageError(f"payload JSON is nested deeper than {MAX_DEPTH} levels", reason="too_deep") from exc
    if not isinstance(body, dict):
        raise MessageError("payload is not a JSON object")
    _validate(kind, body)
    # Numbers were bounded while decoding; nesting needs a walk only if there are brackets enough.
    check_bounds(kind, body, received=received, skew=skew,
                 walk=payload.count(b"[") + payload.count(b"{") > MAX_DEPTH)
    if kind == "plan":
        if body.get("rollout_id", ident) != ident:
            raise MessageError(f"rollout_id {body.get('rollout_id')!r} does not match topic {ident!r}")
        return Message(kind, fleet, None, body)
    if body["device"] != ident:
        raise MessageError(f"device {body['device']!r} in payload does not match topic device {ident!r}")
    return Message(kind, fleet, ident, body)


def check_bounds(kind: str, body: dict[str, Any], *, received: float | None = None,
                 skew: Skew | None = None, walk: bool = True) -> None:
    """Refuse values no agent sends and the fleet side cannot store or sum (pure; MessageError).

    Every value: nesting at most :data:`MAX_DEPTH`, every number finite and within
    ±:data:`MAX_NUMBER`. Telemetry counts within [0, :data:`MAX_COUNT`], ``window_s`` within
    [0, :data:`MAX_WINDOW_S`]. With ``received`` (the receive time): ``ts``, ``session`` and
    ``started_at`` at most ``skew.future_s`` ahead of it, and ``ts`` at most ``skew.past_s``
    behind it — except for retained ``state`` messages, which are old by design.
    Expects a body that passed :func:`_validate` (the envelope's fields exist with their types).

    ``walk=False`` skips the walk over every value: :func:`parse_message` bounds each number
    as it decodes it (the walk cost more than the rest of ingest) and walks only a payload with
    enough brackets to nest too deep.
    """
    # Iterative walk: a recursive one would itself be the crash this guards against.
    stack: list[tuple[Any, int]] = [(body, 1)] if walk else []
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise MessageError(f"payload JSON is nested deeper than {MAX_DEPTH} levels", reason="too_deep")
            items = value.values() if isinstance(value, dict) else value
            stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list, int, float)))
        elif (isinstance(value, (int, float)) and not isinstance(value, bool)
              and not (math.isfinite(value) and -MAX_NUMBER <= value <= MAX_NUMBER)):
            raise _out_of_range(value)
    if kind == "telemetry":
        for k, v in body["counts"].items():
            if v > MAX_COUNT:
                raise MessageError(f"telemetry count {str(k)[:40]!r} is {v:.4g}, above the {MAX_COUNT} limit",
                                   reason="out_of_range")
        if body["window_s"] > MAX_WINDOW_S:
            raise MessageError(f"field 'window_s' is {body['window_s']:.4g}, above the {MAX_WINDOW_S:.0f} s limit",
                               reason="out_of_range")
    if received is None:
        return
    skew = skew or Skew()
    ahead = received + skew.future_s
    for key in ("ts", "session", "started_at"):
        v = body.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > ahead:
            raise MessageError(f"field {key!r} is {v - received:.0f} s ahead of the receive time "
                               f"(more than the {skew.future_s:.0f} s allowed clock skew)", reason="future_ts")
    if skew.past_s is not None and kind != "state" and body["ts"] < received - skew.past_s:
        raise MessageError(f"field 'ts' is {received - body['ts']:.0f} s before the receive time "
                           f"(more than the {skew.past_s:.0f} s allowed)", reason="old_ts")


# A JSON integer can pass MAX_NUMBER (2**53, 16 digits) only with a run of 16+ digits. Most payloads
# have none, and for them the C decoder runs without a Python call per integer (the parse_int hook
# was a third of ingest time); a payload with such a run, even inside a string, takes the checked
# decoder. Floats keep their hook: an exponent (1e400) makes a huge number out of few digits.
# The run is found by mapping digits to "0" and the rest to "." (bytes.translate) and a substring
# search, both in C: the regex [0-9]{16} backtracks at every digit and took 60-110 us of a 1.7 KB
# telemetry message (the #21 A/B found it as most of the collector's slow-down), this ~10 us.
_DIGIT_MAP = bytes(0x30 if 0x30 <= i <= 0x39 else 0x2E for i in range(256))
_SIXTEEN_DIGITS = b"0" * 16


def _has_long_digit_run(payload: bytes) -> bool:
    return _SIXTEEN_DIGITS in payload.translate(_DIGIT_MAP)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _decode_bounded(payload: bytes) -> Any:
    """``json.loads`` with every number bounded (MessageError) and NaN/Infinity refused (ValueError)."""
    dec = _CHECKED if _has_long_digit_run(payload) else _FAST
    return dec.decode(payload.decode("utf-8"))


def _out_of_range(value: Any) -> MessageError:
    return MessageError(f"a number in the payload is out of range (beyond ±2**53): {str(value)[:40]}",
                        reason="out_of_range")


def _bounded_int(text: str) -> int:
    v = int(text)  # ValueError beyond 4300 digits (Python's own limit): malformed
    if not -MAX_NUMBER <= v <= MAX_NUMBER:
        raise _out_of_range(text)
    return v


def _bounded_float(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and -MAX_NUMBER <= v <= MAX_NUMBER):  # 1e400 decodes to inf
        raise _out_of_range(text)
    return v


def _has_lone_surrogate(body: Any) -> bool:
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# Built once: json.loads with hooks builds a new decoder on every call. Decoders hold no state.
_FAST = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_bounded_float)
_CHECKED = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_bounded_float, parse_int=_bounded_int)


def _num(body: dict, key: str, *, required: bool = True, minimum: float | None = None) -> None:
    if key not in body:
        if required:
            raise MessageError(f"field {key!r} is missing")
        return
    v = body[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise MessageError(f"field {key!r} must be a finite number, got {type(v).__name__}")
    if minimum is not None and v < minimum:
        raise MessageError(f"field {key!r} must be >= {minimum}, got {v}")


def _str(body: dict, key: str, *, required: bool = True, choices: tuple[str, ...] | None = None,
         max_len: int = 1024) -> None:
    if key not in body or body[key] is None:
        if required:
            raise MessageError(f"field {key!r} is missing")
        return
    v = body[key]
    if not isinstance(v, str) or len(v) > max_len:
        raise MessageError(f"field {key!r} must be a string of at most {max_len} characters")
    if choices is not None and v not in choices:
        raise MessageError(f"field {key!r} is {v!r}; expected one of {', '.join(choices)}")


def _dict(body: dict, key: str, *, required: bool = True) -> None:
    if key not in body:
        if required:
            raise MessageError(f"field {key!r} is missing")
        return
    if not isinstance(body[key], dict):
        raise MessageError(f"field {key!r} must be an object")


def _validate(kind: str, body: dict[str, Any]) -> None:
    schema = body.get("schema")
    if schema != f"{PROTOCOL}/{kind}":
        raise MessageError(f"schema {str(schema)[:80]!r} does not match topic kind {kind!r} (expected {PROTOCOL}/{kind})")
    _str(body, "msg_id", max_len=128)
    if not body["msg_id"]:
        raise MessageError("field 'msg_id' is empty")
    if kind != "plan":
        if not valid_id(body.get("device")):
            raise MessageError(f"field 'device' {str(body.get('device'))[:80]!r} is not a valid device id")
    _num(body, "ts", minimum=0)
    if kind == "state":
        if not isinstance(body.get("online"), bool):
            raise MessageError("field 'online' must be true or false")
        if body.get("model") is not None:
            _dict(body, "model")
    elif kind == "telemetry":
        _dict(body, "counts")
        for k, v in body["counts"].items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise MessageError(f"telemetry count {str(k)[:40]!r} must be a non-negative number")
        _num(body, "window_s", minimum=0)
        if body.get("model") is not None:
            _dict(body, "model")
    elif kind == "feedback":
        _str(body, "prediction_id", max_len=128)
        _str(body, "kind", choices=FEEDBACK_KINDS)
        if body.get("model") is not None:
            _dict(body, "model")
        if body.get("input") is not None:  # optional captured input: {name: array_field(...)}
            _dict(body, "input")
            for name, field in body["input"].items():
                parse_array_field(field, what=f"input {str(name)[:40]!r}")
    elif kind == "rollout":
        _str(body, "rollout_id", max_len=128)
        _str(body, "state", choices=ROLLOUT_DEVICE_STATES)
        _str(body, "reason", required=False, max_len=2048)
    elif kind == "plan":
        _str(body, "rollout_id", max_len=128)
        _dict(body, "plan")


_DTYPES = ("float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")


def array_field(dtype: str, shape: list[int] | tuple[int, ...], data: bytes) -> dict[str, Any]:
    """A numpy-free JSON form of one array: ``{"dtype", "shape", "b64"}`` (C order, little endian)."""
    import base64

    return {"dtype": str(dtype), "shape": [int(d) for d in shape], "b64": base64.b64encode(data).decode("ascii")}


def parse_array_field(field: Any, what: str = "array") -> tuple[str, tuple[int, ...], bytes]:
    """Check and decode :func:`array_field` output -> (dtype, shape, raw bytes); MessageError if wrong."""
    import base64
    import binascii

    if not isinstance(field, dict) or not isinstance(field.get("b64"), str):
        raise MessageError(f"{what} must be an object with dtype, shape and b64")
    dtype, shape = field.get("dtype"), field.get("shape")
    if dtype not in _DTYPES:
        raise MessageError(f"{what}: dtype {str(dtype)[:20]!r} is not one of {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape):
        raise MessageError(f"{what}: shape must be a list of at most 8 non-negative integers")
    try:
        data = base64.b64decode(field["b64"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MessageError(f"{what}: b64 is not valid base64") from exc
    itemsize = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2, "int16": 2}.get(dtype, 1)
    n = 1
    for d in shape:
        n *= d
    if n * itemsize != len(data):
        raise MessageError(f"{what}: {len(data)} bytes do not fill shape {shape} of {dtype}")
    return dtype, tuple(shape), data


# ----------------------------------------------------------------- end-to-end receipts (fleet -> device)
#
# The collector confirms what it has durably stored (committed to the fleet DB, or kept as a dead
# letter) by sending the device a receipt listing those msg_ids; a device that knows its collector
# sends receipts deletes an outbox row only on its receipt, not on the broker's PUBACK, so a broker
# that loses what it accepted (no persistence, a restart) costs a resend, never a message. A device
# learns that the fleet sends receipts from the collector's retained announcement; without one it
# keeps deleting on PUBACK (an older collector never sends receipts: waiting for them would fill
# the outbox). docs/architecture.md, "End-to-end receipts".
#
#   edgeship/v1/{fleet}/devices/{device}/receipt   fleet -> device, not retained, QoS 1
#       {"schema": "edgeship/v1/receipt", "msg_id", "device", "ts", "ids": [msg_id, ...]}
#   edgeship/v1/{fleet}/collector                  fleet -> devices, retained, QoS 1
#       {"schema": "edgeship/v1/collector", "msg_id", "ts", "receipts": true}; empty = none

MAX_RECEIPT_IDS = 1000  # per receipt message: 1000 uuid hex ids are ~35 KB, well under MAX_PAYLOAD


def receipt_topic(fleet: str, device: str) -> str:
    return f"{PROTOCOL}/{_check_id('fleet', fleet)}/devices/{_check_id('device', device)}/receipt"


def collector_topic(fleet: str) -> str:
    return f"{PROTOCOL}/{_check_id('fleet', fleet)}/collector"


def make_receipt(device: str, ids: list[str]) -> dict[str, Any]:
    if not 0 < len(ids) <= MAX_RECEIPT_IDS:
        raise MessageError(f"a receipt holds 1 to {MAX_RECEIPT_IDS} msg_ids, got {len(ids)}")
    return {"schema": f"{PROTOCOL}/receipt", "msg_id": new_msg_id(), "device": _check_id("device", device),
            "ts": time.time(), "ids": list(ids)}


def parse_receipt(payload: bytes, device: str) -> list[str]:
    """The msg_ids a receipt for ``device`` confirms; MessageError for anything else (pure)."""
    body = _small_json(payload, "receipt")
    if body.get("device") != device:
        raise MessageError(f"receipt for device {str(body.get('device'))[:80]!r}, not {device!r}",
                           reason="spoofed")
    ids = body.get("ids")
    if not isinstance(ids, list) or not 0 < len(ids) <= MAX_RECEIPT_IDS or not all(
            isinstance(i, str) and 0 < len(i) <= 128 for i in ids):
        raise MessageError(f"receipt field 'ids' must be a list of 1 to {MAX_RECEIPT_IDS} msg_ids "
                           "(strings of at most 128 characters)")
    return ids


def make_announcement(receipts: bool = True) -> dict[str, Any]:
    return {"schema": f"{PROTOCOL}/collector", "msg_id": new_msg_id(), "ts": time.time(),
            "receipts": bool(receipts)}


def parse_announcement(payload: bytes) -> bool:
    """Whether the fleet's collector sends receipts; an empty (cleared) retained message means no."""
    if not payload:
        return False
    body = _small_json(payload, "collector")
    if not isinstance(body.get("receipts"), bool):
        raise MessageError("collector announcement field 'receipts' must be true or false")
    return body["receipts"]


def _small_json(payload: bytes, kind: str) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD:
        raise MessageError(f"{kind} of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit", reason="oversized")
    try:
        body = _decode_bounded(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"{kind} is not valid JSON: {str(exc)[:200]}", reason="malformed") from exc
    except RecursionError as exc:
        raise MessageError(f"{kind} JSON is nested too deep", reason="too_deep") from exc
    if not isinstance(body, dict) or body.get("schema") != f"{PROTOCOL}/{kind}":
        raise MessageError(f"not an {PROTOCOL}/{kind} message", reason="wrong_schema")
    return body


_MSG_ID_KEY = b'"msg_id":"'


def envelope_msg_id(payload: bytes) -> str | None:
    """The top-level ``msg_id`` of an encoded message, or None (pure; never raises).

    Fast path for what :func:`encode` writes: one ``"msg_id":"`` in the payload is the envelope's
    (a string value holding it is escaped as ``\\"msg_id\\"``); with more than one, decode.
    """
    try:
        if payload.count(_MSG_ID_KEY) == 1:
            start = payload.index(_MSG_ID_KEY) + len(_MSG_ID_KEY)
            end = payload.index(b'"', start)
            value = payload[start:end]
            if b"\\" not in value and 0 < len(value) <= 128:
                return value.decode("utf-8")
        body = json.loads(payload)
        mid = body.get("msg_id") if isinstance(body, dict) else None
        return mid if isinstance(mid, str) and 0 < len(mid) <= 128 else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
