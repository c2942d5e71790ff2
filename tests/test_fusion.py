"""Products fused with their neighbours (a norm or SwiGLU before, a residual after) and the decoder
blocks that decode with them (patch/blocks.py), on the CPU; tests/test_cuda.py runs the same
checks on the GPU."""

import copy
import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

import spqt_mlx as sq
import spqt_mlx.patch.blocks as blocks_module
from spqt_mlx import _ext
from spqt_mlx._ext import ActiveKind, Prologue
from spqt_mlx.patch import FAMILIES, ZigzagLinear, achieved_sparsity, fuse_blocks, patch_model, record_stats, set_thresholds, zigzag_layers

from zigzag_reference import BITS, DTYPES, GROUP_SIZES, REL_TOL, dense_weight64, gap_threshold, to_np

EPS = 1e-5


def rounded(values: np.ndarray, dtype) -> np.ndarray:
    """float64 values rounded to ``dtype``, as the kernels write x'."""
    return to_np(mx.array(values.astype(np.float32)).astype(dtype))


def prologue64(x: np.ndarray, prologue, norm: np.ndarray | None, dtype) -> np.ndarray:
    if prologue == Prologue.RmsNorm:
        inv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS)
        return rounded(rounded(x * inv, dtype) * norm, dtype)  # MLX's rms_norm rounds before the weight
    K = x.shape[-1] // 2
    gate, up = x[..., :K], x[..., K:]
    return rounded(gate / (1.0 + np.exp(-gate)) * up, dtype)


def fused_case(bits, gs, dtype, prologue, *, rows=1, K=200, seed=0):
    mx.random.seed(seed)
    N = 2 * gs
    q = sq.zigzag_quantize(mx.random.normal((N, K)).astype(dtype), gs, bits)
    width = 2 * K if prologue == Prologue.SwiGLU else K
    x = (mx.random.normal((rows, width)) * 2).astype(dtype)
    norm = mx.random.uniform(0.5, 1.5, (K,)).astype(dtype) if prologue == Prologue.RmsNorm else None
    residual = mx.random.normal((rows, N)).astype(dtype)
    return q, x, norm, residual


def check_close(y, ref, dtype):
    y = to_np(y)
    assert y.shape == ref.shape and np.all(np.isfinite(y))
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err < REL_TOL[dtype], err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits,gs", [(b, g) for b in BITS for g in GROUP_SIZES if b in (3, 4) or g == 64])
@pytest.mark.parametrize("prologue", [Prologue.RmsNorm, Prologue.SwiGLU], ids=["rmsnorm", "swiglu"])
def test_fused_products_match_float64(prologue, bits, gs, dtype):
    q, x, norm, residual = fused_case(bits, gs, dtype, prologue, seed=bits * 7 + gs)
    W = dense_weight64(q)
    xp = prologue64(to_np(x), prologue, None if norm is None else to_np(norm), dtype)
    meta = dict(prologue=prologue, norm_weight=norm, eps=EPS, stream=mx.cpu)
    args = (x, q.weight, q.scales, q.biases)
    # Dense, with and without the residual.
    y = _ext.zigzag_gemv(*args, None, ActiveKind.Dense, gs, bits, **meta)
    check_close(y, xp @ W.T, dtype)
    y = _ext.zigzag_gemv(*args, None, ActiveKind.Dense, gs, bits, residual=residual, **meta)
    check_close(y, to_np(residual) + xp @ W.T, dtype)
    # The active set is decided on x', not on x.
    t = gap_threshold(xp, 0.5)
    active = np.abs(xp[0]) > t
    y = _ext.zigzag_gemv(*args, mx.array(t), ActiveKind.Threshold, gs, bits, residual=residual, **meta)
    check_close(y, to_np(residual) + xp[:, active] @ W[:, active].T, dtype)
    # Given lists use x' too.
    idx = np.flatnonzero(active).astype(np.int32)
    y = _ext.zigzag_gemv(*args, mx.array(idx), ActiveKind.Indices, gs, bits, **meta)
    check_close(y, xp[:, idx] @ W[:, idx].T, dtype)


@pytest.mark.parametrize("prologue", [Prologue.RmsNorm, Prologue.SwiGLU], ids=["rmsnorm", "swiglu"])
def test_several_rows_each_get_their_own_prologue(prologue):
    q, x, norm, residual = fused_case(4, 64, mx.float32, prologue, rows=3, K=96, seed=5)
    xp = prologue64(to_np(x), prologue, None if norm is None else to_np(norm), mx.float32)
    y = _ext.zigzag_gemv(x.reshape(3, 1, -1), q.weight, q.scales, q.biases, None, ActiveKind.Dense, 64, 4,
                         prologue=prologue, norm_weight=norm, eps=EPS, residual=residual.reshape(3, 1, -1),
                         stream=mx.cpu)
    assert y.shape == (3, 1, 128)
    check_close(y.reshape(3, -1), to_np(residual) + xp @ dense_weight64(q).T, mx.float32)


def test_apply_prologue_is_the_unfused_composition():
    q, x, norm, _ = fused_case(4, 64, mx.float16, Prologue.RmsNorm, seed=2)
    np.testing.assert_allclose(
        to_np(_ext.apply_prologue(x, Prologue.RmsNorm, norm, EPS)), to_np(mx.fast.rms_norm(x, norm, EPS)), rtol=2e-3
    )
    g = mx.random.normal((1, 64)).astype(mx.float32)
    expected = nn.silu(g[:, :32]) * g[:, 32:]
    np.testing.assert_allclose(to_np(_ext.apply_prologue(g, Prologue.SwiGLU)), to_np(expected), rtol=1e-6)


def test_gradients_are_those_of_the_composition():
    q, x, norm, residual = fused_case(4, 32, mx.float32, Prologue.RmsNorm, K=64, seed=3)
    args = (q.weight, q.scales, q.biases, None, ActiveKind.Dense, 32, 4)

    def fused(x, norm, residual):
        return _ext.zigzag_gemv(x, *args, prologue=Prologue.RmsNorm, norm_weight=norm, eps=EPS,
                                residual=residual).sum()

    def composed(x, norm, residual):
        return (residual + _ext.zigzag_gemv(mx.fast.rms_norm(x, norm, EPS), *args)).sum()

    got = mx.grad(fused, argnums=(0, 1, 2))(x, norm, residual)
    want = mx.grad(composed, argnums=(0, 1, 2))(x, norm, residual)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)
    assert float(mx.abs(got[0]).sum()) > 0
    with pytest.raises(ValueError, match="no gradient"):
        mx.grad(lambda s: _ext.zigzag_gemv(x, q.weight, s, q.biases, None, ActiveKind.Dense, 32, 4,
                                           prologue=Prologue.RmsNorm, norm_weight=norm, eps=EPS).sum())(q.scales)


def test_swiglu_gradient_with_a_threshold_is_that_of_the_composition():
    q, g, _, _ = fused_case(4, 32, mx.float32, Prologue.SwiGLU, K=64, seed=4)
    t = mx.array(0.3)
    args = (q.weight, q.scales, q.biases, t, ActiveKind.Threshold, 32, 4)

    def fused(g):
        return _ext.zigzag_gemv(g, *args, prologue=Prologue.SwiGLU).sum()

    def composed(g):
        return _ext.zigzag_gemv(nn.silu(g[..., :64]) * g[..., 64:], *args).sum()

    got, want = mx.grad(fused)(g), mx.grad(composed)(g)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
    assert float(mx.abs(got).sum()) > 0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(prologue=Prologue.RmsNorm), "needs the norm's weight"),
        (dict(prologue=Prologue.RmsNorm, norm_weight=mx.ones((7,))), r"shape \(64,\)"),
        (dict(prologue=Prologue.RmsNorm, norm_weight=mx.ones((64,)), eps=-1.0), "eps must be finite"),
        (dict(prologue=Prologue.RmsNorm, norm_weight=mx.ones((64,)), eps=float("nan")), "eps must be finite"),
        (dict(norm_weight=mx.ones((64,))), "prologue is not RMSNorm"),
        (dict(prologue=Prologue.SwiGLU), r"SwiGLU reads gate and up: 2K"),
        (dict(residual=mx.ones((1, 64))), r"residual must be float32 of shape \(1, 32\)"),
        (dict(residual=mx.ones((1, 32), dtype=mx.float16)), "residual must be float32"),
    ],
)
def test_bad_fusions_are_refused(kwargs, message):
    q = sq.zigzag_quantize(mx.random.normal((32, 64)), 32, 4)
    with pytest.raises(ValueError, match=message):
        _ext.zigzag_gemv(mx.ones((1, 64)), q.weight, q.scales, q.biases, None, ActiveKind.Dense, 32, 4, **kwargs)


@pytest.mark.parametrize(
    "args,message",
    [
        ((mx.ones((1, 64)), Prologue.RmsNorm), r"needs a float norm weight of shape \(64,\)"),
        ((mx.ones((1, 64)), Prologue.RmsNorm, mx.ones((32,))), r"needs a float norm weight of shape \(64,\)"),
        ((mx.ones((1, 63)), Prologue.SwiGLU), "needs an even last dimension"),
        ((mx.ones((1, 64), dtype=mx.int32), Prologue.SwiGLU), "x must be a float array"),
    ],
)
def test_apply_prologue_refuses_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        _ext.apply_prologue(*args)


# ---- decoder blocks ------------------------------------------------------------------------------


def tiny(family: str, seed: int = 1, dtype=mx.float32, **extra):
    module = importlib.import_module(f"mlx_lm.models.{family}")
    config = dict(model_type=family, hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=96,
                  rope_theta=10000.0, tie_word_embeddings=False, max_position_embeddings=512)
    if family == "qwen3":
        config.update(head_dim=32, rope_scaling=None)
    if family == "phi3":
        config.update(original_max_position_embeddings=512, rope_scaling=None)
    config.update(extra)
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def fixed_decode(model, steps=4):
    """Logits of a prefill and ``steps`` single-token steps over fixed tokens (no sampling, so a
    tiny difference cannot change the next input)."""
    cache = make_prompt_cache(model)
    out = [model(mx.array([[3, 1, 4, 1, 5]]), cache=cache)[:, -1]]
    for t in (9, 2, 6, 5)[:steps]:
        out.append(model(mx.array([[t]]), cache=cache)[:, -1])
    return to_np(mx.concatenate(out))


def count_fused_steps(monkeypatch) -> list:
    runs = []
    real = blocks_module._Plan.run
    monkeypatch.setattr(blocks_module._Plan, "run", lambda self, *a: runs.append(1) or real(self, *a))
    return runs


def is_fused(block) -> bool:
    return isinstance(block, blocks_module.FusedDecoderBlock)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("threshold", [0.0, 0.4], ids=["dense", "sparse"])
def test_each_family_decodes_fused_as_unfused(family, threshold, monkeypatch):
    model = tiny(family, **({"attention_bias": True} if family == "llama" else {}))
    patch_model(model, group_size=32, bits=4, thresholds=threshold)
    assert all(is_fused(b) for b in model.layers)
    runs = count_fused_steps(monkeypatch)
    fused = fixed_decode(model)
    assert len(runs) == 4 * len(model.layers)  # every single-token step, no prefill
    assert fuse_blocks(model, enabled=False) == 0 and not any(is_fused(b) for b in model.layers)
    unfused = fixed_decode(model)
    assert len(runs) == 4 * len(model.layers)
    np.testing.assert_allclose(fused, unfused, rtol=1e-4, atol=1e-4)


def test_a_fused_step_runs_four_products_per_block(monkeypatch):
    model = tiny("llama")
    patch_model(model, group_size=32, bits=4, thresholds=0.3)
    calls = []
    real = _ext.zigzag_gemv
    monkeypatch.setattr(_ext, "zigzag_gemv", lambda *a, **kw: calls.append(a[8] if len(a) > 8 else None) or real(*a, **kw))
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1, 2, 3]]), cache=cache))
    assert calls == [None] * 7 * len(model.layers)  # prefill: the family's own forward, per projection
    calls.clear()
    mx.eval(model(mx.array([[4]]), cache=cache))
    assert calls == [Prologue.RmsNorm, Prologue.Identity, Prologue.RmsNorm, Prologue.SwiGLU] * len(model.layers)


def test_float16_model_fused(monkeypatch):
    # Dense: in float16 an x' one rounding step from a threshold can land on either side of it when
    # the two paths reduce the norm in different orders, and the decode then diverges; the fused
    # products' float16 thresholds are checked with thresholds in gaps (test_fused_products_match_float64).
    model = tiny("qwen3", dtype=mx.float16)
    patch_model(model, group_size=64, bits=4, thresholds=0.0)
    fused = fixed_decode(model)
    fuse_blocks(model, enabled=False)
    unfused = fixed_decode(model)
    np.testing.assert_allclose(fused, unfused, rtol=2e-2, atol=2e-2)


def test_a_projection_of_another_dtype_runs_the_familys_forward(monkeypatch):
    # One product's weights in float32 inside a float16 model: the projections promote one by one.
    model = tiny("llama", dtype=mx.float16)
    patch_model(model, group_size=64, bits=4, thresholds=0.0)
    model.layers[0].mlp.down_proj.set_dtype(mx.float32)
    runs = count_fused_steps(monkeypatch)
    fused = fixed_decode(model)
    assert runs == []  # its block runs unfused, and its float32 output makes the next block's input float32
    fuse_blocks(model, enabled=False)
    np.testing.assert_allclose(fused, fixed_decode(model), rtol=1e-3, atol=1e-3)


def test_unknown_families_keep_the_per_projection_path(monkeypatch):
    model = tiny("gemma2", head_dim=32, query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh")
    patch_model(model, group_size=32, bits=4, thresholds=0.3)
    assert not any(is_fused(b) for b in model.layers)
    assert fuse_blocks(model) == 0
    runs = count_fused_steps(monkeypatch)
    assert np.all(np.isfinite(fixed_decode(model))) and runs == []


def test_steps_that_cannot_fuse_run_the_familys_forward(monkeypatch):
    model = tiny("llama")
    patch_model(model, group_size=32, bits=4, thresholds=0.3)
    runs = count_fused_steps(monkeypatch)
    expected = fixed_decode(model)
    assert len(runs) == 8
    # Statistics are counted per projection.
    record_stats(model)
    np.testing.assert_allclose(fixed_decode(model), expected, rtol=1e-4, atol=1e-4)
    assert len(runs) == 8 and achieved_sparsity(model)[1] == 4
    record_stats(model, False)
    # Thresholds that differ within a stack.
    set_thresholds(model, {"model.layers.0.self_attn.k_proj": 0.1})
    fixed_decode(model)
    assert len(runs) == 8 + 4  # only layer 1 fused
    # A replaced projection (as LoRA adapters do) sends the block to its own forward.
    set_thresholds(model, 0.3)
    model.layers[1].mlp.down_proj = nn.Linear(256, 128, bias=False)
    fixed_decode(model)
    assert len(runs) == 8 + 4 + 4  # only layer 0 fused
    # Heads divided in place (as mlx-lm's shard does) or a projection of another class.
    model.layers[1].mlp.down_proj = copy.deepcopy(model.layers[0].mlp.down_proj)  # layer 1 fuses again
    fuse_blocks(model)
    block = model.layers[0]
    assert block._spqt_plan.ready(block, mx.float32) is not None
    block.self_attn.n_heads //= 2
    assert block._spqt_plan.ready(block, mx.float32) is None
    block.self_attn.n_heads *= 2
    model.layers[1].mlp.down_proj.__class__ = type("Sharded", (ZigzagLinear,), {})
    fixed_decode(model)
    assert len(runs) == 8 + 4 + 4 + 4  # only layer 0 fused
    # A batch of two sequences: its prefill runs the family's forward, its decode step fuses.
    cache = make_prompt_cache(model)
    model(mx.array([[1, 2], [3, 4]]), cache=cache)
    assert len(runs) == 20
    model(mx.array([[5], [6]]), cache=cache)
    assert len(runs) == 21


def fixed_batch_decode(model, batch, steps=3):
    """Logits of a batch's prefill and decode steps over fixed tokens, through mlx-lm's BatchKVCache
    (left-padded prompts of different lengths, as BatchGenerator makes them)."""
    from mlx_lm.models.cache import BatchKVCache

    lengths = [5 - (b % 3) for b in range(batch)]
    pad = [5 - n for n in lengths]
    prompts = mx.array([[0] * p + [(3 * b + i) % 90 + 1 for i in range(n)] for b, (n, p) in enumerate(zip(lengths, pad))])
    cache = [BatchKVCache(pad) for _ in model.layers]
    out = [model(prompts, cache=cache)[:, -1]]
    for step in range(steps):
        out.append(model(mx.array([[(7 * b + step) % 90 + 1] for b in range(batch)]), cache=cache)[:, -1])
    return to_np(mx.stack(out))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("threshold", [0.0, 0.4], ids=["dense", "sparse"])
def test_a_batch_decodes_fused_as_unfused(family, threshold, monkeypatch):
    """A decode step of several sequences (mlx-lm's batch cache, left padding, a mask) runs the
    fused blocks, every row with its own active set, and gives the family's own logits; a batch
    larger than GEMV_MAX_ROWS runs the family's forward."""
    model = tiny(family)
    patch_model(model, group_size=32, bits=4, thresholds=threshold)
    runs = count_fused_steps(monkeypatch)
    fused = fixed_batch_decode(model, 5)
    assert len(runs) == 3 * len(model.layers)
    fuse_blocks(model, enabled=False)
    np.testing.assert_allclose(fused, fixed_batch_decode(model, 5), rtol=1e-4, atol=1e-4)
    fuse_blocks(model)
    fixed_batch_decode(model, blocks_module.GEMV_MAX_ROWS + 1, steps=1)
    assert len(runs) == 3 * len(model.layers)


def test_fused_blocks_save_and_load_the_same_parameters(tmp_path):
    from mlx.utils import tree_flatten

    model = tiny("llama")
    patch_model(model, group_size=32, bits=4, thresholds=0.3)
    fuse_blocks(model, enabled=False)
    before = dict(tree_flatten(model.parameters()))
    model.save_weights(str(tmp_path / "w.safetensors"))  # as a model saved before fused blocks
    fuse_blocks(model)
    assert dict(tree_flatten(model.parameters())).keys() == before.keys()

    loaded = tiny("llama", seed=9)
    patch_model(loaded, group_size=32, bits=4, allocate_only=True)
    assert all(is_fused(b) for b in loaded.layers)
    loaded.load_weights(str(tmp_path / "w.safetensors"))
    set_thresholds(loaded, 0.3)
    np.testing.assert_allclose(fixed_decode(loaded), fixed_decode(model), rtol=1e-5, atol=1e-5)


def test_weights_replaced_after_fused_steps_are_used(monkeypatch):
    # A block keeps what its fused step runs from one token to the next; new weights, a new dtype
    # or fused blocks turned off and on between tokens must be seen at the next token.
    from mlx.utils import tree_flatten

    source = tiny("llama", seed=9)
    patch_model(source, group_size=32, bits=4, thresholds=0.3)
    model = tiny("llama")
    patch_model(model, group_size=32, bits=4, thresholds=0.3)
    runs = count_fused_steps(monkeypatch)
    first = fixed_decode(model)
    model.load_weights(list(tree_flatten(source.parameters())))
    set_thresholds(model, 0.3)
    replaced = fixed_decode(model)
    assert len(runs) == 16  # both decodes fused
    assert not np.allclose(replaced, first, atol=1e-2)
    np.testing.assert_allclose(replaced, fixed_decode(source), rtol=1e-5, atol=1e-5)
    fuse_blocks(model, enabled=False)
    np.testing.assert_allclose(fixed_decode(model), replaced, rtol=1e-4, atol=1e-4)
    fuse_blocks(model)
    model.set_dtype(mx.float16)
    half = fixed_decode(model)
    assert len(runs) == 16 + 8 + 8  # source's decode fused too, then the float16 one
    fuse_blocks(model, enabled=False)
    np.testing.assert_allclose(half, fixed_decode(model), rtol=2e-2, atol=2e-2)


def test_lora_over_fused_blocks_trains():
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = tiny("llama")
    patch_model(model, group_size=32, bits=4, thresholds=0.3)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    tokens = mx.array([[1, 2, 3, 4, 5, 6]])

    def loss(m):
        return nn.losses.cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]).mean()

    value, grads = nn.value_and_grad(model, loss)(model)
    assert np.isfinite(value.item())
    fixed_decode(model)  # decodes through the adapters: the blocks' own forward


def test_deepcopy_and_refusing_non_models(monkeypatch):
    model = tiny("llama")
    patch_model(model, group_size=32, bits=4)
    clone = copy.deepcopy(model)
    assert all(is_fused(b) for b in clone.layers)
    expected = fixed_decode(model)
    np.testing.assert_allclose(fixed_decode(clone), expected, rtol=1e-6, atol=1e-6)
    # A copy made after fused steps (mlx-lm's tests copy models that have decoded) runs its own modules.
    runs = count_fused_steps(monkeypatch)
    later = copy.deepcopy(model)
    later.layers[0].mlp.down_proj = nn.Linear(256, 128, bias=False)
    np.testing.assert_allclose(fixed_decode(model), expected, rtol=1e-6, atol=1e-6)
    fixed_decode(later)
    assert len(runs) == 8 + 4  # the original fused at both blocks, the copy at its block 1 only
    with pytest.raises(TypeError, match="mlx.nn.Module"):
        fuse_blocks([model])
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fuse_blocks(model, enabled="no")
