"""The float64 reference the zigzag tests compare with: decodes the packed arrays straight from
the bitstream described in docs/format.md, independently of MLX's dequantize."""

import mlx.core as mx
import numpy as np

BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# ||y - ref|| / ||ref|| for products accumulated in float32 and rounded once to the output dtype.
REL_TOL = {mx.float32: 1e-5, mx.float16: 5e-3, mx.bfloat16: 3e-2}


def to_np(a: mx.array) -> np.ndarray:
    """float64 numpy copy of any float MLX array (bfloat16 included)."""
    return np.array(a.astype(mx.float32)).astype(np.float64)


def unpack_codes(words: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """Codes (..., gs) of an LSB-first bitstream: bit j is bit j % 32 of word j // 32."""
    stream = (words.astype(np.uint32)[..., :, None] >> np.arange(32, dtype=np.uint32)) & 1
    stream = stream.reshape(*words.shape[:-1], -1)[..., : group_size * bits]
    return stream.reshape(*words.shape[:-1], group_size, bits).astype(np.int64) @ (1 << np.arange(bits))


def dense_weight64(q) -> np.ndarray:
    """(N, K) float64 weight scale * code + bias, straight from the packed arrays."""
    codes = unpack_codes(np.array(q.weight), q.group_size, q.bits).astype(np.float64)
    deq = to_np(q.scales)[..., None] * codes + to_np(q.biases)[..., None]
    return deq.transpose(0, 2, 1).reshape(q.shape)


def gap_threshold(values: np.ndarray, quantile: float) -> float:
    """A threshold near ``quantile`` of |values| in the widest gap around it, so that a rounding
    difference in the last bit cannot move a column across it."""
    a = np.sort(np.abs(values.ravel()))
    lo, hi = int(len(a) * (quantile - 0.1)), int(len(a) * (quantile + 0.1))
    i = lo + int(np.argmax(np.diff(a[lo:hi + 1])))
    return float((a[i] + a[i + 1]) / 2)


# Relative error a product may have against float64, by the dtype it ran in.
TOL = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1.5e-2}


def check_close(y, ref, dtype):
    """y is finite, has ref's shape and lies within TOL[dtype] of ref (relative Frobenius norm)."""
    y = np.array(y.astype(mx.float32), dtype=np.float64)
    assert y.shape == ref.shape
    assert np.all(np.isfinite(y))
    err = np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err < TOL[dtype], err
