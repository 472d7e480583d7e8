"""The console's ASGI app: server-rendered pages, a JSON API under /api/v1/, login.

Every route except ``/login`` and the static files needs a principal:

* a browser session (cookie ``es_session``, HttpOnly, SameSite=Strict, Secure
  under TLS) created by ``POST /login`` with the configured password, or
* an API token in ``Authorization: Bearer <token>``.

State-changing requests made with a session must carry the session's CSRF
token (form field ``csrf_token`` or header ``X-CSRF-Token``); token clients
send no cookie, so CSRF cannot reach them. Refusals are 401 (who are you?)
or 403 (not allowed) with a fixed body that says nothing about why beyond
that, and every refused action is written to the audit log with the caller's
address.

The app holds no data logic: it calls :class:`ConsoleData`, which calls the
same fleet library functions as the CLI. The endpoints are module-level
functions; :func:`create_app` puts what they share on ``app.state`` and each
reads it from ``request.app.state``.
"""
from __future__ import annotations

import hmac
import json
import logging
import math
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.schemas import SchemaGenerator
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ...errors import EdgeshipError, RolloutError
from . import auth
from .config import ConsoleConfig
from .data import ConsoleData, QueryError

__all__ = ["create_app", "Principal"]

log = logging.getLogger("edgeship.fleet.console")

HERE = Path(__file__).parent
SESSION_COOKIE = "es_session"
LOGIN_COOKIE = "es_login"
ACTIONS = ("pause", "resume", "abort", "promote")
# Failed logins per client address before a cool-down; bounded map, see _LoginThrottle.
MAX_LOGIN_FAILURES = 10
LOGIN_COOLDOWN_S = 60.0

_SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
     b"connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


@dataclass(frozen=True)
class Principal:
    user: str
    via: str  # "session" | "token"
    session: auth.Session | None = None

    @property
    def who(self) -> str:
        return self.user if self.via == "session" else f"{self.user} (api token)"


class _SecurityHeaders:
    """Pure ASGI middleware adding the same hardening headers to every response."""

    def __init__(self, app, tls: bool) -> None:
        self.app = app
        self.extra = list(_SECURITY_HEADERS)
        if tls:
            self.extra.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                headers = list(message.get("headers", []))
                for k, v in self.extra:
                    if k not in names:
                        headers.append((k, v))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _LoginThrottle:
    """Counts failed logins per address; bounded so a flood of addresses cannot grow it."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self.failures: dict[str, tuple[int, float]] = {}

    def blocked(self, addr: str, now: float) -> bool:
        n, since = self.failures.get(addr, (0, now))
        if n >= MAX_LOGIN_FAILURES and now - since < LOGIN_COOLDOWN_S:
            return True
        if n >= MAX_LOGIN_FAILURES:
            self.failures.pop(addr, None)
        return False

    def fail(self, addr: str, now: float) -> None:
        if addr not in self.failures and len(self.failures) >= self.max_entries:
            self.failures.pop(next(iter(self.failures)))
        n, since = self.failures.get(addr, (0, now))
        self.failures[addr] = (n + 1, since)

    def ok(self, addr: str) -> None:
        self.failures.pop(addr, None)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(_clean(data), status_code=status)


def _fmt_ts(ts: Any) -> str:
    if ts is None or ts == "":
        return "—"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(ts)))
    except (TypeError, ValueError, OverflowError):
        return "—"


def _fmt_age(ts: Any) -> str:
    if ts is None:
        return "never"
    try:
        age = max(0.0, time.time() - float(ts))
    except (TypeError, ValueError):
        return "—"
    if age < 60:
        return f"{age:.0f} s ago"
    if age < 3600:
        return f"{age / 60:.0f} min ago"
    if age < 86400:
        return f"{age / 3600:.1f} h ago"
    return f"{age / 86400:.1f} d ago"


def _fmt_pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{100.0 * float(v):.1f} %"


def _fmt_num(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{float(v):,.{digits}f}"


def _fmt_dur(s: Any) -> str:
    if s is None:
        return "—"
    s = max(0.0, float(s))
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


# ---------------------------------------------------------------- auth

def principal(request: Request) -> Principal | None:
    st = request.app.state
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and auth.verify_token(token.strip(), st.config.token_sha256):
            return Principal(st.config.user, "token")
        return None  # a wrong token is not silently downgraded to the cookie
    sid = request.cookies.get(SESSION_COOKIE)
    if not sid or len(sid) > 128:
        return None
    sess = st.data.session_get(sid)
    if sess is None:
        return None
    if sess.expired(st.clock()):
        st.data.session_delete(sid)
        return None
    return Principal(sess.user, "session", sess)


def remote(request: Request) -> str:
    return request.client.host if request.client else "?"


def refuse_api(status: int) -> JSONResponse:
    # Fixed bodies: a refusal says nothing about users, sessions or tokens.
    body = {"error": "authentication required"} if status == 401 else {"error": "forbidden"}
    resp = _json(body, status)
    if status == 401:
        resp.headers["www-authenticate"] = 'Bearer realm="edgeship"'
    return resp


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def login_page(request: Request, status: int = 401, error: str | None = None) -> Response:
    st = request.app.state
    token = auth.new_token()
    nxt = request.url.path if request.method == "GET" and request.url.path not in ("/login", "/logout") else "/"
    if request.method == "GET" and request.url.query:
        nxt += "?" + request.url.query
    resp = st.templates.TemplateResponse(request, "login.html", {"login_csrf": token, "next": nxt, "error": error},
                                         status_code=status)
    resp.set_cookie(LOGIN_COOKIE, token, max_age=600, httponly=True, samesite="strict",
                    secure=st.config.tls, path="/login")
    return resp


def page(request: Request, name: str, ctx: dict, p: Principal, status: int = 200) -> Response:
    st = request.app.state
    partial = request.headers.get("x-console-partial") == "1"
    full = {"user": p.user, "csrf": p.session.csrf if p.session else "", "partial": partial,
            "path": request.url.path, "now": st.clock(), **ctx}
    return st.templates.TemplateResponse(request, name, full, status_code=status)


def guarded(kind: str):
    """Decorator: ``kind`` is "page", "api" or "action"; wraps auth + error handling."""

    def wrap(fn):
        def endpoint(request: Request):
            st = request.app.state
            p = principal(request)
            action = kind == "action"
            if p is None:
                if action:
                    st.data.audit(who="anonymous", action=fn.__name__, target=request.url.path,
                                  outcome="refused: not logged in", remote=remote(request))
                if is_api(request) or action:
                    return refuse_api(401)
                return login_page(request)
            if action and p.via == "session":
                presented = request.headers.get("x-csrf-token") or request.scope.get("_form", {}).get("csrf_token")
                if not auth.csrf_ok(p.session, presented):
                    st.data.audit(who=p.who, action=fn.__name__, target=request.url.path,
                                  outcome="refused: bad or missing CSRF token", remote=remote(request))
                    return refuse_api(403) if is_api(request) else HTMLResponse("forbidden", 403)
            try:
                return fn(request, p)
            except QueryError as exc:
                if is_api(request):
                    return _json({"error": str(exc)}, 400)
                return page(request, "error.html", {"status": 400, "message": str(exc)}, p, 400)

        endpoint.__name__ = fn.__name__
        endpoint.__doc__ = fn.__doc__
        return endpoint

    return wrap


def with_form(endpoint):
    """Async shell that parses a form body (bounded) before the sync endpoint runs in a thread."""
    from starlette.concurrency import run_in_threadpool

    async def inner(request: Request):
        ctype = request.headers.get("content-type", "")
        form: dict[str, str] = {}
        if ctype.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            try:
                async with request.form(max_files=0, max_fields=50, max_part_size=64 * 1024) as f:
                    form = {k: v for k, v in f.items() if isinstance(v, str)}
            except Exception as exc:  # noqa: BLE001 - any parser failure is the client's bad body
                return _json({"error": f"malformed form body: {type(exc).__name__}"}, 400)
        elif ctype.startswith("application/json"):
            raw = await request.body()
            if len(raw) > 64 * 1024:
                return _json({"error": "request body larger than 64 KiB"}, 413)
            if raw:
                try:
                    body = json.loads(raw)
                except (ValueError, RecursionError):  # deep nesting exhausts the parser's stack
                    return _json({"error": "request body is not valid JSON"}, 400)
                if not isinstance(body, dict):
                    return _json({"error": "request body must be a JSON object"}, 400)
                form = {k: v for k, v in body.items()}
        request.scope["_form"] = form
        return await run_in_threadpool(endpoint, request)

    inner.__name__ = endpoint.__name__
    inner.__doc__ = endpoint.__doc__
    return inner


def form_of(request: Request) -> dict:
    return request.scope.get("_form", {})


# ---------------------------------------------------------------- login

async def login_get(request: Request):
    if principal(request) is not None:
        return RedirectResponse("/devices", 303)
    return login_page(request, 200)


async def login_post(request: Request):
    st = request.app.state
    from starlette.concurrency import run_in_threadpool

    addr = remote(request)
    try:
        async with request.form(max_files=0, max_fields=10, max_part_size=4096) as f:
            form = {k: v for k, v in f.items() if isinstance(v, str)}
    except Exception:  # noqa: BLE001 - malformed body
        return HTMLResponse("bad request", 400)
    cookie_tok = request.cookies.get(LOGIN_COOKIE, "")
    if not cookie_tok or not auth.csrf_ok(auth.Session("", "", cookie_tok, 0, 0), form.get("login_csrf")):
        await run_in_threadpool(st.data.audit, who=form.get("user", "")[:64] or "anonymous", action="login",
                                target="/login", outcome="refused: bad or missing CSRF token", remote=addr)
        return HTMLResponse("forbidden", 403)
    now = st.clock()
    if st.throttle.blocked(addr, now):
        await run_in_threadpool(st.data.audit, who=form.get("user", "")[:64] or "anonymous", action="login",
                                target="/login", outcome="refused: too many failures", remote=addr)
        return login_page(request, 429, "Too many failed logins; wait a minute.")
    user = form.get("user", "")
    password = form.get("password", "")
    good = (bool(st.config.password_hash) and hmac.compare_digest(user.encode(), st.config.user.encode())
            and await run_in_threadpool(auth.verify_password, password, st.config.password_hash))
    if not good and st.config.token_sha256 and auth.verify_token(password, st.config.token_sha256):
        good = True  # the API token also works as a login password (token-only configs)
        user = st.config.user
    if not good:
        st.throttle.fail(addr, now)
        await run_in_threadpool(st.data.audit, who=user[:64] or "anonymous", action="login", target="/login",
                                outcome="refused: bad credentials", remote=addr)
        return login_page(request, 401, "Wrong user name or password.")
    st.throttle.ok(addr)
    sess = auth.new_session(st.config.user, st.config.session_ttl_s, now)
    await run_in_threadpool(st.data.session_put, sess)
    await run_in_threadpool(st.data.audit, who=sess.user, action="login", target="/login", outcome="ok", remote=addr)
    nxt = form.get("next") or "/devices"
    # Only same-site relative paths: an open redirect would turn login into a phishing aid.
    if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
        nxt = "/devices"
    resp = RedirectResponse(nxt, 303)
    resp.set_cookie(SESSION_COOKIE, sess.sid, max_age=int(st.config.session_ttl_s), httponly=True,
                    samesite="strict", secure=st.config.tls, path="/")
    resp.delete_cookie(LOGIN_COOKIE, path="/login")
    return resp


@guarded("action")
def logout(request: Request, p: Principal):
    st = request.app.state
    if p.session is not None:
        st.data.session_delete(p.session.sid)
    st.data.audit(who=p.who, action="logout", target="/logout", outcome="ok", remote=remote(request))
    resp = RedirectResponse("/login", 303)
    resp.delete_cookie(SESSION_COOKIE, path="/")
    return resp


# ---------------------------------------------------------------- pages

def device_query(request: Request) -> dict:
    q = request.query_params
    return {"q": q.get("q", ""), "status": q.get("status", ""), "model": q.get("model", ""),
            "drift": q.get("drift", ""), "sort": q.get("sort", "device"), "order": q.get("order", "asc"),
            "limit": q.get("limit", "200"), "offset": q.get("offset", "0")}


@guarded("page")
def home(request: Request, p: Principal):
    return RedirectResponse("/devices", 303)


@guarded("page")
def devices_page(request: Request, p: Principal):
    st = request.app.state
    params = device_query(request)
    result = st.data.devices(**params)
    return page(request, "devices.html", {"result": result, "params": params, "summary": result["summary"]}, p)


@guarded("page")
def device_page(request: Request, p: Principal):
    st = request.app.state
    dev = st.data.device(request.path_params["device"])
    if dev is None:
        return page(request, "error.html", {"status": 404, "message": "no such device"}, p, 404)
    return page(request, "device.html", {"d": dev}, p)


@guarded("page")
def rollouts_page(request: Request, p: Principal):
    st = request.app.state
    return page(request, "rollouts.html", {"rollouts": st.data.rollouts(), "packages": st.data.packages(),
                                           "can_start": st.data.can_start()}, p)


@guarded("page")
def rollout_page(request: Request, p: Principal):
    st = request.app.state
    r = st.data.rollout(request.path_params["rollout"])
    if r is None:
        return page(request, "error.html", {"status": 404, "message": "no such rollout"}, p, 404)
    return page(request, "rollout.html", {"r": r, "flash": request.query_params.get("msg", "")}, p)


@guarded("page")
def feedback_page(request: Request, p: Principal):
    st = request.app.state
    fb = st.data.feedback(model=request.query_params.get("model", ""), bucket=request.query_params.get("bucket", ""))
    return page(request, "feedback.html", {"fb": fb, "flash": request.query_params.get("msg", "")}, p)


@guarded("page")
def audit_page(request: Request, p: Principal):
    st = request.app.state
    entries = st.data.audit_list(limit=request.query_params.get("limit", "200"))
    return page(request, "audit.html", {"entries": entries}, p)


# ---------------------------------------------------------------- API (GET)

@guarded("api")
def api_devices(request: Request, p: Principal):
    """
    summary: List devices with their health figures (filter, sort, page).
    parameters:
      - {name: q, in: query, schema: {type: string}, description: substring of the device id}
      - {name: status, in: query, schema: {type: string, enum: ["", online, offline]}}
      - {name: model, in: query, schema: {type: string}, description: model version}
      - {name: drift, in: query, schema: {type: string, enum: ["", "yes", "no"]}}
      - {name: sort, in: query, schema: {type: string, enum: [device, online, model, last_seen, p95_ms, error_rate, negative_rate, drift]}}
      - {name: order, in: query, schema: {type: string, enum: [asc, desc]}}
      - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 5000}}
      - {name: offset, in: query, schema: {type: integer, minimum: 0}}
    responses:
      200: {description: "{total, items: [{device, online, model, last_seen, p95_ms, error_rate, negative_rate, drift}]}"}
      400: {description: a malformed parameter}
      401: {description: not logged in}
    """
    st = request.app.state
    return _json(st.data.devices(**device_query(request)))


@guarded("api")
def api_device(request: Request, p: Principal):
    """
    summary: One device with its telemetry history and recent rollout events.
    responses:
      200: {description: device details}
      404: {description: unknown device}
    """
    st = request.app.state
    dev = st.data.device(request.path_params["device"])
    return _json(dev) if dev is not None else _json({"error": "no such device"}, 404)


@guarded("api")
def api_summary(request: Request, p: Principal):
    """
    summary: Fleet totals (devices online/offline, rollouts running).
    responses:
      200: {description: totals}
    """
    st = request.app.state
    return _json(st.data.summary())


@guarded("api")
def api_rollouts(request: Request, p: Principal):
    """
    summary: All rollouts, newest first.
    responses:
      200: {description: "{items: [rollout summary]}"}
    """
    st = request.app.state
    return _json({"items": st.data.rollouts()})


@guarded("api")
def api_rollout(request: Request, p: Principal):
    """
    summary: One rollout with stage timeline, devices per state, gates (canary vs control vs threshold), soak left.
    responses:
      200: {description: rollout status}
      404: {description: unknown rollout}
    """
    st = request.app.state
    r = st.data.rollout(request.path_params["rollout"])
    return _json(r) if r is not None else _json({"error": "no such rollout"}, 404)


@guarded("api")
def api_feedback(request: Request, p: Principal):
    """
    summary: Feedback per model version, counts and rates over time, latest incorrect samples.
    parameters:
      - {name: model, in: query, schema: {type: string}, description: model version}
      - {name: bucket, in: query, schema: {type: integer, minimum: 60}, description: time bucket in seconds}
    responses:
      200: {description: feedback summary}
      400: {description: a malformed parameter}
    """
    st = request.app.state
    return _json(st.data.feedback(model=request.query_params.get("model", ""),
                                  bucket=request.query_params.get("bucket", "")))


@guarded("api")
def api_feedback_input(request: Request, p: Principal):
    """
    summary: The input attached to a feedback sample, as an image (PNG/JPEG) when it is one.
    responses:
      200: {description: image bytes}
      404: {description: no such sample, no input attached, or the input is not an image}
    """
    st = request.app.state
    img = st.data.feedback_input_image(request.path_params["device"], request.path_params["msg_id"])
    if img is None:
        return _json({"error": "no image for this sample"}, 404)
    body, mime = img
    return Response(body, media_type=mime)


@guarded("api")
def api_audit(request: Request, p: Principal):
    """
    summary: The audit log (who did what and when, including refused actions), newest first.
    parameters:
      - {name: limit, in: query, schema: {type: integer, minimum: 1, maximum: 1000}}
    responses:
      200: {description: "{items: [{ts, who, action, target, outcome, remote}]}"}
    """
    st = request.app.state
    return _json({"items": st.data.audit_list(limit=request.query_params.get("limit", "200"))})


@guarded("api")
def api_packages(request: Request, p: Principal):
    """
    summary: Packages available to start a rollout with (from --serve-packages).
    responses:
      200: {description: "{items: [{file, name, version, sha256, size}]}"}
    """
    st = request.app.state
    return _json({"items": st.data.packages()})


@guarded("api")
def api_session(request: Request, p: Principal):
    """
    summary: Who is logged in, the session's CSRF token and when the session expires.
    responses:
      200: {description: session info}
    """
    return _json({"user": p.user, "via": p.via, "csrf_token": p.session.csrf if p.session else None,
                  "expires": p.session.expires if p.session else None})


# ---------------------------------------------------------------- actions

def action_reply(request: Request, result: dict, status: int, redirect: str) -> Response:
    if is_api(request):
        return _json(result, status)
    sep = "&" if "?" in redirect else "?"
    msg = result.get("message") or result.get("error") or ""
    return RedirectResponse(f"{redirect}{sep}msg={urllib.parse.quote(msg[:200])}", 303)


@guarded("action")
def rollout_action(request: Request, p: Principal):
    """
    summary: Pause, resume, abort or force-promote a rollout (session callers send X-CSRF-Token).
    parameters:
      - {name: action, in: path, required: true, schema: {type: string, enum: [pause, resume, abort, promote]}}
    responses:
      200: {description: the rollout after the action}
      400: {description: unknown action}
      401: {description: not logged in}
      403: {description: bad or missing CSRF token}
      409: {description: the controller refused (e.g. abort of a finished rollout)}
    """
    st = request.app.state
    rid = request.path_params["rollout"]
    action = request.path_params["action"]
    target = f"rollout/{rid}"
    redirect = f"/rollouts/{urllib.parse.quote(rid)}"
    if action not in ACTIONS:
        st.data.audit(who=p.who, action=action[:32], target=target, outcome="refused: unknown action",
                      remote=remote(request))
        return action_reply(request, {"error": f"unknown action {action[:32]!r}; expected one of {', '.join(ACTIONS)}"},
                            400, redirect)
    try:
        result = st.data.rollout_action(rid, action, who=p.who)
    except (RolloutError, EdgeshipError) as exc:
        st.data.audit(who=p.who, action=action, target=target, outcome=f"refused: {exc}", remote=remote(request))
        return action_reply(request, {"error": str(exc)}, 409, redirect)
    # The controller writes the audit entry of a command it carried out (who, what, when),
    # the same entry `edgeship fleet rollout ...` leaves; the console adds only refusals.
    return action_reply(request, {"message": f"{action}: done", "rollout": result}, 200, redirect)


@guarded("action")
def rollout_start(request: Request, p: Principal):
    """
    summary: Start a rollout of a package from the served package directory.
    requestBody:
      content:
        application/json:
          schema:
            type: object
            properties:
              package: {type: string, description: file name in --serve-packages}
              stages: {type: string, example: "1,10,50,100"}
              soak_s: {type: number}
    responses:
      200: {description: the new rollout}
      400: {description: bad parameters}
      409: {description: the controller refused}
    """
    st = request.app.state
    form = form_of(request)
    pkg = str(form.get("package", ""))
    target = f"package/{pkg[:128]}"
    try:
        result = st.data.start_rollout(pkg, stages=str(form.get("stages", "") or ""),
                                       soak_s=str(form.get("soak_s", "") or ""), who=p.who)
    except QueryError as exc:
        st.data.audit(who=p.who, action="start", target=target, outcome=f"refused: {exc}", remote=remote(request))
        return action_reply(request, {"error": str(exc)}, 400, "/rollouts")
    except EdgeshipError as exc:
        st.data.audit(who=p.who, action="start", target=target, outcome=f"refused: {exc}", remote=remote(request))
        return action_reply(request, {"error": str(exc)}, 409, "/rollouts")
    rid = result.get("rollout_id", "")  # audited by the controller, as for the CLI
    return action_reply(request, {"message": "started", "rollout": result}, 200,
                        f"/rollouts/{urllib.parse.quote(rid)}")


@guarded("action")
def feedback_export(request: Request, p: Principal):
    """
    summary: Export the labelled field samples as an .npz dataset (download).
    parameters:
      - {name: model, in: query, schema: {type: string}}
    responses:
      200: {description: the .npz file}
      409: {description: nothing to export}
    """
    st = request.app.state
    try:
        path, count = st.data.export_feedback(model=str(form_of(request).get("model", "") or ""))
    except EdgeshipError as exc:
        st.data.audit(who=p.who, action="export-feedback", target="feedback", outcome=f"refused: {exc}",
                      remote=remote(request))
        return action_reply(request, {"error": str(exc)}, 409, "/feedback")
    st.data.audit(who=p.who, action="export-feedback", target="feedback", outcome=f"ok: {count} samples",
                  remote=remote(request))
    return FileResponse(path, media_type="application/octet-stream", filename="feedback.npz")


# ---------------------------------------------------------------- OpenAPI

SCHEMAS = SchemaGenerator({"openapi": "3.0.3",
                           "info": {"title": "edgeship fleet console API", "version": "1"},
                           "components": {"securitySchemes": {
                               "bearer": {"type": "http", "scheme": "bearer"},
                               "session": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE}}},
                           "security": [{"bearer": []}, {"session": []}]})


def _api_schema(request: Request) -> dict:
    return SCHEMAS.get_schema(routes=[r for r in request.app.routes if isinstance(r, Route)
                                      and r.path.startswith("/api/")])


@guarded("api")
def openapi(request: Request, p: Principal):
    """
    summary: This OpenAPI document.
    responses:
      200: {description: OpenAPI 3 document}
    """
    return _json(_api_schema(request))


@guarded("page")
def api_docs(request: Request, p: Principal):
    return page(request, "api.html", {"doc": _api_schema(request)}, p)


async def not_found(request: Request, exc: Exception):
    if is_api(request):
        return _json({"error": "not found"}, 404)
    return HTMLResponse("not found", 404)


async def method_not_allowed(request: Request, exc: Exception):
    return _json({"error": "method not allowed"}, 405) if is_api(request) else HTMLResponse("method not allowed", 405)


async def server_error(request: Request, exc: Exception):
    # Nothing of the exception reaches the client: it may hold paths or SQL.
    log.error("console: %s %s failed", request.method, request.url.path, exc_info=exc)
    return _json({"error": "internal error"}, 500) if is_api(request) else HTMLResponse("internal error", 500)


ROUTES = [
    Route("/login", login_get, methods=["GET"]),
    Route("/login", login_post, methods=["POST"]),
    Route("/logout", with_form(logout), methods=["POST"]),
    Route("/", home, methods=["GET"]),
    Route("/devices", devices_page, methods=["GET"]),
    Route("/devices/{device}", device_page, methods=["GET"]),
    Route("/rollouts", rollouts_page, methods=["GET"]),
    Route("/rollouts/start", with_form(rollout_start), methods=["POST"]),
    Route("/rollouts/{rollout}", rollout_page, methods=["GET"]),
    Route("/rollouts/{rollout}/{action}", with_form(rollout_action), methods=["POST"]),
    Route("/feedback", feedback_page, methods=["GET"]),
    Route("/feedback/export", with_form(feedback_export), methods=["POST"]),
    Route("/audit", audit_page, methods=["GET"]),
    Route("/api", api_docs, methods=["GET"]),
    Route("/api/v1/openapi.json", openapi, methods=["GET"], include_in_schema=True),
    Route("/api/v1/session", api_session, methods=["GET"]),
    Route("/api/v1/summary", api_summary, methods=["GET"]),
    Route("/api/v1/devices", api_devices, methods=["GET"]),
    Route("/api/v1/devices/{device}", api_device, methods=["GET"]),
    Route("/api/v1/rollouts", api_rollouts, methods=["GET"]),
    Route("/api/v1/rollouts", with_form(rollout_start), methods=["POST"]),
    Route("/api/v1/rollouts/{rollout}/{action}", with_form(rollout_action), methods=["POST"]),
    Route("/api/v1/rollouts/{rollout}", api_rollout, methods=["GET"]),
    Route("/api/v1/feedback", api_feedback, methods=["GET"]),
    Route("/api/v1/feedback/samples/{device}/{msg_id}/input", api_feedback_input, methods=["GET"]),
    Route("/api/v1/feedback/export", with_form(feedback_export), methods=["POST"]),
    Route("/api/v1/audit", api_audit, methods=["GET"]),
    Route("/api/v1/packages", api_packages, methods=["GET"]),
    Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
]


def create_app(config: ConsoleConfig, data: ConsoleData, *, clock: Callable[[], float] = time.time) -> Starlette:
    """Build the console app over ``data`` (see :class:`ConsoleData`).

    The endpoints above are module-level functions; what they share lives on
    ``app.state`` (``config``, ``data``, ``clock``, ``templates``, ``throttle``).
    """
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.autoescape = True  # every value from the fleet is untrusted text
    env.filters.update(ts=_fmt_ts, age=_fmt_age, pct=_fmt_pct, num=_fmt_num, dur=_fmt_dur,
                       tojson_attr=lambda v: json.dumps(_clean(v), separators=(",", ":")))
    app = Starlette(routes=data.extra_routes() + ROUTES,
                    exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error})
    app.state.config = config
    app.state.data = data
    app.state.clock = clock
    app.state.templates = templates
    app.state.throttle = _LoginThrottle()
    app.add_middleware(_SecurityHeaders, tls=config.tls)
    return app
