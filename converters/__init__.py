"""edgeship.converters: workstation-side conversion (distill, quantize, export, evaluate).

Needs the ``convert`` extra (torch, onnx, TFLite tooling). Names load lazily.
"""
from __future__ import annotations

import importlib

__all__ = ["quantize", "QuantizeResult", "distill", "DistillResult", "run_recipe", "prune"]

_LAZY = {
    "quantize": ("edgeship.converters.quantization", "quantize"),
    "QuantizeResult": ("edgeship.converters.quantization", "QuantizeResult"),
    "distill": ("edgeship.converters.distillation", "distill"),
    "DistillResult": ("edgeship.converters.distillation", "DistillResult"),
    "run_recipe": ("edgeship.converters.recipe", "run_recipe"),
    "prune": ("edgeship.converters.pruning", "prune"),
}


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'edgeship.converters' has no attribute {name!r}")
