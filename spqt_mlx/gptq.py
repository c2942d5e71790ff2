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

from collections.abc import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten
from tqdm import tqdm

# Added to H's diagonal, as a fraction of its mean: keeps the inverse well conditioned (GPTQ's 1 %).
DAMPING = 0.01
# Columns whose error updates are applied to the rest of the weight at once.
BLOCK = 128
# Calibration sequences are run in windows of this many tokens.
WINDOW = 512


class _Moments:
    """X^T X and the number of rows of X, summed over calls."""

    def __init__(self, K: int):
        self.xtx = mx.zeros((K, K), dtype=mx.float32)
        self.rows = 0


class _Tap(nn.Module):
    """A projection that adds the second moment of its input to ``moments`` before running."""

    def __init__(self, layer: nn.Module, moments: _Moments):
        super().__init__()
        self.layer = layer
        self._moments = moments

    def __call__(self, x, *args, **kwargs):
        rows = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self._moments.xtx = self._moments.xtx + rows.T @ rows
        self._moments.rows += rows.shape[0]
        return self.layer(x, *args, **kwargs)


def input_hessians(model: nn.Module, tokens, *, paths: Sequence[str] | None = None, window: int = WINDOW,
                   bos: int | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """``{path: H}`` with H = X^T X / rows (float64, (K, K)) of each projection's input over ``tokens``.

    ``model`` is the float model before patching; ``tokens`` token ids (a list or a 1-D array), run
    in windows of ``window`` tokens, each started with ``bos`` (``texts.leading_token``) where it
    does not start with it already. ``paths`` defaults to the layers ``patch_model`` replaces
    (MoE experts excluded: they keep the per-group quantizer).
    """
    from .calibrate import _modules_at, _token_batch
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
    moments = {p: _Moments(_input_dims(m)) for p, m in layers.items()}
    model.update_modules(tree_unflatten([(p, _Tap(m, moments[p])) for p, m in layers.items()]))
    try:
        starts = range(0, len(ids) - 1, window)
        for start in tqdm(starts, desc="input statistics", unit="window", leave=False, disable=not progress):
            model(mx.array(with_leading(ids[start:start + window], bos))[None])
            mx.eval([m.xtx for m in moments.values()])
    finally:
        model.update_modules(tree_unflatten(list(layers.items())))
    return {p: np.array(m.xtx, dtype=np.float64) / max(m.rows, 1) for p, m in moments.items()}


def check_hessians(hessians, paths: Sequence[str], dims: Mapping[str, int]) -> None:
    """A ValueError naming the first projection in ``paths`` whose H is missing or misshapen."""
    if not isinstance(hessians, Mapping):
        raise TypeError(f"hessians must map layer paths to (K, K) arrays, got {type(hessians).__name__}.")
    for p in paths:
        if p not in hessians:
            raise ValueError(f"the gptq quantizer needs the input statistics of {p} (spqt_mlx.gptq.input_hessians).")
        shape = tuple(np.shape(hessians[p]))
        if shape != (dims[p], dims[p]):
            raise ValueError(f"the input statistics of {p} have shape {shape}, expected {(dims[p], dims[p])}.")


def _rounder(dtype: mx.Dtype):
    """Rounding of float64 values to ``dtype`` (as the format stores scales and dequantizes), in numpy."""
    if dtype == mx.float16:
        return lambda a: a.astype(np.float16).astype(np.float64)
    if dtype == mx.bfloat16:
        def to_bf16(a):
            u = a.astype(np.float32).view(np.uint32)
            u = (u + np.uint32(0x7FFF) + ((u >> 16) & 1)) & np.uint32(0xFFFF0000)  # nearest, ties to even
            return u.view(np.float32).astype(np.float64)
        return to_bf16
    return lambda a: a.astype(np.float32).astype(np.float64)


# The search's candidate scales: n + step codes over the group's range (layout.py's "search").
_STEPS = np.linspace(-1.0, 1.0, 11)


def _fit_groups(v: np.ndarray, bits: int, rounded) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For groups v (G, gs): codes, scale, bias and dequantized values with the lowest squared error
    among min/max and the search's candidate scales (layout.py's "search", in numpy; all candidates
    at once, min/max first so that it wins ties)."""
    n = (1 << bits) - 1
    lo = v.min(axis=1, keepdims=True)
    span = v.max(axis=1, keepdims=True) - lo
    mv = v.mean(axis=1, keepdims=True)
    # Candidate codes from the range, each refitted by least squares: (steps, G, 1) scales and biases.
    q = np.clip(np.round((v - lo) * ((n + _STEPS[:, None, None]) / np.maximum(span, 1e-30))), 0, n)
    mq = q.mean(axis=2, keepdims=True)
    var = np.mean(np.square(q - mq), axis=2, keepdims=True)
    cov = np.mean((q - mq) * (v - mv), axis=2, keepdims=True)
    s = np.where(var > 0, cov / np.maximum(var, 1e-30), 0.0)
    s = np.concatenate([(span / n)[None], s])
    b = np.concatenate([lo[None], mv - s[1:] * mq])
    s, b = rounded(s), rounded(b)
    q = np.where(s == 0, 0.0, np.clip(np.round((v - b) / np.where(s == 0, 1.0, s)), 0, n))
    deq = rounded(rounded(s * q) + b)
    best = np.argmin(np.sum(np.square(deq - v), axis=2), axis=0)  # (G,): the first of equal errors
    g = np.arange(v.shape[0])
    return q[best, g], s[best, g, 0], b[best, g, 0], deq[best, g]


def gptq_quantize(w: mx.array, hessian, group_size: int, bits: int, *, damping: float = DAMPING,
                  block: int = BLOCK):
    """The zigzag ``(codes, scales, biases)`` of ``w`` (N, K) by GPTQ with ``hessian`` (K, K): codes
    (N/group_size, K, group_size) as uint32, scales and biases (N/group_size, K) as float64 values
    already rounded to ``w``'s dtype. Columns that no calibration input reached (zero diagonal)
    are quantized as they are, without error feedback from or to them."""
    N, K = w.shape
    rounded = _rounder(w.dtype)
    W = np.array(w.astype(mx.float32), dtype=np.float64)
    H = np.array(hessian, dtype=np.float64, copy=True)
    if H.shape != (K, K) or not np.all(np.isfinite(H)):
        raise ValueError(f"hessian must be a finite ({K}, {K}) array, got shape {H.shape}.")
    dead = np.diag(H) <= 0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H[dead, dead] = 1.0
    H[np.diag_indices(K)] += damping * np.mean(np.diag(H))
    # The upper Cholesky factor of H^-1: row j holds column j's error weights for the later columns.
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    bands = N // group_size
    codes = np.empty((bands, K, group_size), dtype=np.uint32)
    scales = np.empty((bands, K))
    biases = np.empty((bands, K))
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].copy()
        errors = np.zeros_like(W1)
        for j in range(i2 - i1):
            k = i1 + j
            q, s, b, deq = _fit_groups(W1[:, j].reshape(bands, group_size), bits, rounded)
            codes[:, k] = q
            scales[:, k] = s
            biases[:, k] = b
            e = (W1[:, j] - deq.reshape(-1)) / U[k, k]
            W1[:, j:] -= np.outer(e, U[k, k:i2])
            errors[:, j] = e
        W[:, i2:] -= errors @ U[i1:i2, i2:]
    return codes, scales, biases


__all__ = ["input_hessians", "gptq_quantize", "check_hessians"]

