"""Local HTTP API for apps on the same device (stdlib ``http.server``, no extra dependency).

Listens on 127.0.0.1 (``[api] host/port``) or on a Unix socket
(``[api] unix_socket``); requests go through the same batcher as sensor
input.

* ``POST /v1/infer`` — body JSON (``[..]``, ``{"x": [..]}``, or
  ``{"inputs": {name: [..]}}``; optional ``"deadline_ms"``,
  ``"preprocess": false``) or a ``.npy`` file (``Content-Type:
  application/x-npy``; ``?deadline_ms=`` in the query). Answers the
  :class:`~edgeship.agent.results.Result` as JSON (``?outputs=0`` leaves the
  raw output tensors out). 400 = bad input (the message says what is
  wrong), 413 = body too large, 503 = overloaded or stopping (Retry-After).
* ``POST /v1/feedback`` — ``{"prediction_id", "kind", "value"}``; delegated
  to the feedback component, 503 with a clear message when there is none.
* ``GET /v1/health`` — ``Agent.health()``; 200 when serving, 503 otherwise.
* ``GET /v1/metrics`` — Prometheus text format (:func:`prometheus_text`).
"""
from __future__ import annotations

import io
import json
import logging
import os
import socketserver
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping

import numpy as np

from ..errors import EdgeshipError, FeedbackUnavailableError, InputError, OverloadError
from ..metrics import Histogram

__all__ = ["ApiServer", "prometheus_text"]

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
    return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: an app reuses one connection
    server_version = "edgeship-agent"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle + the
    # client's delayed ACK add ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True

    # -- plumbing ---------------------------------------------------------------
    def log_message(self, fmt: str, *args: Any) -> None:  # route access logs to logging, at debug
        log.debug("api: " + fmt, *args)

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def _send(self, code: int, body: bytes, ctype: str = "application/json", headers: Mapping[str, str] = ()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in dict(headers).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: Any, headers: Mapping[str, str] = ()) -> None:
        self._send(code, json.dumps(obj, separators=(",", ":")).encode(), headers=headers)

    def _error(self, code: int, exc: BaseException | str, headers: Mapping[str, str] = ()) -> None:
        msg = " ".join(str(exc).split()) if not isinstance(exc, str) else exc
        kind = type(exc).__name__ if not isinstance(exc, str) else "Error"
        self._json(code, {"error": msg, "kind": kind}, headers)

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        limit = self.server.cfg.max_body_bytes
        if length is None:
            self._error(411, "send a Content-Length header")
            return None
        try:
            n = int(length)
        except ValueError:
            self._error(400, "Content-Length is not a number")
            return None
        if n > limit:
            self._error(413, f"body of {n} bytes is over the {limit}-byte limit ([api] max_body_bytes)")
            self.close_connection = True
            return None
        return self.rfile.read(n)

    # -- routes ---------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        agent = self.server.agent
        path = urllib.parse.urlsplit(self.path).path
        if path == "/v1/health":
            h = agent.health()
            self._json(200 if h["status"] in ("ok", "degraded") else 503, h)
        elif path == "/v1/metrics":
            text = prometheus_text(agent.metrics.snapshot(), agent.model)
            self._send(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._error(404, f"no route GET {path}; try /v1/health or /v1/metrics")

    def do_POST(self) -> None:  # noqa: N802
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/v1/infer":
            self._infer(url)
        elif url.path == "/v1/feedback":
            self._feedback()
        else:
            body = self._body()
            if body is not None:
                self._error(404, f"no route POST {url.path}; try /v1/infer or /v1/feedback")

    def _infer(self, url) -> None:
        agent = self.server.agent
        body = self._body()
        if body is None:
            return
        q = urllib.parse.parse_qs(url.query)
        deadline_ms = q.get("deadline_ms", [None])[0]
        want_outputs = q.get("outputs", ["1"])[0] not in ("0", "false", "no")
        preprocess = q.get("preprocess", ["1"])[0] not in ("0", "false", "no")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        try:
            if ctype in ("application/x-npy", "application/octet-stream") or body[:6] == b"\x93NUMPY":
                try:
                    x = np.load(io.BytesIO(body), allow_pickle=False)
                except (ValueError, OSError, EOFError) as exc:
                    raise InputError(f"body is not a readable .npy array: {exc}") from exc
            else:
                try:
                    obj = json.loads(body)
                except ValueError as exc:
                    raise InputError(f"body is not valid JSON ({exc}); send a JSON array, "
                                     "{\"x\": [...]} or a .npy file") from exc
                if isinstance(obj, dict):
                    deadline_ms = obj.get("deadline_ms", deadline_ms)
                    preprocess = bool(obj.get("preprocess", preprocess))
                    if "inputs" in obj and isinstance(obj["inputs"], dict):
                        x = {k: _array(v, k) for k, v in obj["inputs"].items()}
                    elif "x" in obj:
                        x = _array(obj["x"], "x")
                    else:
                        raise InputError("JSON object needs \"x\": [...] or \"inputs\": {name: [...]}")
                else:
                    x = _array(obj, "body")
            deadline = None
            if deadline_ms is not None:
                try:
                    deadline = float(deadline_ms) / 1000.0
                except (TypeError, ValueError) as exc:
                    raise InputError(f"deadline_ms must be a number (got {deadline_ms!r})") from exc
            fut = agent.submit(x, deadline, preprocess=preprocess, source="http")
            result = fut.result(self.server.cfg.timeout_s)
        except InputError as exc:
            self._error(400, exc)
            return
        except OverloadError as exc:
            self._error(503, exc, {"Retry-After": "1"})
            return
        except TimeoutError:
            self._error(504, f"no result within {self.server.cfg.timeout_s:g} s ([api] timeout_s)")
            return
        except EdgeshipError as exc:
            self._error(500, exc)
            return
        self._json(200, result.to_dict(outputs=want_outputs))

    def _feedback(self) -> None:
        agent = self.server.agent
        body = self._body()
        if body is None:
            return
        try:
            obj = json.loads(body)
            if not isinstance(obj, dict) or "prediction_id" not in obj or "kind" not in obj:
                raise InputError("feedback needs a JSON object with prediction_id and kind (and value)")
        except ValueError as exc:
            self._error(400, f"body is not valid JSON: {exc}")
            return
        except InputError as exc:
            self._error(400, exc)
            return
        try:
            out = agent.feedback(obj["prediction_id"], obj["kind"], obj.get("value"))
        except FeedbackUnavailableError as exc:
            self._error(503, exc)
            return
        except InputError as exc:
            self._error(400, exc)
            return
        except EdgeshipError as exc:
            self._error(500, exc)
            return
        msg_id = out.get("msg_id") if isinstance(out, Mapping) else None
        self._json(200, {"ok": True, "msg_id": msg_id})


class _UnixHandler(_Handler):
    disable_nagle_algorithm = False  # TCP_NODELAY does not exist on Unix sockets


def _array(v: Any, what: str) -> np.ndarray:
    try:
        a = np.asarray(v)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{what}: not an array of numbers ({exc})") from exc
    if a.dtype == object:
        raise InputError(f"{what}: ragged or mixed array; send a rectangular array of numbers")
    if a.dtype.kind not in "biuf":
        raise InputError(f"{what}: values must be numbers (got {a.dtype.kind!r} data)")
    if a.dtype.kind == "f":
        a = a.astype(np.float32, copy=False)
    return a


class _TcpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def server_bind(self) -> None:
        try:
            os.unlink(self.server_address)
        except FileNotFoundError:
            pass
        super().server_bind()
        self.server_name, self.server_port = "unix", 0


class ApiServer:
    """Owns the HTTP server thread: ``start()``, ``stop(timeout)``; ``url`` once started."""

    def __init__(self, agent, cfg) -> None:
        self.agent = agent
        self.cfg = cfg
        self._server = None
        self._thread: threading.Thread | None = None

    def start(self) -> "ApiServer":
        cfg = self.cfg
        try:
            if cfg.unix_socket:
                srv = _UnixServer(cfg.unix_socket, _UnixHandler)
            else:
                srv = _TcpServer((cfg.host, cfg.port), _Handler)
        except OSError as exc:
            where = cfg.unix_socket or f"{cfg.host}:{cfg.port}"
            raise EdgeshipError(f"[api] cannot listen on {where}: {exc.strerror or exc} "
                                "(another agent running? change [api] port)") from exc
        srv.agent = self.agent
        srv.cfg = cfg
        self._server = srv
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="edgeship-api", daemon=True)
        self._thread.start()
        log.info("local API on %s", self.url)
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
        if self._thread is not None:
            self._thread.join(timeout)
        if self.cfg.unix_socket:
            try:
                os.unlink(self.cfg.unix_socket)
            except OSError:
                pass
        self._server = None
