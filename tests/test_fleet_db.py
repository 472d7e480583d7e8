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
