"""collect_active: the count-prefixed, ascending list of columns with |x[k]| > threshold[k]."""

import mlx.core as mx
import numpy as np
import pytest

from spqt_mlx import ActiveColumns, collect_active

DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def to_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def expected_columns(x: mx.array, threshold) -> np.ndarray:
    xn = to_np(x).reshape(-1)
    t = to_np(threshold) if isinstance(threshold, mx.array) else np.float64(threshold)
    # threshold is compared in float32
    t = np.broadcast_to(np.asarray(t, dtype=np.float32).astype(np.float64), xn.shape)
    with np.errstate(invalid="ignore"):
        return np.nonzero(np.abs(xn) > t)[0]


def check(active: ActiveColumns, x: mx.array, threshold):
    K = x.shape[-1]
    packed = np.array(active.packed)
    assert active.packed.dtype == mx.int32 and active.packed.shape == (K + 1,)
    cols = expected_columns(x, threshold)
    n = packed[0]
    assert n == len(cols)
    assert np.array_equal(packed[1 : n + 1], cols)
    assert np.all(np.diff(packed[1 : n + 1]) > 0)  # strictly ascending
    assert active.count.item() == len(cols)
    assert np.array_equal(np.array(active.indices()), cols)
    assert active.indices().dtype == mx.int32
    return cols


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(100,), (1, 100), (1, 1, 100)], ids=str)
def test_scalar_threshold(shape, dtype):
    x = mx.random.normal(shape, key=mx.random.key(len(shape))).astype(dtype)
    for t in (0.0, 0.5, 1.0, 2.5):
        check(collect_active(x, t), x, t)
    assert 0 < collect_active(x, 0.5).count.item() < 100  # a mixed case is among them
    check(collect_active(x, mx.array(0.75)), x, 0.75)
    check(collect_active(x, 1), x, 1)  # a Python int works as well


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(77,), (1, 77), (1, 1, 77)], ids=str)
def test_per_column_threshold(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    x = mx.array(rng.normal(size=shape).astype(np.float32)).astype(dtype)
    for t_dtype in (mx.float32, mx.float16, mx.bfloat16, mx.int32):
        t = mx.array(rng.uniform(0, 1.5, size=77)).astype(t_dtype)
        check(collect_active(x, t), x, t)


def test_threshold_extremes_and_ties():
    x = mx.array([0.5, -0.5, 0.25, -1.0, 0.0, 2.0])
    # strictly greater: |x| == threshold is not active
    assert np.array_equal(np.array(collect_active(x, 0.5).indices()), [3, 5])
    assert collect_active(x, 1e30).count.item() == 0
    assert collect_active(x, 1e30).indices().size == 0
    assert np.array_equal(np.array(collect_active(x, -1.0).indices()), np.arange(6))
    t = mx.array([0.4, 0.6, 0.0, 1.0, -1.0, 3.0])
    assert np.array_equal(np.array(collect_active(x, t).indices()), [0, 2, 4])


def test_nan_is_never_active():
    x = mx.array([np.nan, 1.0, -np.nan, -2.0, np.inf, -np.inf, np.nan])
    active = collect_active(x, -1.0)  # even a negative threshold does not make NaN active
    assert np.array_equal(np.array(active.indices()), [1, 3, 4, 5])
    for dtype in (mx.float16, mx.bfloat16):
        assert np.array_equal(np.array(collect_active(x.astype(dtype), 0.0).indices()), [1, 3, 4, 5])


def test_nan_threshold_entries_make_their_columns_inactive():
    x = mx.array([1.0, -2.0, 3.0, 0.5])
    t = mx.array([np.nan, 0.1, np.nan, 0.1])  # an array is not inspected: NaN acts as an infinite threshold
    assert np.array_equal(np.array(collect_active(x, t).indices()), [1, 3])
    for bad in (float("nan"), float("inf")):  # a number is checked
        with pytest.raises(ValueError, match="finite"):
            collect_active(x, bad)


def test_tail_is_unused_and_count_first():
    x = mx.array([3.0, 0.0, 0.0, 4.0, 0.0])
    packed = np.array(collect_active(x, 1.0).packed)
    assert packed[0] == 2 and list(packed[1:3]) == [0, 3]
    # The tail (packed[n+1:]) is unspecified; only its length is part of the contract.
    assert packed.shape == (6,)


@pytest.mark.parametrize("K", [1, 31, 33, 300])
def test_sizes(K):
    x = mx.random.normal((K,), key=mx.random.key(K))
    check(collect_active(x, 0.3), x, 0.3)


def test_non_contiguous_x_and_threshold():
    base = mx.random.normal((2, 90), key=mx.random.key(5))
    x = base[1, ::3]  # strided view of 30 columns
    t = mx.random.uniform(shape=(60,), key=mx.random.key(6))[::2]
    check(collect_active(x, t), x, t)
    xt = mx.random.normal((40, 1), key=mx.random.key(7)).T  # (1, 40) transposed
    check(collect_active(xt, 0.2), xt, 0.2)


def test_lazy_and_compiled():
    x = mx.random.normal((4000,), key=mx.random.key(8))
    mx.eval(x)
    before = mx.get_active_memory()
    active = collect_active(x * 2.0, 0.5)
    assert mx.get_active_memory() < before + 1000  # no (K + 1) * 4 byte list yet, only scalars
    mx.eval(active.packed)
    assert mx.get_active_memory() >= before + active.packed.nbytes
    expected = expected_columns(x * 2.0, 0.5)
    assert np.array_equal(np.array(active.indices()), expected)

    @mx.compile
    def packed_of(x, t):
        return collect_active(x, t).packed

    for seed in (9, 10):
        x = mx.random.normal((64,), key=mx.random.key(seed))
        t = mx.random.uniform(shape=(64,), key=mx.random.key(seed + 1))
        packed = np.array(packed_of(x, t))
        cols = expected_columns(x, t)
        assert packed[0] == len(cols) and np.array_equal(packed[1 : len(cols) + 1], cols)


def test_explicit_cpu_stream():
    x = mx.random.normal((50,), key=mx.random.key(12))
    check(collect_active(x, 0.4, stream=mx.cpu), x, 0.4)


def test_active_columns_keeps_its_inputs():
    x = mx.random.normal((1, 20), key=mx.random.key(13))
    active = collect_active(x, 0.5)
    assert active.x is x
    assert active.threshold.dtype == mx.float32 and active.threshold.item() == 0.5
