"""Ed25519 keys and signatures (``cryptography``), imported lazily.

Key files are PEM: ``NAME.key`` (PKCS#8 private, mode 0600) and ``NAME.pub``
(SubjectPublicKeyInfo). A key's id is the first 16 hex digits of the sha256
of its raw public bytes; manifests and plans name the key that signed them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from .errors import ConfigError, SignatureError

__all__ = ["keygen", "load_private_key", "load_public_key", "key_id", "sign", "verify", "TrustStore"]


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - depends on extras
        raise ConfigError("signing needs the 'cryptography' package: pip install 'edgeship[agent]'") from exc
    return ed25519, serialization, InvalidSignature


def keygen(private_path: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new key pair; returns (private_path, public_path)."""
    ed25519, serialization, _ = _crypto()
    priv_path = Path(private_path)
    pub_path = priv_path.with_suffix(".pub")
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise ConfigError(f"{priv_path} or {pub_path} already exists; pass overwrite to replace it")
    key = ed25519.Ed25519PrivateKey.generate()
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def load_private_key(path: str | os.PathLike):
    ed25519, serialization, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read private key {path}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key (make one with `edgeship package keygen`)")
    return key


def load_public_key(path_or_pem: str | os.PathLike | bytes):
    ed25519, serialization, _ = _crypto()
    try:
        data = path_or_pem if isinstance(path_or_pem, bytes) else Path(path_or_pem).read_bytes()
        key = serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read public key {path_or_pem!r}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{path_or_pem!r} is not an Ed25519 public key")
    return key


def _raw_public(key) -> bytes:
    _, serialization, _ = _crypto()
    if hasattr(key, "public_key") and not hasattr(key, "verify"):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key) -> str:
    """Short stable id of a public (or private) key."""
    return hashlib.sha256(_raw_public(key)).hexdigest()[:16]


def sign(data: bytes, private_key) -> bytes:
    """Raw 64-byte Ed25519 signature of ``data``."""
    if isinstance(private_key, (str, os.PathLike)):
        private_key = load_private_key(private_key)
    return private_key.sign(data)


def verify(data: bytes, signature: bytes, public_key) -> bool:
    _, _, InvalidSignature = _crypto()
    try:
        public_key.verify(signature, data)
        return True
    except InvalidSignature:
        return False


class TrustStore:
    """The public keys a device or controller accepts signatures from."""

    def __init__(self, keys: Iterable = ()) -> None:
        self._keys = {key_id(k): k for k in keys}

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike]) -> "TrustStore":
        keys = []
        for p in paths:
            p = Path(p)
            files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
            keys.extend(load_public_key(f) for f in files)
        return cls(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def verify(self, data: bytes, signature: bytes, *, what: str = "data", signer: str | None = None) -> str:
        """Return the id of the trusted key that signed ``data``; raise SignatureError otherwise."""
        if not self._keys:
            raise SignatureError(f"no trusted public keys configured to check the {what}")
        if len(signature) != 64:
            raise SignatureError(f"the {what} signature is malformed ({len(signature)} bytes, expected 64)")
        candidates = [self._keys[signer]] if signer in self._keys else list(self._keys.values())
        for key in candidates:
            if verify(data, signature, key):
                return key_id(key)
        if signer and signer not in self._keys:
            raise SignatureError(f"the {what} is signed by key {signer}, which is not trusted here; "
                                 f"add its .pub to the trusted keys")
        raise SignatureError(f"the {what} signature does not verify with any trusted key "
                             "(tampered after signing, or signed by an untrusted key)")
