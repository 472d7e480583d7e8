"""edgeship.agent: the on-device agent.

Light by contract: importing this package never imports torch, TensorFlow,
onnx or edgeship.converters (tests check ``sys.modules``). Public names are
loaded lazily so ``import edgeship.agent`` costs almost nothing.
"""
from __future__ import annotations

import importlib

__all__ = ["Agent", "AgentConfig", "load_config"]

_LAZY = {
    "Agent": ("edgeship.agent.agent", "Agent"),
    "AgentConfig": ("edgeship.agent.config", "AgentConfig"),
    "load_config": ("edgeship.agent.config", "load_config"),
}


def __getattr__(name: str):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'edgeship.agent' has no attribute {name!r}")
