"""exo's few-row sgemm kernel (exo/native/small_gemm.c) against numpy, and MLX running on it."""

import ctypes
import itertools
import sys

import numpy as np
import pytest

from exo.blas import select_blas, small_gemm_library

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the kernel is for MLX's Linux CPU backend")

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


@pytest.fixture(scope="module")
def sgemm():
    if select_blas().name != "small-gemm+openblas":
        pytest.skip(f"the kernel is not in use here: {select_blas().message}")
    kernel, why = small_gemm_library()
    assert kernel is not None, why
    fn = ctypes.CDLL(str(kernel)).cblas_sgemm
    pointer = ctypes.c_void_p
    fn.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, pointer, ctypes.c_int, pointer, ctypes.c_int,
                                        ctypes.c_float, pointer, ctypes.c_int]
    fn.restype = None
    return fn


def product_bt(sgemm, a: np.ndarray, b: np.ndarray, alpha: float, beta: float, c: np.ndarray) -> np.ndarray:
    """alpha a b^T + beta c, the product every nn.Linear asks for."""
    out = np.array(c, dtype=np.float32, copy=True)
    sgemm(ROW_MAJOR, NO_TRANS, TRANS, a.shape[0], b.shape[0], a.shape[1], alpha, a.ctypes.data, a.strides[0] // 4,
          b.ctypes.data, b.strides[0] // 4, beta, out.ctypes.data, out.shape[1])
    return out


def padded(matrix: np.ndarray, extra: int) -> np.ndarray:
    """`matrix` inside a wider buffer: a leading dimension larger than the row."""
    out = np.full((matrix.shape[0], matrix.shape[1] + extra), 7.0, dtype=np.float32)
    out[:, :matrix.shape[1]] = matrix
    return out


SHAPES = [(1, 1, 1), (1, 7, 3), (2, 16, 8), (3, 17, 9), (5, 33, 15), (8, 64, 64), (13, 100, 37),
          (32, 70, 129), (1, 4096, 896), (33, 40, 50), (64, 30, 20),
          (65, 40, 50), (300, 20, 30)]  # the last two go to OpenBLAS


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_every_transpose_stride_and_scaling_matches_numpy(sgemm, m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    for trans_a, trans_b in itertools.product((NO_TRANS, TRANS), repeat=2):
        for alpha, beta in ((1.0, 0.0), (0.5, 2.0), (-1.0, 1.0)):
            a = rng.standard_normal((m, k)).astype(np.float32)
            b = rng.standard_normal((k, n)).astype(np.float32)
            c = rng.standard_normal((m, n)).astype(np.float32)
            stored_a = padded(np.ascontiguousarray(a.T) if trans_a == TRANS else a, 3)
            stored_b = padded(np.ascontiguousarray(b.T) if trans_b == TRANS else b, 5)
            out = padded(c if beta else np.full((m, n), np.nan, dtype=np.float32), 2)  # beta 0: C is never read
            sgemm(ROW_MAJOR, trans_a, trans_b, m, n, k, alpha, stored_a.ctypes.data, stored_a.shape[1],
                  stored_b.ctypes.data, stored_b.shape[1], beta, out.ctypes.data, out.shape[1])
            expected = alpha * (a.astype(np.float64) @ b) + (beta * c if beta else 0.0)
            np.testing.assert_allclose(out[:, :n], expected, rtol=1e-4, atol=1e-4,
                                       err_msg=f"trans {trans_a},{trans_b} alpha {alpha} beta {beta}")
            assert (out[:, n:] == 7.0).all()  # nothing written past each row of C


@pytest.mark.parametrize("m,n,k", [(1, 7, 3), (2, 16, 8), (5, 33, 15), (64, 30, 20)])
def test_alpha_zero_reads_neither_a_nor_b(sgemm, m, n, k):
    """BLAS: with alpha 0, C = beta C and A, B are not read (0 * NaN must not reach C)."""
    rng = np.random.default_rng(m + n + k)
    for trans_a, trans_b in itertools.product((NO_TRANS, TRANS), repeat=2):
        a = np.full((k, m) if trans_a == TRANS else (m, k), np.nan, dtype=np.float32)
        b = np.full((n, k) if trans_b == TRANS else (k, n), np.inf, dtype=np.float32)
        c = rng.standard_normal((m, n)).astype(np.float32)
        for beta, expected in ((0.0, np.zeros_like(c)), (0.5, 0.5 * c), (1.0, c)):
            out = padded(c if beta else np.full((m, n), np.nan, dtype=np.float32), 2)  # beta 0: C is not read
            sgemm(ROW_MAJOR, trans_a, trans_b, m, n, k, 0.0, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1],
                  beta, out.ctypes.data, out.shape[1])
            assert np.array_equal(out[:, :n], expected), f"trans {trans_a},{trans_b} beta {beta}"
            assert (out[:, n:] == 7.0).all()


@pytest.mark.parametrize("rows", [1, 4, 33, 200])
def test_mlx_matmuls_on_the_kernel_match_numpy(sgemm, rows):
    import mlx.core as mx

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 896)).astype(np.float32)
    w = rng.standard_normal((1000, 896)).astype(np.float32)
    got = np.array(mx.array(x) @ mx.array(w).T)
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T, rtol=1e-4, atol=1e-3)


def test_without_a_compiler_there_is_no_kernel_and_the_reason_says_why(monkeypatch, tmp_path):
    import exo.blas

    monkeypatch.setenv("EXO_HOME", str(tmp_path))
    monkeypatch.setattr(exo.blas.shutil, "which", lambda name: None)
    kernel, why = small_gemm_library()
    assert kernel is None and "C compiler" in why
    assert not (tmp_path / "native").exists()


def test_a_build_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
    monkeypatch.setenv("EXO_HOME", str(tmp_path))
    first, _ = small_gemm_library()
    if first is None:
        pytest.skip("no C compiler here")
    built = first.stat().st_mtime_ns
    again, _ = small_gemm_library()
    assert again == first and again.stat().st_mtime_ns == built
    assert [p.name for p in (tmp_path / "native").iterdir()] == [first.name]  # no scratch left behind


@pytest.mark.parametrize("k,n", [(1536, 259), (896, 64), (37, 5), (8, 3), (5, 7)])
def test_a_row_is_bitwise_the_same_in_every_product_up_to_the_bound(sgemm, k, n):
    """Batching and verification rely on it: a row packed with others, at any place, must
    come out exactly as it does alone (the decode step it reproduces)."""
    bound = ctypes.CDLL(str(small_gemm_library()[0])).exo_small_gemm_rows()
    assert bound == 64
    rng = np.random.default_rng(k + n)
    a = rng.standard_normal((bound, k)).astype(np.float32)
    b = rng.standard_normal((n, k)).astype(np.float32)
    for alpha, beta in ((1.0, 0.0), (0.5, 2.0)):
        c = rng.standard_normal((bound, n)).astype(np.float32)
        alone = np.concatenate([product_bt(sgemm, a[i:i + 1], b, alpha, beta, c[i:i + 1]) for i in range(bound)])
        for rows in (2, 3, 4, 5, 7, 8, 13, 33, 64):
            for start in sorted({0, bound - rows, (bound - rows) // 2}):
                part = product_bt(sgemm, a[start:start + rows], b, alpha, beta, c[start:start + rows])
                assert np.array_equal(part.view(np.uint32), alone[start:start + rows].view(np.uint32)), \
                    f"{rows} rows from {start}, alpha {alpha} beta {beta}"
