"""Swap the attention and MLP projections of an mlx-lm model for ZigzagLinear layers."""

from __future__ import annotations

import warnings
from typing import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path
from tqdm.auto import tqdm

from ..layout import QUANTIZERS, check_bits_group_size, check_quantizer, zigzag_quantize_many
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear, SwitchMLP

from .experts import ZigzagSwitchLinear, fuse_experts
from .linear import ZigzagLinear, check_criterion, check_threshold

_LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)
# What patch_model produces: projections and experts.
ZIGZAG_TYPES = (ZigzagLinear, ZigzagSwitchLinear)


def _expert_types() -> tuple:
    """mlx-lm's experts (one layer holds every expert of a MoE projection)."""
    return (SwitchLinear, QuantizedSwitchLinear)


def _in_block(path: str) -> bool:
    # Inside the model's stack of blocks: the path goes through a numbered list (model.layers.3,
    # transformer.h.0, backbone.layers.12, ...), whatever the block's parts are called
    # (self_attn, mixer, temporal_block, feed_forward, shared_experts, ...).
    return any(part.isdigit() for part in path.split(".")[:-1])


def _own_forward(module: nn.Module) -> bool:
    """A subclass of nn.Linear / nn.QuantizedLinear that computes something else (e.g. afm7's
    FusedLinear, which returns several arrays): replacing it would change the model."""
    for base in _LINEAR_TYPES:
        if isinstance(module, base) and type(module) is not base:
            return type(module).__call__ is not base.__call__
    return False


def is_projection(path: str, module: nn.Module) -> bool:
    """Whether ``module`` at ``path`` is a linear projection inside the model's stack of blocks.

    Selected by structure, not by name: any ``nn.Linear`` or ``nn.QuantizedLinear``, any MoE
    experts layer (mlx-lm's ``SwitchLinear`` or ``QuantizedSwitchLinear``), or an already patched
    layer, whose path goes through a numbered list of blocks. Embeddings, ``lm_head`` and layers
    outside the blocks are not projections, nor are subclasses with their own forward. MoE
    routers are excluded by :func:`projections`, which sees the whole model.
    """
    if isinstance(module, (*_expert_types(), ZigzagSwitchLinear)):
        return _in_block(path)
    if not isinstance(module, (*_LINEAR_TYPES, ZigzagLinear)) or _own_forward(module):
        return False
    return _in_block(path) and path.split(".")[-1] != "lm_head"


def routers(model: nn.Module) -> set[str]:
    """Paths of MoE routers: in a block that holds experts (``SwitchGLU``, ``SwitchMLP``,
    ``SwitchLinear``), the linear layers beside the experts with one output per expert or a single
    one (``mlp.gate`` next to ``mlp.switch_mlp``, ``shared_expert_gate``), and the single linear
    layer of a router module with one output per expert (``mlp.router.gate``). Their outputs pick
    or weigh the experts, so they stay exact and dense, as mlx-lm's quantization recipes keep them
    at higher precision. Other linear layers beside experts (a latent projection, attention in a
    block that holds its experts directly) are projections."""
    _check_model(model)
    experts = (SwitchGLU, SwitchMLP, SwitchLinear, QuantizedSwitchLinear, ZigzagSwitchLinear)
    linears = (*_LINEAR_TYPES, ZigzagLinear)
    found = set()
    for path, module in model.named_modules():
        children = module.children()
        switch = [c for c in tree_flatten(children, is_leaf=nn.Module.is_module) if isinstance(c[1], experts)]
        if not switch:
            continue
        counts = set()
        for _, sw in switch:
            for _, m in sw.named_modules():
                if isinstance(m, (SwitchLinear, QuantizedSwitchLinear, ZigzagSwitchLinear)):
                    counts.add(m.num_experts)
        prefix = f"{path}." if path else ""
        for sub, m in tree_flatten(children, is_leaf=nn.Module.is_module):
            if isinstance(m, experts):
                continue
            if isinstance(m, linears):  # beside the experts: a router or a shared-expert gate?
                if _output_dims(m) in counts or _output_dims(m) == 1:
                    found.add(prefix + sub)
                continue
            # A router module one level down holds a single linear layer with one output per
            # expert (a shared expert is an MLP of several).
            inner = [(n, leaf) for n, leaf in m.named_modules() if isinstance(leaf, linears)]
            if len(inner) == 1 and _output_dims(inner[0][1]) in counts:
                found.add(f"{prefix}{sub}.{inner[0][0]}")
    return found


def projections(model: nn.Module) -> list[str]:
    """Paths of the layers :func:`patch_model` swaps by default, in model order: the projections
    of the model's stack of blocks (:func:`is_projection`) except MoE routers. A module without a
    stack of blocks (a single block) has all its linear layers patched, routers again excepted."""
    _check_model(model)
    skip = routers(model)
    leaves = [(p, m) for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module) if p not in skip]
    found = [p for p, m in leaves if is_projection(p, m)]
    if found:
        return found
    return [p for p, m in leaves if (isinstance(m, (*_LINEAR_TYPES, ZigzagLinear)) and not _own_forward(m)
            or isinstance(m, (*_expert_types(), ZigzagSwitchLinear))) and p.split(".")[-1] != "lm_head"]


# The "auto" quantizer takes "gptq" for models whose projections hold at most this many weights and
# "search" for larger ones. GPTQ measured the lowest perplexity (SmolLM2-135M at sparsity 0: 8.6 % below
# MLX's 4-bit model, "search" 0.3 % above) and keeps the quick start's text fluent, but it factors each
# layer's input statistics and walks every input column: on an H200 a Llama-3-8B shape would take about
# 21 minutes against 5 for "search" (from its layers' times), a 1B model 2-3 (BENCHMARKS.md).
AUTO_GPTQ_WEIGHTS = 1_500_000_000


def choose_quantizer(model: nn.Module, quantizer: str = "auto") -> tuple[str, str | None]:
    """``(quantizer, why)``: a quantizer of :data:`spqt_mlx.layout.QUANTIZERS` given as itself
    (``why`` None); for ``"auto"``, ``"gptq"`` where the projections :func:`patch_model` replaces
    (MoE experts aside, which GPTQ leaves to "search") hold at most :data:`AUTO_GPTQ_WEIGHTS`
    weights, else ``"search"``, and the reason in a sentence."""
    check_quantizer(quantizer, tool=True)
    if quantizer in QUANTIZERS:
        return quantizer, None
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    layers = [modules[p] for p in projections(model)]
    weights = sum(_input_dims(m) * _output_dims(m) for m in layers
                  if not isinstance(m, (*_expert_types(), ZigzagSwitchLinear)))
    chosen = "gptq" if weights <= AUTO_GPTQ_WEIGHTS else "search"
    return chosen, (f"quantizer auto -> {chosen}: the projections hold {weights:,} weights, "
                    f"{'at most' if chosen == 'gptq' else 'more than'} {AUTO_GPTQ_WEIGHTS:,}"
                    + ("" if chosen == "gptq" else " (gptq would take long; --quantizer gptq forces it)"))


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an mlx.nn.Module, got {type(model).__name__}.")


def _output_dims(module: nn.Module) -> int:
    if isinstance(module, ZIGZAG_TYPES):
        return module.output_dims
    if isinstance(module, _expert_types()):
        return module.output_dims
    return module.weight.shape[0]


def _input_dims(module: nn.Linear | nn.QuantizedLinear | ZigzagLinear) -> int:
    if isinstance(module, ZigzagLinear):
        return module.input_dims
    if isinstance(module, nn.QuantizedLinear):
        return module.weight.shape[1] * 32 // module.bits
    return module.weight.shape[1]


def _float_dtype(module: nn.Module) -> mx.Dtype:
    """The float dtype a layer computes in: its scales' (affine quantization), bfloat16 for the
    microscaled modes (uint8 scales; what mx.dequantize gives for them), else its weight's."""
    if "scales" in module:
        return module.scales.dtype if mx.issubdtype(module.scales.dtype, mx.floating) else mx.bfloat16
    return module.weight.dtype


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
    quantizer: str = "minmax",
    hessians: Mapping[str, object] | None = None,
) -> list[str]:
    """Replace the attention and MLP projections of ``model`` with :class:`ZigzagLinear`, in place.

    Args:
        model: an mlx-lm model (any family: projections are found by position, not model type).
        group_size, bits: the zigzag quantization (group_size in {32, 64, 128}, bits in
            {2, 3, 4, 5, 6, 8}).
        thresholds: one threshold for every patched layer, or ``{path: threshold}`` (from
            :func:`spqt_mlx.calibrate.calibrate`). ``None`` leaves every threshold at 0 (dense).
        predicate: ``predicate(path, module) -> bool`` selects the layers to patch; defaults to
            :func:`projections`: every linear layer inside the model's stack of blocks except
            MoE routers and subclasses with their own forward (those are left as they are, with
            a warning). Embeddings and ``lm_head`` are never patched.
        allocate_only: build zero-filled layers of the right shapes instead of quantizing, for
            loading saved zigzag weights with ``model.load_weights``.
        quantizer: how each group's scale and bias are chosen (:data:`spqt_mlx.layout.QUANTIZERS`):
            "minmax" as ``mx.quantize``, or "search" for the lowest squared error per group (a
            smaller weight error; it quantizes each layer when the layer is replaced, not lazily),
            or "gptq" (GPTQ in zigzag order, :mod:`spqt_mlx.gptq`; experts use "search").
        hessians: with "gptq", ``{path: H}`` for every projection: the second moment of its
            inputs on calibration text (:func:`spqt_mlx.gptq.input_hessians` of the float model).
        progress: quantize (evaluate) each layer as it is replaced, with a progress bar: peak
            memory stays near one float layer above the model's own, and the call takes the time
            the quantization takes. By default the quantization is lazy, as ``nn.quantize``'s: it
            runs when the model's parameters are first evaluated.

    ``nn.Linear`` weights are quantized once. ``nn.QuantizedLinear`` weights are dequantized and
    quantized again (a second rounding; convert from float weights when possible). Layers whose
    output features are not a multiple of ``group_size`` stay as they are, with a warning.

    Returns:
        The paths of the patched layers, e.g. ``["model.layers.0.self_attn.q_proj", ...]``.
    """
    _check_model(model)
    check_bits_group_size(group_size, bits)
    check_quantizer(quantizer)
    if (quantizer == "gptq") != (hessians is not None) and not allocate_only:
        raise ValueError("the gptq quantizer, and only it, takes hessians (spqt_mlx.gptq.input_hessians).")
    if predicate is None:
        chosen = set(projections(model))

        def select(path, module):
            return path in chosen
    else:
        select = predicate
    leaves = model.leaf_modules()
    if isinstance(thresholds, Mapping):
        # Check names and values before changing anything: a typo must not leave a half-configured model.
        known = {p for p, m in tree_flatten(leaves, is_leaf=nn.Module.is_module) if select(p, m) or isinstance(m, ZIGZAG_TYPES)}
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

    def action(path: str, module: nn.Module) -> tuple[str | None, str | None]:
        """What patching does to a leaf: ("linear" or "experts", None), or (None, why it stays
        dense, or None where that needs no warning)."""
        if isinstance(module, nn.Embedding) or path.split(".")[-1] == "lm_head":
            return None, None
        if predicate is None and _own_forward(module):
            return None, f"{path} ({type(module).__name__} has its own forward)"
        if isinstance(module, ZIGZAG_TYPES) or not select(path, module):
            return None, None
        kind = "experts" if isinstance(module, _expert_types()) else "linear"
        if kind == "linear" and not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            return None, f"{path} ({type(module).__name__} is not a linear layer)"
        reason = _why_unsupported(module, group_size)
        return (None, f"{path} ({reason})") if reason else (kind, None)

    ready: dict[str, ZigzagLinear] = {}  # GPTQ's layers, quantized before any is replaced

    def quantize_gptq():
        """Every projection GPTQ quantizes, layers of one shape together (layout.zigzag_quantize_many):
        its column walk costs about as much for one small layer as for a batch of them."""
        chosen = {p: m for p, m in tree_flatten(leaves, is_leaf=nn.Module.is_module) if action(p, m)[0] == "linear"}
        try:
            qweights = zigzag_quantize_many({p: ZigzagLinear.source_weight(m) for p, m in chosen.items()}, group_size,
                                            bits, quantizer="gptq", hessians=hessians, progress=progress)
        except ValueError as e:
            raise ValueError(f"gptq: {e}") from None  # nothing was replaced yet
        ready.update((p, ZigzagLinear(q, chosen[p].bias if "bias" in chosen[p] else None)) for p, q in qweights.items())

    def convert(path: str, module: nn.Module):
        kind, reason = action(path, module)
        if reason:
            skipped.append(reason)
        if kind is None:
            return module
        if kind == "experts":
            return replaced(
                path, module,
                lambda: ZigzagSwitchLinear.empty(module.input_dims, module.output_dims, module.num_experts,
                                                 bias="bias" in module, group_size=group_size, bits=bits,
                                                 dtype=_float_dtype(module)),
                lambda: ZigzagSwitchLinear.from_switch(module, group_size, bits,
                                                       "search" if quantizer == "gptq" else quantizer))
        from_module = ZigzagLinear.from_quantized if isinstance(module, nn.QuantizedLinear) else ZigzagLinear.from_linear
        return replaced(
            path, module,
            lambda: ZigzagLinear.empty(_input_dims(module), _output_dims(module), bias="bias" in module,
                                       group_size=group_size, bits=bits, dtype=_float_dtype(module)),
            lambda: ready[path] if path in ready else from_module(module, group_size, bits, quantizer))

    def replaced(path: str, module: nn.Module, empty, build):
        """The zigzag layer for ``module``: ``empty()`` to load into, or ``build()`` quantizing it."""
        if allocate_only:
            patched.append(path)
            return empty()
        try:
            layer = build()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None  # nothing was replaced yet
        if progress:
            mx.eval(layer.parameters())
            bar.update()
        patched.append(path)
        return layer

    try:
        if quantizer == "gptq" and not allocate_only:
            quantize_gptq()
        model.update_modules(tree_map_with_path(convert, leaves, is_leaf=nn.Module.is_module))
    finally:
        bar.close()
    if skipped:
        warnings.warn(
            f"spqt: {len(skipped)} layer(s) stay dense: " + "; ".join(skipped), stacklevel=2
        )
    if not patched and not allocate_only and not zigzag_layers(model):
        linears = [p for p, m in tree_flatten(leaves, is_leaf=nn.Module.is_module) if isinstance(m, _LINEAR_TYPES)]
        if linears:
            warnings.warn(
                f"spqt: no layer of this model was patched, although it has {len(linears)} linear layers "
                f"(e.g. {linears[0]}); none of them is a projection inside a numbered stack of blocks"
                + (" that the predicate selects" if predicate is not None else "") + ".",
                stacklevel=2,
            )
    if patched or allocate_only:
        from .blocks import fuse_blocks
        from .sharded import make_shardable

        make_shardable(model)  # model.shard(group) shards zigzag layers too
        fuse_blocks(model)  # known block structures decode with fused products
        fuse_experts(model)  # SwiGLU experts decode in two launches
    if thresholds is not None:
        layers = zigzag_layers(model)
        if isinstance(thresholds, Mapping):
            # Layers that stayed dense were warned about; their thresholds have nothing to act on.
            thresholds = {path: t for path, t in thresholds.items() if path in layers}
        else:
            thresholds = {path: thresholds for path in patched}
        set_thresholds(model, thresholds)
    return patched


def zigzag_layers(model: nn.Module) -> dict[str, ZigzagLinear | ZigzagSwitchLinear]:
    """The zigzag layers of ``model`` by path, in model order: its ZigzagLinear projections and
    ZigzagSwitchLinear experts."""
    return {path: m for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
            if isinstance(m, ZIGZAG_TYPES)}


def _projection_layers(model: nn.Module) -> dict[str, ZigzagLinear]:
    return {p: m for p, m in zigzag_layers(model).items() if isinstance(m, ZigzagLinear)}


def set_criterion(model: nn.Module, criterion: str) -> None:
    """How the ZigzagLinear layers of ``model`` pick their input columns on decode steps, for the
    thresholds they hold now and later: ``"teal"`` keeps column j where |x_j| > t; ``"wina"`` where
    |x_j| * ||W[:, j]|| > t (:data:`~spqt_mlx.patch.linear.CRITERIA`). Siblings that read one input
    (q/k/v, gate/up) take the norms of their stacked matrix, so they keep one active set.
    Thresholds calibrated for one criterion mean nothing under the other: calibrate for the
    criterion set (``calibrate(..., criterion=...)``). Experts (ZigzagSwitchLinear) keep TEAL's:
    their column norms differ from expert to expert, and a token's experts share one active set."""
    check_criterion(criterion)
    layers = _projection_layers(model)
    scales = column_scales(layers) if criterion == "wina" else dict.fromkeys(layers)
    for path, layer in layers.items():
        layer.set_column_scale(scales[path])


def get_criterion(model: nn.Module) -> str:
    """The criterion the ZigzagLinear layers of ``model`` run with (see :func:`set_criterion`)."""
    scaled = {layer.column_scale is not None for layer in _projection_layers(model).values()}
    if len(scaled) > 1:
        raise ValueError("the model's layers run with different criteria; call set_criterion.")
    return "wina" if scaled == {True} else "teal"


def column_scales(layers: Mapping[str, nn.Module]) -> dict[str, mx.array]:
    """WINA's column scale of each projection ``{path: layer}`` (ZigzagLinear, nn.Linear or
    nn.QuantizedLinear): the norms ||W[:, j]|| of its effective weight, or of the matrix stacked
    with its siblings that read the same input (one array object per group, evaluated)."""
    from .fused import shared_input_groups

    norms = {}
    for path, layer in layers.items():
        norms[path] = mx.sqrt(mx.sum(mx.square(effective_weight(layer).astype(mx.float32)), axis=0))
        mx.eval(norms[path])  # one layer's float weight at a time
    for group in shared_input_groups(list(layers)):
        shared = mx.sqrt(sum(mx.square(norms[p]) for p in group))
        mx.eval(shared)
        for p in group:
            norms[p] = shared
    return norms


def effective_weight(layer: nn.Module) -> mx.array:
    """The (output, input) matrix a ZigzagLinear, nn.QuantizedLinear or nn.Linear multiplies by; the
    (experts, output, input) weights of a ZigzagSwitchLinear, SwitchLinear or QuantizedSwitchLinear."""
    if isinstance(layer, ZIGZAG_TYPES):
        return layer.dequantized_weight()
    if isinstance(layer, _expert_types()):
        from .experts import _expert_weight

        return _expert_weight(layer)
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                             bits=layer.bits, mode=layer.mode)
    if isinstance(layer, nn.Linear):
        return layer.weight
    raise TypeError(f"expected a linear or experts layer, got {type(layer).__name__}.")


def get_thresholds(model: nn.Module) -> dict[str, float]:
    """``{path: threshold}`` for every zigzag layer of ``model`` (projections and experts)."""
    return {path: layer.threshold for path, layer in zigzag_layers(model).items()}


def set_thresholds(model: nn.Module, thresholds: float | Mapping[str, float]) -> None:
    """Set the thresholds of zigzag layers: one number for all, or ``{path: threshold}``.

    Every path in a mapping must be a zigzag layer of ``model``; layers not named keep theirs.
    """
    layers = zigzag_layers(model)
    if not isinstance(thresholds, Mapping):
        thresholds = {path: thresholds for path in layers}
    unknown = sorted(set(thresholds) - set(layers))
    if unknown:
        raise ValueError(f"no zigzag layer at: {unknown}")
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
    """Mean sparsity of the decode tokens' products since :func:`record_stats` (single tokens, and
    every row of a batch's decode step), and the token count.

    Each layer's skipped fraction of input columns is averaged over its sparse calls, then the
    layers are averaged weighted by their parameter counts, so the result is the fraction of
    weight bytes not read per token (a batch reads the union of its rows' columns, so fewer are
    skipped per step). Returns ``None`` when nothing was recorded. Synchronizes.
    """
    skipped = weight = 0.0
    calls = 0
    for layer in zigzag_layers(model).values():
        n, active = layer.stats()
        if n == 0:
            continue
        # Bytes a token reads: a ZigzagSwitchLinear's n counts expert rows, each one expert's weight.
        size = layer.input_dims * layer.output_dims * layer.rows_per_token
        skipped += size * (1.0 - active / (n * layer.input_dims))
        weight += size
        calls = max(calls, n // layer.rows_per_token)  # tokens, not expert rows
    if weight == 0:
        return None
    return skipped / weight, calls
