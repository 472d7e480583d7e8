"""The fleet database: the ONLY module with SQL.

``FleetDB.open(url_or_path)`` opens SQLite (a path or ``sqlite:///path``; WAL
mode) or PostgreSQL (``postgresql://user@host:port/db``, through psycopg 3).
The same SQL and the same numbered migrations serve both:

* statements are written with ``?`` placeholders; :meth:`FleetDB._q` turns
  them into the driver's style (``%s`` for psycopg) in one place;
* DDL uses ``{real}``, ``{blob}``, ``{text}`` type placeholders filled per dialect;
* upserts use ``INSERT ... ON CONFLICT ... DO NOTHING / DO UPDATE`` (SQLite
  ≥ 3.24 and PostgreSQL both speak it); no ``INSERT OR IGNORE``, no ``rowid``.

Schema changes are numbered entries of :data:`MIGRATIONS` (append only; never
edit a released entry). Query methods are grouped by area below — ingest,
devices, telemetry, feedback — and other areas (rollouts, console) add their
own migration entries and a section of methods here.

Tables (migration 1):

    messages(device, msg_id, kind, ts, received)      de-duplication ledger: one row per stored message
    devices(device, fleet, online, session, state_ts, last_seen, model_*, agent_version, started_at, state)
    telemetry(device, msg_id, ts, window_s, model_*, inferences, errors, rejected, dropped,
              outbox_dropped, p50_ms, p95_ms, p99_ms, body)
    feedback(device, msg_id, ts, prediction_id, kind, value, label, model_*, has_input, body)
    feedback_inputs(device, msg_id, prediction_id, data)   JSON-encoded input arrays attached by feedback
    rollout_reports(device, msg_id, ts, rollout_id, state, reason, model_version, body)

Migration 4 (hostile input, issue 17):

    dead_letters(received, topic, reason, detail, size, payload)   messages the collector rejected
    feedback_verdicts(device, prediction_id, msg_id, ts)           the one verdict that counts per prediction

A prediction has one verdict (``correct``, ``incorrect`` or ``label``): the
newest by ``ts`` (then ``msg_id``). ``feedback`` keeps every message as
history, and every reader here counts a verdict row only while it is the one
in ``feedback_verdicts``, so one local app sending "incorrect" 50 times for
one prediction counts once in gates, reports and the console alike.
Ratings and comments are not verdicts and all count.

Migration 5 (console speed, issue 21): ``feedback.predicted`` holds the
body's ``predicted`` as JSON (readers no longer parse every body), and an
index on ``feedback_verdicts(ts)`` lets :meth:`FleetDB.feedback` read a
window's verdicts in one pass instead of one lookup per feedback row.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import FleetDBError

__all__ = ["FleetDB", "MIGRATIONS", "StoreResult", "VERDICT_KINDS"]

# Feedback kinds that judge a prediction; one per (device, prediction_id) counts (module docstring).
VERDICT_KINDS = ("correct", "incorrect", "label")
_VERDICT_IN = "(" + ", ".join(f"'{k}'" for k in VERDICT_KINDS) + ")"
# SQL condition on a feedback row aliased ``f``: it counts (not a superseded verdict).
_CURRENT_FEEDBACK = (f"(f.kind NOT IN {_VERDICT_IN} OR EXISTS (SELECT 1 FROM feedback_verdicts v "
                     "WHERE v.device = f.device AND v.prediction_id = f.prediction_id AND v.msg_id = f.msg_id))")

_DIALECT_TYPES = {
    "sqlite": {"real": "REAL", "blob": "BLOB", "text": "TEXT", "int": "INTEGER"},
    "postgresql": {"real": "DOUBLE PRECISION", "blob": "BYTEA", "text": "TEXT", "int": "BIGINT"},
}

# (version, description, statements). Append only.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "collector: messages, devices, telemetry, feedback, rollout reports", [
        """CREATE TABLE messages (
            device {text} NOT NULL, msg_id {text} NOT NULL, kind {text} NOT NULL,
            ts {real} NOT NULL, received {real} NOT NULL,
            PRIMARY KEY (device, msg_id))""",
        "CREATE INDEX messages_kind_ts ON messages(kind, ts)",
        """CREATE TABLE devices (
            device {text} PRIMARY KEY, fleet {text} NOT NULL, online {int} NOT NULL DEFAULT 0,
            session {real} NOT NULL DEFAULT 0, state_ts {real} NOT NULL DEFAULT 0,
            last_seen {real} NOT NULL DEFAULT 0,
            model_name {text}, model_version {text}, model_sha256 {text},
            agent_version {text}, started_at {real}, state {text})""",
        """CREATE TABLE telemetry (
            device {text} NOT NULL, msg_id {text} NOT NULL, ts {real} NOT NULL, window_s {real} NOT NULL,
            model_name {text}, model_version {text},
            inferences {int} NOT NULL DEFAULT 0, errors {int} NOT NULL DEFAULT 0,
            rejected {int} NOT NULL DEFAULT 0, dropped {int} NOT NULL DEFAULT 0,
            outbox_dropped {int} NOT NULL DEFAULT 0,
            p50_ms {real}, p95_ms {real}, p99_ms {real}, body {text} NOT NULL,
            PRIMARY KEY (device, msg_id))""",
        "CREATE INDEX telemetry_ts ON telemetry(ts)",
        "CREATE INDEX telemetry_model_ts ON telemetry(model_version, ts)",
        """CREATE TABLE feedback (
            device {text} NOT NULL, msg_id {text} NOT NULL, ts {real} NOT NULL,
            prediction_id {text} NOT NULL, kind {text} NOT NULL, value {text}, label {text},
            model_name {text}, model_version {text}, has_input {int} NOT NULL DEFAULT 0, body {text} NOT NULL,
            PRIMARY KEY (device, msg_id))""",
        "CREATE INDEX feedback_ts ON feedback(ts)",
        """CREATE TABLE feedback_inputs (
            device {text} NOT NULL, msg_id {text} NOT NULL, prediction_id {text} NOT NULL, data {text} NOT NULL,
            PRIMARY KEY (device, msg_id))""",
        """CREATE TABLE rollout_reports (
            device {text} NOT NULL, msg_id {text} NOT NULL, ts {real} NOT NULL,
            rollout_id {text} NOT NULL, state {text} NOT NULL, reason {text}, model_version {text},
            body {text} NOT NULL,
            PRIMARY KEY (device, msg_id))""",
        "CREATE INDEX rollout_reports_rollout ON rollout_reports(rollout_id, ts)",
    ]),
    (2, "console: sessions, audit log, telemetry by device", [
        """CREATE TABLE console_sessions (
            sid_sha256 {text} PRIMARY KEY, user_name {text} NOT NULL, csrf {text} NOT NULL,
            created {real} NOT NULL, expires {real} NOT NULL)""",
        """CREATE TABLE audit_log (
            ts {real} NOT NULL, who {text} NOT NULL, action {text} NOT NULL, target {text} NOT NULL,
            outcome {text} NOT NULL, remote {text} NOT NULL DEFAULT '')""",
        "CREATE INDEX audit_log_ts ON audit_log(ts)",
        # The console's device list and device page read each device's latest windows.
        "CREATE INDEX telemetry_device_ts ON telemetry(device, ts)",
        "CREATE INDEX feedback_device_ts ON feedback(device, ts)",
        "CREATE INDEX rollout_reports_device_ts ON rollout_reports(device, ts)",
    ]),
    (3, "rollout controller: rollouts, their events and gate evaluations", [
        # One row per rollout; `seq` grows with every transition (compare-and-set), and
        # `published_seq` records what was last published, so a restarted controller
        # republishes exactly what is missing and never re-runs a finished step.
        """CREATE TABLE rollouts (
            rollout_id {text} PRIMARY KEY, fleet {text} NOT NULL,
            package_name {text} NOT NULL, package_version {text} NOT NULL, package_sha256 {text} NOT NULL,
            package_path {text}, state {text} NOT NULL, stage_index {int} NOT NULL, percent {real} NOT NULL,
            seq {int} NOT NULL, published_seq {int} NOT NULL DEFAULT 0,
            stage_opened {real}, stage_started {real}, ramp_from {real} NOT NULL DEFAULT 0,
            created {real} NOT NULL, updated {real} NOT NULL, reason {text} NOT NULL DEFAULT '',
            plan {text} NOT NULL, signed {text}, status {text})""",
        """CREATE TABLE rollout_events (
            rollout_id {text} NOT NULL, seq {int} NOT NULL, ts {real} NOT NULL, kind {text} NOT NULL,
            stage_index {int} NOT NULL, who {text} NOT NULL DEFAULT '', detail {text} NOT NULL DEFAULT '',
            PRIMARY KEY (rollout_id, seq))""",
        """CREATE TABLE rollout_gate_evals (
            rollout_id {text} NOT NULL, ts {real} NOT NULL, stage_index {int} NOT NULL, results {text} NOT NULL)""",
        "CREATE INDEX rollout_gate_evals_rollout ON rollout_gate_evals(rollout_id, ts)",
    ]),
    (4, "hostile input: dead letters, one verdict per prediction", [
        """CREATE TABLE dead_letters (
            received {real} NOT NULL, topic {text} NOT NULL, reason {text} NOT NULL, detail {text} NOT NULL,
            size {int} NOT NULL, payload {blob})""",
        "CREATE INDEX dead_letters_received ON dead_letters(received)",
        """CREATE TABLE feedback_verdicts (
            device {text} NOT NULL, prediction_id {text} NOT NULL, msg_id {text} NOT NULL, ts {real} NOT NULL,
            PRIMARY KEY (device, prediction_id))""",
        "CREATE INDEX feedback_prediction ON feedback(device, prediction_id)",
        # Existing feedback: the newest verdict of each prediction is the one that counts.
        f"""INSERT INTO feedback_verdicts(device, prediction_id, msg_id, ts)
            SELECT f.device, f.prediction_id, f.msg_id, f.ts FROM feedback f
            WHERE f.kind IN {_VERDICT_IN} AND NOT EXISTS (
                SELECT 1 FROM feedback n WHERE n.device = f.device AND n.prediction_id = f.prediction_id
                AND n.kind IN {_VERDICT_IN} AND (n.ts > f.ts OR (n.ts = f.ts AND n.msg_id > f.msg_id)))""",
    ]),
    (5, "console speed: feedback.predicted column, verdicts by time", [
        "ALTER TABLE feedback ADD COLUMN predicted {text}",
        "CREATE INDEX feedback_verdicts_ts ON feedback_verdicts(ts)",
        lambda db: db._backfill_predicted(),  # noqa: SLF001 - the migration's own data step
    ]),
]


class StoreResult:
    """What :meth:`FleetDB.store_messages` did with a batch."""

    __slots__ = ("stored", "duplicates")

    def __init__(self) -> None:
        self.stored = 0
        self.duplicates = 0


def _model_fields(body: dict) -> tuple[Any, Any, Any]:
    m = body.get("model")
    if not isinstance(m, dict):
        return None, None, None
    def s(k: str) -> str | None:
        v = m.get(k)
        return None if v is None else str(v)[:256]
    return s("name"), s("version"), s("sha256")


def _predicted_json(body: dict) -> str | None:
    """``feedback.predicted``: the body's ``predicted`` as JSON, NULL when absent or null."""
    p = body.get("predicted")
    return None if p is None else json.dumps(p, separators=(",", ":"))


def _num(v: Any, default: float = 0) -> float:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else default


class FleetDB:
    """One connection, serialised by a lock (the collector, CLI and console share it)."""

    def __init__(self, conn: Any, dialect: str, where: str) -> None:
        self._conn = conn
        self.dialect = dialect
        self.where = where
        self._lock = threading.RLock()
        self._types = _DIALECT_TYPES[dialect]

    # ------------------------------------------------------------ open / migrate
    @classmethod
    def open(cls, url_or_path: str | Path, *, migrate: bool = True) -> "FleetDB":
        """Open (and by default migrate) the fleet DB; ``migrate=False`` only reads the schema version."""
        s = str(url_or_path)
        if s.startswith(("postgresql://", "postgres://")):
            return cls._open_postgresql(s, migrate=migrate)
        if s.startswith("sqlite:///"):
            s = urllib.parse.unquote(s[len("sqlite:///") - 1:]) if s.startswith("sqlite:////") else s[len("sqlite:///"):]
        elif "://" in s:
            raise FleetDBError(f"fleet DB URL {s!r} is not understood; use a file path or sqlite:///path")
        path = Path(s)
        try:
            if s != ":memory:":
                path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(s, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: commits are atomic and survive a process crash; a power
            # cut may lose the last commits, which the devices' outboxes resend.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise FleetDBError(f"cannot open fleet DB {s}: {exc}") from exc
        db = cls(conn, "sqlite", s)
        if migrate:
            db.migrate()
        return db

    @classmethod
    def _open_postgresql(cls, url: str, *, migrate: bool = True) -> "FleetDB":
        try:
            import psycopg
        except ImportError as exc:
            raise FleetDBError("a postgresql:// fleet DB needs psycopg: pip install 'edgeship[fleet]'") from exc
        parts = urllib.parse.urlparse(url)
        # Never echo a password into logs or error lines.
        safe = parts._replace(netloc=f"{parts.hostname or ''}{':%d' % parts.port if parts.port else ''}").geturl()
        try:
            # autocommit: transactions are explicit (BEGIN/COMMIT in _tx), as with SQLite.
            conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise FleetDBError(f"cannot open fleet DB {safe}: {' '.join(str(exc).split())}") from exc
        db = cls(conn, "postgresql", safe)
        if migrate:
            db.migrate()
        return db

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "FleetDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _q(self, sql: str) -> str:
        """One place for the parameter style: '?' here, '%s' for psycopg."""
        return sql if self.dialect == "sqlite" else sql.replace("?", "%s")

    def _ddl(self, sql: str) -> str:
        return sql.format(**self._types)

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            return self._conn.execute(self._q(sql), params)
        except sqlite3.Error as exc:
            raise FleetDBError(f"fleet DB {self.where}: {exc}") from exc
        except Exception as exc:
            # psycopg is imported only for postgresql:// URLs; map its errors here too.
            if type(exc).__module__.startswith("psycopg"):
                raise FleetDBError(f"fleet DB {self.where}: {' '.join(str(exc).split())}") from exc
            raise

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict]:
        with self._lock:
            cur = self._exec(sql, params)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def _tx(self):
        db = self

        class _Tx:
            def __enter__(self_inner):
                db._lock.acquire()
                try:
                    db._exec("BEGIN IMMEDIATE" if db.dialect == "sqlite" else "BEGIN")
                except BaseException:
                    db._lock.release()
                    raise
                return db

            def __exit__(self_inner, et, ev, tb):
                try:
                    db._exec("COMMIT" if et is None else "ROLLBACK")
                finally:
                    db._lock.release()
                return False

        return _Tx()

    def transaction(self):
        """``with db.transaction(): ...`` — for other areas' multi-statement writes."""
        return self._tx()

    def schema_version(self) -> int:
        with self._lock:
            self._exec("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._exec("SELECT MAX(version) FROM schema_version").fetchone()
            return int(row[0] or 0)

    def pending_migrations(self) -> list[tuple[int, str]]:
        """(version, description) of every migration not yet applied, in order."""
        current = self.schema_version()
        return [(v, d) for v, d, _ in sorted(MIGRATIONS, key=lambda m: m[0]) if v > current]

    def migrate(self, to: int | None = None) -> int:
        """Apply pending :data:`MIGRATIONS` in order (up to version ``to``), each in its own transaction."""
        current = self.schema_version()
        for version, _desc, statements in sorted(MIGRATIONS, key=lambda m: m[0]):
            if version <= current or (to is not None and version > to):
                continue
            with self._tx():
                for st in statements:
                    if callable(st):  # a data step in Python (same SQL for both dialects)
                        st(self)
                    else:
                        self._exec(self._ddl(st))
                self._exec("INSERT INTO schema_version(version) VALUES (?)", (version,))
            current = version
        return current

    # ------------------------------------------------------------ ingest (collector)
    def store_messages(self, messages: Iterable[Any], received: float | None = None) -> StoreResult:
        """Store a batch of parsed :class:`edgeship.protocol.Message` in one transaction.

        De-duplicates on (device, msg_id): a message already in the ledger is
        skipped entirely, so redeliveries never double-count.
        """
        res = StoreResult()
        now = time.time() if received is None else received
        # Stable sort by device: each device's messages keep their order, and
        # every writer locks device rows in the same order, so two collectors
        # sharing one PostgreSQL DB cannot deadlock on the devices upsert.
        batch = sorted(messages, key=lambda m: m.device or "")
        with self._tx():
            for m in batch:
                b = m.body
                cur = self._exec("INSERT INTO messages(device, msg_id, kind, ts, received) VALUES (?,?,?,?,?) "
                                 "ON CONFLICT (device, msg_id) DO NOTHING", (m.device, b["msg_id"], m.kind, b["ts"], now))
                if cur.rowcount != 1:
                    res.duplicates += 1
                    continue
                res.stored += 1
                self._touch_device(m.fleet, m.device, now)
                getattr(self, f"_store_{m.kind}")(m, now)
        return res

    def _touch_device(self, fleet: str, device: str, now: float) -> None:
        self._exec("INSERT INTO devices(device, fleet, last_seen) VALUES (?,?,?) "
                   "ON CONFLICT (device) DO UPDATE SET last_seen = excluded.last_seen, fleet = excluded.fleet",
                   (device, fleet, now))

    def _store_state(self, m: Any, now: float) -> None:
        b = m.body
        session = _num(b.get("session"), 0.0)
        row = self._exec("SELECT session, state_ts FROM devices WHERE device = ?", (m.device,)).fetchone()
        cur_session, cur_ts = (row[0], row[1]) if row else (0.0, 0.0)
        # Order: a newer connection (session) wins; within one connection a last
        # will wins over the online message it guards, otherwise the newer ts.
        if session < cur_session:
            return
        if session == cur_session and not b.get("will") and b["ts"] < cur_ts:
            return
        name, version, sha = _model_fields(b)
        sets = ["online = ?", "session = ?", "state_ts = ?", "state = ?"]
        params: list[Any] = [int(bool(b["online"])), session, b["ts"], json.dumps(b, separators=(",", ":"))]
        if b.get("model") is not None:  # a state without a model (e.g. a will) keeps the known one
            sets += ["model_name = ?", "model_version = ?", "model_sha256 = ?"]
            params += [name, version, sha]
        if isinstance(b.get("agent_version"), str):
            sets.append("agent_version = ?")
            params.append(b["agent_version"][:64])
        if isinstance(b.get("started_at"), (int, float)) and not isinstance(b.get("started_at"), bool):
            sets.append("started_at = ?")
            params.append(b["started_at"])
        self._exec(f"UPDATE devices SET {', '.join(sets)} WHERE device = ?", (*params, m.device))

    def _store_telemetry(self, m: Any, now: float) -> None:
        b = m.body
        c = b["counts"]
        lat = b.get("latency_ms") if isinstance(b.get("latency_ms"), dict) else {}
        name, version, _ = _model_fields(b)
        self._exec(
            "INSERT INTO telemetry(device, msg_id, ts, window_s, model_name, model_version, inferences, errors, "
            "rejected, dropped, outbox_dropped, p50_ms, p95_ms, p99_ms, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT (device, msg_id) DO NOTHING",
            (m.device, b["msg_id"], b["ts"], b["window_s"], name, version,
             int(_num(c.get("inferences"))), int(_num(c.get("errors"))), int(_num(c.get("rejected"))),
             int(_num(c.get("dropped"))), int(_num(c.get("outbox_dropped"))),
             _num(lat.get("p50"), None), _num(lat.get("p95"), None), _num(lat.get("p99"), None),
             json.dumps(b, separators=(",", ":"))))
        if version is not None:
            # Telemetry also tells which model a device runs (state may be older).
            self._exec("UPDATE devices SET model_name = ?, model_version = ? WHERE device = ? AND "
                       "(model_version IS NULL OR state_ts <= ?)", (name, version, m.device, b["ts"]))

    def _store_feedback(self, m: Any, now: float) -> None:
        b = m.body
        name, version, _ = _model_fields(b)
        value = b.get("value")
        label = None
        if b["kind"] == "label" and value is not None:
            label = str(value)[:256]
        elif b["kind"] == "correct" and b.get("predicted") is not None:
            label = str(b["predicted"])[:256]
        inp = b.get("input")
        has_input = isinstance(inp, dict) and bool(inp)
        body = {k: v for k, v in b.items() if k != "input"}
        self._exec(
            "INSERT INTO feedback(device, msg_id, ts, prediction_id, kind, value, label, model_name, model_version, "
            "has_input, body, predicted) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (device, msg_id) DO NOTHING",
            (m.device, b["msg_id"], b["ts"], b["prediction_id"], b["kind"],
             None if value is None else json.dumps(value), label, name, version, int(has_input),
             json.dumps(body, separators=(",", ":")), _predicted_json(b)))
        if b["kind"] in VERDICT_KINDS:
            # One verdict per prediction, the newest: an upsert, so two collectors sharing one
            # PostgreSQL DB cannot both make theirs the current one.
            self._exec("INSERT INTO feedback_verdicts(device, prediction_id, msg_id, ts) VALUES (?,?,?,?) "
                       "ON CONFLICT (device, prediction_id) DO UPDATE SET msg_id = excluded.msg_id, ts = excluded.ts "
                       "WHERE excluded.ts > feedback_verdicts.ts OR "
                       "(excluded.ts = feedback_verdicts.ts AND excluded.msg_id > feedback_verdicts.msg_id)",
                       (m.device, b["prediction_id"], b["msg_id"], b["ts"]))
        if has_input:
            self._exec("INSERT INTO feedback_inputs(device, msg_id, prediction_id, data) VALUES (?,?,?,?) "
                       "ON CONFLICT (device, msg_id) DO NOTHING",
                       (m.device, b["msg_id"], b["prediction_id"], json.dumps(inp, separators=(",", ":"))))

    def _store_rollout(self, m: Any, now: float) -> None:
        b = m.body
        _, version, _ = _model_fields(b)
        self._exec(
            "INSERT INTO rollout_reports(device, msg_id, ts, rollout_id, state, reason, model_version, body) "
            "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (device, msg_id) DO NOTHING",
            (m.device, b["msg_id"], b["ts"], b["rollout_id"], b["state"], b.get("reason"),
             version if version is not None else (str(b["version"]) if b.get("version") is not None else None),
             json.dumps(b, separators=(",", ":"))))

    def _store_plan(self, m: Any, now: float) -> None:  # collectors do not subscribe to plans
        return

    # ------------------------------------------------------------ dead letters (collector)
    def store_dead_letters(self, rows: Sequence[dict]) -> None:
        """Store messages the collector rejected: ``received, topic, reason, detail, size, payload``."""
        def text(v: Any) -> str:  # PostgreSQL text cannot hold NUL; a hostile topic or error text may
            return str(v).replace("\x00", "\\0")
        with self._tx():
            for r in rows:
                self._exec("INSERT INTO dead_letters(received, topic, reason, detail, size, payload) "
                           "VALUES (?,?,?,?,?,?)", (float(r["received"]), text(r["topic"]), text(r["reason"]),
                                                    text(r["detail"]), int(r["size"]), bytes(r["payload"])))

    def dead_letters(self, limit: int = 100, reason: str | None = None) -> list[dict]:
        """The newest rejected messages first (``payload`` is the truncated raw bytes)."""
        sql, params = "SELECT received, topic, reason, detail, size, payload FROM dead_letters", []
        if reason:
            sql, params = sql + " WHERE reason = ?", [reason]
        rows = self._rows(sql + " ORDER BY received DESC LIMIT ?", params + [int(limit)])
        for r in rows:
            r["payload"] = bytes(r["payload"]) if r["payload"] is not None else b""
        return rows

    def dead_letter_counts(self) -> dict[str, int]:
        return {r["reason"]: r["n"] for r in self._rows("SELECT reason, COUNT(*) AS n FROM dead_letters GROUP BY reason")}

    def dead_letters_prune(self, keep: int) -> int:
        """Keep only the newest ``keep`` dead letters (the table is bounded); returns how many went."""
        with self._lock:
            return self._exec("DELETE FROM dead_letters WHERE received < (SELECT received FROM dead_letters "
                              "ORDER BY received DESC LIMIT 1 OFFSET ?)", (max(0, int(keep) - 1),)).rowcount

    # ------------------------------------------------------------ devices
    def devices(self, fleet: str | None = None) -> list[dict]:
        sql = ("SELECT device, fleet, online, last_seen, state_ts, model_name, model_version, model_sha256, "
               "agent_version, started_at FROM devices")
        params: tuple = ()
        if fleet:
            sql += " WHERE fleet = ?"
            params = (fleet,)
        return self._rows(sql + " ORDER BY device", params)

    def message_counts(self) -> dict[str, int]:
        return {r["kind"]: r["n"] for r in self._rows("SELECT kind, COUNT(*) AS n FROM messages GROUP BY kind")}

    def message_ids(self, kind: str | None = None) -> list[tuple[str, str]]:
        sql, params = "SELECT device, msg_id FROM messages", ()
        if kind:
            sql, params = sql + " WHERE kind = ?", (kind,)
        return [(r["device"], r["msg_id"]) for r in self._rows(sql, params)]

    # ------------------------------------------------------------ telemetry
    def telemetry(self, since: float = 0.0, until: float | None = None, device: str | None = None, *,
                  devices: Sequence[str] | None = None) -> list[dict]:
        """Telemetry windows in time order (``body`` is the full JSON message).

        ``devices``: only these devices' windows (the console re-reads bodies only for devices whose
        windows changed since its last look)."""
        sql = ("SELECT device, msg_id, ts, window_s, model_name, model_version, inferences, errors, rejected, "
               "dropped, outbox_dropped, p50_ms, p95_ms, p99_ms, body FROM telemetry WHERE ts >= ?")
        params: list[Any] = [since]
        if until is not None:
            sql += " AND ts < ?"
            params.append(until)
        if device:
            sql += " AND device = ?"
            params.append(device)
        if devices is None:
            return self._rows(sql + " ORDER BY ts, device", params)
        out: list[dict] = []
        names = list(devices)
        for i in range(0, len(names), 500):  # bounded IN lists
            chunk = names[i:i + 500]
            out += self._rows(sql + f" AND device IN ({', '.join('?' * len(chunk))})", [*params, *chunk])
        return sorted(out, key=lambda r: (r["ts"], r["device"]))

    def telemetry_sums(self, since: float) -> dict[str, dict]:
        """Per device over windows since ``since``: ``windows``, ``inferences``, ``errors``, ``first``/``last`` ts.

        ``(windows, first, last)`` changes whenever a window arrives or ages out, so callers can
        keep what they derived from a device's windows until it does (the console's p95)."""
        rows = self._rows("SELECT device, COUNT(*) AS windows, SUM(inferences) AS inferences, SUM(errors) AS errors, "
                          "MIN(ts) AS first, MAX(ts) AS last FROM telemetry WHERE ts >= ? GROUP BY device", (since,))
        return {r["device"]: r for r in rows}

    def drift_windows(self, since: float = 0.0, until: float | None = None) -> list[dict]:
        """Telemetry windows that carry a ``drift`` field (issue 10), in time order, with the device's fleet.

        Each row: device, fleet, ts, model_name, model_version, drift (the parsed field), adapt (or None).
        """
        sql = ("SELECT t.device, d.fleet, t.ts, t.model_name, t.model_version, t.body FROM telemetry t "
               "LEFT JOIN devices d ON d.device = t.device WHERE t.ts >= ?")
        params: list[Any] = [since]
        if until is not None:
            sql += " AND t.ts < ?"
            params.append(until)
        out = []
        for r in self._rows(sql + " ORDER BY t.ts, t.device", params):
            try:
                body = json.loads(r["body"]) if isinstance(r["body"], str) else (r["body"] or {})
            except ValueError:
                continue
            drift = body.get("drift")
            if not isinstance(drift, dict) or not drift.get("samples"):
                continue
            out.append({"device": r["device"], "fleet": r["fleet"], "ts": r["ts"], "model_name": r["model_name"],
                        "model_version": r["model_version"], "drift": drift,
                        "adapt": body.get("adapt") if isinstance(body.get("adapt"), dict) else None})
        return out

    # ------------------------------------------------------------ feedback
    def feedback(self, since: float = 0.0, model_version: str | None = None) -> list[dict]:
        """Feedback rows, oldest first; ``value`` is decoded JSON, ``predicted`` the label the model gave."""
        sql = ("SELECT f.device, f.msg_id, f.ts, f.prediction_id, f.kind, f.value, f.label, f.model_name, "
               "f.model_version, f.has_input, f.predicted FROM feedback f WHERE f.ts >= ?")
        params: list[Any] = [since]
        if model_version:
            sql += " AND f.model_version = ?"
            params.append(model_version)
        # The _CURRENT_FEEDBACK rule as one read of the window's verdicts, not one lookup per row
        # (~45 ms at 20,000 rows). A prediction's current verdict is never older than any of its
        # verdict rows, so every verdict that can match a row of the window has ts >= since.
        # Verdicts first: a verdict stored between the two reads only leaves its own row out
        # (as if it came a moment later); read the other way round, it could hide both.
        with self._lock:
            current = {(d, p): m for d, p, m in self._exec(
                "SELECT device, prediction_id, msg_id FROM feedback_verdicts WHERE ts >= ?", (since,)).fetchall()}
        rows = self._rows(sql + " ORDER BY f.ts", params)
        verdict_kinds = frozenset(VERDICT_KINDS)
        out = []
        for r in rows:
            if r["kind"] in verdict_kinds and current.get((r["device"], r["prediction_id"])) != r["msg_id"]:
                continue  # a superseded verdict: history, not counted
            p = r["predicted"]
            if p is not None:
                r["predicted"] = json.loads(p)
            if r["value"] is not None:
                r["value"] = json.loads(r["value"])
            out.append(r)
        return out

    def _backfill_predicted(self) -> None:
        """Migration 5: ``predicted`` of the feedback stored before the column existed."""
        rows = self._exec("SELECT device, msg_id, body FROM feedback WHERE body LIKE ?", ('%"predicted"%',)).fetchall()
        for device, msg_id, body in rows:
            try:
                p = _predicted_json(json.loads(body))
            except (ValueError, AttributeError):
                continue
            if p is not None:
                self._exec("UPDATE feedback SET predicted = ? WHERE device = ? AND msg_id = ?", (p, device, msg_id))

    def feedback_samples(self, model_version: str | None = None, since: float = 0.0) -> list[dict]:
        """Feedback rows that carry an input, with that input's JSON (``data``), oldest first."""
        sql = ("SELECT f.device, f.msg_id, f.ts, f.prediction_id, f.kind, f.value, f.label, f.model_version, "
               "i.data FROM feedback f JOIN feedback_inputs i ON i.device = f.device AND i.msg_id = f.msg_id "
               f"WHERE f.ts >= ? AND {_CURRENT_FEEDBACK}")
        params: list[Any] = [since]
        if model_version:
            sql += " AND f.model_version = ?"
            params.append(model_version)
        return self._rows(sql + " ORDER BY f.ts", params)

    def feedback_input(self, sample_id: str) -> dict | None:
        """The input attached to one feedback message; ``sample_id`` is ``device/msg_id``."""
        device, _, msg_id = sample_id.partition("/")
        rows = self._rows("SELECT data FROM feedback_inputs WHERE device = ? AND msg_id = ?", (device, msg_id))
        return json.loads(rows[0]["data"]) if rows else None

    # ------------------------------------------------------------ rollout reports (collector side)
    def rollout_reports(self, rollout_id: str | None = None, since: float = 0.0) -> list[dict]:
        sql = "SELECT device, msg_id, ts, rollout_id, state, reason, model_version FROM rollout_reports WHERE ts >= ?"
        params: list[Any] = [since]
        if rollout_id:
            sql += " AND rollout_id = ?"
            params.append(rollout_id)
        return self._rows(sql + " ORDER BY ts", params)

    # ------------------------------------------------------------ console (sessions, audit, views)
    def console_session_put(self, sid_sha256: str, user: str, csrf: str, created: float, expires: float) -> None:
        with self._lock:
            self._exec("INSERT INTO console_sessions(sid_sha256, user_name, csrf, created, expires) VALUES (?,?,?,?,?)",
                       (sid_sha256, user, csrf, created, expires))

    def console_session_get(self, sid_sha256: str) -> dict | None:
        rows = self._rows("SELECT user_name AS user, csrf, created, expires FROM console_sessions WHERE sid_sha256 = ?",
                          (sid_sha256,))
        return rows[0] if rows else None

    def console_session_delete(self, sid_sha256: str) -> None:
        with self._lock:
            self._exec("DELETE FROM console_sessions WHERE sid_sha256 = ?", (sid_sha256,))

    def console_session_purge(self, now: float) -> int:
        with self._lock:
            return self._exec("DELETE FROM console_sessions WHERE expires <= ?", (now,)).rowcount

    def audit_add(self, *, ts: float, who: str, action: str, target: str, outcome: str, remote: str = "") -> None:
        """One audit entry (console actions, refused ones too; rollout commands from the CLI may add theirs)."""
        with self._lock:
            self._exec("INSERT INTO audit_log(ts, who, action, target, outcome, remote) VALUES (?,?,?,?,?,?)",
                       (ts, who, action, target, outcome, remote))

    def audit_list(self, limit: int = 200, since: float = 0.0) -> list[dict]:
        return self._rows("SELECT ts, who, action, target, outcome, remote FROM audit_log WHERE ts >= ? "
                          "ORDER BY ts DESC LIMIT ?", (since, int(limit)))

    def console_devices(self) -> list[dict]:
        """Every device with its latest telemetry message (``telemetry_body``, for its drift verdict).

        The figures over a time window (inferences, p95, negative feedback) are
        computed by :mod:`edgeship.fleet.figures` from :meth:`telemetry` and
        :meth:`feedback` rows, the same way ``edgeship fleet report`` does.
        """
        return self._rows(
            "SELECT d.device, d.fleet, d.online, d.last_seen, d.model_name, d.model_version, d.agent_version, "
            "(SELECT body FROM telemetry x WHERE x.device = d.device ORDER BY x.ts DESC LIMIT 1) AS telemetry_body "
            "FROM devices d ORDER BY d.device")

    def console_device_history(self, device: str, limit: int = 240) -> dict:
        """One device's latest telemetry windows (oldest first), rollout reports and feedback counts."""
        windows = self._rows(
            "SELECT ts, window_s, model_version, inferences, errors, p50_ms, p95_ms, p99_ms FROM "
            "(SELECT * FROM telemetry WHERE device = ? ORDER BY ts DESC LIMIT ?) w ORDER BY ts", (device, int(limit)))
        reports = self._rows("SELECT ts, rollout_id, state, reason, model_version FROM rollout_reports "
                             "WHERE device = ? ORDER BY ts DESC LIMIT 50", (device,))
        feedback = {r["kind"]: r["n"] for r in self._rows(
            f"SELECT f.kind, COUNT(*) AS n FROM feedback f WHERE f.device = ? AND {_CURRENT_FEEDBACK} GROUP BY f.kind",
            (device,))}
        return {"history": windows, "rollout_events": reports, "feedback_counts": feedback}

    def console_latest_feedback(self, kind: str = "incorrect", limit: int = 24,
                                model_version: str | None = None) -> list[dict]:
        sql = ("SELECT f.device, f.msg_id, f.ts, f.prediction_id, f.kind, f.value, f.label, f.model_version, "
               f"f.has_input FROM feedback f WHERE f.kind = ? AND {_CURRENT_FEEDBACK}")
        params: list[Any] = [kind]
        if model_version:
            sql += " AND f.model_version = ?"
            params.append(model_version)
        return self._rows(sql + " ORDER BY f.ts DESC LIMIT ?", params + [int(limit)])

    # ------------------------------------------------------------ rollouts (controller)
    _ROLLOUT_COLS = ("rollout_id, fleet, package_name, package_version, package_sha256, package_path, state, "
                     "stage_index, percent, seq, published_seq, stage_opened, stage_started, ramp_from, created, "
                     "updated, reason, plan, signed, status")

    def rollout_create(self, row: dict, event: dict) -> None:
        """Insert a new rollout and its first event in one transaction; FleetDBError if the id exists."""
        cols = [c.strip() for c in self._ROLLOUT_COLS.split(",")]
        with self._tx():
            if self._exec("SELECT 1 FROM rollouts WHERE rollout_id = ?", (row["rollout_id"],)).fetchone():
                raise FleetDBError(f"rollout {row['rollout_id']} already exists; pick another id")
            self._exec(f"INSERT INTO rollouts({self._ROLLOUT_COLS}) VALUES ({','.join('?' * len(cols))})",
                       tuple(row.get(c) for c in cols))
            self._rollout_event(row["rollout_id"], row["seq"], row["created"], row["stage_index"], event)

    def _rollout_event(self, rollout_id: str, seq: int, ts: float, stage_index: int, event: dict) -> None:
        self._exec("INSERT INTO rollout_events(rollout_id, seq, ts, kind, stage_index, who, detail) "
                   "VALUES (?,?,?,?,?,?,?) ON CONFLICT (rollout_id, seq) DO NOTHING",
                   (rollout_id, seq, ts, event["kind"], stage_index, event.get("who", ""), event.get("detail", "")))

    def rollout_get(self, rollout_id: str) -> dict | None:
        rows = self._rows(f"SELECT {self._ROLLOUT_COLS} FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        return rows[0] if rows else None

    def rollouts_all(self, states: Sequence[str] | None = None) -> list[dict]:
        sql = f"SELECT {self._ROLLOUT_COLS} FROM rollouts"
        params: tuple = ()
        if states:
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            params = tuple(states)
        return self._rows(sql + " ORDER BY created DESC", params)

    def rollout_transition(self, rollout_id: str, expect_seq: int, changes: dict, event: dict | None) -> bool:
        """Compare-and-set: apply ``changes`` only if the rollout is still at ``expect_seq``.

        Returns False when another writer (or an earlier run of this controller)
        already moved it on: the caller re-reads instead of repeating the step.
        ``changes`` must include the new ``seq`` when ``event`` is given.
        """
        allowed = {"state", "stage_index", "percent", "seq", "stage_opened", "stage_started", "ramp_from",
                   "updated", "reason", "plan", "signed"}
        bad = set(changes) - allowed
        if bad:
            raise FleetDBError(f"rollout_transition: cannot change {', '.join(sorted(bad))}")
        sets = ", ".join(f"{k} = ?" for k in changes)
        with self._tx():
            cur = self._exec(f"UPDATE rollouts SET {sets} WHERE rollout_id = ? AND seq = ?",
                             (*changes.values(), rollout_id, expect_seq))
            if cur.rowcount != 1:
                return False
            if event is not None:
                self._rollout_event(rollout_id, changes.get("seq", expect_seq), changes.get("updated", time.time()),
                                    changes.get("stage_index", event.get("stage_index", 0)), event)
        return True

    def rollout_mark_published(self, rollout_id: str, seq: int) -> None:
        with self._lock:
            self._exec("UPDATE rollouts SET published_seq = ? WHERE rollout_id = ? AND published_seq < ?",
                       (seq, rollout_id, seq))

    def rollout_save_status(self, rollout_id: str, status: dict) -> None:
        with self._lock:
            self._exec("UPDATE rollouts SET status = ? WHERE rollout_id = ?",
                       (json.dumps(status, separators=(",", ":"), default=str), rollout_id))

    def rollout_status(self, rollout_id: str) -> dict | None:
        """The status the controller computed last (read-only views without a controller)."""
        rows = self._rows("SELECT status FROM rollouts WHERE rollout_id = ?", (rollout_id,))
        return json.loads(rows[0]["status"]) if rows and rows[0]["status"] else None

    def rollouts_list(self) -> list[dict]:
        return [json.loads(r["status"]) if r["status"] else
                {"rollout_id": r["rollout_id"], "state": r["state"], "stage_index": r["stage_index"],
                 "package": {"name": r["package_name"], "version": r["package_version"], "sha256": r["package_sha256"]},
                 "created": r["created"], "updated": r["updated"]}
                for r in self._rows("SELECT rollout_id, state, stage_index, package_name, package_version, "
                                    "package_sha256, created, updated, status FROM rollouts ORDER BY created DESC")]

    def rollout_events(self, rollout_id: str) -> list[dict]:
        return self._rows("SELECT seq, ts, kind, stage_index, who, detail FROM rollout_events WHERE rollout_id = ? "
                          "ORDER BY seq", (rollout_id,))

    def rollout_add_gate_eval(self, rollout_id: str, ts: float, stage_index: int, results: list[dict]) -> None:
        with self._lock:
            self._exec("INSERT INTO rollout_gate_evals(rollout_id, ts, stage_index, results) VALUES (?,?,?,?)",
                       (rollout_id, ts, stage_index, json.dumps(results, separators=(",", ":"))))

    def rollout_gate_evals(self, rollout_id: str) -> list[dict]:
        rows = self._rows("SELECT ts, stage_index, results FROM rollout_gate_evals WHERE rollout_id = ? ORDER BY ts",
                          (rollout_id,))
        for r in rows:
            r["results"] = json.loads(r["results"])
        return rows
