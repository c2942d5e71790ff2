"""GPTQ in zigzag order (spqt_mlx.gptq): the same format, a lower output error on the calibration inputs."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from lm_fixtures import tiny_llama

from spqt_mlx import gptq as gptq_module
from spqt_mlx import zigzag_dequantize, zigzag_quantize
from spqt_mlx.gptq import DAMPING, error_weights, gptq_quantize_many, input_hessians
from spqt_mlx.layout import zigzag_quantize_many
from spqt_mlx.patch import ZigzagLinear, patch_model, zigzag_layers


def correlated_inputs(K, rows=2048, seed=0):
    """Inputs with correlated columns and a few large ones, as a transformer's are."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) / np.sqrt(K)
    return rng.standard_normal((rows, K)) @ mix * (1 + 4 * (rng.random(K) < 0.05))


def errors(w, q, X):
    W = np.array(w.astype(mx.float32), dtype=np.float64)
    Wq = np.array(zigzag_dequantize(q).astype(mx.float32), dtype=np.float64)
    return np.linalg.norm(Wq - W) / np.linalg.norm(W), np.linalg.norm(X @ (Wq - W).T) / np.linalg.norm(X @ W.T)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 32), (8, 128)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
def test_gptq_lowers_the_output_error(bits, group_size, dtype):
    K = 200
    w = (mx.random.normal((2 * group_size, K), key=mx.random.key(bits)) * 0.02).astype(dtype)
    X = correlated_inputs(K, seed=bits)
    search = zigzag_quantize(w, group_size, bits, quantizer="search")
    gptq = zigzag_quantize(w, group_size, bits, quantizer="gptq", hessian=X.T @ X / len(X))
    assert gptq.weight.shape == search.weight.shape and gptq.scales.dtype == dtype
    _, out_search = errors(w, search, X)
    _, out_gptq = errors(w, gptq, X)
    assert out_gptq < 0.9 * out_search, (out_gptq, out_search)


def test_without_correlation_gptq_is_the_search():
    # With H = I no error is fed forward: every column is fitted as the search quantizer fits it.
    w = mx.random.normal((128, 96), key=mx.random.key(5)).astype(mx.float16)
    search = zigzag_quantize(w, 64, 4, quantizer="search")
    gptq = zigzag_quantize(w, 64, 4, quantizer="gptq", hessian=np.eye(96))
    X = np.eye(96)
    assert errors(w, gptq, X)[0] == pytest.approx(errors(w, search, X)[0], rel=2e-3)


def test_dead_columns_and_bad_hessians():
    # Columns no input reached (a zero row and column of H) are quantized as they are.
    K = 64
    X = correlated_inputs(K)
    X[:, :5] = 0
    w = mx.random.normal((64, K), key=mx.random.key(1))
    q = zigzag_quantize(w, 64, 4, quantizer="gptq", hessian=X.T @ X)
    deq = np.array(zigzag_dequantize(q))
    assert np.all(np.isfinite(deq))
    assert np.abs(deq[:, :5] - np.array(w)[:, :5]).max() < 0.5
    with pytest.raises(ValueError, match="hessian must be a finite"):
        zigzag_quantize(w, 64, 4, quantizer="gptq", hessian=np.eye(K + 1))
    with pytest.raises(ValueError, match="only it, takes the hessian"):
        zigzag_quantize(w, 64, 4, quantizer="gptq")
    with pytest.raises(ValueError, match="only it, takes the hessian"):
        zigzag_quantize(w, 64, 4, quantizer="search", hessian=np.eye(K))
    with pytest.raises(ValueError, match="experts with 'search'"):
        zigzag_quantize(mx.zeros((2, 64, K)), 64, 4, quantizer="gptq", hessian=np.eye(K))


def same(a, b):
    return all(mx.array_equal(getattr(a, n), getattr(b, n)).item() for n in ("weight", "scales", "biases"))


@pytest.mark.parametrize("batch_bytes", [1 << 30, 1], ids=["one-batch", "one-weight-per-batch"])
def test_weights_walked_together_get_what_each_gets_alone(batch_bytes, monkeypatch):
    # Two shapes and two dtypes, interleaved, with different statistics: each result equals its
    # weight's own quantization bit for bit, in order, whether the weights share a walk or not.
    monkeypatch.setattr(gptq_module, "BATCH_BYTES", {mx.cpu: batch_bytes, mx.gpu: batch_bytes})
    specs = [(128, 96, mx.float16), (64, 160, mx.float16), (128, 96, mx.float16), (128, 96, mx.bfloat16),
             (64, 160, mx.float16), (128, 96, mx.float16)]
    ws = [(mx.random.normal((n, k), key=mx.random.key(i)) * 0.02).astype(d) for i, (n, k, d) in enumerate(specs)]
    hs = [(lambda X: X.T @ X / len(X))(correlated_inputs(k, rows=256, seed=i)) for i, (_, k, _) in enumerate(specs)]
    hs[2][:, 3] = hs[2][3, :] = 0  # a column no input reached, in a weight of a shared walk
    together = zigzag_quantize_many(dict(enumerate(ws)), 64, 4, quantizer="gptq", hessians=dict(enumerate(hs)))
    together = [together[i] for i in range(len(ws))]
    alone = [zigzag_quantize(w, 64, 4, quantizer="gptq", hessian=h) for w, h in zip(ws, hs)]
    assert len(together) == len(ws) and all(same(a, b) for a, b in zip(together, alone))


def test_error_weights_factor_the_damped_inverse():
    K = 300  # more than one level of the triangular inverse's halves
    X = correlated_inputs(K)
    X[:, 7] = 0
    H = X.T @ X / len(X)
    U = error_weights(H)
    D = np.array(H, dtype=np.float64)
    D[7, :] = D[:, 7] = 0
    D[7, 7] = 1
    D[np.diag_indices(K)] += DAMPING * np.mean(np.diag(D))
    expected = np.linalg.cholesky(np.linalg.inv(D)).T
    assert U.dtype == np.float32 and np.allclose(np.triu(U), U)
    np.testing.assert_allclose(U, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    for bad in (np.ones((3, 4)), np.full((3, 3), np.nan), np.ones(3)):
        with pytest.raises(ValueError, match="hessian must be a finite square array"):
            error_weights(bad)


def test_one_factorization_per_shared_hessian(monkeypatch):
    calls = []
    original = gptq_module.error_weights
    monkeypatch.setattr(gptq_module, "error_weights", lambda h, d: calls.append(id(h)) or original(h, d))
    X = correlated_inputs(96)
    H, G = X.T @ X / len(X), X[:, ::-1].T @ X[:, ::-1] / len(X)
    ws = [mx.random.normal((64, 96), key=mx.random.key(i)) * 0.02 for i in range(3)]
    shared = gptq_quantize_many(ws, [H, H, G], 64, 4)
    assert sorted(calls) == sorted([id(H), id(G)])
    alone = gptq_quantize_many(ws, [H.copy(), H.copy(), G], 64, 4)
    for a, b in zip(shared, alone):
        assert np.array_equal(a[0], b[0]) and mx.array_equal(a[1], b[1]).item()
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="batch_bytes must be a positive integer"):
            gptq_quantize_many(ws, [H, H, G], 64, 4, batch_bytes=bad)


def test_quantize_many_checks_every_weight():
    w = mx.random.normal((64, 32), key=mx.random.key(0))
    h = np.eye(32)
    with pytest.raises(ValueError, match="needs the input statistics of b"):
        zigzag_quantize_many({"a": w, "b": w}, 64, 4, quantizer="gptq", hessians={"a": h})
    with pytest.raises(ValueError, match="only it, takes hessians"):
        zigzag_quantize_many({"a": w}, 64, 4, quantizer="search", hessians={"a": h})
    with pytest.raises(ValueError, match="^b: w has non-finite"):
        zigzag_quantize_many({"a": w, "b": w.at[0, 0].add(float("nan"))}, 64, 4, quantizer="gptq",
                             hessians={"a": h, "b": h})
    with pytest.raises(ValueError, match="^a: .*multiple of group_size"):
        zigzag_quantize_many({"a": w[:32]}, 64, 4, quantizer="gptq", hessians={"a": h})
    with pytest.raises(ValueError, match="statistics of a have shape"):
        zigzag_quantize_many({"a": w}, 64, 4, quantizer="gptq", hessians={"a": np.eye(33)})
    with pytest.raises(ValueError, match="statistics of a have non-finite"):
        zigzag_quantize_many({"a": w}, 64, 4, quantizer="gptq", hessians={"a": h * np.nan})
    with pytest.raises(TypeError, match="expected an nn.Linear or nn.QuantizedLinear"):
        ZigzagLinear.source_weight(nn.Embedding(4, 8))
    with pytest.raises(TypeError, match="weights must map names"):
        zigzag_quantize_many([w], 64, 4, quantizer="gptq", hessians={0: h})
    # Other quantizers quantize each weight as zigzag_quantize does.
    assert all(same(a, zigzag_quantize(w, 64, 4, quantizer="search"))
               for a in zigzag_quantize_many({"a": w, "b": w}, 64, 4, quantizer="search").values())


def test_input_hessians_of_a_model():
    model = tiny_llama()
    tokens = mx.random.randint(0, 320, (700,), key=mx.random.key(0)).tolist()
    H = input_hessians(model, tokens, window=256)
    assert len(H) == 14 and all(p.startswith("model.layers.") for p in H)
    q, k, o = (H[f"model.layers.0.self_attn.{n}_proj"] for n in "qko")
    assert q.shape == (128, 128) and H["model.layers.1.mlp.down_proj"].shape == (256, 256)
    assert np.array_equal(q, k)  # siblings read one input
    assert q is k and H["model.layers.0.mlp.gate_proj"] is H["model.layers.0.mlp.up_proj"]  # held once
    assert not np.allclose(q, o)
    assert np.allclose(q, q.T) and np.linalg.eigvalsh(q).min() > -1e-6
    assert all(type(m).__name__ != "_Tap" for _, m in model.named_modules())  # the model is restored
    with pytest.raises(ValueError, match="not projections of this model"):
        input_hessians(model, tokens, paths=["model.layers.0.self_attn.nope"])
    with pytest.raises(ValueError, match="window must be"):
        input_hessians(model, tokens, window=0)
    with pytest.raises(ValueError, match="token ids must lie in"):
        input_hessians(model, [0, 5000, 1])


def test_gptq_model_is_closer_to_the_float_model():
    # On its calibration tokens the GPTQ-quantized model's logits are closer to the float model's.
    tokens = mx.random.randint(0, 320, (512,), key=mx.random.key(3)).tolist()
    reference = tiny_llama()(mx.array(tokens)[None])
    gaps = {}
    for quantizer in ("search", "gptq"):
        model = tiny_llama()
        hessians = input_hessians(model, tokens) if quantizer == "gptq" else None
        patched = patch_model(model, quantizer=quantizer, hessians=hessians)
        assert len(patched) == len(zigzag_layers(model)) == 14
        gaps[quantizer] = mx.mean(mx.square(model(mx.array(tokens)[None]) - reference)).item()
    assert gaps["gptq"] < gaps["search"], gaps


def test_patched_model_gets_each_layers_own_gptq():
    # patch_model quantizes the projections of one shape together: each layer equals its own
    # quantization from its float layer and statistics.
    tokens = mx.random.randint(0, 320, (400,), key=mx.random.key(4)).tolist()
    model = tiny_llama()
    floats = dict(model.named_modules())
    hessians = input_hessians(model, tokens)
    alone = {p: ZigzagLinear.from_linear(floats[p], 64, 4, "gptq", hessian=hessians[p]) for p in hessians}
    patch_model(model, quantizer="gptq", hessians=hessians)
    layers = zigzag_layers(model)
    assert set(layers) == set(alone)
    assert all(same(layers[p], alone[p]) for p in alone)


def test_group_fitter_refuses_what_the_format_cannot_store():
    from spqt_mlx.layout import group_fitter

    with pytest.raises(ValueError, match="bits must be one of"):
        group_fitter(7, mx.float16)
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        group_fitter(4, mx.int32)
    # A group the fit keeps exactly: two values, the codes 0 and 15.
    q, s, b, deq = group_fitter(4, mx.float32)(mx.array([[0.0] * 32 + [1.5] * 32]))
    assert np.array_equal(np.array(deq), np.array([[0.0] * 32 + [1.5] * 32]))
    assert set(np.array(q).ravel().tolist()) == {0.0, 15.0}
