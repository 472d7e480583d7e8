"""The console believes X-Forwarded-For only from configured proxies (issue 17, item 18).

uvicorn trusts proxy headers from 127.0.0.1 by default, so a client on the
console's host could rotate X-Forwarded-For to dodge the login lockout and
write any address into the audit log. Real uvicorn, real SQLite.
"""
from __future__ import annotations

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from test_console_api import PASSWORD, Client  # noqa: E402

from edgeship.errors import ConfigError  # noqa: E402
from edgeship.fleet.console import auth  # noqa: E402
from edgeship.fleet.console.app import MAX_LOGIN_FAILURES, create_app  # noqa: E402
from edgeship.fleet.console.config import ConsoleConfig, load_console_config  # noqa: E402
from edgeship.fleet.console.data import ConsoleData  # noqa: E402
from edgeship.fleet.console.server import ConsoleServer  # noqa: E402
from edgeship.fleet.db import FleetDB  # noqa: E402


def _flood(tmp_path, **config):
    """MAX_LOGIN_FAILURES + 2 wrong logins, each from a new claimed X-Forwarded-For; (statuses, audit rows)."""
    db = FleetDB.open(tmp_path / "fleet.sqlite")
    cfg = ConsoleConfig(password_hash=auth.hash_password(PASSWORD), **config)
    server = ConsoleServer(create_app(cfg, ConsoleData(db)), cfg, port=0).start()
    try:
        statuses = []
        for i in range(MAX_LOGIN_FAILURES + 2):
            c = Client(server)
            page = c.request("GET", "/login")
            csrf = page.body.decode().split('name="login_csrf" value="')[1].split('"')[0]
            r = c.request("POST", "/login", headers={"X-Forwarded-For": f"203.0.113.{i + 1}"},
                          form={"user": "admin", "password": "wrong", "login_csrf": csrf, "next": "/devices"})
            statuses.append(r.status)
        return statuses, db.audit_list(limit=100)
    finally:
        server.stop()
        db.close()


def test_rotating_x_forwarded_for_from_loopback_is_still_locked_out(tmp_path):
    statuses, audit = _flood(tmp_path)
    assert statuses[:MAX_LOGIN_FAILURES] == [401] * MAX_LOGIN_FAILURES
    assert statuses[MAX_LOGIN_FAILURES:] == [429, 429]
    assert {e["remote"] for e in audit} == {"127.0.0.1"}, "the audit log records the real peer"


def test_a_configured_proxy_is_believed(tmp_path):
    statuses, audit = _flood(tmp_path, trusted_proxies=("127.0.0.1",))
    assert 429 not in statuses  # each claimed client is its own address behind the trusted proxy
    assert "203.0.113.1" in {e["remote"] for e in audit}


def test_trusted_proxies_config_is_checked(tmp_path):
    p = tmp_path / "fleet.toml"
    p.write_text(f'[console]\npassword_hash = "{auth.hash_password(PASSWORD)}"\ntrusted_proxies = ["10.0.0.0/24"]\n')
    assert load_console_config(p).trusted_proxies == ("10.0.0.0/24",)
    with pytest.raises(ConfigError, match="trusted_proxies: 'proxy.local' is not an IP address"):
        ConsoleConfig(password_hash=auth.hash_password(PASSWORD), trusted_proxies=("proxy.local",))
