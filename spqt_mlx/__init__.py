"""spqt-mlx: dynamic activation sparsity on zigzag-quantized weights, for fast MLX decoding."""

import mlx.core  # noqa: F401  (registers the array type and loads libmlx before the extension)

from .checkpoint import load
from .layout import ZigzagWeight, zigzag_dequantize, zigzag_quantize
from .ops import ActiveColumns, collect_active, zigzag_gather_gemv, zigzag_gemv, zigzag_matmul

__version__ = "0.1.0"

__all__ = [
    "ActiveColumns",
    "ZigzagWeight",
    "collect_active",
    "load",
    "zigzag_dequantize",
    "zigzag_gather_gemv",
    "zigzag_gemv",
    "zigzag_matmul",
    "zigzag_quantize",
]
