"""The device agent: sources → prefetch → micro-batcher → runner → sinks, plus the local API.

Usage (notebook or app)::

    from edgeship.agent import Agent
    with Agent.from_config("agent.toml") as agent:        # or Agent(package="model.edgepkg")
        r = agent.infer(x)                               # Result: label, score, outputs, prediction_id
        fut = agent.submit(x, deadline=0.02)             # concurrent.futures.Future[Result]

Data flow and threads (each loop is a class owning its thread):

* one :class:`~edgeship.agent.prefetch.Prefetcher` per ``[[sources]]``
  entry reads blocks, decodes/preprocesses/validates them and puts
  :class:`~edgeship.agent.batcher.Work` into the shared
  :class:`~edgeship.agent.batcher.MicroBatcher`;
* ``submit()`` and the HTTP API validate one sample in the caller's thread and put it into the batcher;
* the batcher thread packs a batch into preallocated buffers, runs the
  *current* model (:class:`ModelHandle`, read once per batch), splits the
  outputs back per request in order, completes futures and hands one
  :class:`~edgeship.agent.results.ResultBatch` per batch to the sinks and
  components.

Bad input never stops the agent: a sample with the wrong shape or dtype, or with NaN/inf, is
refused with an :class:`~edgeship.errors.InputError` (``submit`` raises it; source rows are logged
and counted as ``rejected``) and everything else goes on.

Components (telemetry, feedback, rollout, drift) plug in with ``agent.add_component(obj)``; their
contract is in :mod:`.hooks`.

Model swaps (rollout): ``load_candidate(sha)`` loads and warms a stored
package beside the running one and returns a handle; ``switch_to(handle
or sha)`` makes it active between two batches (no request is dropped or
answered by a half-loaded model) and records it in ``state.json``;
``rollback()`` goes back to the previous model (kept in memory for
``[rollout] health_window_s`` after a switch, so rolling back is instant).

Starting without a model: with an empty store and a component that installs
models (the rollout client, wired when ``[mqtt] broker`` is set), ``start()``
succeeds; health says ``waiting``, requests are refused with an
:class:`~edgeship.errors.OverloadError`, sources wait, and the first
``switch_to`` starts serving. Without such a component an empty store is a
one-line :class:`~edgeship.errors.StoreError` (nothing would ever install one).

Around this module: :mod:`.handle` (a loaded model), :mod:`.intake` (sample and block validation,
pure), :mod:`.agent_metrics` (counters), :mod:`.runner_main` (which components a config asks for).
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import secrets
import threading
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..errors import FeedbackUnavailableError, InputError, OverloadError, SignatureError, StoreError
from .agent_metrics import COUNTER_NAMES, AgentMetrics, batch_cap, rss_bytes  # noqa: F401 - re-exported: AgentMetrics
from .batcher import BatchPolicy, MicroBatcher, Segment, Work
from .cache import ResultCache, input_key, row_keys
from .config import AgentConfig, load_config, parse_config
from .disk import disk_state
from .handle import ModelHandle, load_handle
from .hooks import Hooks, component_health
from .intake import decode_block, validate_one
from .prefetch import Prefetcher
from .results import Result, ResultBatch, _top, classify, label_name
from .sinks import Sink, make_sink
from .sources import RawBlock, Source, make_source, preload_image_decoder
from .store import ModelStore
from .systemd import Notifier

__all__ = ["Agent", "AgentMetrics", "ModelHandle", "Result", "FeedbackUnavailableError"]

log = logging.getLogger("edgeship.agent")

UNSIGNED_REFUSED = ("package refused: [agent] trusted_keys is empty, so its signature cannot be checked; "
                    "set trusted_keys = [\"/etc/edgeship/fleet.pub\"] (or allow_unsigned = true to run "
                    "unsigned packages, tampered ones included)")
UNSIGNED_WARNING = ("[agent] allow_unsigned = true and no trusted_keys: packages are NOT signature-checked; "
                    "unsigned, tampered and wrongly signed packages are installed and run")


class Agent:
    """The on-device agent. Build with a config (or ``package=``), then ``start()`` / context manager."""

    def __init__(self, config: AgentConfig | Mapping | None = None, *, package: str | os.PathLike | None = None,
                 state_dir: str | os.PathLike | None = None, callbacks: Mapping[str, Callable] | None = None,
                 sink_factories: Mapping[str, Callable] | None = None, components: Iterable[Any] = (),
                 sinks: Iterable[Sink] = (), sources: Iterable[Source] = ()) -> None:
        if config is None:
            config = AgentConfig()
        elif isinstance(config, Mapping):
            config = parse_config(config)
        if package is not None or state_dir is not None:
            a = config.agent
            import dataclasses
            config = dataclasses.replace(config, agent=dataclasses.replace(
                a, package=str(package) if package is not None else a.package,
                state_dir=str(state_dir) if state_dir is not None else a.state_dir))
        self.config: AgentConfig = config
        self.metrics = AgentMetrics()
        self.callbacks = dict(callbacks or {})
        self.sink_factories = dict(sink_factories or {})
        self.components: list[Any] = list(components)
        self._extra_sinks = list(sinks)
        self._extra_sources = list(sources)
        self.store: ModelStore | None = None
        self.cache: ResultCache | None = None
        self.sinks: list[Sink] = []
        self.prefetchers: list[Prefetcher] = []
        self.batcher: MicroBatcher | None = None
        self.api = None
        self._handle: ModelHandle | None = None
        self._previous: ModelHandle | None = None
        self._previous_until = 0.0
        self._state = "new"   # new | starting | running | stopping | stopped
        self._lock = threading.RLock()
        self._switch_lock = threading.Lock()
        # Sources wait for the first model when the agent starts with an empty store (see _start).
        self._deferred_sources: list[tuple[Source, Any]] = []
        self._policy: BatchPolicy | None = None
        self._id_lock = threading.Lock()
        self._next_id = 0
        self.run_id = secrets.token_hex(4)
        self._id_prefix = f"{self.run_id}-"
        self.started_at: float | None = None
        self.first_result_at: float | None = None
        self._notifier = Notifier.from_env()
        self._hooks = Hooks()
        self._max_batch = config.batcher.max_batch

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_config(cls, path: str | os.PathLike, **kwargs: Any) -> "Agent":
        """The agent ``edgeship agent run`` would run: the config's components wired in.

        With ``[mqtt] broker`` that is the fleet link (outbox, telemetry,
        state, feedback) and the rollout client, so ``agent.feedback(...)``
        works; see :func:`edgeship.agent.wiring.wire_components`.
        """
        from .wiring import wire_components  # noqa: PLC0415 - only what the config asks for

        agent = cls(load_config(path), **kwargs)
        wire_components(agent, agent.config)
        return agent

    def add_component(self, obj: Any) -> Any:
        """Plug in a component (``start``/``stop``, optional ``on_batch``/``on_result``/``health``/``feedback``)."""
        with self._lock:
            self.components.append(obj)
            if self._state == "running":
                self._wire_component(obj)
                obj.start()
        return obj

    def _wire_component(self, obj: Any) -> None:
        self._hooks.wire(obj)

    # -- model loading --------------------------------------------------------
    def _trusted(self) -> list[str] | None:
        """The keys packages are verified with; None (no check) only with ``allow_unsigned``.

        Refusing here, at every install and load, makes the insecure set-up
        a deliberate one: an empty key list alone no longer accepts unsigned,
        tampered or wrongly signed packages (issue 17, item 16).
        """
        a = self.config.agent
        if a.trusted_keys:
            return list(a.trusted_keys)
        if a.allow_unsigned:
            return None
        raise SignatureError(UNSIGNED_REFUSED)

    def load_candidate(self, sha: str, variant: str | None = None) -> ModelHandle:
        """Load and warm a stored package beside the active model (does not switch); ``variant`` overrides the config's."""
        if self.store is None:
            raise StoreError("the agent is not started; call start() first")
        self.store.verify(sha, self._trusted(), deep=False)  # install hashed it; the load hashes the model file
        return self._load(sha, variant)

    def _load(self, sha: str, variant: str | None = None, warmup: int | None = None) -> ModelHandle:
        return load_handle(self.store, sha, self.config.runtime, variant, warmup=warmup)

    def _load_first(self, sha: str) -> ModelHandle:
        # Nothing is served yet at start-up: one warm-up run takes the first run's one-off costs
        # (allocation, kernel choice) off the first request. [runtime] warmup's further runs are for
        # a model swapped in under load (load_candidate); here they only delay the first result.
        return self._load(sha, warmup=min(1, self.config.runtime.warmup))

    @property
    def signatures_off(self) -> bool:
        """True when packages run without a signature check (``allow_unsigned`` and no keys)."""
        return not self.config.agent.trusted_keys and self.config.agent.allow_unsigned

    @property
    def model(self) -> dict | None:
        h = self._handle
        return dict(h.model) if h is not None else None

    @property
    def handle(self) -> ModelHandle | None:
        return self._handle

    def switch_to(self, target: ModelHandle | str) -> dict:
        """Make ``target`` (a handle from ``load_candidate`` or a stored sha256) the active model.

        The swap is one reference assignment read by the batcher at the start
        of each batch: the batch in flight finishes on the old model, the next
        one runs on the new, already warm model. Returns the new model dict.
        """
        with self._switch_lock:
            handle = target if isinstance(target, ModelHandle) else self.load_candidate(target)
            old = self._handle
            if old is not None and old.sha256 == handle.sha256 and old.variant == handle.variant:
                if handle is not old:
                    handle.close()
                return dict(old.model)
            self.store.activate(handle.sha256)  # raises when pinned to another version
            self._swap(handle)
            self.metrics.counters.inc("switches")
            log.info("switched to %s %s (%s)", handle.model["name"], handle.model["version"], handle.sha256[:12])
            return dict(handle.model)

    def _swap(self, handle: ModelHandle) -> None:
        old = self._handle
        if old is not None and handle.sample_shapes != old.sample_shapes:
            log.warning("the new model takes %s instead of %s: queued samples of the old shape will be rejected",
                        handle.sample_shapes, old.sample_shapes)
        if old is None:
            self._set_max_batch(handle)  # the first model: nothing was batched for another one yet
        if handle.states is not None:
            handle.states.reset()  # a model switch starts every stream afresh (also a rollback to a kept handle)
        self._handle = handle  # the swap point (see _process)
        if self.cache is not None:
            self.cache.clear()
        prev, self._previous = self._previous, old
        self._previous_until = time.monotonic() + self.config.rollout.health_window_s
        if prev is not None and prev is not handle:
            self._close_later(prev)
        if old is None:
            self._start_deferred_sources()
            self._notifier.notify(f"STATUS=serving {handle.model['name']} {handle.model['version']}")

    def _close_later(self, handle: ModelHandle) -> None:
        # The batcher may still be running a batch on it: close after that batch.
        since = time.monotonic()

        def closer():
            deadline = since + 30
            while self.batcher is not None and not self.batcher.ran_since(since) and time.monotonic() < deadline:
                time.sleep(0.005)
            handle.close()
        threading.Thread(target=closer, name="edgeship-close-model", daemon=True).start()

    def rollback(self) -> dict:
        """Go back to the previous model (instantly when it is still in memory)."""
        with self._switch_lock:
            if self.store is None:
                raise StoreError("the agent is not started; call start() first")
            sha = self.store.rollback()
            prev = self._previous
            handle = prev if prev is not None and prev.sha256 == sha else self._load(sha)
            self._swap(handle)
            self.metrics.counters.inc("rollbacks")
            log.warning("rolled back to %s %s (%s)", handle.model["name"], handle.model["version"], sha[:12])
            return dict(handle.model)

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> "Agent":
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"this Agent is {self._state}; build a new one to start again")
            self._state = "starting"
        try:
            self._start()
        except BaseException:
            self._state = "stopping"
            self._teardown(1.0)
            self._state = "stopped"
            raise
        self._state = "running"
        h = self._handle
        # READY also while waiting for the first model: the agent is up (API, fleet link, rollout
        # client) and the watchdog is fed, so systemd neither times out nor restart-loops it.
        self._notifier.notify("READY=1", f"STATUS=serving {h.model['name']} {h.model['version']}" if h is not None
                              else "STATUS=waiting for the first model (a rollout installs it)")
        return self

    def _start(self) -> None:
        cfg = self.config
        self.started_at = time.monotonic()
        self.store = ModelStore(cfg.agent.state_dir)
        if self.signatures_off:
            log.warning(UNSIGNED_WARNING)
        if cfg.agent.package:
            sha = self.store.install(cfg.agent.package, self._trusted())
            if self.store.active is None:
                self.store.activate(sha)
        # The start-up choice loads (and so checks) its model: a package that fails to load is
        # set aside and the previous one tried (store.load_startup).
        # An empty store needs no keys yet (a rollout, which needs them, installs the first model).
        if any(s.type == "folder" for s in cfg.sources):
            preload_image_decoder()  # in the background, while the model loads
        first = self.store.load_startup(self._load_first, self._trusted()) if self.store.active is not None else None
        if first is None and not self.waits_for_rollout:
            raise StoreError(f"no model: the store in {cfg.agent.state_dir} is empty; set [agent] package "
                             "to a .edgepkg file, or [mqtt] broker so a rollout can install one")
        b = cfg.batcher
        if cfg.cache.enabled:
            self.cache = ResultCache(cfg.cache.max_entries, cfg.cache.ttl_s)
        policy = self._policy = BatchPolicy(b.max_batch, b.max_delay_ms / 1000.0, b.queue_size, b.overload,
                                            margin_s=b.deadline_margin_ms / 1000.0, max_bytes=b.max_bytes_in_flight)
        if first is not None:
            self._handle = first
            self._set_max_batch(self._handle)
        else:
            log.warning("no model yet: the store in %s is empty; waiting for a rollout to install the first one",
                        cfg.agent.state_dir)
        tick = self._notifier.watchdog_interval() or 1.0
        self.batcher = MicroBatcher(policy, self._process, block_timeout_s=b.block_timeout_ms / 1000.0,
                                    on_error=self._on_batch_error, on_evicted=self._on_evicted,
                                    on_tick=self._tick, tick_s=min(1.0, tick))
        self.metrics.queue_depth = lambda: policy.pending
        self.metrics.memory = self._memory
        self.sinks = [make_sink(s, callbacks=self.callbacks, factories=self.sink_factories) for s in cfg.sinks]
        self.sinks += self._extra_sinks
        for c in self.components:
            self._wire_component(c)
        self.batcher.start()
        for c in self.components:
            c.start()
        sources = [(self._make_source(s), s) for s in cfg.sources]
        sources += [(src, None) for src in self._extra_sources]
        if self._handle is None:
            self._deferred_sources = sources  # started by the first switch_to (see _swap)
        else:
            for src, scfg in sources:
                self._start_source(src, scfg)
        if cfg.api.enabled:
            from .api import ApiServer  # noqa: PLC0415

            self.api = ApiServer(self, cfg.api).start()
        from .adapt_choice import start_choice  # noqa: PLC0415 - #18: serve the fastest variant within budget
        start_choice(self)  # times the variants beside the default on its own thread, after the first result

    @property
    def waits_for_rollout(self) -> bool:
        """Whether an empty store means "wait for the first model": a component installs models."""
        return any(getattr(c, "installs_models", False) for c in self.components)

    def _set_max_batch(self, handle: ModelHandle) -> None:
        # A model without a batch axis takes one sample per call; a big one as many as fit in
        # [batcher] max_bytes_in_flight (its measured working memory per sample; see batch_cap).
        b = self.config.batcher
        cap, queue_bytes = batch_cap(b.max_batch, b.max_bytes_in_flight, handle.sample_bytes, handle.work_bytes)
        self._max_batch = 1 if handle.model_batch == 0 else cap
        if self._policy is not None:
            self._policy.max_batch = self._max_batch
            self._policy.max_bytes = queue_bytes
        if cap < b.max_batch:
            log.info("batch capped at %d (of max_batch %d): %.1f MB per sample (inputs + working memory) within "
                     "[batcher] max_bytes_in_flight = %.0f MB", cap, b.max_batch,
                     (handle.sample_bytes + handle.work_bytes) / 1e6, b.max_bytes_in_flight / 1e6)

    def _memory(self) -> dict:
        """Memory figures for /v1/metrics and telemetry: RSS, bytes in flight and their bounds."""
        p, h = self._policy, self._handle
        queued = sum(pf._q.nbytes for pf in self.prefetchers)
        batch = (h.sample_bytes + h.work_bytes) * self._max_batch if h is not None else 0
        return {"rss_bytes": rss_bytes(), "queue_bytes": int(p.pending_bytes) if p else 0,
                "read_ahead_bytes": int(queued), "batch_bytes": int(batch),
                "bytes_in_flight": int((p.pending_bytes if p else 0) + queued + batch),
                "max_bytes_in_flight": self.config.batcher.max_bytes_in_flight, "batch_cap": self._max_batch}

    def _start_deferred_sources(self) -> None:
        sources, self._deferred_sources = self._deferred_sources, []
        for src, scfg in sources:
            self._start_source(src, scfg)

    @staticmethod
    def _make_source(scfg) -> Source:
        if scfg.reader == "process":
            from .procsource import ProcessSource  # noqa: PLC0415 - only for this option

            return ProcessSource(scfg.type, scfg.id, scfg.options, block_size=scfg.block_size or 256)
        return make_source(scfg.type, scfg.id, **scfg.options)

    def _start_source(self, src: Source, scfg) -> Prefetcher:
        kw = {}
        if scfg is not None:
            kw = dict(block_size=scfg.block_size, read_ahead=scfg.read_ahead, workers=scfg.workers,
                      read_ahead_bytes=scfg.read_ahead_bytes,
                      restart=scfg.restart, max_restarts=scfg.max_restarts)
        deadline_s = scfg.deadline_ms / 1000.0 if scfg is not None and scfg.deadline_ms else None
        pf = Prefetcher(src, lambda block, s, _d=deadline_s: self._prepare(block, s, _d),
                        lambda work, stop: self.batcher.put(work, stop=stop),
                        on_reject=self._on_source_reject, **kw)
        self.prefetchers.append(pf.start())
        return pf

    def add_source(self, src: Source, deadline_ms: float | None = None, **prefetch: Any) -> Prefetcher:
        """Attach a source object to a running agent (tests, apps with their own reader)."""
        if self._state != "running":
            raise RuntimeError("the agent is not running")
        if self._handle is None:
            raise RuntimeError("the agent has no model yet; add sources once a rollout installed one")
        pf = Prefetcher(src, lambda block, s: self._prepare(block, s, deadline_ms / 1000.0 if deadline_ms else None),
                        lambda work, stop: self.batcher.put(work, stop=stop), on_reject=self._on_source_reject,
                        **prefetch)
        self.prefetchers.append(pf.start())
        return pf

    def stop(self, timeout: float | None = None) -> None:
        """Stop sources, answer what is in flight (at most ``timeout`` s), stop components, close sinks."""
        with self._lock:
            if self._state in ("stopping", "stopped", "new"):
                self._state = "stopped"
                return
            self._state = "stopping"
        self._notifier.notify("STOPPING=1")
        self._teardown(self.config.agent.drain_timeout_s if timeout is None else timeout)
        self._state = "stopped"

    def _teardown(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for pf in self.prefetchers:
            if not pf.stop(min(2.0, max(0.1, deadline - time.monotonic()))):
                log.warning("source %s did not stop in time (stalled inside read); abandoned", pf.source.id)
        if self.api is not None:
            self.api.stop(1.0)
        if self.batcher is not None:
            lost = self.batcher.stop(max(0.0, deadline - time.monotonic()))
            if lost:
                log.warning("%d queued samples were not run before the drain timeout", lost)
        for c in reversed(self.components):
            try:
                c.stop(max(0.5, deadline - time.monotonic()))
            except Exception as exc:
                log.warning("component %s did not stop cleanly: %s", type(c).__name__, exc)
        for s in self.sinks:
            try:
                s.close()
            except Exception as exc:
                log.warning("sink %s did not close cleanly: %s", type(s).__name__, exc)
        for h in {id(h): h for h in (self._handle, self._previous) if h is not None}.values():
            h.close()

    def __enter__(self) -> "Agent":
        if self._state == "new":
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._state == "running"

    def sources_finished(self) -> bool:
        """Every source reached its end and its samples were handed to the batcher."""
        return bool(self.prefetchers) and all(p.finished for p in self.prefetchers)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until finite sources are done and the queue is empty (or the timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            b = self.batcher
            if (not self.prefetchers or self.sources_finished()) and b is not None and b.pending == 0 and not b.busy:
                return True
            time.sleep(0.005)
        return False

    # -- requests -------------------------------------------------------------
    def _check_running(self) -> None:
        if self._state != "running":
            raise OverloadError(f"the agent is {self._state}; start() it first" if self._state == "new"
                                else f"the agent is {self._state} and accepts no new requests")
        if self._handle is None:
            raise OverloadError("no model yet: the agent waits for a rollout to install its first model")

    def submit(self, x, deadline: float | None = None, *, preprocess: bool = True, source: str = "api",
               timeout: float | None = None, stream: str | None = None,
               reset: bool = False) -> concurrent.futures.Future:
        """Queue one sample; returns a Future[Result].

        ``x``: one raw sample (array-like; the manifest preprocess is applied
        unless ``preprocess=False``) or ``{input name: array}``. ``deadline``:
        seconds from now the answer is wanted within (the batcher flushes
        early for it). ``stream``: for a stateful model, the id of the stream
        this sample continues (its state is carried from the stream's last
        call; without one, the sample starts from the initial state);
        stateless models ignore it; ``reset``: this sample restarts it. Raises
        :class:`InputError` for a bad sample and :class:`OverloadError` when
        the queue refuses it.
        """
        now = time.monotonic()  # request in: validation and preprocessing count in its latency
        self._check_running()
        handle = self._handle
        try:
            xs = validate_one(handle, x, preprocess)
        except InputError as exc:
            self.metrics.record_rejects(source, [(None, str(exc))])
            raise
        fut: concurrent.futures.Future = concurrent.futures.Future()
        keys = None
        full = xs  # the cache key covers scalar inputs too (they leave xs for the batch group)
        xs, group, stream = handle.split(xs, stream, reset)
        if self.cache is not None and handle.states is None:  # a stateful answer depends on more than x
            key = input_key(full, handle.sha256.encode())
            hit = self.cache.get(key)
            if hit is not None:
                self.metrics.counters.inc("cache_hits")
                self._emit_cached(handle, [hit], [x_[None] for x_ in xs], source, time.time(), now, None, fut)
                return fut
            self.metrics.counters.inc("cache_misses")
            keys = [key]
        w = Work([x_[None] for x_ in xs], 1, t_in=now, deadline=None if deadline is None else now + deadline,
                 source=source, future=fut, keys=keys, group=group, stream=stream)
        try:
            # inline: with the runner free and the batch due now, this thread runs it
            # (no hand-off to the batcher thread and back; see batcher.py).
            self.batcher.put(w, timeout=timeout, inline=True)
        except OverloadError:
            self.metrics.counters.inc("overload_rejected")
            raise
        self.metrics.counters.inc("requests")
        return fut

    def infer(self, x, deadline: float | None = None, timeout: float = 30.0, **kw: Any) -> Result:
        """Run one sample and wait for its :class:`Result` (at most ``timeout`` s)."""
        fut = self.submit(x, deadline, **kw)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            raise OverloadError(f"no result within {timeout:g} s; the agent is overloaded or stalled") from exc

    def reset_stream(self, stream: str | None = None) -> bool:
        """Forget a stream's state (``None``: every stream's) on the active stateful model.

        The stream's next sample starts from the initial state. True when
        there was a state to forget.
        """
        h = self._handle
        return h is not None and h.states is not None and h.states.reset(stream)

    def feedback(self, prediction_id: str, kind: str, value: Any = None) -> Any:
        """Hand feedback on a prediction to the feedback component (see the module docstring)."""
        for c in self.components:
            fn = getattr(c, "feedback", None)
            if callable(fn):
                return fn(prediction_id, kind, value)
        raise FeedbackUnavailableError("feedback is not enabled on this agent: configure [mqtt] (the feedback "
                                   "component stores feedback in the outbox) or add a feedback component")

    # -- source path ----------------------------------------------------------
    def _prepare(self, block: RawBlock, src: Source, deadline_s: float | None) -> tuple[Work | None, list]:
        """Runs in a prefetch worker: decode, preprocess, validate a block; returns (work, rejects)."""
        handle = self._handle
        rows, rejects = decode_block(handle, block, src)
        if rows is None:
            return None, rejects
        x, refs, ts = rows
        n = len(x)
        now = time.monotonic()
        keys = None
        if self.cache is not None and handle.states is None:
            keys = row_keys([x], 0, n, handle.sha256.encode())
            hits = [self.cache.get(k) for k in keys]
            hit_idx = [i for i, h in enumerate(hits) if h is not None]
            self.metrics.counters.inc("cache_hits", len(hit_idx))
            self.metrics.counters.inc("cache_misses", n - len(hit_idx))
            if hit_idx:
                sel = np.asarray(hit_idx)
                self._emit_cached(handle, [hits[i] for i in hit_idx], [x[sel]], src.id,
                                  ts[sel] if isinstance(ts, np.ndarray) else ts, now,
                                  [refs[i] for i in hit_idx] if refs is not None else None, None)
                miss = np.asarray([i for i, h in enumerate(hits) if h is None], dtype=np.int64)
                if miss.size == 0:
                    return None, rejects
                x = x[miss]
                keys = [keys[i] for i in miss.tolist()]
                refs = [refs[i] for i in miss.tolist()] if refs is not None else None
                ts = ts[miss] if isinstance(ts, np.ndarray) else ts
                n = len(x)
        # A stateful model: each source is one stream, its rows run one per batch, in order.
        w = Work([x], n, t_in=now, deadline=None if deadline_s is None else now + deadline_s, source=src.id,
                 ts=ts, keys=keys, extra=refs, group=None if handle.plain else handle.group_of([x], rows=True),
                 stream=src.id if handle.states is not None else None)
        return w, rejects

    def _on_source_reject(self, source: str, rejects: list) -> None:
        self.metrics.record_rejects(source, rejects)
        for ref, reason in rejects[:3]:
            log.warning("source %s: rejected %s: %s", source, ref if ref is not None else "a sample", reason)
        if len(rejects) > 3:
            log.warning("source %s: rejected %d more samples", source, len(rejects) - 3)

    def _on_evicted(self, work: Work, n: int) -> None:
        self.metrics.counters.inc("dropped", n)

    def _on_batch_error(self, segments: list[Segment], exc: BaseException) -> None:
        n = sum(s.count for s in segments)
        if isinstance(exc, InputError):
            self.metrics.record_rejects("batch", [(None, str(exc))] * n)
        else:
            self.metrics.counters.inc("errors", n)

    def _tick(self) -> None:
        # Runs on the batcher thread: the watchdog ping proves the batch loop is alive
        # (only once READY=1 was sent: systemd expects READY first).
        if self._state == "running":
            self._notifier.watchdog()
        prev = self._previous
        if prev is not None and time.monotonic() > self._previous_until:
            self._previous = None  # health window over: free the old model's memory
            self._close_later(prev)

    # -- the batch ------------------------------------------------------------
    def _alloc_ids(self, n: int) -> int:
        with self._id_lock:
            base = self._next_id
            self._next_id += n
        return base

    def _process(self, segments: list[Segment]) -> Callable[[], None]:
        """Runs on the batcher thread: one batch through the current model.

        Returns the batch's delivery (results out in order), which the batcher
        runs on its delivery thread while the next batch's model call runs.
        """
        handle = self._handle  # read once: a switch takes effect at the next batch
        packer, n, t0, outs = handle.run_segments(segments, self._max_batch)
        t_done = time.monotonic()
        if self.first_result_at is None:
            self.first_result_at = t_done
        inputs = None
        if self._hooks.need_inputs:
            # Copies: the next batch refills the packer's buffers while this one is delivered.
            inputs = [b[:n].copy() for b in packer.buffers]
        return functools.partial(self._finish, handle, segments, outs, n, t0, t_done, inputs)

    def _finish(self, handle: ModelHandle, segments: list[Segment], outs: list[np.ndarray], n: int, t0: float,
                t_done: float, inputs: list[np.ndarray] | None) -> None:
        """Deliver one run batch: ids, metrics, cache, sinks and hooks, then the callers' futures."""
        base = self._alloc_ids(n)
        sources: list = []
        ts: list = []
        lats: list = []
        refs: list | None = None
        lat_counts = []
        missed = 0
        futures = []
        spans: list | None = []
        cache = self.cache
        for seg in segments:
            w, c = seg.work, seg.count
            lat = (t_done - w.t_in) * 1000.0
            lat_counts.append((lat, c))
            if spans is not None:
                if isinstance(w.ts, np.ndarray):
                    spans = None
                else:
                    spans.append((c, w.source, w.ts, lat))
            if w.deadline is not None and t_done > w.deadline:
                missed += c
            sources += [w.source] * c
            lats += [lat] * c
            if isinstance(w.ts, np.ndarray):
                ts += w.ts[seg.start:seg.start + c].tolist()
            else:
                ts += [w.ts] * c
            if w.extra is not None or refs is not None:
                if refs is None:
                    refs = [None] * (seg.pos)
                refs += w.extra[seg.start:seg.start + c] if w.extra is not None else [None] * c
            if w.future is not None:
                futures.append(seg)
            if cache is not None and w.keys is not None:
                for i in range(c):
                    cache.put(w.keys[seg.start + i], tuple(o[seg.pos + i] for o in outs))
        deliver = self.sinks or self._hooks.any
        # Labels and scores for the whole batch only when a sink or hook reads them;
        # API callers get theirs computed on first read, in their own thread.
        cls = classify(outs[0]) if deliver and len(outs) == 1 and handle.post is None else None
        m = self.metrics
        m.counters.inc("inferences", n)
        m.counters.inc("batches")
        if missed:
            m.counters.inc("deadline_missed", missed)
        m.record_batch(n, (t_done - t0) * 1000.0, lat_counts)
        if deliver:
            batch = ResultBatch(model=handle.model, output_names=handle.output_names, outputs=outs, n=n,
                                id_prefix=self._id_prefix, id_base=base, source=sources, ts=ts, latency_ms=lats,
                                labels=handle.labels, refs=refs, model_json=handle.model_json, cls=cls,
                                spans=spans, post=handle.post)
            self._deliver(batch, inputs, handle.input_names if handle.plain else
                          [handle.input_names[i] for i in handle.packed])
        # Futures last: waking a caller can preempt this thread (same core, GIL
        # handover), so everything else of the batch is done before.
        labels = handle.labels
        for seg in futures:
            w = seg.work
            p = seg.pos
            outputs = {name: o[p] for name, o in zip(handle.output_names, outs)}
            if cls is not None:
                r = Result(f"{self._id_prefix}{base + p}", outputs, handle.model, lats[p], w.source, ts[p],
                           label_name(labels, int(cls[0][p])), float(cls[1][p]), _top(outs[0][p], labels))
            else:
                r = Result(f"{self._id_prefix}{base + p}", outputs, handle.model, lats[p], w.source, ts[p],
                           labels=labels, post=handle.post)
            w.future.set_result(r)

    def _deliver(self, batch: ResultBatch, inputs: list[np.ndarray] | None, input_names: list[str] = ()) -> None:
        self._hooks.deliver(batch, inputs, input_names, self.sinks, lambda: self.metrics.counters.inc("errors"))

    def _emit_cached(self, handle: ModelHandle, hits: list[tuple], xs: list[np.ndarray], source: str, ts, t_in: float,
                     refs, fut) -> None:
        n = len(hits)
        outs = [np.stack([h[j] for h in hits]) for j in range(len(hits[0]))]
        lat = (time.monotonic() - t_in) * 1000.0
        base = self._alloc_ids(n)
        batch = ResultBatch(model=handle.model, output_names=handle.output_names, outputs=outs, n=n,
                            id_prefix=self._id_prefix, id_base=base, source=source, ts=ts, latency_ms=lat,
                            labels=handle.labels, refs=refs, cached=True, model_json=handle.model_json,
                            post=handle.post)
        with self.metrics._lock:
            self.metrics.latency_ms.add_repeated(lat, n)
        if fut is not None:
            fut.set_result(batch.results()[0])
        self._deliver(batch, None)

    # -- health ---------------------------------------------------------------
    def health(self) -> dict:
        h = self._handle
        b = self.batcher
        sources = [p.health() for p in self.prefetchers]
        status = "ok" if self._state == "running" else self._state
        if status == "ok" and h is None:
            status = "waiting"  # up and reporting, no model yet: a rollout installs the first one
        if status == "ok" and (b is None or not b.alive or any(s["state"] in ("stalled", "failed") for s in sources)):
            status = "degraded"
        # A full state disk loses feedback and telemetry: say so (issue 17.19).
        disk = disk_state(self.config.agent.state_dir, write_error=next(
            (e for e in (getattr(c, "disk_error", None) for c in self.components) if e), None))
        if disk["full"] and status == "ok":
            status = "degraded"
        out = {
            "status": status,
            "device": self.config.agent.device_id,
            "fleet": self.config.agent.fleet,
            "model": dict(h.model) if h else None,
            **({"waiting_for": "the first model (a rollout installs it)"} if status == "waiting" else {}),
            "backend": getattr(h.runner, "backend", None) if h else None,
            "previous_in_memory": self._previous.model["version"] if self._previous else None,
            "uptime_s": (time.monotonic() - self.started_at) if self.started_at else 0.0,
            "queue_depth": b.pending if b else 0,
            "last_batch_age_s": (time.monotonic() - b.last_batch_at) if b and b.last_batch_at else None,
            "sources": sources,
            "counters": self.metrics.counters.snapshot(),
            "recent_rejects": list(self.metrics.recent_rejects[-5:]),
            "disk": disk,
            "package_signatures": "not checked (allow_unsigned)" if self.signatures_off else "required",
        }
        if self.cache is not None:
            out["cache"] = self.cache.stats()
        comps = component_health(self.components)
        if comps:
            out["components"] = comps
        return out

    # -- running as a service -------------------------------------------------
    def run_forever(self, stop_event: threading.Event | None = None, *, until_done: bool = False,
                    handle_signals: bool = True) -> int:
        """Start (if needed) and serve until SIGTERM/SIGINT (or ``stop_event``); drain and return 0.

        ``until_done``: also return when every source has ended and the queue is empty.
        """
        import signal

        stop_event = stop_event or threading.Event()
        old = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old[sig] = signal.signal(sig, lambda *_: stop_event.set())
        try:
            if self._state == "new":
                self.start()
            while not stop_event.wait(0.2):
                if until_done and self.prefetchers and self.sources_finished() and self.wait_idle(0.5):
                    break
        finally:
            self.stop()
            for sig, h in old.items():
                signal.signal(sig, h)
        return 0
