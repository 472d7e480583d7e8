"""Store-and-forward outbox: every outgoing message is on disk before it is sent.

:class:`Outbox` is an SQLite file in WAL mode (``state_dir/outbox.sqlite``).
A message is *accepted* once :meth:`Outbox.put` returns: it then survives a
SIGKILL of the agent and is deleted only once delivery is confirmed — so
delivery is at least once, and the collector's de-duplication on (device,
msg_id) makes storage exactly once. Confirmed means, in one of two modes:

* **receipts** (the fleet's collector announced it sends them): the
  collector's end-to-end receipt listing the row's msg_id, sent once the
  message is committed to the fleet DB (or kept as a dead letter). The
  broker's PUBACK only starts the row's resend timer (``receipt_timeout_s``,
  doubling per try up to ``receipt_backoff_cap_s``): a broker that loses what
  it acknowledged (no persistence, a restart, amqtt) costs a resend, not the
  message. Rows wait on disk while the collector is down.
* **PUBACK** (no announcement seen: an older collector that never sends
  receipts): the row goes on the broker's PUBACK, as before receipts existed,
  so such a fleet's outboxes do not fill up waiting for receipts. The outbox
  remembers the mode (``outbox_meta``), so a restarted agent does not fall
  back to PUBACK before it hears the announcement again.

Bounded on disk (``max_bytes``): when a new message does not fit, the oldest
*telemetry* rows are dropped first (a telemetry window is a summary; losing an
old one costs little); feedback, rollout reports and state are never dropped
by that policy. Drops are counted (persisted) and reported in the next
telemetry window via :meth:`Outbox.take_dropped`. A ``state`` message
replaces any unsent older state (the newest one is the only one that matters,
it is retained). Non-telemetry messages may go past ``max_bytes`` up to
``hard_max_bytes``; beyond that ``put`` raises :class:`TransportError`
rather than fill the disk.

:class:`Forwarder` is the thread that pumps the outbox into an
:class:`edgeship.mqtt.MqttLink`, in order, with a bounded in-flight window and
a token-bucket rate limit so a long outage does not flood the broker.
"""
from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .. import protocol
from ..errors import ConfigError, TransportError
from ..lifecycle import Loop
from .disk import is_disk_full

__all__ = ["Outbox", "OutboxRow", "Forwarder", "TokenBucket", "DROPPABLE_KINDS"]

log = logging.getLogger("edgeship.agent.outbox")

# Only these kinds may be dropped to make room. Feedback, rollout reports and
# state are what the fleet needs to act on; telemetry is a summary.
DROPPABLE_KINDS = ("telemetry",)
_ROW_OVERHEAD = 64  # bytes counted per row on top of topic + payload (ids, columns, index)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_kind ON outbox(kind, id);
CREATE TABLE IF NOT EXISTS outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# Receipts (added later: ALTERed into older files). ``due`` = 0: never acknowledged by the broker;
# otherwise the wall-clock time the row is resent unless its receipt came first (wall clock, so the
# timer survives an agent restart). Both indexes are partial and hold only rows awaiting a receipt,
# so a put (due = 0) pays for neither: a full index on msg_id cost 40 % more CPU per put (#21 A/B).
# The full one of older files is dropped.
_RECEIPT_COLUMNS = (("msg_id", "TEXT"), ("due", "REAL NOT NULL DEFAULT 0"), ("tries", "INTEGER NOT NULL DEFAULT 0"))
_RECEIPT_INDEXES = """
DROP INDEX IF EXISTS outbox_msg_id;
CREATE INDEX IF NOT EXISTS outbox_msg_id_awaiting ON outbox(msg_id) WHERE due > 0;
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(due) WHERE due > 0;
"""


@dataclass(frozen=True)
class OutboxRow:
    id: int
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool


class TokenBucket:
    """Pure rate limiter: ``rate`` tokens/s, bursts up to ``burst``. ``rate <= 0`` means unlimited."""

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, rate))
        self.tokens = self.burst
        self.t = now

    def take(self, now: float, n: float = 1.0) -> float:
        """Take ``n`` tokens if available and return 0, else return seconds to wait (nothing taken)."""
        if self.rate <= 0:
            return 0.0
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


class Outbox:
    """Durable FIFO of outgoing MQTT messages. Thread-safe; one per state directory."""

    def __init__(self, path: str | Path, max_bytes: int = 50 * 1024 * 1024, *,
                 hard_max_bytes: int | None = None) -> None:
        if max_bytes < 4096:
            raise ConfigError(f"[outbox] max_bytes: must be >= 4096, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = int(max_bytes)
        self.hard_max_bytes = int(hard_max_bytes if hard_max_bytes is not None else 2 * max_bytes)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._new = threading.Event()
        try:
            # check_same_thread=False: the lock below serialises every use.
            self._db = sqlite3.connect(str(self.path), timeout=10, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # Durability trade-off: in WAL mode synchronous=NORMAL does not fsync
            # on every commit, only at checkpoints. A committed put() is in the
            # WAL file in the OS page cache, so it survives a crash or SIGKILL of
            # the agent (the guarantee we test); a power cut may lose the last
            # commits since the last checkpoint, but never corrupts the file.
            # FULL would fsync each put (~100/s on an SD card) and miss the
            # 5,000/s target by far.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(outbox)")}
            for col, decl in _RECEIPT_COLUMNS:
                if col not in have:
                    self._db.execute(f"ALTER TABLE outbox ADD COLUMN {col} {decl}")
            self._db.executescript(_RECEIPT_INDEXES)
            m = self._db.execute("SELECT value FROM outbox_meta WHERE key='receipts'").fetchone()
            self._receipt_mode: bool | None = None if m is None else bool(m[0])
            row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM outbox").fetchone()
            self._bytes, self._count = int(row[0]), int(row[1])
            d = self._db.execute("SELECT value FROM outbox_meta WHERE key='dropped_unreported'").fetchone()
            self._dropped_unreported = int(d[0]) if d else 0
        except sqlite3.Error as exc:
            raise TransportError(f"outbox {self.path} cannot be opened: {exc}; "
                                 "delete it if the disk was full or the file is corrupt") from exc
        self.dropped_total = 0
        self.closed = False
        self.disk_error: str | None = None  # set while writes fail for lack of space (health, telemetry)
        self.disk_full_count = 0

    # ------------------------------------------------------------ writing
    def put(self, kind: str, topic: str, payload: bytes, retain: bool = False, qos: int = 1) -> int:
        """Store one message durably; returns its id. Fast path: one small transaction."""
        size = len(payload) + len(topic) + _ROW_OVERHEAD
        msg_id = protocol.envelope_msg_id(payload)  # what a receipt names
        if size > self.max_bytes:
            raise TransportError(f"message of {size} bytes is larger than the outbox ({self.max_bytes} bytes)")
        now = time.time()
        with self._lock:
            self._check_open()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    dropped = 0
                    if kind == "state":
                        # Only the newest state matters (retained): drop unsent older ones on the topic.
                        cur = self._db.execute("SELECT COALESCE(SUM(size),0), COUNT(*) FROM outbox "
                                               "WHERE kind='state' AND topic=?", (topic,))
                        b, c = cur.fetchone()
                        if c:
                            self._db.execute("DELETE FROM outbox WHERE kind='state' AND topic=?", (topic,))
                            self._bytes -= int(b)
                            self._count -= int(c)
                    if self._bytes + size > self.max_bytes:
                        dropped = self._make_room(size)
                        if self._bytes + size > self.max_bytes:
                            if kind in DROPPABLE_KINDS:
                                # Nothing droppable left: the new telemetry itself is the one dropped.
                                self._count_dropped(dropped + 1)
                                self._db.execute("COMMIT")
                                return -1
                            if self._bytes + size > self.hard_max_bytes:
                                raise TransportError(
                                    f"outbox {self.path} is full ({self._bytes} bytes of feedback/rollout/state "
                                    f"waiting, hard limit {self.hard_max_bytes}); the broker has been unreachable "
                                    "too long — check [mqtt] broker or raise [outbox] max_bytes")
                    cur = self._db.execute(
                        "INSERT INTO outbox(kind, topic, payload, qos, retain, size, created, msg_id) "
                        "VALUES (?,?,?,?,?,?,?,?)", (kind, topic, payload, int(qos), int(bool(retain)), size, now, msg_id))
                    if dropped:
                        self._count_dropped(dropped)
                    self._db.execute("COMMIT")
                except BaseException:
                    # SQLite has already rolled back after some errors (SQLITE_FULL): a second
                    # ROLLBACK would raise "no transaction is active" and hide the real error.
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                self._reload_totals()
                if is_disk_full(exc):
                    self.disk_error = f"the state disk is full: outbox {self.path} cannot store a {kind} message"
                    self.disk_full_count += 1
                    raise TransportError(f"{self.disk_error} ({exc}); free space on {self.path.parent}") from exc
                raise TransportError(f"outbox {self.path} refused a write: {exc}") from exc
            self.disk_error = None
            self._bytes += size
            self._count += 1
            rowid = int(cur.lastrowid)
        self._new.set()
        return rowid

    def _make_room(self, size: int) -> int:
        """Delete oldest droppable rows until ``size`` fits (inside the caller's transaction)."""
        need = self._bytes + size - self.max_bytes
        dropped = 0
        while need > 0:
            rows = self._db.execute(
                f"SELECT id, size FROM outbox WHERE kind IN ({','.join('?' * len(DROPPABLE_KINDS))}) "
                "ORDER BY id LIMIT 256", DROPPABLE_KINDS).fetchall()
            if not rows:
                break
            ids = []
            for rid, rsize in rows:
                ids.append(rid)
                need -= rsize
                self._bytes -= rsize
                self._count -= 1
                if need <= 0:
                    break
            self._db.execute(f"DELETE FROM outbox WHERE id IN ({','.join('?' * len(ids))})", ids)
            dropped += len(ids)
        return dropped

    def _count_dropped(self, n: int) -> None:
        self._dropped_unreported += n
        self.dropped_total += n
        self._db.execute("INSERT INTO outbox_meta(key, value) VALUES ('dropped_unreported', ?) "
                         "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (self._dropped_unreported,))

    def take_dropped(self) -> int:
        """Drops not yet reported; resets the count (call when building a telemetry window)."""
        with self._lock:
            self._check_open()
            n = self._dropped_unreported
            if n:
                self._dropped_unreported = 0
                self._db.execute("UPDATE outbox_meta SET value=0 WHERE key='dropped_unreported'")
            return n

    def restore_dropped(self, n: int) -> None:
        """Give back a count taken by :meth:`take_dropped` whose report could not be stored."""
        if n <= 0:
            return
        with self._lock:
            self._check_open()
            self._count_dropped(n)
            self.dropped_total -= n

    # ------------------------------------------------------------ reading / acking
    def peek(self, after_id: int = 0, limit: int = 100) -> list[OutboxRow]:
        """Oldest messages never acknowledged by the broker with id > ``after_id``, in order."""
        return self._select("id > ? AND due = 0 ORDER BY id LIMIT ?", (after_id, limit))

    def last_id(self) -> int:
        """The newest row's id (0 when empty); every later put gets a larger one (AUTOINCREMENT)."""
        with self._lock:
            self._check_open()
            return int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM outbox").fetchone()[0])

    def due_rows(self, now: float, limit: int = 100) -> list[OutboxRow]:
        """Rows whose receipt did not come in time (their resend time is <= ``now``), oldest timer first."""
        return self._select("due > 0 AND due <= ? ORDER BY due LIMIT ?", (now, limit))

    def _select(self, where: str, params: tuple) -> list[OutboxRow]:
        with self._lock:
            self._check_open()
            rows = self._db.execute(f"SELECT id, kind, topic, payload, qos, retain FROM outbox WHERE {where}",
                                    params).fetchall()
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4], bool(r[5])) for r in rows]

    def ack(self, ids: list[int]) -> None:
        """Delete acknowledged messages by row id (after the broker's PUBACK, in PUBACK mode)."""
        self._delete("id", ids)

    def confirm(self, msg_ids: list[str]) -> int:
        """Delete the rows a receipt names; returns how many there were (unknown/repeated ids: 0)."""
        if not msg_ids:
            return 0
        ids: list[int] = []
        with self._lock:
            self._check_open()
            for i in range(0, len(msg_ids), 500):
                chunk = msg_ids[i:i + 500]
                marks = ",".join("?" * len(chunk))
                found = self._db.execute(f"SELECT id, msg_id FROM outbox WHERE due > 0 AND msg_id IN ({marks})",
                                         chunk).fetchall()
                left = set(chunk).difference(m for _, m in found)
                if left:
                    # Outside the partial index: a receipt that overtook its row's PUBACK (due still 0),
                    # or an id already confirmed or never ours. A scan, at most one per receipt batch.
                    found += self._db.execute(
                        f"SELECT id, msg_id FROM outbox WHERE due = 0 AND msg_id IN ({','.join('?' * len(left))})",
                        list(left)).fetchall()
                ids += (r for r, _ in found)
        return self._delete("id", ids)

    def _delete(self, column: str, keys: list) -> int:
        if not keys:
            return 0
        gone = 0
        with self._writing("a delete"):
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                marks = ",".join("?" * len(chunk))
                b, c = self._db.execute(
                    f"SELECT COALESCE(SUM(size),0), COUNT(*) FROM outbox WHERE {column} IN ({marks})",
                    chunk).fetchone()
                self._db.execute(f"DELETE FROM outbox WHERE {column} IN ({marks})", chunk)
                self._bytes -= int(b)
                self._count -= int(c)
                gone += int(c)
        return gone

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """One write transaction under the lock; an SQLite error rolls back and is a TransportError."""
        with self._lock:
            self._check_open()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                self._reload_totals()
                raise TransportError(f"outbox {self.path} refused {what}: {exc}") from exc

    def mark_sent(self, ids: list[int], now: float, timeout_s: float, cap_s: float) -> None:
        """Receipt mode: the broker has these rows; resend each unless its receipt comes in time.

        Try k (from 0) waits ``min(cap_s, timeout_s * 2**k)``: a collector that is down for long
        is asked at most every ``cap_s``, and the outbox bound still holds (rows stay counted).
        """
        with self._writing("an update"):
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                self._db.execute(
                    f"UPDATE outbox SET due = ? + MIN(?, ? * (1 << MIN(tries, 20))), tries = tries + 1 "
                    f"WHERE id IN ({','.join('?' * len(chunk))})", (now, cap_s, timeout_s, *chunk))

    def next_due(self) -> float | None:
        """Earliest resend time of a row awaiting its receipt (None: no such row)."""
        with self._lock:
            self._check_open()
            row = self._db.execute("SELECT MIN(due) FROM outbox WHERE due > 0").fetchone()
        return None if row[0] is None else float(row[0])

    @property
    def receipt_mode(self) -> bool | None:
        """True: delete on receipts; False: on PUBACK (announced no receipts); None: never heard (PUBACK)."""
        return self._receipt_mode

    def set_receipt_mode(self, on: bool) -> None:
        """Remember the mode; leaving receipt mode sends every row awaiting a receipt again (at least once)."""
        if self._receipt_mode is on:
            return
        with self._writing("an update"):
            self._db.execute("INSERT INTO outbox_meta(key, value) VALUES ('receipts', ?) "
                             "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (int(on),))
            if not on:
                self._db.execute("UPDATE outbox SET due = 0 WHERE due > 0")
        self._receipt_mode = on

    def wait_new(self, timeout: float) -> bool:
        hit = self._new.wait(timeout)
        self._new.clear()
        return hit

    def stats(self) -> dict[str, Any]:
        with self._lock:
            kinds = {} if self.closed else dict(self._db.execute(
                "SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall())
        return {"pending": self._count, "bytes": self._bytes, "max_bytes": self.max_bytes,
                "dropped_total": self.dropped_total, "dropped_unreported": self._dropped_unreported,
                "by_kind": kinds}

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                self._db.close()

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise TransportError(f"outbox {self.path} is closed")

    def _reload_totals(self) -> None:
        try:
            b, c = self._db.execute("SELECT COALESCE(SUM(size),0), COUNT(*) FROM outbox").fetchone()
            self._bytes, self._count = int(b), int(c)
        except sqlite3.Error:
            pass


class Forwarder(Loop):
    """Pumps the outbox into an MqttLink: in order, ``window`` in flight, ``rate`` msgs/s.

    Rows are confirmed on PUBACK, or — once the fleet's collector announced
    receipts (module docstring) — on the collector's receipt, with a resend of
    each row whose receipt is late. After a reconnection (link generation
    changes) everything not yet acknowledged by the broker is published again
    from the oldest, so a message may reach the broker twice — never zero
    times; the collector de-duplicates on (device, msg_id).

    Receipts need ``fleet`` and ``device`` (to subscribe to the device's
    receipt topic and the collector's announcement); without them, or with a
    link that cannot route, the forwarder stays in PUBACK mode.
    """

    def __init__(self, outbox: Outbox, link: Any, *, rate: float = 200.0, window: int = 100,
                 ack_flush_s: float = 0.05, fleet: str | None = None, device: str | None = None,
                 receipt_timeout_s: float = 30.0, receipt_backoff_cap_s: float = 600.0,
                 announce_wait_s: float = 0.5) -> None:
        super().__init__("outbox-forwarder")
        self.outbox = outbox
        self.link = link
        self.bucket = TokenBucket(rate, burst=max(1.0, rate / 5) if rate > 0 else None, now=time.monotonic())
        self.window = max(1, int(window))
        self.ack_flush_s = ack_flush_s
        self.device = device
        self.receipt_timeout_s = float(receipt_timeout_s)
        self.receipt_backoff_cap_s = max(float(receipt_backoff_cap_s), self.receipt_timeout_s)
        self.announce_wait_s = float(announce_wait_s)
        self._receipts: Any = None
        self._announcements: Any = None
        if fleet and device and hasattr(link, "route"):
            self._receipts = link.route(protocol.receipt_topic(fleet, device), 1)
            self._announcements = link.route(protocol.collector_topic(fleet), 1)
        self.sent = 0
        self.acked = 0
        self.resends = 0
        self.receipts = {"received": 0, "confirmed": 0, "unknown_ids": 0, "rejected": 0}
        self.last_error: str | None = None

    def health(self) -> dict[str, Any]:
        mode = self.outbox.receipt_mode
        return {"alive": self.alive, "sent": self.sent, "acked": self.acked, "resends": self.resends,
                "confirm_on": "receipt" if mode else "puback", "receipts": dict(self.receipts),
                "last_error": self.last_error}

    def drain(self, timeout: float) -> bool:
        """Wait until the outbox is empty (everything confirmed); True if it is."""
        deadline = time.monotonic() + timeout
        while len(self.outbox) > 0:
            if time.monotonic() > deadline:
                return False
            self.wait(0.02)
        return True

    @property
    def _receipt_mode(self) -> bool:
        return self._receipts is not None and bool(self.outbox.receipt_mode)

    def run(self) -> None:
        inflight: deque[tuple[int, Any]] = deque()
        acked: list[int] = []
        cursor = 0
        gen = None
        gen_since = time.monotonic()
        last_flush = time.monotonic()
        next_due_check = 0.0
        while not self.stopping:
            try:
                if self._take_receipts():
                    cursor = 0  # rows that awaited receipts are to be sent again from the oldest
                if not self.link.connected:
                    # Whatever was in flight is unconfirmed: resend from the oldest row later.
                    if inflight:
                        inflight.clear()
                    cursor, gen = 0, None
                    self._flush(acked)
                    self.wait(0.05)
                    continue
                if gen != self.link.generation:
                    if gen is not None:
                        self.resends += len(inflight)
                    inflight.clear()
                    cursor, gen, gen_since = 0, self.link.generation, time.monotonic()
                if (self._receipts is not None and self.outbox.receipt_mode is None
                        and time.monotonic() - gen_since < self.announce_wait_s):
                    # Never heard whether the collector sends receipts: give its retained
                    # announcement a moment to arrive before deleting anything on PUBACK.
                    self.wait(0.02)
                    continue
                # Collect completed acks in order (stop at the first pending one: ordering is per
                # connection, so a later ack implies nothing about an earlier pending one).
                while inflight and inflight[0][1].acked():
                    acked.append(inflight.popleft()[0])
                    self.acked += 1
                if inflight and inflight[0][1].failed():
                    rid, h = inflight.popleft()
                    self.last_error = f"publish of outbox row {rid} refused: {h.error}"
                    inflight.clear()
                    cursor = 0  # try again from the oldest, after a pause (paho's queue may be full)
                    self.wait(0.2)
                    continue
                now = time.monotonic()
                if acked and (len(acked) >= 256 or now - last_flush >= self.ack_flush_s):
                    self._flush(acked)
                    last_flush = now
                room = self.window - len(inflight)
                if room > 0:
                    top = self.outbox.last_id() if self._receipt_mode else 0
                    rows = self.outbox.peek(cursor, room)
                    fresh = len(rows)
                    if len(rows) < room and self._receipt_mode and now >= next_due_check:
                        # Late receipts: resend (bounded by the window and the rate limit).
                        busy = {rid for rid, _ in inflight}
                        rows += [r for r in self.outbox.due_rows(time.time(), room - len(rows)) if r.id not in busy]
                        next_due_check = now + 0.25
                    wait = 0.0
                    for i, row in enumerate(rows):
                        wait = self.bucket.take(time.monotonic())
                        if wait > 0:
                            break
                        inflight.append((row.id, self.link.publish(row.topic, row.payload, qos=row.qos,
                                                                   retain=row.retain)))
                        if i < fresh:
                            cursor = row.id
                        else:
                            self.resends += 1
                        self.sent += 1
                    else:
                        if fresh < room and top:
                            # Every fresh row up to ``top`` is out: skip the rows awaiting receipts
                            # below it, or each peek would scan them all again (a long outage
                            # leaves many; ids only grow, so a later put lands above ``top``).
                            cursor = max(cursor, top)
                    if not rows and not inflight:
                        self._flush(acked)
                        last_flush = time.monotonic()
                        # Awaiting receipts: look at the receipt queue often; else sleep until a put.
                        self.outbox.wait_new(0.05 if len(self.outbox) else 0.2)
                        continue
                    if rows and wait > 0:
                        self.wait(min(wait, 0.2))
                        continue
                if inflight:
                    self.link.wait_ack_activity(0.02)
            except TransportError as exc:
                self.last_error = str(exc)
                log.warning("outbox forwarder: %s", exc)
                self.wait(0.5)
            except Exception as exc:  # noqa: BLE001 - keep pumping; record why
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("outbox forwarder error")
                self.wait(0.5)
        # Final: collect acks that already arrived so they are not resent.
        while inflight and inflight[0][1].acked():
            acked.append(inflight.popleft()[0])
        try:
            self._flush(acked)
            self._take_receipts()
        except TransportError as exc:
            log.warning("outbox forwarder: %s", exc)

    def _take_receipts(self) -> bool:
        """Apply announcements and receipts that arrived (never blocks; a bad one is counted, one line).

        True when receipts were just turned off (the rows that awaited them are unsent again).
        """
        turned_off = False
        if self._receipts is None:
            return False
        while (msg := _get_nowait(self._announcements)) is not None:
            try:
                on = protocol.parse_announcement(msg.payload)
            except protocol.MessageError as exc:
                self.receipts["rejected"] += 1
                log.warning("ignored a collector announcement on %s: %s", msg.topic[:160], exc)
                continue
            if on != self.outbox.receipt_mode:
                log.info("the fleet's collector %s: outbox rows are now deleted on %s", "sends receipts" if on
                         else "sends no receipts", "its receipt" if on else "the broker's PUBACK")
                turned_off = turned_off or (not on and bool(self.outbox.receipt_mode))
                self.outbox.set_receipt_mode(on)
        ids: list[str] = []
        while len(ids) < 5000 and (msg := _get_nowait(self._receipts)) is not None:
            try:
                ids += protocol.parse_receipt(msg.payload, self.device)
                self.receipts["received"] += 1
            except protocol.MessageError as exc:
                self.receipts["rejected"] += 1
                log.warning("ignored a receipt on %s: %s", msg.topic[:160], " ".join(str(exc)[:200].split()))
        if ids:
            ids = list(dict.fromkeys(ids))  # a receipt repeating an id confirms it once
            gone = self.outbox.confirm(ids)
            self.receipts["confirmed"] += gone
            # Ids already confirmed (a repeated receipt, a resend stored twice) or never ours.
            self.receipts["unknown_ids"] += len(ids) - gone
        return turned_off

    def _flush(self, acked: list[int]) -> None:
        if acked and not self.outbox.closed:
            if self._receipt_mode:
                self.outbox.mark_sent(acked, time.time(), self.receipt_timeout_s, self.receipt_backoff_cap_s)
            else:
                self.outbox.ack(acked)
            acked.clear()


def _get_nowait(q: Any) -> Any:
    try:
        return q.get_nowait()
    except queue.Empty:
        return None
