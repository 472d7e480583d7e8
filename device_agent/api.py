"""Local HTTP API for apps on the same device (stdlib ``http.server``, no extra dependency).

Listens on 127.0.0.1 (``[api] host/port``) or on a Unix socket
(``[api] unix_socket``); requests go through the same batcher as sensor
input. Body formats, status codes and the ``[api]`` keys are documented
for users in docs/http-api.md; the body parsing lives in
:mod:`edgeship.agent.api_input` (pure).

* ``POST /v1/infer`` — one sample or a batch (JSON, ``.npy``, an image, or
  multipart/form-data), raw or model-ready (``"input": "raw"|"model"``,
  echoed in the answer).
* ``POST /v1/feedback`` — ``{"prediction_id", "kind", "value"}``.
* ``POST /v1/streams/reset`` — ``{"stream": id}`` or ``{}``: forget a
  stateful model's stream state (``"reset": true`` on an infer request
  restarts a stream with that sample instead).
* ``GET /v1/health`` — ``Agent.health()``; 200 when serving, 503 otherwise.
* ``GET /v1/metrics`` — Prometheus text format (:func:`prometheus_text`).

What a hostile or broken client meets (each bounded before any work):

* at most ``max_connections`` connections, one thread each; the next
  connection is answered 503 + Retry-After by the accept loop and closed
  (counter ``api_busy``); the listen backlog is ``backlog``;
* a request must arrive whole within ``read_timeout_s`` of its first byte
  (slowloris: 408, counter ``api_timeouts``), an idle keep-alive connection
  is closed after ``read_timeout_s``, and so is one whose client stops
  reading our answer (a watchdog on the accept loop's tick, see ``_Conn``);
* ``Content-Length`` must be one plain non-negative integer within
  ``max_body_bytes`` (413 otherwise, before reading); chunked bodies are
  counted while read and cut at the same limit;
* a malformed body gets a 400 with a one-line reason (counter
  ``api_bad_requests``), never a dropped connection;
* a connection that breaks (reset, closed mid-body) is one log line
  (counter ``api_dropped``), not a traceback;
* with ``token``/``token_file``, every route needs
  ``Authorization: Bearer <token>`` (401 otherwise, counter
  ``api_unauthorized``);
* answers are strict JSON: NaN/±inf outputs become "NaN"/"Infinity"/
  "-Infinity" with ``"nonfinite": true`` on the result.
"""
from __future__ import annotations

import collections
import hmac
import io
import logging
import os
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Mapping

from ..errors import ConfigError, EdgeshipError, FeedbackUnavailableError, InputError, OverloadError
from ..metrics import Histogram
from .adapt_choice import choice_metric_lines
from .api_input import parse_infer, parse_json, strict_json

__all__ = ["ApiServer", "prometheus_text", "read_token"]

log = logging.getLogger("edgeship.agent.api")


def _esc(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(snapshot: Mapping[str, Any], model: Mapping[str, Any] | None = None,
                    prefix: str = "edgeship") -> str:
    """Prometheus exposition text of an ``AgentMetrics.snapshot()`` (pure)."""
    lines: list[str] = []
    for name, value in sorted((snapshot.get("counters") or {}).items()):
        lines += [f"# TYPE {prefix}_{name}_total counter", f"{prefix}_{name}_total {int(value)}"]
    lines += [f"# TYPE {prefix}_queue_depth gauge", f"{prefix}_queue_depth {int(snapshot.get('queue_depth') or 0)}"]
    for name, value in sorted((snapshot.get("memory") or {}).items()):  # rss_bytes, bytes_in_flight, ...
        if value is not None:
            lines += [f"# TYPE {prefix}_memory_{name} gauge", f"{prefix}_memory_{name} {int(value)}"]
    for key in ("latency_ms", "inference_ms", "batch_size"):
        d = snapshot.get(key)
        if not d:
            continue
        h = Histogram.from_dict(d)
        metric = f"{prefix}_{key}"
        lines.append(f"# TYPE {metric} histogram")
        cum = 0
        for bound, c in zip(h.bounds, h.counts):
            cum += c
            lines.append(f'{metric}_bucket{{le="{bound:g}"}} {cum}')
        lines.append(f'{metric}_bucket{{le="+Inf"}} {h.count}')
        lines.append(f"{metric}_sum {h.total:.6f}")
        lines.append(f"{metric}_count {h.count}")
    if model:
        lines += [f"# TYPE {prefix}_model_info gauge",
                  f'{prefix}_model_info{{name="{_esc(model.get("name"))}",version="{_esc(model.get("version"))}",'
                  f'sha256="{_esc(model.get("sha256"))}"}} 1']
    if snapshot.get("variant_choice"):  # which variant serves, the measured figures and the machine
        lines += choice_metric_lines(snapshot["variant_choice"], prefix)
    return "\n".join(lines) + "\n"




# -- connections -------------------------------------------------------------------------------------

class _SlowClient(Exception):
    """A request did not arrive whole within ``read_timeout_s`` of its first byte."""


IDLE, READING, BUSY = "idle", "reading", "busy"


class _Conn:
    """One connection's clock. The handler thread sets its state; the accept loop's watchdog
    (``_Bounded.service_actions``) shuts the read side of a connection idle or reading for
    longer than ``read_timeout_s`` (and the whole socket when a write is stuck), which wakes
    the handler's blocked recv/send.

    Why not socket timeouts: a per-recv timeout lets a slowloris client that sends a byte
    every few seconds hold a thread forever, a per-request one means a settimeout() per
    read, and a socket in timeout mode polls before every recv and send: on a busy 2-core
    board those extra syscalls and GIL hand-offs cost ~20 % of the request rate."""

    __slots__ = ("sock", "state", "since", "writing_since", "timed_out")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = IDLE
        self.since = time.monotonic()
        self.writing_since: float | None = None
        self.timed_out = False

    def overdue(self, now: float, limit: float) -> bool:
        ws = self.writing_since
        return (ws is not None and now - ws > limit) or (self.state != BUSY and now - self.since > limit)


class _ConnReader(io.RawIOBase):
    def __init__(self, conn: _Conn) -> None:
        super().__init__()
        self.conn = conn

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.conn.sock.recv_into(b)
        c = self.conn
        if n and c.state == IDLE:  # a request's first bytes: it has read_timeout_s from now to arrive whole
            c.state, c.since = READING, time.monotonic()
        elif not n and c.timed_out and c.state == READING:
            raise _SlowClient  # the watchdog shut the read side mid-request
        return n


class _ConnWriter(io.BufferedIOBase):
    """Unbuffered writes (http.server sends headers and body itself), watched for a stuck client."""

    def __init__(self, conn: _Conn) -> None:
        super().__init__()
        self.conn = conn

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.conn.writing_since = time.monotonic()
        self.conn.sock.sendall(b)
        self.conn.writing_since = None
        return len(b)


def _drain(sock: socket.socket) -> bool:
    """Read what the client already sent, without waiting; True once it closed its side.

    Closing a socket with unread input makes the kernel send a reset, which can
    destroy our last answer (a 503, a 413) before the client reads it."""
    try:
        for _ in range(16):
            if not sock.recv(65536):
                return True
    except OSError:  # BlockingIOError: nothing more yet; others: the connection is gone anyway
        pass
    return False


def _one_line(exc: BaseException | str, limit: int = 500) -> str:
    return (" ".join(str(exc).split()) or type(exc).__name__)[:limit]


# -- requests ----------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: an app reuses one connection
    server_version = "edgeship-agent"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle + the
    # client's delayed ACK add ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True
    _body_done = True
    # What an answer needs before a request line was parsed (a 408 for a slow request line).
    request_version, requestline, command = "HTTP/1.1", "", ""
    # http.server's default, HTTP/0.9, answers a garbled request line with a bare body and
    # no status line; nobody speaks 0.9: answer it like HTTP/1.0.
    default_request_version = "HTTP/1.0"

    # -- plumbing ---------------------------------------------------------------
    def setup(self) -> None:
        sock = self.connection = self.request
        if self.disable_nagle_algorithm:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self._conn = self.server.conn_of(sock)
        self.rfile = io.BufferedReader(_ConnReader(self._conn), 65536)
        self.wfile = _ConnWriter(self._conn)

    def handle(self) -> None:
        self.close_connection = True
        try:
            while True:
                self._body_done = True
                self.handle_one_request()
                if self.close_connection:
                    return
                self._conn.state, self._conn.since = IDLE, time.monotonic()
        except _SlowClient:
            self.server.count("api_timeouts")
            log.warning("api: %s sent no whole request within %g s ([api] read_timeout_s); answered 408 and closed",
                        self.address_string(), self.server.cfg.read_timeout_s)
            try:
                self._error(408, f"the request did not arrive within {self.server.cfg.read_timeout_s:g} s")
            except OSError:
                pass
        except OSError as exc:  # reset, broken pipe, closed mid-body, write timeout
            self.server.dropped(self.address_string(), exc)

    def log_message(self, fmt: str, *args: Any) -> None:  # route access logs to logging, at debug
        log.debug("api: " + fmt, *args)

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def _send(self, code: int, body: bytes, ctype: str = "application/json", headers: Mapping[str, str] = ()) -> None:
        if not self._body_done:
            # The request's body is still unread: it must not be parsed as the next request.
            self.close_connection = True
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in dict(headers).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, code: int, exc: BaseException | str, headers: Mapping[str, str] = ()) -> None:
        kind = type(exc).__name__ if not isinstance(exc, str) else "HTTPError"
        self._send(code, strict_json({"error": _one_line(exc), "kind": kind}), headers=headers)

    def _bad(self, code: int, exc: BaseException | str, headers: Mapping[str, str] = ()) -> None:
        """A malformed request: counted, answered with its one-line reason."""
        self.server.count("api_bad_requests")
        self._error(code, exc, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, 414, 431, 501) as JSON like ours."""
        self.close_connection = True
        self._bad(code, message or self.responses.get(code, ("error",))[0])

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        scheme, _, value = (self.headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode("utf-8", "replace"), token):
            return True
        self.server.count("api_unauthorized")
        self._error(401, "missing or wrong token: send the header Authorization: Bearer <token> ([api] token)",
                    {"WWW-Authenticate": 'Bearer realm="edgeship-agent"'})
        return False

    def _body(self) -> bytes | None:
        """The request body, its size checked before it is read; None when an error was answered."""
        limit = self.server.cfg.max_body_bytes
        te = self.headers.get_all("Transfer-Encoding") or []
        cl = self.headers.get_all("Content-Length") or []
        if te:
            if cl:
                return self._bad(400, "give Content-Length or Transfer-Encoding, not both")
            codings = [t.strip().lower() for t in ",".join(te).split(",")]
            if codings != ["chunked"]:
                return self._bad(501, f"Transfer-Encoding {', '.join(codings)[:60]!r} is not supported; "
                                      "send Content-Length or chunked")
            return self._chunked(limit)
        if not cl:
            return self._bad(411, "send a Content-Length header")
        values = {v.strip() for v in cl}
        v = values.pop() if len(values) == 1 else ""
        # int() would also take "-1", "+5", " 1_000": only plain digits are a length.
        if not (v.isascii() and v.isdigit()) or len(v) > 18:
            return self._bad(400, f"Content-Length must be one non-negative integer (got {', '.join(cl)[:60]!r})")
        n = int(v)
        if n > limit:
            return self._bad(413, f"body of {n} bytes is over the {limit}-byte limit ([api] max_body_bytes)")
        data = self.rfile.read(n)
        if len(data) < n:
            raise ConnectionAbortedError(f"the client closed after {len(data)} of {n} body bytes")
        self._body_done = True
        self._conn.state = BUSY
        return data

    def _chunked(self, limit: int) -> bytes | None:
        parts, total = [], 0
        for _ in range(65536):
            line = self.rfile.readline(1026)
            if not line:
                raise ConnectionAbortedError("the client closed inside a chunked body")
            size_s = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not size_s or len(size_s) > 15 or size_s.strip(b"0123456789abcdefABCDEF"):
                return self._bad(400, "malformed chunk size line in a chunked body")
            size = int(size_s, 16)
            if size == 0:
                for _ in range(32):  # trailer lines, then the blank line
                    line = self.rfile.readline(8194)
                    if line in (b"\r\n", b"\n"):
                        self._body_done = True
                        self._conn.state = BUSY
                        return b"".join(parts)
                    if not line:
                        raise ConnectionAbortedError("the client closed inside a chunked body's trailer")
                return self._bad(400, "chunked body: too many or too long trailer lines")
            total += size
            if total > limit:
                return self._bad(413, f"chunked body over the {limit}-byte limit ([api] max_body_bytes)")
            data = self.rfile.read(size)
            if len(data) < size:
                raise ConnectionAbortedError("the client closed inside a chunk")
            parts.append(data)
            if self.rfile.read(2) != b"\r\n":
                return self._bad(400, "malformed chunked body (no CRLF after a chunk)")
        return self._bad(400, "chunked body of more than 65536 chunks")

    # -- routes ---------------------------------------------------------------
    def _route(self, routes: Mapping[str, Any], others: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        self._body_done = not (self.headers.get("Content-Length") not in (None, "0")
                               or "Transfer-Encoding" in self.headers)
        if self._body_done:
            self._conn.state = BUSY
        try:
            if not self._authorized():
                return
            fn = routes.get(url.path)
            if fn is None:
                self._error(404, f"no route {self.command} {url.path[:100]}; try {others}")
            else:
                fn(self, url)
        except (_SlowClient, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in one route answers 500; the server keeps serving
            log.error("api: %s %s failed: %s: %s", self.command, url.path[:100], type(exc).__name__, _one_line(exc),
                      exc_info=log.isEnabledFor(logging.DEBUG))
            self.close_connection = True
            self._error(500, f"internal error ({type(exc).__name__}); see the agent's log")

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self._route(_GET, "/v1/health or /v1/metrics")

    def do_POST(self) -> None:  # noqa: N802
        self._route(_POST, "/v1/infer, /v1/feedback or /v1/streams/reset")

    def _not_allowed(self) -> None:
        self.close_connection = self.close_connection or "Content-Length" in self.headers \
            or "Transfer-Encoding" in self.headers
        self._bad(405, f"method {self.command} is not allowed; GET /v1/health, /v1/metrics; "
                       "POST /v1/infer, /v1/feedback, /v1/streams/reset", {"Allow": "GET, POST"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = do_CONNECT = _not_allowed  # noqa: N815

    def _health(self, url) -> None:
        h = self.server.agent.health()
        self._send(200 if h["status"] in ("ok", "degraded") else 503, strict_json(h))

    def _metrics(self, url) -> None:
        agent = self.server.agent
        text = prometheus_text(agent.metrics.snapshot(), agent.model)
        self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def _infer(self, url) -> None:
        agent = self.server.agent
        cfg = self.server.cfg
        body = self._body()
        if body is None:
            return
        handle = agent.handle
        color = handle.preprocessors[0].spec.get("color") if handle is not None and handle.preprocessors else None
        try:
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True, max_num_fields=16) if url.query else None
            req = parse_infer(body, self.headers.get("Content-Type"), query, max_samples=cfg.max_batch, color=color)
        except ValueError as exc:  # InputError, or parse_qs refusing a flood of fields
            return self._bad(400, exc)
        deadline = None if req.deadline_ms is None else req.deadline_ms / 1000.0
        pre = req.input == "raw"
        if not req.batch:
            try:
                result = agent.submit(req.samples[0], deadline, preprocess=pre, source="http",
                                      stream=req.stream, reset=req.reset).result(cfg.timeout_s)
            except EdgeshipError as exc:
                return self._failed(exc)
            except TimeoutError:
                return self._error(504, f"no result within {cfg.timeout_s:g} s ([api] timeout_s)")
            d = result.to_dict(outputs=req.outputs)
            d["input"] = req.input
            return self._send(200, strict_json(d))
        futs: list = []
        for i, s in enumerate(req.samples):
            try:  # a batch with a stream is consecutive windows of it: only the first restarts it
                futs.append(agent.submit(s, deadline, preprocess=pre, source="http", stream=req.stream,
                                         reset=req.reset and i == 0))
            except EdgeshipError as exc:  # this sample is refused; the others go on
                futs.append(exc)
        if all(isinstance(f, OverloadError) for f in futs):
            return self._failed(futs[0])
        end = time.monotonic() + cfg.timeout_s
        results = []
        for f in futs:
            try:
                if isinstance(f, Exception):
                    raise f
                results.append(f.result(max(0.0, end - time.monotonic())).to_dict(outputs=req.outputs))
            except EdgeshipError as exc:
                results.append({"error": _one_line(exc), "kind": type(exc).__name__})
            except TimeoutError:
                results.append({"error": f"no result within {cfg.timeout_s:g} s ([api] timeout_s)",
                                "kind": "TimeoutError"})
        errors = sum(1 for r in results if "error" in r)
        self._send(200, strict_json({"input": req.input, "count": len(results), "errors": errors,
                                     "results": results}))

    def _reset_streams(self, url) -> None:
        """``POST /v1/streams/reset`` ``{"stream": id}`` (or ``{}``: every stream): forget stream state now."""
        body = self._body()
        if body is None:
            return
        try:
            obj = parse_json(body) if body.strip() else {}
            sid = obj.get("stream") if isinstance(obj, dict) else None
            if not isinstance(obj, dict) or set(obj) - {"stream"} or (
                    "stream" in obj and (not isinstance(sid, str) or not 0 < len(sid) <= 128)):
                raise InputError('streams/reset takes {"stream": "<id>"} (one stream) or {} (every stream)')
        except InputError as exc:
            return self._bad(400, exc)
        handle = self.server.agent.handle
        if handle is None or handle.states is None:
            return self._error(409, "the active model keeps no stream state (no \"state\" in its package)")
        self._send(200, strict_json({"ok": True, "stream": sid, "had_state": self.server.agent.reset_stream(sid)}))

    def _failed(self, exc: EdgeshipError) -> None:
        if isinstance(exc, InputError):
            self._error(400, exc)
        elif isinstance(exc, OverloadError):
            self._error(503, exc, {"Retry-After": "1"})
        else:
            self._error(500, exc)

    def _feedback(self, url) -> None:
        agent = self.server.agent
        body = self._body()
        if body is None:
            return
        try:
            obj = parse_json(body)
            if (not isinstance(obj, dict) or not isinstance(obj.get("prediction_id"), str)
                    or not isinstance(obj.get("kind"), str)):
                raise InputError("feedback needs a JSON object with prediction_id and kind (strings) and value")
        except InputError as exc:
            return self._bad(400, exc)
        try:
            out = agent.feedback(obj["prediction_id"], obj["kind"], obj.get("value"))
        except FeedbackUnavailableError as exc:
            return self._error(503, exc)
        except EdgeshipError as exc:
            return self._failed(exc)
        msg_id = out.get("msg_id") if isinstance(out, Mapping) else None
        self._send(200, strict_json({"ok": True, "msg_id": msg_id}))


_GET = {"/v1/health": _Handler._health, "/v1/metrics": _Handler._metrics}
_POST = {"/v1/infer": _Handler._infer, "/v1/feedback": _Handler._feedback,
         "/v1/streams/reset": _Handler._reset_streams}


class _UnixHandler(_Handler):
    disable_nagle_algorithm = False  # TCP_NODELAY does not exist on Unix sockets


# -- the server --------------------------------------------------------------------------------------

class _Bounded:
    """One thread per connection, at most ``max_connections``; the next connection is
    answered 503 + Retry-After by the accept loop itself and closed.

    A refused socket is half-closed and kept (bounded) until its client has
    closed or a second has passed, so our 503 is read before the close."""

    agent: Any
    cfg: Any
    token: bytes | None = None

    def _init_bounds(self, agent, cfg, token: bytes | None) -> None:
        self.agent, self.cfg, self.token = agent, cfg, token
        self._slots = threading.BoundedSemaphore(cfg.max_connections)
        self._lock = threading.Lock()
        self._conns: dict = {}  # socket -> _Conn
        self._lingering: collections.deque = collections.deque()
        msg = strict_json({"error": f"the local API is at its [api] max_connections ({cfg.max_connections}); "
                                    "retry after 1 s", "kind": "OverloadError"})
        self._busy = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                      b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(msg), msg))

    def count(self, name: str) -> None:
        self.agent.metrics.counters.inc(name)

    def dropped(self, who: str, exc: BaseException) -> None:
        self.count("api_dropped")
        log.info("api: connection from %s dropped: %s: %s", who, type(exc).__name__, _one_line(exc, 200))

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            return self._refuse(request)
        with self._lock:
            self._conns[request] = _Conn(request)
        try:
            threading.Thread(target=self._serve, args=(request, client_address), name="edgeship-api-conn",
                             daemon=True).start()
        except RuntimeError:  # no thread to be had: refuse like at the bound
            self._release(request)
            self._refuse(request)

    def _serve(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - see handle_error
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._release(request)

    def _release(self, request) -> None:
        with self._lock:
            self._conns.pop(request, None)
        self._slots.release()

    def _refuse(self, sock) -> None:
        self.count("api_busy")
        try:
            sock.setblocking(False)
            sock.send(self._busy)  # a few hundred bytes into an empty socket buffer: never blocks
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        with self._lock:
            if len(self._lingering) >= 256:
                self._lingering.popleft()[0].close()
            self._lingering.append((sock, time.monotonic() + 1.0))

    def conn_of(self, sock) -> _Conn:
        with self._lock:
            return self._conns[sock]

    def service_actions(self) -> None:  # serve_forever calls this every poll_interval
        now = time.monotonic()
        limit = self.cfg.read_timeout_s
        with self._lock:
            for conn in self._conns.values():
                if not conn.timed_out and conn.overdue(now, limit):
                    conn.timed_out = True
                    try:  # wakes the handler's recv with EOF; a stuck send gets an error
                        conn.sock.shutdown(socket.SHUT_RD if conn.writing_since is None else socket.SHUT_RDWR)
                    except OSError:
                        pass
            keep = collections.deque()
            for sock, until in self._lingering:
                if _drain(sock) or now > until:
                    sock.close()
                else:
                    keep.append((sock, until))
            self._lingering = keep

    def shutdown_request(self, request) -> None:
        try:
            request.shutdown(socket.SHUT_WR)
            request.setblocking(False)
            _drain(request)
        except OSError:
            pass
        request.close()

    def handle_error(self, request, client_address) -> None:
        """Anything a connection raised that the handler did not answer: one line, counted, no traceback."""
        exc = sys.exc_info()[1]
        who = client_address[0] if isinstance(client_address, tuple) else "unix"
        self.dropped(who, exc if exc is not None else RuntimeError("unknown"))

    def close_all(self) -> None:
        """Unblock every connection thread (stop): their sockets are shut down."""
        with self._lock:
            conns = list(self._conns)
            lingering, self._lingering = self._lingering, collections.deque()
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for sock, _ in lingering:
            sock.close()


class _TcpServer(_Bounded, HTTPServer):
    allow_reuse_address = True


class _UnixServer(_Bounded, socketserver.UnixStreamServer):
    def server_bind(self) -> None:
        try:
            os.unlink(self.server_address)
        except FileNotFoundError:
            pass
        super().server_bind()
        self.server_name, self.server_port = "unix", 0


def read_token(cfg) -> bytes | None:
    """The configured API token (``[api] token`` or the first line of ``token_file``), or None."""
    if cfg.token and cfg.token_file:
        raise ConfigError("[api]: give token or token_file, not both")
    if cfg.token_file:
        try:
            with open(cfg.token_file, "rb") as f:
                raw = f.read(4097)
        except OSError as exc:
            raise ConfigError(f"[api] token_file {cfg.token_file}: cannot read it ({exc.strerror or exc})") from exc
        lines = raw.decode("utf-8", "replace").strip().splitlines()
        if len(raw) > 4096 or not lines or not lines[0].strip():
            raise ConfigError(f"[api] token_file {cfg.token_file}: must hold one token line (at most 4 KiB)")
        return lines[0].strip().encode()
    if cfg.token is not None:
        if not str(cfg.token).strip():
            raise ConfigError("[api] token is empty; remove it or set a token")
        return str(cfg.token).strip().encode()
    return None


class ApiServer:
    """Owns the HTTP server thread: ``start()``, ``stop(timeout)``; ``url`` once started."""

    def __init__(self, agent, cfg) -> None:
        self.agent = agent
        self.cfg = cfg
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> "ApiServer":
        cfg = self.cfg
        token = read_token(cfg)
        if cfg.unix_socket:
            srv = _UnixServer(cfg.unix_socket, _UnixHandler, bind_and_activate=False)
        else:
            srv = _TcpServer((cfg.host, cfg.port), _Handler, bind_and_activate=False)
        srv.request_queue_size = cfg.backlog  # socketserver's default of 5 resets connections under load
        srv._init_bounds(self.agent, cfg, token)
        try:
            srv.server_bind()
            srv.server_activate()
        except OSError as exc:
            srv.server_close()
            where = cfg.unix_socket or f"{cfg.host}:{cfg.port}"
            raise EdgeshipError(f"[api] cannot listen on {where}: {exc.strerror or exc} "
                                "(another agent running? change [api] port)") from exc
        self._server = srv
        # The poll interval is also the watchdog's tick (service_actions): a fraction of the read timeout.
        self._thread = threading.Thread(target=srv.serve_forever,
                                        kwargs={"poll_interval": min(0.2, cfg.read_timeout_s / 4)},
                                        name="edgeship-api", daemon=True)
        self._thread.start()
        log.info("local API on %s%s", self.url, " (token required)" if token else "")
        return self

    @property
    def url(self) -> str:
        if self.cfg.unix_socket:
            return f"unix:{self.cfg.unix_socket}"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return self._server.server_address[1] if not self.cfg.unix_socket else 0

    def stop(self, timeout: float = 2.0) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server.close_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.cfg.unix_socket:
            try:
                os.unlink(self.cfg.unix_socket)
            except OSError:
                pass
        self._server = None
