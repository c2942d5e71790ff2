"""The Metal kernels (kernels/metal), run on the SIMT emulator and checked against the CPU ops.

Every bits x group size x activation dtype, dense and sparse walks over index lists, packed lists and
thresholds, on shapes small enough for the emulator: K not a multiple of 32, one-column and empty
lists, unsorted and repeated indices, indices outside [0, K), several rows, and both single-pass and
split (two-dispatch) geometries; and the experts' (gathered) product of mixture-of-experts layers (with
two sets of experts in one launch, the SwiGLU prologue, int32 or uint32 ids), whose skipped weights are
poisoned so that reading one fails. Outputs start poisoned, so an element never
written fails.

The host side is the encoding a Mac runs (dispatch/metal_encoding.h, also used by dispatch/metal.cpp):
the emulator's fake encoder runs each dispatch with the buffers and constants bound to its slots, so
the tests check the kernel names, slots, sizes and split policy along with the kernels.
"""

import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import spqt_mlx
from spqt_mlx import ActiveColumns, _ext
from spqt_mlx._ext import ActiveKind, Prologue

import metal_emulator as emu
from zigzag_reference import dense_weight64, gap_threshold, to_np, unpack_codes

from spqt_mlx.layout import SUPPORTED_BITS as BITS
from spqt_mlx.layout import SUPPORTED_GROUP_SIZES as GROUP_SIZES
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# The GPU and the CPU sum in different orders; after rounding to the output dtype they may differ by
# one unit in the last place.
ULP = {"float32": 0.0, "float16": 2.0**-10, "bfloat16": 2.0**-7}

def raw(a: mx.array) -> np.ndarray:
    """The bits of an mx array as numpy (bfloat16 as uint16)."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def as_float64(r: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == "bfloat16":
        return (r.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return r.astype(np.float64)


class Layer:
    """A random zigzag-quantized (N, K) layer and its dequantized float64 copy."""

    def __init__(self, rng, N, K, group_size, bits, dtype):
        w = mx.array(rng.normal(size=(N, K)).astype(np.float32)).astype(dtype)
        self.q = spqt_mlx.zigzag_quantize(w, group_size, bits, stream=mx.cpu)
        self.w = np.array(spqt_mlx.zigzag_dequantize(self.q, stream=mx.cpu).astype(mx.float32), dtype=np.float64)
        self.raw = (np.array(self.q.weight), raw(self.q.scales), raw(self.q.biases))
        self.group_size, self.bits, self.dtype = group_size, bits, dtype
        self.type_name = next(k for k, v in DTYPES.items() if v == dtype)

    def activations(self, rng, M):
        return mx.array(rng.normal(size=(M, self.w.shape[1])).astype(np.float32)).astype(self.dtype)

    def check(self, emulator, x, kind, active, cols, reference, **launch):
        """Runs the emulated kernels on (x, active) and compares with the CPU op's output."""
        got = emulator.zigzag_gemv(self.type_name, raw(x), *self.raw, active, kind, self.group_size, self.bits,
                                   **launch)
        got = as_float64(got, self.type_name)
        ref = np.array(reference.astype(mx.float32), dtype=np.float64)
        xs = np.abs(np.array(x.astype(mx.float32), dtype=np.float64))
        K = self.w.shape[1]
        cols = np.array([k for k in cols if 0 <= k < K], dtype=np.int64)
        magnitude = xs[:, cols] @ np.abs(self.w[:, cols]).T  # sum of |terms|, bias included in w
        tol = ULP[self.type_name] * np.abs(ref) + 1e-4 * magnitude + 1e-6
        bad = ~(np.abs(got - ref) <= tol)
        if bad.any():
            m, n = np.argwhere(bad)[0]
            pytest.fail(
                f"{kind} {launch}: {bad.sum()} of {bad.size} outputs differ from the CPU op; "
                f"first at (m={m}, n={n}): got {got[m, n]!r}, want {ref[m, n]!r} (tolerance {tol[m, n]:.3g})"
            )


def cpu_gemv(x, layer, indices=None):
    return spqt_mlx.zigzag_gemv(x, layer.q, indices=indices, stream=mx.cpu)


def packed_list(n, entries, K, rng):
    """A count-prefixed list of capacity K + 1 whose unused tail holds valid columns (reading it shows)."""
    p = rng.integers(0, K, size=K + 1).astype(np.int32)
    p[0] = n
    p[1 : 1 + len(entries)] = entries
    return p


@pytest.mark.parametrize("type_name", list(DTYPES))
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_zigzag_gemv(metal_emulator, bits, group_size, type_name):
    rng = np.random.default_rng(1000 * bits + group_size + len(type_name))
    dtype = DTYPES[type_name]
    N = {32: 96, 64: 128, 128: 256}[group_size]
    emulator = metal_emulator

    # Dense walk: several rows, K below and above a split, single-pass and split geometries.
    for K, M, seed in ((1, 1, 0), (33, 3, 1), (100, 1, 2)):
        layer = Layer(rng, N, K, group_size, bits, dtype)
        x = layer.activations(rng, M)
        ref = cpu_gemv(x, layer)
        layer.check(emulator, x, "dense", None, range(K), ref, seed=seed)
        if K == 100:
            layer.check(emulator, x, "dense", None, range(K), ref, splits=3, seed=3)

    layer = Layer(rng, N, 200, group_size, bits, dtype)
    K = 200
    x1 = layer.activations(rng, 1)
    x2 = layer.activations(rng, 2)

    # Index lists: unsorted, a quarter and a half of the columns, one column, none, repeated and
    # out-of-range entries; the balanced split with a remainder (50 entries over 3 * 2 workers) and
    # with more workers than entries.
    quarter = rng.permutation(K)[: K // 4].astype(np.int32)
    half = rng.permutation(K)[: K // 2].astype(np.int32)
    messy = np.concatenate([half[:40], [-1, K, K + 7, -2**31, 2**31 - 1], half[:10], [K - 1, 0, 0]]).astype(np.int32)
    rng.shuffle(messy)
    one = np.array([int(rng.integers(0, K))], dtype=np.int32)
    none = np.zeros(0, dtype=np.int32)
    for idx, x, launches in (
        (quarter, x1, ({"seed": 0}, {"splits": 3, "seed": 5})),
        (half, x2, ({"seed": 6},)),
        (messy, x1, ({"seed": 0}, {"splits": 8, "seed": 7})),
        (one, x2, ({"seed": 8}, {"splits": 8, "seed": 0})),
        (none, x1, ({"seed": 9},)),
    ):
        ref = cpu_gemv(x, layer, mx.array(idx))
        for launch in launches:
            layer.check(emulator, x, "indices", idx, idx, ref, **launch)

    # Packed lists: every column, a prefix with a readable tail, and counts outside [0, K] (clamped).
    everything = rng.permutation(K).astype(np.int32)
    for packed, cols in (
        (packed_list(K, everything, K, rng), everything),
        (packed_list(30, half[:30], K, rng), half[:30]),
        (packed_list(10**6, everything, K, rng), everything),
        (packed_list(-5, everything, K, rng), []),
    ):
        ref = cpu_gemv(x1, layer, ActiveColumns(mx.array(packed), None, None))
        layer.check(emulator, x1, "packed", packed, cols, ref, seed=int(rng.integers(0, 100)))

    # Thresholds, fused on the device: scalar and per-column, about half the columns active.
    xs = np.abs(np.array(x1.astype(mx.float32)))[0]
    for t in (np.float32(np.median(xs)), (xs * rng.uniform(0.5, 1.5, size=K)).astype(np.float32)):
        active = spqt_mlx.collect_active(x1, mx.array(t), stream=mx.cpu)
        ref = cpu_gemv(x1, layer, active)
        cols = np.nonzero(xs > t)[0]
        layer.check(emulator, x1, "threshold", np.atleast_1d(t), cols, ref, seed=int(rng.integers(0, 100)))

    # Several rows under one threshold (batched decode): the union of their columns is collected,
    # each row keeps its own entries.
    x3 = layer.activations(rng, 3)
    xs3 = np.abs(np.array(x3.astype(mx.float32)))
    t = np.float32(np.median(xs3))
    ref = spqt_mlx.zigzag_gemv(x3, layer.q, threshold=float(t), stream=mx.cpu)
    cols = np.nonzero((xs3 > t).any(axis=0))[0]
    layer.check(emulator, x3, "threshold", np.atleast_1d(t), cols, ref, seed=int(rng.integers(0, 100)))


@pytest.mark.parametrize("rows", [16, 17])
@pytest.mark.parametrize("type_name", ["float16", "float32"])
def test_rows_at_and_past_the_collection_limit(metal_emulator, type_name, rows):
    """As many rows as one collection takes (kCollectMaxRows, 16) walk their union list; more walk
    every column; either way every row masks the entries it leaves out. A per-column threshold,
    one and several splits."""
    rng = np.random.default_rng(23 + rows)
    layer = Layer(rng, 64, 90, 32, 4, DTYPES[type_name])
    x = layer.activations(rng, rows)
    xs = np.abs(np.array(x.astype(mx.float32)))
    t = (np.max(xs, axis=0) * rng.uniform(0.7, 1.1, size=90)).astype(np.float32)  # some columns in no row
    ref = spqt_mlx.zigzag_gemv(x, layer.q, threshold=mx.array(t), stream=mx.cpu)
    for launch in ({"seed": 1}, {"splits": 2, "seed": 2}):
        layer.check(metal_emulator, x, "threshold", t, range(90), ref, **launch)
        collected = any(name.startswith("collect_active") for name, _, _ in metal_emulator.last_dispatches())
        assert collected == (rows <= 16)


# ---- gathered products (mixture of experts) ------------------------------------------------------


class Experts:
    """E independently zigzag-quantized (N, K) weights, stacked as a gathered product takes them (w
    (E, bands, K, words), scales and biases (E, bands, K)), and their float64 weights (E, N, K)."""

    def __init__(self, rng, E, N, K, group_size, bits, dtype):
        self.layers = [Layer(rng, N, K, group_size, bits, dtype) for _ in range(E)]
        self.raw = tuple(np.stack(parts) for parts in zip(*(layer.raw for layer in self.layers)))
        self.w = np.stack([dense_weight64(layer.q) for layer in self.layers])
        # |scale * code| + |bias| (E, N, K): the kernels add the code and bias terms apart (bias hoist),
        # so a weight of 0 can still leave float32 rounding of both terms in the sum.
        self.terms = np.stack([term_sizes64(layer.q) for layer in self.layers])
        self.group_size, self.bits, self.dtype = group_size, bits, dtype
        self.type_name = self.layers[0].type_name

    def activations(self, rng, rows, *, swiglu=False):
        """x raw, and x' (rows, K) in float64: x itself, or with swiglu x of 2K columns (gate, then up)
        and x' as the CPU op computes it (the kernels round it to the dtype as well)."""
        K = self.w.shape[2]
        x = mx.array(rng.normal(size=(rows, 2 * K if swiglu else K)).astype(np.float32)).astype(self.dtype)
        xp = _ext.apply_prologue(x, Prologue.SwiGLU, None, 0.0, stream=mx.cpu) if swiglu else x
        return raw(x), as_float64(raw(xp), self.type_name)

    def active(self, x64, experts, threshold):
        """(R, K) mask of the columns each row of y takes: above its expert's threshold, none for an
        expert not below E (ids are unsigned: a negative int32 id is one)."""
        E, _, K = self.w.shape
        experts = np.asarray(experts, dtype=np.int64)
        rows = np.abs(x64)[np.arange(len(experts)) // (len(experts) // len(x64))]
        valid = (experts >= 0) & (experts < E)
        if threshold is None:
            return np.repeat(valid[:, None], K, axis=1)
        t = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (E,))
        return valid[:, None] & (rows > t[np.where(valid, experts, 0)][:, None])

    def reference(self, x64, experts, mask):
        """y (R, N) in float64 and the sum of |terms| of each output (bias included)."""
        x_div = len(experts) // len(x64)
        N = self.w.shape[1]
        y, magnitude = np.zeros((len(experts), N)), np.zeros((len(experts), N))
        for r, e in enumerate(experts):
            if mask[r].any():
                xr = x64[r // x_div] * mask[r]
                y[r] = self.w[e] @ xr
                magnitude[r] = self.terms[e] @ np.abs(xr)
        return y, magnitude

    def poisoned(self, experts, mask):
        """The stacked arrays with every weight the product must not read poisoned: the codes of each
        (expert, column) that no row of that expert takes are all ones and their scales and biases NaN,
        so a kernel that reads them (even to multiply by zero) shows NaN."""
        w, scales, biases = (a.copy() for a in self.raw)
        used = np.zeros((w.shape[0], w.shape[2]), dtype=bool)
        for r, e in enumerate(experts):
            if 0 <= e < w.shape[0]:
                used[e] |= mask[r]
        dead = ~used
        nan = np.uint16(0x7FC0) if self.type_name == "bfloat16" else np.array(np.nan, dtype=scales.dtype)
        w[np.broadcast_to(dead[:, None, :, None], w.shape)] = 0xFFFFFFFF
        scales[np.broadcast_to(dead[:, None, :], scales.shape)] = nan
        biases[np.broadcast_to(dead[:, None, :], biases.shape)] = nan
        return w, scales, biases

    def check(self, emulator, x, x64, experts, threshold, *, second=None, swiglu=False, **launch):
        """Runs the emulated gathered product, with the weights it must skip poisoned, against the
        float64 reference; returns the result. x64 is x' (activations()); `second`: the experts whose
        bands follow this one's in every row (gate and up in one launch)."""
        mask = self.active(x64, experts, threshold)
        sets = [self] if second is None else [self, second]
        parts = [s.reference(x64, experts, mask) for s in sets]
        ref, magnitude = (np.concatenate(p, axis=1) for p in zip(*parts))
        weights = [s.poisoned(experts, mask) for s in sets]
        got = emulator.zigzag_gather_gemv(self.type_name, x, *weights[0], experts, threshold, self.group_size,
                                          self.bits, second=None if second is None else weights[1],
                                          prologue=int(Prologue.SwiGLU.value) if swiglu else 0, **launch)
        got = as_float64(got, self.type_name)
        # x' of the kernels may round the other way in its last place (exp of another library).
        tol = ULP[self.type_name] * (np.abs(ref) + (magnitude if swiglu else 0)) + 1e-4 * magnitude + 1e-6
        bad = ~(np.abs(got - ref) <= tol)
        if bad.any():
            r, n = np.argwhere(bad)[0]
            pytest.fail(
                f"gather experts={list(experts)} threshold={threshold} paired={second is not None} swiglu={swiglu} "
                f"{launch}: {bad.sum()} of {bad.size} outputs "
                f"differ from the float64 reference; first at (r={r}, n={n}): got {got[r, n]!r}, want {ref[r, n]!r} "
                f"(tolerance {tol[r, n]:.3g})"
            )
        return got


def term_sizes64(q) -> np.ndarray:
    """(N, K) |scale * code| + |bias|, from the packed arrays as dense_weight64 decodes them."""
    codes = unpack_codes(np.array(q.weight), q.group_size, q.bits).astype(np.float64)
    sizes = np.abs(to_np(q.scales))[..., None] * codes + np.abs(to_np(q.biases))[..., None]
    return sizes.transpose(0, 2, 1).reshape(q.shape)


def expert_thresholds(x64, E):
    """One threshold per expert, at different quantiles of |x| and in gaps between its values."""
    return np.array([gap_threshold(x64, q) for q in np.linspace(0.3, 0.7, E)], dtype=np.float32)


@pytest.mark.parametrize("type_name", list(DTYPES))
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_zigzag_gather_gemv(metal_emulator, bits, group_size, type_name):
    """The experts' product, dense and under per-expert thresholds, rows of y sharing a row of x or
    not, ids outside [0, E), one and several splits: against float64, with every weight that must not
    be read (unused experts, columns inactive for an expert) poisoned."""
    rng = np.random.default_rng(2000 * bits + group_size + len(type_name))
    E, K = 3, 40
    experts = Experts(rng, E, 2 * group_size, K, group_size, bits, DTYPES[type_name])
    for ids, x_div, splits, seed in (([2, -1, 0, 2], 1, 0, 0), ([1, E, 0, 1], 2, 3, 1), ([0, 2, E, -1], 4, 8, 5)):
        x, x64 = experts.activations(rng, len(ids) // x_div)
        t = expert_thresholds(x64, E)
        experts.check(metal_emulator, x, x64, ids, None, splits=splits, seed=seed)
        experts.check(metal_emulator, x, x64, ids, t, splits=splits, seed=seed + 2)


@pytest.mark.parametrize("type_name", list(DTYPES))
@pytest.mark.parametrize("bits,group_size", [(3, 32), (4, 64), (8, 128)])
def test_gather_paired_and_swiglu(metal_emulator, bits, group_size, type_name):
    """Two sets of experts in one launch (mlx-lm's gate and up: 2 and 1 bands, and the other way
    round), the SwiGLU prologue (its down product), and both at once; dense and under per-expert
    thresholds, with uint32 ids of E and past 2^31 (zero rows). On formats covering codes that
    straddle words (3 bits), whole bytes, and every group size."""
    rng = np.random.default_rng(3000 * bits + group_size + len(type_name))
    E, K = 3, 40
    gate = Experts(rng, E, 2 * group_size, K, group_size, bits, DTYPES[type_name])
    up = Experts(rng, E, group_size, K, group_size, bits, DTYPES[type_name])
    ids = np.array([2, 2**31, 0, E, 1, 2**32 - 1, 2, 0], dtype=np.uint32)
    for first, second, swiglu, x_div, splits, seed in (
        (gate, up, False, 2, 0, 0),
        (gate, None, True, 1, 3, 1),
        (up, gate, True, 4, 2, 2),
    ):
        x, x64 = first.activations(rng, len(ids) // x_div, swiglu=swiglu)
        t = expert_thresholds(x64, E)
        for threshold in (None, t):
            first.check(metal_emulator, x, x64, ids, threshold, second=second, swiglu=swiglu, splits=splits,
                        seed=seed)


def test_gather_dispatches_and_poison(metal_emulator):
    """The gathered product runs as one (bands, splits, R) grid of the dense walk, no collection, plus
    the reduction when split; a scalar threshold serves every expert; rows of one token's experts
    match the CPU op; and the poisoned weights would show if the kernel read them."""
    rng = np.random.default_rng(31)
    E, K, gs = 4, 200, 64
    experts = Experts(rng, E, 2 * gs, K, gs, 4, mx.float16)
    ids = [3, 0, -7, 1, 3, 2]  # two tokens, three experts each
    x, x64 = experts.activations(rng, 2)
    t = expert_thresholds(x64, E)

    experts.check(metal_emulator, x, x64, ids, t)
    (name, grid, _), (reduce, _, _) = metal_emulator.last_dispatches()
    assert name == "zigzag_gemv_dense_float16_b4_gs64" and reduce == "zigzag_gemv_reduce_float16"
    assert grid[0] == 2 and grid[1] > 1 and grid[2] == len(ids)
    experts.check(metal_emulator, x, x64, ids, t, splits=1)
    assert [(n, g) for n, g, _ in metal_emulator.last_dispatches()] == [(name, (2, 1, len(ids)))]
    experts.check(metal_emulator, x, x64, ids, np.float32(np.median(np.abs(x64))), splits=2, seed=3)

    # Against the CPU op: int32 ids below 0; then gate and up at once on SwiGLU'd x, uint32 ids past 2^31.
    up = Experts(rng, E, gs, K, gs, 4, mx.float16)
    xs, xs64 = experts.activations(rng, 2, swiglu=True)
    ids_u = np.array([3, 2**31 + 1, 0, 1, E, 2], dtype=np.uint32)
    for xr, xr64, rows, second, swiglu in ((x, x64, np.array(ids, dtype=np.int32), None, False),
                                           (xs, xs64, ids_u, up, True)):
        sets = [experts] if second is None else [experts, second]
        prologue = Prologue.SwiGLU if swiglu else Prologue.Identity
        for threshold in (None, expert_thresholds(xr64, E)):
            want = _ext.zigzag_gather_gemv(
                mx.array(xr), *map(mx.array, experts.raw), mx.array(rows),
                None if threshold is None else mx.array(threshold), gs, 4, prologue,
                *((None,) * 3 if second is None else map(mx.array, second.raw)), stream=mx.cpu)
            got = metal_emulator.zigzag_gather_gemv(
                "float16", xr, *experts.raw, rows, threshold, gs, 4, second=None if second is None else second.raw,
                prologue=int(prologue.value))
            want = np.array(want.astype(mx.float32), dtype=np.float64)
            mask = experts.active(xr64, rows, threshold)
            magnitude = np.concatenate([s.reference(xr64, rows, mask)[1] for s in sets], axis=1)
            tol = ULP["float16"] * (np.abs(want) + (magnitude if swiglu else 0)) + 1e-4 * magnitude + 1e-6
            assert np.all(np.abs(got.astype(np.float64) - want) <= tol), f"threshold={threshold} swiglu={swiglu}"

    # The poison shows when read: the dense walk over the same poisoned weights is NaN where an
    # expert's skipped columns lie, in either set of a pair.
    mask = experts.active(x64, ids, t)
    got = metal_emulator.zigzag_gather_gemv("float16", x, *experts.poisoned(ids, mask), ids, None, gs, 4,
                                            second=up.poisoned(ids, mask))
    valid = [0 <= e < E for e in ids]
    assert np.isnan(got[valid]).all() and (got[np.logical_not(valid)] == 0).all()


@pytest.mark.parametrize("type_name", list(DTYPES))
def test_collect_active(metal_emulator, type_name):
    rng = np.random.default_rng(7)
    dtype = DTYPES[type_name]
    for K in (1, 33, 100, 200, 1500):
        x = mx.array(rng.normal(size=K).astype(np.float32)).astype(dtype)
        xs = np.abs(np.array(x.astype(mx.float32)))
        per_column = xs * rng.uniform(0.5, 1.5, size=K).astype(np.float32)
        per_column[::7] = xs[::7]  # |x| == t is not active
        for t in (np.float32(0.7), np.float32(-1.0), np.float32(np.inf), per_column.astype(np.float32)):
            want = np.array(spqt_mlx.collect_active(x, mx.array(t), stream=mx.cpu).packed)
            for threads, seed in ((0, 0), (64, 3)):
                got = metal_emulator.collect_active(type_name, raw(x), t, threads=threads, seed=seed)
                np.testing.assert_array_equal(got, want, err_msg=f"K={K} threads={threads} t={t if np.ndim(t) == 0 else 'per column'}")


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_copy_to_contiguous(metal_emulator, dtype):
    rng = np.random.default_rng(3)
    base = rng.integers(0, 60000, size=(6, 10, 7)).astype(dtype)
    views = (
        base.transpose(2, 0, 1),
        base[1:5, ::3, ::-2],
        np.broadcast_to(base[0, 0], (4, 7)),
        base[:, 4, :].T,
        base[2],
    )
    for i, view in enumerate(views):
        np.testing.assert_array_equal(metal_emulator.copy_to_contiguous(view, seed=i), np.ascontiguousarray(view))


# ---- the emulator itself -------------------------------------------------------------------------


def test_emulator_catches_a_missing_barrier(metal_emulator):
    want = (np.arange(64) + 1) % 64 + 1
    for seed in (0, 1, 2):
        np.testing.assert_array_equal(metal_emulator.selfcheck("selfcheck_rotate_synced", 64, 64, seed=seed), want)
        racy = metal_emulator.selfcheck("selfcheck_rotate_unsynced", 64, 64, seed=seed)
        assert not np.array_equal(racy, want), "a read before the barrier went unnoticed"


def test_emulator_reports_a_divergent_barrier(metal_emulator):
    with pytest.raises(RuntimeError, match="threadgroup_barrier"):
        metal_emulator.selfcheck("selfcheck_divergent_barrier", 64, 64)


def test_emulator_simd_collectives(metal_emulator):
    threads = 48  # a full simdgroup and a partial one
    got = metal_emulator.selfcheck("selfcheck_collectives", threads, 4 * threads, seed=4).reshape(threads, 4)
    v = (np.arange(threads) ** 2 % 7 + 1).astype(np.float64)
    for t in range(threads):
        lo, hi = t // 32 * 32, min(t // 32 * 32 + 32, threads)
        lane = t - lo
        assert got[t, 0] == v[lo:hi].sum()
        assert got[t, 1] == v[lo:t].sum()
        assert got[t, 2] == (v[t + 1] if lane + 1 < hi - lo else v[t])
        assert got[t, 3] == (v[t + 5] if lane + 5 < hi - lo else v[t])


@pytest.mark.parametrize("source", emu.metal_sources(), ids=lambda p: p.name)
def test_metal_source_compiles_as_cpp(cxx, source):
    """Each .metal file on its own, so a syntax or type error names its file."""
    import subprocess

    cmd = [cxx, *emu.CXXFLAGS, *emu.KERNEL_FLAGS, "-fsyntax-only", str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# Host-only headers: included by dispatch/metal.cpp and the emulator's host side, never by a kernel.
HOST_ONLY = {"kernel_names.h"}


def kernel_signatures(text):
    """Parameter lists of the [[kernel]] functions in a Metal source."""
    for start in (m.end() for m in re.finditer(r"\[\[kernel\]\]\s+void\s+\w+\s*\(", text)):
        depth, i = 1, start
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        params, depth, cur = [], 0, ""
        for ch in text[start : i - 1]:
            depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                params.append(cur.strip())
                cur = ""
            else:
                cur += ch
        params.append(cur.strip())
        yield params


@pytest.mark.parametrize(
    "source",
    [p for p in sorted(emu.KERNELS.iterdir()) if p.suffix in (".h", ".metal") and p.name not in HOST_ONLY],
    ids=lambda p: p.name,
)
def test_kernel_source_is_metal(source):
    """What C++ accepts but the Metal compiler does not: the standard library, doubles, pointer or
    reference kernel arguments without an address space."""
    text = re.sub(r"//[^\n]*", "", source.read_text())
    assert not re.search(r"\bstd::", text), "Metal has no C++ standard library"
    assert not re.search(r"\bdouble\b", text), "Metal has no double"
    for include in re.findall(r"#include\s*<([^>]+)>", text):
        assert include == "metal_stdlib", f"#include <{include}> does not exist in Metal"
    for params in kernel_signatures(text):
        for p in params:
            decl = p.split("[[")[0]
            if ("*" in decl or "&" in decl) and not re.search(r"\b(device|constant|threadgroup|thread)\b", decl):
                pytest.fail(f"kernel argument without an address space: {p}")


# ---- the host encoding (dispatch/metal_encoding.h) ------------------------------------------------


PROLOGUES = {"rmsnorm": Prologue.RmsNorm, "swiglu": Prologue.SwiGLU}
EPS = 1e-5


def check_fused(emulator, layer, rng, prologue, kind, *, rows=1, residual=True, splits=0):
    """A fused product (prologue on x, residual on y) emulated against the CPU op. Thresholds sit in
    the widest gap of |x'| near its median, so that x' computed in another order cannot cross one."""
    K = layer.w.shape[1]
    N = layer.w.shape[0]
    pro = PROLOGUES[prologue]
    width = 2 * K if prologue == "swiglu" else K
    x = mx.array(rng.normal(size=(rows, width)).astype(np.float32) * 2).astype(layer.dtype)
    norm = None
    if prologue == "rmsnorm":
        norm = mx.array(rng.uniform(0.5, 1.5, size=K).astype(np.float32)).astype(layer.dtype)
    res = mx.array(rng.normal(size=(rows, N)).astype(np.float32)).astype(layer.dtype) if residual else None
    xp = np.abs(np.array(_ext.apply_prologue(x, pro, norm, EPS, stream=mx.cpu).astype(mx.float32)))
    active, arg, cols = None, None, range(K)
    if kind == "threshold":
        t = np.float32(gap_threshold(xp, 0.5))
        arg, active, cols = np.atleast_1d(t), mx.array(t), np.nonzero((xp > t).any(axis=0))[0]
    elif kind == "indices":
        arg = rng.permutation(K)[: K // 3].astype(np.int32)
        active, cols = mx.array(arg), arg
    kinds = {"dense": ActiveKind.Dense, "threshold": ActiveKind.Threshold, "indices": ActiveKind.Indices}
    ref = _ext.zigzag_gemv(x, layer.q.weight, layer.q.scales, layer.q.biases, active, kinds[kind],
                                          layer.group_size, layer.bits, pro, norm, EPS, res, stream=mx.cpu)
    got = emulator.zigzag_gemv(layer.type_name, raw(x), *layer.raw, arg, kind, layer.group_size, layer.bits,
                               splits=splits, prologue=int(pro.value), norm=None if norm is None else raw(norm),
                               eps=EPS, residual=None if res is None else raw(res))
    got = as_float64(got, layer.type_name)
    ref = np.array(ref.astype(mx.float32), dtype=np.float64)
    cols = np.asarray(cols, dtype=np.int64)
    magnitude = xp[:, cols] @ np.abs(layer.w[:, cols]).T
    base = np.abs(np.array(res.astype(mx.float32))) if res is not None else 0.0
    # x' itself may round the other way in its last place (float32 reductions in another order).
    tol = (2 * ULP[layer.type_name] + 1e-4) * (magnitude + base) + ULP[layer.type_name] * np.abs(ref) + 1e-5
    bad = ~(np.abs(got - ref) <= tol)
    if bad.any():
        m, n = np.argwhere(bad)[0]
        pytest.fail(f"{prologue} {kind}: {bad.sum()} of {bad.size} outputs differ from the CPU op; first at "
                    f"(m={m}, n={n}): got {got[m, n]!r}, want {ref[m, n]!r} (tolerance {tol[m, n]:.3g})")


@pytest.mark.parametrize("type_name", list(DTYPES))
@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 32), (8, 128)])
@pytest.mark.parametrize("prologue", list(PROLOGUES))
def test_fused_products(metal_emulator, prologue, bits, group_size, type_name):
    """The prologue (RMSNorm or SwiGLU) and residual folded into the Metal kernels, against the CPU op
    (which test_fusion.py checks against float64): every kind of active set, one and several
    splits, several rows, no residual."""
    rng = np.random.default_rng(bits * 100 + group_size + len(type_name) + len(prologue))
    layer = Layer(rng, 2 * group_size, 150, group_size, bits, DTYPES[type_name])
    for kind, launch in (("dense", {}), ("dense", {"splits": 3}), ("threshold", {}), ("threshold", {"splits": 2}),
                         ("indices", {})):
        check_fused(metal_emulator, layer, rng, prologue, kind, **launch)
    check_fused(metal_emulator, layer, rng, prologue, "dense", rows=3)
    check_fused(metal_emulator, layer, rng, prologue, "threshold", rows=3)
    check_fused(metal_emulator, layer, rng, prologue, "threshold", residual=False)


def test_dispatch_sequences(metal_emulator):
    """The kernels each path encodes, in order: a long walk splits and reduces, a threshold is
    collected on the device first, views are copied to contiguous memory."""
    rng = np.random.default_rng(11)
    layer = Layer(rng, 128, 1000, 64, 4, mx.float16)
    x = layer.activations(rng, 1)
    layer.check(metal_emulator, x, "dense", None, range(1000), cpu_gemv(x, layer))
    (gemv, grid, _), (reduce, rgrid, rthreads) = metal_emulator.last_dispatches()
    assert gemv == "zigzag_gemv_dense_float16_b4_gs64" and grid[0] == 2 and grid[1] > 1 and grid[2] == 1
    assert reduce == "zigzag_gemv_reduce_float16" and rgrid[0] * rthreads >= 128
    few = np.array([3, 900, 17], dtype=np.int32)
    layer.check(metal_emulator, x, "indices", few, few, cpu_gemv(x, layer, mx.array(few)))
    assert [(n, g[1]) for n, g, _ in metal_emulator.last_dispatches()] == [("zigzag_gemv_sparse_float16_b4_gs64", 1)]
    t = np.float32(0.5)
    layer.check(metal_emulator, x, "threshold", np.atleast_1d(t), np.nonzero(np.abs(np.array(x.astype(mx.float32)))[0] > t)[0],
                cpu_gemv(x, layer, spqt_mlx.collect_active(x, 0.5, stream=mx.cpu)))
    names = [n for n, _, _ in metal_emulator.last_dispatches()]
    assert names[:2] == ["collect_active_float16", "zigzag_gemv_sparse_float16_b4_gs64"]
    metal_emulator.copy_to_contiguous(np.arange(12, dtype=np.float32).reshape(3, 4).T)
    assert [n for n, _, _ in metal_emulator.last_dispatches()] == ["copy_to_contiguous_32"]


def encoding_failures(emulator) -> list[str]:
    """Runs one case of each path of the host encoding; returns what went wrong."""
    rng = np.random.default_rng(5)
    failures = []

    def attempt(what, check):
        try:
            check()
        except (RuntimeError, pytest.fail.Exception) as e:
            failures.append(f"{what}: {str(e).splitlines()[0]}")

    layer = Layer(rng, 128, 300, 64, 4, mx.float16)
    x = layer.activations(rng, 2)
    attempt("dense", lambda: layer.check(emulator, x, "dense", None, range(300), cpu_gemv(x, layer)))
    idx = rng.permutation(300)[:40].astype(np.int32)
    attempt("indices", lambda: layer.check(emulator, x, "indices", idx, idx, cpu_gemv(x, layer, mx.array(idx))))
    x1 = layer.activations(rng, 1)
    t = (np.abs(np.array(x1.astype(mx.float32)))[0] * rng.uniform(0.5, 1.5, size=300)).astype(np.float32)
    cols = np.nonzero(np.abs(np.array(x1.astype(mx.float32)))[0] > t)[0]
    attempt("threshold", lambda: layer.check(emulator, x1, "threshold", t, cols,
                                             cpu_gemv(x1, layer, spqt_mlx.collect_active(x1, mx.array(t), stream=mx.cpu))))
    attempt("fused", lambda: check_fused(emulator, layer, rng, "rmsnorm", "threshold", splits=3))
    attempt("fused swiglu", lambda: check_fused(emulator, layer, rng, "swiglu", "threshold", splits=1))
    attempt("rows", lambda: check_fused(emulator, layer, rng, "rmsnorm", "threshold", rows=3, splits=2))
    view = rng.integers(0, 60000, size=(5, 9)).astype(np.uint16)[:, ::2].T

    def copy():
        if not np.array_equal(emulator.copy_to_contiguous(view), np.ascontiguousarray(view)):
            raise RuntimeError("the copy differs")

    attempt("copy", copy)
    experts = Experts(rng, 3, 128, 150, 64, 4, mx.float16)
    xg, xg64 = experts.activations(rng, 2)
    ids = [2, 0, -1, 2, 1, 3]  # two tokens of three experts
    attempt("gather", lambda: experts.check(emulator, xg, xg64, ids, None, splits=2))
    attempt("gather thresholds", lambda: experts.check(emulator, xg, xg64, ids, expert_thresholds(xg64, 3)))
    up = Experts(rng, 3, 64, 150, 64, 4, mx.float16)
    xs, xs64 = experts.activations(rng, 2, swiglu=True)
    ids_u = np.array([2, 0, 2**31, 2, 1, 3], dtype=np.uint32)
    attempt("gather paired", lambda: experts.check(emulator, xg, xg64, ids, None, second=up, splits=2))
    attempt("gather paired swiglu", lambda: experts.check(emulator, xs, xs64, ids_u, expert_thresholds(xs64, 3),
                                                          second=up, swiglu=True))
    return failures


# Deliberate mistakes in the host encoding, each of which must fail the emulated tests.
WRONG_ENCODINGS = {
    "scales and biases slots swapped": ("e.set_input(g.scales, 2);\n  e.set_input(g.biases, 3);",
                                        "e.set_input(g.scales, 3);\n  e.set_input(g.biases, 2);"),
    "threadgroup of one simdgroup": ("{g.N / g.group_size, splits, g.M}, {kGemvThreads, 1, 1}",
                                     "{g.N / g.group_size, splits, g.M}, {kSimdSize, 1, 1}"),
    "grid without its splits": ("e.dispatch({g.N / g.group_size, splits, g.M}", "e.dispatch({g.N / g.group_size, 1, g.M}"),
    "partials too small": ("int64_t(g.M) * splits * g.N", "int64_t(g.M) * (splits - 1) * g.N"),
    "size as a 32-bit constant": ("e.set_int64(size, 5);", "e.set_int(int32_t(size), 5);"),
    "threshold taken as a scalar": ("g.K, g.active_len != 1, 0, g.prologue, g.M);", "g.K, false, 0, g.prologue, g.M);"),
    "collection without the prologue": ("g.K, g.active_len != 1, 0, g.prologue, g.M);",
                                        "g.K, g.active_len != 1, 0, {}, g.M);"),
    "collection of the first row only": ("g.K, g.active_len != 1, 0, g.prologue, g.M);",
                                         "g.K, g.active_len != 1, 0, g.prologue, 1);"),
    "rows that do not mask their own entries": ("(g.active_len != 1 && !gathered ? 1 : 0) : -1, 16);",
                                                "-1 : -1, 16);"),
    "residual left out of the reduction": ("e.set_int(g.residual ? 1 : 0, 6);", "e.set_int(0, 6);"),
    "epsilon in the wrong slot": ("e.set_float(g.prologue.eps, 13);", "e.set_float(g.prologue.eps, 7);"),
    "expert ids not bound": ("e.set_input(gathered ? g.experts->ids : g.x, 17);", "e.set_input(g.x, 17);"),
    "experts not gathered": ("e.set_int(gathered ? g.experts->count : -1, 19);", "e.set_int(-1, 19);"),
    "a row of x per row of y": ("e.set_int(gathered ? g.experts->x_div : 1, 18);", "e.set_int(1, 18);"),
    "the first expert's threshold for all": ("rows_thresholded && g.active_len != 1 ? 1 : 0, 20);", "0, 20);"),
    "per-expert thresholds collected as per-column": ("g.M <= kCollectMaxRows && !gathered)",
                                                      "g.M <= kCollectMaxRows)"),
    "second experts not bound": ("e.set_input(second ? second->w : g.w, 21);", "e.set_input(g.w, 21);"),
    "bands of the first experts ignored": ("e.set_int(second ? second->first_bands : g.N / g.group_size, 24);",
                                           "e.set_int(g.N / g.group_size, 24);"),
}


def test_the_encoding_passes_its_checks(metal_emulator):
    assert encoding_failures(metal_emulator) == []


@pytest.mark.parametrize("mistake", list(WRONG_ENCODINGS))
def test_a_wrong_host_encoding_fails(cxx, tmp_path_factory, mistake):
    """The tests run the host encoding itself: each mistake in it changes what the kernels compute
    or is refused by the fake encoder."""
    source = (emu.ROOT / "dispatch" / "metal_encoding.h").read_text()
    right, wrong = WRONG_ENCODINGS[mistake]
    assert source.count(right) == 1, f"the encoding no longer contains {right!r}: update this test"
    cache = tmp_path_factory.getbasetemp() / "spqt-metal-emulator-variants"
    lib = emu.build(cxx, cache, encoding=source.replace(right, wrong))
    # In a subprocess: a wrong size may well corrupt memory, and a crash is a failure too.
    code = f"""
import sys
sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1])]!r}
from pathlib import Path
import metal_emulator as emu
from test_metal_emulated import encoding_failures
print(encoding_failures(emu.Emulator(Path({str(lib)!r}))))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode <= 0, run.stderr[-2000:]  # a signal (crash), or a list of failures
    assert run.returncode < 0 or run.stdout.strip() != "[]", f"{mistake}: the emulated tests still pass"
