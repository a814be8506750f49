"""A minimal writer of ONNX models, for the small graphs the guard builds at load time.

The scoring head (see ``similarity.py``) is a handful of nodes around a matrix that depends on the
scenario document, so it is built when the guard loads. The ``onnx`` package could write it, but it is
31 MB and 0.15 s of import on the serving path for what is a few protobuf fields. This module writes
just those fields of ``onnx.proto`` (ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto,
ValueInfoProto), which onnxruntime reads like any other model. The tests load every graph built here
into onnxruntime and check it against numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

IR_VERSION = 8
OPSET = 18  # reductions take their axes as an input from 18 on

# TensorProto.DataType
FLOAT, INT64, BOOL = 1, 7, 9
_DTYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64}
# AttributeProto.AttributeType
_INT = 2


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 fields: two's complement, ten bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], **attributes: int) -> bytes:
    """A NodeProto; attributes are ints (``axis=1``, ``keepdims=0``)."""
    out = b"".join(_bytes(1, name) for name in inputs) + b"".join(_bytes(2, name) for name in outputs)
    out += _bytes(3, outputs[0]) + _bytes(4, op_type)
    for name, value in attributes.items():
        out += _bytes(5, _bytes(1, name) + _int(3, value) + _int(20, _INT))
    return out


def tensor(name: str, array: NDArray[np.float32] | NDArray[np.int64]) -> bytes:
    """A TensorProto holding ``array`` (float32 or int64), little-endian raw data."""
    dims = b"".join(_int(1, size) for size in array.shape)
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return dims + _int(2, _DTYPES[array.dtype]) + _bytes(8, name) + _bytes(9, data)


def value_info(name: str, elem_type: int, shape: Sequence[int | str]) -> bytes:
    """A ValueInfoProto of a tensor; a str dimension is symbolic (``"N"``)."""
    dims = b"".join(_bytes(1, _bytes(2, dim) if isinstance(dim, str) else _int(1, dim)) for dim in shape)
    tensor_type = _int(1, elem_type) + _bytes(2, dims)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def model(
    name: str,
    nodes: Sequence[bytes],
    inputs: Sequence[bytes],
    outputs: Sequence[bytes],
    initializers: Sequence[bytes] = (),
) -> bytes:
    """A serialised ModelProto of one graph, in the default ONNX domain at ``OPSET``."""
    graph = b"".join(_bytes(1, n) for n in nodes) + _bytes(2, name)
    graph += b"".join(_bytes(5, t) for t in initializers)
    graph += b"".join(_bytes(11, i) for i in inputs) + b"".join(_bytes(12, o) for o in outputs)
    opset = _bytes(1, "") + _int(2, OPSET)
    return _int(1, IR_VERSION) + _bytes(2, "guardrail") + _bytes(7, graph) + _bytes(8, opset)
