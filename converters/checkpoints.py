"""Model files and checkpoints: user factories (``file.py:Factory``), distillation and pruned checkpoints.

Distillation and pruning both write and read these, so they live below both.
torch loads lazily.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConversionError, ModelError
from ._layers import layer_kind, torch_module

__all__ = ["load_factory", "load_student", "save_checkpoint", "save_pruned", "shrink_to_state_dict", "load_pruned"]


def load_factory(spec: str, *, base_dir: str | os.PathLike | None = None):
    """``path/to/file.py:Factory`` → the callable ``Factory`` from that file."""
    path, sep, attr = str(spec).rpartition(":")
    if not sep or not path or not attr:
        raise ConversionError(f"{spec!r}: give the model as path/to/file.py:Factory")
    p = Path(path)
    if base_dir is not None and not p.is_absolute():
        p = Path(base_dir) / p
    if not p.is_file():
        raise ConversionError(f"{p}: no such Python file (from {spec!r})")
    mod_name = f"_edgeship_user_{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:12]}"
    if mod_name in sys.modules:
        module = sys.modules[mod_name]
    else:
        loader_spec = importlib.util.spec_from_file_location(mod_name, p)
        module = importlib.util.module_from_spec(loader_spec)
        # Registered before exec so dataclasses / pickling inside the file can find the module.
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: any error is theirs, one line with its type
            del sys.modules[mod_name]
            raise ConversionError(f"{p}: importing the file failed ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConversionError(f"{p}: has no callable {attr!r} (from {spec!r})")
    return fn


def load_student(spec: str, weights=None, *, base_dir=None):
    """Build a module from ``file.py:Factory`` and load a ``state_dict`` (or a distill checkpoint)."""
    import torch

    model = load_factory(spec, base_dir=base_dir)()
    if not isinstance(model, torch.nn.Module):
        raise ConversionError(f"{spec}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        try:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelError(f"{weights}: cannot read the weights ({exc})") from exc
        if isinstance(state, dict) and "pruned" in state and "state_dict" in state:
            # a pruned checkpoint: resize the layers to its shapes first
            shrink_to_state_dict(model, state["state_dict"])
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ModelError(f"{weights}: the weights do not fit {spec} ({' '.join(str(exc).split())[:200]})") from exc
    return model.eval()


def save_checkpoint(path: Path, student, *, epoch: int, metric: str | None, value: float | None) -> None:
    """The distillation checkpoint: the student's weights and the epoch and metric they scored."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": student.state_dict(), "epoch": epoch, "metric": metric, "value": value}, tmp)
    os.replace(tmp, path)


def save_pruned(model, path, **meta) -> Path:
    """A checkpoint that :func:`load_pruned` / :func:`load_student` rebuild from the original factory."""
    torch = torch_module()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"state_dict": model.state_dict(), "pruned": {"shapes": shapes, **meta}}, tmp)
    os.replace(tmp, path)
    return path


def shrink_to_state_dict(model, state: Mapping) -> object:
    """Resize the Conv/Linear/BatchNorm layers of ``model`` in place to the shapes in ``state`` (a pruned state dict)."""
    torch = torch_module()
    nn = torch.nn
    mods = dict(model.named_modules())
    for mname, m in mods.items():
        kind = layer_kind(m) if mname else "barrier"
        wkey = f"{mname}.weight"
        if kind not in ("conv", "linear", "bn") or wkey not in state:
            continue
        shape = tuple(state[wkey].shape)
        if tuple(m.weight.shape) == shape:
            continue
        with torch.no_grad():
            if kind == "bn":
                m.num_features = shape[0]
                m.weight = nn.Parameter(torch.empty(shape))
                m.bias = nn.Parameter(torch.empty(shape))
                m.running_mean = torch.zeros(shape)
                m.running_var = torch.ones(shape)
                continue
            m.weight = nn.Parameter(torch.empty(shape))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(shape[0]))
            if kind == "conv":
                m.out_channels, m.in_channels = shape[0], shape[1]
            else:
                m.out_features, m.in_features = shape[0], shape[1]
    return model


def load_pruned(factory, path):
    """Build ``factory()`` (a callable or ``file.py:Factory``), shrink it to the checkpoint and load the weights."""
    torch = torch_module()
    if isinstance(factory, str):
        factory = load_factory(factory)
    model = factory()
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    sd = state["state_dict"] if isinstance(state, dict) and "state_dict" in state else state
    shrink_to_state_dict(model, sd)
    model.load_state_dict(sd)
    return model.eval()
