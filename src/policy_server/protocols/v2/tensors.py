"""Tensors of the Open Inference Protocol: datatypes, and their JSON and binary encodings.

The same `Tensor` comes out of a REST body (JSON `data`, or bytes after the JSON header: the
binary tensor extension) and out of a gRPC message (`raw_input_contents` or typed
contents), so the data plane never sees the wire. Binary BYTES elements are each a 4-byte
little-endian length and the bytes, as Triton lays them out.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from policy_server.errors import PolicyServerError

DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
_LENGTH = struct.Struct("<I")
MAX_ELEMENTS = 1 << 28  # a shape beyond it is refused before anything is allocated


class InvalidTensor(PolicyServerError):
    """A tensor that cannot be read, or does not fit the model: 400 (INVALID_ARGUMENT)."""

    status_code = 400
    code = "invalid_tensor"


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: npt.NDArray[Any]  # shaped as `shape`; BYTES as an object array of bytes


def checked_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidTensor(f"input '{name}': shape must be a list of non-negative integers")
    if math.prod(shape) > MAX_ELEMENTS:
        raise InvalidTensor(f"input '{name}': shape {list(shape)} is too large")
    return tuple(shape)


def checked_datatype(name: str, datatype: Any) -> str:
    if datatype not in DTYPES:
        raise InvalidTensor(
            f"input '{name}': unknown datatype {datatype!r}; use one of {sorted(DTYPES)}"
        )
    return str(datatype)


def _count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def from_values(name: str, datatype: str, shape: tuple[int, ...], values: Any) -> Tensor:
    """A tensor from JSON `data` (flat or nested) or gRPC typed contents."""
    if datatype == "BYTES":
        flat = list(_flatten(values))
        if not all(isinstance(v, str | bytes) for v in flat):
            raise InvalidTensor(f"input '{name}': BYTES data must be strings")
        array = np.empty(len(flat), dtype=object)
        array[:] = [v.encode() if isinstance(v, str) else v for v in flat]
    else:
        try:
            array = np.asarray(values, dtype=DTYPES[datatype]).reshape(-1)
        except (ValueError, TypeError, OverflowError):
            raise InvalidTensor(f"input '{name}': data is not all {datatype} values") from None
        if datatype == "BOOL" and not _all_bool(values):
            raise InvalidTensor(f"input '{name}': BOOL data must be true or false")
    if array.size != _count(shape):
        raise InvalidTensor(
            f"input '{name}': {array.size} values for shape {list(shape)}, "
            f"which holds {_count(shape)}"
        )
    return Tensor(name, datatype, shape, array.reshape(shape))


def _all_bool(values: Any) -> bool:
    return all(isinstance(v, bool) for v in _flatten(values))


def _flatten(values: Any) -> Any:
    if isinstance(values, list | tuple):
        for value in values:
            yield from _flatten(value)
    else:
        yield values


def from_bytes(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> Tensor:
    """A tensor from its binary form (the binary tensor extension, `raw_input_contents`)."""
    count = _count(shape)
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = _split_bytes(name, raw, count)
        return Tensor(name, datatype, shape, array.reshape(shape))
    dtype = DTYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidTensor(
            f"input '{name}': {len(raw)} bytes for shape {list(shape)} of {datatype}, "
            f"which takes {count * dtype.itemsize}"
        )
    array = np.frombuffer(raw, dtype=dtype)
    if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise InvalidTensor(f"input '{name}': BOOL bytes must be 0 or 1")
    return Tensor(name, datatype, shape, array.reshape(shape))


def _split_bytes(name: str, raw: bytes, count: int) -> list[bytes]:
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise InvalidTensor(f"input '{name}': BYTES data ends inside an element")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidTensor(f"input '{name}': BYTES data ends inside an element")
        items.append(raw[offset : offset + length])
        offset += length
    if offset != len(raw):
        raise InvalidTensor(f"input '{name}': {len(raw) - offset} bytes beyond its elements")
    return items


def to_bytes(tensor: Tensor) -> bytes:
    """The binary form of an output tensor."""
    if tensor.datatype == "BYTES":
        return b"".join(_LENGTH.pack(len(v)) + v for v in tensor.data.reshape(-1))
    return np.ascontiguousarray(tensor.data, dtype=DTYPES[tensor.datatype]).tobytes()


def to_values(tensor: Tensor) -> list[Any]:
    """The flat JSON `data` of an output tensor (row-major, as the protocol allows)."""
    flat = tensor.data.reshape(-1)
    if tensor.datatype == "BYTES":
        return [v.decode("utf-8", "replace") for v in flat]
    values: list[Any] = flat.tolist()
    return values
