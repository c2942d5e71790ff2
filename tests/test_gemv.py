"""zigzag_gemv on the CPU against a float64 numpy reference (docs/format.md, "Products")."""

import mlx.core as mx
import numpy as np
import pytest

from spqt_mlx import ActiveColumns, ZigzagWeight, collect_active, zigzag_gemv, zigzag_quantize
from zigzag_reference import BITS, DTYPES, GROUP_SIZES, REL_TOL, dense_weight64, to_np



def reference(x: mx.array, q: ZigzagWeight, cols=None) -> np.ndarray:
    """float64 x[..., S] @ W[:, S].T; S lists columns (duplicates count twice, out-of-range skipped)."""
    W = dense_weight64(q)
    xn = to_np(x)
    if cols is None:
        return xn @ W.T
    K = q.shape[1]
    S = np.array([c for c in np.asarray(cols).reshape(-1).tolist() if 0 <= c < K], dtype=np.int64)
    return xn[..., S] @ W[:, S].T


def assert_close(y: mx.array, ref: np.ndarray, dtype):
    assert y.dtype == dtype
    assert y.shape == ref.shape
    yn = to_np(y)
    assert not np.isnan(yn).any()
    tol = REL_TOL[dtype]
    scale = np.abs(ref).max()
    assert scale > 0
    assert np.linalg.norm(yn - ref) / np.linalg.norm(ref) < tol
    assert np.all(np.abs(yn - ref) <= 4 * tol * scale)  # every element, every band


def make(N, K, bits, gs, dtype, seed, lead=()):
    """A quantized random (N, K) weight and a random x of shape (*lead, K), never zeros."""
    kw, kx = mx.random.split(mx.random.key(seed))
    q = zigzag_quantize(mx.random.normal((N, K), key=kw).astype(dtype), group_size=gs, bits=bits)
    x = mx.random.normal((*lead, K), key=kx).astype(dtype)
    return q, x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_dense_all_formats(bits, group_size, dtype):
    # 3 bands and K = 100 (not a multiple of 32): every band of the output is checked.
    q, x = make(3 * group_size, 100, bits, group_size, dtype, seed=bits * 131 + group_size)
    assert_close(zigzag_gemv(x, q), reference(x, q), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_bands_every_element(dtype):
    # 8 bands of 32 rows: a band written twice or left unwritten shows up elementwise.
    q, x = make(256, 300, 4, 32, dtype, seed=99, lead=(2,))
    assert_close(zigzag_gemv(x, q), reference(x, q), dtype)
    cols = np.random.default_rng(99).permutation(300)[:60]
    assert_close(zigzag_gemv(x, q, indices=mx.array(cols)), reference(x, q, cols), dtype)


def _index_sets(K, rng):
    perm = rng.permutation(K)
    quarter, half = perm[: K // 4], perm[: K // 2]
    return {
        "one": perm[:1],
        "quarter": quarter,
        "half": np.concatenate([half, half[:1]]),  # a duplicate counts twice
        "all": rng.permutation(K),
        "all_plus_dup": np.concatenate([rng.permutation(K), perm[:3]]),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_indices_densities(bits, group_size, dtype):
    K = 77
    seed = bits * 17 + group_size
    q, x = make(2 * group_size, K, bits, group_size, dtype, seed=seed)
    rng = np.random.default_rng(seed)
    for name, cols in _index_sets(K, rng).items():
        assert not np.all(np.diff(cols) > 0) or len(cols) <= 1, name  # unsorted lists
        y = zigzag_gemv(x, q, indices=mx.array(cols.astype(np.int32)))
        assert_close(y, reference(x, q, cols), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_duplicate_counts_twice(dtype):
    q, x = make(64, 40, 4, 64, dtype, seed=5)
    once = to_np(zigzag_gemv(x, q, indices=mx.array([7])))
    twice = to_np(zigzag_gemv(x, q, indices=mx.array([7, 7])))
    assert np.abs(once).max() > 0
    np.testing.assert_allclose(twice, 2 * once, rtol=REL_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", [mx.int32, mx.int64, mx.uint32, mx.int16, mx.uint8], ids=str)
def test_empty_active_set_is_exactly_zero(dtype, index_dtype):
    q, x = make(128, 50, 3, 32, dtype, seed=11, lead=(2,))
    y = zigzag_gemv(x, q, indices=mx.array([], dtype=index_dtype))
    assert y.shape == (2, 128) and y.dtype == dtype
    assert np.array_equal(to_np(y), np.zeros((2, 128)))  # no bias term either: sum over no columns


def test_empty_batch():
    q, _ = make(64, 30, 4, 32, mx.float32, seed=13)
    y = zigzag_gemv(mx.zeros((0, 30)), q, indices=mx.array([1, 2]))
    assert y.shape == (0, 64) and y.dtype == mx.float32
    assert zigzag_gemv(mx.zeros((2, 0, 30)), q).shape == (2, 0, 64)


@pytest.mark.parametrize("index_dtype", [mx.int64, mx.uint32, mx.int16, mx.uint8], ids=str)
def test_other_integer_index_dtypes(index_dtype):
    q, x = make(64, 90, 5, 32, mx.float32, seed=12)
    cols = np.random.default_rng(12).permutation(90)[:30]
    assert_close(zigzag_gemv(x, q, indices=mx.array(cols).astype(index_dtype)), reference(x, q, cols), mx.float32)


@pytest.mark.parametrize("K", (1, 33, 100, 255))
@pytest.mark.parametrize("bits", (3, 4, 6))
def test_k_not_multiple_of_32(K, bits):
    q, x = make(64, K, bits, 32, mx.float32, seed=K * 7 + bits)
    assert_close(zigzag_gemv(x, q), reference(x, q), mx.float32)
    cols = np.random.default_rng(K).integers(0, K, size=max(1, K // 3))
    assert_close(zigzag_gemv(x, q, indices=mx.array(cols)), reference(x, q, cols), mx.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(3,), (2, 3), (1, 1), (2, 1, 2)], ids=str)
def test_leading_batch_dims(lead, dtype):
    q, x = make(128, 60, 4, 64, dtype, seed=len(lead) * 10 + sum(lead), lead=lead)
    assert_close(zigzag_gemv(x, q), reference(x, q), dtype)
    cols = np.array([5, 59, 0, 13, 13, 40])
    assert_close(zigzag_gemv(x, q, indices=mx.array(cols)), reference(x, q, cols), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_x(dtype):
    K = 70
    q, _ = make(96, K, 3, 32, dtype, seed=21)
    key = mx.random.key(22)
    base = mx.random.normal((K, 4), key=key).astype(dtype)
    views = {
        "transposed": base.T,  # (4, K) with strides (1, 4)
        "strided": mx.random.normal((3, 2 * K), key=key).astype(dtype)[:, ::2],
        "row_slice": mx.random.normal((5, K), key=key).astype(dtype)[2:4],
        "broadcast": mx.broadcast_to(mx.random.normal((K,), key=key).astype(dtype), (3, K)),
        "batched_transpose": mx.random.normal((2, K, 3), key=key).astype(dtype).swapaxes(1, 2),
    }
    cols = np.array([69, 1, 33, 2, 2, 50])
    for name, x in views.items():
        assert_close(zigzag_gemv(x, q), reference(x, q), dtype)
        assert_close(zigzag_gemv(x, q, indices=mx.array(cols)), reference(x, q, cols), dtype)
    # a strided index array
    idx = mx.array(np.stack([cols, cols + 1]).T.copy())[:, 0]
    x = views["transposed"]
    assert_close(zigzag_gemv(x, q, indices=idx), reference(x, q, cols), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_weight_arrays(dtype):
    q, x = make(128, 45, 6, 64, dtype, seed=31, lead=(2,))
    # The same values stored in other layouts: (K, bands, words) swapped back, and transposed scales.
    w_view = mx.array(np.ascontiguousarray(np.array(q.weight).transpose(1, 0, 2))).swapaxes(0, 1)
    s_view = mx.contiguous(q.scales.T).T
    b_view = mx.concatenate([q.biases, q.biases * 2], axis=1)[:, : q.shape[1]]  # row stride 2K
    q_view = ZigzagWeight(w_view, s_view, b_view, q.group_size, q.bits)
    assert np.array_equal(np.array(q_view.weight), np.array(q.weight))
    ref = reference(x, q)
    assert_close(zigzag_gemv(x, q_view), ref, dtype)
    # a sliced weight: every other column of a wider quantized matrix
    wide, _ = make(128, 90, 6, 64, dtype, seed=32)
    sliced = ZigzagWeight(wide.weight[:, ::2], wide.scales[:, ::2], wide.biases[:, ::2], 64, 6)
    assert_close(zigzag_gemv(x, sliced), reference(x, sliced), dtype)
    # identical bits with and without copies
    assert np.array_equal(to_np(zigzag_gemv(x, q_view)), to_np(zigzag_gemv(x, q)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_of_range_indices_are_skipped(dtype):
    K = 50
    q, x = make(64, K, 4, 32, dtype, seed=41, lead=(2,))
    cols = np.array([-1, 3, K, 49, -100, K + 5, 0, 2**31 - 1, -(2**31), 3])
    y = zigzag_gemv(x, q, indices=mx.array(cols.astype(np.int32)))
    assert_close(y, reference(x, q, cols), dtype)
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 50\)"):
        zigzag_gemv(x, q, indices=mx.array(cols.astype(np.int32)), validate=True)
    # validate=True with good indices computes the same result
    good = np.array([3, 49, 0, 3])
    a = zigzag_gemv(x, q, indices=mx.array(good), validate=True)
    assert np.array_equal(to_np(a), to_np(zigzag_gemv(x, q, indices=mx.array(good))))


@pytest.mark.parametrize(
    "value,index_dtype",
    [(2**32 + 3, mx.int64), (-(2**32) + 3, mx.int64), (2**32 + 3, mx.uint64)],
    ids=["int64_high", "int64_low", "uint64"],
)
def test_wide_out_of_range_indices_are_skipped(value, index_dtype):
    q, x = make(64, 10, 4, 32, mx.float32, seed=42)
    y = zigzag_gemv(x, q, indices=mx.array([value], dtype=index_dtype))
    assert np.array_equal(to_np(y), np.zeros(64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 128), (5, 32), (8, 32)])
def test_collected_active_sets(bits, group_size, dtype):
    """ActiveColumns with the same x (fused threshold path) and with another x (packed path)."""
    K = 130
    seed = bits * 3 + group_size
    q, x = make(2 * group_size, K, bits, group_size, dtype, seed=seed, lead=(1,))
    rng = np.random.default_rng(seed)
    thresholds = {
        "scalar": 0.7,
        "per_column": mx.array(rng.uniform(0.0, 1.5, size=K).astype(np.float32)),
        "none_active": 1e9,
        "all_active": -1.0,
    }
    for name, t in thresholds.items():
        active = collect_active(x, t)
        # the kernels compare against the threshold in float32
        tn = np.broadcast_to(np.array(t.astype(mx.float32)) if isinstance(t, mx.array) else np.float32(t), (K,))
        cols = np.nonzero(np.abs(to_np(x)[0]) > tn)[0]
        fused = zigzag_gemv(x, q, indices=active)
        other_x = mx.random.normal((1, K), key=mx.random.key(seed + 1)).astype(dtype)
        packed = zigzag_gemv(other_x, q, indices=active)  # the list of x applied to other_x
        if len(cols) == 0:
            assert np.array_equal(to_np(fused), np.zeros((1, 2 * group_size)))
            assert np.array_equal(to_np(packed), np.zeros((1, 2 * group_size)))
            continue
        assert_close(fused, reference(x, q, cols), dtype)
        assert_close(packed, reference(other_x, q, cols), dtype)
        # A copy of x is another object, so it takes the packed path and gives identical bits.
        same_values = zigzag_gemv(mx.array(x), q, indices=active)
        assert np.array_equal(to_np(same_values), to_np(fused))


def test_packed_list_is_clamped_and_bounds_checked():
    """A corrupted packed list (count > K, entries out of range) never reads out of bounds."""
    K = 20
    q, x = make(32, K, 4, 32, mx.float32, seed=51)
    other = mx.random.normal((K,), key=mx.random.key(52))
    entries = [3, -1, K, 7, 7] + [0] * (K - 5)
    packed = mx.array([10**6] + entries, dtype=mx.int32)  # count clamped to K
    ac = ActiveColumns(packed, x, mx.array(0.0))
    assert_close(zigzag_gemv(other, q, indices=ac), reference(other, q, entries), mx.float32)
    ac_neg = ActiveColumns(mx.array([-5] + entries, dtype=mx.int32), x, mx.array(0.0))
    assert np.array_equal(to_np(zigzag_gemv(other, q, indices=ac_neg)), np.zeros(32))


@pytest.mark.parametrize("shapeless", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled(dtype, shapeless):
    gs, bits, K = 32, 5, 64
    q, _ = make(3 * gs, K, bits, gs, dtype, seed=61)

    def dense(x, w, s, b):
        return zigzag_gemv(x, ZigzagWeight(w, s, b, gs, bits))

    def sparse(x, w, s, b, idx):
        return zigzag_gemv(x, ZigzagWeight(w, s, b, gs, bits), indices=idx) * 2

    def fused(x, w, s, b):
        return zigzag_gemv(x, ZigzagWeight(w, s, b, gs, bits), indices=collect_active(x, 0.5))

    cdense = mx.compile(dense, shapeless=shapeless)
    csparse = mx.compile(sparse, shapeless=shapeless)
    cfused = mx.compile(fused)  # the active set's shape depends on K: not shapeless
    rng = np.random.default_rng(62)
    for i, lead in enumerate([(1,), (4,), (2, 3)]):
        x = mx.random.normal((*lead, K), key=mx.random.key(63 + i)).astype(dtype)
        cols = rng.integers(0, K, size=5 + 7 * i)
        arrays = (q.weight, q.scales, q.biases)
        assert_close(cdense(x, *arrays), reference(x, q), dtype)
        assert_close(csparse(x, *arrays, mx.array(cols)), 2 * reference(x, q, cols), dtype)
        xr = x.reshape(-1, K)[:1]
        active_cols = np.nonzero(np.abs(to_np(xr)[0]) > 0.5)[0]
        assert_close(cfused(xr, *arrays), reference(xr, q, active_cols), dtype)


def test_graph_building_is_lazy():
    q, x = make(128, 200, 4, 64, mx.float32, seed=71, lead=(8,))
    mx.eval(q.weight, q.scales, q.biases, x)
    lazy_x = x * 3.0  # never evaluated before the GEMV is built
    mx.synchronize()  # buffers of earlier work are released when it completes (on a GPU, later)
    before = mx.get_active_memory()
    y = zigzag_gemv(lazy_x, q, indices=mx.array([1, 2, 3]))
    active = collect_active(lazy_x[:1], 0.5)
    z = zigzag_gemv(lazy_x[:1], q, indices=active)
    assert mx.get_active_memory() <= before + 64  # no output buffers yet (index array aside)
    mx.eval(y, z)
    assert mx.get_active_memory() >= before + y.nbytes + z.nbytes
    assert_close(y, reference(lazy_x, q, [1, 2, 3]), mx.float32)
    cols = np.nonzero(np.abs(to_np(lazy_x)[0]) > 0.5)[0]
    assert_close(z, reference(lazy_x[:1], q, cols), mx.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_cpu_stream(dtype):
    q, x = make(64, 48, 2, 32, dtype, seed=81, lead=(2,))
    assert_close(zigzag_gemv(x, q, stream=mx.cpu), reference(x, q), dtype)
    assert_close(zigzag_gemv(x, q, indices=mx.array([4, 0, 4]), stream=mx.cpu), reference(x, q, [4, 0, 4]), dtype)
    x1 = x[:1]
    active = collect_active(x1, 0.3, stream=mx.cpu)
    cols = np.nonzero(np.abs(to_np(x1)[0]) > 0.3)[0]
    assert_close(zigzag_gemv(x1, q, indices=active, stream=mx.cpu), reference(x1, q, cols), dtype)
    with mx.stream(mx.cpu):
        assert_close(zigzag_gemv(x, q), reference(x, q), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(dtype):
    q, x = make(256, 300, 3, 128, dtype, seed=91, lead=(3,))
    cols = mx.array(np.random.default_rng(91).integers(-5, 305, size=200))
    for kw in ({}, {"indices": cols}):
        a = np.array(zigzag_gemv(x, q, **kw).astype(mx.float32))
        b = np.array(zigzag_gemv(x, q, **kw).astype(mx.float32))
        assert np.array_equal(a, b)
    x1 = x[:1]
    a = np.array(zigzag_gemv(x1, q, indices=collect_active(x1, 0.2)).astype(mx.float32))
    b = np.array(zigzag_gemv(x1, q, indices=collect_active(x1, 0.2)).astype(mx.float32))
    assert np.array_equal(a, b)
