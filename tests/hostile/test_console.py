"""Hostile-input corpus: the fleet console (issue 17).

Every case goes to the real console (uvicorn on 127.0.0.1 over a real SQLite
fleet DB, the fixture of tests/test_console_api.py) and asserts two things:
the console answered it correctly (status, no traceback, no state change)
and it still serves a good request afterwards.

The console has one user and no roles, so there is no read-only-user case;
its API token and its browser session carry the same rights.
"""
from __future__ import annotations

import json
import re
import socket
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from test_console_api import PASSWORD, TOKEN, Client, _msg, console  # noqa: F401 - console is a fixture

from edgeship import protocol

AREA = "console"  # tests/hostile/ counts tried/held per area

XSS = '<script>alert(1)</script>"\'><img src=x onerror=alert(2)>'
XSS_VERSION = '9.9.9"><script>alert(3)</script>'
XSS_VALUE = "<script>alert(4)</script>' onmouseover='alert(5)"
# What must never appear raw in a page: an opened script/img tag or a broken-out attribute.
RAW = (b"<script>alert", b"<img src=x", b"' onmouseover='", b'"><script')


@pytest.fixture(scope="module")
def hostile(console):  # noqa: F811 - the imported fixture
    """The console of test_console_api seeded with hostile text in every free-text field it shows."""
    server, db, clock = console
    now = time.time()
    db.store_messages([
        _msg("state", "pi-x", {"online": True, "model": {"name": XSS, "version": XSS_VERSION}}, now - 5),
        _msg("telemetry", "pi-x", {"window_s": 60, "counts": {"inferences": 10, "errors": 0},
                                   "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
                                   "model": {"name": XSS, "version": XSS_VERSION}}, now - 4),
        _msg("feedback", "pi-x", {"prediction_id": "px", "kind": "incorrect", "value": XSS_VALUE,
                                  "model": {"name": XSS, "version": XSS_VERSION}}, now - 3),
        # One labelled sample with its input, so that an export has something to write.
        _msg("feedback", "pi-x", {"prediction_id": "py", "kind": "label", "value": "3",
                                  "model": {"name": XSS, "version": XSS_VERSION},
                                  "input": {"input": protocol.array_field("float32", (1, 4), bytes(16))}}, now - 2),
    ])
    return server, db, clock


def fresh(hostile) -> Client:
    c = Client(hostile[0])
    assert c.login().status == 303
    return c


def csrf_of(c: Client) -> str:
    return c.json(c.request("GET", "/api/v1/session"))["csrf_token"]


def healthy(hostile, c: Client | None = None) -> None:
    """The console still serves a good request (by token, and by session when given)."""
    probe = Client(hostile[0])
    r = probe.request("GET", "/api/v1/devices?sort=device", token=TOKEN)
    assert r.status == 200 and "pi-a" in [d["device"] for d in probe.json(r)["items"]]
    if c is not None:
        assert c.request("GET", "/api/v1/summary").status == 200


def no_traceback(r) -> None:
    assert r.status < 500, (r.status, r.body[:300])
    assert b"Traceback" not in r.body and b'File "' not in r.body


def audit_rows(hostile, n: int = 50) -> list[tuple]:
    return [(e["who"], e["action"], e["target"], e["outcome"]) for e in hostile[1].audit_list(limit=n)]


def exports(hostile) -> set:
    d = hostile[0].app.state.data.export_dir
    return set(d.glob("*")) if d.exists() else set()


# ---------------------------------------------------------------- CSRF

STATE_CHANGING = [
    ("/api/v1/rollouts", {"package": "x.edgepkg"}),
    ("/rollouts/start", {"package": "x.edgepkg"}),
    ("/api/v1/rollouts/r-1/pause", {}),
    ("/api/v1/rollouts/r-1/resume", {}),
    ("/api/v1/rollouts/r-1/abort", {}),
    ("/rollouts/r-1/promote", {}),
    ("/api/v1/feedback/export", {}),
    ("/feedback/export", {}),
    ("/logout", {}),
]
ENDPOINT_NAME = {"/api/v1/rollouts": "rollout_start", "/rollouts/start": "rollout_start", "/logout": "logout",
                 "/api/v1/feedback/export": "feedback_export", "/feedback/export": "feedback_export"}
ENDPOINT_NAME.update({p: "rollout_action" for p, _ in STATE_CHANGING if p not in ENDPOINT_NAME})


@pytest.mark.parametrize("how", ["missing", "wrong", "other-session"])
@pytest.mark.parametrize("path, body", STATE_CHANGING, ids=[p for p, _ in STATE_CHANGING])
def test_csrf_refused_on_every_state_changing_endpoint(hostile, path, body, how):
    c = fresh(hostile)
    before = exports(hostile)
    if how == "missing":
        token = None
    elif how == "wrong":
        token = csrf_of(c)[:-2] + "xx"
    else:
        token = csrf_of(fresh(hostile))  # a real token, of another session
    send = dict(body)
    if token is not None:
        send["csrf_token"] = token  # form field for pages, same value also as the header for the API
    headers = {"X-CSRF-Token": token} if token is not None and path.startswith("/api/") else {}
    if path.startswith("/api/"):
        r = c.request("POST", path, body=send, headers=headers)
    else:
        r = c.request("POST", path, form=send)
    no_traceback(r)
    assert r.status == 403 and r.body in (b"forbidden", b'{"error":"forbidden"}')
    # No state change: the session lives on (logout did not happen), nothing exported,
    # and the refusal is in the audit log.
    assert exports(hostile) == before
    assert ("admin", ENDPOINT_NAME[path], path, "refused: bad or missing CSRF token") in audit_rows(hostile, 5)
    healthy(hostile, c)


def test_csrf_header_and_form_with_right_token_pass(hostile):
    """The control case: the same requests with the session's token are not refused for CSRF."""
    c = fresh(hostile)
    csrf = csrf_of(c)
    r = c.request("POST", "/api/v1/rollouts/r-1/pause", body={}, headers={"X-CSRF-Token": csrf})
    assert r.status == 409  # reached the controller (this console has none)
    before = exports(hostile)
    r = c.request("POST", "/feedback/export", form={"csrf_token": csrf})
    assert r.status == 200, r.getheader("location")
    # One export: its files (dataset, splits, provenance) share one stem.
    new = exports(hostile) - before
    assert r.body[:2] == b"PK" and new and len({p.name.split(".")[0] for p in new}) == 1, new
    r = c.request("POST", "/logout", form={"csrf_token": csrf})
    assert r.status == 303 and c.request("GET", "/api/v1/summary").status == 401
    healthy(hostile)


# ---------------------------------------------------------------- XSS

@pytest.mark.parametrize("path", ["/devices", "/devices/pi-x", "/feedback", "/feedback?model=" + "9.9.9%22%3E%3Cscript%3E",
                                  "/devices?q=%3Cscript%3Ealert(1)%3C/script%3E&model=%22%3E%3Cscript%3Ealert(1)",
                                  "/feedback?msg=%3Cscript%3Ealert(1)%3C%2Fscript%3E", "/audit"])
def test_pages_escape_hostile_fleet_text(hostile, path):
    c = fresh(hostile)
    # Leave hostile text in the audit log too (a refused login's user name).
    Client(hostile[0]).login(user="<script>alert(9)</script>", password="nope-nope")
    r = c.request("GET", path)
    no_traceback(r)
    assert r.status in (200, 400), (r.status, r.body[:200])
    for raw in RAW:
        assert raw not in r.body, (path, raw)
    if path in ("/devices", "/devices/pi-x"):
        assert b"9.9.9&#34;&gt;&lt;script&gt;" in r.body  # shown, escaped
    if path == "/feedback":
        assert b"&lt;script&gt;alert(4)&lt;/script&gt;&#39; onmouseover=&#39;" in r.body
    healthy(hostile, c)


def test_login_page_escapes_reflected_next(hostile):
    c = Client(hostile[0])
    r = c.request("GET", '/devices?x="><script>alert(1)</script>')
    assert r.status == 401
    for raw in RAW:
        assert raw not in r.body
    assert b'&#34;&gt;&lt;script&gt;' in r.body
    healthy(hostile)


def test_api_returns_hostile_text_as_json_data(hostile):
    c = Client(hostile[0])
    r = c.request("GET", "/api/v1/devices/pi-x", token=TOKEN)
    assert r.status == 200 and r.getheader("content-type") == "application/json"
    assert c.json(r)["model_version"] == XSS_VERSION
    assert r.getheader("x-content-type-options") == "nosniff"
    assert "script-src 'self'" in r.getheader("content-security-policy")
    healthy(hostile)


# ---------------------------------------------------------------- sessions

@pytest.mark.parametrize("cookie", ["forged", "x" * 129, "A" * 43, "", "%00", "é\xff", "a;b=c"],
                         ids=["forged", "overlong", "shaped-like-real", "empty", "nul", "unicode", "injected"])
def test_forged_session_cookies_are_refused(hostile, cookie):
    c = Client(hostile[0])
    c.cookies["es_session"] = cookie
    r = c.request("GET", "/api/v1/devices")
    no_traceback(r)
    assert r.status == 401 and c.json(r) == {"error": "authentication required"}
    r = c.request("POST", "/api/v1/rollouts/r-1/abort", body={}, headers={"X-CSRF-Token": "x"})
    assert r.status == 401
    healthy(hostile)


def test_session_id_changes_on_login_no_fixation(hostile):
    c = Client(hostile[0])
    planted = "attacker-chosen-session-id-0123456789abcdef"
    c.cookies["es_session"] = planted
    assert c.login().status == 303
    assert c.cookies["es_session"] != planted
    attacker = Client(hostile[0])
    attacker.cookies["es_session"] = planted
    assert attacker.request("GET", "/api/v1/summary").status == 401
    healthy(hostile, c)


def test_two_logins_get_distinct_sessions_and_tokens(hostile):
    a, b = fresh(hostile), fresh(hostile)
    assert a.cookies["es_session"] != b.cookies["es_session"] and csrf_of(a) != csrf_of(b)
    healthy(hostile, a)
    healthy(hostile, b)


def test_logout_invalidates_the_session_server_side(hostile):
    c = fresh(hostile)
    old = dict(c.cookies)
    assert c.request("POST", "/logout", form={"csrf_token": csrf_of(c)}).status == 303
    c.cookies = old
    assert c.request("GET", "/api/v1/summary").status == 401
    assert c.request("GET", "/devices").status == 401
    healthy(hostile)


def test_expired_session_is_refused_and_not_revived(hostile):
    _, _, clock = hostile
    c = fresh(hostile)
    clock.offset = 10_000.0
    try:
        assert c.request("GET", "/api/v1/summary").status == 401
    finally:
        clock.offset = 0.0
    assert c.request("GET", "/api/v1/summary").status == 401
    healthy(hostile)


def test_wrong_bearer_is_not_downgraded_to_a_good_cookie(hostile):
    c = fresh(hostile)
    r = c.request("GET", "/api/v1/summary", headers={"Authorization": "Bearer es_wrong"})
    assert r.status == 401
    healthy(hostile, c)


# ---------------------------------------------------------------- login

def login_form(c: Client) -> str:
    html = c.request("GET", "/login").body.decode()
    return html.split('name="login_csrf" value="')[1].split('"')[0]


def test_login_brute_force_is_throttled_then_recovers(hostile):
    _, _, clock = hostile
    c = Client(hostile[0])
    for i in range(10):
        assert c.login(password=f"guess-{i:04d}").status == 401
    r = c.login()  # even the right password now waits
    assert r.status == 429 and "es_session" not in c.cookies and b"Too many failed logins" in r.body
    assert ("admin", "login", "/login", "refused: too many failures") in audit_rows(hostile, 5)
    healthy(hostile)  # token clients are not locked out
    clock.offset = 61.0
    try:
        assert c.login().status == 303
    finally:
        clock.offset = 0.0
    healthy(hostile, c)


def test_login_throttle_not_dodged_by_rotating_x_forwarded_for(hostile):
    c = Client(hostile[0])
    try:
        for i in range(12):
            csrf = login_form(c)
            c.request("POST", "/login", form={"user": "admin", "password": f"guess-{i}", "login_csrf": csrf},
                      headers={"X-Forwarded-For": f"203.0.113.{i}"})
        csrf = login_form(c)
        r = c.request("POST", "/login", form={"user": "admin", "password": "guess-x", "login_csrf": csrf},
                      headers={"X-Forwarded-For": "203.0.113.200"})
        assert r.status == 429
    finally:
        # Forget this case's failures, whichever address they were counted under.
        hostile[0].app.state.throttle.failures.clear()
    healthy(hostile)


def test_audit_records_the_real_address_not_x_forwarded_for(hostile):
    c = Client(hostile[0])
    r = c.request("POST", "/api/v1/rollouts/r-1/abort", body={}, headers={"X-Forwarded-For": "198.51.100.7"})
    assert r.status == 401
    # By content, not position: earlier cases ran on a shifted test clock, so "newest" is not this one.
    refused = [e for e in hostile[1].audit_list(limit=500)
               if (e["action"], e["outcome"]) == ("rollout_action", "refused: not logged in")]
    assert refused and {e["remote"] for e in refused} == {"127.0.0.1"}, [e["remote"] for e in refused]
    healthy(hostile)


@pytest.mark.parametrize("nxt", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "\\\\evil.example",
                                 "javascript:alert(1)", "/\t/evil.example", "http:/evil.example", " //evil.example"])
def test_login_next_is_never_an_open_redirect(hostile, nxt):
    c = Client(hostile[0])
    csrf = login_form(c)
    r = c.request("POST", "/login", form={"user": "admin", "password": PASSWORD, "login_csrf": csrf, "next": nxt})
    assert r.status == 303
    loc = r.getheader("location")
    assert loc.startswith("/") and not loc.startswith("//") and "\\" not in loc and "\t" not in loc
    assert "evil" not in loc or loc.startswith("/%09") or loc == "/devices", loc
    healthy(hostile, c)


@pytest.mark.parametrize("body, ctype", [
    (b"user=admin&password=%ZZ&login_csrf=", "application/x-www-form-urlencoded"),
    (b"--b\r\nContent-Disposition: form-data; name=\"user\"\r\n\r\nadmin", "multipart/form-data; boundary=b"),
    (b"&".join(b"f%d=x" % i for i in range(200)), "application/x-www-form-urlencoded"),
    (b'{"user": "admin", "password": "x"}', "application/json"),
    (b"user=" + b"a" * 20000, "application/x-www-form-urlencoded"),
], ids=["bad-percent", "truncated-multipart", "too-many-fields", "json", "long-field"])
def test_malformed_login_bodies(hostile, body, ctype):
    c = Client(hostile[0])
    login_form(c)
    r = c.request("POST", "/login", body=body, headers={"Content-Type": ctype})
    no_traceback(r)
    assert r.status in (400, 403) and "es_session" not in c.cookies
    healthy(hostile)


# ---------------------------------------------------------------- bodies, headers, methods

@pytest.mark.parametrize("body, ctype, status", [
    (b"{not json", "application/json", 400),
    (b"[1, 2, 3]", "application/json", 400),
    (b'"just a string"', "application/json", 400),
    (b"\xff\xfe\x00garbage", "application/json", 400),
    (b'{"package": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400),
    (b'{"package": "' + b"a" * (70 * 1024) + b'"}', "application/json", 413),
    (b"--zz\r\nContent-Disposition: form-data; name=\"package\"\r\n\r\n" + b"x" * (65 * 1024),
     "multipart/form-data; boundary=zz", 400),
    (b"&".join(b"f%d=x" % i for i in range(80)), "application/x-www-form-urlencoded", 400),
    (b"package=x.edgepkg", "multipart/form-data", 400),
], ids=["bad-json", "json-array", "json-string", "bad-utf8", "deep-nesting", "over-64k", "part-over-64k",
        "too-many-fields", "multipart-no-boundary"])
def test_malformed_action_bodies(hostile, body, ctype, status):
    c = Client(hostile[0])
    r = c.request("POST", "/api/v1/rollouts", body=body, headers={"Content-Type": ctype}, token=TOKEN)
    no_traceback(r)
    assert r.status == status, (r.status, r.body[:200])
    assert set(c.json(r)) == {"error"}
    assert c.json(c.request("GET", "/api/v1/rollouts", token=TOKEN))["items"] == []
    healthy(hostile)


def raw_request(hostile, data: bytes) -> bytes:
    server = hostile[0]
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return out


@pytest.mark.parametrize("header", [b"X-Big: " + b"a" * 200_000, b"Cookie: es_session=" + b"a" * 100_000,
                                    b"Authorization: Bearer " + b"a" * 100_000,
                                    b"\r\n".join(b"X-H%d: v" % i for i in range(3000))],
                         ids=["huge-header", "huge-cookie", "huge-bearer", "many-headers"])
def test_oversized_headers_are_refused_without_harm(hostile, header):
    out = raw_request(hostile, b"GET /api/v1/devices HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n")
    status = int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/1.1 ") else None
    assert status in (400, 401, 413, 431), out[:200]  # refused by the parser, or no session
    assert b"Traceback" not in out
    healthy(hostile)


def test_body_longer_than_declared_and_lying_content_length(hostile):
    out = raw_request(hostile, b"POST /api/v1/rollouts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                      + b"\r\nContent-Type: application/json\r\nContent-Length: 10\r\nConnection: close\r\n\r\n{\"a\":")
    assert b"Traceback" not in out and not out.startswith(b"HTTP/1.1 500")
    healthy(hostile)


@pytest.mark.parametrize("method, path", [("PUT", "/api/v1/devices"), ("DELETE", "/api/v1/rollouts/r-1"),
                                          ("PATCH", "/api/v1/audit"), ("GET", "/logout"),
                                          ("TRACE", "/devices"), ("GET", "/api/v1/rollouts/r-1/abort"),
                                          ("BREW", "/api/v1/devices"), ("OPTIONS", "/api/v1/rollouts")])
def test_odd_methods_are_405(hostile, method, path):
    c = Client(hostile[0])
    r = c.request(method, path, token=TOKEN)
    no_traceback(r)
    assert r.status == 405 and b"pi-a" not in r.body
    healthy(hostile)


# ---------------------------------------------------------------- paths, ids, query params

@pytest.mark.parametrize("path", ["/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
                                  "/static/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc/passwd", "/static/....//app.py",
                                  "/static/%252e%252e/app.py", "/static//etc/passwd", "/static/console.css%00.py",
                                  "/static/..\\app.py"])
def test_static_path_traversal(hostile, path):
    out = raw_request(hostile, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    status = int(out.split(b" ", 2)[1])
    assert status in (400, 404), out[:200]
    assert b"create_app" not in out and b"root:" not in out
    healthy(hostile)


@pytest.mark.parametrize("path", ["/api/v1/devices/pi-a'%20OR%20'1'='1", "/api/v1/devices/pi-a%00",
                                  "/api/v1/devices/%F0%9F%92%A3%E2%80%AE", "/api/v1/devices/%ff%fe",
                                  "/api/v1/devices/" + "a" * 5000, "/api/v1/rollouts/r-1';DROP%20TABLE%20audit;--",
                                  "/api/v1/rollouts/nope", "/api/v1/rollouts/%00", "/api/v1/feedback/samples/..%2f..%2fx/y/input",
                                  "/api/v1/feedback/samples/pi-a/'%20OR%201=1--/input"])
def test_hostile_ids_are_404(hostile, path):
    c = Client(hostile[0])
    r = c.request("GET", path, token=TOKEN)
    no_traceback(r)
    assert r.status == 404 and set(c.json(r)) == {"error"}
    healthy(hostile)


@pytest.mark.parametrize("path", ["/devices/nope", "/rollouts/nope", "/devices/%3Cscript%3E", "/rollouts/%00x"])
def test_unknown_pages_are_404_pages(hostile, path):
    c = fresh(hostile)
    r = c.request("GET", path)
    no_traceback(r)
    assert r.status == 404 and b"<script>" not in r.body
    healthy(hostile, c)


# Each hostile query with what it must give: "400" (named refusal), "none" (a plain filter that
# matches nothing) or "all" (a harmless value Python reads as a number, e.g. "+1_0" is 10).
DEVICE_QUERIES = [
    ("q=' OR 1=1 --", "none"), ("q=%00", "none"), ("q=" + "x" * 200, "400"), ("model=1.0.0' OR '1'='1", "none"),
    ("limit=NaN", "400"), ("limit=1e999", "400"), ("limit=-1", "400"), ("limit=99999999999999999999999", "400"),
    ("offset=NaN", "400"), ("offset=-5", "400"), ("offset=99999999999999999999", "400"), ("limit=%00", "400"),
    ("sort=device;DROP TABLE x", "400"), ("order=asc%00", "400"), ("limit=0x10", "400"), ("limit=+1_0", "all"),
    ("offset=4000", "none"),
]


@pytest.mark.parametrize("query, expect", DEVICE_QUERIES, ids=[q[:40] for q, _ in DEVICE_QUERIES])
def test_hostile_device_query_params(hostile, query, expect):
    c = Client(hostile[0])
    r = c.request("GET", "/api/v1/devices?" + query.replace(" ", "%20").replace("'", "%27").replace(";", "%3B"),
                  token=TOKEN)
    no_traceback(r)
    body = c.json(r)
    if expect == "400":
        assert r.status == 400 and set(body) == {"error"}, (r.status, body)
    else:
        assert r.status == 200
        assert (body["items"] == []) == (expect == "none"), body["items"]
    healthy(hostile)


@pytest.mark.parametrize("path", ["/api/v1/feedback?bucket=NaN", "/api/v1/feedback?bucket=-60",
                                  "/api/v1/feedback?bucket=inf", "/api/v1/feedback?bucket=1e400",
                                  "/api/v1/feedback?model=" + "m" * 300, "/api/v1/audit?limit=NaN",
                                  "/api/v1/audit?limit=1;DROP%20TABLE%20audit", "/api/v1/audit?limit=10000000000000"])
def test_hostile_numeric_params_elsewhere(hostile, path):
    c = Client(hostile[0])
    r = c.request("GET", path, token=TOKEN)
    no_traceback(r)
    assert r.status == 400 and set(c.json(r)) == {"error"}
    assert len(hostile[1].audit_list(limit=5)) > 0
    healthy(hostile)


@pytest.mark.parametrize("package", ["../../etc/passwd", "/etc/passwd", "..%2f..%2fetc%2fpasswd", "x\x00.edgepkg",
                                     "' OR 1=1 --", "a" * 10_000, "\u202egpkegde.exe"])
def test_rollout_start_refuses_hostile_package_names(hostile, package):
    c = fresh(hostile)
    r = c.request("POST", "/api/v1/rollouts", body={"package": package}, headers={"X-CSRF-Token": csrf_of(c)})
    no_traceback(r)
    assert r.status in (400, 409) and b"root:x" not in r.body
    assert c.json(c.request("GET", "/api/v1/rollouts"))["items"] == []
    healthy(hostile, c)


def test_unknown_rollout_action_is_400_and_audited(hostile):
    c = Client(hostile[0])
    r = c.request("POST", "/api/v1/rollouts/r-1/" + "<script>" * 10, body={}, token=TOKEN)
    no_traceback(r)
    assert r.status == 400 and "unknown action" in c.json(r)["error"]
    assert any(o == "refused: unknown action" for _, _, _, o in audit_rows(hostile, 5))
    healthy(hostile)


def test_api_responses_never_carry_server_internals(hostile):
    """A sweep over every hostile answer kind: no paths, SQL or exception names leak."""
    c = Client(hostile[0])
    bodies = [c.request("GET", p, token=TOKEN).body for p in
              ("/api/v1/devices?limit=abc", "/api/v1/devices/%00", "/api/v1/feedback?bucket=x")]
    bodies.append(c.request("POST", "/api/v1/rollouts", body=b"{", headers={"Content-Type": "application/json"},
                            token=TOKEN).body)
    for b in bodies:
        text = json.loads(b)["error"]
        assert not re.search(r"sqlite|Traceback|/site-packages/|\.py\b|SELECT ", text, re.IGNORECASE), text
    healthy(hostile)


# ---------------------------------------------------------------- with a rollout controller

@pytest.fixture(scope="module")
def fleet(tmp_path_factory, mosquitto, signing_keys):
    """The whole console process (collector, controller, package server) with one running rollout."""
    from test_agent import build_mlp_package

    from edgeship.fleet.console import FleetConsole, auth
    from edgeship.fleet.console.config import ConsoleConfig

    d = tmp_path_factory.mktemp("hostile-fleet")
    priv, _ = signing_keys
    pkg = build_mlp_package(d / "packages", "2.0.0", seed=1, signing_key=priv)
    cfg = ConsoleConfig(password_hash=auth.hash_password(PASSWORD), token_sha256=auth.token_digest(TOKEN),
                        session_ttl_s=600)
    with FleetConsole.open(config=cfg, db=d / "fleet.sqlite", broker=mosquitto.url, fleet="hostile", port=0,
                           packages_dir=d / "packages", signing_key=priv) as fc:
        c = Client(fc.server)
        r = c.request("POST", "/api/v1/rollouts", body={"package": pkg.name, "stages": "10,100", "soak_s": "600"},
                      token=TOKEN)
        assert r.status == 200, r.body
        yield fc, pkg.name, c.json(r)["rollout"]["rollout_id"]


def rollouts_now(fleet) -> list[tuple]:
    c = Client(fleet[0].server)
    return [(r["rollout_id"], r["state"]) for r in c.json(c.request("GET", "/api/v1/rollouts", token=TOKEN))["items"]]


def fleet_healthy(fleet, before: list[tuple]) -> None:
    """No state change, and the console still answers a good request."""
    assert rollouts_now(fleet) == before
    c = Client(fleet[0].server)
    r = c.request("GET", f"/api/v1/rollouts/{fleet[2]}", token=TOKEN)
    assert r.status == 200 and c.json(r)["state"] == "running"


@pytest.mark.mqtt
@pytest.mark.parametrize("how", ["missing", "wrong", "other-session"])
@pytest.mark.parametrize("action", ["start", "pause", "abort", "promote"])
def test_csrf_refusal_changes_no_rollout(fleet, action, how):
    before = rollouts_now(fleet)
    c = Client(fleet[0].server)
    assert c.login().status == 303
    own = c.json(c.request("GET", "/api/v1/session"))["csrf_token"]
    if how == "other-session":
        other = Client(fleet[0].server)
        assert other.login().status == 303
        token = other.json(other.request("GET", "/api/v1/session"))["csrf_token"]
    else:
        token = {"missing": None, "wrong": own[::-1]}[how]
    headers = {"X-CSRF-Token": token} if token else {}
    path = "/api/v1/rollouts" if action == "start" else f"/api/v1/rollouts/{fleet[2]}/{action}"
    r = c.request("POST", path, body={"package": fleet[1], "stages": "100"}, headers=headers)
    no_traceback(r)
    assert r.status == 403
    fleet_healthy(fleet, before)


@pytest.mark.mqtt
@pytest.mark.parametrize("stages, soak", [("NaN,100", ""), ("inf", ""), ("50,10,100", ""), ({"a": 1}, ""),
                                         ("100", "-inf"), ("100", "nan"), ("100", [1e308]), ("1,100", "1,2,3")],
                         ids=["nan", "inf", "decreasing", "object", "neg-inf-soak", "nan-soak", "list-soak",
                              "soak-count"])
def test_hostile_rollout_plans_start_nothing(fleet, stages, soak):
    before = rollouts_now(fleet)
    c = Client(fleet[0].server)
    r = c.request("POST", "/api/v1/rollouts", body={"package": fleet[1], "stages": stages, "soak_s": soak},
                  token=TOKEN)
    no_traceback(r)
    assert r.status == 400 and set(c.json(r)) == {"error"}, r.body
    fleet_healthy(fleet, before)


@pytest.mark.mqtt
@pytest.mark.parametrize("rid", ["nope", "..%2f..%2fetc", "r'%20OR%201=1--", "%00", "r" * 3000, "%F0%9F%92%A3"])
def test_hostile_rollout_ids_with_a_controller(fleet, rid):
    before = rollouts_now(fleet)
    c = Client(fleet[0].server)
    r = c.request("GET", f"/api/v1/rollouts/{rid}", token=TOKEN)
    no_traceback(r)
    assert r.status == 404
    r = c.request("POST", f"/api/v1/rollouts/{rid}/abort", body={}, token=TOKEN)
    no_traceback(r)
    assert r.status in (404, 409) and set(c.json(r)) == {"error"}
    fleet_healthy(fleet, before)


@pytest.mark.mqtt
def test_rollout_page_escapes_flash_and_ids(fleet):
    c = Client(fleet[0].server)
    assert c.login().status == 303
    r = c.request("GET", f"/rollouts/{fleet[2]}?msg=%3Cscript%3Ealert(1)%3C%2Fscript%3E%22%27%3E")
    assert r.status == 200 and b"<script>alert" not in r.body and b"&lt;script&gt;alert(1)" in r.body
    fleet_healthy(fleet, rollouts_now(fleet))


@pytest.mark.mqtt
@pytest.mark.parametrize("path", ["/../fleet.sqlite", "/%2e%2e/fleet.sqlite", "/..%2ffleet.sqlite",
                                  "/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc/passwd", "//etc/passwd", "/.%00./fleet.sqlite"])
def test_package_server_path_traversal(fleet, path):
    from urllib.parse import urlsplit

    u = urlsplit(fleet[0].package_server.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    status = int(out.split(b" ", 2)[1])
    assert status in (400, 403, 404), out[:200]
    assert b"SQLite format" not in out and b"root:" not in out
    fleet_healthy(fleet, rollouts_now(fleet))
