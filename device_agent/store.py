"""The device's model store: verified packages by sha256, and which one is active.

Layout of one agent's state directory (DESIGN.md "Device state")::

    state_dir/
      state.json                  {"format": 1, "active": sha, "previous": sha, "pinned": version, ...}
      store/<sha256>/package.edgepkg   the package file as received (its sha256 is the folder name)
      store/<sha256>/files/             the package unpacked (manifest.json, model files, ...)
      store/<sha256>/installed.json     name, version, size, installed_at (written last)
      store/.tmp-*                      half-done installs; removed at the next open

Crash safety: an install is built under ``store/.tmp-*`` and renamed into
place only when complete, and ``installed.json`` is written last, so a
power cut leaves either a complete package or garbage that is swept at the
next open. ``state.json`` is replaced atomically (write temp, fsync,
rename, fsync the folder), so it always names a complete package.

For the rollout client (download → verify → switch → maybe roll back):

* ``install(pkg_path, trusted_keys)`` verifies (hashes + signature) and
  stores a package, returning its sha256; installing twice is a no-op.
* ``activate(sha)`` makes it the active one (the old active becomes
  ``previous``); the running agent switches with ``Agent.switch_to(sha)``,
  which calls ``activate`` once the new runner is warm.
* ``rollback()`` swaps active and previous; ``pin(version)`` holds the
  device on one version (``activate`` of another raises until ``pin(None)``).
* ``gc(keep=...)`` removes packages that are neither active, previous,
  pinned nor in ``keep`` (e.g. a prefetched candidate).
* ``startup_choice(trusted_keys)`` is what the agent loads at start: the
  active package if it still checks out, else the previous one (one log line
  says why), else :class:`StoreError`; ``load_startup(load, trusted_keys)``
  makes the agent's load (which hashes the model file) part of that check.

Verify once: ``install`` hashes every byte it stores (see there);
``verify(sha, trusted_keys, deep=False)``, what loads use, reads no file
(sizes and the signature) and leaves the hashing of the one file a load
reads to the runtime; ``verify(sha, trusted_keys)`` is the full re-check:
the package file's sha256 equals the folder name and every unpacked file
matches the manifest's sha256 and size.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from .._files import atomic_write_json, copy_hashed, file_sha256, fsync_dir
from ..errors import IntegrityError, PackageError, StoreError

__all__ = ["ModelStore", "atomic_write_json", "file_sha256"]

log = logging.getLogger("edgeship.agent.store")
T = TypeVar("T")

STATE_FORMAT = 1
_SHA_LEN = 64


def _trust(trusted_keys):
    if not trusted_keys:
        return None
    from ..signing import TrustStore

    if isinstance(trusted_keys, TrustStore):
        return trusted_keys
    return TrustStore.from_paths(list(trusted_keys))


class ModelStore:
    """Packages by sha256 under ``state_dir/store`` plus the atomic ``state.json``."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "store"
        self.state_path = self.state_dir / "state.json"
        self._lock = threading.RLock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the model store in {self.state_dir}: {exc.strerror or exc} "
                             "(check [agent] state_dir and its permissions)") from exc
        self._sweep()

    # -- paths ------------------------------------------------------------------
    def path(self, sha: str) -> Path:
        return self.root / sha

    def package_path(self, sha: str) -> Path:
        return self.root / sha / "package.edgepkg"

    def files_dir(self, sha: str) -> Path:
        return self.root / sha / "files"

    def manifest(self, sha: str) -> dict:
        try:
            return json.loads((self.files_dir(sha) / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"package {sha[:12]} in the store has no readable manifest: {exc}") from exc

    def info(self, sha: str) -> dict:
        try:
            return json.loads((self.path(sha) / "installed.json").read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"package {sha[:12]} is not (completely) installed in {self.root}") from exc

    def _sweep(self) -> None:
        # Leftovers of installs interrupted by a crash or power cut.
        for p in self.root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    # -- state.json -------------------------------------------------------------
    def state(self) -> dict:
        """The current state (``active``, ``previous``, ``pinned``); defaults when there is none yet."""
        base = {"format": STATE_FORMAT, "active": None, "previous": None, "pinned": None, "updated": None,
                "history": []}
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return base
        except OSError as exc:
            raise StoreError(f"cannot read {self.state_path}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise StoreError(f"{self.state_path} is not valid JSON ({exc}); restore it or delete it "
                             "to start with an empty store state") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{self.state_path} is not a JSON object; delete it to start fresh")
        if int(data.get("format", 1)) > STATE_FORMAT:
            raise StoreError(f"{self.state_path} was written by a newer agent (format {data['format']}); upgrade edgeship")
        base.update(data)
        return base

    def _write_state(self, **changes) -> dict:
        with self._lock:
            st = self.state()
            event = changes.pop("_event", None)
            st.update(changes)
            st["format"] = STATE_FORMAT
            st["updated"] = time.time()
            if event:
                st["history"] = (st.get("history") or [])[-19:] + [{"ts": st["updated"], **event}]
            atomic_write_json(self.state_path, st)
            return st

    @property
    def active(self) -> str | None:
        return self.state()["active"]

    @property
    def previous(self) -> str | None:
        return self.state()["previous"]

    @property
    def pinned(self) -> str | None:
        return self.state()["pinned"]

    # -- install / verify ---------------------------------------------------------
    def installed(self) -> list[dict]:
        """Every completely installed package: sha256, name, version, installed_at."""
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or len(p.name) != _SHA_LEN:
                continue
            try:
                out.append({"sha256": p.name, **self.info(p.name)})
            except StoreError:
                continue
        return out

    def has(self, sha: str) -> bool:
        return (self.path(sha) / "installed.json").exists()

    def install(self, pkg_path: str | os.PathLike, trusted_keys: Iterable | None = None) -> str:
        """Verify and store a package; returns its sha256 (already stored: a no-op).

        The one verification: the file is hashed for its identity (sha256),
        then copied and hashed again in that same read (a file that changed
        in between is refused), and each member is hashed as it is unpacked.
        Later loads rely on it and hash at most the file they load
        (:meth:`verify` with ``deep=False``).
        """
        pkg_path = Path(pkg_path)
        known = self._known_file(pkg_path)
        if known is not None:
            return known
        try:
            sha = file_sha256(pkg_path)
        except FileNotFoundError as exc:
            raise StoreError(f"package {pkg_path} not found") from exc
        except OSError as exc:
            raise StoreError(f"cannot read package {pkg_path}: {exc.strerror or exc}") from exc
        with self._lock:
            if self.has(sha):
                self._remember_file(pkg_path, sha)
                return sha
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
            try:
                if copy_hashed(pkg_path, tmp / "package.edgepkg") != sha:
                    raise IntegrityError(f"package {pkg_path} changed while it was being installed; try again")
                from ..package import unpack  # lazy: ~1,000 lines the agent's import need not compile (#21)

                unpack(tmp / "package.edgepkg", tmp / "files", trusted_keys=_trust(trusted_keys), sha256=sha)
                manifest = json.loads((tmp / "files" / "manifest.json").read_text())
                info = {"name": manifest.get("name"), "version": manifest.get("version"),
                        "size": (tmp / "package.edgepkg").stat().st_size, "installed_at": time.time(),
                        "source": str(pkg_path), "signed": bool(trusted_keys)}
                atomic_write_json(tmp / "installed.json", info)
                dest = self.path(sha)
                if dest.exists():  # an incomplete earlier install under the final name
                    shutil.rmtree(dest)
                os.replace(tmp, dest)
                fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        log.info("installed %s %s (%s)", info["name"], info["version"], sha[:12])
        self._remember_file(pkg_path, sha)
        return sha

    # ``[agent] package`` is installed at every start. Hashing it again only to learn it is stored
    # already cost ~15 ms of each start-up for a 6 MB package (before the first result); a file whose
    # path, size, mtime (ns) and inode are unchanged since it was hashed is that same stored package.
    # A changed file is hashed and installed as before; the stored copy is what runs either way (its
    # model file is hashed when it loads).
    _FILES = "files.json"

    @staticmethod
    def _stamp(path: Path) -> list | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns, st.st_ino]

    def _known_file(self, path: Path) -> str | None:
        stamp = self._stamp(path)
        try:
            rec = json.loads((self.root / self._FILES).read_text()).get(str(path.absolute()))
        except (OSError, ValueError, AttributeError):
            return None
        if stamp is None or not isinstance(rec, dict) or rec.get("stamp") != stamp:
            return None
        sha = rec.get("sha256")
        return sha if isinstance(sha, str) and self.has(sha) else None

    def _remember_file(self, path: Path, sha: str) -> None:
        stamp = self._stamp(path)
        if stamp is None:
            return
        f = self.root / self._FILES
        try:
            try:
                known = json.loads(f.read_text())
                known = known if isinstance(known, dict) else {}
            except (OSError, ValueError):
                known = {}
            known[str(path.absolute())] = {"stamp": stamp, "sha256": sha}
            atomic_write_json(f, dict(list(known.items())[-16:]))  # bounded: the last few package paths
        except OSError as exc:  # a read-only store hashes again at the next start: nothing else is lost
            log.debug("cannot remember %s: %s", path, exc)

    def verify(self, sha: str, trusted_keys: Iterable | None = None, *, deep: bool = True) -> None:
        """Check a stored package; raises PackageError/StoreError naming what is wrong.

        Always, reading no file: installed completely, the package file and
        every unpacked file of the recorded size, and the manifest signature
        when keys are given. ``deep`` also hashes the package file (its
        sha256 must be the folder name) and every unpacked file: the full
        re-check install did once. Loads use ``deep=False``; the runtime
        hashes the one file it loads.
        """
        if not self.has(sha):
            raise StoreError(f"package {sha[:12]} is not installed in {self.root}")
        pkg = self.package_path(sha)
        try:
            size = pkg.stat().st_size
            actual = file_sha256(pkg) if deep else sha
        except OSError as exc:
            raise IntegrityError(f"package {sha[:12]}: {pkg.name} is unreadable ({exc.strerror or exc})") from exc
        recorded = self.info(sha).get("size")
        if actual != sha or (recorded is not None and size != recorded):
            raise IntegrityError(f"package {sha[:12]}: the stored file has sha256 {actual[:12]}, {size} bytes "
                                 f"(installed: {recorded}); corrupted on disk")
        from ..package import verify as verify_package  # lazy, as in install()

        verify_package(self.files_dir(sha), _trust(trusted_keys), members=None if deep else ())

    # -- state changes ------------------------------------------------------------
    def activate(self, sha: str, *, force: bool = False) -> dict:
        """Make ``sha`` active; the former active becomes ``previous``. Returns the new state."""
        with self._lock:
            info = self.info(sha)
            st = self.state()
            if st["pinned"] and info.get("version") != st["pinned"] and not force:
                raise StoreError(f"the device is pinned to version {st['pinned']}; "
                                 f"unpin it (edgeship agent pin --clear) before activating {info.get('version')}")
            if st["active"] == sha:
                return st
            return self._write_state(active=sha, previous=st["active"] or st["previous"],
                                     _event={"event": "activate", "sha256": sha, "version": info.get("version")})

    def rollback(self) -> str:
        """Swap active and previous; returns the sha256 now active."""
        with self._lock:
            st = self.state()
            if not st["previous"]:
                raise StoreError("no previous model to roll back to")
            if not self.has(st["previous"]):
                raise StoreError(f"the previous model {st['previous'][:12]} is no longer in the store")
            self._write_state(active=st["previous"], previous=st["active"],
                              _event={"event": "rollback", "sha256": st["previous"]})
            return st["previous"]

    def pin(self, version: str | None) -> str | None:
        """Hold the device on ``version`` (activating its newest stored package); None unpins.

        Returns the sha256 now active (None when unpinning).
        """
        with self._lock:
            if version is None:
                self._write_state(pinned=None, _event={"event": "unpin"})
                return None
            cands = [m for m in self.installed() if m.get("version") == version]
            if not cands:
                have = sorted({str(m.get("version")) for m in self.installed()})
                raise StoreError(f"version {version} is not in the store (have: {', '.join(have) or 'none'}); "
                                 "install its package first")
            sha = max(cands, key=lambda m: m.get("installed_at", 0))["sha256"]
            self.activate(sha, force=True)
            self._write_state(pinned=version, _event={"event": "pin", "version": version})
            return sha

    def remove(self, sha: str) -> None:
        with self._lock:
            st = self.state()
            if sha in (st["active"], st["previous"]):
                raise StoreError(f"package {sha[:12]} is active or previous; it cannot be removed")
            target = self.path(sha)
            if target.exists():
                # Rename first so a crash mid-delete never leaves a half package under its name.
                trash = Path(tempfile.mkdtemp(prefix=".tmp-rm-", dir=self.root))
                os.replace(target, trash / sha)
                shutil.rmtree(trash, ignore_errors=True)

    def gc(self, keep: Iterable[str] = ()) -> list[str]:
        """Remove packages neither active, previous, pinned nor in ``keep``; returns what was removed."""
        with self._lock:
            st = self.state()
            keep = set(keep) | {st["active"], st["previous"]}
            removed = []
            for m in self.installed():
                if m["sha256"] in keep or (st["pinned"] and m.get("version") == st["pinned"]):
                    continue
                self.remove(m["sha256"])
                removed.append(m["sha256"])
            return removed

    def startup_choice(self, trusted_keys: Iterable | None = None) -> str | None:
        """The sha256 to load at start: active if it checks out, else the previous one; None when empty.

        The check is :meth:`verify` with ``deep=False`` (nothing hashed).
        A corrupt active package is refused with one log line and removed;
        the previous good package becomes active. Raises StoreError when
        there was an active package but nothing good is left.
        """
        return self.load_startup(lambda sha: sha, trusted_keys)

    def load_startup(self, load: Callable[[str], T], trusted_keys: Iterable | None = None) -> T | None:
        """:meth:`startup_choice` with ``load(sha)`` (the agent's loader) as the last check; returns what it loaded.

        The loader hashes the file it loads, so a package whose model file
        fails that (a :class:`PackageError` from ``load``) is corrupt like
        one that fails :meth:`verify`: refused, and the previous one loaded.
        Any other error of ``load`` (a runtime that cannot run the model)
        propagates and the package is kept: it is not to blame.
        """
        def check(sha: str) -> T:
            self.verify(sha, trusted_keys, deep=False)
            return load(sha)

        with self._lock:
            st = self.state()
            active = st["active"]
            if active is None:
                return None
            try:
                return check(active)
            except (PackageError, StoreError) as exc:
                reason = str(exc)
            prev = st["previous"]
            log.error("refusing the active model %s: %s", active[:12], reason)
            if prev:
                try:
                    loaded = check(prev)
                except (PackageError, StoreError) as exc2:
                    raise StoreError(f"the active model is corrupt ({reason}) and the previous one too ({exc2}); "
                                     "install a good package (edgeship agent run with [agent] package)") from exc2
                self._write_state(active=prev, previous=None,
                                  _event={"event": "fallback", "from": active, "to": prev, "reason": reason})
                try:
                    self.remove(active)
                except (StoreError, OSError):
                    pass
                log.error("falling back to the previous model %s %s (%s)", self.info(prev).get("name"),
                          self.info(prev).get("version"), prev[:12])
                return loaded
            raise StoreError(f"the active model is corrupt ({reason}) and the store has no previous "
                             "verified one; install a good package")
