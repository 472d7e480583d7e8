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

from ..errors import EdgeshipError, ModelError
from .agent_metrics import batch_work_bytes, memory_mark
from .batcher import Packer
from .preprocessing import BlockPreprocessor

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
    # Working memory one more sample in a batch costs (activations, arena growth), measured at load;
    # 0 when not measured (fixed-batch models, no warm-up, no /proc).
    work_bytes: float = 0.0

    @property
    def sample_bytes(self) -> int:
        """Bytes of one sample's model inputs."""
        return int(sum(int(np.prod(s, dtype=np.int64)) * d.itemsize for s, d in zip(self.sample_shapes, self.dtypes)))

    def packer(self, max_batch: int) -> Packer:
        p = self.packers.get(max_batch)
        if p is None:
            p = self.packers[max_batch] = Packer(self.sample_shapes, self.dtypes, max_batch, self.model_batch)
        return p

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
    """
    shape = tuple(int(d) for d in spec.shape)
    if not shape:
        return 0, ()
    if shape[0] == -1:
        mode, sample = None, shape[1:]
    else:
        mode, sample = shape[0], shape[1:]
    if any(d < 0 for d in sample):
        raise ModelError(f"input {spec.name} has a variable dimension besides the batch axis ({shape}); "
                         "the agent needs fixed sample shapes: export the model with fixed sizes")
    return mode, sample


def load_handle(store: Any, sha: str, rt: Any, variant: str | None = None) -> ModelHandle:
    """Load and warm stored package ``sha`` with the ``[runtime]`` settings ``rt`` (``variant`` overrides its)."""
    from ..runtime import load  # noqa: PLC0415 - keeps `import edgeship.agent` light

    manifest = store.manifest(sha)
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"backend": rt.backend, "threads": rt.threads, "optimization": rt.optimization}
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
        specs = list(runner.inputs)
        specs = [s.logical() if hasattr(s, "logical") else s for s in specs]
        modes, shapes = zip(*(batch_mode(s, runner.batch_size) for s in specs))
        dtypes = [np.dtype(s.dtype) for s in specs]
        pre = manifest.get("preprocess") or {}
        preprocessors = [BlockPreprocessor(pre if i == 0 else None, shapes[i], dtypes[i]) for i in range(len(specs))]
        t1 = time.perf_counter()
        work_bytes = 0.0
        if rt.warmup:
            mark = memory_mark()
            probe = all(m is None for m in modes)
            # The memory probe's two batch runs count as warm-up runs (start-up time: each costs a
            # model call before the first result).
            runner.warmup(max(1, rt.warmup - 2) if probe else rt.warmup)
            if probe:
                work_bytes = batch_work_bytes(runner, [s.name for s in specs], shapes, dtypes, mark)
        warm_s = time.perf_counter() - t1
    except BaseException:
        runner.close()
        raise
    labels = manifest.get("labels") or None
    model = {"name": manifest.get("name"), "version": manifest.get("version"), "sha256": sha}
    handle = ModelHandle(
        sha256=sha, manifest=manifest, runner=runner, input_names=[s.name for s in specs],
        output_names=[s.name for s in runner.outputs], sample_shapes=list(shapes), dtypes=dtypes,
        model_batch=None if all(m is None for m in modes) else max(m or 0 for m in modes), preprocessors=preprocessors, labels=list(labels) if labels else None,
        model=model, model_json=json.dumps({"name": model["name"], "version": model["version"]}, separators=(",", ":")),
        load_s=load_s, warmup_s=warm_s, work_bytes=work_bytes, variant=(getattr(runner, "variant", None) or {}).get("id"))
    log.info("loaded %s %s (%s) with %s in %.0f ms, warm-up %.0f ms", model["name"], model["version"], sha[:12],
             getattr(runner, "backend", "?"), 1000 * load_s, 1000 * warm_s)
    return handle
