"""The sparsity criterion: TEAL's |x_j| against WINA's |x_j| * ||W[:, j]||, from one layer to a saved
model (CPU)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from lm_fixtures import random_tokens, tiny_llama
from spqt_mlx import checkpoint
from spqt_mlx.calibrate import calibrate, input_sparsity, sparsify
from spqt_mlx.patch import (ZigzagLinear, achieved_sparsity, fuse_shared_inputs, get_criterion, get_thresholds,
                            patch_model, record_stats, set_criterion, set_thresholds, zigzag_layers)


def column_norms(layer):
    w = np.array(layer.dequantized_weight(), dtype=np.float64)
    return np.sqrt((w * w).sum(axis=0))


def wina_layer(seed=0, in_dims=256, out_dims=128):
    mx.random.seed(seed)
    linear = nn.Linear(in_dims, out_dims, bias=False)
    # Columns of very different sizes, so that the two criteria pick different columns.
    linear.weight = linear.weight * mx.exp(mx.random.normal((1, in_dims)))
    layer = ZigzagLinear.from_linear(linear, group_size=32, bits=4)
    layer.set_column_scale(mx.array(column_norms(layer), dtype=mx.float32))
    return layer


def test_a_decode_step_reads_the_columns_of_largest_contribution():
    layer = wina_layer()
    norms = column_norms(layer)
    x = mx.random.normal((1, 256), key=mx.random.key(3))
    xs = np.array(x, dtype=np.float64)[0]
    t = float(np.median(np.abs(xs) * norms))
    layer.threshold = t
    keep = np.abs(xs) * norms > t
    assert 0.3 < keep.mean() < 0.7
    # TEAL's choice at the same sparsity differs: the criterion really is the weighted one.
    assert (keep != (np.abs(xs) > np.median(np.abs(xs)))).sum() > 20
    assert np.array_equal(np.array(layer.active_mask(x))[0], keep)
    want = (xs * keep) @ np.array(layer.dequantized_weight(), dtype=np.float64).T
    np.testing.assert_allclose(np.array(layer(x))[0], want, rtol=1e-4, atol=1e-4)
    # Several decode rows (a batch of sequences), each with its own columns.
    xb = mx.random.normal((3, 1, 256), key=mx.random.key(4))
    xbs = np.array(xb, dtype=np.float64)[:, 0]
    wantb = (xbs * (np.abs(xbs) * norms > t)) @ np.array(layer.dequantized_weight(), dtype=np.float64).T
    np.testing.assert_allclose(np.array(layer(xb))[:, 0], wantb, rtol=1e-4, atol=1e-4)


def test_a_column_of_zero_weight_is_never_read_and_threshold_zero_is_dense():
    layer = wina_layer()
    scale = np.array(layer.column_scale)
    scale[:8] = 0
    layer.set_column_scale(mx.array(scale))
    x = mx.ones((1, 256))
    layer.threshold = 1e-3
    assert not np.array(layer.active_mask(x))[0, :8].any() and np.array(layer.active_mask(x))[0, 8:].all()
    layer.threshold = 0.0
    assert np.array(layer.active_mask(x)).all()
    with pytest.raises(ValueError, match="shape \\(256,\\)"):
        layer.set_column_scale(mx.ones((255,)))


@pytest.fixture
def patched():
    model = tiny_llama(seed=4)
    patch_model(model, group_size=32, bits=4)
    return model


def test_siblings_share_the_norms_of_their_stacked_matrix(patched):
    set_criterion(patched, "wina")
    assert get_criterion(patched) == "wina"
    attn = patched.model.layers[0].self_attn
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    assert q.column_scale is k.column_scale is v.column_scale
    stacked = np.sqrt(sum(column_norms(m) ** 2 for m in (q, k, v)))
    np.testing.assert_allclose(np.array(q.column_scale), stacked, rtol=1e-4)
    np.testing.assert_allclose(np.array(o.column_scale), column_norms(o), rtol=1e-4)
    # One threshold for the siblings: they still run as one stacked product.
    set_thresholds(patched, 0.05)
    fuse_shared_inputs(patched)
    assert q._shared is not None and q._shared.stacked() is not None
    k.set_column_scale(mx.array(np.array(k.column_scale)))  # equal values, but not the group's one array
    assert q._shared.stacked() is None
    set_criterion(patched, "teal")
    assert get_criterion(patched) == "teal" and q.column_scale is None
    with pytest.raises(ValueError, match="criterion must be one of"):
        set_criterion(patched, "largest")
    from spqt_mlx.patch.model import column_scales

    with pytest.raises(TypeError, match="expected a linear or experts layer"):
        column_scales({"act": nn.ReLU()})


@pytest.mark.parametrize("criterion", ["teal", "wina"])
def test_calibration_reaches_the_target_under_each_criterion(patched, criterion):
    tokens = random_tokens(256, seed=11)
    thresholds = sparsify(patched, tokens, 0.5, criterion=criterion, progress=False)
    assert get_criterion(patched) == criterion
    measured = input_sparsity(patched, tokens, thresholds)
    assert all(abs(s - 0.5) < 0.01 for s in measured.values()), measured
    # Decoding skips what calibration counted.
    record_stats(patched)
    cache = make_prompt_cache(patched)
    held_out = random_tokens(160, seed=12)
    mx.eval(patched(held_out[:, :128], cache=cache))
    for t in range(128, 160):
        mx.eval(patched(held_out[:, t:t + 1], cache=cache))
    sparsity, calls = achieved_sparsity(patched)
    record_stats(patched, False)
    assert calls == 32 and abs(sparsity - 0.5) < 0.06


def test_the_criteria_give_different_thresholds_for_the_same_target(patched):
    tokens = random_tokens(128, seed=5)
    teal = calibrate(patched, tokens, 0.4, criterion="teal", progress=False)
    wina = calibrate(patched, tokens, 0.4, criterion="wina", progress=False)
    assert get_criterion(patched) == "teal"  # calibrate leaves the model as it is
    assert teal.keys() == wina.keys() and all(teal[p] != wina[p] for p in teal)


def test_a_saved_model_keeps_its_criterion(tiny_model_dir, tmp_path):
    from mlx_lm import load

    model, tokenizer, config = load(str(tiny_model_dir), return_config=True)
    patch_model(model, group_size=64, bits=4)
    sparsify(model, random_tokens(64, seed=2, vocab_size=config["vocab_size"]), 0.4, criterion="wina", progress=False)
    out = checkpoint.save(model, tokenizer, config, tmp_path / "spqt", {"bits": 4, "group_size": 64})
    assert checkpoint.read_spqt_config(out)["spqt"]["criterion"] == "wina"
    tokens = mx.array([[5, 70, 80, 90, 100, 110]])

    def decode(m):
        cache = make_prompt_cache(m)
        m(tokens[:, :3], cache=cache)
        return mx.concatenate([m(tokens[:, i:i + 1], cache=cache) for i in range(3, 6)], axis=1)

    for loaded in (checkpoint.load(out)[0], load(str(out), trust_remote_code=True)[0]):
        assert get_criterion(loaded) == "wina" and get_thresholds(loaded) == get_thresholds(model)
        assert mx.allclose(decode(loaded), decode(model), atol=1e-5).item()
    # A damaged criterion is refused with the file named.
    path = out / "config.json"
    path.write_text(path.read_text().replace('"criterion": "wina"', '"criterion": "loudest"'))
    with pytest.raises(ValueError, match="criterion must be one of"):
        checkpoint.load(out)


def test_zigzag_layers_start_with_teal(patched):
    assert get_criterion(patched) == "teal"
    assert all(m.column_scale is None for m in zigzag_layers(patched).values())
