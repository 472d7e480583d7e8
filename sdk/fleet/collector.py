"""The fleet collector: MQTT in, validated and de-duplicated rows into the fleet DB.

``Collector(db, link_or_broker_url, fleet, share_group=None)`` subscribes to
the fleet's device topics (``$share/<group>/...`` when ``share_group`` is set,
so several collectors split one clustered broker's stream), validates every
message with :func:`edgeship.protocol.parse_message` and stores batches with
:meth:`FleetDB.store_messages`, which de-duplicates on (device, msg_id).

Delivery: the collector's MQTT session is persistent and acknowledges each
message *after* the batch holding it is committed (manual ack), so a crash or
broker restart between receipt and storage means redelivery — and the
ledger makes the redelivered copy a no-op. At least once on the wire, exactly
once in the DB.

A bad message (malformed JSON, oversized, wrong types, unknown schema, a
device speaking for another, numbers out of range, a ``ts`` beyond the allowed
clock skew) is counted under a reason, logged in one line, stored in the fleet
DB's dead-letter table (reason, topic, truncated payload, time) and
acknowledged (a redelivery would be just as bad); it never stops the
collector. *Any* exception while handling one message makes it such a
rejected message — one message must never stop ingestion, or it would be
redelivered after every restart and stop it again.

End-to-end receipts: once a batch is committed (stored, duplicates, dead
letters), the collector publishes to each device that sent part of it a
receipt naming those msg_ids (gathered for up to ``receipt_delay_s``) (``edgeship/v1/{fleet}/devices/{device}/receipt``),
and it keeps a retained announcement on ``edgeship/v1/{fleet}/collector`` so
devices know to wait for receipts rather than trust the broker's PUBACK
(edgeship.protocol, "end-to-end receipts"). A duplicate is receipted again:
its first receipt was lost, or the device would not have resent it.
``receipts=False`` sends neither (a device then confirms on PUBACK).

Only a DB that is unavailable (locked, disk, connection) holds a batch back:
it is retried, unacknowledged. If the loop itself fails (a bug, a broken
link), it restarts with the same batch after a growing pause (0.5 s doubling
to 30 s, each logged). With ``max_crashes`` set (``edgeship fleet collect``
sets 3), more failures than that within a minute stop it for good and
:meth:`Collector.check` raises, so the process exits non-zero for its
supervisor to restart instead of sitting silently; without it (the console's
and the demo's in-process collector) it keeps restarting.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from .. import protocol
from ..errors import EdgeshipError, FleetDBError
from ..lifecycle import STOP_TIMEOUT_S, Loop
from ..mqtt import Inbound, LinkOptions, MqttLink

__all__ = ["DEAD_LETTER_PAYLOAD", "Collector", "CollectorError", "classify_error"]

# How much of a rejected payload the dead-letter table keeps: enough to see what it was.
DEAD_LETTER_PAYLOAD = 16 * 1024
# Receipts held back to be sent together: at this many ids they go at once (memory bound).
_RECEIPTS_HELD = 20_000
# Crash budget of the loop: more than this many restarts within CRASH_WINDOW_S stops it for good.
CRASH_WINDOW_S = 60.0


class CollectorError(EdgeshipError):
    """The collector's loop stopped for good; the text says why (restart the process)."""

log = logging.getLogger("edgeship.fleet.collector")


def classify_error(exc: protocol.MessageError) -> str:
    """Reason bucket for a rejected message (pure: the error's own reason, else from its text)."""
    if getattr(exc, "reason", None):
        return exc.reason
    text = str(exc)
    if "exceeds" in text:
        return "oversized"
    if "not valid JSON" in text or "not a JSON object" in text:
        return "malformed"
    if "does not match topic device" in text:
        return "spoofed"
    if text.startswith("schema") or "topic" in text and "not an edgeship" in text:
        return "wrong_schema"
    return "invalid"


def _transient(exc: BaseException) -> bool:
    """A DB error worth retrying (locked, disk, connection) rather than a message the DB refuses."""
    if not isinstance(exc, FleetDBError):
        return False  # e.g. OverflowError from the driver: about the message, not the DB
    cause = exc.__cause__
    return cause is None or any(c.__name__ in ("OperationalError", "InterfaceError") for c in type(cause).__mro__)


class Collector(Loop):
    """``start()`` / ``stop(timeout)``; ``stats()`` for counters."""

    def __init__(self, db: Any, link_or_broker_url: MqttLink | str, fleet: str, share_group: str | None = None, *,
                 client_id: str | None = None, batch_max: int = 500, batch_wait_s: float = 0.05,
                 protocol_version: str = "3.1.1", link_options: LinkOptions | None = None,
                 skew: protocol.Skew | None = None, max_crashes: int | None = None,
                 max_dead_letters: int = 100_000, receipts: bool = True, receipt_delay_s: float = 1.0) -> None:
        if not protocol.valid_id(fleet):
            raise protocol.MessageError(f"fleet {fleet!r} is not a valid id")
        super().__init__(f"collector-{fleet}")
        self.db = db
        self.fleet = fleet
        self.share_group = share_group
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self.skew = skew or protocol.Skew()
        self.max_crashes = max_crashes
        self.max_dead_letters = max_dead_letters
        self.receipts = receipts
        # Receipts wait up to receipt_delay_s to gather more ids per device: one publish per device
        # per batch cost a third of the ingest CPU with 200 devices in a flood. Bounded: at
        # _RECEIPTS_HELD ids they go at once. Devices wait [outbox] receipt_timeout_s (30 s) first.
        self.receipt_delay_s = receipt_delay_s
        self._held: dict[str, list[str]] = {}
        self._held_n = 0
        self._held_since: float | None = None
        self._announced_gen: int | None = None
        self.filters = protocol.subscriptions(fleet, share_group=share_group)
        if isinstance(link_or_broker_url, str):
            cid = client_id or f"edgeship-collector-{fleet}-{share_group or socket.gethostname()}"[:64]
            base = link_options or LinkOptions()
            self.link = MqttLink(link_or_broker_url, LinkOptions(**{
                **base.__dict__, "client_id": cid, "persistent_session": True, "manual_ack": True,
                "protocol": protocol_version if link_options is None else base.protocol,
                "subscriptions": tuple((f, 1) for f in self.filters)}))
            self._own_link = True
        else:
            self.link = link_or_broker_url
            for f in self.filters:
                self.link.subscribe(f, 1)
            self._own_link = False
        self.counters: dict[str, int] = {"received": 0, "stored": 0, "duplicates": 0, "rejected": 0,
                                         "db_errors": 0, "crashes": 0, "receipts": 0, "receipted": 0,
                                         "receipt_errors": 0}
        self.rejected: dict[str, int] = {}
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._batch: list[Inbound] = []  # received, not yet acknowledged (kept across a loop restart)
        self._dead_since_prune = 0
        # self.error (the Loop's): why the loop stopped for good (see check())

    def _on_start(self) -> None:
        if self._own_link:
            self.link.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        stopped = super().stop(timeout)
        if stopped:
            self._release_receipts(force=True)  # what the loop stored; the link flushes them below
        if self._own_link:
            self.link.stop(timeout)
        return stopped

    def wait_ready(self, timeout: float) -> bool:
        """True once connected and subscribed."""
        return self.link.wait_connected(timeout)

    def check(self) -> None:
        """Raise :class:`CollectorError` if the loop stopped on its own; call it from the process's main loop."""
        if self._thread is not None and not self._thread.is_alive() and not self.stopping:
            raise CollectorError(f"the collector stopped: {self.error or 'its thread ended'}; "
                                 "see the log above, then restart it (no message was acknowledged unstored)")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counters, "rejected_by_reason": dict(self.rejected), "alive": self.alive,
                    "error": self.error, "link": self.link.health()}

    # ------------------------------------------------------------ processing
    def process(self, items: list[Any]) -> dict[str, list[str]]:
        """Validate and store one batch of :class:`edgeship.mqtt.Inbound` (also used by benchmarks).

        Returns the msg_ids now durable (stored, duplicate or dead letter) by device: what the
        receipts confirm. Raises only :class:`FleetDBError` for a DB that is unavailable (the
        caller retries the batch); every other failure is about one message and makes it a dead letter.
        """
        good: list[tuple[protocol.Message, Any]] = []
        dead: list[dict] = []
        done: dict[str, list[str]] = {}
        for it in items:
            try:
                msg = protocol.parse_message(it.topic, it.payload, received=getattr(it, "received", None),
                                             skew=self.skew)
                if msg.fleet != self.fleet or msg.kind == "plan":
                    raise protocol.MessageError(f"topic {it.topic[:120]!r} is not a device topic of fleet {self.fleet!r}")
                good.append((msg, it))
            except protocol.MessageError as exc:
                dead.append(self._dead_letter(classify_error(exc), it, exc))
            except Exception as exc:  # noqa: BLE001 - one message must never stop ingestion (module docstring)
                dead.append(self._dead_letter("internal", it, exc))
        if good:
            try:
                self._count(self.db.store_messages([m for m, _ in good]))
            except Exception as exc:  # noqa: BLE001 - sorted out below: DB down, or one message refused
                if _transient(exc):
                    raise  # the DB is unavailable: the caller retries the batch, nothing is acked
                # One message the DB refuses (e.g. a NUL character PostgreSQL will not store) must not
                # block its batch forever: store one by one and reject only what fails alone.
                for m, it in good:
                    try:
                        self._count(self.db.store_messages([m]))
                    except Exception as one:  # noqa: BLE001 - as above
                        if _transient(one):
                            raise
                        dead.append(self._dead_letter("unstorable", it, one))
        for m, _ in good:
            done.setdefault(m.device, []).append(m.msg_id)
        if dead:
            # Stored before the batch is acked; if this fails the whole batch is retried.
            self.db.store_dead_letters(dead)
            with self._lock:
                self.counters["rejected"] += len(dead)
                for d in dead:
                    self.rejected[d["reason"]] = self.rejected.get(d["reason"], 0) + 1
            self._dead_since_prune += len(dead)
            if self._dead_since_prune >= 1000:  # bounded table: a hostile flood cannot fill the disk
                self._dead_since_prune = 0
                self.db.dead_letters_prune(self.max_dead_letters)
            for d in dead:
                if d["device"] and d["msg_id"]:
                    done.setdefault(d["device"], []).append(d["msg_id"])
        return done

    def _hold_receipts(self, done: dict[str, list[str]]) -> None:
        for device, ids in done.items():
            self._held.setdefault(device, []).extend(ids)
            self._held_n += len(ids)
        if self._held_since is None and self._held_n:
            self._held_since = time.monotonic()
        self._release_receipts()

    def _release_receipts(self, force: bool = False) -> None:
        if self._held_since is None or not (force or self._held_n >= _RECEIPTS_HELD
                                            or time.monotonic() - self._held_since >= self.receipt_delay_s):
            return
        held, self._held, self._held_n, self._held_since = self._held, {}, 0, None
        self._send_receipts(held)

    def _send_receipts(self, done: dict[str, list[str]]) -> None:
        """Tell each device what is durable now (after the commit). A lost receipt costs a resend only."""
        for device, ids in done.items():
            ids = list(dict.fromkeys(ids))  # one batch may hold a message and its resent copy
            for i in range(0, len(ids), protocol.MAX_RECEIPT_IDS):
                chunk = ids[i:i + protocol.MAX_RECEIPT_IDS]
                try:
                    h = self.link.publish(protocol.receipt_topic(self.fleet, device),
                                          protocol.encode(protocol.make_receipt(device, chunk)), qos=1)
                    ok = not h.failed()
                except EdgeshipError as exc:  # TransportError, or MessageError from a bad device id
                    log.warning("receipt for %s not sent: %s", device[:80], exc)
                    ok = False
                with self._lock:
                    if ok:
                        self.counters["receipts"] += 1
                        self.counters["receipted"] += len(chunk)
                    else:
                        self.counters["receipt_errors"] += 1

    def _announce(self) -> None:
        """Keep the retained announcement on the broker: again after each reconnection, because a
        broker without persistence forgets retained messages when it restarts."""
        gen = self.link.generation
        if not self.receipts or not self.link.connected or gen == self._announced_gen:
            return
        try:
            self.link.publish(protocol.collector_topic(self.fleet),
                              protocol.encode(protocol.make_announcement(True)), qos=1, retain=True)
            self._announced_gen = gen
        except EdgeshipError as exc:
            log.warning("collector announcement not sent: %s", exc)

    def _count(self, res: Any) -> None:
        with self._lock:
            self.counters["stored"] += res.stored
            self.counters["duplicates"] += res.duplicates

    def _dead_letter(self, reason: str, it: Any, exc: BaseException) -> dict:
        topic_name = str(getattr(it, "topic", ""))
        detail = f"{type(exc).__name__}: {exc}" if not isinstance(exc, EdgeshipError) else str(exc)
        # One line per bad message, truncated: a hostile sender must not flood the log with its payload.
        log.warning("rejected message (%s) on %s: %s", reason, topic_name[:160], " ".join(detail[:200].split()))
        payload = getattr(it, "payload", b"")
        # Whom to receipt: the device of the topic (the broker's ACL says who may publish there) and
        # the msg_id if one can be read — else nothing, and the sender resends it until it expires.
        parts = topic_name.split("/")
        device = parts[4] if (len(parts) == 6 and parts[2] == self.fleet and parts[3] == "devices"
                              and protocol.valid_id(parts[4])) else None
        msg_id = protocol.envelope_msg_id(bytes(payload)) if device and len(payload) <= protocol.MAX_PAYLOAD else None
        return {"received": float(getattr(it, "received", None) or time.time()), "topic": topic_name[:512],
                "reason": reason, "detail": detail[:1000], "size": len(payload),
                "payload": bytes(payload[:DEAD_LETTER_PAYLOAD]), "device": device, "msg_id": msg_id}

    def run(self) -> None:
        crashes: list[float] = []
        while not self.stopping:
            try:
                self._loop()
                return
            except Exception as exc:  # noqa: BLE001 - a loop that dies quietly is the failure to avoid
                now = time.monotonic()
                crashes = [t for t in crashes if now - t < CRASH_WINDOW_S] + [now]
                why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                with self._lock:
                    self.counters["crashes"] += 1
                if self.max_crashes is not None and len(crashes) > self.max_crashes:
                    self.error = f"{len(crashes)} failures within {CRASH_WINDOW_S:.0f} s, the last: {why}"
                    log.error("collector gave up: %s", self.error)
                    return
                pause = min(30.0, 0.5 * 2 ** (len(crashes) - 1))
                log.error("collector loop failed, restarting in %.1f s with the same batch: %s", pause, why)
                self.wait(pause)

    def _loop(self) -> None:
        while not self.stopping:
            self._announce()
            if not self._batch:
                self._batch = self._next_batch()
                if not self._batch:
                    continue
                with self._lock:
                    self.counters["received"] += len(self._batch)
            batch = self._batch
            while True:
                try:
                    done = self.process(batch)
                    break
                except FleetDBError as exc:
                    # Not acknowledged yet: retry the same batch (the ledger makes a partial earlier
                    # attempt harmless); on stop, the broker redelivers it to the next session.
                    with self._lock:
                        self.counters["db_errors"] += 1
                    log.error("collector could not store %d messages (retrying): %s", len(batch), exc)
                    if self.wait(1.0):
                        return
            # Ack only after the commit: see the module docstring. The batch is forgotten only
            # once acked, so a failure in between retries it (a no-op for the ledger).
            for it in batch:
                self.link.ack(it)
            self._batch = []
            if self.receipts:
                self._hold_receipts(done)

    def _next_batch(self) -> list[Inbound]:
        first = self.link.get(timeout=0.2)
        self._release_receipts()
        if first is None:
            self._idle.set()
            return []
        self._idle.clear()
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.batch_max:
            it = self.link.get_nowait()
            if it is None:
                if time.monotonic() >= deadline:
                    break
                it = self.link.get(timeout=max(0.0, deadline - time.monotonic()))
                if it is None:
                    break
            batch.append(it)
        return batch
