"""OnnxRunner: an onnxruntime session behind the common Runner interface."""
from __future__ import annotations

import os

import numpy as np

from ..errors import ModelError
from . import _backends
from .base import Runner

__all__ = ["OnnxRunner"]


class OnnxRunner(Runner):
    """onnxruntime on the CPU with Pi defaults: intra-op threads = cores, one
    inter-op thread, sequential execution, ``optimization`` in
    disable|basic|extended|all. Thread-safe: onnxruntime allows concurrent
    ``run`` calls on one session."""

    kind = "onnxruntime"
    thread_safe = True

    def __init__(self, model: str | os.PathLike | bytes, *, threads: int | None = None, optimization: str = "all",
                 source: str = "", serving: bool = False, **kwargs) -> None:
        what = source or (str(model) if not isinstance(model, (bytes, bytearray)) else "model bytes")
        self._session, backend = _backends.open_ort(model, threads=threads, optimization=optimization, what=what,
                                                    serving=serving)
        self.threads = int(threads or _backends.default_threads())
        self.optimization = optimization
        ins, outs = _backends.ort_specs(self._session)
        ins, outs = _merge_quant(ins, kwargs.pop("model_input_specs", None)), _merge_quant(
            outs, kwargs.pop("model_output_specs", None))
        super().__init__(ins, outs, backend=backend, source=what, **kwargs)
        self._ort_out_names = [s.name for s in self.model_outputs]
        self._ort_in_names = [s.name for s in self.model_inputs]
        # The binding under InferenceSession.run: the wrapper re-checks input names
        # and OrtValue ownership on every call (~10 % of a small model's call, GIL
        # held); our inputs are plain arrays checked once by validate(). The
        # wrapper's EP fallback does not apply to the CPU provider.
        self._binding_run = getattr(getattr(self._session, "_sess", None), "run", None)

    def _invoke(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        sess = self._session
        if sess is None:
            self._check_open()
        try:
            fast = self._binding_run
            if fast is not None:
                return fast(self._ort_out_names, dict(zip(self._ort_in_names, arrays)), None)
            return sess.run(self._ort_out_names, dict(zip(self._ort_in_names, arrays)))
        except Exception as exc:  # onnxruntime's pybind errors share no useful base class
            raise ModelError(f"onnxruntime failed to run {self.source}: {_backends._first_line(exc)}") from exc

    def _release(self) -> None:
        self._session = None
        self._binding_run = None  # it holds the session too: let it go with the runner


def _merge_quant(specs, manifest_specs):
    """Quantization of ONNX IO is not visible in the session; take it from the manifest variant."""
    if not manifest_specs:
        return specs
    by_name = {s.name: s for s in manifest_specs}
    out = []
    for s in specs:
        m = by_name.get(s.name)
        if m is not None and m.quantization and s.dtype == m.dtype:
            s = type(s)(s.name, s.dtype, s.shape, m.quantization)
        out.append(s)
    return out
