"""The rollout controller: signed plans out, gate verdicts from the fleet DB, stage by stage.

``RolloutController(db, link_or_broker_url, fleet, signing_key=..., ...)``

* :meth:`start_rollout` (also ``start(package, ...)``) verifies the package
  signature, writes the rollout to the fleet DB, serves the package over
  HTTP itself when no URL is given (its own :class:`PackageServer`), and
  publishes the signed plan, retained, on ``edgeship/v1/{fleet}/rollouts/{id}``.
* ``start()`` without a package starts the loop thread: every ``tick_s`` it
  republishes what the DB holds but the broker has not acknowledged, ramps the
  published percent under the rate limit, evaluates the gates from the
  telemetry, feedback and rollout reports the collector stored
  (:mod:`edgeship.rollout` does the statistics) and promotes, completes,
  aborts or pauses.
* :meth:`status`, :meth:`pause`, :meth:`resume`, :meth:`abort`,
  :meth:`promote` (``force=True`` only; audited), :meth:`list`.

Restart safety: every transition is a compare-and-set on the rollout's
``seq`` in the DB (:meth:`FleetDB.rollout_transition`), written *before* the
plan is published; ``published_seq`` records what the broker acknowledged.
A controller killed at any moment resumes from the DB: a finished step is
never repeated (its seq moved on), a promotion is never applied twice, and a
transition that was stored but not yet published is published by the next
tick. Soak time counts from ``stage_started`` stored in the DB, so a restart
does not reset it.

Without a link (``link_or_broker_url=None``, e.g. a CLI command with no
``--broker``) transitions are only stored; a running controller publishes
them within one tick.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .. import protocol
from .. import rollout as ro
from ..errors import ConfigError, EdgeshipError, PackageError, RolloutError
from ..lifecycle import STOP_TIMEOUT_S, Loop
from .figures import count_device_states, feedback_counts, window_body, window_histogram

__all__ = ["RolloutController"]

log = logging.getLogger("edgeship.fleet.controller")

_DONE_DEVICE_STATES = ("active", "healthy", "failed", "rolled_back")


class RolloutController(Loop):
    """``start()`` / ``stop(timeout)`` for the loop; the rollout methods work with or without it."""

    def __init__(self, db: Any, link_or_broker_url: Any = None, fleet: str = "default", *,
                 signing_key: Any = None, trusted_keys: Sequence[Any] | None = None,
                 package_base_url: str | None = None, serve_host: str = "127.0.0.1", serve_port: int = 0,
                 tick_s: float = 1.0, record_every_s: float = 10.0, plan_ttl_s: float = 30 * 86400.0, clock: Callable[[], float] = time.time,
                 gate_hooks: Mapping[str, ro.GateHook] | None = None, client_id: str | None = None,
                 link_options: Any = None) -> None:
        if not protocol.valid_id(fleet):
            raise ConfigError(f"fleet {fleet!r} is not a valid id")
        super().__init__(f"rollout-controller-{fleet}")
        self.db = db
        self.fleet = fleet
        self.clock = clock
        self.tick_s = tick_s
        self.record_every_s = record_every_s
        # Plans expire unless re-signed: the controller refreshes the newest plan of the
        # fleet (and any running one) at half its lifetime, and lets older ones lapse,
        # so an old signed plan replayed to a device that never saw a newer one (a new
        # device, a wiped state dir) is refused once its lifetime has passed. 0: never.
        self.plan_ttl_s = float(plan_ttl_s)
        self.gate_hooks = dict(gate_hooks or {})
        self.package_base_url = package_base_url.rstrip("/") if package_base_url else None
        self.serve_host, self.serve_port = serve_host, serve_port
        self._key = None
        if signing_key is not None:
            from .. import signing

            self._key = signing_key if hasattr(signing_key, "sign") else signing.load_private_key(signing_key)
        self._trusted = trusted_keys
        self._own_link = False
        self.link = None
        if isinstance(link_or_broker_url, str):
            from ..mqtt import LinkOptions, MqttLink

            # link_options: the broker login and TLS files (edgeship.mqtt.LinkOptions); the id is ours.
            self.link = MqttLink(link_or_broker_url, replace(
                link_options or LinkOptions(),
                client_id=client_id or f"edgeship-controller-{fleet}-{secrets.token_hex(3)}"[:64]))
            self._own_link = True
        elif link_or_broker_url is not None:
            self.link = link_or_broker_url
        self.server = None
        self._last_record: dict[str, float] = {}
        self._mismatch_alerted: set[tuple[str, str, str]] = set()  # (rollout, device, reported sha)
        self.reconcile_s = 2.0
        self._next_reconcile = 0.0
        self._last_verdicts: dict[str, tuple] = {}
        self._lock = threading.RLock()
        self.ticks = 0

    # ------------------------------------------------------------ lifecycle
    def start(self, package: Any = None, **kwargs: Any) -> Any:
        """Without arguments: start the loop thread. With a package: :meth:`start_rollout`."""
        if package is not None:
            return self.start_rollout(package, **kwargs)
        return super().start()

    def _on_start(self) -> None:
        if self._own_link:
            self.link.start()
        mine = [r for r in self.db.rollouts_all() if r["fleet"] == self.fleet]
        newest = max(mine, key=lambda r: (r["created"], r["rollout_id"])) if mine else None
        for row in mine:
            # Running plans, and the newest even when completed: a device that joins later installs it.
            if row["state"] not in ("running", "paused") and row is not newest:
                continue
            if row.get("package_path") and not self._external_url(row):
                url = self._serve(Path(row["package_path"]))
                plan = self._plan(row)
                if plan.package.url != url:
                    # This process serves on another port than the one before the restart: re-point
                    # devices (a download in progress resumes from its .part, same sha256).
                    self._transition(row, plan, {"package_url": url},
                                     {"kind": "url", "detail": json.dumps({"url": url})})

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        stopped = super().stop(timeout)
        if self._own_link and self.link is not None:
            self.link.stop(timeout)
        if self.server is not None:
            self.server.stop(timeout)
            self.server = None
        return stopped

    def wait_ready(self, timeout: float) -> bool:
        return self.link is None or self.link.wait_connected(timeout)

    # ------------------------------------------------------------ serving
    def _serve(self, path: Path) -> str:
        from .server import PackageServer

        if self.server is None:
            self.server = PackageServer(None, host=self.serve_host, port=self.serve_port).start()
        return self.server.add(path)

    @staticmethod
    def _external_url(row: dict) -> bool:
        plan = json.loads(row["plan"])
        return not plan.get("_served", False)

    # ------------------------------------------------------------ commands
    def start_rollout(self, package: Any, *, stages: Any = None, soak_s: Any = 1800.0, soak: Any = None,
                      gates: Sequence[Any] | None = None, url: str | None = None, rollout_id: str | None = None,
                      salt: str | None = None, max_new_per_min: int = 0, report_timeout_s: float = 600.0,
                      on_fail: str = "abort", on_insufficient: str = "promote",
                      health: ro.HealthPolicy | Mapping | None = None, who: str = "") -> dict:
        """Verify the package, store the rollout, serve it (no ``url``) and publish the signed plan."""
        from .. import package as pkgmod

        if self._key is None:
            raise RolloutError("starting a rollout needs the signing key devices trust (--key KEY)")
        path = Path(package)
        trust = self._trusted
        if trust is None:
            from ..signing import TrustStore

            trust = TrustStore([self._key.public_key()])
        try:
            pkg = pkgmod.verify(path, trusted_keys=trust, require_signature=True)
        except PackageError as exc:
            raise RolloutError(f"refusing to roll out {path.name}: {exc}") from exc
        now = self.clock()
        if isinstance(stages, (tuple, list)) and stages and isinstance(stages[0], ro.Stage):
            st = tuple(stages)
        else:
            st = ro.parse_stages(stages if stages is not None else ro.DEFAULT_STAGES,
                                 soak if soak is not None else soak_s)
        gate_specs = tuple(g if isinstance(g, ro.GateSpec) else ro.parse_gate(str(g)) for g in gates) \
            if gates is not None else ro.DEFAULT_GATES
        rid = rollout_id or f"{pkg.name}-{pkg.version}-{secrets.token_hex(3)}"
        if self.db.rollout_get(rid) is not None:
            raise RolloutError(f"rollout {rid} already exists; pick another --id")
        served = url is None and self.package_base_url is None
        if url is None:
            url = (f"{self.package_base_url}/packages/sha256/{pkg.sha256}" if self.package_base_url
                   else self._serve(path))
        hp = health if isinstance(health, ro.HealthPolicy) else ro.HealthPolicy(**(health or {}))
        plan = ro.Plan(rollout_id=rid, fleet=self.fleet,
                       package=ro.PackageRef(pkg.name, pkg.version, pkg.sha256, int(pkg.size), url),
                       stages=st, gates=gate_specs, salt=salt or secrets.token_hex(8),
                       max_new_per_min=int(max_new_per_min), report_timeout_s=float(report_timeout_s),
                       on_fail=on_fail, on_insufficient=on_insufficient, health=hp, state="running",
                       stage_index=0, percent=0.0, seq=1, created=now, updated=now, expires=self._expiry(now))
        pct = self._ramp(plan, 0.0, now, now)
        plan = plan.evolve(percent=pct)
        plan_d = plan.to_dict()
        plan_d["_served"] = served
        row = {"rollout_id": rid, "fleet": self.fleet, "package_name": pkg.name, "package_version": pkg.version,
               "package_sha256": pkg.sha256, "package_path": str(path.resolve()), "state": "running",
               "stage_index": 0, "percent": pct, "seq": 1, "published_seq": 0, "stage_opened": now,
               "stage_started": now if pct >= st[0].percent else None, "ramp_from": 0.0, "created": now,
               "updated": now, "reason": "", "plan": json.dumps(plan_d), "signed": json.dumps(self._sign(plan)),
               "status": None}
        self.db.rollout_create(row, {"kind": "start", "who": who,
                                     "detail": json.dumps({"percent": pct, "url": url, "stages": [s.percent for s in st]})})
        self._audit(who, "rollout.start", rid, f"{pkg.name} {pkg.version} to {self.fleet}")
        log.info("rollout %s started: %s %s, stages %s", rid, pkg.name, pkg.version,
                 ",".join(f"{s.percent:g}" for s in st))
        self._publish_pending(rid)
        return self.status(rid)

    def pause(self, rollout_id: str, *, who: str = "", reason: str = "") -> dict:
        return self._command(rollout_id, "pause", ("running",), {"state": "paused"}, who, reason or "paused by operator")

    def resume(self, rollout_id: str, *, who: str = "", reason: str = "") -> dict:
        return self._command(rollout_id, "resume", ("paused",), {"state": "running", "reason": ""}, who,
                             reason or "resumed by operator")

    def abort(self, rollout_id: str, *, who: str = "", reason: str = "") -> dict:
        return self._command(rollout_id, "abort", ("running", "paused"), {"state": "aborted"}, who,
                             reason or "aborted by operator")

    def promote(self, rollout_id: str, *, force: bool = False, who: str = "") -> dict:
        """Open the next stage now, whatever soak and gates say (``force=True``; audited)."""
        if not force:
            raise RolloutError("promote skips the soak time and the gates; pass --force to do it anyway "
                               "(the controller promotes by itself when the gates hold)")
        row = self._row(rollout_id)
        plan = self._plan(row)
        if plan.state not in ro.ACTIVE_STATES:
            raise RolloutError(f"rollout {rollout_id} is {plan.state}; only a running or paused rollout can be promoted")
        action = "complete" if plan.stage_index + 1 >= len(plan.stages) else "promote"
        if not self._apply(row, plan, ro.Decision(action, "forced by operator"), who=who or "operator", forced=True):
            raise RolloutError(f"rollout {rollout_id} changed while promoting; look at its status and try again")
        self._audit(who, "rollout.promote", rollout_id, f"forced {action} from stage {plan.stage_index + 1}")
        self._publish_pending(rollout_id)
        return self.status(rollout_id)

    def list(self) -> list[dict]:
        out = []
        for r in self.db.rollouts_all():
            plan = json.loads(r["plan"])
            out.append({"rollout_id": r["rollout_id"], "fleet": r["fleet"], "state": r["state"],
                        "stage_index": r["stage_index"], "percent": r["percent"],
                        "package": {"name": r["package_name"], "version": r["package_version"],
                                    "sha256": r["package_sha256"]},
                        "stages": [{"percent": s["percent"], "soak_s": s["soak_s"]} for s in plan["stages"]],
                        "created": r["created"], "updated": r["updated"], "reason": r["reason"]})
        return out

    def status(self, rollout_id: str) -> dict:
        row = self._row(rollout_id)
        plan = self._plan(row)
        out = self._status(row, plan, self.clock())[0]
        out["version_mismatch"] = [m for m in self.version_mismatches() if m["rollout_id"] == rollout_id]
        return out

    # ------------------------------------------------------------ internals: DB + plans
    def _row(self, rollout_id: str) -> dict:
        row = self.db.rollout_get(rollout_id)
        if row is None:
            raise RolloutError(f"no rollout {rollout_id!r} in the fleet DB (edgeship fleet rollout list)")
        return row

    @staticmethod
    def _plan(row: dict) -> ro.Plan:
        d = json.loads(row["plan"])
        d.pop("_served", None)
        return ro.Plan.from_dict(d)

    def _sign(self, plan: ro.Plan) -> dict | None:
        return ro.sign_plan(plan, self._key) if self._key is not None else None

    def _audit(self, who: str, action: str, target: str, outcome: str) -> None:
        try:
            self.db.audit_add(ts=self.clock(), who=who or "controller", action=action, target=f"rollout/{target}",
                              outcome=outcome)
        except EdgeshipError as exc:
            log.warning("audit entry for %s %s not stored: %s", action, target, exc)

    def _command(self, rollout_id: str, kind: str, from_states: tuple, changes: dict, who: str, reason: str) -> dict:
        for _ in range(5):
            row = self._row(rollout_id)
            plan = self._plan(row)
            if plan.state not in from_states:
                raise RolloutError(f"rollout {rollout_id} is {plan.state}; {kind} applies to "
                                   f"{' or '.join(from_states)} rollouts")
            if self._transition(row, plan, {**changes, "reason": changes.get("reason", reason)},
                                {"kind": kind, "who": who or "operator", "detail": reason}):
                self._audit(who, f"rollout.{kind}", rollout_id, reason)
                self._publish_pending(rollout_id)
                return self.status(rollout_id)
        raise RolloutError(f"rollout {rollout_id} keeps changing; try {kind} again")

    def _transition(self, row: dict, plan: ro.Plan, changes: dict, event: dict) -> bool:
        """Store one change of the plan (compare-and-set on seq); publishing follows separately."""
        now = self.clock()
        plan_changes = {k: v for k, v in changes.items() if k in ("state", "stage_index", "percent", "reason")}
        if "package_url" in changes:
            plan_changes["package"] = replace(plan.package, url=changes["package_url"])
        new = plan.evolve(seq=plan.seq + 1, updated=now, expires=self._expiry(now), **plan_changes)
        d = new.to_dict()
        d["_served"] = json.loads(row["plan"]).get("_served", False)
        db_changes = {**{k: v for k, v in changes.items() if k in ("state", "stage_index", "percent", "reason",
                                                                     "stage_opened", "stage_started", "ramp_from")},
                      "seq": new.seq, "updated": now, "plan": json.dumps(d), "signed": json.dumps(self._sign(new))
                      if self._key is not None else None}
        ok = self.db.rollout_transition(row["rollout_id"], row["seq"], db_changes, {**event, "stage_index": new.stage_index})
        if ok:
            log.info("rollout %s: %s (seq %d, stage %d, %g%%, %s)", row["rollout_id"], event["kind"], new.seq,
                     new.stage_index + 1, new.percent, new.state)
        return ok

    def _expiry(self, now: float) -> float:
        return now + self.plan_ttl_s if self.plan_ttl_s > 0 else 0.0

    def _refresh_expiring(self, rows: Sequence[dict], now: float) -> None:
        """Re-sign the fleet's newest plan and every running one when half their lifetime has passed."""
        if self.plan_ttl_s <= 0 or not rows:
            return
        newest = max(rows, key=lambda r: (r["created"], r["rollout_id"]))
        for row in rows:
            if row is not newest and row["state"] not in ro.ACTIVE_STATES:
                continue  # older, finished plans lapse
            plan = self._plan(row)
            if plan.expires and now >= plan.expires - self.plan_ttl_s / 2:
                if self._transition(row, plan, {}, {"kind": "refresh", "detail": "re-signed before expiry"}):
                    self._publish_pending(row["rollout_id"])

    def _publish_pending(self, rollout_id: str) -> bool:
        """Publish the stored plan if the broker has not acknowledged this seq yet."""
        row = self.db.rollout_get(rollout_id)
        if row is None or row["published_seq"] >= row["seq"] or self.link is None:
            return False
        signed = json.loads(row["signed"]) if row.get("signed") else None
        if signed is None or signed["plan"]["seq"] != row["seq"]:
            if self._key is None:
                return False  # stored by a keyless CLI call: a controller with the key signs it
            signed = self._sign(self._plan(row))
        msg = protocol.make_message("plan", "controller", signed, msg_id=f"{rollout_id}-{row['seq']}")
        try:
            h = self.link.publish(protocol.rollout_plan_topic(row["fleet"], rollout_id), protocol.encode(msg),
                                  qos=1, retain=True)
        except EdgeshipError as exc:
            log.warning("rollout %s: publishing seq %d failed: %s", rollout_id, row["seq"], exc)
            return False
        if h.wait(5.0):
            self.db.rollout_mark_published(rollout_id, row["seq"])
            return True
        return False

    # ------------------------------------------------------------ the loop
    def run(self) -> None:
        while not self.stopping:
            try:
                self.tick()
            except EdgeshipError as exc:
                log.warning("rollout controller tick failed: %s", exc)
            except Exception:  # noqa: BLE001 - a bug must not kill the loop quietly; log it fully
                log.exception("rollout controller tick crashed")
            self.wait(self.tick_s)

    def tick(self) -> None:
        """One pass over every rollout (the loop calls this; tests may too)."""
        with self._lock:
            self.ticks += 1
            now = self.clock()
            self._refresh_expiring([r for r in self.db.rollouts_all() if r["fleet"] == self.fleet], now)
            for row in self.db.rollouts_all():
                if row["fleet"] != self.fleet:
                    continue
                rid = row["rollout_id"]
                if row["state"] in ro.ACTIVE_STATES:
                    self._step(row, now)
                    row = self.db.rollout_get(rid)
                    self.db.rollout_save_status(rid, self._status(row, self._plan(row), now)[0])
                elif row["published_seq"] < row["seq"]:
                    self.db.rollout_save_status(rid, self._status(row, self._plan(row), now)[0])
                self._publish_pending(rid)
            if now >= self._next_reconcile:  # desired vs reported: not needed at every tick
                self._next_reconcile = now + self.reconcile_s
                self._reconcile_versions()

    def version_mismatches(self) -> list[dict]:
        """Devices running another model than the fleet's newest plan wants, when that plan completed.

        Why: a device can be pushed back (a cleared retained plan, a hand
        install) while every rollout looks done; like a device shadow, the
        fleet compares desired and reported and says which devices differ.
        """
        rows = [r for r in self.db.rollouts_all() if r["fleet"] == self.fleet]
        if not rows:
            return []
        newest = max(rows, key=lambda r: (r["created"], r["rollout_id"]))
        plan = self._plan(newest)
        latest: dict[str, dict] = {}
        for r in self.db.rollout_reports(plan.rollout_id):
            latest[r["device"]] = r
        return ro.version_mismatches(plan, self._fleet_devices(), latest)

    def _reconcile_versions(self) -> None:
        for m in self.version_mismatches():
            key = (m["rollout_id"], m["device"], m["reported_sha256"])
            if key in self._mismatch_alerted:
                continue
            self._mismatch_alerted.add(key)
            text = (f"device {m['device']} reports version {m['reported']} but the completed rollout "
                    f"{m['rollout_id']} wants {m['desired']}")
            log.warning("version mismatch: %s", text)
            try:
                self.db.audit_add(ts=self.clock(), who="controller", action="device.version_mismatch",
                                  target=f"device/{m['device']}", outcome=text)
            except EdgeshipError as exc:
                log.warning("audit entry for the version mismatch of %s not stored: %s", m["device"], exc)

    def _step(self, row: dict, now: float) -> None:
        plan = self._plan(row)
        if plan.state != "running":
            return
        status, results = self._status(row, plan, now)
        self._record(row, plan, results, now)
        # Ramp under the rate limit: publish more of the stage's percent as time allows.
        pct = self._ramp(plan, row["ramp_from"], row["stage_opened"] or now, now)
        if pct > plan.percent:
            changes = {"percent": pct}
            if pct >= plan.stage.percent:
                changes["stage_started"] = now
            if self._transition(row, plan, changes, {"kind": "ramp", "detail": json.dumps({"percent": pct})}):
                row = self.db.rollout_get(row["rollout_id"])
                plan = self._plan(row)
        stage_started = row["stage_started"]
        decision = ro.decide(plan, results, now=now, stage_started=stage_started)
        if decision.action != "wait":
            self._apply(row, plan, decision, who="controller", results=results)

    def _apply(self, row: dict, plan: ro.Plan, d: ro.Decision, *, who: str, forced: bool = False,
               results: Sequence[ro.GateResult] = ()) -> bool:
        now = self.clock()
        detail = {"reason": d.reason, "stage": plan.stage_index + 1, "percent": plan.percent,
                  "gates": [r.to_dict() for r in results]}
        if d.action == "promote":
            nxt = plan.stage_index + 1
            pct = self._ramp(plan.evolve(stage_index=nxt), plan.stage.percent, now, now)
            changes = {"stage_index": nxt, "percent": pct, "stage_opened": now, "ramp_from": plan.stage.percent,
                       "stage_started": now if pct >= plan.stages[nxt].percent else None}
            detail["percent"] = pct
        elif d.action == "complete":
            changes = {"state": "completed", "percent": plan.stages[-1].percent, "reason": d.reason}
        elif d.action in ("abort", "pause"):
            changes = {"state": "aborted" if d.action == "abort" else "paused", "reason": d.reason}
        else:
            return False
        ok = self._transition(row, plan, changes, {"kind": ("force_" if forced else "") + d.action, "who": who,
                                                   "detail": json.dumps(detail, default=str)})
        if ok and results:
            self.db.rollout_add_gate_eval(row["rollout_id"], now, plan.stage_index, [r.to_dict() for r in results])
        if ok and d.action == "abort":
            log.warning("rollout %s aborted: %s", row["rollout_id"], d.reason)
        if ok and not forced:
            # The controller's own decisions go to the audit log like an operator's commands:
            # an automatic abort is the entry someone reading the log looks for first.
            # (A forced promote is audited by promote(), with the operator's name.)
            self._audit(who, f"rollout.{d.action}", row["rollout_id"], d.reason)
        return ok

    def _record(self, row: dict, plan: ro.Plan, results: Sequence[ro.GateResult], now: float) -> None:
        rid = row["rollout_id"]
        sig = tuple((r.name, r.verdict) for r in results)
        if now - self._last_record.get(rid, 0.0) >= self.record_every_s or self._last_verdicts.get(rid) != sig:
            self._last_record[rid] = now
            self._last_verdicts[rid] = sig
            self.db.rollout_add_gate_eval(rid, now, plan.stage_index, [r.to_dict() for r in results])

    def _fleet_devices(self) -> list[dict]:
        return self.db.devices(self.fleet)

    def _ramp(self, plan: ro.Plan, ramp_from: float, stage_opened: float, now: float) -> float:
        target = plan.stages[plan.stage_index].percent
        if plan.max_new_per_min <= 0:
            return target
        buckets = [ro.bucket(d["device"], plan.salt) for d in self._fleet_devices()]
        return max(plan.percent, ro.ramp_percent(buckets, ramp_from, target, plan.max_new_per_min, now - stage_opened))

    # ------------------------------------------------------------ figures and status
    def _status(self, row: dict, plan: ro.Plan, now: float) -> tuple[dict, list[ro.GateResult]]:
        devices = {d["device"]: d for d in self._fleet_devices()}
        counted = count_device_states(devices, self.db.rollout_reports(plan.rollout_id),
                                      in_target=lambda dev: ro.in_stage(ro.bucket(dev, plan.salt), plan.target_percent))
        per_state, failures, pinned, latest = (counted["per_state"], counted["failures"], counted["pinned"],
                                               counted["latest"])
        events = self.db.rollout_events(plan.rollout_id)
        incl = []  # (ts, percent published from then on)
        for e in events:
            try:
                p = json.loads(e["detail"]).get("percent") if e["detail"].startswith("{") else None
            except ValueError:
                p = None
            if p is not None:
                incl.append((e["ts"], float(p)))
        timed_out = []
        for dev, info in devices.items():
            r = latest.get(dev)
            if dev in pinned:
                continue
            if info.get("online") and (r is None or r["state"] not in _DONE_DEVICE_STATES):
                b = ro.bucket(dev, plan.salt)
                if ro.in_stage(b, plan.percent):
                    since = next((ts for ts, p in incl if b < p), None)
                    if since is not None and now - since > plan.report_timeout_s:
                        timed_out.append(dev)
        n_failed = sum(failures.values())
        reported = sum(1 for d, r in latest.items() if d not in pinned and r["state"] != "assigned")
        fail_events = n_failed + (len(timed_out) if plan.timeouts_fail else 0)
        fail_total = reported + (len(timed_out) if plan.timeouts_fail else 0)
        canary, control = self._cohorts(plan, set(devices), set(pinned))
        canary = replace(canary, failures=ro.RateFigures(fail_events, fail_total))
        results = ro.evaluate_gates(plan.gates, canary, control, self.gate_hooks)
        stage_started = row.get("stage_started")
        soak_left = (max(0.0, stage_started + plan.stage.soak_s - now)
                     if stage_started is not None and plan.state in ro.ACTIVE_STATES else None)
        decision = ro.decide(plan, results, now=now, stage_started=stage_started)
        starts: dict[int, float] = {0: row["created"]}
        for e in events:
            if e["kind"] in ("promote", "force_promote"):
                starts[e["stage_index"]] = e["ts"]
        status = {
            "rollout_id": plan.rollout_id, "fleet": plan.fleet, "state": plan.state,
            "package": {"name": plan.package.name, "version": plan.package.version, "sha256": plan.package.sha256,
                        "size": plan.package.size, "url": plan.package.url},
            "stage_index": plan.stage_index, "percent": plan.percent, "seq": plan.seq,
            "published_seq": row["published_seq"],
            "stages": [{"percent": s.percent, "soak_s": s.soak_s, "started": starts.get(i)}
                       for i, s in enumerate(plan.stages)],
            "stage_started": stage_started, "stage_opened": row.get("stage_opened"), "soak_left_s": soak_left,
            "created": row["created"], "updated": row["updated"], "reason": row["reason"],
            "devices_per_state": per_state, "timed_out": sorted(timed_out),
            "failures": {"total": n_failed, "timed_out": len(timed_out), "by_reason": failures},
            "pinned": sorted(pinned),
            "gates": [{**r.to_dict(), "ok": True if r.verdict == "pass" else False if r.verdict == "fail" else None,
                       "enough_samples": r.verdict != "insufficient"} for r in results],
            "decision": {"action": decision.action, "reason": decision.reason},
            "events": [{"ts": e["ts"], "kind": e["kind"], "stage_index": e["stage_index"], "who": e["who"],
                        "detail": _event_text(e)} for e in events],
        }
        return status, results

    def _cohorts(self, plan: ro.Plan, fleet_devices: set, pinned: set) -> tuple[ro.CohortFigures, ro.CohortFigures]:
        since = plan.created
        ver = plan.package.version
        acc = {k: {"inf": 0, "err": 0, "neg": 0, "fb": 0, "hist": None, "metrics": {}, "classes": {}}
               for k in ("canary", "control")}
        want_classes = any(g.name == "drift" for g in plan.gates)  # the prediction-drift gate (issue 10)
        metric_keys = [g.name[len("metric:"):] for g in plan.gates if g.name.startswith("metric:")]
        if any(g.name == "drift_score" for g in plan.gates):  # the input-drift gate reads one telemetry field
            metric_keys.append(ro.DRIFT_SCORE_FIELD)
        for r in self.db.telemetry(since=since):
            if r["device"] not in fleet_devices:
                continue
            a = acc["canary" if r["model_version"] == ver else "control"]
            a["inf"] += int(r["inferences"] or 0) + int(r["errors"] or 0)
            a["err"] += int(r["errors"] or 0)
            body = window_body(r)
            h = window_histogram(r, body)
            if h is not None:
                try:
                    if a["hist"] is None:
                        a["hist"] = h
                    else:
                        a["hist"].merge(h)
                except ValueError:
                    pass
            if want_classes and isinstance(body.get("classes"), dict):
                for lbl, n in body["classes"].items():
                    if isinstance(n, (int, float)) and not isinstance(n, bool):
                        a["classes"][lbl] = a["classes"].get(lbl, 0) + n
            for k in metric_keys:
                v = _dotted(body, k)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    a["metrics"].setdefault(k, []).append(float(v))
        for r in self.db.feedback(since=since):
            if r["device"] not in fleet_devices:
                continue
            a = acc["canary" if r["model_version"] == ver else "control"]
            verdicts, negative = feedback_counts([r])
            a["fb"] += verdicts
            a["neg"] += negative
        out = []
        z = ro.z_for(0.95)
        for k in ("canary", "control"):
            a = acc[k]
            lat = None
            h = a["hist"]
            if h is not None and h.count:
                lo_q, hi_q = ro.quantile_rank_bounds(h.count, 0.95, z)
                lat = ro.LatencyFigures(h.count, h.percentile(95), h.percentile(lo_q), h.percentile(hi_q))
            metrics = {}
            for key, vals in a["metrics"].items():
                m = sum(vals) / len(vals)
                var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
                metrics[key] = ro.MeanFigures(len(vals), m, var)
            out.append(ro.CohortFigures(errors=ro.RateFigures(a["err"], a["inf"]),
                                        negative=ro.RateFigures(a["neg"], a["fb"]), latency=lat, metrics=metrics,
                                        classes=a["classes"]))
        return out[0], out[1]


def _dotted(body: Any, path: str) -> Any:
    cur = body
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _event_text(e: dict) -> str:
    d = e.get("detail") or ""
    if d.startswith("{"):
        try:
            j = json.loads(d)
        except ValueError:
            return d
        if j.get("reason"):
            return str(j["reason"])
        if "percent" in j:
            return f"{j['percent']:g}% of the fleet"
    return d
