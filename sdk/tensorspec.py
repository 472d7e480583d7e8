"""TensorSpec: the one description of a model input/output, shared by the
package manifest and every runner. Pure: numpy only.

It sits below both :mod:`edgeship.package` and :mod:`edgeship.runtime`
(tests/test_architecture.py holds the layers), so neither reaches into the
other for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import PackageFormatError

__all__ = ["TensorSpec", "ORT_DTYPES", "spec_from_dict", "specs_from_dicts", "specs_to_dicts"]

# onnxruntime's type strings -> numpy dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(uint16)": "uint16",
    "tensor(int32)": "int32", "tensor(uint32)": "uint32", "tensor(int64)": "int64", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool", "tensor(string)": "str",
}

_KNOWN_DTYPES = set(ORT_DTYPES.values())


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model's interface.

    ``shape`` holds ints; ``-1`` marks a dimension of any size. A ``-1`` on
    axis 0 is the batch axis (the manifest writes it as ``"batch"``).
    ``quantization`` is ``(scale, zero_point)`` for an int8/uint8 tensor that
    stands for float values (``real = scale * (q - zero_point)``), else None.
    ``multiple_of``: every variable (``-1``) axis besides the batch must be a
    multiple of this (a detector taking H x W in steps of 32), else None.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    quantization: tuple[float, int] | None = field(default=None)
    multiple_of: int | None = field(default=None)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.shape) and self.shape[0] == -1

    @property
    def variable_dims(self) -> tuple[int, ...]:
        """The axes of any size besides the batch axis (a detector's H and W)."""
        return tuple(i for i, d in enumerate(self.shape) if d == -1 and i > 0)

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith("float")

    @property
    def logical_dtype(self) -> str:
        """The dtype a caller sees: float32 for quantized tensors."""
        return "float32" if self.quantization is not None else self.dtype

    def logical(self) -> "TensorSpec":
        """The float interface of this tensor (what ``run()`` takes/returns without ``raw``)."""
        if self.quantization is None:
            return self
        return TensorSpec(self.name, "float32", self.shape, None, self.multiple_of)

    def shape_str(self) -> str:
        return "[" + ", ".join("batch" if (i == 0 and d == -1) else ("?" if d == -1 else str(d))
                               for i, d in enumerate(self.shape)) + "]"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "dtype": self.dtype,
            "shape": ["batch" if (i == 0 and s == -1) else int(s) for i, s in enumerate(self.shape)],
        }
        if self.quantization is not None:
            d["quantization"] = {"scale": float(self.quantization[0]), "zero_point": int(self.quantization[1])}
        if self.multiple_of is not None:
            d["multiple_of"] = int(self.multiple_of)
        return d

    def __str__(self) -> str:
        q = f" q(scale={self.quantization[0]:.6g}, zp={self.quantization[1]})" if self.quantization else ""
        return f"{self.name}: {self.dtype}{self.shape_str()}{q}"


def _dim(d: Any) -> int:
    # Symbolic dims ("batch", "N", None) and non-positive ints all mean "any size".
    if isinstance(d, bool):
        raise ValueError(f"bad dimension {d!r}")
    if isinstance(d, (int, np.integer)):
        return int(d) if d > 0 else -1
    if d is None or isinstance(d, str):
        return -1
    raise ValueError(f"bad dimension {d!r}")


def spec_from_dict(d: Mapping[str, Any], where: str = "manifest") -> TensorSpec:
    try:
        name = d["name"]
        dtype = str(np.dtype(d["dtype"])) if d["dtype"] != "str" else "str"
        shape = tuple(_dim(x) for x in d["shape"])
        q = d.get("quantization")
        quant = (float(q["scale"]), int(q["zero_point"])) if q else None
        if not isinstance(name, str) or not name:
            raise ValueError("name must be a non-empty string")
        mult = d.get("multiple_of")
        if mult is not None and (isinstance(mult, bool) or not isinstance(mult, int) or mult < 1):
            raise ValueError(f"multiple_of must be a positive integer, got {mult!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise PackageFormatError(f"{where}: bad tensor spec {dict(d) if isinstance(d, Mapping) else d!r}: {exc}; "
                                 "each needs name, dtype and shape") from exc
    return TensorSpec(name, dtype, shape, quant, mult)


def specs_from_dicts(items: Sequence[Mapping[str, Any]] | None, where: str = "manifest") -> list[TensorSpec]:
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        raise PackageFormatError(f"{where}: tensor specs must be a list, got {type(items).__name__}")
    return [s if isinstance(s, TensorSpec) else spec_from_dict(s, where) for s in items]


def specs_to_dicts(specs: Sequence[TensorSpec | Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [(s if isinstance(s, TensorSpec) else spec_from_dict(s)).to_dict() for s in specs]
