"""Mixture-of-experts layers on the zigzag layout: the gathered product against a float64 reference on
every backend this machine has (CPU always, CUDA where present; Metal runs in tests/metal),
ZigzagSwitchLinear against mlx-lm's SwitchLinear, and a MoE model patched, calibrated, decoded
sparse, saved, loaded and trained over."""

import copy

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import spqt_mlx as sq
from spqt_mlx.layout import SUPPORTED_BITS as BITS
from spqt_mlx.layout import SUPPORTED_GROUP_SIZES as GROUP_SIZES
from spqt_mlx.patch import ZigzagSwitchLinear, get_thresholds, patch_model, set_thresholds, zigzag_layers

from lm_fixtures import random_tokens, tiny_model
from zigzag_reference import check_close as check

DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# The GPU where there is one: CUDA here, Metal on a Mac (where the emulated tests in tests/metal also run).
DEVICES = [mx.cpu] + ([mx.gpu] if mx.is_available(mx.gpu) else [])


def experts(rng, E, N, K, gs, bits, dtype):
    """Random zigzag experts and their float64 (E, N, K) copy."""
    w = mx.array(rng.normal(size=(E, N, K)).astype(np.float32)).astype(dtype)
    q = sq.zigzag_quantize(w, gs, bits, stream=mx.cpu)
    W = np.array(sq.zigzag_dequantize(q, stream=mx.cpu).astype(mx.float32), dtype=np.float64)
    return q, W


def reference(x, W, ids, threshold=None):
    """float64 rows x[r // x_div] @ W[ids[r]].T over |x| > threshold[ids[r]]; 0 for ids outside [0, E)."""
    xs = np.array(x.astype(mx.float32), dtype=np.float64).reshape(-1, W.shape[2])
    flat = np.asarray(ids).reshape(-1)
    x_div = flat.size // xs.shape[0]
    out = np.zeros((flat.size, W.shape[1]))
    for r, e in enumerate(flat):
        if 0 <= e < W.shape[0]:
            row = xs[r // x_div].copy()
            if threshold is not None:
                row[np.abs(row) <= np.broadcast_to(threshold, (W.shape[0],))[e]] = 0.0
            out[r] = W[e] @ row
    return out.reshape(*np.shape(ids), W.shape[1])


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gs", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_every_format(bits, gs, dtype, device):
    """Dense and thresholded (one threshold per expert), rows sharing x (x_div 3) and rows of their own,
    experts outside [0, E) (zero rows), K not a multiple of 32; outputs compared with float64."""
    rng = np.random.default_rng(bits * 1000 + gs)
    E, K = 5, 75
    q, W = experts(rng, E, 2 * gs, K, gs, bits, dtype)
    x = mx.array(rng.normal(size=(2, K)).astype(np.float32)).astype(dtype)
    ids = np.array([[4, 0, -1], [2, 2, 5]])
    t = rng.uniform(0.2, 1.2, size=E).astype(np.float32)
    with mx.stream(device):
        check(sq.zigzag_gather_gemv(x, q, mx.array(ids)), reference(x, W, ids), dtype)
        check(sq.zigzag_gather_gemv(x, q, mx.array(ids), threshold=mx.array(t)), reference(x, W, ids, t), dtype)
        # One row of x per entry.
        own = mx.array(rng.normal(size=(6, K)).astype(np.float32)).astype(dtype)
        check(sq.zigzag_gather_gemv(own, q, mx.array(ids.reshape(-1)), threshold=0.5),
              reference(own, W, ids.reshape(-1), 0.5), dtype)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_shapes_at_scale(device):
    """A decode step of a Qwen3-30B-A3B-shaped layer (8 of 128 experts, 768 x 2048 and 2048 x 768) and
    a long input (K above the CUDA kernel's own collection, the op's fallback path)."""
    rng = np.random.default_rng(0)
    for N, K in ((768, 2048), (2048, 768), (64, 20000)):
        q, W = experts(rng, 16 if K < 20000 else 2, N, K, 64, 4, mx.float16)
        x = mx.array(rng.normal(size=(1, K)).astype(np.float32)).astype(mx.float16)
        ids = rng.integers(0, W.shape[0], size=8 if K < 20000 else 2)
        with mx.stream(device):
            for t in (None, 0.7):
                check(sq.zigzag_gather_gemv(x, q, mx.array(ids), threshold=t), reference(x, W, ids, t), mx.float16)


def silu_product(x, dtype):
    """x' of the SwiGLU prologue, float64 from x (R, 2K), rounded to dtype once as the kernels do."""
    xs = np.array(x.astype(mx.float32), dtype=np.float64)
    K = xs.shape[-1] // 2
    g, u = xs[..., :K], xs[..., K:]
    return mx.array((g / (1 + np.exp(-g)) * u).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gs,bits", [(32, 3), (64, 4), (128, 8)])
def test_paired_experts_and_swiglu_prologue(gs, bits, dtype, device):
    """Gate and up as one product (a second set of experts whose rows follow the first's, sharing
    x and the active set) and down through the SwiGLU prologue; uint32 ids (as mlx-lm's router
    gives them) with ids at and above E as zero rows."""
    from spqt_mlx._ext import Prologue, zigzag_gather_gemv

    rng = np.random.default_rng(bits + gs)
    E, K = 4, 70
    qa, A = experts(rng, E, 2 * gs, K, gs, bits, dtype)
    qb, B = experts(rng, E, gs, K, gs, bits, dtype)
    ids = np.array([[3, 0], [4, 2**31 + 1], [1, 1]], dtype=np.uint32)
    x = mx.array(rng.normal(size=(3, K)).astype(np.float32)).astype(dtype)
    t = rng.uniform(0.2, 1.0, size=E).astype(np.float32)
    both = np.concatenate([A, B], axis=1)
    for threshold in (None, t):
        with mx.stream(device):
            y = zigzag_gather_gemv(x, qa.weight, qa.scales, qa.biases, mx.array(ids),
                                   None if threshold is None else mx.array(threshold), gs, bits,
                                   Prologue.Identity, qb.weight, qb.scales, qb.biases)
        check(y, reference(x, both, ids.astype(np.int64) % (2**32), threshold), dtype)
        h = mx.array(rng.normal(size=(6, 2 * K)).astype(np.float32)).astype(dtype)
        with mx.stream(device):
            y = zigzag_gather_gemv(h, qa.weight, qa.scales, qa.biases, mx.array(ids.reshape(-1)),
                                   None if threshold is None else mx.array(threshold), gs, bits, Prologue.SwiGLU)
        check(y, reference(silu_product(h, dtype), A, ids.reshape(-1).astype(np.int64), threshold), dtype)


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_gradient_through_pair_and_prologue(device):
    """d/dx of the paired product read through SwiGLU: back through both sets of experts, the
    active columns and the prologue (float64 reference by the chain rule)."""
    from spqt_mlx._ext import Prologue, zigzag_gather_gemv

    rng = np.random.default_rng(7)
    E, K = 3, 40
    qa, A = experts(rng, E, 64, K, 32, 8, mx.float32)
    qb, B = experts(rng, E, 32, K, 32, 8, mx.float32)
    x = mx.array(rng.normal(size=(2, 2 * K)).astype(np.float32))
    ids = np.array([[2, 0], [1, 5]])
    c = rng.normal(size=(2, 2, 96))

    def f(a):
        y = zigzag_gather_gemv(a, qa.weight, qa.scales, qa.biases, mx.array(ids), mx.array(0.3), 32, 8,
                               Prologue.SwiGLU, qb.weight, qb.scales, qb.biases)
        return (mx.array(c, dtype=mx.float32) * y).sum()

    with mx.stream(device):
        g = np.array(mx.grad(f)(x), dtype=np.float64)
    xs = np.array(x, dtype=np.float64)
    gate, up = xs[:, :K], xs[:, K:]
    sig = 1 / (1 + np.exp(-gate))
    xp = gate * sig * up
    want = np.zeros_like(xs)
    for i in range(2):
        for j in range(2):
            e = ids[i, j]
            if e < E:
                d = (c[i, j, :64] @ A[e] + c[i, j, 64:] @ B[e]) * (np.abs(xp[i]) > 0.3)
                want[i, :K] += d * up[i] * (sig[i] + gate[i] * sig[i] * (1 - sig[i]))
                want[i, K:] += d * gate[i] * sig[i]
    assert np.allclose(g, want, atol=1e-3, rtol=1e-3)


def test_wide_ids_out_of_range_are_zero_rows():
    """int64 ids that would wrap into range when narrowed to int32 stay out of range (zero rows)."""
    rng = np.random.default_rng(1)
    q, W = experts(rng, 3, 32, 40, 32, 4, mx.float32)
    x = mx.array(rng.normal(size=(1, 40)).astype(np.float32))
    ids = mx.array([1, 2**32 + 1, -(2**32) + 2], dtype=mx.int64)
    y = np.array(sq.zigzag_gather_gemv(x, q, ids))
    assert np.all(y[1:] == 0) and np.abs(y[0]).sum() > 0
    with pytest.raises(IndexError, match=r"experts must lie in \[0, 3\)"):
        sq.zigzag_gather_gemv(x, q, ids, validate=True)


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(2)
    q, _ = experts(rng, 3, 32, 40, 32, 4, mx.float32)
    x = mx.array(rng.normal(size=(2, 40)).astype(np.float32))
    with pytest.raises(ValueError, match="not a multiple of x's 2 rows"):
        sq.zigzag_gather_gemv(x, q, mx.array([0, 1, 2]))
    with pytest.raises(ValueError, match="experts must be an integer array"):
        sq.zigzag_gather_gemv(x, q, mx.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"threshold must be a scalar or have shape \(3,\)"):
        sq.zigzag_gather_gemv(x, q, mx.array([0, 1]), threshold=mx.zeros((40,)))
    with pytest.raises(ValueError, match="x is float16 but the weight's scales are float32"):
        sq.zigzag_gather_gemv(x.astype(mx.float16), q, mx.array([0, 1]))
    with pytest.raises(ValueError, match="input features"):
        sq.zigzag_gather_gemv(x[:, :39], q, mx.array([0, 1]))
    single = sq.zigzag_quantize(mx.ones((32, 40)), 32, 4)
    with pytest.raises(ValueError, match="holds one weight, not experts"):
        sq.zigzag_gather_gemv(x, single, mx.array([0, 1]))
    with pytest.raises(TypeError, match="experts must be an mx.array"):
        sq.zigzag_gather_gemv(x, q, [0, 1])
    assert sq.zigzag_gather_gemv(mx.zeros((0, 40)), q, mx.zeros((0, 2), dtype=mx.int32)).shape == (0, 2, 32)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("threshold", [None, 0.6], ids=["dense", "sparse"])
def test_gradient_with_respect_to_x(threshold, device):
    """d/dx of sum(c * y): the rows' c @ W_e over their active columns, summed over the rows sharing x."""
    rng = np.random.default_rng(3)
    q, W = experts(rng, 4, 64, 50, 32, 4, mx.float32)
    x = mx.array(rng.normal(size=(2, 50)).astype(np.float32))
    ids = np.array([[3, 0], [1, 9]])
    c = rng.normal(size=(2, 2, 64))
    with mx.stream(device):
        g = mx.grad(lambda a: (mx.array(c, dtype=mx.float32) * sq.zigzag_gather_gemv(
            a, q, mx.array(ids), threshold=threshold)).sum())(x)
    xs = np.array(x, dtype=np.float64)
    want = np.zeros_like(xs)
    for i in range(2):
        for j in range(2):
            e = ids[i, j]
            if e < 4:
                keep = np.ones(50) if threshold is None else (np.abs(xs[i]) > threshold)
                want[i] += (c[i, j] @ W[e]) * keep
    assert np.allclose(np.array(g), want, atol=1e-4, rtol=1e-4)


# ---- ZigzagSwitchLinear ------------------------------------------------------------------------


def switch(E=4, N=64, K=96, bias=False, seed=0):
    from mlx_lm.models.switch_layers import SwitchLinear

    mx.random.seed(seed)
    layer = SwitchLinear(K, N, E, bias=bias)
    if bias:
        layer.bias = mx.random.normal((E, N))
    mx.eval(layer.parameters())
    return layer


def as_reference(zz: ZigzagSwitchLinear):
    """A SwitchLinear with the zigzag layer's dequantized experts: what it must compute."""
    ref = switch(zz.num_experts, zz.output_dims, zz.input_dims, bias="bias" in zz)
    ref.weight = zz.dequantized_weight()
    if "bias" in zz:
        ref.bias = zz.bias
    return ref


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_switch_linear_calls_as_switch_glu_makes_them(bias, device):
    """Decode (x (B, 1, 1, 1, K) and (B, 1, k, 1, K)), short prefill, and a sorted long prefill as
    SwitchGLU's, against a SwitchLinear holding the same (dequantized) experts."""
    zz = ZigzagSwitchLinear.from_switch(switch(bias=bias), group_size=32, bits=8)
    ref = as_reference(zz)
    rng = np.random.default_rng(4)

    def agree(*args, **kwargs):
        with mx.stream(device):
            got = np.array(zz(*args, **kwargs))
        with mx.stream(mx.cpu):  # float32 products without TF32
            want = np.array(ref(*args, **kwargs))
        assert np.allclose(got, want, atol=1e-4)

    for B, L in ((1, 1), (3, 1), (2, 5)):
        idx = mx.array(rng.integers(0, 4, size=(B, L, 2)))
        agree(mx.array(rng.normal(size=(B, L, 1, 1, 96)).astype(np.float32)), idx)
        agree(mx.array(rng.normal(size=(B, L, 2, 1, 96)).astype(np.float32)), idx)
    idx = mx.array(rng.integers(0, 4, size=(40,)))
    order = mx.argsort(idx)
    agree(mx.array(rng.normal(size=(40, 1, 96)).astype(np.float32))[order], idx[order], sorted_indices=True)


def test_switch_linear_sparse_decode_is_the_masked_product():
    zz = ZigzagSwitchLinear.from_switch(switch(), group_size=32, bits=4)
    ref = as_reference(zz)
    zz.threshold = 0.8
    rng = np.random.default_rng(5)
    x = mx.array(rng.normal(size=(2, 1, 1, 1, 96)).astype(np.float32))
    idx = mx.array(rng.integers(0, 4, size=(2, 1, 3)))
    masked = mx.where(mx.abs(x) > 0.8, x, 0.0)
    assert np.allclose(np.array(zz(x, idx)), np.array(ref(masked, idx)), atol=1e-4)
    # A prefill call (two positions) stays dense.
    x2 = mx.array(rng.normal(size=(1, 2, 1, 1, 96)).astype(np.float32))
    idx2 = mx.array(rng.integers(0, 4, size=(1, 2, 3)))
    assert np.allclose(np.array(zz(x2, idx2)), np.array(ref(x2, idx2)), atol=1e-4)


def test_switch_linear_promotes_and_converts_quantized_experts():
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    base = switch()
    quantized = base.to_quantized(group_size=32, bits=4)
    assert isinstance(quantized, QuantizedSwitchLinear)
    zz = ZigzagSwitchLinear.from_switch(quantized, group_size=32, bits=8)
    rng = np.random.default_rng(6)
    x = mx.array(rng.normal(size=(1, 1, 1, 1, 96)).astype(np.float32))
    idx = mx.array([[[1, 3]]])
    assert np.allclose(np.array(zz(x, idx)), np.array(quantized(x, idx)), atol=2e-2)
    half = ZigzagSwitchLinear.from_switch(switch(), group_size=32, bits=4)
    half.set_dtype(mx.float16)
    assert half(x, idx).dtype == mx.float32  # as SwitchLinear: float32 x into float16 experts
    with pytest.raises(TypeError, match="expected a SwitchLinear"):
        ZigzagSwitchLinear.from_switch(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="must be a multiple of group_size"):
        ZigzagSwitchLinear.empty(96, 48, 4, group_size=32)


# ---- a MoE model ---------------------------------------------------------------------------------


def moe_model(seed=0):
    model = tiny_model("qwen3_moe", seed=seed)
    reference = copy.deepcopy(model)
    paths = patch_model(model, group_size=32, bits=8)
    return model, reference, paths


def test_moe_model_patched_decodes_as_its_dense_experts():
    """Experts patched (routers exact); a sparse decode step equals the step with every layer's
    inputs masked as the kernels mask them."""
    from mlx_lm.models.cache import make_prompt_cache

    from spqt_mlx.perplexity import thresholded_inputs

    model, reference, paths = moe_model()
    assert [p for p in paths if "switch_mlp" in p] and not [p for p in paths if p.endswith("mlp.gate")]
    assert isinstance(model.model.layers[0].mlp.switch_mlp.down_proj, ZigzagSwitchLinear)
    tokens = random_tokens(12)
    assert mx.abs(model(tokens) - reference(tokens)).max().item() < 0.05
    set_thresholds(model, 0.3)
    cache = make_prompt_cache(model)
    with thresholded_inputs(model):  # the prompt masked too, so that both see the same keys and values
        model(tokens[:, :10], cache=cache)
    step = model(tokens[:, 10:11], cache=cache)
    with thresholded_inputs(model):
        masked = model(tokens[:, :11])[:, -1:]
    assert mx.abs(step - masked).max().item() < 1e-3


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("threshold", [0.0, 0.4], ids=["dense", "sparse"])
def test_fused_experts_block_decodes_as_switch_glu(threshold, device):
    """The patched SwitchGLU (gate and up in one launch, down through the SwiGLU prologue) gives
    what SwitchGLU's own four steps give over the same zigzag experts, dense and sparse; gate and up
    with different thresholds run unfused."""
    from mlx_lm.models.switch_layers import SwitchGLU

    from spqt_mlx.patch.experts import ZigzagSwitchGLU

    model, _, _ = moe_model()
    glu = model.model.layers[0].mlp.switch_mlp
    assert type(glu) is ZigzagSwitchGLU and isinstance(glu, SwitchGLU)
    set_thresholds(model, threshold)
    rng = np.random.default_rng(8)
    x = mx.array(rng.normal(size=(3, 1, 128)).astype(np.float32))
    idx = mx.array(rng.integers(0, 4, size=(3, 1, 2)).astype(np.uint32))
    with mx.stream(device):
        assert glu._fuses(x, idx)
        fused = glu(x, idx)
        unfused = SwitchGLU.__call__(glu, x, idx)
        assert mx.abs(fused - unfused).max().item() < 1e-4
        glu.up_proj.threshold = threshold + 0.1
        assert not glu._fuses(x, idx)
        assert mx.abs(glu(x, idx) - SwitchGLU.__call__(glu, x, idx)).max().item() == 0


def test_a_large_batch_decode_step_stays_sparse():
    """A decode step of 40 sequences routes 80 rows per block: SwitchGLU would sort them and run
    dense; the patched block keeps each sequence's result what it is alone (sparse), and the
    statistics count tokens, not rows."""
    from mlx_lm.models.switch_layers import SwitchGLU

    from spqt_mlx.patch import achieved_sparsity, record_stats

    model, _, _ = moe_model()
    glu = model.model.layers[0].mlp.switch_mlp
    set_thresholds(model, 0.5)
    rng = np.random.default_rng(9)
    x = mx.array(rng.normal(size=(40, 1, 128)).astype(np.float32))
    idx = mx.array(rng.integers(0, 4, size=(40, 1, 2)).astype(np.uint32))
    got = glu(x, idx)
    alone = mx.concatenate([glu(x[i : i + 1], idx[i : i + 1]) for i in range(0, 40, 13)])
    assert mx.abs(got[::13] - alone).max().item() < 1e-5
    assert mx.abs(got - SwitchGLU.__call__(glu, x, idx)).max().item() > 1e-2  # SwitchGLU's sorted call: dense
    record_stats(model)
    glu(x, idx)
    assert achieved_sparsity(model)[1] == 40


def test_allocating_for_microscaled_experts_and_empty_steps():
    """Experts in MLX's mxfp4 mode (uint8 scales) allocate bfloat16 zigzag layers to load into; a
    step routing nothing (no experts per token) gives an empty result, statistics on."""
    from mlx_lm.models.switch_layers import SwitchGLU

    from spqt_mlx.patch import record_stats

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [SwitchGLU(64, 64, 4)]

    model = Stack()
    nn.quantize(model, group_size=32, bits=4, mode="mxfp4")
    patch_model(model, group_size=32, bits=4, allocate_only=True)
    assert model.layers[0].gate_proj.scales.dtype == mx.bfloat16
    model = Stack()
    patch_model(model, group_size=32, bits=4, thresholds=0.3)
    record_stats(model)
    y = model.layers[0](mx.ones((2, 1, 64)), mx.zeros((2, 1, 0), dtype=mx.uint32))
    assert y.shape == (2, 1, 0, 64)


def test_moe_calibration_and_round_trip(tmp_path):
    """Uniform calibration gives the experts' gate and up one threshold (one input); greedy runs
    through the MoE blocks; a saved checkpoint loads with its experts and thresholds."""
    from spqt_mlx import checkpoint
    from spqt_mlx.calibrate import calibrate

    model, _, _ = moe_model()
    tokens = random_tokens(64, seed=1).reshape(2, 32)
    uniform = calibrate(model, tokens, 0.5, progress=False)
    block = "model.layers.0.mlp.switch_mlp"
    assert uniform[f"{block}.gate_proj"] == uniform[f"{block}.up_proj"] > 0 and uniform[f"{block}.down_proj"] > 0
    greedy = calibrate(model, tokens, 0.5, method="greedy", progress=False)
    assert set(greedy) == set(uniform) and greedy[f"{block}.down_proj"] > 0
    set_thresholds(model, uniform)

    class Tokenizer:
        def save_pretrained(self, path):
            pass

    config = {**model.args.__dict__, "model_type": "qwen3_moe"}
    out = checkpoint.save(model, Tokenizer(), config, tmp_path / "moe", {"bits": 8, "group_size": 32})
    loaded = checkpoint.build_model(checkpoint.read_spqt_config(out))
    loaded.load_weights(str(out / checkpoint.WEIGHTS_FILE))
    set_thresholds(loaded, get_thresholds(model))
    assert set(zigzag_layers(loaded)) == set(zigzag_layers(model))
    probe = random_tokens(6, seed=2)
    assert mx.array_equal(loaded(probe), model(probe))


def test_lora_trains_over_a_patched_moe_model():
    """mlx-lm's LoRA adapters on the attention of a model whose experts are zigzag: gradients flow
    through the experts' products, the experts stay frozen, the loss falls."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _, _ = moe_model()
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all("lora" in k for k in trainable)
    tokens = random_tokens(33, seed=3)

    def loss(m):
        logits = m(tokens[:, :-1])
        return nn.losses.cross_entropy(logits, tokens[:, 1:]).mean()

    step = nn.value_and_grad(model, loss)
    opt = optim.Adam(learning_rate=1e-2)
    first = None
    for _ in range(5):
        value, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        first = value.item() if first is None else first
    assert loss(model).item() < first
