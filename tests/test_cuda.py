"""The CUDA kernels against the CPU reference kernels and float64: run on a machine with an NVIDIA
GPU and mlx[cuda13]; skipped elsewhere."""

import copy
import dataclasses

import numpy as np
import pytest

import mlx.core as mx

import spqt_mlx as sq

pytestmark = pytest.mark.skipif(
    not (mx.cuda.is_available() if hasattr(mx, "cuda") else False),
    reason="needs MLX's CUDA backend and an NVIDIA GPU",
)

from spqt_mlx.layout import SUPPORTED_BITS as BITS
from spqt_mlx.layout import SUPPORTED_GROUP_SIZES as GROUP_SIZES
from zigzag_reference import check_close as check
from zigzag_reference import gap_threshold

DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def make(N, K, bits, gs, dtype, seed):
    mx.random.seed(seed)
    w = mx.random.normal((N, K)).astype(dtype)
    with mx.stream(mx.cpu):
        qw = sq.zigzag_quantize(w, gs, bits)
        mx.eval(qw.weight, qw.scales, qw.biases)
    return qw


def reference(x, qw, idx=None):
    with mx.stream(mx.cpu):
        W = np.array(sq.zigzag_dequantize(qw).astype(mx.float32), dtype=np.float64)
    xs = np.array(x.astype(mx.float32), dtype=np.float64)
    if idx is None:
        return xs @ W.T
    idx = np.asarray(idx)
    idx = idx[(idx >= 0) & (idx < W.shape[1])]
    return xs[..., idx] @ W[:, idx].T


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gs", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_every_format(bits, gs, dtype):
    N, K = 2 * gs, 333
    qw = make(N, K, bits, gs, dtype, seed=bits * 1000 + gs)
    x = mx.random.normal((3, K)).astype(dtype)
    rng = np.random.default_rng(bits + gs)
    check(sq.zigzag_gemv(x, qw, stream=mx.gpu), reference(x, qw), dtype)
    for density in (0.0, 1 / K, 0.25, 0.5, 1.0):
        idx = rng.permutation(K)[: int(round(density * K))].astype(np.int32)
        y = sq.zigzag_gemv(x, qw, indices=mx.array(idx), stream=mx.gpu)
        check(y, reference(x, qw, idx), dtype) if idx.size else None
        if not idx.size:
            assert not np.any(np.array(y.astype(mx.float32)))


@pytest.mark.parametrize("bits", (4, 8))
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 4096), (4096, 14336), (14336, 4096), (576, 1536)])
def test_decode_shapes(shape, bits):
    """The shapes decode runs; these split each band's columns over several blocks."""
    N, K = shape
    dtype = mx.float16
    qw = make(N, K, bits, 64, dtype, seed=N + K)
    x = mx.random.normal((1, K)).astype(dtype)
    check(sq.zigzag_gemv(x, qw, stream=mx.gpu), reference(x, qw), dtype)
    for density in (0.1, 0.5, 0.75):
        t = float(np.quantile(np.abs(np.array(x.astype(mx.float32))), 1 - density))
        active = sq.collect_active(x, t, stream=mx.gpu)
        y = sq.zigzag_gemv(x, qw, indices=active, stream=mx.gpu)
        idx = np.flatnonzero(np.abs(np.array(x.astype(mx.float32))[0]) > t)
        check(y, reference(x, qw, idx), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gs", (64, 128))
@pytest.mark.parametrize("shape", [(8192, 4096), (4096, 8200), (1024, 20000)], ids=["8192x4096", "4096x8200", "1024x20000"])
def test_tensor_core_path(shape, gs, dtype):
    """4-bit weights of at least 2**24 elements run on the tensor-core kernel: float32 accuracy
    for every input dtype, several rows, K no multiple of the tile (and above the general kernel's
    fused-collection limit), lists with duplicates and junk, the fused collection at high and low
    density, and reproducible bits."""
    N, K = shape
    qw = make(N, K, 4, gs, dtype, seed=N + K + gs)
    for rows in (1, 3):
        x = mx.random.normal((rows, K)).astype(dtype)
        y = sq.zigzag_gemv(x, qw, stream=mx.gpu)
        check(y, reference(x, qw), dtype)
        again = sq.zigzag_gemv(x, qw, stream=mx.gpu)
        assert np.array_equal(np.array(y.astype(mx.float32)), np.array(again.astype(mx.float32)))
    # Large activations: x * scale is split into bf16 terms, which have float32's range.
    x = (mx.random.normal((1, K)) * 30).astype(dtype)
    check(sq.zigzag_gemv(x, qw, stream=mx.gpu), reference(x, qw), dtype)
    x = mx.random.normal((1, K)).astype(dtype)
    rng = np.random.default_rng(K)
    idx = np.concatenate([rng.permutation(K)[: K // 3], [-1, K, 7, 7]]).astype(np.int32)
    check(sq.zigzag_gemv(x, qw, indices=mx.array(idx), stream=mx.gpu), reference(x, qw, idx), dtype)
    xa = np.abs(np.array(x.astype(mx.float32))[0])
    for density in (0.5, 0.05):
        t = float(np.quantile(xa, 1 - density))
        idx = np.flatnonzero(xa > np.float32(t))
        for threshold in (mx.array(t), mx.full((K,), t)):
            y = sq.zigzag_gemv(x, qw, indices=sq.collect_active(x, threshold), stream=mx.gpu)
            check(y, reference(x, qw, idx), dtype)


@pytest.mark.parametrize("dtype", (mx.float16, mx.bfloat16), ids=str)
@pytest.mark.parametrize("gs", (64, 128))
@pytest.mark.parametrize(
    "shape", [(8192, 4096), (2048, 8208), (128, 131072), (16384, 1040)], ids=["8192x4096", "2048x8208", "128x131072", "16384x1040"]
)
def test_bulk_copy_path(shape, gs, dtype):
    """Dense single-row products of 16-bit x (the bulk-copy kernel on sm_90): one stage or many, K no
    multiple of a stage (8208, 1040), several splits per band (few bands), every prologue with and
    without a residual, against the CPU kernels; reproducible bits; and inputs the bulk copies cannot
    take (x or scales not 16-byte aligned, a strided x), which must give the same results through the
    other kernel."""
    from spqt_mlx import _ext
    from spqt_mlx._ext import ActiveKind, Prologue

    N, K = shape
    qw = make(N, K, 4, gs, dtype, seed=N + K + gs)
    tol = dtype
    for prologue in (Prologue.Identity, Prologue.RmsNorm, Prologue.SwiGLU):
        x = (mx.random.normal((1, 2 * K if prologue == Prologue.SwiGLU else K)) * 2).astype(dtype)
        norm = mx.random.uniform(0.5, 1.5, (K,)).astype(dtype) if prologue == Prologue.RmsNorm else None
        for res in (None, mx.random.normal((1, N)).astype(dtype)):
            def run(stream, x=x, norm=norm, res=res):
                return _ext.zigzag_gemv(x, qw.weight, qw.scales, qw.biases, None, ActiveKind.Dense, gs, 4, prologue,
                                        norm, 1e-5, res, stream=stream)
            got = run(mx.gpu)
            check(got, np.array(run(mx.cpu).astype(mx.float32), dtype=np.float64), tol)
            assert np.array_equal(np.array(got.astype(mx.float32)), np.array(run(mx.gpu).astype(mx.float32)))
    x = mx.random.normal((1, K)).astype(dtype)
    want = reference(x, qw)
    check(sq.zigzag_gemv(x, qw, stream=mx.gpu), want, dtype)
    # Views the bulk copies cannot take (evaluated, so that the op reads them in place): x one element
    # into a larger buffer, x with a column stride, scales and biases one element into theirs.
    def view(a, start, shape):
        flat = mx.concatenate([mx.zeros((start,), a.dtype), a.reshape(-1), mx.zeros((1,), a.dtype)])
        v = flat[start : start + a.size].reshape(shape)
        mx.eval(v)
        return v

    check(sq.zigzag_gemv(view(x, 1, (1, K)), qw, stream=mx.gpu), want, dtype)
    pairs = mx.stack([x, x], axis=-1).reshape(1, 2 * K)[:, ::2]
    mx.eval(pairs)
    check(sq.zigzag_gemv(pairs, qw, stream=mx.gpu), want, dtype)
    shifted = dataclasses.replace(qw, scales=view(qw.scales, 1, qw.scales.shape), biases=view(qw.biases, 1, qw.biases.shape))
    check(sq.zigzag_gemv(x, shifted, stream=mx.gpu), want, dtype)


@pytest.mark.parametrize("K", [1, 100, 4097, 16384, 16385, 20000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_collect_and_fused_match_cpu(K, dtype):
    qw = make(64, K, 4, 64, dtype, seed=K)
    x = mx.random.normal((K,)).astype(dtype)
    t = mx.abs(mx.random.normal((K,))) * 0.7
    gpu = sq.collect_active(x, t, stream=mx.gpu)
    cpu = sq.collect_active(x, t, stream=mx.cpu)
    assert np.array_equal(np.array(gpu.packed), np.array(cpu.packed))
    idx = np.array(cpu.indices())
    check(sq.zigzag_gemv(x, qw, indices=gpu, stream=mx.gpu), reference(x, qw, idx), dtype)
    # The packed list handed over explicitly (not fused) gives the same result.
    check(sq.zigzag_gemv(x * 1, qw, indices=gpu, stream=mx.gpu), reference(x, qw, idx), dtype)


def test_unsorted_duplicates_and_out_of_range_are_handled():
    qw = make(256, 300, 4, 64, mx.float32, seed=7)
    x = mx.random.normal((2, 300))
    idx = np.array([299, -1, 5, 5, 300, 17, 1 << 30, 0], dtype=np.int32)
    y = sq.zigzag_gemv(x, qw, indices=mx.array(idx), stream=mx.gpu)
    check(y, reference(x, qw, idx), mx.float32)
    packed = np.full(301, 3, dtype=np.int32)
    packed[0] = 10_000  # a count beyond K is clamped, never read past the list
    y = sq.zigzag_gemv(x, qw, indices=sq.ActiveColumns(mx.array(packed), x * 1, mx.array(0.0)), stream=mx.gpu)
    check(y, reference(x, qw, np.full(300, 3)), mx.float32)


def test_deterministic_bitwise():
    qw = make(4096, 4096, 4, 64, mx.float16, seed=3)
    x = mx.random.normal((1, 4096)).astype(mx.float16)
    outs = [np.array(sq.zigzag_gemv(x, qw, indices=sq.collect_active(x, 0.6), stream=mx.gpu)) for _ in range(5)]
    for o in outs[1:]:
        assert np.array_equal(o.view(np.uint16), outs[0].view(np.uint16))


def test_compile_and_noncontiguous():
    qw = make(512, 1000, 4, 64, mx.float16, seed=11)
    x = mx.random.normal((1000, 2)).astype(mx.float16).T  # a transposed view

    @mx.compile
    def step(x):
        return sq.zigzag_gemv(x, qw, indices=sq.collect_active(x[:1], 0.5))

    y = step(x[:1])
    idx = np.flatnonzero(np.abs(np.array(x[0].astype(mx.float32))) > 0.5)
    with mx.stream(mx.gpu):
        check(y, reference(x[:1], qw, idx), mx.float16)


def test_threshold_by_value_in_memory_and_per_column_agree():
    """A ready scalar threshold goes to the kernel by value, a lazy one is read on the GPU, a vector per
    column; all three must pick the same columns and give the same bits."""
    qw = make(1024, 4096, 4, 64, mx.float16, seed=5)
    x = mx.random.normal((1, 4096)).astype(mx.float16)
    ready = mx.array(0.6)
    mx.eval(x, ready)
    lazy = mx.array(0.3) * 2.0
    per_column = mx.full((4096,), 0.6)
    outs = [np.array(sq.zigzag_gemv(x, qw, indices=sq.collect_active(x, t), stream=mx.gpu)).view(np.uint16)
            for t in (ready, lazy, per_column)]
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])
    idx = np.flatnonzero(np.abs(np.array(x.astype(mx.float32))[0]) > np.float32(0.6))
    check(sq.zigzag_gemv(x, qw, indices=sq.collect_active(x, ready), stream=mx.gpu), reference(x, qw, idx),
          mx.float16)


def test_independent_calls_in_one_graph_do_not_share_workspace():
    """q/k/v-style calls on one x may run concurrently in MLX's CUDA graph; each needs its own split
    workspace and counters, and reusing them across evaluations must stay exact."""
    qws = [make(1024, 4096, 4, 64, mx.float16, seed=20 + i) for i in range(6)]
    x = mx.random.normal((1, 4096)).astype(mx.float16)
    mx.eval(x)
    alone = [np.array(sq.zigzag_gemv(x, q, stream=mx.gpu)).view(np.uint16) for q in qws]
    for _ in range(20):
        together = [sq.zigzag_gemv(x, q, stream=mx.gpu) for q in qws]
        mx.eval(together)
        for a, b in zip(alone, together):
            assert np.array_equal(a, np.array(b).view(np.uint16))


def test_strided_inputs():
    qw = make(256, 640, 8, 64, mx.float32, seed=13)
    base = mx.random.normal((640, 4))
    mx.eval(base)
    one_row = base.T[1:2]  # an evaluated view with column stride 4
    check(sq.zigzag_gemv(one_row, qw, stream=mx.gpu), reference(one_row, qw), mx.float32)
    rows = base.T  # several strided rows: made contiguous by the op
    check(sq.zigzag_gemv(rows, qw, stream=mx.gpu), reference(rows, qw), mx.float32)
    idx = mx.arange(0, 640, 3)[::2]  # a strided index list
    check(sq.zigzag_gemv(rows, qw, indices=idx, stream=mx.gpu), reference(rows, qw, np.array(idx)), mx.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [2, 7, 63, 130, 520])
@pytest.mark.parametrize("bits,gs", [(4, 64), (3, 32), (8, 128)])
def test_prefill_matmul(bits, gs, rows, dtype):
    # float16 and bfloat16 run the tensor-core kernel; float32 a dequantized copy and one batched
    # matmul, in TF32 as MLX's own float32 matmuls do there by default.
    qw = make(3 * gs, 200, bits, gs, dtype, seed=bits + rows)
    x = (mx.random.normal((rows, 200)) * 0.5).astype(dtype)
    y = sq.zigzag_matmul(x, qw)
    assert y.dtype == dtype
    check(y, reference(x, qw), mx.float16 if dtype == mx.float32 else dtype)


@pytest.mark.parametrize("dtype", (mx.float16, mx.bfloat16), ids=str)
@pytest.mark.parametrize("gs", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_prefill_kernel_every_format(bits, gs, dtype):
    # The tensor-core matmul's tiles are 64 rows x 128 outputs x 64 columns: every one has a tail.
    N, K, M = 5 * gs, 200, 70
    qw = make(N, K, bits, gs, dtype, seed=bits * 100 + gs)
    x = (mx.random.normal((2, M // 2, K)) * 0.5).astype(dtype)
    y = sq.zigzag_matmul(x, qw)
    assert y.shape == (2, M // 2, N) and y.dtype == dtype
    check(y, reference(x, qw), dtype)
    # Bit for bit the same on every call, and a row's result does not depend on its neighbours.
    assert mx.array_equal(y, sq.zigzag_matmul(x, qw)).item()
    assert mx.array_equal(y[1, 3:], sq.zigzag_matmul(x[1, 3:], qw)).item()


@pytest.mark.parametrize("K", [203, 256])
def test_prefill_kernel_unaligned_rows(K):
    # Rows of x that do not start on 16 bytes (K not a multiple of 8, or a view at an odd offset)
    # are read element by element.
    qw = make(192, K, 4, 64, mx.float16, seed=K)
    flat = mx.random.normal((37 * K + 1,)).astype(mx.float16)
    mx.eval(flat)
    x = flat[1:].reshape(37, K)
    check(sq.zigzag_matmul(x, qw), reference(x, qw), mx.float16)


def test_prefill_kernel_large_and_gradient():
    qw = make(4096, 4096, 4, 64, mx.bfloat16, seed=3)
    x = (mx.random.normal((300, 4096)) * 0.5).astype(mx.bfloat16)
    check(sq.zigzag_matmul(x, qw), reference(x, qw), mx.bfloat16)
    # The gradient with respect to x: dy @ W, as on the CPU.
    small = make(256, 320, 4, 64, mx.float16, seed=4)
    xs = mx.random.normal((40, 320)).astype(mx.float16)
    dy = mx.random.normal((40, 256)).astype(mx.float16)
    grad = mx.vjp(lambda v: sq.zigzag_matmul(v, small), [xs], [dy])[1][0]
    with mx.stream(mx.cpu):
        W = np.array(sq.zigzag_dequantize(small).astype(mx.float32), dtype=np.float64)
    check(grad, np.array(dy.astype(mx.float32), dtype=np.float64) @ W, mx.float16)


@pytest.mark.parametrize("threshold", [0.0, 0.8], ids=["dense", "sparse"])
def test_stacked_projections_match_layers_alone(threshold):
    # q/k/v and gate/up as one product on the GPU; multi-row products run in fp16 here.
    import copy

    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    from spqt_mlx.patch import fuse_blocks, fuse_shared_inputs, patch_model, set_thresholds

    args = llama.ModelArgs(model_type="llama", rms_norm_eps=1e-5, vocab_size=1024, rope_theta=5e5,
                           tie_word_embeddings=False, hidden_size=1024, num_hidden_layers=4,
                           intermediate_size=2816, num_attention_heads=8, num_key_value_heads=2)
    mx.random.seed(0)
    alone = llama.Model(args)
    alone.set_dtype(mx.float16)
    patch_model(alone, group_size=64, bits=4)
    fuse_blocks(alone, enabled=False)  # stacking alone; the fused blocks are tested below
    set_thresholds(alone, threshold)
    stacked = copy.deepcopy(alone)
    assert fuse_shared_inputs(stacked) == 2 * args.num_hidden_layers

    def run(model):
        # Fixed tokens, not each model's own argmax: a near tie could pick another next token.
        cache = make_prompt_cache(model)
        out = [model(mx.array([[3, 9, 27, 81, 243]]), cache=cache)[:, -1]]
        for t in (5, 17, 99, 300, 7, 64):
            out.append(model(mx.array([[t]]), cache=cache)[:, -1])
        return np.array(mx.concatenate(out).astype(mx.float32))

    a, b = run(alone), run(stacked)
    assert np.abs(a - b).max() <= 2e-2 * np.abs(a).max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,bits,gs",
    [((8192, 4096), 4, 64), ((4096, 8200), 4, 128), ((512, 4096), 4, 64), ((256, 1000), 3, 32), ((256, 20000), 3, 64)],
    ids=["mma-8192x4096", "mma-g128", "general-512x4096", "general-3bit", "general-collect-first"],
)
@pytest.mark.parametrize("prologue", ["rmsnorm", "swiglu"])
def test_fused_neighbours_match_cpu(prologue, shape, bits, gs, dtype):
    """The prologue (RMSNorm or SwiGLU) and residual folded into both CUDA kernels, for every kind
    of active set, against the CPU kernels (which test_fusion.py checks against float64). Where the
    general kernel cannot collect inside (K above its limit), the op runs the prologue as MLX ops
    and a plain product: that case is checked against float64 over its own x'."""
    from spqt_mlx import _ext
    from spqt_mlx._ext import ActiveKind, Prologue

    N, K = shape
    qw = make(N, K, bits, gs, dtype, seed=N + K + bits)
    kind = Prologue.RmsNorm if prologue == "rmsnorm" else Prologue.SwiGLU
    x = (mx.random.normal((1, 2 * K if kind == Prologue.SwiGLU else K)) * 2).astype(dtype)
    norm = mx.random.uniform(0.5, 1.5, (K,)).astype(dtype) if kind == Prologue.RmsNorm else None
    residual = mx.random.normal((1, N)).astype(dtype)
    strided = mx.random.normal((N, 2)).astype(dtype)[:, 1][None]  # a view: one row, column stride 2
    xp_gpu = np.array(_ext.apply_prologue(x, kind, norm, 1e-5, stream=mx.gpu).astype(mx.float32), dtype=np.float64)
    t = gap_threshold(np.array(_ext.apply_prologue(x, kind, norm, 1e-5, stream=mx.cpu).astype(mx.float32)), 0.5)
    idx = mx.array(np.random.default_rng(K).permutation(K)[: K // 3].astype(np.int32))
    cases = [(None, ActiveKind.Dense), (mx.array(t), ActiveKind.Threshold), (mx.full((K,), t), ActiveKind.Threshold),
             (idx, ActiveKind.Indices)]
    # float32 sums of two kernels' rounding (the tensor-core kernel's x * scale is three bf16 terms).
    tol = mx.float16 if dtype == mx.float32 else dtype
    for active, akind in cases:
        for res in (None, residual, strided):
            def run(stream):
                return _ext.zigzag_gemv(x, qw.weight, qw.scales, qw.biases, active, akind, gs, bits, kind, norm, 1e-5,
                                        res, stream=stream)
            got = run(mx.gpu)
            if K > 16384 and bits != 4 and akind == ActiveKind.Threshold:
                cols = np.flatnonzero(np.abs(xp_gpu[0]) > t)
                want = reference(mx.array(xp_gpu.astype(np.float32)), qw, cols)
                if res is not None:
                    want = want + np.array(res.astype(mx.float32), dtype=np.float64)
                check(got, want, dtype)
            else:
                check(got, np.array(run(mx.cpu).astype(mx.float32), dtype=np.float64), tol)
            again = run(mx.gpu)
            assert np.array_equal(np.array(got.astype(mx.float32)), np.array(again.astype(mx.float32)))


@pytest.mark.parametrize("sparsity,dtype", [(0.0, mx.float16), (0.5, mx.float32)], ids=["dense-fp16", "sparse-fp32"])
def test_fused_blocks_decode_as_unfused(sparsity, dtype):
    """A Llama-shaped model (tensor-core kernels) decodes through the fused blocks as through the
    per-projection path. With sparsity, the kernels' x' and MLX's RMSNorm or SwiGLU may differ in
    their last bits, enough to move a column that sits at its threshold across it; with random
    weights such a flip changes that step's logits by a few percent (seen on an H200: one step of
    five, in float32 too). So the sparse case asks most steps to agree to float32 accuracy; the
    product-level tests above pin the fused semantics exactly."""
    from mlx_lm.models import llama
    from mlx_lm.models.cache import make_prompt_cache

    import spqt_mlx.patch.blocks as blocks_module
    from spqt_mlx.patch import fuse_blocks, patch_model, set_thresholds

    args = llama.ModelArgs(model_type="llama", rms_norm_eps=1e-5, vocab_size=1024, rope_theta=5e5,
                           tie_word_embeddings=False, hidden_size=4096, num_hidden_layers=2,
                           intermediate_size=5632, num_attention_heads=32, num_key_value_heads=8)
    mx.random.seed(0)
    model = llama.Model(args)
    model.set_dtype(dtype)
    patch_model(model, group_size=64, bits=4)
    if sparsity:
        from spqt_mlx.calibrate import calibrate

        set_thresholds(model, calibrate(model, mx.random.randint(0, 1024, (128,), key=mx.random.key(3)), sparsity,
                                        progress=False))
    tokens = (5, 50, 500, 7, 70, 700, 9, 90, 900, 11)
    runs = []
    real = blocks_module._Plan.run
    blocks_module._Plan.run = lambda self, *a: runs.append(1) or real(self, *a)
    try:
        # Teacher-forced: each step runs fused on a copy of the per-projection path's cache, so a
        # difference stays in its step.
        fuse_blocks(model, enabled=False)
        cache = make_prompt_cache(model)
        mx.eval(model(mx.array([[3, 9, 27, 81, 243]]), cache=cache))
        per_step = []
        for t in tokens:
            fuse_blocks(model)
            fused = model(mx.array([[t]]), cache=copy.deepcopy(cache))[:, -1]
            fuse_blocks(model, enabled=False)
            unfused = model(mx.array([[t]]), cache=cache)[:, -1]
            a, b = (np.array(v.astype(mx.float32)) for v in (fused, unfused))
            per_step.append(np.abs(a - b).max() / np.abs(b).max())
        assert len(runs) == len(tokens) * args.num_hidden_layers
    finally:
        blocks_module._Plan.run = real
    per_step = np.array(per_step)
    if sparsity:
        assert np.mean(per_step <= 1e-4) >= 0.6 and per_step.max() <= 0.1, per_step
    else:
        assert per_step.max() <= 5e-3, per_step


def rowwise_reference(x, qw, t):
    """float64: each row of x over its own columns with |x| > t (compared in float32)."""
    xs = np.array(x.astype(mx.float32), dtype=np.float64)
    tn = np.broadcast_to(np.asarray(t, dtype=np.float32), (xs.shape[-1],))
    kept = np.where(np.abs(xs.astype(np.float32)) > tn, xs, 0.0)
    return reference(mx.array(kept.astype(np.float32)), qw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,bits,gs",
    [((8192, 4096), 4, 64), ((4096, 8200), 4, 128), ((512, 4096), 4, 64), ((256, 1000), 3, 32), ((256, 20000), 3, 64)],
    ids=["mma-8192x4096", "mma-g128", "general-512x4096", "general-3bit", "general-collect-first"],
)
def test_rows_take_their_own_columns(shape, bits, gs, dtype):
    """Batched decode: several rows under one threshold, each keeping its own active columns. The
    tensor-core kernel reads the union once for a pass of rows (4 rows, 2 for float32: 1 to 9 rows
    give full, partial and several passes); the general kernel scans every row; above its
    collection limit the op masks the rows and walks every column. Against float64 and against the
    rows one at a time; reproducible bits."""
    N, K = shape
    qw = make(N, K, bits, gs, dtype, seed=N + K + 7)
    for rows in (1, 2, 3, 4, 5, 8, 9):
        x = mx.random.normal((rows, K)).astype(dtype)
        xa = np.abs(np.array(x.astype(mx.float32)))
        for t in (gap_threshold(xa, 0.5), (np.median(xa, axis=0) * 1.1).astype(np.float32)):
            threshold = mx.array(t)
            y = sq.zigzag_gemv(x, qw, threshold=threshold, stream=mx.gpu)
            check(y, rowwise_reference(x, qw, t), dtype)
            alone = mx.concatenate([sq.zigzag_gemv(x[m:m + 1], qw, threshold=threshold, stream=mx.gpu)
                                    for m in range(rows)])
            tol = mx.float16 if dtype == mx.float32 else dtype  # float32 sums in another order
            check(y, np.array(alone.astype(mx.float32), dtype=np.float64), tol)
            again = sq.zigzag_gemv(x, qw, threshold=threshold, stream=mx.gpu)
            assert np.array_equal(np.array(y.astype(mx.float32)), np.array(again.astype(mx.float32)))
    # A row with nothing active among active ones is exactly zero; nothing active at all too.
    x = mx.concatenate([mx.random.normal((2, K)), mx.zeros((1, K)), mx.random.normal((2, K))]).astype(dtype)
    y = np.array(sq.zigzag_gemv(x, qw, threshold=0.5, stream=mx.gpu).astype(mx.float32))
    assert not np.any(y[2]) and np.all(np.isfinite(y))
    assert not np.any(np.array(sq.zigzag_gemv(x, qw, threshold=1e9, stream=mx.gpu).astype(mx.float32)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prologue", ["rmsnorm", "swiglu"])
def test_rows_through_fused_neighbours(prologue, dtype):
    """Several rows of a fused product on the tensor-core kernel: each row's own x' decides its columns."""
    N, K, rows = 8192, 4096, 5
    qw = make(N, K, 4, 64, dtype, seed=77)
    _rows_through(qw, N, K, rows, 4, 64, prologue, dtype)


@pytest.mark.parametrize("prologue", ["rmsnorm", "swiglu"])
def test_rows_through_fused_neighbours_above_the_collection_limit(prologue):
    """The general kernel with K above its fused collection's limit: several rows of a fused
    product run as MLX ops, each row masked, then a dense walk."""
    N, K, rows = 256, 20000, 3
    qw = make(N, K, 3, 64, mx.float16, seed=78)
    _rows_through(qw, N, K, rows, 3, 64, prologue, mx.float16)


@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_a_large_batch_decode_step_is_sparse_per_sequence(criterion):
    """More sequences than the GEMV takes (GEMV_MAX_ROWS): each row masked by its own columns, then
    the CUDA matmul path; the result is the CPU's, row by row."""
    import mlx.nn as nn

    from spqt_mlx.patch import ZigzagLinear
    from spqt_mlx.patch.linear import GEMV_MAX_ROWS
    from spqt_mlx.patch.model import column_scales

    mx.random.seed(5)
    layer = ZigzagLinear.from_linear(nn.Linear(1024, 512), group_size=64, bits=4)
    if criterion == "wina":
        layer.set_column_scale(column_scales({"l": layer})["l"])
    x = mx.random.normal((GEMV_MAX_ROWS + 5, 1, 1024))
    t = np.quantile(np.abs(np.array(x)) * (1 if layer.column_scale is None else np.array(layer.column_scale)), 0.5)
    layer.threshold = float(t)
    with mx.stream(mx.cpu):
        want = np.array(layer(x), dtype=np.float64)
    check(layer(x), want, mx.float16)  # the CUDA matmul may run in TF32; a wrong mask is off by far more


def _rows_through(qw, N, K, rows, bits, gs, prologue, dtype):
    from spqt_mlx import _ext
    from spqt_mlx._ext import ActiveKind, Prologue

    kind = Prologue.RmsNorm if prologue == "rmsnorm" else Prologue.SwiGLU
    x = (mx.random.normal((rows, 2 * K if kind == Prologue.SwiGLU else K)) * 2).astype(dtype)
    norm = mx.random.uniform(0.5, 1.5, (K,)).astype(dtype) if kind == Prologue.RmsNorm else None
    residual = mx.random.normal((rows, N)).astype(dtype)
    t = gap_threshold(np.array(_ext.apply_prologue(x, kind, norm, 1e-5, stream=mx.cpu).astype(mx.float32)), 0.5)

    def run(stream):
        return _ext.zigzag_gemv(x, qw.weight, qw.scales, qw.biases, mx.array(t), ActiveKind.Threshold, gs, bits, kind,
                                norm, 1e-5, residual, stream=stream)

    tol = mx.float16 if dtype == mx.float32 else dtype
    check(run(mx.gpu), np.array(run(mx.cpu).astype(mx.float32), dtype=np.float64), tol)
