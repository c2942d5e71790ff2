"""Several rows under one threshold (batched decode): every row takes its own active columns, and
the product reads the union of the rows' columns once. Checked on the CPU against float64 and
against the rows one at a time; the layers route a batch's decode step to it."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from spqt_mlx import collect_active, zigzag_gemv, zigzag_quantize
from spqt_mlx.patch import ZigzagLinear
from spqt_mlx import _ext
from spqt_mlx._ext import ActiveKind, Prologue
from spqt_mlx.patch.linear import GEMV_MAX_ROWS
from zigzag_reference import BITS, DTYPES, GROUP_SIZES, REL_TOL, dense_weight64, gap_threshold, to_np


@pytest.fixture(autouse=True)
def on_the_cpu():
    """These tests pin the CPU's semantics (bit for bit where they say so); test_cuda.py and the
    emulated Metal tests check the GPU kernels against them."""
    with mx.stream(mx.cpu):
        yield


def make(N, K, bits, gs, dtype, seed, rows):
    kw, kx = mx.random.split(mx.random.key(seed))
    q = zigzag_quantize(mx.random.normal((N, K), key=kw).astype(dtype), group_size=gs, bits=bits)
    x = mx.random.normal((rows, K), key=kx).astype(dtype)
    return q, x


def rowwise_reference(x: mx.array, q, t) -> np.ndarray:
    """float64: row m of x times W over the columns where |x[m]| > t (t compared in float32)."""
    W = dense_weight64(q)
    xn = to_np(x).reshape(-1, q.shape[1])
    tn = np.broadcast_to(np.asarray(t, dtype=np.float32), (q.shape[1],))
    kept = np.where(np.abs(xn.astype(np.float32)) > tn, xn, 0.0)
    return kept @ W.T


def assert_close(y, ref, dtype):
    yn = to_np(y).reshape(ref.shape)
    assert not np.isnan(yn).any()
    tol = REL_TOL[dtype]
    assert np.linalg.norm(yn - ref) / np.linalg.norm(ref) < tol
    assert np.all(np.abs(yn - ref) <= 4 * tol * np.abs(ref).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_rows_take_their_own_columns(bits, group_size, dtype):
    # Odd row counts, a scalar and a per-column threshold, K not a multiple of 32.
    K = 130
    seed = bits * 7 + group_size
    rng = np.random.default_rng(seed)
    for rows, t in ((3, 0.6), (5, rng.uniform(0.2, 1.2, size=K).astype(np.float32))):
        q, x = make(2 * group_size, K, bits, group_size, dtype, seed + rows, rows)
        threshold = mx.array(t) if isinstance(t, np.ndarray) else t
        y = zigzag_gemv(x, q, threshold=threshold)
        assert y.shape == (rows, 2 * group_size) and y.dtype == dtype
        assert_close(y, rowwise_reference(x, q, t), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_equal_one_row_at_a_time(dtype):
    """Bit for bit on the CPU: a row's inactive entries add exact zeros to its sums."""
    q, x = make(128, 300, 4, 64, dtype, seed=3, rows=7)
    t = gap_threshold(to_np(x), 0.5)
    batched = zigzag_gemv(x, q, threshold=t)
    for m in range(7):
        alone = zigzag_gemv(x[m : m + 1], q, indices=collect_active(x[m : m + 1], t))
        assert np.array_equal(to_np(batched[m : m + 1]), to_np(alone)), m


def test_rows_with_nothing_active_and_everything_active():
    q, x = make(64, 100, 4, 32, mx.float32, seed=5, rows=4)
    assert np.array_equal(to_np(zigzag_gemv(x, q, threshold=1e9)), np.zeros((4, 64)))
    assert_close(zigzag_gemv(x, q, threshold=-1.0), to_np(x) @ dense_weight64(q).T, mx.float32)
    # One row with nothing active among active ones gives exactly zero.
    x = mx.concatenate([x[:2], mx.zeros((1, 100)), x[2:]])
    y = zigzag_gemv(x, q, threshold=0.5)
    assert np.array_equal(to_np(y[2]), np.zeros(64))
    assert_close(y, rowwise_reference(x, q, 0.5), mx.float32)


def test_leading_dimensions_and_nan_thresholds():
    q, x = make(64, 96, 4, 32, mx.float16, seed=9, rows=6)
    t = np.full(96, 0.4, dtype=np.float32)
    t[::5] = np.nan  # a NaN threshold makes its column inactive in every row
    y = zigzag_gemv(x.reshape(3, 2, 1, 96), q, threshold=mx.array(t))
    assert y.shape == (3, 2, 1, 64)
    assert_close(y.reshape(6, 64), rowwise_reference(x, q, np.where(np.isnan(t), np.inf, t)), mx.float16)


@pytest.mark.parametrize("prologue", [Prologue.RmsNorm, Prologue.SwiGLU], ids=["rmsnorm", "swiglu"])
def test_rows_through_a_prologue_and_residual(prologue):
    """A fused product of several rows decides each row's columns on that row's x'."""
    K, N, rows = 160, 128, 5
    rng = np.random.default_rng(11)
    q, _ = make(N, K, 4, 64, mx.float32, seed=11, rows=1)
    width = 2 * K if prologue == Prologue.SwiGLU else K
    x = mx.array(rng.normal(size=(rows, width)).astype(np.float32))
    norm = mx.array(rng.uniform(0.5, 1.5, size=K).astype(np.float32)) if prologue == Prologue.RmsNorm else None
    res = mx.array(rng.normal(size=(rows, N)).astype(np.float32))
    xp = _ext.apply_prologue(x, prologue, norm, 1e-5, stream=mx.cpu)
    t = gap_threshold(to_np(xp), 0.5)
    args = (q.weight, q.scales, q.biases, mx.array(t), ActiveKind.Threshold, 64, 4)
    fused = _ext.zigzag_gemv(x, *args, prologue, norm, 1e-5, res, stream=mx.cpu)
    assert_close(fused, rowwise_reference(xp, q, t) + to_np(res), mx.float32)


def test_collect_active_still_takes_one_row():
    x = mx.ones((2, 8))
    with pytest.raises(ValueError, match="one row"):
        collect_active(x, 0.5)
    q, _ = make(32, 8, 4, 32, mx.float32, seed=1, rows=1)
    with pytest.raises(ValueError, match="indices or threshold"):
        zigzag_gemv(x, q, indices=mx.array([0]), threshold=0.5)
    with pytest.raises(ValueError, match="threshold must be a scalar or have shape"):
        zigzag_gemv(x, q, threshold=mx.zeros((3,)))


def _layer(threshold, dtype=mx.float16):
    lin = nn.Linear(96, 128, bias=True)
    lin.set_dtype(dtype)
    layer = ZigzagLinear.from_linear(lin, group_size=64, bits=4)
    layer.threshold = threshold
    return layer


def test_a_batch_decode_step_is_sparse_per_sequence():
    """x of shape (B, 1, K): each sequence's token runs with its own active set, as it would alone."""
    layer = _layer(0.8)
    x = mx.random.normal((6, 1, 96), key=mx.random.key(2)).astype(mx.float16)
    batched = layer(x)
    for b in range(6):
        assert np.allclose(to_np(batched[b]), to_np(layer(x[b : b + 1])), rtol=0, atol=0)
    dense = _layer(0.0)
    dense.update(layer.parameters())
    assert not np.allclose(to_np(batched), to_np(dense(x)), atol=1e-3)  # the threshold took effect


def test_prefill_stays_dense_and_long_inputs_use_the_matmul():
    layer = _layer(0.8, mx.float32)
    for shape in ((1, 5, 96), (1, GEMV_MAX_ROWS + 3, 96)):
        x = mx.random.normal(shape, key=mx.random.key(shape[1])).astype(mx.float32)
        want = to_np(x) @ to_np(layer.dequantized_weight()).T + to_np(layer.bias)
        got = layer(x)
        assert got.shape == shape[:-1] + (128,)
        assert np.allclose(to_np(got), want, rtol=1e-4, atol=1e-4), shape


def test_a_large_batch_decode_step_is_sparse_too():
    """More sequences than GEMV_MAX_ROWS go through the matmul, each row's inactive entries zeroed
    first: every sequence's result is still the one it would get alone."""
    layer = _layer(0.8, mx.float32)
    B = GEMV_MAX_ROWS + 3
    x = mx.random.normal((B, 1, 96), key=mx.random.key(4)).astype(mx.float32)
    got = layer(x)
    for b in (0, GEMV_MAX_ROWS, B - 1):
        assert np.allclose(to_np(got[b]), to_np(layer(x[b : b + 1])), rtol=1e-5, atol=1e-5), b
    want = rowwise_reference(x.reshape(B, 96), layer.qweight, 0.8) + to_np(layer.bias)
    assert np.allclose(to_np(got).reshape(B, -1), want, rtol=1e-4, atol=1e-4)


def test_a_batch_decode_step_counts_every_row_in_the_statistics():
    layer = _layer(0.8, mx.float32)
    x = mx.random.normal((5, 1, 96), key=mx.random.key(8)).astype(mx.float32)
    layer.record_stats()
    layer(x)
    layer(x[:1])
    layer(mx.random.normal((1, 7, 96)))  # prefill: dense, not counted
    active = int((np.abs(to_np(x)) > np.float32(0.8)).sum())
    assert layer.stats() == (6, active + int((np.abs(to_np(x[0])) > np.float32(0.8)).sum()))
    layer.record_stats(False)
