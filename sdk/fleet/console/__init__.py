"""The fleet web console: devices, rollouts and field feedback in a browser.

    from edgeship.fleet.console import FleetConsole
    with FleetConsole.open(db="fleet.sqlite", broker="mqtt://127.0.0.1:1883", config="fleet.toml") as c:
        print(c.url)

Pieces (each usable alone):

* :mod:`.auth` — password/token hashing, sessions, CSRF (pure)
* :mod:`.config` — the ``[console]`` section of the fleet config, ``console init``
* :mod:`.data` — :class:`ConsoleData`, what the pages show, from the fleet library
* :mod:`.app` — :func:`create_app`, the Starlette app (pages + ``/api/v1``)
* :mod:`.server` — :class:`ConsoleServer`, uvicorn in a thread with start/stop

Starlette, uvicorn and Jinja2 come with the ``console`` extra and are imported
only when a console is built.
"""
from __future__ import annotations

from .config import ConsoleConfig, default_config_path, init_console_config, load_console_config

__all__ = [
    "ConsoleConfig",
    "default_config_path",
    "init_console_config",
    "load_console_config",
    "FleetConsole",
]


def __getattr__(name: str):
    if name == "FleetConsole":
        from .process import FleetConsole

        return FleetConsole
    raise AttributeError(name)
