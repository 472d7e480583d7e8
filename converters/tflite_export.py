"""TFLite export and int8 quantization.

* :func:`export_tflite` — a torch module to a float ``.tflite`` (litert-torch).
* :func:`export_tflite_int8` — a torch module to a full-integer ``.tflite``:
  litert-torch's PT2E quantizer (per-channel symmetric int8 weights, int8
  activations calibrated on ``calib_data``), optionally with int8
  input/output tensors (the float Quantize/Dequantize at the edges removed
  with LiteRT's ``modify_model_interface``).
* :func:`quantize_tflite` — a float ``.tflite`` to int8 with ai-edge-quantizer
  (``static``: int8 weights + activations, calibrated; ``dynamic``: int8
  weights, float activations).

Third-party failures become :class:`~edgeship.errors.ConversionError` naming
the step; every output file is written under a temporary name and renamed.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import ConversionError
from .data import Dataset

__all__ = ["export_tflite", "export_tflite_int8", "quantize_tflite", "litert_convert", "rename_io"]

# TFLite schema TensorType values used by modify_model_interface.
_TFL_FLOAT32, _TFL_INT8 = 0, 9


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


@contextlib.contextmanager
def _litert_progress(show: bool):
    """litert-torch reads its progress switch from the environment at call time; restore it after."""
    key = "LITERT_TORCH_SHOW_PROGRESS"
    old = os.environ.get(key)
    os.environ[key] = "y" if show else "n"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _tensor(a):
    """A torch tensor; numpy floats become float32 (float64 would trace a double-precision graph)."""
    import torch

    if isinstance(a, torch.Tensor):
        return a
    a = np.ascontiguousarray(np.asarray(a))
    return torch.from_numpy(a.astype(np.float32) if a.dtype.kind == "f" else a)


def _as_args(sample_input) -> tuple:
    if isinstance(sample_input, (tuple, list)):
        return tuple(_tensor(a) for a in sample_input)
    return (_tensor(sample_input),)


def _calib_batches(calib_data, batch: int = 1):
    """Yield tuples of torch tensors from an array, a tuple of arrays, or a Dataset."""
    if isinstance(calib_data, Dataset):
        for feed in calib_data.batches(batch):
            yield tuple(_tensor(v) for v in feed.values())
        return
    arrays = calib_data if isinstance(calib_data, (tuple, list)) else (calib_data,)
    arrays = [np.asarray(a) for a in arrays]
    for i in range(0, len(arrays[0]), batch):
        yield tuple(_tensor(a[i:i + batch]) for a in arrays)


def _write(out_path, edge_model, quiet: bool = True) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with _litert_progress(not quiet):
            edge_model.export(str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def litert_convert(module, args: tuple, *, quiet: bool = True):
    """litert-torch's conversion of ``module`` traced with ``args``; its errors become one line."""
    import warnings

    import litert_torch
    import torch

    try:
        with _litert_progress(not quiet), warnings.catch_warnings():
            # torch.export's deprecations (raised from copyreg / torch internals) are not the user's to act on.
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            # int64 inputs (token ids, masks) stay int64, as the user declared them, instead of int32.
            x64 = any(getattr(a, "dtype", None) == torch.int64 for a in args)
            return litert_torch.convert(module, args, enable_x64=x64)
    except Exception as exc:  # litert-torch surfaces torch.export / MLIR errors of many types
        raise ConversionError(f"TFLite conversion failed ({_one_line(exc)}); the model must be torch.export-able "
                              "with the sample input") from exc


def export_tflite(torch_model, sample_input, out_path, *, quiet: bool = True,
                  input_names: "list[str] | None" = None, output_names: "list[str] | None" = None) -> Path:
    """Float export of ``torch_model`` (traced with ``sample_input``) to ``out_path``.

    The file's batch is the sample's (litert-torch fixes it). ``input_names``
    / ``output_names`` replace litert-torch's ``args_0`` / ``output_0``.
    """
    args = _as_args(sample_input)
    edge = litert_convert(torch_model.eval(), args, quiet=quiet)
    out = _write(out_path, edge, quiet)
    if input_names or output_names:
        rename_io(out, input_names, output_names)
    return out


def rename_io(path, inputs: "list[str] | None", outputs: "list[str] | None") -> None:
    """Put ``inputs``/``outputs`` names on a TFLite file's IO tensors and its signature, in order."""
    from ai_edge_litert.tools import flatbuffer_utils as fu

    path = Path(path)
    model = fu.read_model(str(path))
    sg = model.subgraphs[0]
    sig = model.signatureDefs[0] if model.signatureDefs else None
    for idx_list, names, sig_items in ((list(sg.inputs), inputs, sig.inputs if sig else None),
                                       (list(sg.outputs), outputs, sig.outputs if sig else None)):
        if not names:
            continue
        if len(idx_list) != len(names):
            raise ConversionError(f"the TFLite model has {len(idx_list)} IO tensors where {len(names)} names were "
                                  f"given ({', '.join(names)})")
        for tensor_idx, name in zip(idx_list, names):
            sg.tensors[tensor_idx].name = name.encode()
        for item in sig_items or []:
            if item.tensorIndex in idx_list:
                item.name = names[idx_list.index(item.tensorIndex)].encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.renamed")
    try:
        fu.write_model(model, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_tflite_int8(torch_model, sample_input, calib_data, out_path, int8_io: bool = False, *,
                       per_channel: bool = True, calib_batch: int = 1, quiet: bool = True) -> Path:
    """Full-integer TFLite export with litert-torch's PT2E quantizer.

    ``sample_input`` fixes the traced shapes (its batch is the model's batch);
    ``calib_data`` (array, tuple of arrays or Dataset, already preprocessed)
    is run through the observed model to set activation ranges. With
    ``int8_io`` the model takes and returns int8 tensors (scale/zero-point in
    the tensor's quantization parameters).
    """
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    args = _as_args(sample_input)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    try:
        exported = torch.export.export(torch_model.eval(), args).module()
        prepared = prepare_pt2e(exported, quantizer)
        n = 0
        with torch.no_grad():
            for batch in _calib_batches(calib_data, calib_batch):
                prepared(*batch)
                n += 1
        if n == 0:
            raise ConversionError("PT2E calibration got no samples; give calibration data")
        converted = convert_pt2e(prepared, fold_quantize=False)
        move_exported_model_to_eval(converted)  # an exported GraphModule has no usable .eval()
        with _litert_progress(not quiet):
            edge = litert_torch.convert(converted, args, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    except ConversionError:
        raise
    except Exception as exc:  # torch.export / PT2E / converter errors come in many types
        raise ConversionError(f"TFLite int8 export failed ({_one_line(exc)}); the model must be torch.export-able "
                              "and use ops the PT2E quantizer supports (conv, linear, add, pooling)") from exc
    out = _write(out_path, edge, quiet)
    # litert-torch's STATIC conversion folds the edge Quantize/Dequantize into int8 IO; put
    # them back for float IO (or add them, should a future version keep float IO).
    io_int8 = _io_is_int8(out)
    if int8_io and not io_int8:
        _to_int8_io(out)
    elif not int8_io and io_int8:
        _to_float_io(out)
    return out


def _io_is_int8(path: Path) -> bool:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    return all(np.dtype(d["dtype"]) == np.int8 for d in interp.get_input_details() + interp.get_output_details())


def _to_float_io(path: Path) -> None:
    """Give an int8-IO model float32 inputs/outputs: QUANTIZE after each input, DEQUANTIZE before each output."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils as fu

    model = fu.read_model(str(path))

    def opcode(builtin: int) -> int:
        for i, oc in enumerate(model.operatorCodes):
            if fu.get_builtin_code_from_operator_code(oc) == builtin:
                return i
        oc = fb.OperatorCodeT()
        oc.builtinCode = builtin
        oc.deprecatedBuiltinCode = builtin
        oc.version = 2  # int8 variants of (DE)QUANTIZE are version 2
        model.operatorCodes.append(oc)
        return len(model.operatorCodes) - 1

    sg = model.subgraphs[0]
    remap: dict[int, int] = {}

    def float_twin(idx: int) -> int:
        t = sg.tensors[idx]
        new = fb.TensorT()
        new.shape, new.shapeSignature = t.shape, t.shapeSignature
        new.type = fb.TensorType.FLOAT32
        new.buffer = 0  # buffer 0 is the flatbuffer's empty sentinel: no constant data
        new.name = t.name
        t.name = (t.name or b"io") + b"_int8"
        sg.tensors.append(new)
        remap[idx] = len(sg.tensors) - 1
        return remap[idx]

    q, dq = opcode(fb.BuiltinOperator.QUANTIZE), opcode(fb.BuiltinOperator.DEQUANTIZE)
    for pos, idx in enumerate(list(sg.inputs)):
        if sg.tensors[idx].type == fb.TensorType.INT8:
            op = fb.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = q, [float_twin(idx)], [idx]
            sg.operators.insert(0, op)
            sg.inputs[pos] = remap[idx]
    for pos, idx in enumerate(list(sg.outputs)):
        if sg.tensors[idx].type == fb.TensorType.INT8:
            op = fb.OperatorT()
            op.opcodeIndex, op.inputs, op.outputs = dq, [idx], [float_twin(idx)]
            sg.operators.append(op)
            sg.outputs[pos] = remap[idx]
    for sig in model.signatureDefs or []:
        for tm in list(sig.inputs or []) + list(sig.outputs or []):
            tm.tensorIndex = remap.get(tm.tensorIndex, tm.tensorIndex)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.io.tmp")
    try:
        fu.write_model(model, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _to_int8_io(path: Path) -> None:
    from ai_edge_litert import _pywrap_modify_model_interface as mmi

    tmp = path.with_name(f".{path.name}.{os.getpid()}.io.tmp")
    try:
        status = mmi.modify_model_interface(str(path), str(tmp), _TFL_INT8, _TFL_INT8)
        if status != 0 or not tmp.exists():
            raise ConversionError(f"{path.name}: could not switch the model to int8 input/output (status {status}); "
                                  "the model must start with a Quantize and end with a Dequantize op")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def quantize_tflite(float_path, calib: Dataset, out_path, *, mode: str = "static", quiet: bool = True) -> Path:
    """Quantize a float ``.tflite`` with ai-edge-quantizer (``static`` a8w8 or ``dynamic`` w8)."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import quantizer as aeq
    from ai_edge_quantizer import recipe

    float_path = Path(float_path)
    try:
        interp = Interpreter(model_path=str(float_path))
        sigs = interp.get_signature_list()
    except (RuntimeError, ValueError) as exc:
        raise ConversionError(f"{float_path}: the TFLite interpreter cannot read it ({exc})") from exc
    if not sigs:
        raise ConversionError(f"{float_path}: the model has no signature; ai-edge-quantizer needs one "
                              "(export with litert-torch or the TFLite converter)")
    sig_key, sig = next(iter(sigs.items()))
    sig_inputs = list(sig["inputs"])
    try:
        with _quiet_quantizer(quiet):
            result = _aeq_quantize(aeq, recipe, float_path, calib, mode, sig_key, sig_inputs)
    except ConversionError:
        raise
    except Exception as exc:  # ai-edge-quantizer raises ValueError/RuntimeError/KeyError
        raise ConversionError(f"{float_path.name}: ai-edge-quantizer {mode} failed ({_one_line(exc)})") from exc
    out = Path(out_path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(bytes(result.quantized_model))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


@contextlib.contextmanager
def _quiet_quantizer(quiet: bool):
    """ai-edge-quantizer's calibrator opens its interpreter in a debug mode that warns, and draws
    its own progress bar on stderr; neither is news to our user."""
    import warnings

    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, \
            contextlib.redirect_stderr(devnull if quiet else sys.stderr):
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*", category=UserWarning)
        yield


def _aeq_quantize(aeq, recipe, float_path: Path, calib: Dataset, mode: str, sig_key: str, sig_inputs: list):
    qt = aeq.Quantizer(str(float_path))
    if mode == "static":
        qt.load_quantization_recipe(recipe.static_wi8_ai8())
        names = list(calib.inputs)
        # Signature inputs carry the export's argument names; pair them in order with ours.
        samples = [{s: np.asarray(calib.inputs[names[j]][i:i + 1]) for j, s in enumerate(sig_inputs)}
                   for i in range(len(calib))]
        return qt.quantize(qt.calibrate({sig_key: samples}), enable_progress_report=False)
    if mode == "dynamic":
        qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        return qt.quantize(enable_progress_report=False)
    raise ConversionError(f"unknown TFLite quantization mode {mode!r}; use static or dynamic")
