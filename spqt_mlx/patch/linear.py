"""ZigzagLinear: a drop-in for ``nn.Linear`` whose single-token products skip inactive input columns."""

from __future__ import annotations

import math
import numbers

import mlx.core as mx
import mlx.nn as nn

from ..layout import FLOAT_DTYPES, ZigzagWeight, check_bits_group_size, check_float_dtype, zigzag_dequantize, zigzag_quantize
from .. import _ext
from ..ops import ActiveKind

# How many decode steps a layer's lazy statistics may accumulate before they are scheduled for
# evaluation; bounds the graph (and the activations it keeps alive) without a host sync.
_STATS_FLUSH_EVERY = 32


# How a sparse decode step picks its input columns: "teal" keeps column j where |x_j| > t (TEAL);
# "wina" where |x_j| * ||W[:, j]|| > t, the column's size in the output (WINA, arXiv 2505.19427),
# run as the per-column threshold t / ||W[:, j]||.
CRITERIA = ("teal", "wina")
DEFAULT_CRITERION = "teal"


def check_criterion(criterion) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    return criterion


# Products of up to this many rows run the GEMV kernels (CUDA's tensor-core kernel reads the weight
# once per pass of 4 rows, the other kernels once per row); more rows go through zigzag_matmul.
GEMV_MAX_ROWS = 16


def _sparse_decode(x: mx.array, threshold_value: float) -> bool:
    """Whether a call runs sparse: a positive threshold, and a decode step (one token, or one
    token for each sequence of a batch: x of shape (..., B, 1, K))."""
    return threshold_value > 0 and (x.size == x.shape[-1] or x.shape[-2] == 1)


def zigzag_product(x, weight, scales, biases, group_size, bits, threshold_value, threshold, *fusion):
    """``x @ W.T`` as a layer runs it. A decode step (one token, or one token for each sequence of
    a batch: x of shape (..., B, 1, K)) with a positive threshold is sparse, every row taking its
    own active columns: up to GEMV_MAX_ROWS rows in the sparse GEMV (collected inside the kernel),
    more through ``zigzag_matmul`` with each row's other entries zeroed, so that a sequence's
    result does not depend on the size of its batch. Other products of a few rows run the dense
    GEMV, longer ones (prefill) ``zigzag_matmul``. ``fusion`` (prologue, norm weight, eps,
    residual: see ``_ext.zigzag_gemv``) folds a decoder block's neighbours into the GEMV; the
    fused blocks send only steps of up to GEMV_MAX_ROWS rows."""
    rows = x.size // x.shape[-1] if x.shape[-1] else 0
    decode = _sparse_decode(x, threshold_value)
    if 0 < rows <= GEMV_MAX_ROWS:
        if decode:
            return _ext.zigzag_gemv(x, weight, scales, biases, threshold, ActiveKind.Threshold, group_size, bits,
                                    *fusion)
        return _ext.zigzag_gemv(x, weight, scales, biases, None, ActiveKind.Dense, group_size, bits, *fusion)
    if decode:
        x = mx.where(mx.abs(x) > threshold, x, mx.zeros_like(x))
    return _ext.zigzag_matmul(x, weight, scales, biases, group_size, bits)


_last_cast: list = [None, None, None]  # (x, dtype, x cast to dtype)


def _cast(x: mx.array, dtype: mx.Dtype) -> mx.array:
    """``x.astype(dtype)``, the same array again for the same ``x``: siblings that read one input
    (q/k/v, gate/up) must still see one array to run stacked (fused.py)."""
    if _last_cast[0] is not x or _last_cast[1] != dtype:
        _last_cast[:] = [x, dtype, x.astype(dtype)]
    return _last_cast[2]


def check_threshold(value) -> float:
    """A layer threshold as a float, or a TypeError/ValueError saying what is wrong with it."""
    if isinstance(value, mx.array):
        if value.size != 1:
            raise ValueError(f"threshold must be a scalar, got shape {tuple(value.shape)}.")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"threshold must be a number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"threshold must be finite and >= 0, got {value}.")
    return value


class ActiveColumnStats:
    """Counts of the active input columns of a zigzag layer's sparse decode rows, kept lazily on the
    device (ZigzagLinear, and ZigzagSwitchLinear per expert row)."""

    # Decode rows a token makes in the layer, each reading one weight: 1 for a projection, the
    # experts a token is routed to for ZigzagSwitchLinear.
    rows_per_token = 1

    def record_stats(self, enabled: bool = True) -> None:
        """Start (and reset) or stop counting active columns of sparse decode tokens (single
        tokens, and every row of a batch's decode step).

        Counts accumulate lazily on the device; only :meth:`stats` reads them back. Counting adds a
        small count per call (the fused kernel never writes its active list), so leave it off when
        timing kernels.
        """
        self._stats_on = bool(enabled)
        if enabled:
            self._active_total = mx.array(0, dtype=mx.int32)
            self._stats_calls = 0
            self._stats_records = 0

    def _record(self, count: mx.array, rows: int = 1) -> None:
        if self._stats_records and self._stats_records % _STATS_FLUSH_EVERY == 0:
            # Earlier steps are already scheduled, so this does not wait for the current one.
            mx.async_eval(self._active_total)
        self._active_total = self._active_total + count
        self._stats_calls += rows
        self._stats_records += 1

    def stats(self) -> tuple[int, int]:
        """(sparse decode rows, total active columns over them) since ``record_stats``.

        Reads the device counters, so it synchronizes; call it after generation.
        """
        if "_active_total" not in self:
            return 0, 0
        return self._stats_calls, int(self._active_total.item())


class ZigzagLinear(ActiveColumnStats, nn.Module):
    """A linear layer over a zigzag-quantized weight with a per-layer activation threshold.

    Parameters are the arrays of a :class:`~spqt_mlx.ZigzagWeight` (``weight``, ``scales``,
    ``biases``) plus an optional ``bias``, so ``save_weights``/``load_weights`` and mlx-lm's
    ``save_model`` handle them like any other layer. The threshold is not a parameter: it is
    calibration state, read and written with :attr:`threshold`.

    Decode calls with a positive threshold run the sparse GEMV: a single token (``x.size == K``),
    or the current tokens of a batch of up to ``GEMV_MAX_ROWS`` sequences (x of shape (B, 1, K)),
    each row taking its input columns with ``|x| > threshold``, collected inside the kernel with
    no host round trip. Every other call (prefill, threshold 0) is dense.
    """

    def __init__(self, qweight: ZigzagWeight, bias: mx.array | None = None, threshold: float = 0.0):
        super().__init__()
        if not isinstance(qweight, ZigzagWeight):
            raise TypeError(f"qweight must be a ZigzagWeight, got {type(qweight).__name__}.")
        self.weight = qweight.weight
        self.scales = qweight.scales
        self.biases = qweight.biases
        self.group_size = qweight.group_size
        self.bits = qweight.bits
        self._column_scale = None  # set_column_scale: the criterion's weight on each input column
        if bias is not None:
            if not isinstance(bias, mx.array) or bias.shape != (qweight.shape[0],):
                raise ValueError(f"bias must be an mx.array of shape ({qweight.shape[0]},).")
            self.bias = bias
        self.threshold = threshold
        self._stats_on = False
        self._shared = None  # a SharedInputGroup once fuse_shared_inputs stacked this layer's weight
        # Quantized weights are not trained (as in nn.QuantizedLinear); gradients still flow to x,
        # so adapters (LoRA) train over a zigzag model.
        self.freeze()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64, bits: int = 4, quantizer: str = "minmax",
                    hessian=None) -> "ZigzagLinear":
        """Quantize the float weight of an ``nn.Linear`` (a single rounding: the preferred source)
        with ``quantizer`` (:data:`spqt_mlx.layout.QUANTIZERS`; "gptq" takes the ``hessian`` of
        the layer's inputs)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}.")
        bias = linear.bias if "bias" in linear else None
        return cls(zigzag_quantize(linear.weight, group_size, bits, quantizer=quantizer, lazy=True, hessian=hessian),
                   bias)

    @staticmethod
    def source_weight(module: nn.Linear | nn.QuantizedLinear) -> mx.array:
        """The float weight that :meth:`from_linear` or :meth:`from_quantized` quantizes: an
        ``nn.Linear``'s own, or an ``nn.QuantizedLinear``'s dequantized (float32 where the
        dequantized dtype is not a float format the kernels take)."""
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            raise TypeError(f"expected an nn.Linear or nn.QuantizedLinear, got {type(module).__name__}.")
        if isinstance(module, nn.Linear):
            return module.weight
        w = mx.dequantize(
            module.weight,
            module.scales,
            module.get("biases"),
            group_size=module.group_size,
            bits=module.bits,
            mode=module.mode,
        )
        return w if w.dtype in (mx.float32, mx.float16, mx.bfloat16) else w.astype(mx.float32)

    @classmethod
    def from_quantized(
        cls, qlinear: nn.QuantizedLinear, group_size: int | None = None, bits: int | None = None,
        quantizer: str = "minmax", hessian=None,
    ) -> "ZigzagLinear":
        """Re-quantize an ``nn.QuantizedLinear`` into the zigzag layout.

        The weight is dequantized and quantized again along the other axis, so it is rounded a
        second time: expect a somewhat larger error than quantizing the original float weights
        with :meth:`from_linear`, which is preferred whenever they are available. ``group_size``
        and ``bits`` default to the layer's own.
        """
        if not isinstance(qlinear, nn.QuantizedLinear):
            raise TypeError(f"expected an nn.QuantizedLinear, got {type(qlinear).__name__}.")
        w = cls.source_weight(qlinear)
        group_size = qlinear.group_size if group_size is None else group_size
        bits = qlinear.bits if bits is None else bits
        bias = qlinear.bias if "bias" in qlinear else None
        return cls(zigzag_quantize(w, group_size, bits, quantizer=quantizer, lazy=True, hessian=hessian), bias)

    @classmethod
    def empty(
        cls,
        input_dims: int,
        output_dims: int,
        *,
        bias: bool = False,
        group_size: int = 64,
        bits: int = 4,
        dtype: mx.Dtype = mx.float32,
    ) -> "ZigzagLinear":
        """A zero-filled layer of the right shapes, to be filled with ``load_weights``."""
        check_bits_group_size(group_size, bits)
        for name, value in (("input_dims", input_dims), ("output_dims", output_dims)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer, got {type(value).__name__}.")
        check_float_dtype(dtype, "dtype")
        if input_dims < 1 or output_dims < 1 or output_dims % group_size:
            raise ValueError(
                f"output_dims={output_dims} must be a positive multiple of group_size={group_size}"
                f" and input_dims={input_dims} positive."
            )
        bands = output_dims // group_size
        qweight = ZigzagWeight(
            mx.zeros((bands, input_dims, group_size * bits // 32), dtype=mx.uint32),
            mx.zeros((bands, input_dims), dtype=dtype),
            mx.zeros((bands, input_dims), dtype=dtype),
            group_size,
            bits,
        )
        return cls(qweight, mx.zeros((output_dims,), dtype=dtype) if bias else None)

    # ---- properties ---------------------------------------------------------------------------

    @property
    def qweight(self) -> ZigzagWeight:
        return ZigzagWeight(self.weight, self.scales, self.biases, self.group_size, self.bits)

    @property
    def input_dims(self) -> int:
        return self.weight.shape[1]

    @property
    def output_dims(self) -> int:
        return self.weight.shape[0] * self.group_size

    @property
    def threshold(self) -> float:
        """Decode steps skip input column j where ``|x_j| * scale_j <= threshold`` (scale 1 under
        the TEAL criterion, see :meth:`set_column_scale`); 0 disables sparsity."""
        return self._threshold_value

    @threshold.setter
    def threshold(self, value) -> None:
        value = check_threshold(value)
        # The float decides the path on the host; the array feeds the kernel (made once, not per call).
        self._threshold_value = value
        scale = self._column_scale
        if scale is None or value == 0:
            self._threshold = mx.array(value, dtype=mx.float32)
        else:
            # Per column: a column of scale 0 adds nothing to the output and is never read.
            self._threshold = mx.where(scale > 0, value / scale, mx.inf)
            mx.eval(self._threshold)
        if getattr(self, "_shared", None) is not None:
            self._shared.thresholds_changed()

    @property
    def column_scale(self) -> mx.array | None:
        """The weight of each input column in the sparsity criterion, float32 of shape (K,), or
        None for TEAL's |x| alone."""
        return self._column_scale

    def set_column_scale(self, scale: mx.array | None) -> None:
        """Skip column j where ``|x_j| * scale[j] <= threshold`` (None: where ``|x_j| <= threshold``).

        :func:`spqt_mlx.patch.set_criterion` sets it for a whole model (WINA: the norms of the
        weight's columns, shared by siblings that read one input)."""
        if scale is not None:
            if not isinstance(scale, mx.array) or scale.shape != (self.input_dims,):
                raise ValueError(f"the column scale must be an mx.array of shape ({self.input_dims},).")
            if scale.dtype != mx.float32:
                scale = scale.astype(mx.float32)  # else kept as given: siblings share one array
        self._column_scale = scale
        self.threshold = self._threshold_value  # the kernels' per-column thresholds follow

    def active_mask(self, x: mx.array) -> mx.array:
        """Which entries of ``x`` a sparse decode step reads (compared in float32, as the kernels
        do): all of them at threshold 0."""
        return mx.abs(x) > self["_threshold"]

    def __setattr__(self, key, value):
        # nn.Module stores array values as parameters; a threshold array must go to the setter.
        if key in ("threshold", "_column_scale"):  # calibration state, not parameters
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    def dequantized_weight(self) -> mx.array:
        """The (output_dims, input_dims) matrix this layer multiplies by."""
        return zigzag_dequantize(self.qweight)

    def to_lora(self, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        """A LoRA adapter over this layer: the hook mlx-lm's ``linear_to_lora_layers`` calls."""
        from .lora import ZigzagLoRALinear

        return ZigzagLoRALinear.from_base(self, r=r, dropout=dropout, scale=scale)

    def _extra_repr(self) -> str:
        return (
            f"input_dims={self.input_dims}, output_dims={self.output_dims}, bias={'bias' in self}, "
            f"group_size={self.group_size}, bits={self.bits}, threshold={self._threshold_value:g}"
        )

    # ---- forward ------------------------------------------------------------------------------

    def __call__(self, x: mx.array) -> mx.array:
        # Decode makes hundreds of these calls per token, so the path goes straight to the C++ op
        # (which validates its inputs) with dict lookups instead of Module attribute fallbacks:
        # about 1 us of host time per call instead of 6.
        try:
            y = self._shared.product(self, x) if self._shared is not None else None
            if y is None:
                y = zigzag_product(x, self["weight"], self["scales"], self["biases"], self.group_size, self.bits,
                                   self._threshold_value, self["_threshold"])
        except ValueError:
            # The ops refuse x in another dtype than the layer's. nn.Linear and nn.QuantizedLinear
            # promote such a call (float32 x, float16 layer: float32 y), so this does too, running
            # the product in the layer's dtype. Handled here, off the path of every other call.
            if x.dtype == self["scales"].dtype or x.dtype not in FLOAT_DTYPES:
                raise
            return self(_cast(x, self["scales"].dtype)).astype(mx.result_type(x.dtype, self["scales"].dtype))
        if self._stats_on and _sparse_decode(x, self._threshold_value):
            # Every row is a token with its own active columns, compared in float32 as the kernels do.
            active = mx.sum(self.active_mask(x).astype(mx.int32))
            self._record(active, x.size // self["weight"].shape[1])
        if "bias" in self:
            y = y + self["bias"]
        return y
