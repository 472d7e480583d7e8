"""Per-device broker credentials: Mosquitto password file and ACL, written by edgeship.

Why: with one shared login (or none), anyone on the broker can publish as any
device (900 errors reported as ``victim-01``) or clear a retained rollout
plan. Mosquitto can tell who is connected; these files make it refuse the
rest itself, before a message reaches the collector:

- every **device** logs in as its device id and may write only under
  ``edgeship/v1/<fleet>/devices/<its id>/#`` (ACL ``pattern`` with ``%u``) and
  read rollout plans, its own receipts and the collector's announcement;
- a **fleet** login (collector, controller, console) reads everything under
  ``edgeship/v1/`` and is the only one allowed to write rollout plans,
  receipts to other devices and the collector announcement.

``add_credentials`` issues a random password (or takes one), stores its hash
in Mosquitto 2's own format (``$7$``: PBKDF2-SHA512, 101 iterations, as
``mosquitto_passwd`` writes it) and keeps the ACL in step. Reload the broker
(``kill -HUP``) after a change. docs/secure-broker.md shows the whole set-up
(TLS, passwords, ACL, persistence); the tests run that configuration.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from pathlib import Path

from ..errors import ConfigError
from ..protocol import PROTOCOL, valid_id

__all__ = ["hash_password", "check_password", "add_credentials", "acl_text", "mosquitto_conf", "ROLES"]

ROLES = ("device", "fleet")
_ITERATIONS = 101  # mosquitto_passwd's default for $7$ hashes


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = _ITERATIONS) -> str:
    """A Mosquitto 2 password-file hash: ``$7$<iterations>$<b64 salt>$<b64 sha512 pbkdf2>``."""
    salt = salt if salt is not None else os.urandom(12)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def check_password(password: str, hashed: str) -> bool:
    m = re.fullmatch(r"\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)", hashed)
    if not m:
        return False
    want = hash_password(password, salt=base64.b64decode(m.group(2)), iterations=int(m.group(1)))
    return secrets.compare_digest(want, hashed)


def acl_text(fleet_users: list[str]) -> str:
    lines = [
        "# edgeship broker ACL, written by `edgeship fleet device add`; reload the broker after a change.",
        "# Every login: write only under its own device id; read rollout plans, its own receipts and",
        "# whether the collector sends receipts.",
        f"pattern write {PROTOCOL}/+/devices/%u/#",
        f"pattern read {PROTOCOL}/+/rollouts/#",
        f"pattern read {PROTOCOL}/+/devices/%u/receipt",
        f"pattern read {PROTOCOL}/+/collector",
    ]
    for user in sorted(set(fleet_users)):
        lines += ["", "# fleet side: reads every device, publishes rollout plans, receipts and the collector",
                  "# announcement", f"user {user}", f"topic read {PROTOCOL}/#",
                  f"topic write {PROTOCOL}/+/rollouts/#", f"topic write {PROTOCOL}/+/devices/+/receipt",
                  f"topic write {PROTOCOL}/+/collector"]
    return "\n".join(lines) + "\n"


def _read_entries(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if ":" in line and not line.startswith("#"):
                user, _, h = line.partition(":")
                out[user] = h
    return out


def _fleet_users(acl: Path) -> list[str]:
    if not acl.exists():
        return []
    return re.findall(r"^user (\S+)$", acl.read_text(), flags=re.M)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def add_credentials(passwd_file: str | Path, acl_file: str | Path, name: str, *, role: str = "device",
                    password: str | None = None) -> str:
    """Add or replace ``name``'s login; returns the password (shown once: only its hash is kept)."""
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not valid_id(name):
        raise ConfigError(f"{name!r} is not a valid device id: use letters, digits and _.:- (max 128)")
    password = password or secrets.token_urlsafe(18)
    pf, af = Path(passwd_file), Path(acl_file)
    entries = _read_entries(pf)
    entries[name] = hash_password(password)
    _write_private(pf, "".join(f"{u}:{h}\n" for u, h in sorted(entries.items())))
    users = [u for u in _fleet_users(af) if u != name] + ([name] if role == "fleet" else [])
    _write_private(af, acl_text(users))
    return password


def mosquitto_conf(*, port: int = 8883, bind: str = "0.0.0.0", cafile: str, certfile: str, keyfile: str,
                   password_file: str, acl_file: str, persistence_dir: str = "/var/lib/mosquitto/") -> str:
    """The broker configuration edgeship expects in production (docs/secure-broker.md).

    TLS on the only listener, no anonymous logins, per-device passwords and
    the ACL above, and persistence: the outbox deletes a message once the
    broker acknowledged it, so a broker that forgets queued messages on a
    restart would lose what devices already handed over.
    """
    return "\n".join([
        "per_listener_settings false",
        f"listener {port} {bind}",
        f"cafile {cafile}",
        f"certfile {certfile}",
        f"keyfile {keyfile}",
        "tls_version tlsv1.2",
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
        "persistence true",
        f"persistence_location {persistence_dir}",
        "autosave_interval 30",
        "max_queued_messages 100000",
    ]) + "\n"
