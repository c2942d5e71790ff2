"""TEAL-style calibration: per-projection activation thresholds for a target sparsity.

Calibration tokens run through the model once, densely. Every projection input is sampled
(|x|, or |x_j| * ||W[:, j]|| under the WINA criterion, a bounded random subsample per projection),
so the threshold that skips a fraction ``s`` of that projection's inputs is the ``s``-quantile of
the samples.

* ``"uniform"``: every projection gets sparsity ``s = target``.
* ``"greedy"``: per transformer block, all projection sparsities start at 0; each step raises the
  one projection whose raise (``step / size_weight``, so every step adds the same amount of
  skipped weight) gives the lowest L2 error of the block output against the dense block, until
  the parameter-weighted sparsity of the block reaches the target. Projections that share an
  input (q/k/v, gate/up) get their own sparsities. A block keeps the uniform allocation in the
  rare case that it has the lower error on the calibration data.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm.auto import tqdm

from .patch.experts import ZigzagSwitchLinear
from .patch.linear import ZigzagLinear, check_criterion
from .patch.model import (_expert_types, column_scales, effective_weight, get_criterion, projections, set_criterion, set_thresholds,
                          zigzag_layers)

METHODS = ("uniform", "greedy")
# Greedy searches each block's allocation on about this many calibration tokens (a prefix of each
# sequence, spread over the batch) and judges it against uniform on as many after them
# (block-output error); sparsify judges the whole model on the tokens after those (perplexity).
GREEDY_TOKENS = 128


class _StopForward(Exception):
    """Raised after the last transformer block: calibration never needs the logits."""


# ---- projections during calibration ------------------------------------------------------------


def _parameter_count(layer: nn.Module) -> int:
    if _is_experts(layer):
        return layer.input_dims * layer.output_dims  # one expert's, until a call shows how many a token reads
    if isinstance(layer, ZigzagLinear):
        return layer.input_dims * layer.output_dims
    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[0] * layer.weight.shape[1] * 32 // layer.bits
    return layer.weight.size


class _Probe(nn.Module):
    """Stands in for one projection: samples its inputs and applies candidate sparsities.

    Products run in float32 with the layer's effective (dequantized) weight. On the CPU they go
    through NumPy, whose BLAS is much faster than MLX's CPU matmul; elsewhere through MLX.
    """

    def __init__(self, layer: nn.Module, max_samples: int, rng: np.random.Generator, scale: mx.array | None = None):
        super().__init__()
        self._layer = layer
        # The criterion's weight per input column (WINA: column norms); samples and masks use
        # |x| * scale, the quantity a threshold is compared with.
        self._scale = None if scale is None else np.array(scale, dtype=np.float32)
        self._max_samples = max_samples
        self._rng = rng
        self._samples: list[np.ndarray] = []
        self._sorted: np.ndarray | None = None
        self._weight_t = None
        self._bias = None
        # Per-candidate thresholds: x holds one batch slice per candidate; None means dense.
        self._thresholds: np.ndarray | None = None
        self.record = True
        self.size = _parameter_count(layer)

    def _ensure_weight(self):
        if self._weight_t is None:
            w = effective_weight(self._layer).astype(mx.float32)
            bias = self._layer.bias.astype(mx.float32) if "bias" in self._layer else None
            if _use_numpy():
                self._weight_t = np.ascontiguousarray(np.array(w).T)
                self._bias = None if bias is None else np.array(bias)
            else:
                self._weight_t, self._bias = w.T, bias

    def release(self):
        self._weight_t = self._bias = None

    def _sample(self, a: np.ndarray) -> None:
        flat = a.reshape(-1)
        if flat.size > self._max_samples:
            flat = self._rng.choice(flat, self._max_samples, replace=False)
        self._samples.append(np.array(flat, dtype=np.float32))
        self._sorted = None

    def sorted_samples(self) -> np.ndarray:
        if self._sorted is None:
            if not self._samples:
                raise RuntimeError("no activations were recorded for this projection")
            s = np.concatenate(self._samples)
            if s.size > self._max_samples:
                s = self._rng.choice(s, self._max_samples, replace=False)
            self._sorted = np.sort(s)
            self._samples = [self._sorted]
        return self._sorted

    def threshold(self, sparsity: float) -> float:
        """The |x| (times the column scale) below which a fraction ``sparsity`` of the recorded
        inputs lies."""
        if sparsity <= 0:
            return 0.0
        # Linear interpolation between order statistics (np.quantile's default), without its sort.
        samples = self.sorted_samples()
        pos = min(sparsity, 1.0) * (samples.size - 1)
        lo = int(pos)
        hi = min(lo + 1, samples.size - 1)
        return float(samples[lo] + (pos - lo) * (samples[hi] - samples[lo]))

    def __call__(self, x: mx.array) -> mx.array:
        self._ensure_weight()
        shape, dtype = x.shape, x.dtype
        K = shape[-1]
        if _use_numpy():
            a = np.array(x.astype(mx.float32)).reshape(-1, K)
            score = np.abs(a) if self._scale is None else np.abs(a) * self._scale
            if self.record:
                self._sample(score)
            if self._thresholds is not None:
                c = len(self._thresholds)
                a = (a.reshape(c, -1, K) * (score.reshape(c, -1, K) > self._thresholds[:, None, None])).reshape(-1, K)
            y = a @ self._weight_t
            if self._bias is not None:
                y += self._bias
            y = mx.array(y)
        else:
            a = x.astype(mx.float32).reshape(-1, K)
            score = mx.abs(a) if self._scale is None else mx.abs(a) * mx.array(self._scale)
            if self.record:
                self._sample(np.array(score))
            if self._thresholds is not None:
                c = len(self._thresholds)
                t = mx.array(self._thresholds)[:, None, None]
                a = (a.reshape(c, -1, K) * (score.reshape(c, -1, K) > t)).reshape(-1, K)
            y = a @ self._weight_t
            if self._bias is not None:
                y = y + self._bias
        y = y.reshape(*shape[:-1], -1).astype(dtype)
        if self.record:
            # The recording pass calls each projection once: drop its float32 weight now, so that
            # calibration holds one projection's float weight at a time, not the whole model's
            # (280 GB for a 70B model).
            mx.eval(y)
            self.release()
        return y


class _ExpertsProbe(_Probe):
    """Stands in for the experts of a MoE projection (a ZigzagSwitchLinear, SwitchLinear or
    QuantizedSwitchLinear), called as they are: samples the inputs of the rows routed to them (a
    token's gate/up input once, down's input once per selected expert) and applies candidate
    sparsities, with the experts' float32 weights through MLX."""

    def _ensure_weight(self):
        if self._weight_t is None:
            self._weight_t = effective_weight(self._layer).astype(mx.float32).swapaxes(-1, -2)  # (E, K, N)
            self._bias = self._layer.bias.astype(mx.float32) if "bias" in self._layer else None

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        # Calibration runs the experts in token order (_experts_in_token_order), so x keeps its
        # batch axis, on which candidate thresholds are stacked.
        self._ensure_weight()
        dtype, K = x.dtype, x.shape[-1]
        a = x.astype(mx.float32)
        if self.record:
            self._sample(np.abs(np.array(a)).reshape(-1, K))
            # What a token reads: one expert's weight per expert it is routed to.
            self.size = self._layer.input_dims * self._layer.output_dims * (indices.shape[-1] if indices.ndim else 1)
        if self._thresholds is not None:
            c = len(self._thresholds)
            t = mx.array(self._thresholds).reshape(c, *([1] * (a.ndim - 1)))
            a = a.reshape(c, -1, *a.shape[1:])
            a = mx.where(mx.abs(a) > t[:, None], a, 0.0).reshape(x.shape)
        y = mx.gather_mm(a, self._weight_t, rhs_indices=indices)
        if self._bias is not None:
            y = y + mx.expand_dims(self._bias[indices], -2)
        y = y.astype(dtype)
        if self.record:
            mx.eval(y)
            self.release()
        return y


@contextlib.contextmanager
def _experts_in_token_order():
    """mlx-lm's SwitchGLU and SwitchMLP sort the rows of a long call by expert; during calibration
    they keep token order instead (the same products, in another order), so that the probes see
    each call's batch axis, on which candidate thresholds are stacked."""
    from mlx_lm.models import switch_layers

    gather_sort, scatter_unsort = switch_layers._gather_sort, switch_layers._scatter_unsort
    switch_layers._gather_sort = lambda x, indices: (x, indices, None)
    switch_layers._scatter_unsort = lambda x, inv_order, shape=None: (
        x if inv_order is None else scatter_unsort(x, inv_order, shape))
    try:
        yield
    finally:
        switch_layers._gather_sort, switch_layers._scatter_unsort = gather_sort, scatter_unsort


def _is_experts(layer: nn.Module) -> bool:
    return isinstance(layer, (ZigzagSwitchLinear, *_expert_types()))


def _use_numpy() -> bool:
    return mx.default_device() == mx.cpu


# ---- model structure ---------------------------------------------------------------------------


def _projection_paths(model: nn.Module) -> list[str]:
    """The projections to calibrate: the ZigzagLinear layers if any, else what patch_model swaps."""
    zz = zigzag_layers(model)
    if zz:
        return list(zz)
    return projections(model)


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, block) for the transformer blocks, found as the modules in ``model.layers``."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError("greedy calibration needs the transformer blocks as `model.layers` (as in mlx-lm models).")
    ids = {id(b): i for i, b in enumerate(layers)}
    found: dict[int, str] = {}
    for path, m in model.named_modules():
        if id(m) in ids and ids[id(m)] not in found:
            found[ids[id(m)]] = path
    return [(found[i], b) for i, b in enumerate(layers)]


def _modules_at(model: nn.Module, paths: Sequence[str]) -> dict[str, nn.Module]:
    leaves = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    return {p: leaves[p] for p in paths}


@contextlib.contextmanager
def _swapped(model: nn.Module, replacements: Mapping[str, nn.Module]):
    """Temporarily put ``replacements`` ({path: module}) into ``model``."""
    originals = _modules_at(model, list(replacements))
    model.update_modules(tree_unflatten(list(replacements.items())))
    try:
        with _experts_in_token_order() if any(isinstance(m, _ExpertsProbe) for m in replacements.values()) \
                else contextlib.nullcontext():
            yield
    finally:
        model.update_modules(tree_unflatten(list(originals.items())))


@contextlib.contextmanager
def _tapped_blocks(blocks: Sequence[nn.Module], calls: list | None = None, progress=None):
    """Record each block's call arguments (in ``calls``, a list per block, unless None); stop the
    forward pass after the last block (the caller catches _StopForward).

    The blocks keep their identity and attributes (model code reads some of them), so only their
    class is swapped for the duration.
    """
    originals = [type(b) for b in blocks]
    last = len(blocks) - 1
    try:
        for i, block in enumerate(blocks):
            base = type(block)

            def call(self, *args, __i=i, __base=base, **kwargs):
                if calls is not None:
                    calls[__i].append((args, kwargs))
                out = __base.__call__(self, *args, **kwargs)
                if progress is not None:
                    progress.update(1)
                if __i == last:
                    mx.eval(out)
                    raise _StopForward
                return out

            block.__class__ = type(base.__name__, (base,), {"__call__": call})
        yield
    finally:
        for block, cls in zip(blocks, originals):
            block.__class__ = cls


# ---- calibration -------------------------------------------------------------------------------


@dataclass
class _Recording:
    probes: dict[str, _Probe]
    blocks: list[tuple[str, nn.Module]] = field(default_factory=list)
    block_calls: list[list] = field(default_factory=list)


def _vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the model's (first) embedding table, or None if it has none."""
    for _, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
            return m.weight.shape[0]
    return None


def _token_batch(tokens, model: nn.Module) -> mx.array:
    """Token ids as a (batch, L) array: each row is one calibration sequence. Ids outside the
    model's vocabulary are refused (an embedding lookup does not check them)."""
    if isinstance(tokens, mx.array):
        arr = tokens
    else:
        arr = mx.array(np.asarray(tokens))
    if not mx.issubdtype(arr.dtype, mx.integer):
        raise TypeError(f"tokens must be integer token ids, got {arr.dtype}.")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"tokens must have shape (L,) or (batch, L) with L >= 2, got {tuple(arr.shape)}.")
    vocab = _vocabulary_size(model)
    lo, hi = mx.min(arr).item(), mx.max(arr).item()
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}), the model's vocabulary; got values in [{lo}, {hi}].")
    return arr


def _criterion(model: nn.Module, criterion: str | None) -> str:
    """``criterion`` checked, or (None) the one the patched ``model`` runs with ("teal" unpatched)."""
    if criterion is None:
        return get_criterion(model) if zigzag_layers(model) else "teal"
    return check_criterion(criterion)


def _column_scales(layers: Mapping[str, nn.Module], criterion: str) -> dict[str, mx.array | None]:
    """Each projection's column scale under ``criterion``: the layers' own where a patched model
    runs with it already (its norms are computed once, by set_criterion), else computed."""
    if criterion != "wina":
        return dict.fromkeys(layers)
    # Experts keep TEAL's criterion (set_criterion).
    linear = {p: m for p, m in layers.items() if not _is_experts(m)}
    held = {p: getattr(m, "column_scale", None) for p, m in linear.items()}
    scales = held if all(v is not None for v in held.values()) else column_scales(linear)
    return {p: scales.get(p) for p in layers}


def _record(model, tokens, *, with_blocks: bool, max_samples: int, seed: int, progress: bool,
            criterion: str = "teal") -> _Recording:
    paths = _projection_paths(model)
    if not paths:
        raise ValueError("the model has no attention or MLP projections to calibrate.")
    rng = np.random.default_rng(seed)
    layers = _modules_at(model, paths)
    probes = {p: (_ExpertsProbe if _is_experts(layers[p]) else _Probe)(layers[p], max_samples, rng, scale)
              for p, scale in _column_scales(layers, criterion).items()}
    rec = _Recording(probes)
    batch = _token_batch(tokens, model)
    try:
        blocks = _blocks(model)
    except ValueError:
        if with_blocks:
            raise
        blocks = []
    rec.blocks = blocks
    rec.block_calls = [[] for _ in blocks]
    bar = tqdm(total=len(blocks), desc="calibration forward", disable=not progress or not blocks, leave=False)
    with _swapped(model, probes), contextlib.ExitStack() as stack:
        if blocks:
            stack.enter_context(_tapped_blocks([b for _, b in blocks], rec.block_calls, bar))
        try:
            mx.eval(model(batch))
        except _StopForward:
            pass
    bar.close()
    if not with_blocks:
        rec.block_calls = [[] for _ in blocks]
    for probe in probes.values():
        probe.release()  # float weights come back one block at a time when needed
        probe.record = False
        probe.sorted_samples()
    return rec


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number, got {type(sparsity).__name__}.")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}.")
    return float(sparsity)


def calibrate(
    model: nn.Module,
    tokens,
    sparsity: float,
    *,
    method: str = "uniform",
    step: float = 0.05,
    max_sparsity: float = 0.95,
    greedy_tokens: int = GREEDY_TOKENS,
    max_samples: int = 1 << 16,
    seed: int = 0,
    progress: bool = True,
    criterion: str | None = None,
) -> dict[str, float]:
    """Per-projection activation thresholds that reach ``sparsity`` on ``tokens``.

    Args:
        model: an mlx-lm model, patched (its ZigzagLinear layers are calibrated) or not (the
            projections :func:`spqt_mlx.patch.patch_model` would swap are calibrated, under the
            same paths). The model is left unchanged.
        tokens: calibration token ids, shape (L,) or (batch, L); a few hundred tokens suffice.
        sparsity: target fraction of skipped input columns, in [0, 1).
        method: ``"uniform"`` (every projection at ``sparsity``) or ``"greedy"`` (TEAL's block-wise
            allocation, which reaches the same parameter-weighted sparsity per block with a lower
            block-output error). Greedy keeps a block's allocation only where it beats uniform on
            calibration tokens its search did not see (the next ``greedy_tokens``, where the
            sequences are long enough), so a block that it overfits stays uniform. Whether the
            whole allocation beats uniform is judged by perplexity in :func:`sparsify` and
            :func:`choose_sparsity`, which run the patched model.
        criterion: what a threshold is compared with (``spqt_mlx.patch.CRITERIA``): ``"teal"``
            |x_j|, ``"wina"`` |x_j| * ||W[:, j]||. None: the patched model's own
            (:func:`spqt_mlx.patch.set_criterion`; "teal" for a model not patched).
        step: greedy step in sparsity for a projection of average size (larger ones move in
            proportionally smaller steps).
        max_sparsity: greedy never raises a projection above this.
        greedy_tokens: greedy measures block-output errors on about this many tokens (a prefix of
            each calibration sequence); its cost grows linearly with it. The thresholds
            themselves come from all calibration tokens.
        max_samples: |activation| samples kept per projection for the quantiles.
        seed: seed of the subsampling.
        progress: show tqdm progress bars.

    Returns:
        ``{path: threshold}``, ready for :func:`apply_thresholds` or ``patch_model(thresholds=...)``.
    """
    sparsity = _check_sparsity(sparsity)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if not 0 < step <= 1:
        raise ValueError(f"step must lie in (0, 1], got {step}.")
    if not sparsity <= max_sparsity < 1:
        raise ValueError(f"max_sparsity must lie in [sparsity, 1), got {max_sparsity}.")
    if not isinstance(greedy_tokens, int) or greedy_tokens < 2:
        raise ValueError(f"greedy_tokens must be an integer >= 2, got {greedy_tokens!r}.")
    if not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive integer, got {max_samples!r}.")
    return _calibrate(model, tokens, sparsity, method, step=step, max_sparsity=max_sparsity,
                      greedy_tokens=greedy_tokens, max_samples=max_samples, seed=seed, progress=progress,
                      criterion=criterion)[0]


def _calibrate(model, tokens, sparsity, method, *, step=0.05, max_sparsity=0.95, greedy_tokens=GREEDY_TOKENS,
               max_samples=1 << 16, seed=0, progress=True, criterion=None):
    """``calibrate``'s thresholds, and uniform's from the same recording (greedy is judged against
    them)."""
    criterion = _criterion(model, criterion)
    rec = _record(model, tokens, with_blocks=method == "greedy", max_samples=max_samples, seed=seed, progress=progress,
                  criterion=criterion)
    uniform = _uniform_thresholds(rec, sparsity)
    if method == "uniform" or sparsity == 0:
        return uniform, uniform
    sparsities = {p: sparsity for p in rec.probes}  # projections outside blocks stay uniform
    for (block_path, block), calls in tqdm(
        list(zip(rec.blocks, rec.block_calls)), desc="greedy allocation", disable=not progress
    ):
        members = _members(rec.probes, block_path)
        if members:
            search, held_out = _truncated(calls, greedy_tokens), _held_out(calls, greedy_tokens)
            sparsities.update(_greedy_block(block, block_path, search, held_out, members, sparsity, step, max_sparsity))
        for probe in members.values():
            probe.release()
    return {p: rec.probes[p].threshold(s) for p, s in sparsities.items()}, uniform


def _uniform_thresholds(rec: _Recording, sparsity: float) -> dict[str, float]:
    """Every projection at ``sparsity``, from one recording (any number of sparsities can be read
    from it)."""
    thresholds = {p: probe.threshold(sparsity) for p, probe in rec.probes.items()}
    # Siblings reading one input (q/k/v, gate/up) see the same activations, so they get one
    # threshold (their samples differ only by subsampling), which lets them run as one product.
    from .patch.fused import shared_input_groups

    for group in shared_input_groups(list(thresholds)):
        for p in group[1:]:
            thresholds[p] = thresholds[group[0]]
    return thresholds


def _prefix_length(h: mx.array, tokens: int) -> int:
    """Positions per sequence of a call's prefix of about ``tokens`` tokens in all."""
    return _prefix_positions(h.shape[0], h.shape[1], tokens)


def _prefix_positions(batch: int, length: int, tokens: int) -> int:
    """Positions per sequence of a prefix of about ``tokens`` tokens over ``batch`` sequences."""
    return min(length, max(2, -(-tokens // batch)))


def _cut(args, kwargs, n: int):
    """A recorded block call cut to its first ``n`` positions (its square masks too)."""
    h = args[0]
    length = h.shape[1]
    if n == length:
        return args, kwargs

    def cut(a):
        if isinstance(a, mx.array) and a.ndim >= 2 and a.shape[-2:] == (length, length):
            return a[..., :n, :n]
        return a

    return (h[:, :n], *[cut(a) for a in args[1:]]), {k: cut(v) for k, v in kwargs.items()}


def _truncated(calls, tokens: int):
    """The recorded block calls cut to their first positions, about ``tokens`` tokens in all.

    With causal attention a prefix of a sequence gives exactly the outputs it gave in the full
    sequence, so the block-output error on a prefix is exact for those tokens.
    """
    return [_cut(args, kwargs, _prefix_length(args[0], tokens)) for args, kwargs in calls]


def _held_out(calls, tokens: int):
    """``(call, start)`` pairs whose positions from ``start`` on are the tokens after the prefix
    that ``_truncated(calls, tokens)`` keeps, up to as many again: scored there, an allocation is
    judged on tokens its search did not see. Empty where the sequences are no longer than that prefix."""
    out = []
    for args, kwargs in calls:
        n = _prefix_length(args[0], tokens)
        if n < args[0].shape[1]:
            out.append((_cut(args, kwargs, min(args[0].shape[1], 2 * n)), n))
    return out


def _members(probes: Mapping[str, _Probe], block_path: str) -> dict[str, _Probe]:
    return {p: pr for p, pr in probes.items() if p.startswith(block_path + ".")}


@contextlib.contextmanager
def _probed_block(block: nn.Module, block_path: str, probes: Mapping[str, _Probe], calls):
    """Put the probes into ``block``; yields the dense reference outputs of its recorded calls."""
    relative = {p[len(block_path) + 1 :]: pr for p, pr in probes.items()}
    with _swapped(block, relative):
        yield [np.array(block(*args, **kwargs).astype(mx.float32)) for args, kwargs in calls]


def _block_errors(block, calls, probes: Mapping[str, _Probe], thresholds: np.ndarray, reference,
                  starts=None) -> np.ndarray:
    """L2 error of the block output for each row of ``thresholds`` (one column per probe), over
    every position, or over the positions from ``starts[i]`` on in call i.

    All rows run as one batch: the block input is repeated once per row.
    """
    c = len(thresholds)
    for j, probe in enumerate(probes.values()):
        probe._thresholds = np.ascontiguousarray(thresholds[:, j], dtype=np.float32)
    try:
        sq = np.zeros(c)
        for i, ((args, kwargs), ref) in enumerate(zip(calls, reference)):
            h = args[0]
            start = 0 if starts is None else starts[i]
            out = block(mx.concatenate([h] * c, axis=0) if c > 1 else h, *args[1:], **kwargs)
            out = np.array(out.astype(mx.float32)).reshape(c, h.shape[0], h.shape[1], -1)[:, :, start:]
            ref = ref.reshape(h.shape[0], h.shape[1], -1)[:, start:]
            sq += ((out - ref[None]) ** 2).reshape(c, -1).sum(axis=1)
        return np.sqrt(sq)
    finally:
        for probe in probes.values():
            probe._thresholds = None


def _greedy_block(block, block_path, calls, held_out, probes: Mapping[str, _Probe], target, step,
                  max_sparsity) -> dict[str, float]:
    for args, _ in calls:
        if not args or not isinstance(args[0], mx.array) or args[0].ndim != 3:
            raise ValueError("greedy calibration needs blocks called as block(hidden_states, ...).")
    names = list(probes)
    sizes = np.array([probes[n].size for n in names], dtype=np.float64)
    weights = sizes / sizes.mean()  # a step adds step/len(names) to the block's weighted sparsity
    total = weights.sum()

    def thresholds(rows: np.ndarray) -> np.ndarray:
        return np.array([[probes[n].threshold(v) for n, v in zip(names, row)] for row in rows])

    with _probed_block(block, block_path, probes, calls) as reference:
        s = np.zeros(len(names))
        error = np.inf
        while (gap := target * total - weights @ s) > 1e-9:
            rows = []
            for j in range(len(names)):
                # The last step is cut short so that the block lands exactly on the target.
                delta = min(step / weights[j], max_sparsity - s[j], gap / weights[j])
                if delta > 1e-12:
                    row = s.copy()
                    row[j] += delta
                    rows.append(row)
            if not rows:
                break
            rows = np.array(rows)
            errors = _block_errors(block, calls, probes, thresholds(rows), reference)
            best = int(np.argmin(errors))
            s, error = rows[best], errors[best]
        uniform = np.full(len(names), target)
        if not held_out:
            if _block_errors(block, calls, probes, thresholds(uniform[None]), reference)[0] < error:
                s = uniform
            return dict(zip(names, s.tolist()))
    # Greedy against uniform on the held-out tokens: the allocation is kept only where it generalizes.
    judge = [call for call, _ in held_out]
    with _probed_block(block, block_path, probes, judge) as reference:
        greedy_error, uniform_error = _block_errors(block, judge, probes, thresholds(np.stack([s, uniform])), reference,
                                                    [start for _, start in held_out])
    return dict(zip(names, (s if greedy_error < uniform_error else uniform).tolist()))


def _use_criterion(model: nn.Module, criterion: str | None) -> None:
    """Set ``criterion`` on a patched model unless it runs with it already (WINA's norms cost a
    pass over every weight)."""
    if criterion is not None and _criterion(model, criterion) != get_criterion(model):
        set_criterion(model, criterion)


def sparsify(model: nn.Module, tokens, sparsity: float, method: str = "uniform", *, progress: bool = True,
             criterion: str | None = None, bos: int | None = None) -> dict[str, float]:
    """Calibrate the thresholds of a patched ``model`` for ``sparsity`` on ``tokens`` and set them,
    with ``criterion`` (set on the model first; None keeps the model's).

    Greedy's allocation is kept only where the model's perplexity with it is no higher than with
    uniform thresholds, scored on each calibration sequence's tokens after the ones greedy's search
    and its per-block verdicts saw (whole sequences where fewer than 64 are left); ``bos``
    (``texts.leading_token``) starts each scored window. Sparsity 0 sets every threshold to 0
    (dense) without running the model. Returns the thresholds.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}.")
    _use_criterion(model, criterion)
    if _check_sparsity(sparsity) == 0.0:
        thresholds = {p: 0.0 for p in zigzag_layers(model)}
    else:
        thresholds, uniform = _calibrate(model, tokens, sparsity, method, progress=progress)
        if thresholds != uniform:
            thresholds = _lowest(model, (thresholds, uniform), _judge_tokens(tokens), bos)[1]  # ties: greedy
    set_thresholds(model, thresholds)
    return thresholds


def _judge_tokens(tokens, min_tokens: int = 64) -> list[list[int]]:
    """The calibration sequences that judge greedy against uniform: each sequence's tokens after
    the positions greedy's search and per-block verdicts used, or the whole sequences where fewer
    than ``min_tokens`` would be left in all."""
    rows = np.asarray(tokens)
    rows = rows.reshape(1, -1) if rows.ndim == 1 else rows
    seen = 2 * _prefix_positions(rows.shape[0], rows.shape[1], GREEDY_TOKENS)
    rest = [row[seen:].tolist() for row in rows]
    return rest if sum(len(r) for r in rest) >= min_tokens else [row.tolist() for row in rows]


def _lowest(model: nn.Module, options, sequences, bos: int | None, window: int = 256):
    """``(perplexity, thresholds)`` of the option that scores lowest (``_scored``), the first of
    equal scores; options equal to an earlier one are not scored again."""
    distinct = [t for i, t in enumerate(options) if t not in options[:i]]
    return min(((_scored(model, t, sequences, bos, window), t) for t in distinct), key=lambda pair: pair[0])


def _scored(model: nn.Module, thresholds: Mapping[str, float], sequences, bos: int | None, window: int = 256) -> float:
    """Perplexity of the patched ``model`` over ``sequences`` (each scored on its own, masked as
    decode skips) with ``thresholds`` set."""
    from .perplexity import perplexity

    set_thresholds(model, thresholds)
    loss, count = 0.0, 0
    for seq in sequences:
        if len(seq) < 2:
            continue
        result = perplexity(model, seq, window=min(window, len(seq)), bos=bos, progress=False)
        loss += math.log(result["perplexity"]) * result["tokens"]
        count += result["tokens"]
    if count == 0:
        raise ValueError("no calibration sequence has the two tokens a perplexity needs.")
    return math.exp(loss / count)


# ---- sparsity chosen by a quality budget ---------------------------------------------------------

DEFAULT_MAX_PPL_INCREASE = 5.0  # percent
AUTO_CANDIDATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def check_budget(max_increase: float) -> None:
    """A ValueError unless ``max_increase`` is a perplexity budget: a finite percentage >= 0."""
    if not math.isfinite(max_increase) or max_increase < 0:
        raise ValueError(f"the perplexity budget must be a percentage >= 0, got {max_increase}.")


def choose_sparsity(model, tokens, *, max_increase: float = DEFAULT_MAX_PPL_INCREASE, method: str = "uniform",
                    candidates=AUTO_CANDIDATES, window: int = 256, criterion: str | None = None,
                    bos: int | None = None) -> tuple[float, dict[str, float], list[dict]]:
    """The largest sparsity whose perplexity rises by at most ``max_increase`` percent, under
    ``criterion`` (set on the model first; None keeps the model's).

    The first half of ``tokens`` calibrates the thresholds of each candidate sparsity (in
    ascending order), the second half is scored (masked, as decoding skips) against sparsity 0;
    the search stops at the first candidate over the budget; ``bos`` (``texts.leading_token``)
    starts every scored window. With ``method="greedy"`` each candidate keeps greedy's allocation or
    uniform thresholds, whichever scores lower. The chosen thresholds are set on the patched
    ``model``. Returns ``(sparsity, thresholds, rows)``, a row per sparsity tried:
    ``{"sparsity", "perplexity", "increase"}`` (increase in percent).
    """
    check_budget(max_increase)
    tokens = list(tokens)
    if len(tokens) < 32:
        raise ValueError(f"choosing a sparsity needs at least 32 tokens (half to calibrate, half to score), got {len(tokens)}.")
    half = len(tokens) // 2
    calibration, held_out = tokens[:half], tokens[half:]
    window = min(window, len(held_out))

    _use_criterion(model, criterion)
    if method == "uniform":  # one recording gives every candidate's thresholds
        rec = _record(model, calibration, with_blocks=False, max_samples=1 << 16, seed=0, progress=False,
                      criterion=_criterion(model, None))

        def options_for(s):
            return (_uniform_thresholds(rec, s),)
    else:
        def options_for(s):  # greedy's allocation, kept only where it scores no worse than uniform
            return _calibrate(model, calibration, s, method, progress=False)

    chosen = sparsify(model, calibration, 0.0, method, progress=False)
    base = _scored(model, chosen, [held_out], bos, window)
    rows = [{"sparsity": 0.0, "perplexity": base, "increase": 0.0}]
    best = 0.0
    for s in sorted(candidates):
        ppl, thresholds = _lowest(model, options_for(s), [held_out], bos, window)
        rows.append({"sparsity": s, "perplexity": ppl, "increase": 100.0 * (ppl / base - 1.0)})
        if not rows[-1]["increase"] <= max_increase:
            break
        best, chosen = s, thresholds
    set_thresholds(model, chosen)
    return best, chosen, rows


def describe_choice(sparsity: float, rows: list[dict], max_increase: float, source: str) -> str:
    """One line on what ``choose_sparsity`` chose and why."""
    chosen = next(r for r in rows if r["sparsity"] == sparsity)
    line = (f"sparsity auto: {sparsity:.0%} (perplexity {chosen['increase']:+.1f} % on held-out tokens of {source}, "
            f"budget {max_increase:g} %)")
    over = [r for r in rows if r["sparsity"] > sparsity]
    if over:
        line += f"; {over[0]['sparsity']:.0%} would cost {over[0]['increase']:+.1f} %"
    return line


def apply_thresholds(model: nn.Module, thresholds: float | Mapping[str, float]) -> None:
    """Set the ZigzagLinear thresholds of ``model``: ``{path: threshold}`` or one number for all."""
    set_thresholds(model, thresholds)


def block_output_errors(model: nn.Module, tokens, thresholds: Mapping[str, float]) -> list[float]:
    """Per transformer block, the L2 error of its output with ``thresholds`` against dense.

    Each block gets its dense input (the same input it would see in the unsparsified model), so
    errors are comparable between allocations; this is the quantity greedy calibration minimizes.
    """
    rec = _record(model, tokens, with_blocks=True, max_samples=1, seed=0, progress=False,
                  criterion=_criterion(model, None))
    unknown = sorted(set(thresholds) - set(rec.probes))
    if unknown:
        raise ValueError(f"thresholds name layers that are not calibrated projections: {unknown}")
    errors = []
    for (block_path, block), calls in zip(rec.blocks, rec.block_calls):
        members = _members(rec.probes, block_path)
        row = np.array([[thresholds.get(p, 0.0) for p in members]])
        with _probed_block(block, block_path, members, calls) as reference:
            errors.append(float(_block_errors(block, calls, members, row, reference)[0]))
        for probe in members.values():
            probe.release()
    return errors


def input_sparsity(model: nn.Module, tokens, thresholds: Mapping[str, float], *, max_samples: int = 1 << 20) -> dict[str, float]:
    """Per projection, the fraction of its dense-run inputs on ``tokens`` with ``|x| <= threshold``.

    The sparsity that ``thresholds`` give on these tokens, projection by projection (estimated
    from up to ``max_samples`` inputs each).
    """
    rec = _record(model, tokens, with_blocks=False, max_samples=max_samples, seed=0, progress=False,
                  criterion=_criterion(model, None))
    unknown = sorted(set(thresholds) - set(rec.probes))
    if unknown:
        raise ValueError(f"thresholds name layers that are not calibrated projections: {unknown}")
    return {
        p: float(np.searchsorted(rec.probes[p].sorted_samples(), t, side="right") / rec.probes[p].sorted_samples().size)
        for p, t in thresholds.items()
    }
