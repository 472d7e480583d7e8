"""`edgeship agent doctor`: check what a device needs and say what to fix.

Each check is a small function returning a :class:`Check`; they never raise
(a check that crashes is reported as failed with its error), so the doctor
always prints a full table. Only the standard library and the runtimes
themselves are used, so it works on a half-installed device.
"""
from __future__ import annotations

import email.utils
import errno
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

__all__ = ["Check", "run_checks", "format_checks", "summarize", "check_model", "check_sources", "check_api_port",
           "serving_checks"]

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_onnxruntime() -> Check:
    ver = _version("onnxruntime")
    if ver is None:
        return Check("onnxruntime", FAIL, "not installed", "pip install 'edgeship[agent]'")
    try:
        ort = importlib.import_module("onnxruntime")
        providers = ", ".join(ort.get_available_providers())
    except Exception as exc:  # a broken wheel (wrong arch, missing libstdc++) shows here
        return Check("onnxruntime", FAIL, f"{ver} installed but import fails: {exc}",
                     "reinstall onnxruntime for this platform: pip install --force-reinstall onnxruntime")
    return Check("onnxruntime", OK, f"{ver} ({providers})")


def check_tflite() -> Check:
    found = []
    for _mod, dist in (("ai_edge_litert.interpreter", "ai-edge-litert"),
                      ("tflite_runtime.interpreter", "tflite-runtime"),
                      ("tensorflow", "tensorflow")):
        ver = _version(dist)
        if ver is None:
            continue
        found.append(f"{dist} {ver}")
    if not found:
        return Check("tflite", WARN, "no TFLite interpreter installed (only needed for .tflite models)",
                     "pip install 'edgeship[tflite]' (or tflite-runtime with numpy<2)")
    detail = "; ".join(found) + " (first one is used)"
    if any(f.startswith("tflite-runtime") for f in found):
        np_ver = _version("numpy") or "?"
        if np_ver.split(".")[0].isdigit() and int(np_ver.split(".")[0]) >= 2 and len(found) == 1:
            return Check("tflite", FAIL, f"{detail}; numpy {np_ver}",
                         "tflite-runtime needs numpy<2: pip install 'numpy<2', or use ai-edge-litert")
    return Check("tflite", OK, detail)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def check_cpu() -> Check:
    machine = platform.machine()
    flags = _cpu_flags()
    cores = os.cpu_count() or 1
    if machine in ("aarch64", "arm64"):
        want = {"asimd"}
        nice = [f for f in ("asimddp", "i8mm") if f in flags]  # int8 dot products (Pi 5: asimddp)
        missing = want - flags
        detail = f"{machine}, {cores} cores, NEON {'yes' if not missing else 'no'}" + (f", {', '.join(nice)}" if nice else "")
        if missing and flags:
            return Check("cpu", WARN, detail, "int8 kernels need NEON (asimd); expect slow inference")
        return Check("cpu", OK, detail)
    if machine in ("x86_64", "AMD64"):
        nice = [f for f in ("avx2", "avx512_vnni", "avx_vnni") if f in flags]
        return Check("cpu", OK, f"{machine}, {cores} cores" + (f", {', '.join(nice)}" if nice else ""))
    if machine.startswith("armv7") or machine == "armv6l":
        return Check("cpu", FAIL, f"{machine} (32-bit)", "use Raspberry Pi OS 64-bit: onnxruntime has no 32-bit ARM wheels")
    return Check("cpu", WARN, f"{machine}, {cores} cores", "untested architecture")


def check_disk(state_dir: str | os.PathLike, min_free_mb: int = 200) -> Check:
    path = Path(state_dir)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free_mb = usage.free / 2**20
    writable = os.access(probe, os.W_OK)
    detail = f"{free_mb:.0f} MB free at {probe}"
    if not writable:
        return Check("disk", FAIL, detail + " (not writable)", f"give the agent's user write access to {path}")
    if free_mb < min_free_mb:
        return Check("disk", FAIL, detail, f"free at least {min_free_mb} MB: the store keeps two model versions")
    return Check("disk", OK, detail)


def check_memory(min_avail_mb: int = 150) -> Check:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        avail = int(info["MemAvailable"].split()[0]) / 1024
        total = int(info["MemTotal"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return Check("memory", SKIP, "no /proc/meminfo")
    detail = f"{avail:.0f} MB available of {total:.0f} MB"
    if avail < min_avail_mb:
        return Check("memory", FAIL, detail, "stop other services or use a smaller (int8) model variant")
    return Check("memory", OK, detail)


def check_broker(url: str | None, timeout: float = 3.0) -> Check:
    if not url:
        return Check("broker", SKIP, "no [mqtt] broker configured", "set [mqtt] broker = \"mqtt://host:1883\" to report to the fleet")
    parsed = urllib.parse.urlparse(url if "://" in url else f"mqtt://{url}")
    port = parsed.port or (8883 if parsed.scheme in ("mqtts", "ssl") else 1883)
    host = parsed.hostname or "localhost"
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        return Check("broker", FAIL, f"{host}:{port} unreachable: {exc.strerror or exc}",
                     "check the broker address, the network and the firewall; the agent buffers until it is back")
    # Whether the broker persists cannot be seen from a client (MQTT has no such signal). With a
    # collector that announces end-to-end receipts the outbox keeps every row until it is stored,
    # so persistence matters only for an old collector (and for retained state and plans).
    return Check("broker", OK, f"{host}:{port} reachable in {1000 * (time.monotonic() - start):.0f} ms; "
                 "rows leave the outbox on the collector's receipt; with a collector that sends none the "
                 "broker must persist (Mosquitto: persistence true, docs/secure-broker.md)")


def check_keys(paths: Iterable[str], allow_unsigned: bool | None = None) -> Check:
    """``allow_unsigned``: the config's ``[agent] allow_unsigned``; None when no config was given."""
    paths = list(paths)
    fix = "set [agent] trusted_keys = [\"/etc/edgeship/fleet.pub\"] so tampered packages are refused"
    if not paths and allow_unsigned:
        return Check("trust", WARN, "allow_unsigned = true: packages run unsigned, tampered ones too", fix)
    if not paths and allow_unsigned is False:
        return Check("trust", FAIL, "no trusted keys and allow_unsigned is off: the agent refuses every package",
                     fix + " (or allow_unsigned = true on a lab bench)")
    if not paths:
        return Check("trust", WARN, "no trusted keys: the agent refuses packages unless allow_unsigned = true", fix)
    try:
        from ..signing import TrustStore

        store = TrustStore.from_paths(paths)
    except Exception as exc:
        return Check("trust", FAIL, str(exc), "point trusted_keys at the .pub files from `edgeship package keygen`")
    if not store:
        return Check("trust", FAIL, f"no .pub keys found in {', '.join(paths)}", "copy the fleet's public key there")
    return Check("trust", OK, f"{len(store)} trusted key(s): {', '.join(store.key_ids)}")


def clock_skew_s(server_date: str, local_now: float) -> float:
    """Seconds the local clock is ahead of a server's HTTP Date header (pure)."""
    parsed = email.utils.parsedate_to_datetime(server_date)
    return local_now - parsed.timestamp()


def check_clock(server_url: str | None, timeout: float = 3.0, max_skew_s: float = 30.0) -> Check:
    if not server_url:
        return Check("clock", SKIP, "no fleet server to compare with",
                     "set [rollout] server_url or pass --server to compare the clock")
    try:
        req = urllib.request.Request(server_url, method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            date = resp.headers.get("Date")
    except urllib.error.HTTPError as exc:  # any HTTP answer still carries a Date
        date = exc.headers.get("Date")
    except OSError as exc:
        return Check("clock", WARN, f"cannot reach {server_url}: {exc}", "check the server address")
    if not date:
        return Check("clock", SKIP, f"{server_url} sends no Date header")
    skew = clock_skew_s(date, time.time())
    detail = f"{skew:+.1f} s against {urllib.parse.urlparse(server_url).netloc}"
    if abs(skew) > max_skew_s:
        return Check("clock", FAIL, detail, "enable time sync (sudo timedatectl set-ntp true): TLS and telemetry windows need a correct clock")
    return Check("clock", OK, detail)


def _store_has_model(state_dir: Path) -> str | None:
    """The active sha256 recorded in ``state.json`` when its package is installed (read only: no dirs made)."""
    try:
        active = json.loads((state_dir / "state.json").read_text()).get("active")
    except (OSError, ValueError, AttributeError):
        return None
    if active and (state_dir / "store" / str(active) / "installed.json").is_file():
        return str(active)
    return None


def check_model(config: Any) -> Check:
    """Whether the agent has a model to serve at start: ``[agent] package``, the store, or a rollout to wait for."""
    a = config.agent
    pkg = a.package
    if pkg:
        if not os.path.isfile(pkg):
            return Check("model", FAIL, f"[agent] package {pkg} does not exist",
                         "build one (edgeship package build) or fix the path")
        if not os.access(pkg, os.R_OK):
            return Check("model", FAIL, f"[agent] package {pkg} is not readable",
                         "give the agent's user read access to it")
        return Check("model", OK, f"package {pkg}")
    active = _store_has_model(Path(a.state_dir))
    if active:
        return Check("model", OK, f"active model {active[:12]} in {a.state_dir}")
    if config.mqtt.broker and config.rollout.enabled:
        return Check("model", WARN, f"no package and the store in {a.state_dir} is empty: the agent will start "
                     f"and wait for a rollout from {config.mqtt.broker}",
                     "start a rollout (edgeship fleet rollout start PKG) or set [agent] package")
    return Check("model", FAIL, f"no package: [agent] package is not set and the store in {a.state_dir} is empty",
                 "set [agent] package = \"model.edgepkg\", or [mqtt] broker so a rollout can install one")


def check_sources(config: Any) -> Check:
    """Every ``[[sources]]`` entry whose ``path`` names a file or folder can be read."""
    import glob

    bad, ok = [], []
    for s in config.sources:
        path = s.options.get("path")
        if not isinstance(path, str) or path == "-":
            ok.append(s.id)
            continue
        if any(ch in path for ch in "*?["):
            found = bool(glob.glob(path)) or os.path.isdir(os.path.dirname(path) or ".")
            (ok if found else bad).append(s.id if found else f"{s.id}: {path} matches nothing")
        elif not os.path.exists(path):
            bad.append(f"{s.id}: {path} does not exist")
        elif not os.access(path, os.R_OK):
            bad.append(f"{s.id}: {path} is not readable")
        else:
            ok.append(s.id)
    if bad:
        return Check("sources", FAIL, "; ".join(bad),
                     "create the file/FIFO (or fix [[sources]] path) and give the agent's user read access")
    if not config.sources:
        return Check("sources", SKIP, "no [[sources]]: requests come from the API or the Python API only")
    return Check("sources", OK, f"{len(ok)} readable: {', '.join(ok)}")


def check_api_port(config: Any) -> Check:
    """The local API can listen where ``[api]`` says (a port another process holds makes the agent exit)."""
    api = config.api
    if not api.enabled:
        return Check("api", SKIP, "[api] enabled = false")
    if api.unix_socket:
        folder = os.path.dirname(api.unix_socket) or "."
        if not os.access(folder, os.W_OK):
            return Check("api", FAIL, f"cannot create {api.unix_socket}: {folder} is not writable",
                         "create the folder for the agent's user (systemd: RuntimeDirectory=edgeship)")
        return Check("api", OK, f"unix:{api.unix_socket}")
    if api.port == 0:
        return Check("api", OK, f"{api.host}: any free port")
    sock = socket.socket(socket.AF_INET6 if ":" in api.host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((api.host, api.port))  # no SO_REUSEADDR: exactly the test the server's bind makes
    except OSError as exc:
        return Check("api", FAIL, f"cannot listen on {api.host}:{api.port}: {exc.strerror or exc}"
                     + (" (port taken: another agent running?)" if exc.errno == errno.EADDRINUSE else ""),
                     "stop what holds the port, or set [api] port to a free one")
    finally:
        sock.close()
    return Check("api", OK, f"{api.host}:{api.port} is free")


def serving_checks(config: Any) -> list[Check]:
    """What ``agent run`` needs from its config to serve: a model, keys to check it, readable sources, a free API address."""
    return [check_model(config), check_keys(config.agent.trusted_keys, config.agent.allow_unsigned),
            check_sources(config), check_api_port(config)]


def run_checks(*, state_dir: str | os.PathLike, broker_url: str | None = None,
               trusted_keys: Iterable[str] = (), server_url: str | None = None, config: Any = None) -> list[Check]:
    """Every check; with ``config`` (an AgentConfig) also the model, its sources and the API address."""
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("onnxruntime", check_onnxruntime),
        ("tflite", check_tflite),
        ("cpu", check_cpu),
        ("disk", lambda: check_disk(state_dir)),
        ("memory", check_memory),
        ("broker", lambda: check_broker(broker_url)),
        ("trust", lambda: check_keys(trusted_keys, config.agent.allow_unsigned if config is not None else None)),
        ("clock", lambda: check_clock(server_url)),
    ]
    if config is not None:
        checks += [("model", lambda: check_model(config)), ("sources", lambda: check_sources(config)),
                   ("api", lambda: check_api_port(config))]
    out = []
    for name, fn in checks:
        try:
            out.append(fn())
        except Exception as exc:  # the doctor must always print its table
            out.append(Check(name, FAIL, f"check crashed: {type(exc).__name__}: {exc}", "report this as a bug"))
    return out


def summarize(checks: list[Check]) -> tuple[int, int, int]:
    return (sum(c.status == OK for c in checks), sum(c.status == WARN for c in checks),
            sum(c.status == FAIL for c in checks))


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper():4}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.status in (WARN, FAIL):
            lines.append(f"{'':4}  {'':<{width}}  fix: {c.fix}")
    ok, warn, fail = summarize(checks)
    lines.append(f"{ok} ok, {warn} warnings, {fail} failed")
    return "\n".join(lines)
