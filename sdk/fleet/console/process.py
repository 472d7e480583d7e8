"""One fleet process around the console: DB, collector, rollout controller, package server.

``edgeship fleet console`` calls :meth:`FleetConsole.open` and nothing else.
Each part is the same object the other ``edgeship fleet`` commands build, so
the console shows and does exactly what the CLI would.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from ...errors import ConfigError, EdgeshipError
from .config import ConsoleConfig, load_console_config

__all__ = ["FleetConsole"]

log = logging.getLogger("edgeship.fleet.console")


class FleetConsole:
    """Owns the parts it started; ``start()`` / ``stop(timeout)`` / context manager."""

    def __init__(self, config: ConsoleConfig, db, *, broker: str | None = None, fleet: str = "default",
                 host: str | None = None, port: int | None = None, packages_dir: str | os.PathLike | None = None,
                 signing_key: str | os.PathLike | None = None, own_db: bool = False, link_options=None) -> None:
        self.config = config
        self.db = db
        self.broker = broker
        self.fleet = fleet
        self.host = host
        self.port = port
        self.packages_dir = Path(packages_dir) if packages_dir else None
        self.signing_key = signing_key
        self.link_options = link_options  # edgeship.mqtt.LinkOptions: broker login and TLS files
        self._own_db = own_db
        self._stack = None  # edgeship.fleet.stack.FleetStack: collector, controller, package server
        self.collector = None
        self.controller = None
        self.package_server = None
        self.server = None
        self._stopped = threading.Event()

    @classmethod
    def open(cls, *, config: str | os.PathLike | ConsoleConfig | None = None, db: str | os.PathLike = "edgeship-fleet.sqlite",
             broker: str | None = None, fleet: str = "default", host: str | None = None, port: int | None = None,
             packages_dir: str | os.PathLike | None = None,
             signing_key: str | os.PathLike | None = None, link_options=None) -> "FleetConsole":
        from ..db import FleetDB

        cfg = config if isinstance(config, ConsoleConfig) else load_console_config(config)
        if packages_dir is not None and not Path(packages_dir).is_dir():
            raise ConfigError(f"--serve-packages {str(packages_dir)!r} is not a directory")
        return cls(cfg, FleetDB.open(db), broker=broker, fleet=fleet, host=host, port=port,
                   packages_dir=packages_dir, signing_key=signing_key, own_db=True, link_options=link_options)

    @property
    def url(self) -> str:
        return self.server.url if self.server is not None else ""

    def start(self) -> "FleetConsole":
        from ..stack import FleetStack
        from .app import create_app
        from .data import ConsoleData
        from .server import ConsoleServer

        # The same assembly `edgeship fleet rollout run` and the demo use; the DB stays ours.
        self._stack = FleetStack(self.db, broker_url=self.broker, fleet=self.fleet, collect=bool(self.broker),
                                 packages_dir=self.packages_dir, package_host=self.host or self.config.host,
                                 controller="loop" if self.broker else None, signing_key=self.signing_key,
                                 serve_host=self.host or self.config.host, link_options=self.link_options)
        try:
            self._stack.start()
            self.collector, self.controller = self._stack.collector, self._stack.controller
            self.package_server = self._stack.package_server
            data = ConsoleData(self.db, controller=self.controller, packages_dir=self.packages_dir,
                               package_url=self._stack.package_url)
            server = ConsoleServer(create_app(self.config, data), self.config, host=self.host, port=self.port)
            self.server = server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.server is not None:
            try:
                self.server.stop(timeout)  # first: no request reaches parts already stopped
            except EdgeshipError as exc:  # keep stopping the others
                log.warning("console: stopping the web server: %s", exc)
        if self._stack is not None:
            self._stack.stop(timeout)
        if self._own_db and self.db is not None:
            self.db.close()
            self.db = None
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the web server stops (or ``timeout``); True once stopped."""
        if self.server is None:
            return True
        return self.server.wait(timeout)

    def __enter__(self) -> "FleetConsole":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
