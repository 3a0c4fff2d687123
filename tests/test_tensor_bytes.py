"""The tensor struct the ring and the process engine send: round trips and its checks."""

import msgspec
import numpy as np
import pytest

from exo.inference.tensor_bytes import TensorBytes


def round_trip(tensor: TensorBytes) -> TensorBytes:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(tensor), type=TensorBytes)


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.float32).reshape(1, 4, 6),
                                   np.asarray([[1, 2, 3]], dtype=np.int64),
                                   np.zeros((2, 0, 3), dtype=np.float16),
                                   np.arange(12, dtype=np.float64).reshape(3, 4).T])  # not contiguous
def test_round_trip_keeps_dtype_shape_and_values(array):
    decoded = round_trip(TensorBytes.of(array)).array()
    assert decoded.dtype == array.dtype and decoded.shape == array.shape and np.array_equal(decoded, array)


def test_tensor_bytes_round_trip_and_length_check():
    array = np.arange(24, dtype=np.float32).reshape(1, 4, 6)
    assert np.array_equal(TensorBytes.of(array).array(), array)
    bad = TensorBytes("<f4", [1, 4, 7], array.tobytes())
    with pytest.raises(ValueError, match="needs"):
        bad.array()


@pytest.mark.parametrize("tensor, reason", [
    (TensorBytes("<f4", [2, 3], bytes(23)), "needs 24"),  # one byte short
    (TensorBytes("<f4", [2, 3], bytes(28)), "needs 24"),  # one element too many
    (TensorBytes("<f8", [2, 3], bytes(24)), "needs 48"),  # the bytes of another dtype
    (TensorBytes("<f4", [-2, -3], bytes(24)), "negative"),  # the right product, impossible dims
    (TensorBytes("<f4", [2**32, 2**32], b""), "needs"),  # a size int64 would wrap to 0
    (TensorBytes("not-a-dtype", [1], bytes(4)), "not a numpy dtype"),
    (TensorBytes("|O", [1], bytes(8)), "Python objects"),
])
def test_bytes_that_do_not_fit_the_header_are_refused(tensor, reason):
    with pytest.raises(ValueError, match=reason):
        tensor.array()
