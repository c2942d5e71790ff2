"""Training over a patched model: gradients with respect to the input of every zigzag product
(float64 reference), frozen quantized weights, mixed-dtype calls, and a LoRA step with mlx-lm's own
adapters."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import spqt_mlx as sq
from spqt_mlx import _ext
from spqt_mlx.ops import ActiveKind
from spqt_mlx.patch import ZigzagLinear, patch_model, set_thresholds

from lm_fixtures import random_tokens, tiny_llama
from zigzag_reference import dense_weight64

DTYPES = (mx.float32, mx.float16, mx.bfloat16)
TOL = {mx.float32: 1e-4, mx.float16: 1e-2, mx.bfloat16: 5e-2}


def layer(rng, N, K, gs, bits, dtype):
    w = mx.array(rng.normal(size=(N, K)).astype(np.float32)).astype(dtype)
    return sq.zigzag_quantize(w, gs, bits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gs,bits", [(32, 3), (64, 4), (128, 8)])
def test_gradient_with_respect_to_x(gs, bits, dtype):
    """d/dx of sum(c * zigzag_gemv(x)) is c @ W over the active columns (each listed column as
    often as it is listed), against a float64 reference, for every kind of active set."""
    rng = np.random.default_rng(gs + bits)
    N, K = 2 * gs, 77
    q = layer(rng, N, K, gs, bits, dtype)
    W = dense_weight64(q)
    c = rng.normal(size=N)
    x = mx.array(rng.normal(size=(1, K)).astype(np.float32)).astype(dtype)
    xs = np.abs(np.array(x.astype(mx.float32), dtype=np.float64))[0]
    listed = np.array([4, 9, 9, -3, K, 60, 0], dtype=np.int32)
    packed = np.concatenate([[5], listed[:5], rng.integers(0, K, size=K - 5)]).astype(np.int32)
    t = float(np.median(xs))
    count = lambda entries: np.bincount([k for k in entries if 0 <= k < K], minlength=K).astype(np.float64)
    cases = [
        (ActiveKind.Dense, None, np.ones(K)),
        (ActiveKind.Threshold, mx.array(t), (xs > t).astype(np.float64)),
        (ActiveKind.Indices, mx.array(listed), count(listed)),
        (ActiveKind.Packed, mx.array(packed), count(listed[:5])),
    ]
    for kind, active, times in cases:
        def loss(x):
            y = _ext.zigzag_gemv(x, q.weight, q.scales, q.biases, active, kind, gs, bits)
            return (y.astype(mx.float32) * mx.array(c.astype(np.float32))).sum()

        got = np.array(mx.grad(loss)(x).astype(mx.float32), dtype=np.float64)[0]
        want = (c @ W) * times
        scale = np.abs(c) @ np.abs(W)
        assert np.all(np.abs(got - want) <= TOL[dtype] * scale + 1e-6), (kind, np.abs(got - want).max())


def test_quantized_weights_have_no_gradient():
    q = layer(np.random.default_rng(0), 64, 32, 64, 4, mx.float32)
    x = mx.random.normal((1, 32))
    with pytest.raises(ValueError, match="weight has no gradient"):
        mx.grad(lambda s: _ext.zigzag_gemv(x, q.weight, s, q.biases, None, ActiveKind.Dense, 64, 4).sum())(q.scales)


def test_an_active_set_computed_from_x_passes_no_gradient():
    """Indices picked from x itself (top-k of |x|): the gradient flows to x through the product only."""
    q = layer(np.random.default_rng(1), 64, 32, 64, 4, mx.float32)
    W = dense_weight64(q)
    x = mx.random.normal((1, 32))

    def loss(x):
        top = mx.argsort(mx.abs(x[0]))[-8:].astype(mx.int32)
        return _ext.zigzag_gemv(x, q.weight, q.scales, q.biases, top, ActiveKind.Indices, 64, 4).sum()

    got = np.array(mx.grad(loss)(x))[0]
    top = np.argsort(np.abs(np.array(x[0])))[-8:]
    want = np.zeros(32)
    want[top] = W.sum(0)[top]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_zigzag_layers_are_frozen_like_quantized_linear():
    model = tiny_llama()
    patch_model(model)
    trainable = dict(tree_flatten(model.trainable_parameters()))
    # Norms and embeddings stay trainable; nothing of a zigzag layer is.
    assert trainable and not [p for p in trainable if ".mlp." in p or ".self_attn." in p]


@pytest.mark.parametrize("layer_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
def test_mixed_dtype_calls_promote_like_quantized_linear(layer_dtype, x_dtype):
    linear = nn.Linear(64, 128)
    linear.set_dtype(layer_dtype)
    zigzag = ZigzagLinear.from_linear(linear, 64, 4)
    reference = nn.QuantizedLinear.from_linear(linear, 64, 4)
    for rows in (1, 3):
        x = mx.random.normal((rows, 64)).astype(x_dtype)
        y = zigzag(x)
        assert y.dtype == reference(x).dtype
        want = zigzag(x.astype(layer_dtype)).astype(y.dtype)
        assert mx.allclose(y, want).item()


def test_lora_over_a_patched_model_trains():
    """mlx-lm's linear_to_lora_layers over a patched (sparse) model: the adapters train and lower
    the loss; fusing folds them into zigzag layers."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from spqt_mlx.patch.lora import ZigzagLoRALinear

    mx.random.seed(0)
    model = tiny_llama()
    patch_model(model, thresholds=0.05)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    adapters = [m for _, m in model.named_modules() if isinstance(m, ZigzagLoRALinear)]
    assert len(adapters) == 14  # q/k/v/o and gate/up/down of both blocks
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all("lora_" in p for p in trainable)

    tokens = random_tokens(33, seed=1)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_fn(model):
        return nn.losses.cross_entropy(model(inputs), targets, reduction="mean")

    step = nn.value_and_grad(model, loss_fn)
    optimizer = optim.Adam(learning_rate=1e-2)
    first = None
    for _ in range(8):
        loss, grads = step(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        first = loss.item() if first is None else first
    assert loss.item() < 0.9 * first

    # One token at a time runs the sparse kernel: its gradient flows as well.
    loss1, grads1 = nn.value_and_grad(model, lambda m: m(tokens[:, :1]).sum())(model)
    assert all(np.isfinite(np.array(g)).all() for _, g in tree_flatten(grads1))

    x = mx.random.normal((3, 128))
    fused = adapters[0].fuse()
    assert isinstance(fused, ZigzagLinear) and fused.threshold == adapters[0].linear.threshold
    set_thresholds(model, 0.0)
    dense = adapters[0].fuse(dequantize=True)
    want = adapters[0](x)  # to float32 rounding (TF32 in MLX's float32 matmuls on CUDA)
    assert mx.allclose(dense(x), want, atol=2e-3 * mx.abs(want).max().item()).item()
    fused.threshold = 0.0
    assert mx.array_equal(fused(x), ZigzagLinear.from_linear(dense, 64, 4)(x)).item()  # one more 4-bit rounding
