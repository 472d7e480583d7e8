"""Console credentials, sessions and CSRF tokens — pure logic, no I/O.

Passwords are stored as scrypt hashes (stdlib ``hashlib.scrypt``); API tokens
are 256-bit random strings, so a plain SHA-256 of the token is enough to store
them (a slow hash buys nothing against a secret that cannot be guessed, and a
fast one keeps every API call cheap). Every comparison is constant-time.

Sessions are opaque random ids handed to the browser in an HttpOnly cookie;
what a session means (user, CSRF token, expiry) stays on the server.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from ...errors import ConfigError

__all__ = [
    "hash_password",
    "verify_password",
    "new_token",
    "token_digest",
    "verify_token",
    "Session",
    "new_session",
    "csrf_ok",
]

# scrypt cost: ~50 ms on a Pi-class CPU per login, 16 MiB of memory.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 14, 8, 1
_MAXMEM = 64 * 1024 * 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """Return ``scrypt$n$r$p$salt$hash`` for storing in the fleet config."""
    if not password:
        raise ConfigError("console password is empty: choose a password of at least 8 characters")
    if len(password) < 8:
        raise ConfigError("console password is shorter than 8 characters: choose a longer one")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches the stored scrypt hash; False on any mismatch or bad format."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        n_i, r_i, p_i = int(n), int(r), int(p)
        # A config edited by hand must not make a login burn unbounded CPU/memory.
        if not (2 <= n_i <= 2 ** 20 and 1 <= r_i <= 32 and 1 <= p_i <= 16):
            return False
        expected = _unb64(digest)
        got = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=n_i, r=r_i, p=p_i,
                             maxmem=_MAXMEM, dklen=len(expected))
    except (ValueError, TypeError, MemoryError):
        return False
    return hmac.compare_digest(got, expected)


def new_token() -> str:
    """A fresh API token (shown once by ``edgeship fleet console init``)."""
    return "es_" + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def verify_token(token: str, stored_digest: str) -> bool:
    if not token or not stored_digest:
        return False
    return hmac.compare_digest(token_digest(token), stored_digest)


@dataclass(frozen=True)
class Session:
    """One logged-in browser: ``sid`` in the cookie, ``csrf`` in every form/action."""

    sid: str
    user: str
    csrf: str
    created: float
    expires: float

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires


def new_session(user: str, ttl_s: float, now: float | None = None) -> Session:
    now = time.time() if now is None else now
    return Session(sid=secrets.token_urlsafe(32), user=user, csrf=secrets.token_urlsafe(32),
                   created=now, expires=now + ttl_s)


def csrf_ok(session: Session | None, presented: str | None) -> bool:
    """The action's CSRF token must equal the session's (constant-time)."""
    if session is None or not presented:
        return False
    return hmac.compare_digest(session.csrf.encode(), presented.encode())
