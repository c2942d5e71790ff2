"""Projections that read the same input, run as one zigzag product.

Attention's q/k/v projections read the same normalized hidden state, and so do the MLP's gate and
up projections. Stacking their bands gives one weight whose single-token product is one GEMV
(and one active-column collection) instead of three or two: fewer, larger launches, which is what
a host-bound decode step needs. Each layer keeps its own parameters as views into the stacked
arrays, so memory is not duplicated and saving a model writes the same tensors as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .. import _ext
from .linear import ZigzagLinear, zigzag_product

# Sibling projections that read one input in mlx-lm's models, by attribute name.
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def shared_input_groups(paths: Sequence[str]) -> list[list[str]]:
    """Groups of at least two ``paths`` that are sibling projections reading one input."""
    if isinstance(paths, str) or not all(isinstance(p, str) for p in paths):
        raise TypeError("paths must be a sequence of module paths (strings).")
    present = set(paths)
    groups = []
    for path in paths:
        parent, _, name = path.rpartition(".")
        for names in SHARED_INPUTS:
            if name == names[0]:
                members = [f"{parent}.{n}" if parent else n for n in names]
                members = [m for m in members if m in present]
                if len(members) >= 2:
                    groups.append(members)
    return groups


class SharedInputGroup:
    """The stacked weight of sibling ZigzagLinear layers and the last product computed with it.

    The first sibling called with a given ``x`` computes the stacked product; the others called
    with the same array take their slice of it. A sibling called with another array means the
    inputs are not shared after all: the group then stops stacking and every layer runs alone.
    """

    def __init__(self, layers: Sequence[ZigzagLinear]):
        first = layers[0]
        self.layers = list(layers)
        self.group_size, self.bits = first.group_size, first.bits
        self.bounds = []
        band = 0
        for m in layers:
            bands = m["weight"].shape[0]
            self.bounds.append((band * self.group_size, (band + bands) * self.group_size))
            band += bands
        self._stack()
        self._split_at = [hi for _, hi in self.bounds[:-1]]
        self.enabled = True
        self._pieces = None  # the siblings' outputs for _x, until each has taken its own
        self._x = None
        self._pending = 0
        self.thresholds_changed()

    def _stack(self) -> None:
        """Stack the members' current parameters; the members' parameters become views of the
        stacked arrays (their own copies, and any earlier stack, are freed once evaluated).

        Lazy, like the rest of MLX: a model that was never evaluated stays unevaluated, and an
        evaluated one is stacked a group at a time (peak memory: one group's copy)."""
        layers = self.layers
        self.weight = mx.concatenate([m["weight"] for m in layers])
        self.scales = mx.concatenate([m["scales"] for m in layers])
        self.biases = mx.concatenate([m["biases"] for m in layers])
        evaluated = all(_ext.is_evaluated(m["weight"]) for m in layers)
        if evaluated:
            mx.eval(self.weight, self.scales, self.biases)
        for m, (lo, hi) in zip(layers, self.bounds):
            b0, b1 = lo // self.group_size, hi // self.group_size
            m.weight, m.scales, m.biases = self.weight[b0:b1], self.scales[b0:b1], self.biases[b0:b1]
            if evaluated:
                mx.eval(m.weight, m.scales, m.biases)
        self._views = [(m["weight"], m["scales"], m["biases"]) for m in layers]

    def _restack_if_changed(self) -> bool:
        """Stack again when a member's parameters were replaced (``load_weights``, ``set_dtype``),
        so the group never computes with a stale copy or keeps one alive. False if the members
        no longer fit one stack (their dtypes or formats differ): then they run alone."""
        if self.is_intact():
            return True
        if not fit_one_stack(self.layers) or any(
                m.group_size != self.group_size or m.bits != self.bits or m.output_dims != hi - lo
                for m, (lo, hi) in zip(self.layers, self.bounds)):
            self.enabled = False
            self.weight = self.scales = self.biases = None
            self._views = []
            return False
        self._stack()
        return True

    def thresholds_changed(self) -> None:
        """Called by a member's threshold setter: stacking needs one threshold (and one column
        scale, see set_criterion) for all."""
        first = self.layers[0]
        self._threshold_owner = first if all(
            m._threshold_value == first._threshold_value and m._column_scale is first._column_scale
            for m in self.layers) else None

    def stacked(self):
        """``(weight, scales, biases, layer)``: the stacked arrays and the member whose threshold the
        stack runs with, or None when the members cannot run as one product now (their
        thresholds, formats or dtypes differ)."""
        if not self.enabled or self._threshold_owner is None or not self._restack_if_changed():
            return None
        return self.weight, self.scales, self.biases, self._threshold_owner

    def is_intact(self) -> bool:
        """False once any member's parameters were replaced (e.g. by ``load_weights``)."""
        # A plain loop: the fused decoder blocks ask this for two stacks per block and token.
        for m, (w, s, b) in zip(self.layers, self._views):
            if m["weight"] is not w or m["scales"] is not s or m["biases"] is not b:
                return False
        return True

    def product(self, layer: ZigzagLinear, x: mx.array) -> mx.array | None:
        """``layer``'s part of the stacked product for ``x``, or None to run the layer alone."""
        if not self.enabled:
            return None
        if x is not self._x:
            if x.dtype != self.layers[0]["scales"].dtype:
                # A mixed-dtype call: the layer casts x (once for all siblings, see linear.py)
                # and comes back with the cast array.
                return None
            if self._pending:
                # A sibling skipped the last input: not a shared one. Stop stacking for good.
                self.enabled = False
                self._x = self._pieces = None
                return None
            owner = self._threshold_owner
            if owner is None or not self._restack_if_changed():
                return None
            y = zigzag_product(x, self.weight, self.scales, self.biases, self.group_size, self.bits,
                               owner._threshold_value, owner["_threshold"])
            self._x, self._pieces = x, mx.split(y, self._split_at, axis=-1)
            self._pending = len(self.layers)
        self._pending -= 1
        # By identity (modules compare as dicts; ids change under deepcopy).
        y = self._pieces[next(i for i, m in enumerate(self.layers) if m is layer)]
        if not self._pending:
            self._x = self._pieces = None  # every sibling has its part; keep no activations alive
        return y


def identical(a, b) -> bool:
    """Whether two sequences hold the same objects, by identity (modules are dicts and arrays
    compare elementwise: == would compare their contents)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def fit_one_stack(layers: Sequence[ZigzagLinear]) -> bool:
    """Whether ``layers`` can share one stacked weight: one format, one dtype, one input width."""
    first = layers[0]
    return all(m.group_size == first.group_size and m.bits == first.bits and m.input_dims == first.input_dims
               and m["scales"].dtype == first["scales"].dtype for m in layers)


def stack_siblings(layers: Sequence[ZigzagLinear], *, renew: bool = False) -> SharedInputGroup | None:
    """The group that stacks exactly ``layers``: their own if they have one and it still stacks, else
    (with ``renew``, or when none of them is in a group yet) a new one if they fit one stack; None
    when they run alone."""
    group = layers[0]._shared
    if group is not None and group.enabled and identical(group.layers, layers):
        return group
    if not renew and any(m._shared is not None for m in layers):
        return None
    if not fit_one_stack(layers):
        return None
    group = SharedInputGroup(layers)
    for m in layers:
        m._shared = group
    return group


def fuse_shared_inputs(model: nn.Module) -> int:
    """Stack the weights of sibling projections that read one input (q/k/v; gate/up), so each
    group runs one zigzag product per call. Returns the number of groups.

    Thresholds must be equal within a group for the stacked path to run (uniform calibration
    gives them one threshold; a group whose thresholds differ runs its layers one by one). Call it
    after patching, and again after replacing layers. Groups already stacked (by an earlier call or
    by the fused decoder blocks) are kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an mlx.nn.Module, got {type(model).__name__}.")
    layers = {p: m for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
              if isinstance(m, ZigzagLinear)}
    return sum(stack_siblings([layers[p] for p in paths], renew=True) is not None
               for paths in shared_input_groups(list(layers)))
