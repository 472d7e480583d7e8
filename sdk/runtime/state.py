"""Stateful streaming models: which inputs are state, and where their batch axis is.

A keyword spotter or a VAD runs on consecutive windows of one stream and
hands its recurrent state from one call to the next: ``(frames, h) ->
(logits, h_out)``. The package says so in its manifest::

    "state": [{"input": "h", "output": "h_out", "batch_axis": 1}]

``batch_axis`` is where the streams of a batch stack in the state tensor
(``1`` for a torch GRU's ``(layers, batch, hidden)``; default ``0``). The
initial state is zeros unless ``"initial": 0.0`` says another constant.

A model whose IO looks stateful (an input ``h``/``state_in``/``hidden`` with
an output of the same shape named after it) but whose manifest declares no
``state`` is refused at build and load with one line: served as a plain
model, every call would start from whatever the caller happened to send.
``"state": []`` declares a model stateless on purpose. Pure: numpy only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import PackageFormatError
from ..tensorspec import TensorSpec

__all__ = ["StatePair", "parse_state", "looks_stateful", "check_declared", "initial_state"]


@dataclass(frozen=True)
class StatePair:
    """One state tensor: fed as ``input``, returned as ``output``, streams stacked on ``batch_axis``."""

    input: str
    output: str
    batch_axis: int = 0
    initial: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"input": self.input, "output": self.output, "batch_axis": self.batch_axis}
        if self.initial:
            d["initial"] = self.initial
        return d


def parse_state(value: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                where: str = "manifest") -> list[StatePair] | None:
    """The manifest's ``state`` list checked against the model's IO; None when the manifest has none."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise PackageFormatError(f"{where}: 'state' must be a list of {{input, output, batch_axis}} objects")
    ins = {s.name: s for s in inputs}
    outs = {s.name: s for s in outputs}
    pairs = []
    for d in value:
        if not isinstance(d, Mapping) or not isinstance(d.get("input"), str) or not isinstance(d.get("output"), str):
            raise PackageFormatError(f"{where}: bad state entry {d!r}; give {{\"input\": name, \"output\": name}}")
        axis = d.get("batch_axis", 0)
        init = d.get("initial", 0.0)
        if isinstance(axis, bool) or not isinstance(axis, int) or isinstance(init, bool) or \
                not isinstance(init, (int, float)):
            raise PackageFormatError(f"{where}: state {d['input']!r}: batch_axis must be an integer and initial "
                                     "a number")
        i, o = ins.get(d["input"]), outs.get(d["output"])
        if i is None or o is None:
            missing = d["input"] if i is None else d["output"]
            raise PackageFormatError(f"{where}: state names {missing!r}, which is not a model "
                                     f"{'input' if i is None else 'output'} (inputs {', '.join(ins)}; "
                                     f"outputs {', '.join(outs)})")
        if not 0 <= axis < max(i.rank, 1) or i.rank != o.rank:
            raise PackageFormatError(f"{where}: state {i.name} {i.shape_str()} -> {o.name} {o.shape_str()}: ranks "
                                     f"differ or batch_axis {axis} is out of range")
        for a, (x, y) in enumerate(zip(i.shape, o.shape)):
            if a != axis and x != -1 and y != -1 and x != y:
                raise PackageFormatError(f"{where}: state {i.name} {i.shape_str()} and {o.name} "
                                         f"{o.shape_str()} differ on axis {a}; state out must fit state in")
        if any(d_ == -1 for a, d_ in enumerate(i.shape) if a != axis):
            raise PackageFormatError(f"{where}: state {i.name} {i.shape_str()} has a variable axis besides "
                                     f"batch_axis {axis}; export the state with fixed sizes")
        pairs.append(StatePair(i.name, o.name, axis, float(init)))
    if len({p.input for p in pairs}) != len(pairs) or len({p.output for p in pairs}) != len(pairs):
        raise PackageFormatError(f"{where}: a state input or output is named twice")
    if len(pairs) == len(ins):
        raise PackageFormatError(f"{where}: every input is declared state; a stateful model still needs a data input")
    return pairs


_STATE_NAME = re.compile(r"^(h|c|hx|cx|h0|c0|hidden.*|state.*|.*_state|.*_hidden|past.*|cache.*|memory)$", re.I)


def _related(i: str, o: str) -> bool:
    if o in (f"{i}_out", f"{i}_new", f"{i}_next", f"{i}n", f"next_{i}", f"new_{i}", f"{i}1"):
        return True
    for a, b in (("_in", "_out"), ("in", "out"), ("0", "n"), ("0", "_out")):
        if i.endswith(a) and o == i[: -len(a)] + b:
            return True
    return bool(_STATE_NAME.match(i) and o.lower().startswith(i.lower()))


def looks_stateful(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> tuple[str, str] | None:
    """``(input, output)`` when the IO looks like a recurrent state carried from call to call, else None."""
    for i in inputs:
        for o in outputs:
            if i.name != o.name and i.rank == o.rank and i.rank >= 1 and i.dtype == o.dtype and \
                    _related(i.name, o.name) and all(x == y or -1 in (x, y) for x, y in zip(i.shape, o.shape)):
                return i.name, o.name
    return None


def check_declared(manifest: Mapping[str, Any], inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                   where: str) -> list[StatePair]:
    """The declared state pairs; a one-line refusal when the model looks stateful and declares none."""
    pairs = parse_state(manifest.get("state"), inputs, outputs, where)
    if pairs is not None:
        return pairs
    guess = looks_stateful(inputs, outputs)
    if guess is not None:
        i = next(s for s in inputs if s.name == guess[0])
        raise PackageFormatError(
            f"{where}: the model looks stateful (input {guess[0]!r} {i.shape_str()} comes back as output "
            f"{guess[1]!r}) but the manifest declares no state; declare it, e.g. state=[{{\"input\": "
            f"\"{guess[0]}\", \"output\": \"{guess[1]}\", \"batch_axis\": <axis of the streams>}}], or state=[] "
            "if it is not")
    return []


def initial_state(pair: StatePair, spec: TensorSpec, batch: int = 1) -> np.ndarray:
    """The state of ``batch`` fresh streams (the declared constant, zeros by default)."""
    shape = [batch if a == pair.batch_axis else d for a, d in enumerate(spec.shape)]
    return np.full(shape, pair.initial, dtype=np.dtype(spec.dtype))
