"""TFLiteRunner: a TFLite interpreter behind the common Runner interface.

Interpreter resolution: ``ai_edge_litert`` (numpy 2, current ops), then
``tflite_runtime`` (the classic Pi wheel, numpy<2), then
``tensorflow.lite``; the chosen one is in ``runner.backend``.

**Not thread-safe by nature**: a TFLite interpreter holds its tensors in
place, so two threads running it at once corrupt each other's inputs. Each
runner owns one interpreter and serialises ``run`` with a lock; for
parallel inference load one runner per thread.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from ..errors import ModelError
from . import _backends
from .base import Runner

__all__ = ["TFLiteRunner"]


class TFLiteRunner(Runner):
    kind = "tflite"
    thread_safe = False  # serialised internally; see the module docstring

    def __init__(self, model: str | os.PathLike | bytes, *, backend: str | None = None, threads: int | None = None,
                 optimization: str = "all", source: str = "", **kwargs) -> None:
        what = source or (str(model) if not isinstance(model, (bytes, bytearray)) else "model bytes")
        # Keep the bytes alive for as long as the interpreter: some backends do not copy model_content.
        self._model_bytes = bytes(model) if isinstance(model, (bytes, bytearray)) else None
        self._interp, name = _backends.open_tflite(self._model_bytes if self._model_bytes is not None else model,
                                                   backend=backend, threads=threads, optimization=optimization,
                                                   what=what)
        self.threads = int(threads or _backends.default_threads())
        self.optimization = optimization
        ins, outs = _backends.tflite_specs(self._interp)
        kwargs.pop("model_input_specs", None)
        kwargs.pop("model_output_specs", None)
        super().__init__(ins, outs, backend=name, source=what, **kwargs)
        self._lock = threading.Lock()
        self._in_idx = [d["index"] for d in self._interp.get_input_details()]
        self._out_idx = [d["index"] for d in self._interp.get_output_details()]
        self._cur_shapes = [tuple(int(x) for x in d["shape"]) for d in self._interp.get_input_details()]

    def _invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            interp = self._interp
            if interp is None:
                self._check_open()
            try:
                shapes = [tuple(a.shape) for a in arrays]
                if shapes != self._cur_shapes:
                    # Dynamic batch: resize only when the batch changes; allocate_tensors is not free.
                    for idx, shape in zip(self._in_idx, shapes):
                        interp.resize_tensor_input(idx, list(shape), strict=True)
                    interp.allocate_tensors()
                    self._cur_shapes = shapes
                for idx, a in zip(self._in_idx, arrays):
                    interp.set_tensor(idx, np.ascontiguousarray(a))
                interp.invoke()
                # get_tensor returns a copy, so results survive the next invoke.
                return [interp.get_tensor(idx) for idx in self._out_idx]
            except (ValueError, RuntimeError) as exc:
                self._cur_shapes = []  # force a resize + allocate next time
                raise ModelError(f"{self.backend} failed to run {self.source}: {_backends._first_line(exc)}") from exc

    def _release(self) -> None:
        with self._lock:
            self._interp = None
