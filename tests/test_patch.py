"""ZigzagLinear and patch_model on a tiny random Llama."""

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import make_prompt_cache

import spqt_mlx.patch.linear as linear_module
from spqt_mlx import ops as spqt_ops
from spqt_mlx.patch import (
    ZigzagLinear,
    achieved_sparsity,
    choose_quantizer,
    get_thresholds,
    patch_model,
    record_stats,
    routers,
    set_thresholds,
    zigzag_layers,
)

from lm_fixtures import OTHER_FAMILIES, random_tokens, tiny_llama, tiny_model

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def dequantized_reference(patched):
    """A float Llama whose projection weights are exactly what the patched model multiplies by."""
    ref = tiny_llama()
    weights = [(f"{p}.weight", layer.dequantized_weight()) for p, layer in zigzag_layers(patched).items()]
    ref.update(tree_unflatten(weights))
    return ref


def decode_logits(model, prompt, steps):
    """Logits of a prefill plus ``steps`` single-token steps (greedy), with a KV cache."""
    cache = make_prompt_cache(model)
    logits = model(prompt, cache=cache)[:, -1]
    out = [logits]
    for _ in range(steps):
        token = mx.argmax(logits, axis=-1)[:, None]
        logits = model(token, cache=cache)[:, -1]
        out.append(logits)
    return mx.concatenate(out)


def test_dense_patched_model_matches_dequantized_reference():
    patched = tiny_llama()
    patch_model(patched, group_size=64, bits=4)
    ref = dequantized_reference(patched)
    tokens = random_tokens(12)
    # Prefill goes through zigzag_matmul, the decode steps through the dense zigzag GEMV.
    np.testing.assert_allclose(patched(tokens), ref(tokens), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(decode_logits(patched, tokens, 6), decode_logits(ref, tokens, 6), rtol=1e-4, atol=1e-4)
    # The reference really is the quantized model, not the original float one.
    assert not np.allclose(tiny_llama()(tokens), ref(tokens), atol=1e-3)


def spy_on_gemv(monkeypatch) -> list:
    """Record the kind of active set of every zigzag GEMV the layers launch."""
    calls = []
    real = linear_module._ext.zigzag_gemv
    monkeypatch.setattr(linear_module._ext, "zigzag_gemv", lambda *a, **kw: calls.append(a[5]) or real(*a, **kw))
    return calls


def test_single_token_with_threshold_runs_the_sparse_kernel(monkeypatch):
    mx.random.seed(1)
    layer = ZigzagLinear.from_linear(nn.Linear(128, 192, bias=True), group_size=64, bits=4)
    layer.threshold = 0.8
    calls = spy_on_gemv(monkeypatch)
    x = mx.random.normal((1, 1, 128))
    y = layer(x)
    assert calls == [spqt_ops.ActiveKind.Threshold]  # the fused collection, with the layer's threshold
    idx = np.flatnonzero(np.abs(np.array(x).reshape(-1)) > 0.8)
    assert 0 < idx.size < 128
    w = np.array(layer.dequantized_weight())
    expected = np.array(x).reshape(-1)[idx] @ w[:, idx].T + np.array(layer.bias)
    np.testing.assert_allclose(np.array(y).reshape(-1), expected, rtol=1e-4, atol=1e-4)
    dense = np.array(x).reshape(-1) @ w.T + np.array(layer.bias)
    assert not np.allclose(expected, dense, atol=1e-3)


def test_multi_token_and_zero_threshold_calls_are_dense(monkeypatch):
    mx.random.seed(2)
    layer = ZigzagLinear.from_linear(nn.Linear(64, 128, bias=False), group_size=32, bits=8)
    w = np.array(layer.dequantized_weight())
    layer.threshold = 1.0
    x = mx.random.normal((2, 3, 64))
    np.testing.assert_allclose(layer(x), np.array(x) @ w.T, rtol=1e-4, atol=1e-4)
    layer.threshold = 0.0
    calls = spy_on_gemv(monkeypatch)
    x1 = mx.random.normal((1, 1, 64))
    np.testing.assert_allclose(layer(x1), np.array(x1) @ w.T, rtol=1e-4, atol=1e-4)
    assert calls == [spqt_ops.ActiveKind.Dense]


def test_patch_model_swaps_projections_only():
    model = tiny_llama()
    paths = patch_model(model)
    expected = {f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}" for i in range(2) for p in PROJECTIONS}
    assert set(paths) == expected and len(paths) == len(expected)
    assert set(zigzag_layers(model)) == expected
    assert type(model.model.embed_tokens) is nn.Embedding
    assert type(model.lm_head) is nn.Linear
    # Patching again finds nothing left to do.
    assert patch_model(model) == []


@pytest.mark.parametrize("model_type", sorted(OTHER_FAMILIES))
def test_other_families(model_type):
    model = tiny_model(model_type)
    paths = patch_model(model)
    names = sorted({p.split(".")[-1] for p in paths})
    assert names == sorted(OTHER_FAMILIES[model_type][1])
    assert len(paths) == 2 * len(names)
    # Dense patched model == the family's own model with the zigzag-dequantized weights.
    ref = tiny_model(model_type)
    ref.update(tree_unflatten([(f"{p}.weight", m.dequantized_weight()) for p, m in zigzag_layers(model).items()]))
    tokens = random_tokens(10)
    np.testing.assert_allclose(decode_logits(model, tokens, 3), decode_logits(ref, tokens, 3), rtol=1e-4, atol=1e-4)


def test_unsupported_layers_stay_dense_with_a_warning():
    model = tiny_llama(intermediate_size=96)  # gate/up: 96 outputs, not a multiple of 64
    with pytest.warns(UserWarning, match="gate_proj"):
        paths = patch_model(model, group_size=64)
    assert isinstance(model.model.layers[0].mlp.gate_proj, nn.Linear)
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, ZigzagLinear)
    assert len(paths) == 2 * 5
    mx.eval(model(random_tokens(4)))


def test_from_quantized_is_a_second_rounding():
    mx.random.seed(3)
    lin = nn.Linear(256, 128)
    ql = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=4)
    once = ZigzagLinear.from_linear(lin, 64, 4)
    twice = ZigzagLinear.from_quantized(ql)
    assert (twice.group_size, twice.bits) == (64, 4) and "bias" in twice
    w = np.array(lin.weight)
    err_once = np.abs(np.array(once.dequantized_weight()) - w).mean()
    err_twice = np.abs(np.array(twice.dequantized_weight()) - w).mean()
    assert err_twice > err_once
    # Still the same layer, up to quantization error.
    x = mx.random.normal((4, 256))
    assert np.abs(np.array(twice(x)) - np.array(ql(x))).max() < 0.1 * np.abs(np.array(ql(x))).max()


def test_quantized_model_is_patched():
    model = tiny_llama()
    nn.quantize(model, group_size=64, bits=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every projection is supported: no warning
        paths = patch_model(model, group_size=64, bits=4)
    assert len(paths) == 14
    assert isinstance(model.lm_head, nn.QuantizedLinear)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    mx.eval(model(random_tokens(4)))


def test_thresholds_round_trip_and_validation():
    model = tiny_llama()
    paths = patch_model(model, thresholds=0.25)
    assert get_thresholds(model) == {p: 0.25 for p in paths}
    set_thresholds(model, {paths[0]: 0.5})
    assert get_thresholds(model)[paths[0]] == 0.5 and get_thresholds(model)[paths[1]] == 0.25
    with pytest.raises(ValueError, match="no zigzag layer"):
        set_thresholds(model, {"model.embed_tokens": 0.1})
    with pytest.raises(ValueError):
        set_thresholds(model, -1.0)
    with pytest.raises(TypeError):
        set_thresholds(model, "0.1")
    layer = zigzag_layers(model)[paths[3]]
    layer.threshold = mx.array(0.125)  # arrays and NumPy scalars are accepted too
    assert layer.threshold == 0.125 and "threshold" not in layer.parameters()
    layer.threshold = np.float32(0.375)
    assert get_thresholds(model)[paths[3]] == 0.375
    other = tiny_llama()
    patch_model(other, thresholds={paths[2]: 0.75})
    assert get_thresholds(other)[paths[2]] == 0.75
    untouched = tiny_llama()
    with pytest.raises(ValueError, match="not projections"):
        patch_model(untouched, thresholds={"lm_head": 0.1})
    assert zigzag_layers(untouched) == {}


def test_bad_arguments():
    with pytest.raises(TypeError):
        patch_model("model")
    with pytest.raises(ValueError):
        patch_model(tiny_llama(), bits=7)
    with pytest.raises(ValueError, match="multiple of group_size"):
        ZigzagLinear.from_linear(nn.Linear(64, 96), 64, 4)
    with pytest.raises(TypeError):
        ZigzagLinear.from_linear(nn.Embedding(10, 64))
    untouched = tiny_llama()
    with pytest.raises(ValueError, match="quantizer must be one of"):
        patch_model(untouched, quantizer="nearest")
    with pytest.raises(ValueError, match="takes hessians"):
        patch_model(untouched, quantizer="gptq")
    with pytest.raises(ValueError, match="needs the input statistics of model.layers.0.self_attn.q_proj"):
        patch_model(untouched, quantizer="gptq", hessians={})
    assert not zigzag_layers(untouched)


def test_search_quantizer_patches_with_lower_error():
    # The patched model with the "search" quantizer is its own dequantized reference, closer to the float model.
    model, searched = tiny_llama(), tiny_llama()
    patch_model(model)
    patch_model(searched, quantizer="search")
    tokens = random_tokens(12)
    np.testing.assert_allclose(searched(tokens), dequantized_reference(searched)(tokens), rtol=1e-4, atol=1e-4)
    exact = tiny_llama()(tokens)
    assert mx.mean(mx.square(searched(tokens) - exact)).item() < mx.mean(mx.square(model(tokens) - exact)).item()


def test_auto_quantizer_is_gptq_up_to_a_model_size(monkeypatch):
    import spqt_mlx.patch.model as model_module
    from mlx_lm.models import llama

    small = tiny_llama()
    chosen, why = choose_quantizer(small, "auto")
    assert chosen == "gptq" and why.startswith("quantizer auto -> gptq: the projections hold")
    # Counted from the shapes of the projections alone: a Llama-3-8B shape (never evaluated) is over the limit.
    args = llama.ModelArgs(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                           num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=128256)
    chosen, why = choose_quantizer(llama.Model(args), "auto")
    assert chosen == "search" and "6,979,321,856 weights, more than" in why
    # The limit decides; patched projections count by their own dimensions.
    counted = int(why.split(" hold ")[1].split(" weights")[0].replace(",", ""))
    monkeypatch.setattr(model_module, "AUTO_GPTQ_WEIGHTS", counted)
    assert choose_quantizer(llama.Model(args), "auto")[0] == "gptq"
    patch_model(small)
    assert choose_quantizer(small, "auto") == choose_quantizer(tiny_llama(), "auto")
    for named in ("minmax", "search", "gptq"):
        assert choose_quantizer(small, named) == (named, None)
    with pytest.raises(ValueError, match="quantizer must be one of"):
        choose_quantizer(small, "nearest")


def test_stats_count_active_columns():
    mx.random.seed(4)
    layer = ZigzagLinear.from_linear(nn.Linear(128, 64), 64, 4)
    layer.threshold = 0.5
    layer.record_stats()
    xs = [mx.random.normal((1, 1, 128)) for _ in range(40)]  # more than one lazy flush
    for x in xs:
        mx.eval(layer(x))
    mx.eval(layer(mx.random.normal((1, 5, 128))))  # prefill: dense, not counted
    calls, active = layer.stats()
    assert calls == 40
    assert active == sum(int((np.abs(np.array(x)) > 0.5).sum()) for x in xs)


def test_achieved_sparsity_during_decode():
    model = tiny_llama()
    patch_model(model)
    record_stats(model)
    assert achieved_sparsity(model) is None
    decode_logits(model, random_tokens(8), 4)
    assert achieved_sparsity(model) is None  # threshold 0: nothing is sparse
    set_thresholds(model, 1e9)
    record_stats(model)
    decode_logits(model, random_tokens(8), 4)
    sparsity, calls = achieved_sparsity(model)
    assert calls == 4 and sparsity == 1.0


def test_saved_weights_load_into_allocated_layers(tmp_path):
    model = tiny_llama()
    patch_model(model, group_size=32, bits=3)
    model.save_weights(str(tmp_path / "w.safetensors"))
    fresh = tiny_llama(seed=7)
    paths = patch_model(fresh, group_size=32, bits=3, allocate_only=True)
    assert len(paths) == 14
    fresh.load_weights(str(tmp_path / "w.safetensors"))
    tokens = random_tokens(6)
    np.testing.assert_array_equal(np.array(fresh(tokens)), np.array(model(tokens)))
    assert "threshold" not in str([k for k, _ in tree_flatten(model.parameters())])


# ---- what gets patched: by structure ---------------------------------------------------------------


class _Block(nn.Module):
    """A block whose parts have names patch_model has never seen."""

    def __init__(self, dims=64):
        super().__init__()
        self.mixer = nn.Module()
        self.mixer.in_proj = nn.Linear(dims, 2 * dims)
        self.mixer.out_proj = nn.Linear(2 * dims, dims)
        self.temporal_block = nn.Module()
        self.temporal_block.linear_x = nn.Linear(dims, dims)


class _Stack(nn.Module):
    def __init__(self, block=_Block, n=2):
        super().__init__()
        self.layers = [block() for _ in range(n)]
        self.head = nn.Linear(64, 64)  # outside the stack of blocks: stays


def test_projections_are_found_by_structure_not_by_name():
    model = _Stack()
    paths = patch_model(model)
    assert sorted(paths) == sorted(f"layers.{i}.{p}" for i in range(2)
                                   for p in ("mixer.in_proj", "mixer.out_proj", "temporal_block.linear_x"))
    assert type(model.head) is nn.Linear


def test_a_model_with_linears_but_no_projection_warns():
    model = nn.Module()
    model.lm_head = nn.Linear(64, 64)
    with pytest.warns(UserWarning, match="no layer of this model was patched"):
        assert patch_model(model) == []
    with pytest.warns(UserWarning, match="that the predicate selects"):
        assert patch_model(_Stack(), predicate=lambda path, module: "attn" in path) == []


def test_a_single_block_has_all_its_linears_patched():
    block = _Block()
    assert sorted(patch_model(block)) == ["mixer.in_proj", "mixer.out_proj", "temporal_block.linear_x"]


class FusedLinear(nn.Linear):
    """Like afm7's: one weight, several outputs."""

    def __call__(self, x):
        y = super().__call__(x)
        return y[..., :32], y[..., 32:]


def test_linear_subclasses_with_their_own_forward_stay_with_a_warning():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkv = FusedLinear(64, 64)
            self.attn.out = nn.Linear(64, 64)

    model = _Stack(Block)
    with pytest.warns(UserWarning, match="FusedLinear has its own forward"):
        paths = patch_model(model)
    assert sorted(paths) == ["layers.0.attn.out", "layers.1.attn.out"]
    assert type(model.layers[0].attn.qkv) is FusedLinear and len(model.layers[0].attn.qkv(mx.ones((1, 64)))) == 2


def test_moe_routers_stay_exact():
    """qwen3_moe: the router (mlp.gate, beside the experts) stays nn.Linear; attention is patched."""
    import importlib

    module = importlib.import_module("mlx_lm.models.qwen3_moe")
    args = module.ModelArgs(model_type="qwen3_moe", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
                            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=320,
                            num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                            moe_intermediate_size=64, head_dim=32, rope_theta=10000.0, tie_word_embeddings=False,
                            max_position_embeddings=512, norm_topk_prob=True)
    model = module.Model(args)
    paths = patch_model(model, group_size=32)
    assert "model.layers.0.mlp.gate" in routers(model) and type(model.model.layers[0].mlp.gate) is nn.Linear
    assert "model.layers.0.self_attn.q_proj" in paths and not [p for p in paths if p.endswith("mlp.gate")]
    mx.eval(model(random_tokens(3)))


def test_linear_layers_beside_experts_that_do_not_route_are_projections():
    """Beside the experts, the layers with one output per expert (the router) or one output (a
    shared-expert gate) stay exact; a latent projection there is patched (nemotron_h's
    fc1_latent_proj, deepseek_v41's attention in a block that holds its experts directly)."""
    from mlx_lm.models.switch_layers import SwitchGLU

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.switch_mlp = SwitchGLU(64, 64, 4)
            self.gate = nn.Linear(64, 4, bias=False)
            self.shared_expert_gate = nn.Linear(64, 1, bias=False)
            self.latent_proj = nn.Linear(64, 32, bias=False)

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [Block()]

    model = Stack()
    assert routers(model) == {"layers.0.gate", "layers.0.shared_expert_gate"}
    assert "layers.0.latent_proj" in patch_model(model, group_size=32)


def test_routers_nested_in_a_router_module_stay_exact():
    """afmoe keeps its router one level down (mlp.router.gate): found by its output, one score per
    expert."""
    import importlib

    module = importlib.import_module("mlx_lm.models.afmoe")
    config = {"model_type": "afmoe", "vocab_size": 320, "hidden_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "head_dim": 32,
              "rope_theta": 100.0, "layer_types": ["full_attention", "sliding_attention"], "num_experts": 64,
              "num_experts_per_tok": 2, "moe_intermediate_size": 64, "num_dense_layers": 1}
    model = module.Model(module.ModelArgs.from_dict(config))
    found = routers(model)
    assert found and all(p.endswith("router.gate") for p in found), found
    paths = patch_model(model, group_size=32)
    assert not set(paths) & found and [p for p in paths if "self_attn" in p]


def test_structure_helpers_refuse_what_is_not_a_model():
    from spqt_mlx.patch import projections

    for fn in (projections, routers):
        with pytest.raises(TypeError, match="mlx.nn.Module"):
            fn({"layers": []})
