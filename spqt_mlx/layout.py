"""The zigzag layout: groups of consecutive output rows of one input column (docs/format.md)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import _ext

SUPPORTED_BITS = _ext.SUPPORTED_BITS  # from kernels/contract.h
SUPPORTED_GROUP_SIZES = _ext.SUPPORTED_GROUP_SIZES
# The float dtypes the kernels take, by the names that CLIs and saved configs use.
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
FLOAT_DTYPES = tuple(DTYPES.values())
# How a group's scale and bias are chosen (its codes follow from them):
#   "minmax": as mx.quantize, from the group's minimum and maximum;
#   "search": the lowest squared error over a range of scales around min/max, each refitted by
#             least squares (as llama.cpp's K-quants search), never worse than "minmax";
#   "gptq":   GPTQ in zigzag order: column by column, each group fitted as "search" fits it, the
#             rounding error spread over the later columns by the layer's input statistics
#             (spqt_mlx.gptq; needs calibration text).
QUANTIZERS = ("minmax", "search", "gptq")
# The command-line tools also take "auto" and use it by default: "gptq" for models up to a size,
# "search" above it (spqt_mlx.patch.choose_quantizer; BENCHMARKS.md measures all three). The
# library's default stays "minmax", which matches mx.quantize group for group and quantizes lazily.
TOOL_QUANTIZERS = ("auto", *QUANTIZERS)
DEFAULT_QUANTIZER = "auto"


@dataclass(frozen=True)
class ZigzagWeight:
    """A zigzag-quantized (N, K) weight, or the (E, N, K) weights of E experts.

    ``weight`` is uint32 of shape (N/group_size, K, group_size*bits/32): the codes of group (b, k),
    i.e. of ``w[b*gs:(b+1)*gs, k]``, stored band-major then column. ``scales`` and ``biases`` have
    shape (N/group_size, K) and the dtype of the original weight. Experts add a leading axis of E
    to all three, each expert's bands whole and in order.
    """

    weight: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, K), or (E, N, K) for the stacked weights of E experts."""
        *experts, bands, K, _ = self.weight.shape
        return (*experts, bands * self.group_size, K)

    @property
    def dtype(self) -> mx.Dtype:
        return self.scales.dtype

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales.nbytes + self.biases.nbytes

    def astype(self, dtype: mx.Dtype) -> "ZigzagWeight":
        """The same codes with scales and biases in another float dtype."""
        check_float_dtype(dtype, "dtype")
        return ZigzagWeight(
            self.weight, self.scales.astype(dtype), self.biases.astype(dtype), self.group_size, self.bits
        )


def check_quantizer(quantizer, tool: bool = False) -> None:
    """A ValueError unless ``quantizer`` is one of :data:`QUANTIZERS` (with ``tool``, of
    :data:`TOOL_QUANTIZERS`, which the command-line tools take)."""
    known = TOOL_QUANTIZERS if tool else QUANTIZERS
    if not isinstance(quantizer, str) or quantizer not in known:
        raise ValueError(f"quantizer must be one of {known}, got {quantizer!r}.")


def check_bits_group_size(group_size: int, bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}.")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}.")


def dtype_from_name(name: str) -> mx.Dtype:
    """The MLX dtype called ``name`` ("float32", "float16" or "bfloat16"); ValueError otherwise."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}.")
    return DTYPES[name]


def check_float_dtype(dtype, what: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {dtype}.")


def zigzag_quantize(
    w: mx.array, group_size: int = 64, bits: int = 4, *, quantizer: str = "minmax", lazy: bool = False, stream=None,
    hessian=None,
) -> ZigzagWeight:
    """Quantize ``w`` (N, K), or the (E, N, K) weights of E experts, into the zigzag layout.

    Each group is ``group_size`` consecutive output rows of one input column. With the "minmax"
    quantizer a group is quantized exactly as ``mx.quantize`` (affine mode) quantizes one group;
    "search" picks each group's scale and bias for the lowest squared error (:data:`QUANTIZERS`),
    with codes in the same format. N must be a multiple of ``group_size``. Non-finite values raise
    a ValueError. With ``lazy`` (how layers are patched, like ``nn.quantize``), a ``w`` that is not
    evaluated yet stays unevaluated: a non-finite value then makes its group's scale NaN, so the
    outputs show it, instead of raising here. "search" and "gptq" always evaluate ``w``. "gptq"
    needs ``hessian``, the (K, K) second moment of the layer's inputs
    (:func:`spqt_mlx.gptq.input_hessians`), and a single (N, K) weight.
    """
    check_quantizer(quantizer)
    if (quantizer == "gptq") != (hessian is not None):
        raise ValueError("the gptq quantizer, and only it, takes the hessian of the layer's inputs "
                         "(spqt_mlx.gptq.input_hessians).")
    check_bits_group_size(group_size, bits)
    _check_array(w, quantizer)
    if w.ndim == 3:
        # Experts: the bands of each are whole (N is a multiple of group_size), so quantizing the
        # experts stacked row-wise gives every expert exactly its own groups.
        E, N, K = w.shape
        if E == 0:
            raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}.")
        q = zigzag_quantize(w.reshape(E * N, K), group_size, bits, quantizer=quantizer, lazy=lazy, stream=stream)
        return ZigzagWeight(q.weight.reshape(E, N // group_size, *q.weight.shape[1:]),
                            q.scales.reshape(E, N // group_size, K), q.biases.reshape(E, N // group_size, K),
                            group_size, bits)
    evaluated = _check_single(w, group_size, lazy=lazy, quantizer=quantizer, stream=stream)
    if quantizer == "gptq":
        return _gptq_weights([w], [hessian], group_size, bits, stream)[0]
    N, K = w.shape
    z = w.reshape(N // group_size, group_size, K).swapaxes(1, 2)
    if quantizer == "search":
        with mx.stream(stream) if stream is not None else contextlib.nullcontext():
            wq, scales, biases = _search_groups(z, bits)
    else:
        wq, scales, biases = mx.quantize(z, group_size=group_size, bits=bits, stream=stream)
    if not evaluated:
        # A lazy weight (a model built or loaded lazily) is not evaluated here, which would
        # materialize it: a non-finite value makes its group's scale NaN instead, so the layer's
        # outputs show it.
        finite = mx.all(mx.isfinite(z, stream=stream), axis=-1, keepdims=True, stream=stream)
        scales = mx.where(finite, scales, mx.array(float("nan"), scales.dtype), stream=stream)
    return ZigzagWeight(wq, scales.squeeze(-1), biases.squeeze(-1), group_size, bits)


def _check_array(w, quantizer: str) -> None:
    """A TypeError or ValueError for what no quantizer takes: not an mx.array, not a float dtype,
    or (for "gptq") the stacked weights of experts."""
    if not isinstance(w, mx.array):
        raise TypeError(f"w must be an mx.array, got {type(w).__name__}.")
    check_float_dtype(w.dtype, "w")
    if w.ndim == 3 and quantizer == "gptq":
        raise ValueError("the gptq quantizer takes one (N, K) weight; quantize experts with 'search'.")


def _check_single(w: mx.array, group_size: int, *, lazy: bool, quantizer: str, stream) -> bool:
    """The checks of one (N, K) weight: a ValueError for another shape, an empty one, N not a
    multiple of ``group_size`` or (where it is evaluated) a non-finite value. Returns whether ``w``
    is evaluated here (a lazy "minmax" weight that is not evaluated yet stays so)."""
    if w.ndim != 2:
        raise ValueError(f"w must have shape (N, K) or (E, N, K) for experts, got {tuple(w.shape)}.")
    N, K = w.shape
    if K == 0 or N == 0:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}.")
    if N % group_size:
        raise ValueError(
            f"the zigzag layout groups output rows: N={N} must be a multiple of group_size={group_size}."
        )
    # mx.quantize would turn NaN and inf into finite codes and scales: a silently wrong layer.
    evaluated = not lazy or quantizer != "minmax" or _ext.is_evaluated(w)
    if evaluated and not mx.all(mx.isfinite(w), stream=stream).item():
        raise ValueError("w has non-finite values (NaN or inf); they cannot be quantized.")
    return evaluated


def _gptq_weights(weights, hessians, group_size: int, bits: int, stream, progress: bool = False) -> list[ZigzagWeight]:
    """The checked (N, K) ``weights`` quantized by GPTQ, weights of one shape walked together."""
    from .gptq import gptq_quantize_many

    with mx.stream(stream) if stream is not None else contextlib.nullcontext():
        results = gptq_quantize_many(weights, hessians, group_size, bits, progress=progress)
    out = []
    for w, (codes, scales, biases) in zip(weights, results):
        N, K = w.shape
        packed = _pack_codes(codes.reshape(-1, group_size), bits).reshape(N // group_size, K, -1)
        out.append(ZigzagWeight(mx.array(packed), scales, biases, group_size, bits))
    return out


def zigzag_quantize_many(
    weights: Mapping[str, mx.array], group_size: int = 64, bits: int = 4, *, quantizer: str = "minmax",
    hessians: Mapping | None = None, stream=None, progress: bool = False,
) -> dict[str, ZigzagWeight]:
    """``zigzag_quantize`` of each named (N, K) weight, ``{name: ZigzagWeight}``; "gptq" takes
    ``hessians``, a mapping holding each name's (K, K) input statistics. With "gptq", weights of
    one shape and dtype are quantized together: each operation of GPTQ's column walk then covers all
    of them, which pays an operation's fixed cost once for the batch (what bounds the walk on small
    layers). Every weight gets what it would get alone. A ValueError names the weight it is about.
    ``progress`` shows GPTQ's progress over the weights."""
    check_quantizer(quantizer)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must map names to arrays, got {type(weights).__name__}.")
    if (quantizer == "gptq") != (hessians is not None):
        raise ValueError("the gptq quantizer, and only it, takes hessians (spqt_mlx.gptq.input_hessians).")
    check_bits_group_size(group_size, bits)
    out = {}
    for name, w in weights.items():
        try:
            if quantizer != "gptq":
                out[name] = zigzag_quantize(w, group_size, bits, quantizer=quantizer, stream=stream)
                continue
            _check_array(w, quantizer)
            _check_single(w, group_size, lazy=False, quantizer=quantizer, stream=stream)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    if quantizer != "gptq":
        return out
    from .gptq import check_hessians

    check_hessians(hessians, list(weights), {name: w.shape[1] for name, w in weights.items()})
    names = list(weights)
    quantized = _gptq_weights([weights[n] for n in names], [hessians[n] for n in names], group_size, bits, stream,
                              progress)
    return dict(zip(names, quantized))


# The search's candidate scales: (2^bits - 1 + step) codes over the group's range. 21 steps measured
# 0.2 % lower weight error than these 11, at twice the time.
_SEARCH_STEPS = tuple(float(v) for v in np.linspace(-1.0, 1.0, 11))


@functools.lru_cache(maxsize=None)
def group_fitter(bits: int, dtype: mx.Dtype):
    """A ``fit(v) -> (codes, scales, biases, dequantized)`` for groups ``v`` (G, group_size)
    in float32: each group's codes (float32), scale and bias ((G, 1), rounded to ``dtype``) with the
    lowest squared error among mx.quantize's (min/max, of ``v`` in ``dtype``) and the search's
    candidate scales from (2^bits - 2)/range to 2^bits/range with the bias at the minimum, each
    refitted by least squares on its codes. Errors are those of the format's own dequantization
    (scale * code rounded to ``dtype``, plus the bias, rounded), which ``dequantized`` holds. Of equal
    errors the first candidate wins, so min/max keeps its ties. The "search" quantizer fits every
    group with it, "gptq" each column's groups as GPTQ has updated them."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}.")
    check_float_dtype(dtype, "dtype")
    n = (1 << bits) - 1

    def rounded(a):
        return a.astype(dtype).astype(mx.float32)

    def fit(v):
        gs = v.shape[-1]

        def scored(q, s, b):
            deq = rounded(rounded(s * q) + b)
            return q, s, b, deq, mx.sum(mx.square(deq - v), axis=-1, keepdims=True)

        wq, s0, b0 = mx.quantize(v.astype(dtype), group_size=gs, bits=bits)
        s0, b0 = s0.astype(mx.float32), b0.astype(mx.float32)
        q0 = mx.dequantize(wq, s0.astype(dtype), b0.astype(dtype), group_size=gs, bits=bits).astype(mx.float32)
        q0 = mx.round((q0 - b0) / mx.where(s0 == 0, 1.0, s0))
        best = scored(mx.where(s0 == 0, 0.0, mx.clip(q0, 0, n)), s0, b0)
        lo = mx.min(v, axis=-1, keepdims=True)
        span = mx.maximum(mx.max(v, axis=-1, keepdims=True) - lo, 1e-30)
        mv = mx.mean(v, axis=-1, keepdims=True)
        # Every candidate at once, on a leading axis: (steps, G, group_size).
        steps = mx.array(_SEARCH_STEPS)[:, None, None]
        q = mx.clip(mx.round((v - lo) * ((n + steps) / span)), 0, n)
        mq = mx.mean(q, axis=-1, keepdims=True)
        var = mx.mean(mx.square(q - mq), axis=-1, keepdims=True)
        cov = mx.mean((q - mq) * (v - mv), axis=-1, keepdims=True)
        s = mx.where(var > 0, cov / mx.maximum(var, 1e-30), 0.0)
        s, b = rounded(s), rounded(mv - s * mq)
        q = mx.clip(mx.round((v - b) / mx.where(s == 0, 1.0, s)), 0, n)
        cand = scored(mx.where(s == 0, 0.0, q), s, b)
        # The first of equal errors wins: min/max first, then the steps in order.
        pick = mx.argmin(mx.concatenate([best[4][None], cand[4]]), axis=0, keepdims=True)
        return tuple(mx.take_along_axis(mx.concatenate([o[None], c]), pick, axis=0)[0] for c, o in zip(cand, best[:4]))

    return fit


def _search_groups(z, bits, chunk=1 << 14):
    """Codes, scales and biases of the groups ``z`` (..., group_size) fitted by :func:`group_fitter`,
    on the current stream (zigzag_quantize enters the one it is given)."""
    dtype = z.dtype
    gs = z.shape[-1]
    v_all = z.reshape(-1, gs)
    fit = group_fitter(bits, dtype)
    codes, scales, biases = [], [], []
    for start in range(0, v_all.shape[0], chunk):
        q, s, b, _ = fit(v_all[start:start + chunk].astype(mx.float32))
        mx.eval(q, s, b)
        codes.append(np.array(q).astype(np.uint32))
        scales.append(s)
        biases.append(b)
    shape = z.shape[:-1]
    packed = mx.array(_pack_codes(np.concatenate(codes), bits)).reshape(*shape, gs * bits // 32)
    return (packed, mx.concatenate(scales).astype(dtype).reshape(*shape, 1),
            mx.concatenate(biases).astype(dtype).reshape(*shape, 1))


def _pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """(G, group_size) codes packed as mx.quantize packs a group: an LSB-first bitstream in uint32 words."""
    G, gs = q.shape
    bitplanes = (q[:, :, None] >> np.arange(bits, dtype=np.uint32)) & 1  # (G, gs, bits), LSB first
    packed = np.packbits(bitplanes.astype(np.uint8).reshape(G, gs * bits), axis=-1, bitorder="little")
    return packed.view("<u4").reshape(G, gs * bits // 32)


def dequantize_bands(qweight: ZigzagWeight, *, stream=None) -> mx.array:
    """The weight band by band, (N/group_size, K, group_size): element (b, k, r) is w[b*gs + r, k]."""
    return mx.dequantize(
        qweight.weight,
        qweight.scales[..., None],
        qweight.biases[..., None],
        group_size=qweight.group_size,
        bits=qweight.bits,
        stream=stream,
    )


def zigzag_dequantize(qweight: ZigzagWeight, *, stream=None) -> mx.array:
    """The (N, K) matrix (experts: (E, N, K)) that ``qweight`` represents, in the dtype of its scales."""
    check_weight(qweight)
    return dequantize_bands(qweight, stream=stream).swapaxes(-1, -2).reshape(qweight.shape)


def check_weight(qweight) -> None:
    """Raise a clear error unless ``qweight`` is a consistent ZigzagWeight."""
    if not isinstance(qweight, ZigzagWeight):
        raise TypeError(f"expected a ZigzagWeight (from zigzag_quantize), got {type(qweight).__name__}.")
    check_bits_group_size(qweight.group_size, qweight.bits)
    w = qweight.weight
    if w.dtype != mx.uint32 or w.ndim not in (3, 4) or w.shape[-1] != qweight.group_size * qweight.bits // 32:
        raise ValueError(
            f"packed weight must be uint32 of shape ([E,] N/group_size, K, {qweight.group_size * qweight.bits // 32}),"
            f" got {w.dtype} {tuple(w.shape)}."
        )
    if 0 in w.shape[:-1]:
        raise ValueError(f"the packed weight {tuple(w.shape)} is empty: it needs at least one band and one column.")
    check_float_dtype(qweight.scales.dtype, "scales")
    if qweight.scales.shape != w.shape[:-1] or qweight.biases.shape != w.shape[:-1]:
        raise ValueError(
            f"scales and biases must have shape {tuple(w.shape[:-1])}, got "
            f"{tuple(qweight.scales.shape)} and {tuple(qweight.biases.shape)}."
        )
