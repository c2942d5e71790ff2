"""Swap the attention and MLP projections of an mlx-lm model for ZigzagLinear layers."""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path
from tqdm.auto import tqdm

from ..layout import check_bits_group_size
from .linear import ZigzagLinear, check_threshold

# Path components that mark attention and MLP blocks across mlx-lm's model families
# (self_attn / attn / attention, mlp / feed_forward / ffn): matched by name, not by model type.
_BLOCK_MARKERS = ("attn", "attention", "mlp", "feed_forward", "ffn")


def is_projection(path: str, module: nn.Module) -> bool:
    """Whether ``module`` at ``path`` is a linear projection inside an attention or MLP block.

    Embeddings, ``lm_head`` and anything outside attention/MLP blocks are not projections.
    """
    if not isinstance(module, (nn.Linear, nn.QuantizedLinear, ZigzagLinear)):
        return False
    parents = path.lower().split(".")[:-1]
    return any(marker in part for part in parents for marker in _BLOCK_MARKERS)


def _output_dims(module: nn.Linear | nn.QuantizedLinear) -> int:
    return module.weight.shape[0]


def _input_dims(module: nn.Linear | nn.QuantizedLinear) -> int:
    if isinstance(module, nn.QuantizedLinear):
        return module.weight.shape[1] * 32 // module.bits
    return module.weight.shape[1]


def _why_unsupported(module: nn.Module, group_size: int) -> str | None:
    n = _output_dims(module)
    if n % group_size:
        return f"{n} output features are not a multiple of group_size={group_size}"
    return None


def patch_model(
    model: nn.Module,
    *,
    group_size: int = 64,
    bits: int = 4,
    thresholds: float | Mapping[str, float] | None = None,
    predicate: Callable[[str, nn.Module], bool] | None = None,
    allocate_only: bool = False,
    progress: bool = False,
) -> list[str]:
    """Replace the attention and MLP projections of ``model`` with :class:`ZigzagLinear`, in place.

    Args:
        model: an mlx-lm model (any family: projections are found by position, not model type).
        group_size, bits: the zigzag quantization (group_size in {32, 64, 128}, bits in
            {2, 3, 4, 5, 6, 8}).
        thresholds: one threshold for every patched layer, or ``{path: threshold}`` (from
            :func:`spqt_mlx.calibrate.calibrate`). ``None`` leaves every threshold at 0 (dense).
        predicate: ``predicate(path, module) -> bool`` selects the layers to patch; defaults to
            :func:`is_projection`. Embeddings and ``lm_head`` are never patched.
        allocate_only: build zero-filled layers of the right shapes instead of quantizing, for
            loading saved zigzag weights with ``model.load_weights``.
        progress: show a progress bar over the layers quantized.

    Each layer is quantized (evaluated) as it is replaced, so peak memory stays near one float
    layer above the model's own, and the call takes the time the quantization takes.

    ``nn.Linear`` weights are quantized once. ``nn.QuantizedLinear`` weights are dequantized and
    quantized again (a second rounding; convert from float weights when possible). Layers whose
    output features are not a multiple of ``group_size`` stay as they are, with a warning.

    Returns:
        The paths of the patched layers, e.g. ``["model.layers.0.self_attn.q_proj", ...]``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an mlx.nn.Module, got {type(model).__name__}.")
    check_bits_group_size(group_size, bits)
    select = predicate or is_projection
    leaves = model.leaf_modules()
    if isinstance(thresholds, Mapping):
        # Check names and values before changing anything: a typo must not leave a half-configured model.
        known = {p for p, m in tree_flatten(leaves, is_leaf=nn.Module.is_module) if select(p, m) or isinstance(m, ZigzagLinear)}
        unknown = sorted(set(thresholds) - known)
        if unknown:
            raise ValueError(f"thresholds name layers that are not projections of this model: {unknown}")
        _checked(thresholds)
    elif thresholds is not None:
        check_threshold(thresholds)
    patched: list[str] = []
    skipped: list[str] = []
    bar = tqdm(desc="zigzag-quantizing", unit="layer", leave=False, disable=not progress or allocate_only,
               total=sum(1 for p, m in tree_flatten(leaves, is_leaf=nn.Module.is_module) if select(p, m)))

    def convert(path: str, module: nn.Module):
        if isinstance(module, nn.Embedding) or path.split(".")[-1] == "lm_head":
            return module
        if isinstance(module, ZigzagLinear) or not select(path, module):
            return module
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            skipped.append(f"{path} ({type(module).__name__} is not a linear layer)")
            return module
        reason = _why_unsupported(module, group_size)
        if reason:
            skipped.append(f"{path} ({reason})")
            return module
        if allocate_only:
            patched.append(path)
            dtype = module.scales.dtype if isinstance(module, nn.QuantizedLinear) else module.weight.dtype
            return ZigzagLinear.empty(
                _input_dims(module), _output_dims(module), bias="bias" in module,
                group_size=group_size, bits=bits, dtype=dtype,
            )
        try:
            if isinstance(module, nn.QuantizedLinear):
                layer = ZigzagLinear.from_quantized(module, group_size, bits)
            else:
                layer = ZigzagLinear.from_linear(module, group_size, bits)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None  # nothing was replaced yet
        mx.eval(layer.parameters())
        bar.update()
        patched.append(path)
        return layer

    try:
        model.update_modules(tree_map_with_path(convert, leaves, is_leaf=nn.Module.is_module))
    finally:
        bar.close()
    if skipped:
        warnings.warn(
            f"spqt: {len(skipped)} layer(s) stay dense: " + "; ".join(skipped), stacklevel=2
        )
    if thresholds is not None:
        layers = zigzag_layers(model)
        if isinstance(thresholds, Mapping):
            # Layers that stayed dense were warned about; their thresholds have nothing to act on.
            thresholds = {path: t for path, t in thresholds.items() if path in layers}
        else:
            thresholds = {path: thresholds for path in patched}
        set_thresholds(model, thresholds)
    return patched


def zigzag_layers(model: nn.Module) -> dict[str, ZigzagLinear]:
    """The ZigzagLinear layers of ``model`` by path, in model order."""
    return {path: m for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module) if isinstance(m, ZigzagLinear)}


def get_thresholds(model: nn.Module) -> dict[str, float]:
    """``{path: threshold}`` for every ZigzagLinear layer of ``model``."""
    return {path: layer.threshold for path, layer in zigzag_layers(model).items()}


def set_thresholds(model: nn.Module, thresholds: float | Mapping[str, float]) -> None:
    """Set the thresholds of ZigzagLinear layers: one number for all, or ``{path: threshold}``.

    Every path in a mapping must be a ZigzagLinear layer of ``model``; layers not named keep theirs.
    """
    layers = zigzag_layers(model)
    if not isinstance(thresholds, Mapping):
        thresholds = {path: thresholds for path in layers}
    unknown = sorted(set(thresholds) - set(layers))
    if unknown:
        raise ValueError(f"no ZigzagLinear layer at: {unknown}")
    for path, value in _checked(thresholds).items():  # every value checked before any layer changes
        layers[path].threshold = value


def _checked(thresholds: Mapping[str, object]) -> dict[str, float]:
    checked = {}
    for path, value in thresholds.items():
        try:
            checked[path] = check_threshold(value)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from None
    return checked


def record_stats(model: nn.Module, enabled: bool = True) -> None:
    """Start (resetting) or stop counting active columns in every ZigzagLinear of ``model``."""
    for layer in zigzag_layers(model).values():
        layer.record_stats(enabled)


def achieved_sparsity(model: nn.Module) -> tuple[float, int] | None:
    """Mean sparsity of the single-token products since :func:`record_stats`, and the call count.

    Each layer's skipped fraction of input columns is averaged over its sparse calls, then the
    layers are averaged weighted by their parameter counts, so the result is the fraction of
    weight bytes not read per token. Returns ``None`` when nothing was recorded. Synchronizes.
    """
    skipped = weight = 0.0
    calls = 0
    for layer in zigzag_layers(model).values():
        n, active = layer.stats()
        if n == 0:
            continue
        size = layer.input_dims * layer.output_dims
        skipped += size * (1.0 - active / (n * layer.input_dims))
        weight += size
        calls = max(calls, n)
    if weight == 0:
        return None
    return skipped / weight, calls
