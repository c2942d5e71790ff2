"""Zigzag GEMV and active-column collection: thin wrappers over the C++ ops in dispatch/."""

from __future__ import annotations

import math

import mlx.core as mx

from . import _ext
from ._ext import ActiveKind
from .layout import ZigzagWeight, check_weight


class ActiveColumns:
    """The active input columns of one token, as collected on the device.

    ``packed`` is int32 of shape (K + 1,): ``packed[0]`` is the count n, ``packed[1:n+1]`` the
    active columns in ascending order. Nothing is computed until something reads it; handed to
    ``zigzag_gemv`` together with the ``x`` it came from, the collection is fused into the GEMV
    and ``packed`` is never built, so a sparse layer costs one op, not two.
    """

    __slots__ = ("_packed", "x", "threshold", "_stream")

    def __init__(self, packed: mx.array | None, x: mx.array | None, threshold: mx.array | None, *, stream=None):
        self._packed = packed
        self.x = x
        self.threshold = threshold
        self._stream = stream

    @property
    def packed(self) -> mx.array:
        if self._packed is None:
            self._packed = _ext.collect_active(self.x, self.threshold, stream=self._stream)
        return self._packed

    @property
    def count(self) -> mx.array:
        """Number of active columns, as a lazy int32 scalar."""
        return self.packed[0]

    def indices(self) -> mx.array:
        """The active columns as an int32 array of length n (evaluates, so it syncs with the device)."""
        n = self.count.item()
        return self.packed[1 : n + 1]


def collect_active(x: mx.array, threshold, *, stream=None) -> ActiveColumns:
    """Columns k of a single-token activation ``x`` (shape (..., K), one row) with |x[k]| > threshold.

    ``threshold`` is a scalar or an array of one threshold per column. Computed inside the graph,
    with no host round-trip, and only when the list itself is used (see ``ActiveColumns``). A
    number must be finite (ValueError otherwise). An array is not inspected, since that would
    sync with the device on every call: a NaN entry in it makes its column inactive (no
    comparison with NaN holds), as if the threshold were infinite.
    """
    if not isinstance(x, mx.array):
        raise TypeError(f"x must be an mx.array, got {type(x).__name__}.")
    threshold = _threshold_array(threshold)
    _ext.check_collect_active(x, threshold)
    return ActiveColumns(None, x, threshold, stream=stream)


def _threshold_array(threshold) -> mx.array:
    """A threshold argument as an array: an array as given (not inspected), a finite number as float32."""
    if isinstance(threshold, mx.array):
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number or an mx.array, got {type(threshold).__name__}.")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}.")
    return mx.array(threshold, dtype=mx.float32)


def zigzag_gemv(
    x: mx.array,
    qweight: ZigzagWeight,
    *,
    indices: mx.array | ActiveColumns | None = None,
    threshold: float | mx.array | None = None,
    validate: bool = False,
    stream=None,
) -> mx.array:
    """``x @ W.T`` for the zigzag-quantized W, over the active columns only.

    Args:
        x: activations of shape (..., K), in the dtype of ``qweight.scales``.
        qweight: the ``ZigzagWeight`` from ``zigzag_quantize``.
        indices: ``None`` for every column; an integer array of active columns (any count, any
            order; an index listed twice counts twice); or the ``ActiveColumns`` of
            ``collect_active``. The result equals ``x[..., idx] @ W[:, idx].T``. Kernels skip
            entries outside [0, K) instead of reading out of bounds.
        threshold: instead of ``indices``, a number or an array of one threshold per column:
            every row of ``x`` (one token, or the current tokens of a batch of sequences) takes
            its own columns with ``|x| > threshold``, collected inside the kernel. The kernels
            read the union of the rows' columns once for all rows. Array entries are not
            inspected (a NaN makes its column inactive, see ``collect_active``).
        validate: evaluate a plain ``indices`` array now and raise ``IndexError`` for entries
            outside [0, K) instead of skipping them (this syncs with the device).
    """
    if not isinstance(x, mx.array):
        raise TypeError(f"x must be an mx.array, got {type(x).__name__}.")
    _single(qweight)
    args = (x, qweight.weight, qweight.scales, qweight.biases)
    meta = dict(group_size=qweight.group_size, bits=qweight.bits, stream=stream)
    if threshold is not None:
        if indices is not None:
            raise ValueError("pass indices or threshold, not both.")
        return _ext.zigzag_gemv(*args, _threshold_array(threshold), ActiveKind.Threshold, **meta)
    if indices is None:
        return _ext.zigzag_gemv(*args, None, ActiveKind.Dense, **meta)
    if isinstance(indices, ActiveColumns):
        if indices.x is x:
            return _ext.zigzag_gemv(*args, indices.threshold, ActiveKind.Threshold, **meta)
        return _ext.zigzag_gemv(*args, indices.packed, ActiveKind.Packed, **meta)
    if not isinstance(indices, mx.array):
        raise TypeError(f"indices must be an mx.array or ActiveColumns, got {type(indices).__name__}.")
    if not mx.issubdtype(indices.dtype, mx.integer):
        raise TypeError(f"indices must be an integer array, got {indices.dtype}.")
    if validate and indices.size:
        K = qweight.shape[1]
        lo, hi = mx.min(indices).item(), mx.max(indices).item()
        if lo < 0 or hi >= K:
            raise IndexError(f"indices must lie in [0, {K}), got values in [{lo}, {hi}].")
    return _ext.zigzag_gemv(*args, indices, ActiveKind.Indices, **meta)


def zigzag_gather_gemv(
    x: mx.array,
    qweight: ZigzagWeight,
    experts: mx.array,
    *,
    threshold: float | mx.array | None = None,
    validate: bool = False,
    stream=None,
) -> mx.array:
    """The experts' product of a mixture-of-experts layer: row r is ``x_r @ W[experts[r]].T``.

    Args:
        x: activations of shape (..., K) in the dtype of ``qweight.scales``, with R_x rows.
        qweight: the stacked experts, ``zigzag_quantize`` of an (E, N, K) weight.
        experts: integer expert ids, any shape, with R entries, a multiple of R_x: each row of x
            feeds as many consecutive entries (the k experts a token is routed to share its input).
        threshold: ``None`` for every column; a number, or an array of one threshold per expert
            (E,): each row reads only the columns with ``|x| > threshold`` of its expert,
            collected inside the kernel.
        validate: evaluate ``experts`` now and raise ``IndexError`` for ids outside [0, E) (this
            syncs with the device); otherwise such a row reads nothing and is 0.

    Returns:
        An array of shape ``experts.shape + (N,)``.
    """
    if not isinstance(x, mx.array):
        raise TypeError(f"x must be an mx.array, got {type(x).__name__}.")
    if not isinstance(experts, mx.array):
        raise TypeError(f"experts must be an mx.array, got {type(experts).__name__}.")
    check_weight(qweight)
    if qweight.weight.ndim != 4:
        raise ValueError("qweight holds one weight, not experts: use zigzag_gemv (or quantize an (E, N, K) weight).")
    if validate and experts.size and mx.issubdtype(experts.dtype, mx.integer):
        E = qweight.shape[0]
        lo, hi = mx.min(experts).item(), mx.max(experts).item()
        if lo < 0 or hi >= E:
            raise IndexError(f"experts must lie in [0, {E}), got values in [{lo}, {hi}].")
    t = None if threshold is None else _threshold_array(threshold)
    return _ext.zigzag_gather_gemv(x, qweight.weight, qweight.scales, qweight.biases, experts, t,
                                   qweight.group_size, qweight.bits, stream=stream)


def _single(qweight: ZigzagWeight) -> None:
    check_weight(qweight)
    if qweight.weight.ndim != 3:
        raise ValueError("qweight holds the weights of several experts: use zigzag_gather_gemv.")


def zigzag_matmul(x: mx.array, qweight: ZigzagWeight, *, stream=None) -> mx.array:
    """Dense ``x @ W.T`` for any number of rows: the path for prefill.

    On CUDA, float16 and bfloat16 run a tensor-core kernel that reads the zigzag layout directly.
    Elsewhere band b of the layout, an MLX-quantized (K, group_size) matrix with one group per row,
    goes through MLX's quantized matmul (all bands as one batched call); float32 on CUDA through a
    transient dequantized copy (in TF32 where MLX's ``MLX_ENABLE_TF32`` says so). Single tokens
    are cheaper through ``zigzag_gemv``.
    """
    if not isinstance(x, mx.array):
        raise TypeError(f"x must be an mx.array, got {type(x).__name__}.")
    _single(qweight)
    return _ext.zigzag_matmul(x, qweight.weight, qweight.scales, qweight.biases, qweight.group_size, qweight.bits,
                              stream=stream)
