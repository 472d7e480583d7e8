"""The fleet DB's migration tool on both backends (SQLite, and PostgreSQL when it can be started)."""
from __future__ import annotations

from conftest import run_cli

from edgeship.fleet.db import MIGRATIONS, FleetDB


def test_migrate_is_explicit_and_idempotent(fleet_db_url):
    latest = max(v for v, _, _ in MIGRATIONS)
    with FleetDB.open(fleet_db_url, migrate=False) as db:
        assert db.schema_version() == 0
        assert [v for v, _ in db.pending_migrations()] == sorted(v for v, _, _ in MIGRATIONS)
        assert db.migrate() == latest
        assert db.pending_migrations() == []
        assert db.migrate() == latest  # a second run applies nothing and does not fail
    with FleetDB.open(fleet_db_url) as db:
        assert db.schema_version() == latest


def test_db_cli_status_and_migrate(fleet_db_url):
    out = run_cli("fleet", "db", "status", "--db", fleet_db_url).stdout
    assert "schema version 0" in out and f"{len(MIGRATIONS)} pending" in out
    out = run_cli("fleet", "db", "migrate", "--db", fleet_db_url).stdout
    assert f"-> {max(v for v, _, _ in MIGRATIONS)}" in out
    out = run_cli("fleet", "db", "status", "--db", fleet_db_url).stdout
    assert "0 pending" in out
    assert "postgres@" not in out  # the user (or a password) in the URL is never echoed


def test_bad_db_url_is_one_line():
    proc = run_cli("fleet", "db", "status", "--db", "mysql://x/y", check=False)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_migration_5_fills_predicted_of_existing_feedback(fleet_db_url):
    """#21: ``predicted`` moved from the body to a column; feedback stored before it keeps its label."""
    import json

    with FleetDB.open(fleet_db_url, migrate=False) as db:
        assert db.migrate(to=4) == 4  # an existing DB from before migration 5
        rows = [("m1", "p1", "label", '"dog"', {"predicted": "cat", "value": "dog"}),
                ("m2", "p2", "label", '"cat"', {"predicted": "cat", "value": "cat"}),
                ("m3", "p3", "label", '"3"', {"predicted": 3}),  # an app's number stays a number
                ("m4", "p4", "rating", "4", {"value": 4})]
        with db.transaction():
            for msg_id, pid, kind, value, body in rows:
                db._exec("INSERT INTO feedback(device, msg_id, ts, prediction_id, kind, value, body) "  # noqa: SLF001
                         "VALUES (?,?,?,?,?,?,?)", ("d1", msg_id, 100.0, pid, kind, value, json.dumps(body)))
                if kind == "label":
                    db._exec("INSERT INTO feedback_verdicts(device, prediction_id, msg_id, ts) "  # noqa: SLF001
                             "VALUES (?,?,?,?)", ("d1", pid, msg_id, 100.0))
        db.migrate()
        got = {r["msg_id"]: r["predicted"] for r in db.feedback()}
        assert got == {"m1": "cat", "m2": "cat", "m3": 3, "m4": None}
        from edgeship.fleet.figures import feedback_counts

        assert feedback_counts(db.feedback()) == (3, 1)  # m1's label differs from its prediction


def test_feedback_counts_only_current_verdicts_of_the_window(fleet_db_url):
    """FleetDB.feedback keeps the one-verdict rule for any window: a verdict superseded by a newer one is
    left out, a prediction whose only verdict is older than the window is absent, ratings all count."""
    from edgeship import protocol

    def fb(kind, ts, pid, **kw):
        m = protocol.make_message("feedback", "d1", {"prediction_id": pid, "kind": kind, **kw}, ts=ts,
                                  msg_id=f"{pid}-{kind}-{ts}")
        return protocol.parse_message(protocol.device_topic("f", "d1", "feedback"), protocol.encode(m))

    with FleetDB.open(fleet_db_url) as db:
        db.store_messages([fb("incorrect", 10.0, "a"), fb("correct", 20.0, "a"), fb("incorrect", 30.0, "a"),
                           fb("correct", 5.0, "b"), fb("rating", 6.0, "b", value=4),
                           fb("label", 25.0, "c", value="x", predicted="y")])
        kinds = lambda since: sorted((r["prediction_id"], r["kind"]) for r in db.feedback(since=since))  # noqa: E731
        assert kinds(0) == [("a", "incorrect"), ("b", "correct"), ("b", "rating"), ("c", "label")]
        assert [r["msg_id"] for r in db.feedback() if r["prediction_id"] == "a"] == ["a-incorrect-30.0"]
        assert kinds(15) == [("a", "incorrect"), ("c", "label")]
        assert kinds(26) == [("a", "incorrect")]
        assert [r["predicted"] for r in db.feedback(since=21)] == ["y", None]
