"""Run the console app under uvicorn in a thread of its own.

:class:`ConsoleServer` owns the uvicorn server and its thread (``start()``,
``stop(timeout)``, context manager), so the console can sit in one fleet
process beside the collector, the controller and the package server, and so
tests can run it on a free port.
"""
from __future__ import annotations

import logging
import socket
import threading
import time

from ...errors import ConfigError, TransportError
from .config import ConsoleConfig

__all__ = ["ConsoleServer"]

log = logging.getLogger(__name__)


class ConsoleServer:
    """uvicorn serving ``app`` on ``host:port`` (TLS when the config names a certificate)."""

    def __init__(self, app, config: ConsoleConfig, *, host: str | None = None, port: int | None = None,
                 access_log: bool = False) -> None:
        self.app = app
        self.config = config
        self.host = host or config.host
        self.port = config.port if port is None else port
        self.access_log = access_log
        self._server = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()  # only used as an interruptible sleep

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "ConsoleServer":
        import uvicorn

        if self._thread is not None:
            raise ConfigError("console server already started; stop() it before starting again")
        # Bind here, in the caller's thread, so a busy port fails start() with a
        # clear error and port 0 resolves to the real port before we return.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise TransportError(f"console cannot listen on {self.host}:{self.port}: {exc.strerror}; "
                                 "choose another --port or stop what uses it") from exc
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._sock = sock
        kwargs = {}
        if self.config.tls:
            kwargs.update(ssl_certfile=self.config.tls_cert, ssl_keyfile=self.config.tls_key)
        # Proxy headers only from configured proxies: uvicorn's default trusts X-Forwarded-For from
        # 127.0.0.1, and any local client could then choose its address (issue 17, item 18).
        proxies = self.config.trusted_proxies
        cfg = uvicorn.Config(self.app, log_level="warning", access_log=self.access_log, lifespan="off",
                             timeout_graceful_shutdown=2, log_config=None, proxy_headers=bool(proxies),
                             forwarded_allow_ips=list(proxies) or None, **kwargs)
        self._server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self._run, name="edgeship-console", daemon=True)
        self._thread.start()
        # uvicorn sets .started once it accepts connections; poll it with a deadline.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._error is None and self._thread.is_alive():
            if self._server.started:
                break
            self._ready.wait(0.02)
        if self._error is not None or not (self._server and self._server.started):
            err = self._error
            self.stop(2.0)
            raise TransportError(f"console did not start on {self.host}:{self.port}: {err or 'timed out'}") from err
        log.info("console listening on %s", self.url)
        return self

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # noqa: BLE001 - reported to start()/stop() callers
            self._error = exc

    def stop(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
        self._thread = None
        self._server = None
        self._sock = None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (Ctrl-C in the CLI); True when it has stopped."""
        t = self._thread
        if t is None:
            return True
        t.join(timeout)
        return not t.is_alive()

    def __enter__(self) -> "ConsoleServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
