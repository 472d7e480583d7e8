"""Bring your own model: a torch module or an ONNX file → a float package (ONNX, TFLite or both).

    export_model("net.py:Net", weights="net.pt", inputs=["ids:int64[N,64]", "mask:int64[N,64]"],
                 target="both", out="net.edgepkg")

* a torch model (``file.py:Factory`` + weights, or a module) is exported to
  ONNX (dynamic batch when the input spec's batch is ``N``) and/or to TFLite
  with litert-torch; both are compared with torch on a sample before they
  are packaged;
* an ``.onnx`` file is packaged as is (external data inlined) and, for
  ``tflite``/``both``, converted through :mod:`.onnx_tflite`, gated on its
  agreement with onnxruntime.

TFLite files keep the user's input and output names (litert-torch writes
``args_0``) and have a fixed batch: each variant declares its ``batch`` in
the manifest (``"dynamic"`` or the fixed size; the runtime splits larger
batches into runs of that size).
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import ConversionError
from ..tensorspec import TensorSpec

__all__ = ["export_model", "parse_input_spec", "ExportResult", "TARGETS"]

TARGETS = ("onnx", "tflite", "both")
_SPEC_RE = re.compile(r"^\s*([A-Za-z_][\w.:/-]*?)\s*(?::\s*([a-z0-9]+))?\s*\[([^\]]*)\]\s*$")
_BATCH_WORDS = {"n", "batch", "-1", "?"}
_DTYPES = ("float32", "float16", "int64", "int32", "int8", "uint8", "bool")


def parse_input_spec(text: str | TensorSpec) -> TensorSpec:
    """``name:dtype[N,3,224,224]`` → a TensorSpec; ``N``/``batch``/``-1`` on axis 0 marks a free batch.

    The dtype defaults to float32 (``image[N,3,224,224]``).
    """
    if isinstance(text, TensorSpec):
        return text
    m = _SPEC_RE.match(str(text))
    if not m:
        raise ConversionError(f"input spec {text!r}: write it as name:dtype[dims], e.g. ids:int64[N,64] "
                              "(N = any batch)")
    name, dtype, dims = m.group(1), m.group(2) or "float32", [d.strip().lower() for d in m.group(3).split(",")]
    if dtype not in _DTYPES:
        raise ConversionError(f"input spec {text!r}: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    shape = []
    for i, d in enumerate(dims):
        if i == 0 and d in _BATCH_WORDS:
            shape.append(-1)
        elif d.isdigit() and int(d) > 0:
            shape.append(int(d))
        else:
            raise ConversionError(f"input spec {text!r}: dimension {d!r} must be a positive number "
                                  "(only axis 0 may be N)")
    return TensorSpec(name, dtype, tuple(shape))


def _sample(specs: Sequence[TensorSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the declared shapes: normal floats; ones for integers (a valid token id and a full mask)."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        shape = tuple(batch if (i == 0 and d == -1) else d for i, d in enumerate(s.shape))
        out[s.name] = (rng.standard_normal(shape).astype(s.dtype) if s.dtype.startswith("float")
                       else np.ones(shape, dtype=s.dtype))
    return out


def _example_arrays(example, names: Sequence[str]) -> dict[str, np.ndarray]:
    from .data import load_data

    data = load_data(example, input_names=list(names))
    return {n: np.ascontiguousarray(data.inputs[n][:1]) for n in names}


@dataclasses.dataclass
class ExportResult:
    path: Path | None
    files: dict[str, Path]                                      # target -> model file (in the work dir)
    checks: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # target -> output -> diff
    batch: dict[str, str | int] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        parts = []
        for t, diffs in self.checks.items():
            worst = max(diffs.values(), default=0.0)
            parts.append(f"{t} (batch {self.batch.get(t)}, max abs diff {worst:.2g} vs the source)")
        where = f"wrote {self.path}" if self.path else "exported"
        return f"{where}: {', '.join(parts)}"


def _torch_outputs(module, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        y = module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in feed.values()])
    ys = [y] if isinstance(y, torch.Tensor) else list(y)
    return [t.detach().cpu().numpy() for t in ys]


def _check_tflite(path: Path, feed: Mapping[str, np.ndarray], want: Sequence[np.ndarray],
                  out_names: Sequence[str]) -> dict[str, float]:
    from .onnx_tflite import ATOL, RTOL, _tflite_run, agreement

    got = _tflite_run(path, feed)
    diffs = {}
    for name, w in zip(out_names, want):
        ok, diff = agreement(got.get(name, np.empty(0)), w)
        diffs[name] = diff
        if not ok:
            raise ConversionError(f"the TFLite export's output {name!r} differs from torch by {diff:.3g} "
                                  f"(gate {ATOL:g} + {RTOL:g}*range); no package written")
    return diffs


def export_model(model, *, inputs: Sequence[str | TensorSpec] | None = None, outputs: Sequence[str] | None = None,
                 weights=None, target: str = "onnx", out=None, name: str | None = None, version: str = "1.0.0",
                 labels=None, preprocess: Mapping | None = None, signing_key=None, example=None,
                 exporter: str = "auto", tflite_batch: int = 1, work_dir=None, quiet: bool = True) -> ExportResult:
    """Export ``model`` to float ``target`` file(s) and, with ``out``, package them (signed with ``signing_key``).

    ``model``: ``path/file.py:Factory`` (with ``weights``), a torch module,
    or an ``.onnx`` file. ``inputs``: specs like ``ids:int64[N,64]`` (needed
    for torch; read from the file for ONNX). ``outputs``: output names
    (default ``output`` / ``output_<i>``; for ONNX the file's). ``example``:
    an ``.npy``/``.npz`` sample used for the checks and warm-up instead of
    generated inputs. ``tflite_batch``: the TFLite file's fixed batch.
    Raises :class:`ConversionError` (one line) and writes no package when
    an export fails or disagrees with its source.
    """
    if target not in TARGETS:
        raise ConversionError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    if tflite_batch < 1:
        raise ConversionError(f"tflite batch must be >= 1, got {tflite_batch}")
    wanted = ["onnx", "tflite"] if target == "both" else [target]
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="edgeship-export-")) if own_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        is_onnx = isinstance(model, (str, os.PathLike)) and str(model).lower().endswith(".onnx")
        if is_onnx:
            res, specs = _from_onnx(Path(model), wanted, work, example, tflite_batch, quiet)
            default_name = Path(model).stem
        else:
            res, specs = _from_torch(model, weights, inputs, outputs, wanted, work, example, exporter, tflite_batch,
                                     quiet)
            default_name = (str(model).rpartition(":")[2] if isinstance(model, str) else type(model).__name__).lower()
        if out is not None:
            res.path = _package(Path(out), res, specs, name=name or default_name, version=version, labels=labels,
                                preprocess=preprocess, signing_key=signing_key, example=example)
        return res
    finally:
        if own_work and out is not None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def _from_onnx(path: Path, wanted, work: Path, example, tflite_batch: int, quiet: bool):
    from ..package import inspect_model

    if not path.is_file():
        raise ConversionError(f"{path}: no such ONNX file")
    from ..package import _self_contained_onnx

    data = _self_contained_onnx(path.read_bytes(), path)  # missing external data fails here, before converting
    ins, outs = inspect_model(data, "onnxruntime", what=str(path))
    res = ExportResult(None, {})
    if "onnx" in wanted:
        res.files["onnx"] = path
        res.batch["onnx"] = "dynamic" if all(s.dynamic_batch for s in ins) else int(ins[0].shape[0] or 1)
        res.checks["onnx"] = {s.name: 0.0 for s in outs}
    if "tflite" in wanted:
        from .onnx_tflite import onnx_to_tflite

        if example is not None:
            feed = _example_arrays(example, [s.name for s in ins])
            feed = {k: np.repeat(v, tflite_batch, axis=0) if ins[0].dynamic_batch else v for k, v in feed.items()}
        else:
            free = [s for s in ins if -1 in s.shape[1:]]
            if free:
                raise ConversionError(f"{path.name}: input {free[0].name!r} has free dimensions {free[0].shape_str()}; "
                                      "give --example with a real sample to fix them for TFLite")
            feed = _sample(ins, tflite_batch)
        r = onnx_to_tflite(path, work / "model.tflite", feed, quiet=quiet)
        res.files["tflite"] = r.path
        res.checks["tflite"] = r.max_abs_diff
        res.batch["tflite"] = r.batch
    return res, ins


def _from_torch(model, weights, inputs, outputs, wanted, work: Path, example, exporter: str, tflite_batch: int,
                quiet: bool):
    from .checkpoints import load_student

    if not inputs:
        raise ConversionError("a torch model needs --input specs, e.g. --input image:float32[N,3,224,224]")
    specs = [parse_input_spec(s) for s in inputs]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConversionError(f"input names repeat ({', '.join(names)}); give each input its own name")
    module = load_student(model, weights) if isinstance(model, (str, os.PathLike)) else model.eval()
    feed1 = _example_arrays(example, names) if example is not None else _sample(specs, 1)
    for s in specs:
        want = tuple(d for d in s.shape[1:])
        if tuple(feed1[s.name].shape[1:]) != want:
            raise ConversionError(f"example input {s.name!r} has per-sample shape {feed1[s.name].shape[1:]}, "
                                  f"the spec says {want}")
    ys = _torch_outputs(module, feed1)
    out_names = list(outputs) if outputs else (["output"] if len(ys) == 1 else [f"output_{i}" for i in range(len(ys))])
    if len(out_names) != len(ys):
        raise ConversionError(f"the model returns {len(ys)} outputs but {len(out_names)} output names were given")
    res = ExportResult(None, {})
    dynamic = all(s.dynamic_batch for s in specs)
    if "onnx" in wanted:
        from .onnx_export import export_onnx

        fixed = {n: a if dynamic else a[:1] for n, a in feed1.items()}
        batch = 2 if dynamic else specs[0].shape[0]
        feed = {n: np.repeat(a, batch, axis=0) for n, a in fixed.items()}
        info = export_onnx(module, tuple(feed.values()), work / "model.onnx", input_names=names,
                           output_names=out_names, dynamic_batch=dynamic, exporter=exporter)
        res.files["onnx"] = info["path"]
        res.checks["onnx"] = {n: info["max_abs_diff"] for n in info["outputs"]}
        res.batch["onnx"] = "dynamic" if dynamic else batch
    if "tflite" in wanted:
        from .tflite_export import export_tflite

        batch = tflite_batch if dynamic else specs[0].shape[0]
        feed = {n: np.repeat(a, batch, axis=0) for n, a in feed1.items()}
        path = export_tflite(module, tuple(feed.values()), work / "model.tflite", quiet=quiet, input_names=names,
                             output_names=out_names)
        res.files["tflite"] = path
        res.checks["tflite"] = _check_tflite(path, feed, _torch_outputs(module, feed), out_names)
        res.batch["tflite"] = batch
    return res, specs


def _package(out: Path, res: ExportResult, specs, *, name: str, version: str, labels, preprocess, signing_key,
             example) -> Path:
    from .. import package as pkgmod

    if out.suffix != ".edgepkg":
        raise ConversionError(f"{out}: the output must be an .edgepkg file")
    files, variants = {}, []
    for t, path in res.files.items():
        member = "model.onnx" if t == "onnx" else "model.tflite"
        files[member] = path
        variants.append({"id": f"{t}-fp32", "file": member, "precision": "fp32", "default": not variants,
                         "batch": res.batch[t], "metrics": {"max_abs_diff_vs_source": max(res.checks[t].values(),
                                                                                           default=0.0)}})
    ex = (_example_arrays(example, [s.name for s in specs]) if example is not None else _sample(specs, 1))
    example_input = next(iter(ex.values())) if len(ex) == 1 else ex
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        pkgmod.build(tmp, files, name=name, version=version, labels=labels, preprocess=preprocess,
                     example_input=example_input, variants=variants, signing_key=signing_key,
                     provenance={"export": {t: {"batch": res.batch[t], "max_abs_diff": res.checks[t]}
                                            for t in res.files}})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
