"""Layer kinds of a torch model, shared by pruning and the checkpoint loader. torch loads lazily."""
from __future__ import annotations

__all__ = ["PASSTHROUGH", "layer_kind", "torch_module"]

#: Module types that act per channel (or not at all) and may sit between a pruned layer and its consumer.
PASSTHROUGH = ("ReLU", "ReLU6", "LeakyReLU", "ELU", "GELU", "SiLU", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid",
               "Mish", "PReLU1", "MaxPool1d", "MaxPool2d", "AvgPool1d", "AvgPool2d", "AdaptiveAvgPool1d",
               "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "Dropout", "Dropout1d", "Dropout2d", "Identity")
_BN = ("BatchNorm1d", "BatchNorm2d")


def torch_module():
    import torch

    return torch


def layer_kind(m) -> str:
    """conv / linear / bn / flatten / pass (per-channel or no-op) / barrier."""
    n = type(m).__name__
    if n in ("Conv1d", "Conv2d"):
        return "conv" if m.groups == 1 else "barrier"
    if n == "Linear":
        return "linear"
    if n in _BN:
        return "bn"
    if n == "Flatten":
        return "flatten"
    if n in PASSTHROUGH or (n == "PReLU" and m.num_parameters == 1):
        return "pass"
    return "barrier"
