"""The ``[console]`` section of the fleet config (TOML), and ``console init``.

    [console]
    user = "admin"
    password_hash = "scrypt$16384$8$1$<salt>$<hash>"
    token_sha256 = "<hex>"          # API token, stored hashed
    session_ttl_s = 28800
    host = "127.0.0.1"
    port = 8080
    tls_cert = ""                   # PEM paths; TLS is on when both are set
    tls_key = ""

Other sections of the same file belong to other fleet parts and are left as
they are: ``init`` only appends a ``[console]`` section (or refuses to replace
one unless told to).
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError
from . import auth

__all__ = ["ConsoleConfig", "default_config_path", "load_console_config", "init_console_config"]

_USER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def default_config_path() -> Path:
    env = os.environ.get("EDGESHIP_FLEET_CONFIG")
    if env:
        return Path(env)
    return Path(os.path.expanduser("~/.config/edgeship/fleet.toml"))


@dataclass(frozen=True)
class ConsoleConfig:
    user: str = "admin"
    password_hash: str = ""
    token_sha256: str = ""
    session_ttl_s: float = 8 * 3600.0
    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: str = ""
    tls_key: str = ""
    # Addresses (or networks) of reverse proxies whose X-Forwarded-For / -Proto are believed.
    # Empty: none, not even loopback, so a client cannot pick the address the login lockout
    # and the audit log see (uvicorn would trust 127.0.0.1 by default).
    trusted_proxies: tuple[str, ...] = ()

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    def __post_init__(self) -> None:
        if not _USER_RE.match(self.user):
            raise ConfigError(f"[console] user: {self.user!r} is not a valid user name (letters, digits, _.@-)")
        if not self.password_hash and not self.token_sha256:
            raise ConfigError("[console]: neither password_hash nor token_sha256 is set; "
                              "run `edgeship fleet console init` to create them")
        if self.password_hash and not self.password_hash.startswith("scrypt$"):
            raise ConfigError("[console] password_hash: not an scrypt hash; run `edgeship fleet console init --force`")
        if self.token_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.token_sha256):
            raise ConfigError("[console] token_sha256: must be 64 hex characters; run `edgeship fleet console init --force`")
        if not (isinstance(self.session_ttl_s, (int, float)) and 1 <= self.session_ttl_s <= 30 * 86400):
            raise ConfigError("[console] session_ttl_s: must be between 1 and 2592000 seconds")
        if not (isinstance(self.port, int) and 0 <= self.port <= 65535):
            raise ConfigError(f"[console] port: {self.port!r} is not a TCP port (0-65535)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("[console] tls_cert and tls_key: set both (PEM files) or neither")
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except (TypeError, ValueError):
                raise ConfigError(f"[console] trusted_proxies: {proxy!r} is not an IP address or network "
                                  "(e.g. \"10.0.0.5\" or \"10.0.0.0/24\")") from None
        for key in ("tls_cert", "tls_key"):
            value = getattr(self, key)
            if value and not Path(value).is_file():
                raise ConfigError(f"[console] {key}: file {value!r} does not exist")


_KEYS = {"user": str, "password_hash": str, "token_sha256": str, "session_ttl_s": (int, float),
         "host": str, "port": int, "tls_cert": str, "tls_key": str, "trusted_proxies": list}


def load_console_config(path: str | os.PathLike | None = None) -> ConsoleConfig:
    """Read ``[console]`` from the fleet config; errors name the key and what to do."""
    p = Path(path) if path else default_config_path()
    if not p.is_file():
        raise ConfigError(f"fleet config {str(p)!r} does not exist: run `edgeship fleet console init --config {p}`")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"fleet config {str(p)!r} is not valid TOML: {exc}") from exc
    section = data.get("console")
    if not isinstance(section, dict):
        raise ConfigError(f"fleet config {str(p)!r} has no [console] section: run `edgeship fleet console init`")
    kwargs = {}
    for key, value in section.items():
        if key not in _KEYS:
            raise ConfigError(f"[console] {key}: unknown key; expected one of {', '.join(_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, _KEYS[key]):
            raise ConfigError(f"[console] {key}: wrong type {type(value).__name__}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return ConsoleConfig(**kwargs)


def _toml_str(value: str) -> str:
    # JSON string escaping is a subset of TOML basic strings for our values.
    return json.dumps(value)


def init_console_config(path: str | os.PathLike | None = None, *, user: str = "admin",
                        password: str | None = None, with_token: bool = True,
                        session_ttl_s: float = 8 * 3600.0, tls_cert: str = "", tls_key: str = "",
                        force: bool = False) -> tuple[Path, str | None]:
    """Write a ``[console]`` section; return (path, api_token or None).

    The token is returned once and stored only as a hash. Without a password
    and without a token there would be no way in, so that is refused.
    """
    p = Path(path) if path else default_config_path()
    if not password and not with_token:
        raise ConfigError("console init: give a password or keep the API token, otherwise nobody can log in")
    token = auth.new_token() if with_token else None
    cfg = ConsoleConfig(user=user, password_hash=auth.hash_password(password) if password else "",
                        token_sha256=auth.token_digest(token) if token else "",
                        session_ttl_s=session_ttl_s, tls_cert=tls_cert, tls_key=tls_key)
    lines = ["[console]", f"user = {_toml_str(cfg.user)}"]
    if cfg.password_hash:
        lines.append(f"password_hash = {_toml_str(cfg.password_hash)}")
    if cfg.token_sha256:
        lines.append(f"token_sha256 = {_toml_str(cfg.token_sha256)}")
    lines += [f"session_ttl_s = {float(cfg.session_ttl_s)!r}", f"host = {_toml_str(cfg.host)}",
              f"port = {cfg.port}", f"tls_cert = {_toml_str(cfg.tls_cert)}", f"tls_key = {_toml_str(cfg.tls_key)}"]
    section = "\n".join(lines) + "\n"
    existing = ""
    if p.exists():
        existing = p.read_text()
        try:
            parsed = tomllib.loads(existing)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"fleet config {str(p)!r} is not valid TOML; fix it before `console init`: {exc}") from exc
        if "console" in parsed:
            if not force:
                raise ConfigError(f"fleet config {str(p)!r} already has a [console] section; pass --force to replace it")
            existing = _drop_section(existing, "console")
    p.parent.mkdir(parents=True, exist_ok=True)
    text = (existing.rstrip() + "\n\n" if existing.strip() else "") + section
    tmp = p.with_name(p.name + ".tmp")
    # The file holds credential hashes: owner-only, written atomically.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, p)
    return p, token


def _drop_section(text: str, name: str) -> str:
    out, skipping = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and not stripped.startswith("[["):
            skipping = stripped == f"[{name}]"
        elif stripped.startswith("[["):
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out)
