"""Intake: raw samples and source blocks into validated, model-ready rows.

Pure functions of a :class:`~edgeship.agent.handle.ModelHandle` and the
input (no agent state, no I/O besides a source's own ``decode``): the agent
calls :func:`validate_one` in the caller's thread for ``submit()`` and
:func:`decode_block` in a prefetch worker for source blocks. Bad samples are
refused one by one (an :class:`~edgeship.errors.InputError`, or a
``(ref, reason)`` reject), never the whole block.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..errors import InputError
from .handle import ModelHandle
from .preprocessing import fits
from .sources import RawBlock, Source

__all__ = ["validate_one", "decode_block"]


def validate_one(handle: ModelHandle, x: Any, preprocess: bool) -> list[np.ndarray]:
    """One sample (array-like or ``{input name: array}``) as the model's validated input arrays; raises InputError."""
    if isinstance(x, Mapping):
        try:
            arrays = [np.asarray(x[name]) for name in handle.input_names]
        except KeyError as exc:
            raise InputError(f"missing input {exc.args[0]!r}; the model takes {handle.input_names}") from exc
    else:
        arrays = [np.asarray(x)]
        if len(handle.input_names) != 1:
            raise InputError(f"the model takes {len(handle.input_names)} inputs {handle.input_names}; "
                             "pass a dict {name: array}")
    out = []
    for a, shape, dt, pre, name in zip(arrays, handle.sample_shapes, handle.dtypes, handle.preprocessors,
                                       handle.input_names):
        if a.dtype.kind not in "biuf":
            raise InputError(f"input {name}: dtype {a.dtype} is not numeric", input_name=name,
                             expected=str(dt), got=str(a.dtype))
        if a.shape == (1, *shape) or (a.ndim == len(shape) + 1 and a.shape[0] == 1 and fits(a.shape[1:], shape)):
            a = a[0]
        if preprocess:
            a = pre.one(a)
        else:
            if a.shape != shape and not fits(a.shape, shape):
                if a.size == int(np.prod(shape)) and a.ndim <= 1 and -1 not in shape:
                    a = a.reshape(shape)
                else:
                    raise InputError(f"input {name}: shape {tuple(a.shape)} does not match the model's {shape}",
                                     input_name=name, expected=shape, got=tuple(a.shape))
            a = a.astype(dt, copy=False)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise InputError(f"input {name}: contains NaN or infinity; send finite numbers", input_name=name)
        out.append(a)
    if handle.dynamic:
        _check_steps(handle, out)
    return out


def _check_steps(handle: ModelHandle, arrays: list[np.ndarray]) -> None:
    """Variable sizes must be multiples of the input's declared step (a detector's 32)."""
    from ..runtime.base import check_multiple  # noqa: PLC0415 - numpy only; just not needed by fixed-size models

    specs = {s.name: s for s in handle.runner.inputs}
    for name, a in zip(handle.input_names, arrays):
        spec = specs.get(name)
        if spec is not None and spec.multiple_of:
            check_multiple(name, (1, *a.shape), spec)


def decode_block(handle: ModelHandle, block: RawBlock, src: Source) -> tuple[tuple | None, list]:
    """Decode, preprocess and validate one block: ``((x, refs, ts) or None, rejects)``.

    ``x`` holds the rows that passed (model input 0), ``refs``/``ts`` the
    matching references and timestamps; rows with NaN/inf or that cannot be
    decoded become ``(ref, reason)`` rejects.
    """
    rejects: list[tuple[Any, str]] = list(block.errors)
    refs = block.refs
    pre = handle.preprocessors[0]
    ts = block.ts
    checked = False
    if block.items is not None:
        x, keep, checked = _decode_items(pre, block.items, refs, src, rejects)
        if x is None:
            return None, rejects
        refs = [refs[i] for i in keep] if refs is not None else None
        ts = ts[keep] if isinstance(ts, np.ndarray) else ts
    else:
        data = block.data
        if data is None or len(data) == 0:
            return None, rejects
        try:
            # A source of model-ready rows (edgeship bench's pool) skips the package's preprocess.
            x = data if getattr(src, "model_ready", False) else pre.numeric(data)
        except InputError as exc:
            rejects.extend((refs[i] if refs else None, str(exc)) for i in range(len(data)))
            return None, rejects
    n = len(x)
    if x.dtype.kind == "f" and not checked:
        finite = np.isfinite(x.reshape(n, -1)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            rejects.extend((refs[i] if refs else None, "contains NaN or infinity") for i in bad.tolist())
            x = x[finite]
            if refs is not None:
                refs = [r for r, f in zip(refs, finite.tolist()) if f]
            if isinstance(ts, np.ndarray):
                ts = ts[finite]
            if len(x) == 0:
                return None, rejects
    return (x, refs, ts), rejects


def _decode_items(pre, items: list, refs, src: Source, rejects: list) -> tuple[np.ndarray | None, list[int], bool]:
    """Decode and preprocess items one by one: ``(rows, indices kept, rows known finite)``.

    Images go through :meth:`BlockPreprocessor.image_into` straight into the
    block's rows (no per-step copies, no stacking); anything else through the
    reference path. Unreadable items become rejects.
    """
    fixed = pre.image_fast  # fixed sample shape: rows can be written in place
    x = np.empty((len(items), *pre.sample_shape), pre.model_dtype) if fixed else None
    rows: list = []
    keep: list[int] = []
    finite = fixed and pre.image_finite
    for i, item in enumerate(items):
        try:
            a = src.decode(item)
            if fixed and pre.image_into(a, x[len(keep)]):
                pass
            elif fixed:
                x[len(keep)] = pre.one(a)
                finite = False
            else:
                rows.append(pre.one(a))
            keep.append(i)
        except InputError as exc:
            rejects.append((refs[i] if refs is not None else None, str(exc)))
        except (OSError, ValueError) as exc:
            rejects.append((refs[i] if refs is not None else None, f"cannot decode: {exc}"))
    if not keep:
        return None, keep, False
    return (x[:len(keep)] if fixed else np.stack(rows)), keep, finite
