"""A numpy array as msgspec can carry it: dtype, shape and the raw bytes.

Both the ring (hidden states between stages) and the process engine (arrays over its pipe)
send tensors this way. The bytes come from another process or another machine, so decoding
checks that they are exactly what the shape and dtype need before numpy sees them.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np


class TensorBytes(msgspec.Struct, frozen=True):
    dtype: str  # numpy's dtype string, e.g. "<f4"
    shape: list[int]
    data: bytes

    @classmethod
    def of(cls, array: np.ndarray) -> "TensorBytes":
        array = np.ascontiguousarray(array)
        return cls(array.dtype.str, list(array.shape), array.tobytes())

    def array(self) -> np.ndarray:
        """A read-only view of the bytes; ValueError when they do not fit the shape and dtype."""
        try:
            dtype = np.dtype(self.dtype)
        except TypeError as exc:
            raise ValueError(f"tensor dtype {self.dtype!r} is not a numpy dtype") from exc
        if dtype.hasobject:
            raise ValueError(f"tensor dtype {self.dtype!r} holds Python objects, not plain values")
        if any(n < 0 for n in self.shape):
            raise ValueError(f"tensor shape {self.shape} has a negative dimension")
        expected = math.prod(self.shape) * dtype.itemsize
        if len(self.data) != expected:
            raise ValueError(f"tensor payload has {len(self.data)} bytes, shape {self.shape} needs {expected}")
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)
