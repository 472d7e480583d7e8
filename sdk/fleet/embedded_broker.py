"""An embedded MQTT broker (amqtt) on 127.0.0.1 for runs without ``--broker``.

``edgeship demo`` and the fleet commands need a broker; when the user names
none, :class:`EmbeddedBroker` runs amqtt's broker in its own thread with its
own asyncio loop on a free loopback port. It keeps state in memory only: for
a real fleet, run Mosquitto with ``persistence true`` and pass ``--broker``
(docs/secure-broker.md).

Why it does not persist: amqtt 0.12's only persistence, its optional
``SessionDBPlugin`` (SQLAlchemy + aiosqlite, not edgeship dependencies),
stores retained messages, persistent sessions' subscriptions and messages
queued for a *disconnected* persistent client, but not a QoS 1 message in
flight to a connected subscriber; it keeps queued payloads as text, never
deletes a queued message once delivered (replayed after every restart), and
clears everything on a clean shutdown unless told not to. That would not make
"accepted means kept" true, so it is not enabled. (Seen besides: a QoS 1
message for a persistent session that is away is acked and never delivered;
tests/test_broker_persistence.py.)
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from ..errors import TransportError

__all__ = ["EmbeddedBroker"]

log = logging.getLogger("edgeship.fleet.broker")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """``start()`` / ``stop(timeout)``; ``url`` is ``mqtt://127.0.0.1:<port>`` once started."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._ready = threading.Event()
        self._done: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> "EmbeddedBroker":
        if self._thread is not None:
            return self
        try:
            import amqtt.broker  # noqa: F401
        except ImportError as exc:
            raise TransportError("the embedded broker needs amqtt: pip install 'edgeship[fleet]', "
                                 "or pass --broker mqtt://HOST:PORT") from exc
        if not self.port:
            self.port = _free_port(self.host)
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TransportError(f"the embedded MQTT broker did not start within {timeout:.0f}s")
        if self._error is not None:
            self._thread.join(2)
            self._thread = None
            raise TransportError(f"the embedded MQTT broker failed to start on {self.host}:{self.port}: "
                                 f"{self._error}") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, done, t = self._loop, self._done, self._thread
        if t is None:
            return
        if loop is not None and done is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(done.set)
            except RuntimeError:  # loop already closed between the check and the call
                pass
        t.join(timeout)
        self._thread = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ thread body
    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 0}},
            # No $SYS publishing, no packet logging: an embedded broker stays quiet.
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    def _run(self) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        self._loop = loop
        # amqtt logs every connection at INFO; keep the user's terminal for edgeship's own lines.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)

        async def main() -> None:
            self._done = asyncio.Event()
            self._broker = Broker(self._config(), loop=loop)
            try:
                await self._broker.start()
            except BaseException as exc:  # noqa: BLE001 - reported to start() in the caller's thread
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._done.wait()
            try:
                await asyncio.wait_for(self._broker.shutdown(), 5)
            except (asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001 - stopping anyway
                log.debug("embedded broker shutdown: %s", exc)

        try:
            loop.run_until_complete(main())
            # Let cancelled client handlers finish so no "Task was destroyed" warnings appear.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
            self._ready.set()
