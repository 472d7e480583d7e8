"""Run the agent under systemd: the unit file `edgeship agent install-service` writes.

Pure text generation plus one atomic write; nothing here talks to systemd
unless the caller asks to enable the unit.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = ["ServiceSpec", "render_unit", "install_service", "LOGROTATE_SNIPPET"]

DEFAULT_UNIT_PATH = Path("/etc/systemd/system/edgeship-agent.service")


@dataclass(frozen=True)
class ServiceSpec:
    config: str
    user: str = "edgeship"
    group: str | None = None
    state_dir: str = "/var/lib/edgeship"
    executable: str | None = None  # the `edgeship` script; found on PATH when None
    watchdog_s: int = 30
    restart_s: int = 5
    memory_max: str = "400M"
    description: str = "edgeship device agent"


def _executable(spec: ServiceSpec) -> str:
    if spec.executable:
        return spec.executable
    found = shutil.which("edgeship")
    if found:
        return os.path.abspath(found)
    # Fall back to the interpreter that runs us: always correct inside a venv.
    return f"{sys.executable} -m edgeship.cli"


def render_unit(spec: ServiceSpec) -> str:
    """The systemd unit text for ``spec``.

    Type=notify + WatchdogSec: the agent sends READY=1 once its model is warm
    and WATCHDOG=1 from its batcher loop, so systemd restarts an agent that
    hangs (not only one that exits). StateDirectory makes systemd create and
    chown the state directory for the service user.
    """
    if not spec.config:
        raise ConfigError("install-service needs --config PATH of the agent's TOML config")
    state = Path(spec.state_dir)
    if not state.is_absolute():
        raise ConfigError(f"state directory {spec.state_dir!r} must be an absolute path")
    exe = _executable(spec)
    cmd = f"{exe} agent run --config {shlex.quote(os.path.abspath(spec.config))}"
    state_name = state.name if str(state.parent) == "/var/lib" else None
    lines: list[str | None] = [
        "[Unit]",
        f"Description={spec.description}",
        "After=network-online.target",
        "Wants=network-online.target",
        # Give up restarting only after 10 failures in 5 minutes: a broken
        # model falls back inside the agent, so repeated exits mean a real fault.
        "StartLimitIntervalSec=300",
        "StartLimitBurst=10",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={cmd}",
        f"User={spec.user}",
        f"Group={spec.group or spec.user}",
        f"StateDirectory={state_name}" if state_name else f"ReadWritePaths={state}",
        f"WorkingDirectory={state}",
        "Restart=always",
        f"RestartSec={spec.restart_s}",
        f"WatchdogSec={spec.watchdog_s}",
        # SIGTERM lets the agent drain in-flight requests and flush state.json.
        "KillSignal=SIGTERM",
        "TimeoutStopSec=20",
        f"MemoryMax={spec.memory_max}",
        "Environment=PYTHONUNBUFFERED=1",
        "Environment=OMP_WAIT_POLICY=PASSIVE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        f"ReadWritePaths={state}" if state_name else None,
        "StandardOutput=journal",
        "StandardError=journal",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


# For agents that also write JSON-lines results to a file sink (journald
# rotates the agent's own log by itself; see docs/raspberry-pi.md).
LOGROTATE_SNIPPET = """/var/lib/edgeship/results*.jsonl {
    daily
    rotate 7
    maxsize 50M
    compress
    missingok
    notifempty
    copytruncate
}
"""


def install_service(spec: ServiceSpec, *, path: str | os.PathLike = DEFAULT_UNIT_PATH,
                    enable: bool = False) -> Path:
    """Write the unit atomically; with ``enable``, reload systemd and enable + start it."""
    text = render_unit(spec)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except PermissionError as exc:
        raise ConfigError(f"cannot write {path}: permission denied (run with sudo, or pass --output to write elsewhere)") from exc
    if enable:
        systemctl = shutil.which("systemctl")
        if systemctl is None:
            raise ConfigError("systemctl not found: this system does not run systemd; start the agent another way")
        for args in (["daemon-reload"], ["enable", "--now", path.name]):
            proc = subprocess.run([systemctl, *args], capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                raise ConfigError(f"systemctl {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return path
