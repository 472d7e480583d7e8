"""The device side of a staged rollout: plan in, prefetch, switch, health window, report.

``RolloutClient(agent, link, outbox, fleet=..., device=..., trusted_keys=..., state_dir=...)``
is an agent component (``start``/``stop``/``health``). Its one thread reads
the plans the link receives on ``edgeship/v1/{fleet}/rollouts/+`` (it is the
consumer of the device link's inbound queue), and for the newest plan:

1. verifies the plan's Ed25519 signature with the device's trusted keys and
   ignores any plan whose ``seq`` is not newer than the last one seen (a
   replayed old "running" plan cannot undo an abort), and any plan created
   before the newest plan it ever accepted (the *floor*, kept across restarts:
   clearing the newest retained plan cannot bring an older signed plan back;
   a rollback is a newer plan of the older package);
2. computes its bucket; when the plan will reach it, downloads the package
   in the background after a random jitter (resumable, into
   ``state_dir/downloads``; see :mod:`edgeship.agent.download`), reports
   ``downloading`` / ``prefetched``, installs it into the store (hashes +
   signature) and reports ``verified``;
3. when the published percent passes its bucket: ``agent.load_candidate`` +
   ``agent.switch_to`` (warm beside the old model, swap between batches),
   reports ``active``; after the plan's health window (``no crash, error rate
   and p95 within bounds``, :func:`edgeship.rollout.local_health`) reports
   ``healthy`` or rolls back and reports ``failed`` with the reason;
4. on ``aborted``: switches back if it runs the aborted package, reports
   ``rolled_back``;
5. a device pinned to another version (``edgeship agent pin``) never
   downloads or switches; it reports ``assigned`` with reason ``pinned to V``,
   which the controller counts apart.

Every report goes through the outbox. ``rollout.json`` in the state dir
(written atomically) keeps the last seq per rollout, what was reported, the
switch phase and failure cool-downs, so a restart neither repeats reports nor
loses its place. A kill mid-download leaves a resumable ``.part``; a kill
mid-switch leaves ``state.json`` naming the old or the new package (both
complete), and the client resumes: one unclean restart inside a health window
restarts the window, a second one counts as a crash and rolls back.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from .. import protocol
from .. import rollout as ro
from ..errors import EdgeshipError, RolloutError
from ..lifecycle import STOP_TIMEOUT_S, Loop
from ..metrics import Histogram
from .store import atomic_write_json

__all__ = ["RolloutClient"]

log = logging.getLogger("edgeship.agent.rollout")

_STATE_FILE = "rollout.json"
_MAX_UNCLEAN = 1  # unclean restarts tolerated inside one health window


class RolloutClient(Loop):
    """One per agent. Build before ``agent.start()`` and ``agent.add_component`` it (or :meth:`attach`)."""

    # An agent with this component and an empty store starts and waits for a rollout (Agent.waits_for_rollout).
    installs_models = True

    def __init__(self, agent: Any, link: Any, outbox: Any, *, fleet: str, device: str,
                 trusted_keys: Iterable[Any] | Any, state_dir: str | Path, jitter_s: float = 30.0,
                 bandwidth_kbps: float = 0.0, health_window_s: float = 60.0, download_retries: int = 5,
                 poll_s: float = 0.5, plan_keys: Iterable[Any] | Any | None = None,
                 rng: random.Random | None = None, clock=time.time) -> None:
        super().__init__(f"rollout-{device}")
        self.agent = agent
        self.link = link
        self.outbox = outbox
        self.fleet, self.device = fleet, device
        self.state_dir = Path(state_dir)
        self.jitter_s = jitter_s
        self.bandwidth_kbps = bandwidth_kbps
        self.health_window_s = health_window_s
        self.download_retries = download_retries
        self.poll_s = poll_s
        self.rng = rng or random.Random()
        self.clock = clock
        from ..signing import TrustStore

        if isinstance(trusted_keys, TrustStore):
            self.trust = trusted_keys
        else:
            keys = list(trusted_keys or [])
            self.trust = TrustStore.from_paths(keys) if keys else TrustStore()
        self._trusted_arg = self.trust if self.trust else None
        # Two key roles: packages are verified with ``trusted_keys``, rollout plans with
        # ``plan_keys`` (the fleet controller's key). Kept apart, a leaked package-signing
        # key cannot steer devices, and the plan key cannot make a model they would run.
        # Without plan_keys one key list does both jobs (the older set-up).
        if plan_keys is None:
            self.plan_trust = self.trust
        elif isinstance(plan_keys, TrustStore):
            self.plan_trust = plan_keys
        else:
            pk = list(plan_keys)
            self.plan_trust = TrustStore.from_paths(pk) if pk else self.trust
        self.topic_filter = f"{protocol.PROTOCOL}/{fleet}/rollouts/+"
        self._dl_thread: threading.Thread | None = None
        self._dl_stop = threading.Event()
        self._dl_result: dict | None = None
        self._plans: dict[str, ro.Plan] = {}
        self._first_seen: dict[str, float] = {}
        self._jitter: dict[str, float] = {}
        self._stale_logged: set[str] = set()
        self._health_base: dict | None = None
        self.counters = {"plans": 0, "plans_refused": 0, "plans_stale": 0, "plans_expired": 0, "downloads": 0,
                         "download_failures": 0, "switches": 0,
                         "rollbacks": 0, "reports": 0}
        self.last_error: str | None = None
        self.state = self._load_state()

    @classmethod
    def from_config(cls, agent: Any, fleet_link: Any, cfg: Any) -> "RolloutClient":
        """Built by ``edgeship agent run`` from ``[agent]`` and ``[rollout]`` (needs ``[mqtt] broker``)."""
        a, r = cfg.agent, cfg.rollout
        return cls(agent, fleet_link.link, fleet_link.outbox, fleet=a.fleet, device=a.device_id,
                   trusted_keys=list(a.trusted_keys), state_dir=a.state_dir, jitter_s=r.jitter_s,
                   bandwidth_kbps=r.bandwidth_limit_kbps, health_window_s=r.health_window_s,
                   plan_keys=list(r.plan_keys) or None)

    # ------------------------------------------------------------ persistence
    def _path(self) -> Path:
        return self.state_dir / _STATE_FILE

    def _load_state(self) -> dict:
        base = {"format": 1, "seq": {}, "reported": {}, "phase": None, "failed": {}, "clean_stop": True}
        try:
            data = json.loads(self._path().read_text())
            if isinstance(data, dict):
                base.update(data)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("rollout state %s unreadable (%s); starting afresh", self._path(), exc)
        return base

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self._path(), self.state)

    # ------------------------------------------------------------ lifecycle
    def attach(self) -> "RolloutClient":
        self.agent.add_component(self)
        return self

    def _on_start(self) -> None:
        if not self.trust:
            log.warning("rollouts are off on %s: no [agent] trusted_keys to verify plans and packages", self.device)
        unclean = not self.state.get("clean_stop", True)
        ph = self.state.get("phase")
        if ph and unclean and ph.get("step") in ("switching", "active"):
            ph["unclean"] = int(ph.get("unclean", 0)) + 1
        self.state["clean_stop"] = False
        self._save()
        self.link.subscribe(self.topic_filter, 1)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        self._dl_stop.set()  # a download in progress ends too (it checks this between chunks)
        stopped = super().stop(timeout)
        if self._dl_thread is not None:
            self._dl_thread.join(timeout)
            self._dl_thread = None
        self.state["clean_stop"] = True
        try:
            self._save()
        except OSError as exc:
            log.warning("rollout state not saved at stop: %s", exc)
        return stopped

    def health(self) -> dict:
        ph = self.state.get("phase") or {}
        return {"plans": sorted(self._plans), "phase": ph.get("step"), "rollout": ph.get("rollout_id"),
                "downloading": self._dl_thread is not None and self._dl_thread.is_alive(),
                "last_error": self.last_error, **self.counters}

    # ------------------------------------------------------------ loop
    def run(self) -> None:
        while not self.stopping:
            try:
                msg = self.link.get(self.poll_s)
                while msg is not None:
                    self._on_message(msg)
                    msg = self.link.get_nowait()
                self.reconcile()
            except EdgeshipError as exc:
                self.last_error = str(exc)
                log.warning("rollout client: %s", exc)
                self.wait(1.0)
            except Exception as exc:  # noqa: BLE001 - keep the device serving; record and go on
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("rollout client step failed")
                self.wait(1.0)

    def _on_message(self, msg: Any) -> None:
        if not msg.topic.startswith(self.topic_filter[:-1]):
            return  # not ours: this client is the only reader of the device link's inbound queue
        if not msg.payload:
            return  # a cleared retained plan
        try:
            m = protocol.parse_message(msg.topic, msg.payload)
            if m.fleet != self.fleet:
                return
            if not self.plan_trust:
                raise RolloutError("no trusted keys configured to verify rollout plans")
            plan = ro.verify_plan_message(m.body, self.plan_trust)
        except (EdgeshipError, protocol.MessageError) as exc:
            self.counters["plans_refused"] += 1
            self.last_error = f"plan on {msg.topic} refused: {exc}"
            log.warning("%s", self.last_error)
            return
        if plan.fleet != self.fleet:
            return
        if plan.expires and self.clock() > plan.expires:
            self.counters["plans_expired"] += 1
            self.last_error = (f"plan {plan.rollout_id} (version {plan.package.version}) refused: it expired "
                               f"{self.clock() - plan.expires:.0f} s ago (the fleet's controller re-signs live plans; "
                               "check that it runs, and this device's clock)")
            log.warning("%s", self.last_error)
            return
        if self._below_floor(plan):
            return
        seen = int(self.state["seq"].get(plan.rollout_id, 0))
        if plan.seq < seen or (plan.seq == seen and plan.rollout_id in self._plans):
            return  # replayed or repeated: never go back to an older plan
        self.counters["plans"] += 1
        self._plans[plan.rollout_id] = plan
        self._first_seen.setdefault(plan.rollout_id, self.clock())
        if plan.seq != seen:
            self.state["seq"][plan.rollout_id] = plan.seq
            self._save()

    def _below_floor(self, plan: ro.Plan) -> bool:
        """Refuse a plan older than the newest one this device ever accepted; else raise the floor.

        Why: the device follows the newest plan it holds, and plans arrive as
        retained messages. Anyone who can clear the newest retained plan would
        otherwise make an older, validly signed plan the newest again after a
        restart and push the device back to an old model. The floor (creation
        time and id of the newest plan seen) is kept in ``rollout.json``, so it
        survives restarts; a deliberate rollback is a *newer* signed plan.
        """
        floor = self.state.get("floor") or {}
        key = (float(plan.created), plan.rollout_id)
        fkey = (float(floor.get("created", 0.0)), str(floor.get("rollout_id", "")))
        if plan.rollout_id != fkey[1] and key < fkey:
            self.counters["plans_stale"] += 1
            self.last_error = (f"plan {plan.rollout_id} (version {plan.package.version}) refused: older than the "
                               f"newest plan seen, {fkey[1]} (version {floor.get('version')}); to go back, "
                               "start a new rollout of the older package")
            if plan.rollout_id not in self._stale_logged:
                self._stale_logged.add(plan.rollout_id)
                log.warning("%s", self.last_error)
            return True
        if key > fkey:
            self.state["floor"] = {"created": key[0], "rollout_id": plan.rollout_id,
                                   "version": plan.package.version}
            self._save()
        return False

    # ------------------------------------------------------------ decisions
    def _current_plan(self) -> ro.Plan | None:
        if not self._plans:
            return None
        return max(self._plans.values(), key=lambda p: (p.created, p.rollout_id))

    def _report(self, plan: ro.Plan, state: str, reason: str | None = None, *, once: bool = True) -> None:
        done = self.state["reported"].setdefault(plan.rollout_id, [])
        if once and state in done:
            return
        model = self.agent.model
        body = {"rollout_id": plan.rollout_id, "state": state, "version": plan.package.version,
                "sha256": plan.package.sha256, "seq": plan.seq,
                "bucket": round(ro.bucket(self.device, plan.salt), 4),
                "model": {k: model[k] for k in ("name", "version", "sha256")} if model else None}
        if reason:
            body["reason"] = reason[:2000]
        msg = protocol.make_message("rollout", self.device, body)
        self.outbox.put("rollout", protocol.device_topic(self.fleet, self.device, "rollout"), protocol.encode(msg))
        self.counters["reports"] += 1
        if state not in done:
            done.append(state)
        self._save()
        log.info("rollout %s: %s%s", plan.rollout_id, state, f" ({reason})" if reason else "")

    def reconcile(self) -> None:
        """Bring the device in line with the newest plan (idempotent; called every poll)."""
        plan = self._current_plan()
        self._finish_download(plan)
        if plan is None or not self.trust:
            return
        sha = plan.package.sha256
        cur = (self.agent.model or {}).get("sha256")
        b = ro.bucket(self.device, plan.salt)
        pinned = self.agent.store.pinned if self.agent.store is not None else None
        if plan.state == "aborted":
            self._abort(plan, cur)
            return
        if pinned and pinned != plan.package.version:
            if ro.will_reach(b, plan):
                self._report(plan, "assigned", f"pinned to version {pinned}")
            return
        if not ro.will_reach(b, plan):
            return
        ph = self.state.get("phase") or {}
        if ph.get("rollout_id") == plan.rollout_id and ph.get("step") in ("failed", "rolled_back"):
            return  # this device already judged this package: do not retry it
        store = self.agent.store
        if not store.has(sha):
            self._prefetch(plan)
            return
        self._report(plan, "verified")
        if cur == sha:
            self._watch_health(plan)
            return
        if plan.state in ("running", "completed") and ro.in_stage(b, plan.percent):
            self._switch(plan)

    # ------------------------------------------------------------ prefetch
    def _prefetch(self, plan: ro.Plan) -> None:
        sha = plan.package.sha256
        if self._dl_thread is not None and self._dl_thread.is_alive():
            return
        fail = self.state["failed"].get(sha)
        now = self.clock()
        if fail and now < fail.get("retry_at", 0):
            return
        if plan.rollout_id not in self._jitter:
            self._jitter[plan.rollout_id] = self.rng.uniform(0, self.jitter_s) if self.jitter_s > 0 else 0.0
        if now < self._first_seen.get(plan.rollout_id, now) + self._jitter[plan.rollout_id]:
            return
        self._report(plan, "downloading")
        self._dl_stop.clear()
        self._dl_result = None
        self._dl_thread = threading.Thread(target=self._download, args=(plan,), name=f"rollout-dl-{self.device}",
                                           daemon=True)
        self._dl_thread.start()

    def _download(self, plan: ro.Plan) -> None:
        """Download thread: fetch + check + install. The outcome goes to ``_dl_result`` for the main thread."""
        from .download import download

        sha = plan.package.sha256
        dest = self.state_dir / "downloads" / f"{sha}.edgepkg"
        res: dict = {"plan": plan}
        try:
            self.counters["downloads"] += 1
            download(plan.package.url, dest, sha256=sha, size=plan.package.size, retries=self.download_retries,
                     bandwidth_kbps=self.bandwidth_kbps, stop=self._dl_stop, backoff_base=0.2, backoff_cap=5.0)
            res["prefetched"] = True
            self.agent.store.install(dest, self._trusted_arg)
            res["verified"] = True
            dest.unlink(missing_ok=True)
        except EdgeshipError as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"
            if res.get("prefetched"):
                dest.unlink(missing_ok=True)  # verified bad: fetch afresh next time
        except OSError as exc:
            res["error"] = f"OSError: {exc}"
        self._dl_result = res

    def _finish_download(self, plan: ro.Plan | None) -> None:
        res = self._dl_result
        if res is None or (self._dl_thread is not None and self._dl_thread.is_alive()):
            return
        self._dl_result = None
        self._dl_thread = None
        p: ro.Plan = res["plan"]
        sha = p.package.sha256
        if res.get("prefetched"):
            self._report(p, "prefetched")
        if res.get("error"):
            self.counters["download_failures"] += 1
            n = int(self.state["failed"].get(sha, {}).get("count", 0)) + 1
            self.state["failed"][sha] = {"count": n, "reason": res["error"][:500],
                                         "retry_at": self.clock() + min(600.0, 5.0 * 2 ** n)}
            self.last_error = res["error"]
            self._report(p, "failed", ("verify: " if res.get("prefetched") else "download: ") + res["error"])
            self._save()
        elif res.get("verified"):
            self.state["failed"].pop(sha, None)
            self._report(p, "verified")

    # ------------------------------------------------------------ switch, health, abort
    def _switch(self, plan: ro.Plan) -> None:
        ph = self.state.get("phase") or {}
        if ph.get("rollout_id") == plan.rollout_id and int(ph.get("unclean", 0)) > _MAX_UNCLEAN:
            self._fail(plan, f"the agent restarted uncleanly {ph['unclean']} times while switching")
            return
        prev = (self.agent.model or {}).get("sha256")
        self.state["phase"] = {"rollout_id": plan.rollout_id, "sha256": plan.package.sha256, "step": "switching",
                               "from": prev, "unclean": int(ph.get("unclean", 0)) if ph.get("rollout_id") == plan.rollout_id else 0}
        self._save()
        try:
            handle = self.agent.load_candidate(plan.package.sha256)
            self.agent.switch_to(handle)
        except EdgeshipError as exc:
            self._fail(plan, f"activate: {exc}", rollback=False)
            return
        self.counters["switches"] += 1
        self._mark_active(plan)

    def _mark_active(self, plan: ro.Plan) -> None:
        ph = self.state["phase"]
        ph.update(step="active", switched_at=self.clock())
        self._health_base = self._snapshot()
        self._save()
        self._report(plan, "active")

    def _snapshot(self) -> dict:
        snap = self.agent.metrics.snapshot()
        return {"counters": snap["counters"], "latency": snap["latency_ms"], "t": self.clock()}

    def _watch_health(self, plan: ro.Plan) -> None:
        ph = self.state.get("phase") or {}
        if ph.get("rollout_id") != plan.rollout_id or ph.get("sha256") != plan.package.sha256:
            # Running the package without a record (e.g. installed by hand): nothing to judge.
            return
        if ph.get("step") == "switching":
            self._mark_active(plan)  # killed after the swap was stored: the switch did complete
            return
        if ph.get("step") != "active":
            return
        if int(ph.get("unclean", 0)) > _MAX_UNCLEAN:
            self._fail(plan, ro.local_health(plan.health, inferences=0, errors=0, p95_new=None, p95_old=None,
                                             crashed=True)[1])
            return
        if self._health_base is None:  # restarted inside the window: judge from now on
            self._health_base = self._snapshot()
            ph["switched_at"] = self.clock()
            self._save()
        window = plan.health.window_s if plan.health.window_s is not None else self.health_window_s
        if self.clock() - float(ph.get("switched_at", 0)) < window:
            return
        now = self._snapshot()
        b = self._health_base
        inf = now["counters"].get("inferences", 0) - b["counters"].get("inferences", 0)
        err = now["counters"].get("errors", 0) - b["counters"].get("errors", 0)
        h_old = Histogram.from_dict(b["latency"])
        h_now = Histogram.from_dict(now["latency"])
        delta = Histogram(h_now.bounds)
        delta.counts = [max(0, x - y) for x, y in zip(h_now.counts, h_old.counts)]
        delta.count = sum(delta.counts)
        delta.min, delta.max = 0.0, h_now.max if h_now.count else 0.0
        ok, reason = ro.local_health(plan.health, inferences=inf, errors=err,
                                     p95_new=delta.percentile(95) if delta.count else None,
                                     p95_old=h_old.percentile(95) if h_old.count else None)
        if ok:
            ph["step"] = "healthy"
            self._save()
            self._report(plan, "healthy", reason)
        else:
            self._fail(plan, f"health: {reason}")

    def _fail(self, plan: ro.Plan, reason: str, rollback: bool = True) -> None:
        if rollback and (self.agent.model or {}).get("sha256") == plan.package.sha256:
            try:
                self.agent.rollback()
                self.counters["rollbacks"] += 1
            except EdgeshipError as exc:
                reason += f"; rollback failed: {exc}"
        self.state["phase"] = {"rollout_id": plan.rollout_id, "sha256": plan.package.sha256, "step": "failed",
                               "reason": reason[:500]}
        self._save()
        self._report(plan, "failed", reason)

    def _abort(self, plan: ro.Plan, cur: str | None) -> None:
        sha = plan.package.sha256
        self._dl_stop.set()  # an aborted package is not worth the bandwidth
        done = self.state["reported"].get(plan.rollout_id, [])
        ph = self.state.get("phase") or {}
        if cur == sha and not (ph.get("rollout_id") == plan.rollout_id and ph.get("step") == "failed"):
            try:
                self.agent.rollback()
                self.counters["rollbacks"] += 1
            except EdgeshipError as exc:
                # Nothing to go back to (e.g. the previous package was removed): say so once, stay up.
                self.last_error = f"rollback after abort failed: {exc}"
                log.error("%s", self.last_error)
                self.state["phase"] = {"rollout_id": plan.rollout_id, "sha256": sha, "step": "failed",
                                       "reason": self.last_error}
                self._report(plan, "failed", self.last_error)
                return
            self.state["phase"] = {"rollout_id": plan.rollout_id, "sha256": sha, "step": "rolled_back"}
            self._save()
            self._report(plan, "rolled_back", plan.reason or "rollout aborted")
        elif "active" in done and "rolled_back" not in done and "failed" not in done:
            self._report(plan, "rolled_back", plan.reason or "rollout aborted")
