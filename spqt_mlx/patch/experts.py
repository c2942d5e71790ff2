"""ZigzagSwitchLinear: a drop-in for mlx-lm's ``SwitchLinear`` (the experts of a mixture-of-experts
layer) whose decode steps read only the selected experts' active input columns."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwiGLU, SwitchGLU, SwitchLinear

from .. import _ext
from ..layout import FLOAT_DTYPES, ZigzagWeight, check_bits_group_size, check_float_dtype, zigzag_dequantize, zigzag_quantize
from .linear import GEMV_MAX_ROWS, ActiveColumnStats, check_threshold


def _expert_weight(module) -> mx.array:
    """The (E, N, K) float weight of a ``SwitchLinear`` or ``QuantizedSwitchLinear``."""
    if isinstance(module, QuantizedSwitchLinear):
        w = mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                          bits=module.bits, mode=module.mode, global_scale=getattr(module, "global_scale", None))
        return w if w.dtype in FLOAT_DTYPES else w.astype(mx.float32)
    if isinstance(module, SwitchLinear):
        return module.weight
    raise TypeError(f"expected a SwitchLinear or QuantizedSwitchLinear, got {type(module).__name__}.")


def _on_cuda() -> bool:
    """Whether the default device runs MLX's CUDA backend (which picks some expert products)."""
    return mx.default_device().type == mx.gpu and mx.cuda.is_available()


class ZigzagSwitchLinear(ActiveColumnStats, nn.Module):
    """The experts of a mixture-of-experts projection over zigzag-quantized weights, called as
    mlx-lm's ``SwitchLinear`` is: ``layer(x, indices, sorted_indices=False)`` multiplies x by the
    experts ``indices`` picks (``mx.gather_mm``'s broadcasting), plus their bias.

    Parameters are the arrays of a :class:`~spqt_mlx.ZigzagWeight` with a leading experts axis
    (``weight`` (E, N/gs, K, words), ``scales``, ``biases`` (E, N/gs, K)) and an optional ``bias``
    (E, N). The threshold is calibration state, as for :class:`~spqt_mlx.patch.ZigzagLinear`.

    Decode steps with a positive threshold are sparse: every selected expert of a token reads only
    the input columns with ``|x| > threshold`` (the k experts of a token share gate/up's input, so
    they share its active set), collected inside the kernel. A decode step is a call on one
    position per sequence, as mlx-lm's ``SwitchGLU`` and ``SwitchMLP`` make it (x of shape
    (B, 1, ..., 1, K) before their experts axis); prefill and sorted calls are dense. The kernels
    take one threshold per expert; the layer gives all its experts one.
    """

    def __init__(self, qweight: ZigzagWeight, bias: mx.array | None = None, threshold: float = 0.0):
        super().__init__()
        if not isinstance(qweight, ZigzagWeight) or qweight.weight.ndim != 4:
            raise TypeError("qweight must be a ZigzagWeight of stacked experts (zigzag_quantize of an (E, N, K) weight).")
        self.weight = qweight.weight
        self.scales = qweight.scales
        self.biases = qweight.biases
        self.group_size = qweight.group_size
        self.bits = qweight.bits
        E, N, _ = qweight.shape
        if bias is not None:
            if not isinstance(bias, mx.array) or bias.shape != (E, N):
                raise ValueError(f"bias must be an mx.array of shape ({E}, {N}).")
            self.bias = bias
        self.threshold = threshold
        self._stats_on = False
        self._experts_per_token = 1
        self.freeze()  # quantized experts are not trained; gradients still flow to x

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_switch(cls, module, group_size: int = 64, bits: int = 4, quantizer: str = "minmax") -> "ZigzagSwitchLinear":
        """Quantize the experts of a ``SwitchLinear`` (float weights: one rounding) or re-quantize
        those of a ``QuantizedSwitchLinear`` (a second rounding) into the zigzag layout."""
        w = _expert_weight(module)
        bias = module.bias if "bias" in module else None
        return cls(zigzag_quantize(w, group_size, bits, quantizer=quantizer, lazy=True), bias)

    @classmethod
    def empty(cls, input_dims: int, output_dims: int, num_experts: int, *, bias: bool = False, group_size: int = 64,
              bits: int = 4, dtype: mx.Dtype = mx.float32) -> "ZigzagSwitchLinear":
        """A zero-filled layer of the right shapes, to be filled with ``load_weights``."""
        check_bits_group_size(group_size, bits)
        check_float_dtype(dtype, "dtype")
        for name, value in (("input_dims", input_dims), ("output_dims", output_dims), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if output_dims % group_size:
            raise ValueError(f"output_dims={output_dims} must be a multiple of group_size={group_size}.")
        bands = output_dims // group_size
        qweight = ZigzagWeight(
            mx.zeros((num_experts, bands, input_dims, group_size * bits // 32), dtype=mx.uint32),
            mx.zeros((num_experts, bands, input_dims), dtype=dtype),
            mx.zeros((num_experts, bands, input_dims), dtype=dtype),
            group_size,
            bits,
        )
        return cls(qweight, mx.zeros((num_experts, output_dims), dtype=dtype) if bias else None)

    # ---- properties ---------------------------------------------------------------------------

    @property
    def qweight(self) -> ZigzagWeight:
        return ZigzagWeight(self.weight, self.scales, self.biases, self.group_size, self.bits)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def input_dims(self) -> int:
        return self.weight.shape[2]

    @property
    def output_dims(self) -> int:
        return self.weight.shape[1] * self.group_size

    @property
    def rows_per_token(self) -> int:
        """Experts a token was routed to in the last unsorted call (1 before any): what a token
        reads of this layer is that many experts' weights."""
        return self._experts_per_token

    @property
    def threshold(self) -> float:
        """Decode steps skip input column j where ``|x_j| <= threshold``; 0 disables sparsity."""
        return self._threshold_value

    @threshold.setter
    def threshold(self, value) -> None:
        value = check_threshold(value)
        self._threshold_value = value
        # One per expert, as the kernels take them; made once, not per call.
        self._threshold = mx.full((self.num_experts,), value, dtype=mx.float32)
        mx.eval(self._threshold)

    def active_mask(self, x: mx.array) -> mx.array:
        """Which entries of ``x`` a sparse decode step reads: all of them at threshold 0."""
        return mx.abs(x) > self._threshold_value

    def __setattr__(self, key, value):
        if key == "threshold":  # calibration state, not a parameter
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    def dequantized_weight(self) -> mx.array:
        """The (E, output_dims, input_dims) experts this layer multiplies by."""
        return zigzag_dequantize(self.qweight)

    def _extra_repr(self) -> str:
        return (
            f"input_dims={self.input_dims}, output_dims={self.output_dims}, num_experts={self.num_experts}, "
            f"bias={'bias' in self}, group_size={self.group_size}, bits={self.bits}, "
            f"threshold={self._threshold_value:g}"
        )

    # ---- forward ------------------------------------------------------------------------------

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        dtype = self["scales"].dtype
        if x.dtype != dtype and x.dtype in FLOAT_DTYPES:
            # As SwitchLinear promotes (float32 x, float16 experts: float32 y), running in the layer's dtype.
            return self(x.astype(dtype), indices, sorted_indices).astype(mx.result_type(x.dtype, dtype))
        if x.ndim < 2:
            raise ValueError(f"x must have shape (..., M, K), got {tuple(x.shape)}.")
        if not isinstance(indices, mx.array) or not mx.issubdtype(indices.dtype, mx.integer):
            raise TypeError("indices must be an integer mx.array of expert ids.")
        M, K = x.shape[-2:]
        batch = tuple(mx.broadcast_shapes(tuple(x.shape[:-2]), tuple(indices.shape)))
        target = (*batch, M)  # one output row per entry
        experts = _expert_ids(indices, target)
        x_rows = _shared_rows(x, target)
        decode = self._threshold_value > 0 and not sorted_indices and (x.ndim < 4 or x.shape[-4] == 1)
        rows = math.prod(target)
        w, s, b = self["weight"], self["scales"], self["biases"]
        if decode or rows <= GEMV_MAX_ROWS or _on_cuda():
            # On CUDA every row runs the GEMV: MLX's gathered quantized product has no fast kernel
            # there for the zigzag bands' orientation.
            y = _ext.zigzag_gather_gemv(x_rows, w, s, b, experts, self._threshold if decode else None,
                                        self.group_size, self.bits)
        else:
            y = _gather_matmul(x_rows, self.qweight, experts.reshape(-1), sorted_indices).reshape(*target, -1)
        if self._stats_on and decode:
            self._record_rows(x_rows, rows)
        if not sorted_indices:
            self._experts_per_token = indices.shape[-1] if indices.ndim else 1
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y

    # ---- statistics ---------------------------------------------------------------------------

    def _record_rows(self, x_rows: mx.array, rows: int) -> None:
        """Counts one call's expert rows (record_stats counts per expert row)."""
        if rows == 0:
            return
        # Each row of x feeds rows / x_rows.size * K expert rows, all with the same active set.
        per_x_row = rows // (x_rows.size // x_rows.shape[-1])
        self._record(mx.sum(self.active_mask(x_rows).astype(mx.int32)) * per_x_row, rows)


def _expert_ids(indices: mx.array, target: tuple) -> mx.array:
    """The expert of every output row (``target``: the rows' shape), 32-bit and contiguous as the
    kernels read them. ZigzagSwitchGLU makes it once per call for its products: a decode step is
    bound by host time per op."""
    ids = mx.broadcast_to(mx.expand_dims(indices, -1), target)
    if indices.dtype not in (mx.int32, mx.uint32):
        # The kernels read 32-bit ids; the op narrows 64-bit ones keeping those out of range out.
        ids = ids if indices.dtype.size == 8 else ids.astype(mx.int32)
    return mx.contiguous(ids) if indices.dtype.size <= 4 else ids  # a router's top-k is a slice of its order


def _shared_rows(x: mx.array, target: tuple) -> mx.array:
    """x's rows for the gathered product with output rows ``target`` (batch..., M): x itself when each
    of its rows feeds a run of consecutive output rows (the k experts of a token), else x
    broadcast to one row per output row."""
    lead = (1,) * (len(target) - (x.ndim - 1)) + tuple(x.shape[:-1])
    j = 0
    while j < len(target) and lead[j] == target[j]:
        j += 1
    if all(d == 1 for d in lead[j:]):
        return x
    return mx.broadcast_to(x.reshape(*lead, x.shape[-1]), (*target, x.shape[-1]))


def _gather_matmul(x_rows: mx.array, qweight: ZigzagWeight, experts: mx.array, sorted_rows: bool) -> mx.array:
    """The gathered product of many rows (prefill) with MLX's ``gather_qmm``: band b of expert e is
    an MLX-quantized (K, group_size) matrix (one group per row), row e * bands + b of the stacked
    bands, so every output row is its expert's bands times its row of x. Rows sorted by expert keep
    the stacked bands in order (``sorted_rows``)."""
    E, bands, K, words = qweight.weight.shape
    R = experts.size
    x_div = R // (x_rows.size // K)
    valid = (experts >= 0) & (experts < E)
    safe = mx.where(valid, experts, 0).astype(mx.int32)
    band_rows = safe[:, None] * bands + mx.arange(bands, dtype=mx.int32)
    lhs = mx.broadcast_to((mx.arange(R, dtype=mx.int32) // x_div)[:, None], band_rows.shape)
    y = mx.gather_qmm(
        x_rows.reshape(-1, 1, K),
        qweight.weight.reshape(E * bands, K, words),
        qweight.scales.reshape(E * bands, K, 1),
        qweight.biases.reshape(E * bands, K, 1),
        lhs_indices=lhs,
        rhs_indices=band_rows,
        transpose=False,
        group_size=qweight.group_size,
        bits=qweight.bits,
        sorted_indices=sorted_rows,
    )  # (R, bands, 1, gs)
    y = y.reshape(R, bands * qweight.group_size)
    return mx.where(valid[:, None], y, mx.zeros_like(y))



class ZigzagSwitchGLU(SwitchGLU):
    """mlx-lm's ``SwitchGLU`` over zigzag experts (its subclass, so model code and the router
    detection see a SwitchGLU). A decode step runs gate and up as one gathered product, whose
    [gate | up] rows the down product reads through its SwiGLU prologue: two launches where the
    unfused block makes four (gate, up, activation, down), as decode is bound by the host's time per
    launch on fast GPUs. Gate and up must share a threshold (uniform calibration gives them one:
    they read one input); otherwise, and for long (sorted) calls, it runs as SwitchGLU does."""

    def __init__(self, gate_proj, up_proj, down_proj, activation):
        nn.Module.__init__(self)  # the projections exist already: SwitchGLU's own would be new ones
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.activation = activation

    @classmethod
    def from_switch_glu(cls, glu: SwitchGLU) -> "ZigzagSwitchGLU":
        return cls(glu.gate_proj, glu.up_proj, glu.down_proj, glu.activation)

    def _fuses(self, x: mx.array, indices: mx.array) -> bool:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        if not all(isinstance(m, ZigzagSwitchLinear) for m in (gate, up, down)):
            return False  # calibration probes or wrappers stand in for them
        # A decode step (one position per sequence) of any batch, which SwitchGLU would sort (and
        # so run dense) from 64 rows on; other calls of a few rows.
        decode = x.ndim >= 2 and x.shape[-2] == 1
        few = indices.size < 64 and (indices.size <= GEMV_MAX_ROWS or _on_cuda())
        return ((decode or few) and x.dtype == gate["scales"].dtype
                and gate._threshold_value == up._threshold_value and (gate.group_size, gate.bits) == (up.group_size, up.bits)
                and "bias" not in gate and "bias" not in up)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        for layer in (self.gate_proj, self.up_proj, self.down_proj):
            if isinstance(layer, ZigzagSwitchLinear):  # before SwitchGLU flattens a sorted call's ids
                layer._experts_per_token = indices.shape[-1] if indices.ndim else 1
        if not self._fuses(x, indices):
            return super().__call__(x, indices)
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        indices = mx.stop_gradient(indices)
        x = mx.expand_dims(x, (-2, -3))  # (..., L, 1, 1, K), as SwitchGLU's
        decode = x.ndim < 4 or x.shape[-4] == 1
        ids = _expert_ids(indices, (*indices.shape, 1))
        t_in = gate["_threshold"] if decode and gate._threshold_value > 0 else None
        t_down = down["_threshold"] if decode and down._threshold_value > 0 else None
        h = _ext.zigzag_gather_gemv(x, gate["weight"], gate["scales"], gate["biases"], ids, t_in, gate.group_size,
                                    gate.bits, _ext.Prologue.Identity, up["weight"], up["scales"], up["biases"])
        y = _ext.zigzag_gather_gemv(h, down["weight"], down["scales"], down["biases"], ids, t_down, down.group_size,
                                    down.bits, _ext.Prologue.SwiGLU)
        if "bias" in down:
            y = y + mx.expand_dims(down["bias"][indices], -2)
        rows = indices.size
        if rows == 0:
            return y.squeeze(-2)
        if t_in is not None and gate._stats_on:
            gate._record_rows(x.reshape(-1, x.shape[-1]), rows)
        if t_in is not None and up._stats_on:
            up._record_rows(x.reshape(-1, x.shape[-1]), rows)
        if t_down is not None and down._stats_on:
            down._record_rows(_ext.apply_prologue(h, _ext.Prologue.SwiGLU).reshape(rows, -1), rows)
        return y.squeeze(-2)


def fuse_experts(model: nn.Module) -> int:
    """Give every SwiGLU experts block of ``model`` (mlx-lm's ``SwitchGLU`` whose projections are
    all ZigzagSwitchLinear, gate and up without bias) the decode path of :class:`ZigzagSwitchGLU`.
    Parameters keep their paths. Returns the number of blocks."""
    found = []
    for path, module in model.named_modules():
        if type(module) is SwitchGLU and type(module.activation) is SwiGLU and all(
                isinstance(getattr(module, name, None), ZigzagSwitchLinear) for name in ("gate_proj", "up_proj", "down_proj")
        ) and "bias" not in module.gate_proj and "bias" not in module.up_proj:
            found.append((path, module))
    if found:
        from mlx.utils import tree_unflatten

        model.update_modules(tree_unflatten([(path, ZigzagSwitchGLU.from_switch_glu(m)) for path, m in found]))
    return len(found)
