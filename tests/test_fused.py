"""Sibling projections that read one input, stacked into one zigzag product (patch/fused.py)."""

import copy

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import spqt_mlx.patch.linear as linear_module
from spqt_mlx.calibrate import calibrate
from spqt_mlx.patch import (
    ZigzagLinear,
    fuse_blocks,
    fuse_shared_inputs,
    patch_model,
    set_thresholds,
    shared_input_groups,
    zigzag_layers,
)

from lm_fixtures import random_tokens, tiny_llama
from test_patch import decode_logits


def gemv_calls(monkeypatch) -> list:
    calls = []
    real = linear_module._ext.zigzag_gemv
    monkeypatch.setattr(linear_module._ext, "zigzag_gemv", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    return calls


def patched_pair(thresholds):
    # Stacking alone, per projection: the fused decoder blocks (test_fusion.py) are off.
    model = tiny_llama(seed=3)
    patch_model(model, group_size=32, bits=4)
    fuse_blocks(model, enabled=False)
    set_thresholds(model, thresholds)
    fused = copy.deepcopy(model)
    return model, fused


def test_groups_are_siblings_reading_one_input():
    paths = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    paths += [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    paths += ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.o_proj"]
    assert shared_input_groups(paths) == [paths[:3], paths[4:6]]
    assert shared_input_groups(["q_proj", "k_proj"]) == [["q_proj", "k_proj"]]
    assert shared_input_groups(["a.qkv_proj", "a.gate_up_proj"]) == []


@pytest.mark.parametrize("threshold", [0.0, 0.6], ids=["dense", "sparse"])
def test_fused_model_matches_unfused(threshold, monkeypatch):
    model, fused = patched_pair(threshold)
    before = {p: np.array(v) for p, v in tree_flatten(fused.parameters())}
    assert fuse_shared_inputs(fused) == 2 * len(fused.model.layers)
    # The layers' parameters are the same tensors, now views of the stacked arrays.
    after = dict(tree_flatten(fused.parameters()))
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[p], np.array(after[p])) for p in before)
    tokens = random_tokens(9, seed=4)
    expected = decode_logits(model, tokens, 5)
    calls = gemv_calls(monkeypatch)
    got = decode_logits(fused, tokens, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # q/k/v, o, gate/up, down: four GEMVs per layer and step instead of seven (the 9-token prefill
    # is short enough for the GEMV too).
    assert len(calls) == (1 + 5) * 4 * len(fused.model.layers)
    np.testing.assert_allclose(fused(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_unequal_thresholds_run_the_layers_alone(monkeypatch):
    model, fused = patched_pair(0.5)
    fuse_shared_inputs(fused)
    for m in (model, fused):
        m.model.layers[0].self_attn.k_proj.threshold = 0.9
    tokens = random_tokens(6, seed=5)
    expected = decode_logits(model, tokens, 3)
    calls = gemv_calls(monkeypatch)
    np.testing.assert_allclose(decode_logits(fused, tokens, 3), expected, rtol=1e-5, atol=1e-5)
    # Layer 0's q/k/v run alone (3 calls), everything else stacked; in the 6-token prefill too.
    assert len(calls) == (1 + 3) * (4 + 2 + 4 * (len(fused.model.layers) - 1))


def test_new_weights_after_fusion_are_used():
    model, fused = patched_pair(0.0)
    fuse_shared_inputs(fused)
    other = tiny_llama(seed=9)
    patch_model(other, group_size=32, bits=4)
    q = "model.layers.1.self_attn.q_proj"
    new = {f"{q}.{k}": v for k, v in tree_flatten(zigzag_layers(other)[q].parameters())}
    fused.load_weights(list(new.items()), strict=False)
    model.load_weights(list(new.items()), strict=False)
    tokens = random_tokens(7, seed=6)
    np.testing.assert_allclose(decode_logits(fused, tokens, 3), decode_logits(model, tokens, 3), rtol=1e-5, atol=1e-5)


def test_siblings_called_with_different_inputs_stop_stacking():
    layers = [ZigzagLinear.from_linear(nn.Linear(64, 64, bias=True), group_size=32, bits=8) for _ in range(3)]
    block = nn.Module()
    block.q_proj, block.k_proj, block.v_proj = layers
    refs = [np.array(m.dequantized_weight()) for m in layers]
    assert fuse_shared_inputs(block) == 1
    for step in range(3):
        xs = [mx.random.normal((1, 1, 64), key=mx.random.key(10 * step + i)) for i in range(3)]
        for m, x, w in zip(layers, xs, refs):
            expected = np.array(x).reshape(-1) @ w.T + np.array(m.bias)
            np.testing.assert_allclose(np.array(m(x)).reshape(-1), expected, rtol=1e-4, atol=1e-4)
    assert not layers[0]._shared.enabled


def test_uniform_calibration_gives_siblings_one_threshold():
    model = tiny_llama(seed=2)
    patch_model(model, group_size=32, bits=4)
    thresholds = calibrate(model, random_tokens(40, seed=1), 0.5, max_samples=500)
    for group in shared_input_groups(list(thresholds)):
        assert len({thresholds[p] for p in group}) == 1 and thresholds[group[0]] > 0
    assert thresholds["model.layers.0.self_attn.o_proj"] != thresholds["model.layers.0.self_attn.q_proj"]


def test_fuse_rejects_what_is_not_a_model():
    with pytest.raises(TypeError, match="must be an mlx.nn.Module"):
        fuse_shared_inputs({"q_proj": 1})
    with pytest.raises(TypeError, match="sequence of module paths"):
        shared_input_groups("model.layers.0.self_attn.q_proj")


def test_a_dtype_change_restacks_instead_of_keeping_a_stale_copy(monkeypatch):
    """After set_dtype the group stacks the members' new parameters on its next call: the stacked
    product stays in use, in the new dtype, and the old stacked arrays are released."""
    model, fused = patched_pair(0.1)
    assert fuse_shared_inputs(fused) > 0
    group = fused.model.layers[0].self_attn.q_proj._shared
    old = group.weight
    for m in (model, fused):
        m.set_dtype(mx.float16)
    tokens = random_tokens(5, seed=8)
    calls = gemv_calls(monkeypatch)
    got = decode_logits(fused, tokens, 2)
    assert group.enabled and group.scales.dtype == mx.float16 and group.weight is not old
    # Stacked q/k/v (4 + 2 + 2 bands of 32 rows) and gate/up (8 + 8 bands) products ran.
    assert (8, 128, 4) in calls and (16, 128, 4) in calls
    np.testing.assert_allclose(got, decode_logits(model, tokens, 2), rtol=2e-2, atol=2e-2)
    assert all(m["scales"].dtype == mx.float16 for m in zigzag_layers(fused).values())


def test_stacking_a_lazy_model_keeps_it_lazy():
    """A model that was never evaluated (mlx-lm's tests build full-size ones) is stacked without
    evaluating it; once evaluated it gives what the unstacked model gives."""
    from spqt_mlx import _ext

    model = tiny_llama(seed=4)
    patch_model(model, group_size=32, bits=4)  # lazy: nothing quantized yet
    q = model.model.layers[0].self_attn.q_proj
    assert not _ext.is_evaluated(q["weight"])
    reference = copy.deepcopy(model)
    assert fuse_shared_inputs(model) > 0
    assert not _ext.is_evaluated(q["weight"]) and not _ext.is_evaluated(q._shared.weight)
    tokens = random_tokens(5, seed=2)
    np.testing.assert_allclose(decode_logits(model, tokens, 2), decode_logits(reference, tokens, 2), rtol=1e-5, atol=1e-5)


def test_a_mixed_dtype_call_keeps_the_siblings_stacked(monkeypatch):
    """A float32 input to a float16 model is cast once for all siblings, so they still run as one
    stacked product."""
    model, fused = patched_pair(0.0)
    for m in (model, fused):
        m.set_dtype(mx.float16)
    assert fuse_shared_inputs(fused) > 0
    x = mx.random.normal((1, 1, 128))  # float32
    attn = fused.model.layers[0].self_attn
    calls = gemv_calls(monkeypatch)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    # (Each layer first tries x as it is, which the op refuses; then the cast x runs stacked.)
    assert q.dtype == mx.float32 and attn.q_proj._shared.enabled and calls.count((8, 128, 4)) == 1
    ref = model.model.layers[0].self_attn
    for got, layer in ((q, ref.q_proj), (k, ref.k_proj), (v, ref.v_proj)):
        np.testing.assert_allclose(np.array(got), np.array(layer(x)), rtol=1e-3, atol=1e-3)
