"""One fleet process's parts, assembled in one place: DB, broker, collector, package server, controller.

``edgeship fleet rollout ...``, ``edgeship fleet console`` and ``edgeship demo``
each run some of these parts together. :class:`FleetStack` starts the ones
asked for, in dependency order (the broker before the clients that connect
to it, the package server before the controller that points plans at it),
and stops them in reverse, each with a timeout, even when one of them fails
to stop or to start. Everything it opened it closes; a DB passed in stays
open.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from ..errors import EdgeshipError

__all__ = ["FleetStack"]

log = logging.getLogger("edgeship.fleet.stack")

CONTROLLER_MODES = (None, "link", "loop")


class FleetStack:
    """The fleet parts of one process; ``start()`` / ``stop(timeout)`` / context manager.

    * ``db``: a :class:`FleetDB` (left open) or a path/URL (opened and closed here);
    * ``broker_url``: the MQTT broker; with ``embedded_broker=True`` and no URL,
      an embedded broker runs for the stack's lifetime (``on_embedded(url)`` is told);
    * ``collect``: run a :class:`Collector` (needs a broker);
    * ``packages_dir``: serve its ``.edgepkg`` files (:class:`PackageServer` on
      ``package_host``, any free port); the controller's plans point at it;
    * ``controller``: ``None``; ``"link"`` (a controller whose MQTT link is
      connected, for one command); ``"loop"`` (its tick loop running);
    * ``ready_timeout``: wait this long for the collector and a looping
      controller to connect, else :class:`EdgeshipError` (None: do not wait).
    """

    def __init__(self, db: Any, *, broker_url: str | None = None, fleet: str = "default",
                 embedded_broker: bool = False, on_embedded: Callable[[str], None] | None = None,
                 collect: bool = False, packages_dir: str | os.PathLike | None = None,
                 package_host: str = "127.0.0.1", controller: str | None = None, signing_key: Any = None,
                 serve_host: str = "127.0.0.1", serve_port: int = 0, tick_s: float = 1.0,
                 ready_timeout: float | None = None, link_options: Any = None) -> None:
        if controller not in CONTROLLER_MODES:
            raise ValueError(f"controller must be one of {CONTROLLER_MODES}, got {controller!r}")
        self._db_arg = db
        self.broker_url = broker_url or None
        self.fleet = fleet
        self.embedded_broker = embedded_broker
        self.on_embedded = on_embedded
        self.collect = collect
        self.packages_dir = Path(packages_dir) if packages_dir else None
        self.package_host = package_host
        self.controller_mode = controller
        self.signing_key = signing_key
        self.serve_host, self.serve_port = serve_host, serve_port
        self.tick_s = tick_s
        self.ready_timeout = ready_timeout
        self.link_options = link_options  # edgeship.mqtt.LinkOptions for the collector's and controller's links
        self.db = None
        self.broker = None           # the embedded broker, when this stack started one
        self.collector = None
        self.package_server = None
        self.controller = None
        self._own_db = False
        self._parts: list[Any] = []  # started parts, stopped in reverse order

    @property
    def package_url(self) -> str | None:
        return getattr(self.package_server, "url", None)

    def start(self) -> "FleetStack":
        try:
            self._open_db()
            self._start_broker()
            if self.collect and self.broker_url:
                self._start_collector()
            if self.packages_dir is not None:
                from .server import PackageServer

                srv = PackageServer(self.packages_dir, host=self.package_host, port=0)
                self.package_server = self._own(srv.start())
            if self.controller_mode is not None:
                self._start_controller()
        except BaseException:
            self.stop()
            raise
        return self

    def _own(self, part: Any) -> Any:
        self._parts.append(part)
        return part

    def _open_db(self) -> None:
        if hasattr(self._db_arg, "store_messages"):
            self.db = self._db_arg
            return
        from .db import FleetDB

        self.db = FleetDB.open(self._db_arg)
        self._own_db = True

    def _start_broker(self) -> None:
        if self.broker_url or not self.embedded_broker:
            return
        from .embedded_broker import EmbeddedBroker

        self.broker = self._own(EmbeddedBroker().start())
        self.broker_url = self.broker.url
        if self.on_embedded is not None:
            self.on_embedded(self.broker_url)

    def _start_collector(self) -> None:
        from .collector import Collector

        self.collector = self._own(Collector(self.db, self.broker_url, self.fleet,
                                             link_options=self.link_options).start())
        if self.ready_timeout is not None and not self.collector.wait_ready(self.ready_timeout):
            raise EdgeshipError(f"the collector could not connect to the MQTT broker at {self.broker_url}; "
                                "is it running?")

    def _start_controller(self) -> None:
        from .controller import RolloutController

        ctl = RolloutController(self.db, self.broker_url, self.fleet, signing_key=self.signing_key,
                                package_base_url=self.package_url, serve_host=self.serve_host,
                                serve_port=self.serve_port, tick_s=self.tick_s, link_options=self.link_options)
        self.controller = self._own(ctl)
        if self.controller_mode == "loop":
            ctl.start()
            if self.ready_timeout is not None and not ctl.wait_ready(self.ready_timeout):
                raise EdgeshipError(f"the rollout controller could not connect to the MQTT broker at "
                                    f"{self.broker_url}")
        elif ctl.link is not None:
            # One command (pause, abort, ...): connect so the new plan can be published now.
            ctl.link.start()
            ctl.wait_ready(5.0)

    def stop(self, timeout: float = 5.0) -> None:
        while self._parts:
            part = self._parts.pop()
            try:
                part.stop(timeout)
            except EdgeshipError as exc:  # keep stopping the others
                log.warning("stopping %s: %s", type(part).__name__, exc)
        if self._own_db and self.db is not None:
            self.db.close()
            self.db = None

    def __enter__(self) -> "FleetStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
