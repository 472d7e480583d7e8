"""The console's HTTP surface against a real uvicorn on 127.0.0.1 and a real SQLite fleet DB.

Covers login, token auth, refusals (401/403 with nothing leaked), CSRF,
malformed parameters, session expiry, the audit log of refused actions,
the OpenAPI document, TLS, and figures computed from stored messages.
"""
from __future__ import annotations

import http.client
import json
import ssl
import time
import urllib.parse

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from edgeship import protocol  # noqa: E402
from edgeship.fleet.console import auth  # noqa: E402
from edgeship.fleet.console.app import create_app  # noqa: E402
from edgeship.fleet.console.config import ConsoleConfig  # noqa: E402
from edgeship.fleet.console.data import ConsoleData  # noqa: E402
from edgeship.fleet.console.server import ConsoleServer  # noqa: E402
from edgeship.fleet.db import FleetDB  # noqa: E402

PASSWORD = "field-engineer-42"
TOKEN = auth.new_token()


class Client:
    """A tiny HTTP client over http.client: no redirects followed, cookies kept by hand."""

    def __init__(self, server: ConsoleServer, context: ssl.SSLContext | None = None) -> None:
        self.host, self.port = server.host, server.port
        self.context = context
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, body: bytes | str | dict | None = None, headers: dict | None = None,
                form: dict | None = None, token: str | None = None):
        h = dict(headers or {})
        if form is not None:
            body = urllib.parse.urlencode(form)
            h["Content-Type"] = "application/x-www-form-urlencoded"
        elif isinstance(body, dict):
            body = json.dumps(body)
            h["Content-Type"] = "application/json"
        if token:
            h["Authorization"] = f"Bearer {token}"
        if self.cookies:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if self.context is not None:
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=10, context=self.context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        for k, v in resp.getheaders():
            if k.lower() == "set-cookie":
                name, _, rest = v.partition("=")
                value = rest.split(";", 1)[0]
                if value in ('""', "") or "max-age=0" in v.lower():
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = value
        resp.body = data
        return resp

    def json(self, resp):
        return json.loads(resp.body)

    def login(self, user: str = "admin", password: str = PASSWORD):
        page = self.request("GET", "/login")
        assert page.status == 200
        html = page.body.decode()
        csrf = html.split('name="login_csrf" value="')[1].split('"')[0]
        return self.request("POST", "/login", form={"user": user, "password": password, "login_csrf": csrf, "next": "/devices"})


def _msg(kind: str, device: str, body: dict, ts: float) -> protocol.Message:
    msg = protocol.make_message(kind, device, body, ts=ts)
    return protocol.parse_message(protocol.device_topic("f1", device, kind), protocol.encode(msg))


def _seed(db: FleetDB, now: float) -> None:
    img = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8) / 64
    msgs = [
        _msg("state", "pi-a", {"online": True, "model": {"name": "digits", "version": "1.0.0"}}, now - 30),
        _msg("state", "pi-b", {"online": False, "model": {"name": "digits", "version": "1.1.0"}}, now - 30),
        _msg("telemetry", "pi-a", {"window_s": 60, "counts": {"inferences": 1000, "errors": 20},
                                   "latency_ms": {"p50": 1.0, "p95": 4.5, "p99": 9.0},
                                   "model": {"name": "digits", "version": "1.0.0"}}, now - 20),
        _msg("telemetry", "pi-b", {"window_s": 60, "counts": {"inferences": 500, "errors": 0},
                                   "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
                                   "drift": {"alarm": True, "score": 0.9, "inputs": {"input": {"psi": 0.9, "z": 1.2}}},
                                   "model": {"name": "digits", "version": "1.1.0"}}, now - 20),
        _msg("feedback", "pi-a", {"prediction_id": "p1", "kind": "correct", "model": {"version": "1.0.0"}}, now - 10),
        _msg("feedback", "pi-a", {"prediction_id": "p2", "kind": "correct", "model": {"version": "1.0.0"}}, now - 10),
        _msg("feedback", "pi-a", {"prediction_id": "p3", "kind": "correct", "model": {"version": "1.0.0"}}, now - 10),
        _msg("feedback", "pi-a", {"prediction_id": "p4", "kind": "incorrect", "value": "7",
                                  "model": {"version": "1.0.0"},
                                  "input": {"input": protocol.array_field("float32", img.shape, img.tobytes())}},
             now - 5),
    ]
    db.store_messages(msgs)


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    d = tmp_path_factory.mktemp("console")
    db = FleetDB.open(d / "fleet.sqlite")
    _seed(db, time.time())
    cfg = ConsoleConfig(password_hash=auth.hash_password(PASSWORD), token_sha256=auth.token_digest(TOKEN),
                        session_ttl_s=600)
    clock = Clock()
    data = ConsoleData(db, export_dir=d / "exports", clock=clock)
    server = ConsoleServer(create_app(cfg, data, clock=clock), cfg, port=0).start()
    try:
        yield server, db, clock
    finally:
        server.stop()
        db.close()


@pytest.fixture()
def client(console):
    return Client(console[0])


def test_binds_loopback_by_default(console):
    server, _, _ = console
    assert ConsoleConfig(token_sha256="0" * 64).host == "127.0.0.1"
    assert server.host == "127.0.0.1" and server.port > 0


@pytest.mark.parametrize("path", ["/api/v1/devices", "/api/v1/devices/pi-a", "/api/v1/rollouts", "/api/v1/feedback",
                                  "/api/v1/audit", "/api/v1/openapi.json", "/api/v1/feedback/samples/pi-a/x/input"])
def test_api_refuses_without_credentials_and_leaks_nothing(client, path):
    for headers in ({}, {"Authorization": "Bearer es_wrong"}, {"Authorization": "Basic YWRtaW46eA=="},
                    {"Cookie": "es_session=forged"}):
        r = client.request("GET", path, headers=headers)
        assert r.status == 401, (path, headers)
        assert client.json(r) == {"error": "authentication required"}
        assert b"pi-a" not in r.body and b"digits" not in r.body


@pytest.mark.parametrize("path", ["/devices", "/devices/pi-a", "/rollouts", "/feedback", "/audit", "/api"])
def test_pages_refuse_without_login(client, path):
    r = client.request("GET", path)
    assert r.status == 401
    # Only the login form (which echoes the requested path as "next"); no fleet data.
    assert b'id="login-form"' in r.body and b"digits" not in r.body and b"1.0.0" not in r.body


def test_token_reads_api_and_figures_come_from_stored_messages(client):
    r = client.request("GET", "/api/v1/devices?sort=device", token=TOKEN)
    assert r.status == 200
    items = {d["device"]: d for d in client.json(r)["items"]}
    a, b = items["pi-a"], items["pi-b"]
    assert a["online"] is True and b["online"] is False
    assert a["model_version"] == "1.0.0" and b["model_version"] == "1.1.0"
    assert a["error_rate"] == pytest.approx(20 / 1020) and b["error_rate"] == 0
    assert a["p95_ms"] == pytest.approx(4.5)
    assert a["negative_rate"] == pytest.approx(0.25) and b["negative_rate"] is None
    assert b["drift"] is True and a["drift"] is False
    r = client.request("GET", "/api/v1/devices?status=offline&drift=yes", token=TOKEN)
    assert [d["device"] for d in client.json(r)["items"]] == ["pi-b"]
    r = client.request("GET", "/api/v1/devices?sort=p95_ms&order=desc", token=TOKEN)
    assert [d["device"] for d in client.json(r)["items"]] == ["pi-a", "pi-b"]
    r = client.request("GET", "/api/v1/devices/pi-a", token=TOKEN)
    dev = client.json(r)
    assert r.status == 200 and dev["history"][0]["p95_ms"] == pytest.approx(4.5)
    assert dev["feedback_counts"] == {"correct": 3, "incorrect": 1}
    assert client.request("GET", "/api/v1/devices/nope", token=TOKEN).status == 404


def test_feedback_api_and_input_image(client):
    fb = client.json(client.request("GET", "/api/v1/feedback", token=TOKEN))
    v = {e["version"]: e for e in fb["versions"]}["1.0.0"]
    assert v["counts"] == {"correct": 3, "incorrect": 1} and v["negative_rate"] == pytest.approx(0.25)
    sample = fb["samples"][0]
    assert sample["device"] == "pi-a" and sample["value"] == "7" and sample["has_image"]
    r = client.request("GET", f"/api/v1/feedback/samples/pi-a/{sample['msg_id']}/input", token=TOKEN)
    assert r.status == 200 and r.getheader("content-type") == "image/png" and r.body[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.request("GET", "/api/v1/feedback/samples/pi-a/none/input", token=TOKEN).status == 404


@pytest.mark.parametrize("query, name", [
    ("sort=password", "sort"), ("order=up", "order"), ("limit=abc", "limit"), ("limit=0", "limit"),
    ("limit=999999", "limit"), ("offset=-3", "offset"), ("status=maybe", "status"), ("drift=1", "drift"),
])
def test_malformed_device_params_are_400_naming_the_parameter(client, query, name):
    r = client.request("GET", f"/api/v1/devices?{query}", token=TOKEN)
    assert r.status == 400
    assert name in client.json(r)["error"]


def test_malformed_bodies_and_params(client):
    r = client.request("GET", "/api/v1/feedback?bucket=soon", token=TOKEN)
    assert r.status == 400 and "bucket" in client.json(r)["error"]
    r = client.request("GET", "/api/v1/audit?limit=-1", token=TOKEN)
    assert r.status == 400
    r = client.request("POST", "/api/v1/rollouts/r1/pause", body=b"{not json", token=TOKEN,
                       headers={"Content-Type": "application/json"})
    assert r.status == 400 and "JSON" in client.json(r)["error"]
    r = client.request("POST", "/api/v1/rollouts/r1/explode", body={}, token=TOKEN)
    assert r.status == 400 and "unknown action" in client.json(r)["error"]
    r = client.request("POST", "/api/v1/rollouts", body={"package": "../../etc/passwd"}, token=TOKEN)
    assert r.status in (400, 409) and "passwd" not in json.dumps(client.json(r)).replace("../../etc/passwd", "")
    r = client.request("GET", "/devices?sort=nonsense", headers={})
    assert r.status == 401  # still no login: the parameter is not even looked at


def test_login_csrf_wrong_password_and_audit(console, client):
    server, db, _ = console
    r = client.request("POST", "/login", form={"user": "admin", "password": PASSWORD})
    assert r.status == 403 and "es_session" not in client.cookies  # no login-form token
    r = client.login(password="wrong-password")
    assert r.status == 401 and "es_session" not in client.cookies
    assert b"Wrong user name or password" in r.body
    r = client.login(user="root", password=PASSWORD)
    assert r.status == 401 and "es_session" not in client.cookies
    r = client.login()
    assert r.status == 303 and r.getheader("location") == "/devices"
    cookie = [v for k, v in r.getheaders() if k.lower() == "set-cookie" and v.startswith("es_session=")][0]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert client.request("GET", "/devices").status == 200
    outcomes = [(e["who"], e["action"], e["outcome"]) for e in db.audit_list(limit=50)]
    assert ("admin", "login", "refused: bad credentials") in outcomes
    assert ("root", "login", "refused: bad credentials") in outcomes
    assert ("admin", "login", "refused: bad or missing CSRF token") in outcomes
    assert ("admin", "login", "ok") in outcomes


def test_actions_need_csrf_and_refusals_are_audited(console, client):
    server, db, _ = console
    # Not logged in at all.
    r = client.request("POST", "/api/v1/rollouts/r-9/abort", body={})
    assert r.status == 401
    assert client.login().status == 303
    sess = client.json(client.request("GET", "/api/v1/session"))
    csrf = sess["csrf_token"]
    assert sess["user"] == "admin" and csrf
    r = client.request("POST", "/api/v1/rollouts/r-9/abort", body={})
    assert r.status == 403 and client.json(r) == {"error": "forbidden"}
    r = client.request("POST", "/api/v1/rollouts/r-9/abort", body={}, headers={"X-CSRF-Token": "guess"})
    assert r.status == 403
    r = client.request("POST", "/rollouts/r-9/pause", form={"csrf_token": "guess"})
    assert r.status == 403
    # With the right token the request passes CSRF and reaches the controller,
    # which this console does not have: refused with 409, and audited.
    r = client.request("POST", "/api/v1/rollouts/r-9/abort", body={}, headers={"X-CSRF-Token": csrf})
    assert r.status == 409 and "controller" in client.json(r)["error"]
    # A token client sends no cookie: no CSRF needed, but still audited under its name.
    r = Client(server).request("POST", "/api/v1/rollouts/r-9/pause", body={}, token=TOKEN)
    assert r.status == 409
    audit = client.json(client.request("GET", "/api/v1/audit?limit=100"))["items"]
    rows = [(e["who"], e["action"], e["target"], e["outcome"]) for e in audit]
    assert ("anonymous", "rollout_action", "/api/v1/rollouts/r-9/abort", "refused: not logged in") in rows
    assert sum(1 for w, a, t, o in rows if w == "admin" and o == "refused: bad or missing CSRF token") >= 3
    assert any(w == "admin" and a == "abort" and t == "rollout/r-9" and o.startswith("refused:") for w, a, t, o in rows)
    assert any(w == "admin (api token)" and a == "pause" for w, a, t, o in rows)
    assert all(e["remote"] == "127.0.0.1" and e["ts"] > 0 for e in audit)


def test_session_expires_and_logout_ends_it(console, client):
    server, _, clock = console
    assert client.login().status == 303
    assert client.request("GET", "/api/v1/devices").status == 200
    clock.offset = 601.0  # past session_ttl_s = 600
    try:
        r = client.request("GET", "/api/v1/devices")
        assert r.status == 401
        assert client.request("GET", "/devices").status == 401
    finally:
        clock.offset = 0.0
    # Expired sessions are deleted, not revived when the clock is back.
    assert client.request("GET", "/api/v1/devices").status == 401
    assert client.login().status == 303
    csrf = client.json(client.request("GET", "/api/v1/session"))["csrf_token"]
    old = dict(client.cookies)
    r = client.request("POST", "/logout", form={"csrf_token": csrf})
    assert r.status == 303
    client.cookies = old  # replaying the old cookie after logout must not work
    assert client.request("GET", "/api/v1/devices").status == 401


def test_openapi_document_and_security_headers(client):
    r = client.request("GET", "/api/v1/openapi.json", token=TOKEN)
    doc = client.json(r)
    assert doc["openapi"].startswith("3.")
    for path in ("/api/v1/devices", "/api/v1/rollouts/{rollout}", "/api/v1/feedback", "/api/v1/audit",
                 "/api/v1/rollouts/{rollout}/{action}"):
        assert path in doc["paths"], path
    assert "summary" in doc["paths"]["/api/v1/devices"]["get"]
    assert "csp" not in r.getheader("content-security-policy", "")
    assert "frame-ancestors 'none'" in r.getheader("content-security-policy")
    assert r.getheader("x-frame-options") == "DENY" and r.getheader("cache-control") == "no-store"


def test_open_redirect_after_login_is_refused(client):
    page = client.request("GET", "/login").body.decode()
    csrf = page.split('name="login_csrf" value="')[1].split('"')[0]
    r = client.request("POST", "/login", form={"user": "admin", "password": PASSWORD, "login_csrf": csrf,
                                               "next": "//evil.example/x"})
    assert r.status == 303 and r.getheader("location") == "/devices"


def test_tls_when_a_certificate_is_configured(tmp_path):
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.now(timezone.utc) - timedelta(minutes=1))
            .not_valid_after(datetime.now(timezone.utc) + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    cfg = ConsoleConfig(password_hash=auth.hash_password(PASSWORD), token_sha256=auth.token_digest(TOKEN),
                        tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "k.pem"))
    db = FleetDB.open(tmp_path / "fleet.sqlite")
    with ConsoleServer(create_app(cfg, ConsoleData(db)), cfg, port=0) as server:
        assert server.url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(tmp_path / "c.pem"))
        c = Client(server, context=ctx)
        assert c.request("GET", "/api/v1/devices").status == 401
        r = c.login()
        assert r.status == 303
        cookie = [v for k, v in r.getheaders() if k.lower() == "set-cookie" and v.startswith("es_session=")][0]
        assert "secure" in cookie.lower()
        assert c.request("GET", "/api/v1/devices").getheader("strict-transport-security")
        with pytest.raises(http.client.RemoteDisconnected):
            plain = http.client.HTTPConnection(server.host, server.port, timeout=5)
            plain.request("GET", "/api/v1/devices")
            plain.getresponse()
    db.close()


@pytest.mark.mqtt
def test_cli_console_init_and_serve(tmp_path, mosquitto):
    """`edgeship fleet console init` then `edgeship fleet console` as a user runs them."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import free_port, run_cli, wait_port

    cfg = tmp_path / "fleet.toml"
    out = run_cli("fleet", "console", "init", "--config", str(cfg), "--password", PASSWORD).stdout
    token = out.split("API token (shown once, stored hashed): ")[1].split()[0]
    assert token not in cfg.read_text()
    again = run_cli("fleet", "console", "init", "--config", str(cfg), "--password", PASSWORD, check=False)
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "--force" in again.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgeship.cli", "fleet", "console", "--config", str(cfg),
                             "--db", str(tmp_path / "fleet.sqlite"), "--broker", mosquitto.url, "--fleet", "cli",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert wait_port("127.0.0.1", port, timeout=20), proc.stderr.read() if proc.poll() is not None else ""
        def get(headers):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/api/v1/devices", headers=headers)
                r = conn.getresponse()
                return r.status, r.read()
            finally:
                conn.close()

        assert get({})[0] == 401
        status, body = get({"Authorization": f"Bearer {token}"})
        assert status == 200 and json.loads(body)["total"] == 0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()
        proc.stderr.close()
    bad = run_cli("fleet", "console", "--config", str(tmp_path / "missing.toml"), "--db", str(tmp_path / "x.sqlite"),
                  "--broker", mosquitto.url, check=False)
    assert bad.returncode == 1 and "console init" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.mqtt
def test_fleet_console_process_serves_packages_and_starts_rollouts(tmp_path, mosquitto, signing_keys):
    """One process: collector, controller, package server and console (what `edgeship fleet console` runs)."""
    from test_agent import build_mlp_package

    from edgeship.fleet.console import FleetConsole

    priv, _ = signing_keys
    served = tmp_path / "packages"
    pkg = build_mlp_package(served, "2.0.0", seed=1, signing_key=priv)
    cfg = ConsoleConfig(token_sha256=auth.token_digest(TOKEN))
    with FleetConsole.open(config=cfg, db=tmp_path / "fleet.sqlite", broker=mosquitto.url, fleet="proc",
                           port=0, packages_dir=served, signing_key=priv) as fc:
        c = Client(fc.server)
        items = c.json(c.request("GET", "/api/v1/packages", token=TOKEN))["items"]
        assert [(p["file"], p["name"], p["version"], p["signed"]) for p in items] == [(pkg.name, "sensor", "2.0.0", True)]
        r = c.request("POST", "/api/v1/rollouts", body={"package": pkg.name, "stages": "10,100", "soak_s": "60"},
                      token=TOKEN)
        assert r.status == 200, r.body
        rid = c.json(r)["rollout"]["rollout_id"]
        st = c.json(c.request("GET", f"/api/v1/rollouts/{rid}", token=TOKEN))
        assert st["state"] == "running" and st["stage_count"] == 2 and st["package_version"] == "2.0.0"
        # The plan points devices at this process's package server.
        url = fc.controller.status(rid)["package"]["url"]
        assert url.startswith(fc.package_server.url)
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
        try:
            conn.request("GET", u.path, headers={"Range": "bytes=0-9"})
            resp = conn.getresponse()
            assert resp.status == 206 and len(resp.read()) == 10
        finally:
            conn.close()
        r = c.request("POST", f"/api/v1/rollouts/{rid}/abort", body={}, token=TOKEN)
        assert r.status == 200 and c.json(r)["rollout"]["state"] == "aborted"
        r = c.request("POST", f"/api/v1/rollouts/{rid}/abort", body={}, token=TOKEN)
        assert r.status == 409 and "aborted" in c.json(r)["error"]
        r = c.request("POST", "/api/v1/rollouts", body={"package": "nope.edgepkg"}, token=TOKEN)
        assert r.status == 400 and "not in the served package directory" in c.json(r)["error"]
        audit = [(e["who"], e["action"], e["outcome"]) for e in c.json(c.request("GET", "/api/v1/audit", token=TOKEN))["items"]]
        assert ("admin (api token)", "rollout.start", "sensor 2.0.0 to proc") in audit
        assert any(a == "rollout.abort" and w == "admin (api token)" for w, a, o in audit)
        assert any(a == "abort" and o.startswith("refused:") for w, a, o in audit)
