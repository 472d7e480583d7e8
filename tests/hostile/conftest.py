"""The hostile-input corpus (issue 17): hostile or faulty cases, each asserting the system held.

Every test module here sets ``AREA`` (e.g. "packages", "MQTT/collector", "faults", "local API");
each collected case counts as *tried* in its area and as *held* when it passed. At the end of
a run the terminal summary prints the table ``area | tried | held``:

    python -m pytest tests/hostile -q

A case that is skipped (a missing broker, not root for a tmpfs) is neither tried nor held.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

_TALLY: dict[str, list[int]] = {}


def pytest_collection_modifyitems(items):
    for item in items:
        area = getattr(getattr(item, "module", None), "AREA", None)
        if area:
            item.user_properties.append(("hostile_area", area))


def pytest_runtest_logreport(report):
    area = dict(report.user_properties).get("hostile_area")
    if not area:
        return
    # One count per case: its call (or the setup that failed before it).
    if report.when == "call" or (report.when == "setup" and report.failed):
        t = _TALLY.setdefault(area, [0, 0])
        t[0] += 1
        t[1] += int(report.passed)


def tally_table(tally: dict[str, list[int]]) -> list[str]:
    """The ``area | tried | held`` table (pure)."""
    rows = [("area", "tried", "held")] + [(a, str(t), str(h)) for a, (t, h) in sorted(tally.items())]
    rows.append(("total", str(sum(t for t, _ in tally.values())), str(sum(h for _, h in tally.values()))))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return [" | ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows]


def pytest_terminal_summary(terminalreporter):
    if not _TALLY:
        return
    terminalreporter.section("hostile corpus")
    for line in tally_table(_TALLY):
        terminalreporter.write_line(line)


@pytest.fixture()
def tiny_disk():
    """A real 4 MiB filesystem (tmpfs) to fill up; skipped where it cannot be mounted (not root)."""
    if os.geteuid() != 0:
        pytest.skip("a full disk needs a tmpfs mount, which needs root")
    d = Path(tempfile.mkdtemp(prefix="edgeship-tinydisk-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()[:200]}")
    try:
        yield TinyDisk(d)
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True, check=False)
        os.rmdir(d)


class TinyDisk:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        """Write until ENOSPC: the disk is really full."""
        chunk = b"\0" * 4096
        with open(self.filler, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(chunk)
            except OSError as exc:
                assert exc.errno == 28, exc

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)
