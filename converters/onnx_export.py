"""torch → ONNX export with a dynamic batch axis and named inputs/outputs.

On torch 2.13 the default exporter is the ``torch.export``-based one
(``dynamo=True``, needs onnxscript); it is tried first. Models that
``torch.export`` cannot trace (data-dependent Python control flow, some
custom modules) fall back to the legacy TorchScript exporter, which still
ships with torch 2.13 but is deprecated. The exported file is always
checked by loading it in onnxruntime and comparing its outputs with torch on
the sample, so a silently wrong export fails here rather than on a device.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConversionError

__all__ = ["export_onnx", "DEFAULT_OPSET"]

DEFAULT_OPSET = 18
# Export is numerically a no-op; anything above this is a broken export, not float noise.
_MAX_ABS_DIFF = 1e-3


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress to stdout, logs about optional torchvision ops and raises
    deprecation warnings from inside torch/copyreg; none of it is the user's to act on."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def export_onnx(model, sample_input, out_path, *, input_names: Sequence[str] = ("input",),
                output_names: Sequence[str] = ("logits",), opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, exporter: str = "auto", external_data: bool = False) -> dict:
    """Export ``model`` (a torch module) to ``out_path`` and check it with onnxruntime.

    ``sample_input``: one array/tensor (or a tuple for several inputs) with a
    batch of at least 2 (a batch of 1 lets the tracer specialise the axis).
    ``exporter``: ``"auto"`` (torch.export, then the legacy exporter),
    ``"dynamo"`` or ``"torchscript"``. Returns ``{"path", "exporter", "opset",
    "max_abs_diff", "inputs", "outputs"}``. Raises :class:`ConversionError`
    naming the cause when neither exporter produces a model onnxruntime runs
    with the same outputs. ``external_data``: the dynamo exporter writes the
    weights to ``<out_path>.data`` beside the graph, as torch does by default
    (``edgeship package build`` inlines them again).
    """
    import torch

    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ConversionError(f"unknown exporter {exporter!r}; use auto, dynamo or torchscript")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    samples = sample_input if isinstance(sample_input, (tuple, list)) else (sample_input,)
    args = tuple(s if isinstance(s, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(s)) for s in samples)
    if len(args) != len(input_names):
        raise ConversionError(f"{len(args)} sample inputs for {len(input_names)} input names "
                              f"({', '.join(input_names)}); give one sample per model input")
    if dynamic_batch and args[0].shape[0] < 2:
        args = tuple(torch.cat([a, a]) for a in args)
    model = model.eval()
    with torch.no_grad():
        expected = model(*args)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    if len(expected) != len(output_names):
        output_names = [f"output_{i}" for i in range(len(expected))] if len(expected) > 1 else list(output_names)[:1]

    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[exporter]
    # Exported under the final file name inside a private folder: an external data file is
    # referenced by name from the graph, so the graph cannot be renamed after export.
    tmp_dir = out_path.with_name(f".{out_path.name}.partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    tmp = tmp_dir / out_path.name
    try:
        return _export(model, args, expected, out_path, tmp, order, input_names, output_names, opset,
                       dynamic_batch, external_data)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _export(model, args, expected, out_path: Path, tmp: Path, order, input_names, output_names, opset: int,
            dynamic_batch: bool, external_data: bool) -> dict:
    import torch

    tried: list[str] = []
    for kind in order:
        try:
            with _quiet_exporter():
                if kind == "dynamo":
                    shapes = tuple({0: torch.export.Dim("batch")} for _ in args) if dynamic_batch else None
                    torch.onnx.export(model, args, str(tmp), input_names=list(input_names),
                                      output_names=list(output_names), dynamic_shapes=shapes, dynamo=True,
                                      opset_version=opset, verbose=False, external_data=external_data)
                else:
                    axes = ({n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None)
                    torch.onnx.export(model, args, str(tmp), input_names=list(input_names),
                                      output_names=list(output_names), dynamic_axes=axes, dynamo=False,
                                      opset_version=min(opset, 17))
            diff = _check(tmp, args, expected, input_names)
        except ConversionError as exc:
            tried.append(f"{kind}: {exc}")
            continue
        except Exception as exc:  # torch.export / the exporters raise many unrelated types
            tried.append(f"{kind}: {type(exc).__name__}: {_one_line(exc)}")
            continue
        data = Path(str(tmp) + ".data")
        target_data = Path(str(out_path) + ".data")
        if kind == "dynamo" and external_data and data.is_file():
            data.replace(target_data)
        else:
            # The dynamo exporter may leave an empty sidecar when external_data is off; never ship it,
            # nor a stale one from an earlier export that the new graph does not reference.
            target_data.unlink(missing_ok=True)
        tmp.replace(out_path)
        import onnx

        m = onnx.load(str(out_path), load_external_data=False)
        got_opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), opset)
        return {"path": out_path, "exporter": kind, "opset": got_opset, "max_abs_diff": diff,
                "inputs": list(input_names), "outputs": list(output_names)}
    raise ConversionError(f"ONNX export of {type(model).__name__} failed ({'; '.join(tried)}); "
                          "make forward() traceable (no data-dependent Python control flow)")


def _check(path: Path, args, expected, input_names) -> float:
    """Run the file in onnxruntime on the sample and compare with torch; returns the max abs diff."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: a.detach().cpu().numpy() for i, a in zip(sess.get_inputs(), args)}
        got = sess.run(None, feed)
    except Exception as exc:  # onnxruntime raises untyped errors
        raise ConversionError(f"onnxruntime cannot run the exported model ({_one_line(exc)})") from exc
    diff = 0.0
    for g, e in zip(got, expected):
        e = e.detach().cpu().numpy()
        if g.shape != e.shape:
            raise ConversionError(f"exported output has shape {g.shape}, torch gives {e.shape}")
        diff = max(diff, float(np.max(np.abs(g.astype(np.float64) - e))) if g.size else 0.0)
    if not diff <= _MAX_ABS_DIFF:
        raise ConversionError(f"exported model differs from torch by {diff:.3g} (max {_MAX_ABS_DIFF:g})")
    return diff
