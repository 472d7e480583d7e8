"""One thread lifecycle for every long-running component: ``start()``, ``stop(timeout)``, ``wait(interval)``.

A component that owns a thread subclasses :class:`Loop` and writes only its
loop body::

    class Telemetry(Loop):
        def __init__(self, ...):
            super().__init__("telemetry")

        def run(self):
            while not self.wait(self.window_s):   # True as soon as stop() is called
                self.flush()

The contract (the same for the agent's and the fleet's loops):

* ``start()`` is idempotent: a running loop is left alone and ``start()``
  returns ``self``. A stopped loop starts afresh: the stop flag is cleared
  *before* the new thread starts, so a restarted loop never sees the old stop.
* ``stop(timeout=STOP_TIMEOUT_S)`` asks the loop to end and waits at most
  ``timeout`` seconds for its thread; True when no thread is left running.
  Safe before ``start()``, twice, and from the loop's own thread (there it
  only asks: a thread cannot wait for itself).
* ``wait(interval)`` is the loop's only way to pause: an ``Event`` wait that
  returns True at once when stopping (never ``time.sleep``, which a stop
  would have to sit out). ``stopping`` reads the flag without waiting.
* Used as a context manager it starts on enter and stops on exit.
* The thread is a daemon named ``name`` (``ps -L``, ``py-spy`` and log
  records show it). An exception that escapes ``run()`` is logged with its
  traceback and kept in ``error`` (``alive`` turns False): a loop never dies
  silently. Loops that must survive one bad step catch per step, as before.

Subclass hooks: ``_on_start()`` runs in the caller's thread after the stop
flag is cleared and before the thread starts (a component's start-up work;
return False when there is nothing to run, e.g. no budget to adapt to);
extra clean-up overrides ``stop()`` and calls ``super().stop(timeout)`` first.

Only the standard library here: the agent imports this on a small device.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["Loop", "STOP_TIMEOUT_S"]

log = logging.getLogger("edgeship.lifecycle")

#: The default of every ``stop(timeout)``: long enough for a loop step that
#: writes to SQLite or publishes (well under a second), short enough that a
#: stuck loop never holds the agent's shutdown for long.
STOP_TIMEOUT_S = 5.0


class Loop:
    """A component that owns one thread running :meth:`run` (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.error: str | None = None   # why run() ended with an exception, if it did
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Serialises start and stop: a start racing a stop either finds the old thread
        # (and returns) or starts after the stop has joined it, never in between.
        self._lifecycle = threading.Lock()

    # -- to override ------------------------------------------------------------------
    def run(self) -> None:
        """The loop body, on the loop's thread; return when :meth:`wait` (or ``stopping``) says so."""
        raise NotImplementedError

    def _on_start(self) -> bool | None:
        """Start-up work in the caller's thread, before the loop's thread starts; False: start no thread."""
        return None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> Any:
        with self._lifecycle:
            if self.alive:
                return self
            self._stopping.clear()
            self.error = None
            if self._on_start() is False:
                return self
            t = threading.Thread(target=self._main, name=self.name, daemon=True)
            self._thread = t
            t.start()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        # Set before taking the lock: a start() still busy in _on_start sees the stop too.
        self._stopping.set()
        t = self._thread
        if t is threading.current_thread():
            return False  # asked from the loop itself: it ends when run() returns
        with self._lifecycle:
            t = self._thread
            if t is None:
                return True
            t.join(max(0.0, timeout))
            self._thread = None
            if t.is_alive():
                log.warning("%s did not stop within %.1f s; left behind", self.name, timeout)
                return False
            return True

    def wait(self, interval: float) -> bool:
        """Pause up to ``interval`` seconds; True when the loop is asked to stop (at once, then)."""
        return self._stopping.wait(max(0.0, interval))

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def alive(self) -> bool:
        """The loop's thread is running."""
        t = self._thread
        return t is not None and t.is_alive()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            self.run()
        except Exception as exc:  # noqa: BLE001 - reported here so no loop dies silently
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("%s stopped on an error", self.name)
