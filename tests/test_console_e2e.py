"""The console end to end in headless Chromium (Playwright, the system's chromium).

Real parts only: a Mosquitto from the conftest fixture, the real collector
storing into a real SQLite fleet DB, the console under uvicorn on 127.0.0.1,
and a simulated fleet that speaks the v1 MQTT protocol (state, telemetry,
feedback with attached inputs, rollout reports) through that broker.

Screenshots go to the test's tmp dir (``<tmp>/screens/*.png``); the devices
and rollout pages are also copied to ``docs/console.png`` when
``EDGESHIP_UPDATE_DOCS=1``.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from edgeship import protocol  # noqa: E402
from edgeship.fleet.console import auth  # noqa: E402
from edgeship.fleet.console.app import create_app  # noqa: E402
from edgeship.fleet.console.config import ConsoleConfig  # noqa: E402
from edgeship.fleet.console.data import ConsoleData  # noqa: E402
from edgeship.fleet.console.server import ConsoleServer  # noqa: E402
from edgeship.fleet.db import FleetDB  # noqa: E402
from edgeship.mqtt import MqttLink  # noqa: E402

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium); "
                                                "Playwright's own browser download is not used"),
]

FLEET = "e2e"
N_DEVICES = 12
PASSWORD = "console-e2e-pass"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]


def digit_image(k: int) -> np.ndarray:
    """An 8x8 'digit' (a bar pattern per class) in [0, 1], with a batch axis."""
    rng = np.random.default_rng(k)
    img = rng.uniform(0, 0.25, size=(8, 8)).astype(np.float32)
    img[1:7, 1 + k % 6] = 1.0
    img[1 + (k // 6) % 6, 1:7] = 0.7
    return img[None, None]


class SimFleet:
    """N simulated devices on one MQTT link: state, telemetry and feedback every tick.

    A device reports through the same topics and schemas a real agent uses;
    ``switch(device, version)`` / rollout reports are driven by the test.
    Owns its thread: ``start()`` / ``stop(timeout)``.
    """

    def __init__(self, broker_url: str, n: int, tick_s: float = 0.4) -> None:
        self.link = MqttLink(broker_url, client_id=f"sim-fleet-{os.getpid()}")
        self.devices = [f"pi-{i:02d}" for i in range(n)]
        self.version = {d: "1.0.0" for d in self.devices}
        self.tick_s = tick_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._n = 0

    def publish(self, kind: str, device: str, body: dict, retain: bool = False) -> None:
        msg = protocol.make_message(kind, device, body)
        self.link.publish(protocol.device_topic(FLEET, device, kind), protocol.encode(msg), qos=1, retain=retain)

    def model(self, device: str) -> dict:
        return {"name": "digits", "version": self.version[device]}

    def state(self, device: str, online: bool = True) -> None:
        self.publish("state", device, {"online": online, "model": self.model(device), "agent_version": "sim"},
                     retain=True)

    def switch(self, device: str, version: str) -> None:
        with self._lock:
            self.version[device] = version
        self.state(device)

    def start(self) -> "SimFleet":
        self.link.start()
        assert self.link.wait_connected(10), "simulated fleet could not connect to the broker"
        self._thread = threading.Thread(target=self._run, name="sim-fleet", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._n += 1
            with self._lock:
                versions = dict(self.version)
            for i, d in enumerate(self.devices):
                if self._n == 1 or self._n % 10 == i % 10:
                    self.state(d)
                bad = versions[d] != "1.0.0"
                self.publish("telemetry", d, {
                    "window_s": self.tick_s, "model": {"name": "digits", "version": versions[d]},
                    "counts": {"inferences": 200 + 10 * i, "errors": 1 + (4 if bad else 0)},
                    "latency_ms": {"p50": 1.0 + i / 10, "p95": 2.0 + i / 5 + (1.5 if bad else 0), "p99": 6.0}})
                if (self._n + i) % 3 == 0:
                    wrong = (self._n + i) % 4 == 0 or bad
                    body = {"prediction_id": f"{d}-{self._n}", "kind": "incorrect" if wrong else "correct",
                            "model": {"name": "digits", "version": versions[d]}}
                    if wrong:
                        img = digit_image(self._n * 31 + i * 7)
                        body["value"] = str((self._n + i) % 10)
                        body["input"] = {"input": protocol.array_field("float32", img.shape, img.tobytes())}
                    self.publish("feedback", d, body)
            self._stop.wait(self.tick_s)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for d in self.devices:
            self.state(d, online=False)
        self.link.stop(timeout)


@pytest.fixture()
def fleet_console(mosquitto, tmp_path):
    from edgeship.fleet.collector import Collector

    db = FleetDB.open(tmp_path / "fleet.sqlite")
    token = auth.new_token()
    cfg = ConsoleConfig(password_hash=auth.hash_password(PASSWORD), token_sha256=auth.token_digest(token),
                        session_ttl_s=3600)
    collector = Collector(db, mosquitto.url, FLEET, client_id=f"e2e-collector-{tmp_path.name}"[:60])
    collector.start()
    assert collector.wait_ready(10)
    data = ConsoleData(db, export_dir=tmp_path / "exports")
    server = ConsoleServer(create_app(cfg, data), cfg, port=0).start()
    try:
        yield {"db": db, "server": server, "collector": collector, "url": server.url, "token": token,
               "broker": mosquitto.url, "tmp": tmp_path}
    finally:
        server.stop()
        collector.stop()
        db.close()


@pytest.fixture()
def browser_page(tmp_path):
    with sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "chromium-profile"), executable_path=CHROMIUM,
                                                   headless=True, args=CHROMIUM_ARGS,
                                                   viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        page.set_default_timeout(15000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.js_errors = errors
        try:
            yield page
        finally:
            ctx.close()


def shot(page, tmp_path: Path, name: str) -> Path:
    d = tmp_path / "screens"
    d.mkdir(exist_ok=True)
    path = d / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def login(page, url: str) -> None:
    page.goto(url + "/devices")
    assert page.locator("#login-form").is_visible()
    page.fill("#user", "admin")
    page.fill("#password", "not-the-password")
    page.click("#login-button")
    assert "Wrong user name or password" in page.inner_text("#login-error")
    page.fill("#user", "admin")
    page.fill("#password", PASSWORD)
    page.click("#login-button")
    page.wait_for_selector("#devices-table")


def test_console_shows_a_live_fleet(fleet_console, browser_page):
    page, url, tmp = browser_page, fleet_console["url"], fleet_console["tmp"]
    login(page, url)
    sim = SimFleet(fleet_console["broker"], N_DEVICES).start()
    try:
        # No reload: the page's live refresh must bring the devices in.
        page.wait_for_function(f"() => document.querySelector('#n-online') && "
                               f"document.querySelector('#n-online').textContent.trim() === '{N_DEVICES}'",
                               timeout=20000)
        page.wait_for_function("() => document.querySelectorAll('#devices-table tbody tr[data-device]').length === "
                               f"{N_DEVICES}")
        rows = page.locator("#devices-table tbody tr[data-device]")
        assert rows.first.get_attribute("data-device") == "pi-00"
        # p95 figures arrive with telemetry.
        page.wait_for_function("() => [...document.querySelectorAll('#devices-table tbody tr td.num')]"
                               ".some(td => td.textContent.trim() !== '—')")
        shot(page, tmp, "devices")
        # Sort by p95 descending: pi-11 has the highest latency in the simulation.
        page.click("a.sort:has-text('p95 ms')")
        page.click("a.sort:has-text('p95 ms')")
        page.wait_for_function("() => document.querySelector('#devices-table tbody tr').dataset.device === 'pi-11'")
        # Filter.
        page.fill("#filter-q", "pi-0")
        page.click("#device-filter button[type=submit]")
        page.wait_for_function("() => document.querySelectorAll('#devices-table tbody tr[data-device]').length === 10")
        # Device page with history chart.
        page.click("a[href='/devices/pi-03']")
        page.wait_for_selector("#device-model")
        assert "1.0.0" in page.inner_text("#device-model")
        page.wait_for_function("() => document.querySelector('.chart[data-rendered] svg path.series')")
        shot(page, tmp, "device")
        # Feedback page: counts per version and the incorrect samples as images.
        page.click("nav a[href='/feedback']")
        page.wait_for_selector("#feedback-table tr[data-version='1.0.0']")
        page.wait_for_function("() => [...document.querySelectorAll('#samples img')].some(i => i.complete && i.naturalWidth === 128)")
        shot(page, tmp, "feedback")
    finally:
        sim.stop()
    # Devices go offline when the fleet stops; the live page shows it.
    page.goto(url + "/devices")
    page.wait_for_function(f"() => document.querySelector('#n-offline').textContent.trim() === '{N_DEVICES}'",
                           timeout=20000)
    assert page.js_errors == []
