"""The zigzag format (docs/format.md): codes, scales and biases, the bitstream, the round trip."""

import mlx.core as mx
import numpy as np
import pytest

from spqt_mlx import ZigzagWeight, zigzag_dequantize, zigzag_matmul, zigzag_quantize
from zigzag_reference import BITS, DTYPES, GROUP_SIZES, REL_TOL, to_np, unpack_codes


def random_weight(N, K, dtype, seed):
    return mx.random.normal((N, K), key=mx.random.key(seed)).astype(dtype)


def round_to(a: np.ndarray, dtype) -> np.ndarray:
    """Round float64 values to an MLX float dtype (correct rounding), back as float64."""
    return to_np(mx.array(a.astype(np.float64)).astype(dtype))


def numpy_dequantize(q: ZigzagWeight) -> np.ndarray:
    """(N, K) float64 weight: scale * code + bias with each operation rounded to the scales' dtype.

    float64 holds the product and the sum of two such values exactly, so rounding each once
    emulates arithmetic in the dtype itself.
    """
    codes = unpack_codes(np.array(q.weight), q.group_size, q.bits).astype(np.float64)
    s, b = to_np(q.scales)[..., None], to_np(q.biases)[..., None]
    deq = round_to(round_to(s * codes, q.dtype) + b, q.dtype)  # (bands, K, gs)
    return deq.transpose(0, 2, 1).reshape(q.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_matches_mx_quantize_per_group(bits, group_size, dtype):
    bands, K = 2, 33
    N = bands * group_size
    w = random_weight(N, K, dtype, seed=bits * 1000 + group_size)
    q = zigzag_quantize(w, group_size=group_size, bits=bits)

    # Group (b, k) = w[b*gs:(b+1)*gs, k], laid out as row b*K + k of a (bands*K, gs) matrix.
    wn = np.array(w.astype(mx.float32))
    groups = np.stack([wn[b * group_size : (b + 1) * group_size, k] for b in range(bands) for k in range(K)])
    ref_w, ref_s, ref_b = mx.quantize(mx.array(groups).astype(dtype), group_size=group_size, bits=bits)

    words = group_size * bits // 32
    assert q.weight.dtype == mx.uint32 and q.weight.shape == (bands, K, words)
    assert q.scales.dtype == dtype and q.biases.dtype == dtype
    assert q.scales.shape == (bands, K) and q.biases.shape == (bands, K)
    assert np.array_equal(np.array(q.weight).reshape(-1, words), np.array(ref_w))
    assert np.array_equal(to_np(q.scales).reshape(-1), to_np(ref_s).reshape(-1))
    assert np.array_equal(to_np(q.biases).reshape(-1), to_np(ref_b).reshape(-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_numpy_unpacker_reproduces_dequantize(bits, group_size, dtype):
    w = random_weight(2 * group_size, 100, dtype, seed=7 * bits + group_size)
    q = zigzag_quantize(w, group_size=group_size, bits=bits)
    deq = zigzag_dequantize(q)
    assert deq.dtype == dtype and deq.shape == w.shape
    assert np.array_equal(numpy_dequantize(q), to_np(deq))
    # The codes themselves lie in [0, 2^bits).
    codes = unpack_codes(np.array(q.weight), group_size, bits)
    assert codes.min() >= 0 and codes.max() < 2**bits


@pytest.mark.parametrize("bits", (3, 5, 6))
def test_straddling_codes_are_read_across_words(bits):
    """A code that straddles two words must combine both; write known codes and read them back."""
    gs = 32
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=gs)
    codes[:: max(1, 32 // bits)] = 2**bits - 1  # make sure high bits are set at word edges
    bitstream = ((codes[:, None] >> np.arange(bits)) & 1).reshape(-1)
    words = (bitstream.reshape(-1, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)).sum(1)
    assert np.array_equal(unpack_codes(words.astype(np.uint32)[None], gs, bits)[0], codes)
    q = ZigzagWeight(
        mx.array(words.astype(np.uint32).reshape(1, 1, -1)),
        mx.array([[1.0]]),
        mx.array([[0.0]]),
        gs,
        bits,
    )
    assert np.array_equal(np.array(zigzag_dequantize(q))[:, 0], codes.astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_picks_nearest_grid_point(bits, group_size, dtype):
    """Every value dequantizes to the nearest point of its group's grid bias + scale*q.

    Inside the grid's span that is within half a step (|scale|/2). MLX snaps the grid so that 0 is
    representable, so values beyond the grid's end are clipped and may be up to one step away.
    """
    bands, K = 2, 37
    N = bands * group_size
    w = random_weight(N, K, dtype, seed=3 * bits + group_size)
    q = zigzag_quantize(w, group_size=group_size, bits=bits)
    wn = to_np(w).reshape(bands, group_size, K).transpose(0, 2, 1)  # (bands, K, gs)
    deq = to_np(zigzag_dequantize(q)).reshape(bands, group_size, K).transpose(0, 2, 1)
    s = to_np(q.scales)[..., None]
    b = to_np(q.biases)[..., None]
    grid = b[..., None] + s[..., None] * np.arange(2**bits)  # (bands, K, 1, levels)
    nearest = np.abs(wn[..., None] - grid).min(-1)
    err = np.abs(wn - deq)
    eps = {mx.float32: 2**-22, mx.float16: 2**-9, mx.bfloat16: 2**-6}[dtype]
    slack = eps * np.abs(wn).max(-1, keepdims=True)
    assert np.all(err <= nearest + slack)
    lo, hi = np.minimum(grid[..., 0], grid[..., -1]), np.maximum(grid[..., 0], grid[..., -1])
    inside = (wn >= lo) & (wn <= hi)
    assert inside.mean() > 0.5  # the half-step check below is not vacuous
    assert np.all(err[inside] <= (0.5 * np.abs(s) + slack).repeat(group_size, -1)[inside])
    assert np.all(err <= np.abs(s) + slack)


@pytest.mark.parametrize("K", (1, 33, 100))
@pytest.mark.parametrize("bits", (3, 4))
def test_k_not_multiple_of_32(K, bits):
    gs = 32
    w = random_weight(3 * gs, K, mx.float32, seed=K)
    q = zigzag_quantize(w, group_size=gs, bits=bits)
    assert q.weight.shape == (3, K, gs * bits // 32)
    assert np.array_equal(numpy_dequantize(q), to_np(zigzag_dequantize(q)))
    ref_w, _, _ = mx.quantize(w.reshape(3, gs, K).swapaxes(1, 2), group_size=gs, bits=bits)
    assert np.array_equal(np.array(q.weight), np.array(ref_w))


@pytest.mark.parametrize("bits", BITS)
def test_zigzag_weight_shape_nbytes_astype(bits):
    gs, bands, K = 64, 3, 45
    q = zigzag_quantize(random_weight(bands * gs, K, mx.float16, seed=bits), group_size=gs, bits=bits)
    assert q.shape == (bands * gs, K)
    assert q.dtype == mx.float16
    expected = bands * K * (gs * bits // 8) + 2 * bands * K * 2  # codes + fp16 scales + fp16 biases
    assert q.nbytes == expected
    q32 = q.astype(mx.float32)
    assert q32.dtype == mx.float32 and q32.shape == q.shape
    assert q32.nbytes == bands * K * (gs * bits // 8) + 2 * bands * K * 4
    assert np.array_equal(np.array(q32.weight), np.array(q.weight))
    assert q32.group_size == gs and q32.bits == bits
    assert np.array_equal(np.array(q32.scales), to_np(q.scales).astype(np.float32))
    assert np.array_equal(to_np(zigzag_dequantize(q32)), numpy_dequantize(q32))
    qb = q.astype(mx.bfloat16)
    assert qb.scales.dtype == mx.bfloat16 and qb.biases.dtype == mx.bfloat16
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        q.astype(mx.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3)], ids=str)
@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 32), (6, 128), (8, 32)])
def test_zigzag_matmul_matches_float64_reference(bits, group_size, lead, dtype):
    # The backend picks the product inside the op (CUDA's kernels and its dequantized path are
    # tested in test_cuda.py); here the CPU's per-band product.
    N, K = 2 * group_size, 70
    seed = bits + group_size + len(lead)
    q = zigzag_quantize(random_weight(N, K, dtype, seed), group_size=group_size, bits=bits)
    x = mx.random.normal((*lead, K), key=mx.random.key(seed + 1)).astype(dtype)
    y = zigzag_matmul(x, q)
    assert y.shape == (*lead, N) and y.dtype == dtype
    W = numpy_dequantize(q)
    ref = to_np(x) @ W.T
    yn = to_np(y)
    assert np.linalg.norm(yn - ref) / np.linalg.norm(ref) < REL_TOL[dtype]
    assert np.all(np.abs(yn - ref) <= 4 * REL_TOL[dtype] * np.abs(ref).max())


# ---- the "search" quantizer: same format, lower error ----------------------------------------------


def group_errors(q: ZigzagWeight, w: mx.array) -> np.ndarray:
    """Squared error of each group (band, column), float64, from the packed arrays."""
    err = (numpy_dequantize(q) - to_np(w)) ** 2  # (N, K)
    return err.reshape(q.shape[0] // q.group_size, q.group_size, -1).sum(axis=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_search_quantizer_is_never_worse_per_group(bits, group_size, dtype):
    w = random_weight(2 * group_size, 48, dtype, seed=31 * bits + group_size)
    # Heavy tails (an outlier in some groups) are where min/max wastes most of the grid.
    w = (w * mx.where(mx.random.uniform(shape=w.shape, key=mx.random.key(bits)) < 0.02, 8.0, 1.0)).astype(dtype)
    minmax = zigzag_quantize(w, group_size, bits)
    search = zigzag_quantize(w, group_size, bits, quantizer="search")
    assert search.weight.shape == minmax.weight.shape and search.weight.dtype == mx.uint32
    assert search.scales.dtype == dtype and search.biases.dtype == dtype
    codes = unpack_codes(np.array(search.weight), group_size, bits)
    assert codes.min() >= 0 and codes.max() < 2**bits
    # The packed arrays mean what the kernels read (numpy_dequantize is the format's definition).
    assert np.array_equal(numpy_dequantize(search), to_np(zigzag_dequantize(search)))
    e_search, e_minmax = group_errors(search, w), group_errors(minmax, w)
    assert np.all(e_search <= e_minmax * (1 + 1e-6) + 1e-12)
    assert e_search.sum() < 0.95 * e_minmax.sum()


def test_search_quantizer_packs_as_mx_quantize():
    # Codes of mx.quantize's own groups, packed by the search quantizer's packer, are mx.quantize's words.
    from spqt_mlx.layout import _pack_codes

    for bits in BITS:
        for gs in GROUP_SIZES:
            w = mx.random.normal((3, gs), key=mx.random.key(bits * gs))
            wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
            codes = np.rint((to_np(mx.dequantize(wq, s, b, group_size=gs, bits=bits)) - to_np(b)) / to_np(s))
            assert np.array_equal(_pack_codes(codes.astype(np.uint32), bits), np.array(wq)), (bits, gs)


def test_search_quantizer_constant_groups_and_bad_input():
    # Columns 0-2 are constant groups (the range is zero), columns 3-5 random.
    w = mx.concatenate([mx.full((64, 3), 0.25), mx.random.normal((64, 3), key=mx.random.key(2))], axis=1)
    q = zigzag_quantize(w.astype(mx.float16), 64, 4, quantizer="search")
    deq = to_np(zigzag_dequantize(q))
    assert np.all(np.isfinite(deq))
    assert np.array_equal(deq[:, :3], np.full((64, 3), 0.25))
    with pytest.raises(ValueError, match="quantizer must be one of"):
        zigzag_quantize(w, 64, 4, quantizer="nearest")
    bad = mx.array(np.where(np.arange(64 * 6).reshape(64, 6) == 5, np.nan, 1.0).astype(np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        zigzag_quantize(bad, 64, 4, quantizer="search", lazy=True)  # search always looks at the values
