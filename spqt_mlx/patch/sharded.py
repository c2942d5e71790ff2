"""Tensor parallelism for zigzag layers: what ``model.shard(group)`` does to them.

mlx-lm's model files shard their projections with ``shard_linear`` and ``shard_inplace`` (from
``mlx.nn.layers.distributed``), which know ``nn.Linear`` and ``nn.QuantizedLinear`` only.
``patch_model`` wraps the ``shard`` method of each patched model's class so that, during the call,
both also take zigzag layers:

* ``"all-to-sharded"``: each rank keeps whole bands of output rows (the zigzag layout splits
  there for free); the forward pass is local.
* ``"sharded-to-all"``: each rank keeps a slice of the input columns; the partial products are
  summed with ``mx.distributed.all_sum``. Thresholds act per column, so a rank's sparse step skips
  the small inputs of its own slice.

Like mlx's own sharded layers, gradients with respect to the input are summed over the group.
"""

from __future__ import annotations

import functools
import sys

import mlx.core as mx
from mlx.nn.layers.distributed import sum_gradients

from ..layout import SUPPORTED_GROUP_SIZES, ZigzagWeight
from .experts import ZigzagSwitchLinear
from .linear import ZigzagLinear

_MARK = "__spqt_shard__"


def _parts(n: int, segments, what: str) -> list[tuple[int, int]]:
    """``[start, stop)`` of each segment of ``n``, as mlx's sharding reads ``segments``: a count of
    equal segments, a list of split points (integers) or a list of split fractions."""
    if isinstance(segments, int):
        if segments < 1 or n % segments:
            raise ValueError(f"{what}: {n} cannot be cut into {segments} equal segments.")
        step = n // segments
        return [(i * step, (i + 1) * step) for i in range(segments)]
    points = [int(s) if isinstance(segments[0], int) else int(s * n) for s in segments]
    cuts = [0, *points, n]
    if any(a > b for a, b in zip(cuts[:-1], cuts[1:])):
        raise ValueError(f"{what}: the split points {list(segments)} are not ordered within [0, {n}].")
    return list(zip(cuts[:-1], cuts[1:]))


def _rank_slices(n: int, segments, group: mx.distributed.Group, unit: int, what: str) -> list[tuple[int, int]]:
    """This rank's ``[start, stop)`` in each segment of ``n`` elements, in whole ``unit``s."""
    size, rank = group.size(), group.rank()
    out = []
    for start, stop in _parts(n, segments, what):
        length = stop - start
        if length % (size * unit):
            raise ValueError(f"{what}: a segment of {length} cannot be split over {size} ranks" + (
                f" in whole bands of {unit} rows; {_smaller_groups(length, size, unit)}" if unit > 1 else
                "; use a number of ranks that divides it."))
        share = length // size
        out.append((start + rank * share, start + (rank + 1) * share))
    return out


def _smaller_groups(length: int, size: int, unit: int) -> str:
    """What to do about ``length`` rows that ``size`` ranks cannot split in bands of ``unit``."""
    fits = [g for g in SUPPORTED_GROUP_SIZES if g < unit and length % (size * g) == 0]
    return (f"quantize with a group size of {max(fits)} (--group-size {max(fits)}) or use fewer ranks." if fits
            else "no supported group size splits it: use fewer ranks.")


class _GradientSum:
    """``sum_gradients(group)`` that gives the same array back for the same input, so that sibling
    projections reading one input still see one array (and stack, see fused.py)."""

    def __init__(self, group):
        self._f = sum_gradients(group)
        self._x = self._y = None

    def __call__(self, x: mx.array) -> mx.array:
        if x is not self._x:
            self._x, self._y = x, self._f(x)
        return self._y

    def __deepcopy__(self, memo):
        return self  # one per group, shared by the group's layers (and by copies of them)


_gradient_sums: dict[int, _GradientSum] = {}


def _gradient_sum(group) -> _GradientSum:
    key = id(group)
    if key not in _gradient_sums:
        _gradient_sums[key] = _GradientSum(group)
    return _gradient_sums[key]


def _take(a: mx.array, slices, axis: int) -> mx.array:
    parts = [mx.take(a, mx.arange(lo, hi), axis=axis) for lo, hi in slices]
    return mx.contiguous(mx.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0])


class ZigzagAllToShardedLinear(ZigzagLinear):
    """A rank's bands of output rows of a zigzag layer: the input is whole, the output sharded."""

    @classmethod
    def from_zigzag(cls, layer: ZigzagLinear, *, segments=1, group=None) -> "ZigzagAllToShardedLinear":
        group = group or mx.distributed.init()
        gs = layer.group_size
        bands = _rank_slices(layer.output_dims, segments, group, gs, f"output rows of {layer}")
        band_slices = [(lo // gs, hi // gs) for lo, hi in bands]
        q = layer.qweight
        sharded = cls(
            ZigzagWeight(_take(q.weight, band_slices, 0), _take(q.scales, band_slices, 0),
                         _take(q.biases, band_slices, 0), gs, layer.bits),
            _take(layer.bias, bands, 0) if "bias" in layer else None,
            layer.threshold,
        )
        # The criterion stays the whole layer's (WINA: norms over all rows; siblings keep sharing it).
        sharded.set_column_scale(layer.column_scale)
        sharded.group = group
        sharded._gradient_sum = _gradient_sum(group)
        return sharded

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(self._gradient_sum(x))


class ZigzagShardedToAllLinear(ZigzagLinear):
    """A rank's slice of the input columns of a zigzag layer: the input is sharded, the output
    whole (the ranks' partial products are summed)."""

    @classmethod
    def from_zigzag(cls, layer: ZigzagLinear, *, segments=1, group=None) -> "ZigzagShardedToAllLinear":
        group = group or mx.distributed.init()
        columns = _rank_slices(layer.input_dims, segments, group, 1, f"input columns of {layer}")
        q = layer.qweight
        sharded = cls(
            ZigzagWeight(_take(q.weight, columns, 1), _take(q.scales, columns, 1), _take(q.biases, columns, 1),
                         layer.group_size, layer.bits),
            None,
            layer.threshold,
        )
        if layer.column_scale is not None:
            sharded.set_column_scale(_take(layer.column_scale, columns, 0))
        if "bias" in layer:
            sharded.sharded_bias = layer.bias  # added once, after the sum
            sharded.freeze(keys=["sharded_bias"])
        sharded.group = group
        return sharded

    def __call__(self, x: mx.array) -> mx.array:
        y = mx.distributed.all_sum(super().__call__(x), group=self.group)
        if "sharded_bias" in self:
            y = y + self["sharded_bias"]
        return y


def shard_zigzag_inplace(module: ZigzagLinear, sharding: str, *, segments=1, group=None) -> None:
    """``shard_inplace`` for zigzag layers: the layer keeps the rank's bands (all-to-sharded) or
    input columns (sharded-to-all; the bias stays whole) and its caller communicates, as mlx's
    ``shard_inplace`` leaves it to the caller."""
    if not isinstance(module, ZigzagLinear):
        raise TypeError(f"expected a ZigzagLinear, got {type(module).__name__}.")
    cls = {"all-to-sharded": ZigzagAllToShardedLinear, "sharded-to-all": ZigzagShardedToAllLinear}.get(sharding)
    if cls is None:
        raise ValueError(f"sharding must be 'all-to-sharded' or 'sharded-to-all', got {sharding!r}.")
    sharded = cls.from_zigzag(module, segments=segments, group=group)
    module.weight, module.scales, module.biases = sharded["weight"], sharded["scales"], sharded["biases"]
    if "bias" in sharded:
        module.bias = sharded["bias"]
    module.set_column_scale(sharded.column_scale)
    module._shared = None  # its stacked group, if any, no longer matches


def shard_experts_inplace(module: ZigzagSwitchLinear, sharding: str, *, segments=1, group=None) -> None:
    """``shard_inplace`` for zigzag experts, as mlx shards a SwitchLinear: every expert keeps the
    rank's bands of output rows (all-to-sharded, with their bias) or input columns (sharded-to-all;
    the bias stays whole). The MoE block that owns the experts sums the ranks' outputs."""
    if not isinstance(module, ZigzagSwitchLinear):
        raise TypeError(f"expected a ZigzagSwitchLinear, got {type(module).__name__}.")
    group = group or mx.distributed.init()
    q = module.qweight
    if sharding == "all-to-sharded":
        gs = module.group_size
        rows = _rank_slices(module.output_dims, segments, group, gs, f"output rows of {module}")
        bands = [(lo // gs, hi // gs) for lo, hi in rows]
        module.weight, module.scales, module.biases = (_take(a, bands, 1) for a in (q.weight, q.scales, q.biases))
        if "bias" in module:
            module.bias = _take(module.bias, rows, 1)
    elif sharding == "sharded-to-all":
        columns = _rank_slices(module.input_dims, segments, group, 1, f"input columns of {module}")
        module.weight, module.scales, module.biases = (_take(a, columns, 2) for a in (q.weight, q.scales, q.biases))
    else:
        raise ValueError(f"sharding must be 'all-to-sharded' or 'sharded-to-all', got {sharding!r}.")


def shard_zigzag(module, sharding: str, *, segments=1, group=None):
    """``shard_linear`` for zigzag layers (a new layer; the original is unchanged)."""
    if not isinstance(module, ZigzagLinear):
        raise TypeError(f"expected a ZigzagLinear, got {type(module).__name__}.")
    if sharding == "all-to-sharded":
        return ZigzagAllToShardedLinear.from_zigzag(module, segments=segments, group=group)
    if sharding == "sharded-to-all":
        return ZigzagShardedToAllLinear.from_zigzag(module, segments=segments, group=group)
    raise ValueError(f"sharding must be 'all-to-sharded' or 'sharded-to-all', got {sharding!r}.")


def _with_zigzag(base, for_zigzag):
    @functools.wraps(base)
    def wrapped(module, sharding, *args, **kwargs):
        if isinstance(module, ZigzagLinear):
            return for_zigzag(module, sharding, *args, **kwargs)
        if isinstance(module, ZigzagSwitchLinear) and for_zigzag is shard_zigzag_inplace:
            return shard_experts_inplace(module, sharding, *args, **kwargs)
        return base(module, sharding, *args, **kwargs)

    setattr(wrapped, _MARK, True)
    return wrapped


def make_shardable(model) -> None:
    """Let ``model.shard(group)`` shard zigzag layers: wraps the ``shard`` method of the model's
    class (once) so that mlx-lm's model files see a ``shard_linear`` that takes them too."""
    cls = type(model)
    base = getattr(cls, "shard", None)
    if base is None or getattr(base, _MARK, False):
        return

    @functools.wraps(base)
    def shard(self, *args, **kwargs):
        # The model files bind shard_linear at import: swap it in every loaded model module (a
        # model may shard through submodules defined elsewhere) for the duration of the call.
        swapped = []
        for name, module in list(sys.modules.items()):
            if name.startswith("mlx_lm.models.") and module is not None:
                for attr, for_zigzag in (("shard_linear", shard_zigzag), ("shard_inplace", shard_zigzag_inplace)):
                    current = getattr(module, attr, None)
                    if current is not None and not getattr(current, _MARK, False):
                        setattr(module, attr, _with_zigzag(current, for_zigzag))
                        swapped.append((module, attr, current))
        try:
            out = base(self, *args, **kwargs)
        finally:
            for module, attr, current in swapped:
                setattr(module, attr, current)
        from .blocks import refresh_fused_blocks

        refresh_fused_blocks(self)  # the fused blocks run their sharded projections
        return out

    setattr(shard, _MARK, True)
    cls.shard = shard
