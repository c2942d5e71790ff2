"""GPTQ in zigzag order: codes chosen with the statistics of each projection's inputs.

GPTQ (Frantar et al., 2022) quantizes a weight one input column at a time and spreads each column's
rounding error over the columns not quantized yet, weighted by the inverse of H = X^T X, the second
moment of the layer's inputs on calibration text; it minimizes ||X W^T - X W_q^T|| rather than
||W - W_q||. Row-wise group formats must fix a group's scale before its later columns are updated;
in the zigzag layout a group is ``group_size`` rows of one column, so every group of a column is
chosen from that column's values as GPTQ has updated them (the "search" fit, see layout.py).

    H = input_hessians(model, tokens)                 # the float model, before patching
    patch_model(model, quantizer="gptq", hessians=H)

``spqt-convert``, ``spqt-generate --spqt`` and ``spqt-perplexity`` do this for ``--quantizer gptq``,
on their calibration text.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from tqdm import tqdm

# Added to H's diagonal, as a fraction of its mean: keeps the inverse well conditioned (GPTQ's 1 %).
DAMPING = 0.01
# Columns whose error updates are applied to the rest of the weight at once; within a block every
# column's error updates the block's columns elementwise, so a shorter block does less of that work
# (32 measured 1.2x faster than GPTQ's usual 128 for SmolLM2 on a 2-core CPU, BENCHMARKS.md).
BLOCK = 32
# Calibration sequences are run in windows of this many tokens.
WINDOW = 512


class _Moments:
    """X^T X of one projection's inputs and the number of rows of X, summed over calls.

    On the CPU the products run in NumPy, whose BLAS is much faster than MLX's CPU matmul (as
    calibration's do); elsewhere in MLX. Sums are float32, as GPTQ keeps H: every projection's
    K x K sum lives until the pass ends (about 39 GB for an 8B model). Siblings that read one input
    (q/k/v, gate/up) share a ``cell``: the first to see an input computes its product, the others
    called with that same array add it, and the last of them lets it go."""

    def __init__(self, K: int, on_cpu: bool, cell: dict | None = None):
        self.on_cpu = on_cpu
        self.xtx = np.zeros((K, K), np.float32) if on_cpu else mx.zeros((K, K), dtype=mx.float32)
        self.rows = 0
        self._cell = cell  # {"siblings": n, "x": input, "xtx": its product, "rows": its rows, "left": adds to go}

    def add(self, x: mx.array) -> None:
        cell = self._cell
        if cell is not None and cell["x"] is x and cell["left"] > 0:
            product, rows = cell["xtx"], cell["rows"]
            cell["left"] -= 1
            if cell["left"] == 0:
                cell.update(x=None, xtx=None)
        else:
            a = x.reshape(-1, x.shape[-1]).astype(mx.float32)
            if self.on_cpu:
                a = np.array(a)
            product, rows = a.T @ a, a.shape[0]
            if cell is not None:
                cell.update(x=x, xtx=product, rows=rows, left=cell["siblings"] - 1)
        self.xtx += product  # in place for NumPy's sums
        self.rows += rows

    def hessian(self) -> np.ndarray:
        """H = X^T X / rows, float32; the sum is given up (divided in place on the CPU)."""
        xtx, self.xtx = self.xtx, None
        h = xtx if self.on_cpu else np.array(xtx, dtype=np.float32)
        h /= np.float32(max(self.rows, 1))
        return h


class _Tap(nn.Module):
    """A projection that adds its input to ``moments`` before running.

    On the CPU, where MLX's matmul is about ten times slower than NumPy's BLAS, the projection runs
    as calibration runs it (calibrate._Probe: float32, in NumPy), its float weight made for the
    call and dropped after it."""

    def __init__(self, layer: nn.Module, moments: _Moments):
        super().__init__()
        from .calibrate import _Probe

        self.layer = layer
        self._moments = moments
        self._probe = _Probe(layer, 1, None) if moments.on_cpu else None
        if self._probe is not None:
            self._probe.record = False

    def __call__(self, x, *args, **kwargs):
        self._moments.add(x)
        if self._probe is None or args or kwargs:
            return self.layer(x, *args, **kwargs)
        y = self._probe(x)
        self._probe.release()
        return y


def input_hessians(model: nn.Module, tokens, *, paths: Sequence[str] | None = None, window: int = WINDOW,
                   bos: int | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """``{path: H}`` with H = X^T X / rows (float32, (K, K)) of each projection's input over ``tokens``.

    ``model`` is the float model before patching; ``tokens`` token ids (a list or a 1-D array), run
    in windows of ``window`` tokens, each started with ``bos`` (``texts.leading_token``) where it
    does not start with it already. ``paths`` defaults to the layers ``patch_model`` replaces
    (MoE experts excluded: they keep the per-group quantizer).
    """
    from .calibrate import _blocks, _modules_at, _StopForward, _tapped_blocks, _token_batch, _use_numpy
    from .patch.fused import shared_input_groups
    from .patch.model import _expert_types, _input_dims, projections
    from .texts import with_leading

    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer of at least 2 tokens, got {window!r}.")
    ids = np.asarray(_token_batch(tokens, model)).reshape(-1)
    if paths is None:
        paths = projections(model)
    unknown = sorted(set(paths) - set(projections(model)))
    if unknown:
        raise ValueError(f"paths name layers that are not projections of this model: {unknown}")
    layers = _modules_at(model, list(paths))
    layers = {p: m for p, m in layers.items() if not isinstance(m, _expert_types())}
    if not layers:
        raise ValueError("the model has no projections to collect input statistics for.")
    cells, siblings = {}, {}
    for group in shared_input_groups(list(layers)):
        cell = {"siblings": len(group), "x": None, "xtx": None, "rows": 0, "left": 0}
        cells.update((p, cell) for p in group)
        siblings.update((p, group) for p in group)
    on_cpu = _use_numpy()
    moments = {p: _Moments(_input_dims(m), on_cpu, cells.get(p)) for p, m in layers.items()}
    # The statistics are complete after the last block where every projection is inside one: the
    # logits are never computed.
    try:
        found = _blocks(model)
    except ValueError:
        found = []
    inside = found and all(any(p.startswith(path + ".") for path, _ in found) for p in layers)
    blocks = [block for _, block in found] if inside else []
    model.update_modules(tree_unflatten([(p, _Tap(m, moments[p])) for p, m in layers.items()]))
    try:
        starts = range(0, len(ids) - 1, window)
        for start in tqdm(starts, desc="input statistics", unit="window", leave=False, disable=not progress):
            with _tapped_blocks(blocks) if blocks else contextlib.nullcontext():
                try:
                    model(mx.array(with_leading(ids[start:start + window], bos))[None])
                except _StopForward:
                    pass
            mx.eval([m.xtx for m in moments.values() if not m.on_cpu])
            for cell in cells.values():
                cell.update(x=None, xtx=None, left=0)  # no input is held past its window
    finally:
        model.update_modules(tree_unflatten(list(layers.items())))
    unreached = [p for p, m in moments.items() if m.rows == 0]
    if unreached:
        raise ValueError(f"no calibration input reached {unreached[0]}: its statistics cannot be collected.")
    # Siblings that read one input (q/k/v, gate/up) summed the same products: they get one array, so
    # that the sums are held once and GPTQ factors it once (gptq_quantize_many).
    hessians = {}
    for p, m in moments.items():
        h = m.hessian()
        hessians[p] = next((hessians[s] for s in siblings.get(p, ()) if s in hessians and np.array_equal(hessians[s], h)),
                           h)
    return hessians


def check_hessians(hessians, paths: Sequence[str], dims: Mapping[str, int]) -> None:
    """A ValueError naming the first projection in ``paths`` whose H is missing, misshapen or not finite."""
    if not isinstance(hessians, Mapping):
        raise TypeError(f"hessians must map layer paths to (K, K) arrays, got {type(hessians).__name__}.")
    for p in paths:
        if p not in hessians:
            raise ValueError(f"the gptq quantizer needs the input statistics of {p} (spqt_mlx.gptq.input_hessians).")
        shape = tuple(np.shape(hessians[p]))
        if shape != (dims[p], dims[p]):
            raise ValueError(f"the input statistics of {p} have shape {shape}, expected {(dims[p], dims[p])}.")
        if not np.all(np.isfinite(hessians[p])):
            raise ValueError(f"the input statistics of {p} have non-finite values.")


@functools.lru_cache(maxsize=None)
def _column_fitter(bits: int, dtype: mx.Dtype):
    """layout.group_fitter, compiled: its elementwise steps fuse. One column's groups are small
    arrays, so the fit still costs about one MLX operation's overhead per remaining step (1 ms per
    call on a 2-core CPU, BENCHMARKS.md): what bounds GPTQ's column walk."""
    from .layout import group_fitter

    return mx.compile(group_fitter(bits, dtype))


# Weights walked together take at most about this much memory (the float32 weights being updated,
# their error updates and the Cholesky factors), by the device the walk runs on: a batch of small
# layers, or one large layer alone. On a 2-core CPU, 128 MB batches (4-25 of SmolLM2's layers)
# measured faster than 1 GB ones: there the walk's operations cost by their size as well as by their
# number. On an H200 an operation costs about the same whatever its size, so larger batches pay off:
# 4096x4096 layers took 2.0 s each in 4 GB batches against 12.0 s in 128 MB ones (BENCHMARKS.md).
BATCH_BYTES = {mx.cpu: 128 << 20, mx.gpu: 4 << 30}


def gptq_quantize(w: mx.array, hessian, group_size: int, bits: int, *, damping: float = DAMPING,
                  block: int = BLOCK):
    """The zigzag ``(codes, scales, biases)`` of ``w`` (N, K) by GPTQ with ``hessian`` (K, K): codes
    (N/group_size, K, group_size) as uint32 (numpy), scales and biases (N/group_size, K) as mx arrays
    in ``w``'s dtype. Columns that no calibration input reached (zero diagonal) are quantized as
    they are, without error feedback from or to them.

    The column walk runs in MLX on the default device (a block of columns per graph); the error
    weights (:func:`error_weights`) in float64 on the CPU (numpy)."""
    return gptq_quantize_many([w], [hessian], group_size, bits, damping=damping, block=block)[0]


def error_weights(hessian, damping: float = DAMPING) -> np.ndarray:
    """GPTQ's error weights for inputs of ``hessian`` (K, K): the upper Cholesky factor of the
    damped H^-1 (float32), whose row k holds column k's error weights for the later columns.
    Columns no input reached (zero diagonal) get none."""
    H = np.array(hessian, dtype=np.float64, copy=True)
    K = H.shape[0] if H.ndim == 2 else -1
    if H.shape != (K, K) or not np.all(np.isfinite(H)):
        raise ValueError(f"hessian must be a finite square array, got shape {H.shape}.")
    dead = np.diag(H) <= 0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H[dead, dead] = 1.0
    H[np.diag_indices(K)] += damping * np.mean(np.diag(H))
    # With J the reversal, H = U^-1 U^-T gives J H J = L L^T for L = J U^-1 J (lower): so U is
    # J L^-1 J, one Cholesky factor and one triangular inverse, about a third of the arithmetic of
    # inverting H and then factoring the inverse (what dominates GPTQ's cost at K = 14336).
    L = np.linalg.cholesky(H[::-1, ::-1])
    return _lower_inverse(L)[::-1, ::-1].astype(np.float32)


def _lower_inverse(L: np.ndarray) -> np.ndarray:
    """The inverse of the lower-triangular ``L``, by halves: its products run in NumPy's BLAS."""
    n = L.shape[0]
    if n <= 256:
        return np.linalg.inv(L)
    h = n // 2
    A, D = _lower_inverse(L[:h, :h]), _lower_inverse(L[h:, h:])
    out = np.zeros_like(L)
    out[:h, :h] = A
    out[h:, h:] = D
    out[h:, :h] = -D @ (L[h:, :h] @ A)
    return out


def gptq_quantize_many(weights: Sequence[mx.array], hessians: Sequence, group_size: int, bits: int, *,
                       damping: float = DAMPING, block: int = BLOCK, batch_bytes: int | None = None,
                       progress: bool = False) -> list:
    """:func:`gptq_quantize` of each ``(weights[i], hessians[i])``, in order. Weights of one shape
    and dtype are walked together, in batches of at most ``batch_bytes`` (default: the default
    device's :data:`BATCH_BYTES`): every MLX operation of the column walk then covers the batch, and
    where the walk is bound by the cost of an operation rather than its arithmetic, that cost is paid
    once for the batch. Each weight's result is what it gets alone. ``progress`` shows a bar over
    the weights."""
    if len(weights) != len(hessians):
        raise ValueError(f"got {len(weights)} weights and {len(hessians)} hessians.")
    if batch_bytes is not None and (isinstance(batch_bytes, bool) or not isinstance(batch_bytes, int)
                                    or batch_bytes < 1):
        raise ValueError(f"batch_bytes must be a positive integer, got {batch_bytes!r}.")
    batches: dict[tuple, list[int]] = {}
    for i, (w, h) in enumerate(zip(weights, hessians)):
        if np.shape(h) != (w.shape[-1],) * 2:
            raise ValueError(f"hessian must be a finite ({w.shape[-1]}, {w.shape[-1]}) array for a weight of shape "
                             f"{tuple(w.shape)}, got shape {np.shape(h)}.")
        batches.setdefault((tuple(w.shape), w.dtype), []).append(i)
    out = [None] * len(weights)
    bar = tqdm(total=len(weights), desc="gptq", unit="layer", leave=False, disable=not progress)
    for (shape, _), members in batches.items():
        N, K = shape
        per_weight = 4 * (3 * N * K + K * K)
        limit = BATCH_BYTES[mx.default_device().type] if batch_bytes is None else batch_bytes
        size = max(1, limit // per_weight)
        for start in range(0, len(members), size):
            chosen = members[start:start + size]
            results = _walk([weights[i] for i in chosen], [hessians[i] for i in chosen], group_size, bits,
                            damping, block)
            for i, r in zip(chosen, results):
                out[i] = r
            bar.update(len(chosen))
    bar.close()
    return out


def _walk(weights, hessians, group_size, bits, damping, block):
    """GPTQ's column walk over P weights of one shape (N, K), stacked on a leading axis."""
    P = len(weights)
    N, K = weights[0].shape
    dtype = weights[0].dtype
    factors = {}  # one factorization per H: siblings of one input share theirs (input_hessians)
    for h in hessians:
        if id(h) not in factors:
            factors[id(h)] = error_weights(h, damping)
    U = mx.array(np.stack([factors[id(h)] for h in hessians]))  # (P, K, K)
    del factors
    fit = _column_fitter(bits, dtype)
    bands = N // group_size
    rest = mx.stack([w.astype(mx.float32) for w in weights])  # the columns not quantized yet, as updated
    codes, scales, biases = [], [], []
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, rest = rest[:, :, :i2 - i1], rest[:, :, i2 - i1:]
        errors = []
        for j in range(i2 - i1):
            column = W1[:, :, j]  # (P, N)
            q, s, b, deq = fit(column.reshape(P * bands, group_size))
            e = (column - deq.reshape(P, N)) / U[:, i1 + j, i1 + j][:, None]
            # U is upper triangular: the columns before j get nothing.
            W1 = W1 - e[:, :, None] * U[:, None, i1 + j, i1:i2]
            errors.append(e)
            codes.append(q.reshape(P, bands, group_size))
            scales.append(s.reshape(P, bands))
            biases.append(b.reshape(P, bands))
        if i2 < K:
            rest = rest - mx.stack(errors, axis=2) @ U[:, i1:i2, i2:]
        mx.eval(rest, codes[i1:], scales[i1:], biases[i1:])
    codes = np.stack([np.array(q) for q in codes], axis=2).astype(np.uint32)  # (P, bands, K, group_size)
    scales = mx.stack(scales, axis=2).astype(dtype)
    biases = mx.stack(biases, axis=2).astype(dtype)
    return [(codes[p], scales[p], biases[p]) for p in range(P)]


__all__ = ["input_hessians", "gptq_quantize", "gptq_quantize_many", "check_hessians", "error_weights"]

