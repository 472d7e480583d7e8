"""A loaded, warmed model (:class:`ModelHandle`) and how one is built from a stored package.

The agent swaps whole handles between batches (see ``Agent.switch_to``); a
handle holds everything the hot path needs, computed once at load time.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import EdgeshipError, InputError, ModelError
from .agent_metrics import batch_work_bytes, memory_mark
from .batcher import Packer
from .preprocessing import BlockPreprocessor
from .streams import FreshStream, StreamStates

__all__ = ["ModelHandle", "load_handle", "batch_mode"]

log = logging.getLogger("edgeship.agent")


@dataclass
class ModelHandle:
    """A loaded, warmed model: runner + everything the hot path needs, built once."""

    sha256: str
    manifest: dict
    runner: Any
    input_names: list[str]
    output_names: list[str]
    sample_shapes: list[tuple[int, ...]]
    dtypes: list[np.dtype]
    model_batch: int | None       # None dynamic, k fixed, 0 no batch axis
    preprocessors: list[BlockPreprocessor]
    labels: list[str] | None
    model: dict
    model_json: str
    load_s: float = 0.0
    warmup_s: float = 0.0
    packers: dict = field(default_factory=dict)
    variant: str | None = None  # the package variant's id (adapt switches variants of one package)
    # Model shapes beyond one batched tensor (issue 20.4); all empty for a plain model, which keeps the
    # plain hot path (see ``plain``).
    scalars: list[int] = field(default_factory=list)  # inputs without a batch axis next to batched ones
    dynamic: bool = False          # some input has variable sizes besides the batch (a detector's H x W)
    states: StreamStates | None = None  # per-stream state of a stateful model
    post: dict | None = None       # the package's postprocess hook
    # Working memory one more sample in a batch costs (activations, arena growth), measured at load;
    # 0 when not measured (fixed-batch models, no warm-up, no /proc).
    work_bytes: float = 0.0

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample's model inputs."""
        # A variable axis (-1) counts as 1: the byte bound then under-counts a detector's images,
        # which the per-request shapes would have to tell (not known before a request arrives).
        return int(sum(int(np.prod([max(1, d) for d in s], dtype=np.int64)) * t.itemsize
                       for s, t in zip(self.sample_shapes, self.dtypes)))

    @property
    def plain(self) -> bool:
        """Every input batched, fixed sample shapes, no state: the original fast path."""
        return not self.scalars and not self.dynamic and self.states is None

    @property
    def packed(self) -> list[int]:
        """Indices (into ``input_names``) of the inputs packed row by row into batches."""
        sc = set(self.scalars)
        return [i for i in range(len(self.input_names)) if i not in sc]

    def group_of(self, xs: list[np.ndarray], rows: bool = False) -> tuple | None:
        """What samples must share to run in one batch: their variable sizes and scalar values.

        ``xs``: one sample's arrays per input (``rows``: blocks with a leading row axis). None
        for a model where every sample fits every batch.
        """
        if not self.dynamic and not self.scalars:
            return None
        sc = set(self.scalars)
        shapes = tuple(tuple(x.shape[1:] if rows else x.shape) for i, x in enumerate(xs) if i not in sc) \
            if self.dynamic else ()
        return shapes, tuple(xs[i].item() for i in self.scalars)

    def packer(self, max_batch: int, group: tuple | None = None) -> Packer:
        key = max_batch if group is None else (max_batch, group[0])
        p = self.packers.get(key)
        if p is None:
            # Bounded: buffers of many distinct sizes (max_batch full-size images each) are rebuilt
            # rather than piled up on a small device.
            if len(self.packers) >= (4 if self.dynamic else 16):
                self.packers.clear()
            shapes = [self.sample_shapes[i] for i in self.packed] if not self.dynamic or group is None \
                else list(group[0])
            dtypes = [self.dtypes[i] for i in self.packed]
            p = self.packers[key] = Packer(shapes, dtypes, max_batch, self.model_batch)
        return p

    def run_packed(self, packer: Packer, n: int, group: tuple | None, streams: list | None) -> list[np.ndarray]:
        """Run rows ``[0, n)`` of ``packer`` for a model that is not :attr:`plain`.

        Scalar inputs come from ``group`` (one value per batch); a stateful
        model's state rows are gathered per stream (``streams``: one id or
        None per row) and its new state stored back before the outputs are
        handed on, so the next batch of the same stream sees it.
        """
        names = [self.input_names[i] for i in self.packed]
        scal = {self.input_names[i]: np.asarray(v, dtype=self.dtypes[i])
                for i, v in zip(self.scalars, group[1] if group is not None else ())}
        run = self.runner.run_unchecked
        st = self.states
        if st is None:
            return packer.run(lambda arrs: run({**dict(zip(names, arrs)), **scal}), n)
        mb = self.model_batch
        rows = list(streams or [None] * n)
        if mb:
            rows += [None] * (-n % mb)  # padding rows start from the initial state and are dropped
        state_in = st.gather(rows)
        out_names = list(self.runner.output_names)
        data_idx = [out_names.index(name) for name in self.output_names]
        state_idx = [out_names.index(p.output) for p in st.pairs]
        pos = 0
        state_out: list[list[np.ndarray]] = [[] for _ in st.pairs]

        def fn(arrs: list[np.ndarray]) -> list[np.ndarray]:
            nonlocal pos
            k = len(arrs[0]) if arrs else 1
            feed = dict(zip(names, arrs))
            feed.update(scal)
            for p, a in zip(st.pairs, state_in):
                feed[p.input] = np.take(a, range(pos, pos + k), axis=p.batch_axis)
            pos += k
            outs = run(feed)
            for j, i in enumerate(state_idx):
                state_out[j].append(outs[i])
            return [outs[i] for i in data_idx]

        outs = packer.run(fn, n)
        st.scatter(rows[:n], [np.concatenate(parts, axis=p.batch_axis) for p, parts in zip(st.pairs, state_out)])
        return outs

    def split(self, xs: list[np.ndarray], stream: Any, reset: bool = False) -> tuple[list[np.ndarray], tuple | None, Any]:
        """One validated sample -> (arrays to pack, batch group, stream id or None for a stateless model).

        ``reset``: the sample restarts ``stream`` from the initial state (:class:`FreshStream`).
        """
        if reset:
            if stream is None:
                raise InputError("reset restarts a stream: give the id of the stream it restarts")
            stream = FreshStream(stream)
        if self.plain:
            return xs, None, None
        group = self.group_of(xs)
        if self.scalars:
            xs = [xs[i] for i in self.packed]  # scalar values travel in the group
        return xs, group, stream if self.states is not None else None

    def run_segments(self, segments: list, max_batch: int) -> tuple[Packer, int, float, list[np.ndarray]]:
        """Pack and run one batch: ``(packer, rows, monotonic start of the model call, outputs)``."""
        if self.plain:
            packer = self.packer(max_batch)
            n = packer.pack(segments)
            t0 = time.monotonic()
            return packer, n, t0, packer.run(self.run_fn(), n)
        group = segments[0].work.group  # take() put only one group into this batch
        packer = self.packer(max_batch, group)
        n = packer.pack(segments)
        streams = None
        if self.states is not None:
            streams = [s for seg in segments for s in [seg.work.stream] * seg.count]
        t0 = time.monotonic()
        return packer, n, t0, self.run_packed(packer, n, group, streams)

    def run_fn(self) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
        names = self.input_names
        run = self.runner.run_unchecked
        if len(names) == 1:
            name = names[0]
            return lambda arrs: run({name: arrs[0]})
        return lambda arrs: run(dict(zip(names, arrs)))

    def close(self) -> None:
        try:
            self.runner.close()
        except Exception as exc:  # closing must never mask the real shutdown path
            log.warning("closing model %s failed: %s", self.sha256[:12], exc)


def batch_mode(spec, batch_size) -> tuple[int | None, tuple[int, ...]]:
    """(model batch, sample shape) of one input: None = any batch; k = exactly k rows; 0 = no axis.

    By the package contract the first axis is always the batch axis: ``-1``
    takes any batch, a fixed size takes exactly that many rows (padded and
    split by the packer; 1 = one by one). Only a scalar input has none.
    Other axes of any size (a detector's H x W, a text model's length) keep
    their ``-1`` in the sample shape; the agent then batches only samples of
    one size together (``ModelHandle.group_of``).
    """
    shape = tuple(int(d) for d in spec.shape)
    if not shape:
        return 0, ()
    if shape[0] == -1:
        mode, sample = None, shape[1:]
    else:
        mode, sample = shape[0], shape[1:]
    return mode, sample


PROBE_FILE = "work_bytes.json"


def _probe_key(runner: Any) -> str:
    """What the working memory per sample depends on: the runtime and its version, threads, the variant."""
    return f"{getattr(runner, 'backend', '?')}|threads={getattr(runner, 'threads', '?')}|" \
           f"{(getattr(runner, 'variant', None) or {}).get('id')}"


def _cached_work_bytes(store: Any, sha: str, key: str) -> float | None:
    try:
        with open(store.path(sha) / PROBE_FILE) as f:
            v = json.load(f).get(key)
        return float(v) if isinstance(v, (int, float)) and v >= 0 else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _store_work_bytes(store: Any, sha: str, key: str, value: float) -> None:
    from .._files import atomic_write_json  # noqa: PLC0415 - once per model and device

    path = store.path(sha) / PROBE_FILE
    try:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data[key] = value
        atomic_write_json(path, data)
    except OSError as exc:  # a read-only store measures again at the next start: nothing else is lost
        log.debug("cannot keep the measured working memory in %s: %s", path, exc)


def load_handle(store: Any, sha: str, rt: Any, variant: str | None = None, *,
                warmup: int | None = None) -> ModelHandle:
    """Load and warm stored package ``sha`` with the ``[runtime]`` settings ``rt`` (``variant`` overrides its).

    ``warmup``: model runs before serving (default ``rt.warmup``). The
    working memory per sample (:func:`~.agent_metrics.batch_work_bytes`,
    two batch runs) is measured once per package, runtime, threads and
    variant on this device and kept beside the package in the store: it
    does not change between starts, and measuring it cost every start
    ~40 ms before the first result.
    """
    from ..runtime import load  # noqa: PLC0415 - keeps `import edgeship.agent` light

    manifest = store.manifest(sha)
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"backend": rt.backend, "threads": rt.threads, "optimization": rt.optimization,
                              "serving": True}
    if (variant or rt.variant) is not None:
        kwargs["variant"] = variant or rt.variant
    try:
        runner = load(str(store.files_dir(sha)), **kwargs)
    except EdgeshipError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot load model {manifest.get('name')} {manifest.get('version')}: {exc}") from exc
    load_s = time.perf_counter() - t0
    try:
        state = list(getattr(runner, "state", None) or [])
        st_names = {p.input for p in state}
        specs = [s for s in runner.inputs if s.name not in st_names]
        specs = [s.logical() if hasattr(s, "logical") else s for s in specs]
        modes, shapes = zip(*(batch_mode(s, runner.batch_size) for s in specs))
        batched = [i for i, s in enumerate(specs) if s.shape]
        scalars = [i for i, s in enumerate(specs) if not s.shape] if batched else []
        dtypes = [np.dtype(s.dtype) for s in specs]
        states = None
        if state:
            if all(modes[i] == 0 for i in batched) or not batched:
                raise ModelError(f"{manifest.get('name')}: a stateful model needs a batch axis on its data inputs")
            by_name = {s.name: s for s in runner.inputs}
            states = StreamStates(state, [by_name[p.input] for p in state])
        pre = manifest.get("preprocess") or {}
        preprocessors = [BlockPreprocessor(pre if i == 0 else None, shapes[i], dtypes[i]) for i in range(len(specs))]
        t1 = time.perf_counter()
        work_bytes = 0.0
        runs = rt.warmup if warmup is None else warmup
        if runs:
            mark = memory_mark()
            # Only a plain model is probed: zeros of the sample shapes cannot feed state inputs,
            # scalars or variable sizes.
            probe = (all(m is None for m in modes) and not state and not scalars
                     and not any(-1 in sh for sh in shapes))
            key = _probe_key(runner)
            cached = _cached_work_bytes(store, sha, key) if probe else None
            probe = probe and cached is None
            # The memory probe's two batch runs count as warm-up runs (start-up time: each costs a
            # model call before the first result).
            runner.warmup(max(1, runs - 2) if probe else runs)
            if probe:
                work_bytes = batch_work_bytes(runner, [s.name for s in specs], shapes, dtypes, mark)
                _store_work_bytes(store, sha, key, work_bytes)
            elif cached is not None:
                work_bytes = cached
        warm_s = time.perf_counter() - t1
    except BaseException:
        runner.close()
        raise
    labels = manifest.get("labels") or None
    model = {"name": manifest.get("name"), "version": manifest.get("version"), "sha256": sha}
    st_out = {p.output for p in state}
    bmodes = [modes[i] for i in range(len(modes)) if i not in set(scalars)]
    handle = ModelHandle(
        sha256=sha, manifest=manifest, runner=runner, input_names=[s.name for s in specs],
        output_names=[s.name for s in runner.outputs if s.name not in st_out], sample_shapes=list(shapes),
        dtypes=dtypes, model_batch=None if all(m is None for m in bmodes) else max(m or 0 for m in bmodes),
        preprocessors=preprocessors, labels=list(labels) if labels else None,
        scalars=scalars, dynamic=any(-1 in sh for sh in shapes), states=states,
        post=getattr(runner, "postprocess_spec", None),
        model=model, model_json=json.dumps({"name": model["name"], "version": model["version"]}, separators=(",", ":")),
        load_s=load_s, warmup_s=warm_s, work_bytes=work_bytes, variant=(getattr(runner, "variant", None) or {}).get("id"))
    log.info("loaded %s %s (%s) with %s in %.0f ms, warm-up %.0f ms", model["name"], model["version"], sha[:12],
             getattr(runner, "backend", "?"), 1000 * load_s, 1000 * warm_s)
    return handle
