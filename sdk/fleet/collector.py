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
device speaking for another) is counted under a reason, logged in one line,
acknowledged (a redelivery would be just as bad) and skipped; it never stops
the collector.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from .. import protocol
from ..errors import FleetDBError
from ..lifecycle import STOP_TIMEOUT_S, Loop
from ..mqtt import LinkOptions, MqttLink

__all__ = ["Collector", "classify_error"]

log = logging.getLogger("edgeship.fleet.collector")


def classify_error(exc: protocol.MessageError) -> str:
    """Reason bucket for a rejected message (pure: from the error text)."""
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
    cause = exc.__cause__
    return cause is None or any(c.__name__ in ("OperationalError", "InterfaceError") for c in type(cause).__mro__)


class Collector(Loop):
    """``start()`` / ``stop(timeout)``; ``stats()`` for counters."""

    def __init__(self, db: Any, link_or_broker_url: MqttLink | str, fleet: str, share_group: str | None = None, *,
                 client_id: str | None = None, batch_max: int = 500, batch_wait_s: float = 0.05,
                 protocol_version: str = "3.1.1", link_options: LinkOptions | None = None) -> None:
        if not protocol.valid_id(fleet):
            raise protocol.MessageError(f"fleet {fleet!r} is not a valid id")
        super().__init__(f"collector-{fleet}")
        self.db = db
        self.fleet = fleet
        self.share_group = share_group
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
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
                                         "db_errors": 0}
        self.rejected: dict[str, int] = {}
        self._lock = threading.Lock()
        self._idle = threading.Event()

    def _on_start(self) -> None:
        if self._own_link:
            self.link.start()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        stopped = super().stop(timeout)
        if self._own_link:
            self.link.stop(timeout)
        return stopped

    def wait_ready(self, timeout: float) -> bool:
        """True once connected and subscribed."""
        return self.link.wait_connected(timeout)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counters, "rejected_by_reason": dict(self.rejected), "link": self.link.health()}

    # ------------------------------------------------------------ processing
    def process(self, items: list[Any]) -> None:
        """Validate and store one batch of :class:`edgeship.mqtt.Inbound` (also used by benchmarks)."""
        good: list[protocol.Message] = []
        for it in items:
            try:
                msg = protocol.parse_message(it.topic, it.payload)
                if msg.fleet != self.fleet or msg.kind == "plan":
                    raise protocol.MessageError(f"topic {it.topic[:120]!r} is not a device topic of fleet {self.fleet!r}")
                good.append(msg)
            except protocol.MessageError as exc:
                self._reject(classify_error(exc), it.topic, exc)
        if not good:
            return
        try:
            self._count(self.db.store_messages(good))
        except FleetDBError as exc:
            if _transient(exc):
                raise  # the DB is unavailable: the caller retries the batch, nothing is acked
            # One message the DB refuses (e.g. a NUL character PostgreSQL will not store) must not
            # block its batch forever: store one by one and reject only what fails alone.
            for m in good:
                try:
                    self._count(self.db.store_messages([m]))
                except FleetDBError as one:
                    if _transient(one):
                        raise
                    self._reject("unstorable", protocol.device_topic(m.fleet, m.device, m.kind), one)

    def _count(self, res: Any) -> None:
        with self._lock:
            self.counters["stored"] += res.stored
            self.counters["duplicates"] += res.duplicates

    def _reject(self, reason: str, topic_name: str, exc: Exception) -> None:
        with self._lock:
            self.counters["rejected"] += 1
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
        # One line per bad message, truncated: a hostile sender must not flood the log with its payload.
        log.warning("rejected message (%s) on %s: %s", reason, topic_name[:160], str(exc)[:200])

    def run(self) -> None:
        while not self.stopping:
            first = self.link.get(timeout=0.2)
            if first is None:
                self._idle.set()
                continue
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
            with self._lock:
                self.counters["received"] += len(batch)
            while True:
                try:
                    self.process(batch)
                    break
                except FleetDBError as exc:
                    # Not acknowledged yet: retry the same batch (the ledger makes a partial earlier
                    # attempt harmless); on stop, the broker redelivers it to the next session.
                    with self._lock:
                        self.counters["db_errors"] += 1
                    log.error("collector could not store %d messages (retrying): %s", len(batch), exc)
                    if self.wait(1.0):
                        return
            # Ack only after the commit: see the module docstring.
            for it in batch:
                self.link.ack(it)
