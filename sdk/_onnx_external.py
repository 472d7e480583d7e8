"""Which tensors of an ONNX graph keep their bytes in external files, read without the ``onnx`` package.

torch's dynamo exporter writes ``model.onnx`` plus ``model.onnx.data``: the
graph file then holds only references (``data_location = EXTERNAL`` and a
``location`` entry naming the data file). A package that ships the graph
alone loads only where that file happens to lie beside the current
directory. The package code must spot such references on a device, which
has onnxruntime but not ``onnx``, so this walks the protobuf wire format
itself: only the fields that can hold a tensor are descended into, and the
large ``raw_data`` fields are skipped by their length, never copied.

:func:`inline_external_data` (workstation only) needs ``onnx``.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["external_refs", "inline_external_data", "ExternalRef"]

# Field numbers from onnx.proto (stable since IR version 3).
_MODEL_GRAPH, _MODEL_TRAINING, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_GRAPHS = (1, 2)                       # TrainingInfoProto.initialization, .algorithm
_GRAPH_NODE, _GRAPH_INIT, _GRAPH_SPARSE_INIT = 1, 5, 15
_FUNCTION_NODE = 7
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_EXTERNAL = 1                                   # TensorProto.DataLocation.EXTERNAL
_MAX_NESTING = 64                               # subgraphs of subgraphs; a real model nests a few

# message kind -> {field number: kind of the embedded message}
_CHILDREN = {
    "model": {_MODEL_GRAPH: "graph", _MODEL_TRAINING: "training", _MODEL_FUNCTIONS: "function"},
    "training": {f: "graph" for f in _TRAINING_GRAPHS},
    "graph": {_GRAPH_NODE: "node", _GRAPH_INIT: "tensor", _GRAPH_SPARSE_INIT: "sparse"},
    "function": {_FUNCTION_NODE: "node"},
    "node": {_NODE_ATTRIBUTE: "attribute"},
    "attribute": {_ATTR_T: "tensor", _ATTR_G: "graph", _ATTR_TENSORS: "tensor", _ATTR_GRAPHS: "graph",
                  _ATTR_SPARSE: "sparse", _ATTR_SPARSES: "sparse"},
    "sparse": {_SPARSE_VALUES: "tensor", _SPARSE_INDICES: "tensor"},
}


class ExternalRef(tuple):
    """(tensor name, location of its data file as written in the graph)."""

    __slots__ = ()

    def __new__(cls, tensor: str, location: str):
        return super().__new__(cls, (tensor, location))

    @property
    def tensor(self) -> str:
        return self[0]

    @property
    def location(self) -> str:
        return self[1]


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= end or shift > 63:
            raise _Malformed
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value) of one message; value is an int or a (start, end) span."""
    i = start
    while i < end:
        tag, i = _varint(buf, i, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i, end)
        elif wire == 1:
            value, i = None, i + 8
        elif wire == 5:
            value, i = None, i + 4
        elif wire == 2:
            n, i = _varint(buf, i, end)
            value, i = (i, i + n), i + n
        else:  # groups (3/4) are not used by onnx.proto
            raise _Malformed
        if i > end:
            raise _Malformed
        yield field, wire, value


def _tensor_ref(buf: memoryview, start: int, end: int) -> ExternalRef | None:
    name, location, external = "", None, False
    for field, wire, value in _fields(buf, start, end):
        if field == _TENSOR_LOCATION and wire == 0:
            external = value == _EXTERNAL
        elif field == _TENSOR_NAME and wire == 2:
            name = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
        elif field == _TENSOR_EXTERNAL and wire == 2:
            key = val = None
            for f2, w2, v2 in _fields(buf, *value):
                if w2 == 2 and f2 in (_ENTRY_KEY, _ENTRY_VALUE):
                    text = bytes(buf[v2[0]:v2[1]]).decode("utf-8", "replace")
                    key, val = (text, val) if f2 == _ENTRY_KEY else (key, text)
            if key == "location":
                location = val
    if external or location is not None:
        return ExternalRef(name, location or "")
    return None


def external_refs(data: bytes) -> list[ExternalRef] | None:
    """Every tensor of the serialized ONNX model ``data`` whose bytes live outside it.

    Returns ``None`` when ``data`` is not a well-formed protobuf (the runtime
    will refuse it with its own message); ``[]`` for a self-contained graph.
    Iterative, so a hostile nesting depth cannot exhaust the stack.
    """
    buf = memoryview(data)
    refs: list[ExternalRef] = []
    stack = [("model", 0, len(buf), 0)]
    try:
        while stack:
            kind, start, end, depth = stack.pop()
            if depth > _MAX_NESTING:
                raise _Malformed
            if kind == "tensor":
                ref = _tensor_ref(buf, start, end)
                if ref is not None:
                    refs.append(ref)
                continue
            children = _CHILDREN[kind]
            for field, wire, value in _fields(buf, start, end):
                child = children.get(field)
                if child is not None and wire == 2:
                    stack.append((child, value[0], value[1], depth + 1))
    except _Malformed:
        return None
    return refs


def inline_external_data(data: bytes, base_dir: str | os.PathLike, what: str = "model") -> bytes:
    """``data`` with every external tensor's bytes read from beside it (``base_dir``) and stored inline.

    Raises ``FileNotFoundError`` naming the first missing data file, and
    ``ValueError`` when the result would pass protobuf's 2 GB limit.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    base = Path(base_dir)
    for ref in external_refs(data) or []:
        if not (base / ref.location).is_file():
            raise FileNotFoundError(str(base / ref.location))
    model = onnx.load_model_from_string(data)
    load_external_data_for_model(model, str(base))
    if model.ByteSize() >= (1 << 31) - 1:
        raise ValueError(f"{what} with its external data is {model.ByteSize()} bytes, past protobuf's 2 GB limit")
    return model.SerializeToString()
