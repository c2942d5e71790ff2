"""LoRA over zigzag layers, for mlx-lm's fine-tuning (``mlx_lm.lora``, ``linear_to_lora_layers``).

mlx-lm converts a layer that has a ``to_lora`` method with it; ``ZigzagLinear.to_lora`` returns the
adapter below. The zigzag product stays frozen and sparse as calibrated; the low-rank update is
dense. Fusing folds the update into the weight and quantizes it again in the zigzag layout.
"""

from __future__ import annotations

import mlx.nn as nn
from mlx_lm.tuner.lora import LoRALinear

from .linear import ZigzagLinear


class ZigzagLoRALinear(LoRALinear):
    """mlx-lm's ``LoRALinear`` over a :class:`ZigzagLinear`."""

    @staticmethod
    def from_base(linear: ZigzagLinear, r: int = 8, dropout: float = 0.0, scale: float = 20.0) -> "ZigzagLoRALinear":
        if not isinstance(linear, ZigzagLinear):
            raise TypeError(f"expected a ZigzagLinear, got {type(linear).__name__}.")
        lora = ZigzagLoRALinear(input_dims=linear.input_dims, output_dims=linear.output_dims, r=r, dropout=dropout,
                                scale=scale)
        lora.linear = linear
        return lora

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """The layer with the update folded in: a ZigzagLinear (same format and threshold), or an
        ``nn.Linear`` with ``dequantize=True``."""
        layer = self.linear
        weight = layer.dequantized_weight()
        delta = ((self.scale * self.lora_b.T) @ self.lora_a.T).astype(weight.dtype)
        fused = nn.Linear(layer.input_dims, layer.output_dims, bias="bias" in layer)
        fused.weight = weight + delta
        if "bias" in layer:
            fused.bias = layer.bias
        if dequantize:
            return fused
        zigzag = ZigzagLinear.from_linear(fused, layer.group_size, layer.bits)
        # The criterion the thresholds were calibrated under (the base's norms, shared by siblings).
        zigzag.set_column_scale(layer.column_scale)
        zigzag.threshold = layer.threshold
        return zigzag
