"""One runtime for ONNX (onnxruntime) and TFLite models.

    from edgeship.runtime import load
    with load("digits.edgepkg", trusted_keys=["k.pub"]) as runner:
        runner.run({"input": x})          # validated, float in / float out
        runner.predict("digit.png")       # the package's preprocessing, then run

Model shapes (issue 20.4): several inputs go in as ``{name: array}``
(int64 ids + mask), a scalar input as a 0-d array; a stateful package
(``state`` in its manifest, :mod:`edgeship.runtime.state`) runs a stream with
``s = runner.stream(); s.run(window)`` (the state carried between calls);
variable sizes are checked against an input's ``multiple_of``; int8 IO is
(de)quantized; ``runner.postprocess(outputs)`` applies the package's hook
(:mod:`edgeship.runtime.postprocess`: top-k labels, boxes + NMS, threshold).

``import edgeship.runtime`` imports numpy only; onnxruntime and the TFLite
interpreter load when a model of that kind is loaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError
from ..tensorspec import TensorSpec, specs_from_dicts
from ._backends import OPTIMIZATION_LEVELS, TFLITE_BACKENDS, default_threads, resolve_tflite
from .base import Runner, Stream, dequantize, quantize

__all__ = ["load", "Runner", "Stream", "TensorSpec", "OnnxRunner", "TFLiteRunner", "quantize", "dequantize",
           "TFLITE_BACKENDS", "OPTIMIZATION_LEVELS", "default_threads", "resolve_tflite"]

_ONNX_BACKENDS = ("onnxruntime", "onnx", "ort")


def __getattr__(name: str):
    # The runner classes live in their own modules; importing them is still light.
    if name == "OnnxRunner":
        from .onnx_runner import OnnxRunner

        return OnnxRunner
    if name == "TFLiteRunner":
        from .tflite_runner import TFLiteRunner

        return TFLiteRunner
    raise AttributeError(f"module 'edgeship.runtime' has no attribute {name!r}")


def _runtime_wanted(backend: str | None) -> str | None:
    if backend is None:
        return None
    if backend in _ONNX_BACKENDS:
        return "onnxruntime"
    if backend in ("tflite", "auto", "tensorflow.lite", "tf", *TFLITE_BACKENDS):
        return "tflite"
    raise ConfigError(f"unknown backend {backend!r}; choose onnxruntime, tflite or one of "
                      f"{', '.join(TFLITE_BACKENDS)}")


def _make(runtime: str, model, *, backend, threads, optimization, serving: bool = False, **kwargs) -> Runner:
    if runtime == "onnxruntime":
        from .onnx_runner import OnnxRunner

        return OnnxRunner(model, threads=threads, optimization=optimization, serving=serving, **kwargs)
    from .tflite_runner import TFLiteRunner

    tfl_backend = None if backend in (None, "tflite", "auto") else backend
    return TFLiteRunner(model, backend=tfl_backend, threads=threads, optimization=optimization, **kwargs)


def load(path_or_package: Any, *, variant: str | None = None, backend: str | None = None,
         threads: int | None = None, optimization: str = "all", trusted_keys=None, serving: bool = False) -> Runner:
    """Load a model and return a :class:`Runner`.

    ``path_or_package``: a ``.edgepkg`` file, a directory written by
    :func:`edgeship.package.unpack`, an opened :class:`~edgeship.package.Package`,
    or a bare ``.onnx``/``.tflite`` file. Packages are verified first (hashes
    always; the signature against ``trusted_keys`` when given, and then a
    signature is required); of an unpacked directory, only the variant's
    file is hashed (:func:`edgeship.package.unpack` verified the rest).

    ``variant``: id, file or runtime of the package variant (default: the
    package's default, or the first of the runtime ``backend`` names).
    ``backend``: ``onnxruntime``, ``tflite`` or a TFLite module
    (``ai_edge_litert``, ``tflite_runtime``, ``tensorflow``).
    ``threads``: intra-op threads (default: cores). ``optimization``: the
    onnxruntime graph optimisation level (disable|basic|extended|all); for
    TFLite, ``disable`` turns the default XNNPACK delegate off. ``serving``:
    tune an onnxruntime session for a long-running server that batches
    (the agent): see :func:`edgeship.runtime._backends.open_ort`.
    """
    from .. import package as pkgmod

    want_rt = _runtime_wanted(backend)
    if isinstance(path_or_package, (str, os.PathLike)):
        p = Path(path_or_package)
        if p.suffix.lower() in (".onnx", ".tflite") and p.is_file():
            rt = "onnxruntime" if p.suffix.lower() == ".onnx" else "tflite"
            if want_rt is not None and want_rt != rt:
                raise ConfigError(f"{p} is a {rt} model; backend {backend!r} cannot run it")
            if trusted_keys:
                raise ConfigError(f"{p} is a bare model file and cannot be signature-checked; "
                                  "load a signed .edgepkg when trusted keys are configured")
            return _make(rt, p, backend=backend, threads=threads, optimization=optimization, source=str(p),
                         serving=serving)
        if not p.exists():
            raise ModelError(f"{p}: no such package or model file")
    pkg = pkgmod.open_package(path_or_package)
    if variant is None and want_rt is not None:
        variant = want_rt if any(v.get("runtime") == want_rt for v in pkg.variants) else None
    var = pkg.variant(variant)
    rt = var["runtime"]
    if want_rt is not None and want_rt != rt:
        raise ConfigError(f"variant {var.get('id')!r} of {pkg.path} runs on {rt}, not {backend!r}; "
                          "pick another variant or backend")
    member = var["file"]
    source = f"{pkg.path}:{member}"
    # Each byte is hashed once. An unpacked directory was verified by unpack(): the signature and
    # every size again (cheap), and only the file we load is hashed. A .edgepkg: every other member
    # is hashed here. The model itself is hashed as it is read, and the runtime gets those very bytes
    # (from memory: nothing to clean up, and a file swapped after the check cannot slip in).
    pkg = pkgmod.verify(pkg, trusted_keys, members=() if pkg.is_dir else [n for n in pkg.files if n != member])
    model: Any = pkgmod.read_verified(pkg, member)
    m_in = specs_from_dicts(var.get("inputs"), f"{pkg.path} variant {var.get('id')}")
    m_out = specs_from_dicts(var.get("outputs"), f"{pkg.path} variant {var.get('id')}")
    top_in = [s.name for s in specs_from_dicts(pkg.manifest.get("inputs"))]
    top_out = [s.name for s in specs_from_dicts(pkg.manifest.get("outputs"))]
    runner = _make(rt, model, backend=backend, threads=threads, optimization=optimization, source=source,
                   serving=serving, manifest=pkg.manifest, variant=var, package=pkg,
                   model_input_specs=m_in, model_output_specs=m_out)
    _apply_logical_names(runner, top_in, top_out, m_in, m_out)
    try:
        runner._check_shapes()
    except BaseException:
        runner.close()
        raise
    return runner


def _apply_logical_names(runner: Runner, top_in, top_out, m_in, m_out) -> None:
    """Present the package's logical IO names, mapped to the file's tensors.

    The variant's recorded names are matched to the loaded model's first (a
    TFLite file may order tensors differently from the manifest); otherwise by
    position when the counts agree.
    """
    def mapping(model_specs, variant_specs, top_names):
        if not top_names or len(top_names) != len(model_specs):
            return None
        if [s.name for s in model_specs] == list(top_names):
            return None
        v_names = [s.name for s in variant_specs]
        if len(v_names) == len(top_names) and set(v_names) == {s.name for s in model_specs}:
            by_v = dict(zip(v_names, top_names))
            return [by_v[s.name] for s in model_specs]
        return list(top_names)

    new_in = mapping(runner.model_inputs, m_in, top_in)
    new_out = mapping(runner.model_outputs, m_out, top_out)
    if new_in is not None or new_out is not None:
        runner._set_names(new_in, new_out)
