"""The zigzag layout: groups of consecutive output rows of one input column (docs/format.md)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import _ext

SUPPORTED_BITS = _ext.SUPPORTED_BITS  # from kernels/contract.h
SUPPORTED_GROUP_SIZES = _ext.SUPPORTED_GROUP_SIZES
# The float dtypes the kernels take, by the names that CLIs and saved configs use.
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
FLOAT_DTYPES = tuple(DTYPES.values())


@dataclass(frozen=True)
class ZigzagWeight:
    """A zigzag-quantized (N, K) weight.

    ``weight`` is uint32 of shape (N/group_size, K, group_size*bits/32): the codes of group (b, k),
    i.e. of ``w[b*gs:(b+1)*gs, k]``, stored band-major then column. ``scales`` and ``biases`` have
    shape (N/group_size, K) and the dtype of the original weight.
    """

    weight: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        bands, K, _ = self.weight.shape
        return (bands * self.group_size, K)

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


def zigzag_quantize(w: mx.array, group_size: int = 64, bits: int = 4, *, lazy: bool = False, stream=None) -> ZigzagWeight:
    """Quantize ``w`` (N, K) into the zigzag layout.

    Each group is ``group_size`` consecutive output rows of one input column, quantized exactly as
    ``mx.quantize`` (affine mode) quantizes one group. N must be a multiple of ``group_size``.
    Non-finite values raise a ValueError. With ``lazy`` (how layers are patched, like
    ``nn.quantize``), a ``w`` that is not evaluated yet stays unevaluated: a non-finite value then
    makes its group's scale NaN, so the outputs show it, instead of raising here.
    """
    if not isinstance(w, mx.array):
        raise TypeError(f"w must be an mx.array, got {type(w).__name__}.")
    check_bits_group_size(group_size, bits)
    check_float_dtype(w.dtype, "w")
    if w.ndim != 2:
        raise ValueError(f"w must have shape (N, K), got {tuple(w.shape)}.")
    N, K = w.shape
    if K == 0 or N == 0:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}.")
    if N % group_size:
        raise ValueError(
            f"the zigzag layout groups output rows: N={N} must be a multiple of group_size={group_size}."
        )
    # mx.quantize would turn NaN and inf into finite codes and scales: a silently wrong layer.
    evaluated = not lazy or _ext.is_evaluated(w)
    if evaluated and not mx.all(mx.isfinite(w), stream=stream).item():
        raise ValueError("w has non-finite values (NaN or inf); they cannot be quantized.")
    z = w.reshape(N // group_size, group_size, K).swapaxes(1, 2)
    wq, scales, biases = mx.quantize(z, group_size=group_size, bits=bits, stream=stream)
    if not evaluated:
        # A lazy weight (a model built or loaded lazily) is not evaluated here, which would
        # materialize it: a non-finite value makes its group's scale NaN instead, so the layer's
        # outputs show it.
        finite = mx.all(mx.isfinite(z, stream=stream), axis=-1, keepdims=True, stream=stream)
        scales = mx.where(finite, scales, mx.array(float("nan"), scales.dtype), stream=stream)
    return ZigzagWeight(wq, scales.squeeze(-1), biases.squeeze(-1), group_size, bits)


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
    """The (N, K) matrix that ``qweight`` represents, in the dtype of its scales."""
    check_weight(qweight)
    N, K = qweight.shape
    return dequantize_bands(qweight, stream=stream).swapaxes(1, 2).reshape(N, K)


def check_weight(qweight) -> None:
    """Raise a clear error unless ``qweight`` is a consistent ZigzagWeight."""
    if not isinstance(qweight, ZigzagWeight):
        raise TypeError(f"expected a ZigzagWeight (from zigzag_quantize), got {type(qweight).__name__}.")
    check_bits_group_size(qweight.group_size, qweight.bits)
    w = qweight.weight
    if w.dtype != mx.uint32 or w.ndim != 3 or w.shape[2] != qweight.group_size * qweight.bits // 32:
        raise ValueError(
            f"packed weight must be uint32 of shape (N/group_size, K, {qweight.group_size * qweight.bits // 32}),"
            f" got {w.dtype} {tuple(w.shape)}."
        )
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"the packed weight {tuple(w.shape)} is empty: it needs at least one band and one column.")
    check_float_dtype(qweight.scales.dtype, "scales")
    if qweight.scales.shape != w.shape[:2] or qweight.biases.shape != w.shape[:2]:
        raise ValueError(
            f"scales and biases must have shape {tuple(w.shape[:2])}, got "
            f"{tuple(qweight.scales.shape)} and {tuple(qweight.biases.shape)}."
        )
