"""Console responsiveness with a large fleet DB (issue 11).

Fills a fresh SQLite fleet DB through the collector's own storage path
(``FleetDB.store_messages`` on parsed v1 messages) with 1,000 devices,
100,000 telemetry windows and 20,000 feedback events, starts the console
on 127.0.0.1 and measures, over repeated requests:

* server time for each page and API call (HTTP request to last byte), and
* when Chromium is installed, the browser's page load (navigation start to
  load event, charts drawn), the figure a user feels.

Target: page load <= 300 ms. Prints each figure and its ratio to the target.

    python benchmarks/console.py [--devices 1000] [--telemetry 100000] [--repeat 15]
"""
from __future__ import annotations

import argparse
import http.client
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edgeship import protocol
from edgeship.fleet.console import auth
from edgeship.fleet.console.app import create_app
from edgeship.fleet.console.config import ConsoleConfig
from edgeship.fleet.console.data import ConsoleData
from edgeship.fleet.console.server import ConsoleServer
from edgeship.fleet.db import FleetDB

TARGET_MS = 300.0
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def fill(db: FleetDB, n_devices: int, n_telemetry: int, n_feedback: int, now: float) -> None:
    rng = random.Random(7)
    devices = [f"pi-{i:04d}" for i in range(n_devices)]

    def msg(kind: str, device: str, body: dict, ts: float) -> protocol.Message:
        m = protocol.make_message(kind, device, body, ts=ts)
        return protocol.Message(kind, "bench", device, m)

    batch = [msg("state", d, {"online": rng.random() > 0.1, "model": {"name": "digits", "version": rng.choice(["1.0.0", "1.1.0"])}},
                 now - 100) for d in devices]
    db.store_messages(batch)
    per_device = n_telemetry // n_devices
    batch = []
    t0 = time.perf_counter()
    for k in range(per_device):
        ts = now - (per_device - k) * 60
        for d in devices:
            batch.append(msg("telemetry", d, {
                "window_s": 60, "counts": {"inferences": rng.randint(100, 2000), "errors": rng.randint(0, 5)},
                "latency_ms": {"p50": 1.0, "p95": rng.uniform(2, 8), "p99": 10.0},
                "model": {"name": "digits", "version": "1.0.0"}}, ts))
            if len(batch) >= 5000:
                db.store_messages(batch)
                batch = []
    for i in range(n_feedback):
        d = devices[i % n_devices]
        batch.append(msg("feedback", d, {"prediction_id": f"p{i}", "kind": "incorrect" if rng.random() < 0.1 else "correct",
                                         "model": {"version": rng.choice(["1.0.0", "1.1.0"])}},
                         now - rng.uniform(0, 6 * 3600)))
        if len(batch) >= 5000:
            db.store_messages(batch)
            batch = []
    if batch:
        db.store_messages(batch)
    print(f"filled in {time.perf_counter() - t0:.1f} s: {n_devices} devices, {per_device * n_devices} telemetry rows, "
          f"{n_feedback} feedback rows", file=sys.stderr)


def timed_get(host: str, port: int, path: str, token: str) -> float:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    t = time.perf_counter()
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    body = resp.read()
    dt = (time.perf_counter() - t) * 1000
    conn.close()
    if resp.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {resp.status}: {body[:200]!r}")
    return dt


def browser_loads(url: str, password: str, pages: list[str], repeat: int) -> dict[str, list[float]]:
    from playwright.sync_api import sync_playwright

    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = ctx.new_page()
        page.goto(url + "/login")
        page.fill("#user", "admin")
        page.fill("#password", password)
        page.click("#login-button")
        page.wait_for_selector("#devices-table")
        for path in pages:
            times = []
            for _ in range(repeat):
                page.goto(url + path, wait_until="load")
                nav = page.evaluate("() => { const n = performance.getEntriesByType('navigation')[0];"
                                    " return n.loadEventEnd - n.startTime; }")
                times.append(float(nav))
            out[path] = times
        ctx.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--telemetry", type=int, default=100_000)
    ap.add_argument("--feedback", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        db = FleetDB.open(Path(d) / "fleet.sqlite")
        now = time.time()
        fill(db, args.devices, args.telemetry, args.feedback, now)
        token, password = auth.new_token(), "benchmark-pass"
        cfg = ConsoleConfig(password_hash=auth.hash_password(password), token_sha256=auth.token_digest(token))
        data = ConsoleData(db, online_window_s=15 * 60)
        with ConsoleServer(create_app(cfg, data), cfg, port=0) as server:
            paths = ["/devices", "/devices?sort=p95_ms&order=desc", "/devices/pi-0500", "/feedback", "/rollouts",
                     "/api/v1/devices?limit=1000", "/api/v1/devices/pi-0500", "/api/v1/feedback"]
            print(f"load: {os.getloadavg()[0]:.2f} (1-min) on {os.cpu_count()} CPUs; repeat={args.repeat}")
            print(f"{'request':40s} {'median ms':>10s} {'p95 ms':>8s} {'median/target':>14s}")
            worst = 0.0
            for path in paths:
                timed_get(server.host, server.port, path, token)  # warm (templates compiled, pages cached)
                times = sorted(timed_get(server.host, server.port, path, token) for _ in range(args.repeat))
                med, p95 = statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]
                worst = max(worst, med)
                print(f"server  GET {path:32s} {med:10.1f} {p95:8.1f} {med / TARGET_MS:13.2f}x")
            if CHROMIUM:
                loads = browser_loads(server.url, password, ["/devices", "/devices/pi-0500", "/feedback", "/rollouts"],
                                      max(3, args.repeat // 3))
                for path, times in loads.items():
                    times.sort()
                    med = statistics.median(times)
                    worst = max(worst, med)
                    print(f"browser load {path:31s} {med:10.1f} {times[-1]:8.1f} {med / TARGET_MS:13.2f}x")
            else:
                print("browser: chromium not installed, browser load not measured")
            print(f"worst median: {worst:.1f} ms = {worst / TARGET_MS:.2f}x the {TARGET_MS:.0f} ms target "
                  f"({'met' if worst <= TARGET_MS else 'MISSED'})")
        db.close()


if __name__ == "__main__":
    main()
