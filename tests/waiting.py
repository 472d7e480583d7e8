"""Polling with a deadline, shared by the tests that wait for another thread or process."""
from __future__ import annotations

import time


def wait_until(cond, timeout: float, step: float = 0.05) -> bool:
    """Poll ``cond`` every ``step`` s until it is true or ``timeout`` s passed; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()
