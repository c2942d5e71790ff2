"""Property tests: random shapes, formats and index sets against a float64 reference."""

import mlx.core as mx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from spqt_mlx import collect_active, zigzag_dequantize, zigzag_gemv, zigzag_matmul, zigzag_quantize
from zigzag_reference import REL_TOL, dense_weight64, to_np

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
SETTINGS = settings(deadline=None, max_examples=40, derandomize=True)


def assert_matches(y: mx.array, ref: np.ndarray, dtype):
    yn = to_np(y)
    assert y.dtype == dtype and yn.shape == ref.shape
    assert not np.isnan(yn).any()
    scale = np.abs(ref).max()
    if scale == 0:  # no valid column: the sum over no columns is exactly zero
        assert np.array_equal(yn, ref)
        return
    tol = REL_TOL[dtype]
    assert np.linalg.norm(yn - ref) / np.linalg.norm(ref) < tol
    assert np.all(np.abs(yn - ref) <= 4 * tol * scale)


@st.composite
def problems(draw):
    gs = draw(st.sampled_from((32, 64, 128)))
    bands = draw(st.integers(1, 4 if gs < 128 else 2))  # N <= 256
    K = draw(st.integers(1, 300))
    bits = draw(st.sampled_from((2, 3, 4, 5, 6, 8)))
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    lead = draw(st.sampled_from([(), (1,), (3,), (2, 2)]))
    seed = draw(st.integers(0, 2**31 - 1))
    return gs, bands * gs, K, bits, dtype, lead, seed


def build(gs, N, K, bits, dtype, lead, seed):
    rng = np.random.default_rng(seed)
    # A spread of magnitudes per column so groups differ in scale; never all zeros.
    w = rng.normal(size=(N, K)) * rng.uniform(0.1, 3.0, size=(1, K))
    q = zigzag_quantize(mx.array(w.astype(np.float32)).astype(dtype), group_size=gs, bits=bits)
    x = mx.array(rng.normal(size=(*lead, K)).astype(np.float32)).astype(dtype)
    return q, x, rng


@SETTINGS
@given(problems())
def test_dense_gemv_and_matmul(problem):
    gs, N, K, bits, dtype, lead, seed = problem
    q, x, _ = build(*problem)
    W = dense_weight64(q)
    ref = to_np(x) @ W.T
    assert_matches(zigzag_gemv(x, q), ref, dtype)
    if lead:  # zigzag_matmul needs the same result through MLX's own kernels
        assert_matches(zigzag_matmul(x, q), ref, dtype)
    # MLX's dequantize rounds scale * q and the sum to the dtype: two roundings at most.
    eps = {mx.float32: 2**-24, mx.float16: 2**-11, mx.bfloat16: 2**-8}[dtype]
    np.testing.assert_allclose(to_np(zigzag_dequantize(q)), W, rtol=0, atol=4 * eps * np.abs(W).max())


@SETTINGS
@given(problems(), st.data())
def test_index_lists(problem, data):
    gs, N, K, bits, dtype, lead, seed = problem
    q, x, _ = build(*problem)
    cols = data.draw(st.lists(st.integers(-3, K + 3), max_size=2 * K + 4), label="cols")
    valid = np.array([c for c in cols if 0 <= c < K], dtype=np.int64)  # duplicates kept
    ref = to_np(x)[..., valid] @ dense_weight64(q)[:, valid].T
    y = zigzag_gemv(x, q, indices=mx.array(np.array(cols, dtype=np.int32)))
    assert_matches(y, ref, dtype)


@SETTINGS
@given(problems(), st.floats(0.0, 2.0))
def test_collected_active_sets(problem, threshold):
    gs, N, K, bits, dtype, lead, seed = problem
    q, x, rng = build(gs, N, K, bits, dtype, (1,), seed)
    active = collect_active(x, threshold)
    cols = np.nonzero(np.abs(to_np(x)[0]) > np.float32(threshold))[0]
    packed = np.array(active.packed)
    assert packed[0] == len(cols) and np.array_equal(packed[1 : len(cols) + 1], cols)
    W = dense_weight64(q)
    assert_matches(zigzag_gemv(x, q, indices=active), to_np(x)[:, cols] @ W[:, cols].T, dtype)
    other = mx.array(rng.normal(size=(1, K)).astype(np.float32)).astype(dtype)
    assert_matches(zigzag_gemv(other, q, indices=active), to_np(other)[:, cols] @ W[:, cols].T, dtype)
