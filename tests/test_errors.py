"""Every bad input is rejected with a ValueError or TypeError that names the problem."""

import mlx.core as mx
import numpy as np
import pytest

from spqt_mlx import (
    ActiveColumns,
    ZigzagWeight,
    collect_active,
    zigzag_dequantize,
    zigzag_gemv,
    zigzag_matmul,
    zigzag_quantize,
)

K = 40


@pytest.fixture(scope="module")
def q():
    return zigzag_quantize(mx.random.normal((64, K), key=mx.random.key(0)), group_size=32, bits=4)


@pytest.fixture(scope="module")
def x():
    return mx.random.normal((K,), key=mx.random.key(1))


# ---- zigzag_quantize ----------------------------------------------------------------------------


def test_n_not_multiple_of_group_size():
    with pytest.raises(ValueError, match=r"N=48 must be a multiple of group_size=32"):
        zigzag_quantize(mx.zeros((48, 8)), group_size=32, bits=4)


@pytest.mark.parametrize("bits", [1, 7, 16, 0, 4.0, True])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 5, 6, 8\)"):
        zigzag_quantize(mx.zeros((64, 8)), group_size=32, bits=bits)


@pytest.mark.parametrize("group_size", [16, 256, 48, 32.0])
def test_unsupported_group_size(group_size):
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\)"):
        zigzag_quantize(mx.zeros((256, 8)), group_size=group_size, bits=4)


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.bool_, mx.float64], ids=str)
def test_non_float_weight_dtype(dtype):
    with pytest.raises(TypeError, match=r"w must be float32, float16 or bfloat16"):
        zigzag_quantize(mx.zeros((64, 8), dtype=dtype), group_size=32, bits=4)


@pytest.mark.parametrize("shape", [(64,), (1, 1, 1, 64)], ids=str)
def test_weight_not_2d(shape):
    # (E, N, K) is the stacked weights of experts (test_experts.py).
    with pytest.raises(ValueError, match=r"w must have shape \(N, K\) or \(E, N, K\)"):
        zigzag_quantize(mx.zeros(shape), group_size=32, bits=4)


@pytest.mark.parametrize("shape", [(0, 8), (64, 0)], ids=str)
def test_empty_weight(shape):
    with pytest.raises(ValueError, match=r"w must be non-empty"):
        zigzag_quantize(mx.zeros(shape), group_size=32, bits=4)


@pytest.mark.parametrize("w", [np.zeros((64, 8), np.float32), [[0.0] * 8] * 64, None], ids=["numpy", "list", "none"])
def test_quantize_non_array(w):
    with pytest.raises(TypeError, match=r"w must be an mx.array"):
        zigzag_quantize(w, group_size=32, bits=4)


# ---- zigzag_gemv: x and the weight --------------------------------------------------------------


@pytest.mark.parametrize("bad_k", [K - 1, K + 1, 1])
def test_x_with_wrong_k(q, bad_k):
    with pytest.raises(ValueError, match=rf"x has {bad_k} input features but the weight has K={K}"):
        zigzag_gemv(mx.zeros((bad_k,)), q)
    with pytest.raises(ValueError, match=rf"x has {bad_k} input features but the weight has K={K}"):
        zigzag_matmul(mx.zeros((2, bad_k)), q)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_x_dtype_mismatching_scales(q, x, dtype):
    name = str(dtype).split(".")[-1]
    with pytest.raises(ValueError, match=rf"x is {name} but the weight's scales are float32"):
        zigzag_gemv(x.astype(dtype), q)
    with pytest.raises(ValueError, match=r"convert one to the other"):
        zigzag_matmul(x.astype(dtype), q)


@pytest.mark.parametrize("dtype", [mx.int32, mx.int64, mx.uint8, mx.bool_], ids=str)
def test_non_float_x(q, dtype):
    with pytest.raises(ValueError, match=r"x must be float32, float16 or bfloat16"):
        zigzag_gemv(mx.zeros((K,), dtype=dtype), q)
    with pytest.raises(ValueError, match=r"x must be float32, float16 or bfloat16"):
        zigzag_matmul(mx.zeros((3, K), dtype=dtype), q)


def test_scalar_x(q):
    with pytest.raises(ValueError, match=r"x must have at least one dimension"):
        zigzag_gemv(mx.array(1.0), q)
    with pytest.raises(ValueError, match=r"x must have at least one dimension"):
        zigzag_matmul(mx.array(1.0), q)


@pytest.mark.parametrize("x_in", [np.zeros(K, np.float32), [0.0] * K, 1.0], ids=["numpy", "list", "float"])
def test_gemv_non_array_x(q, x_in):
    with pytest.raises(TypeError, match=r"x must be an mx.array"):
        zigzag_gemv(x_in, q)
    with pytest.raises(TypeError, match=r"x must be an mx.array"):
        zigzag_matmul(x_in, q)


@pytest.mark.parametrize("w", ["weight", None, (1, 2, 3)], ids=["str", "none", "tuple"])
def test_gemv_non_weight(x, w):
    with pytest.raises(TypeError, match=r"expected a ZigzagWeight"):
        zigzag_gemv(x, w)
    with pytest.raises(TypeError, match=r"expected a ZigzagWeight"):
        zigzag_dequantize(w)


# ---- zigzag_gemv: indices -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bool_], ids=str)
def test_non_integer_indices(q, x, dtype):
    with pytest.raises(TypeError, match=r"indices must be an integer array"):
        zigzag_gemv(x, q, indices=mx.array([1, 2]).astype(dtype))


@pytest.mark.parametrize("indices", [[1, 2], np.array([1, 2]), 3], ids=["list", "numpy", "int"])
def test_indices_not_an_array(q, x, indices):
    with pytest.raises(TypeError, match=r"indices must be an mx.array or ActiveColumns"):
        zigzag_gemv(x, q, indices=indices)


@pytest.mark.parametrize("shape", [(2, 3), (1, 1), ()], ids=str)
def test_indices_not_one_dimensional(q, x, shape):
    with pytest.raises(ValueError, match=r"indices must be one-dimensional"):
        zigzag_gemv(x, q, indices=mx.zeros(shape, dtype=mx.int32))


def test_validate_out_of_range(q, x):
    with pytest.raises(IndexError, match=rf"indices must lie in \[0, {K}\), got values in \[-1, {K}\]"):
        zigzag_gemv(x, q, indices=mx.array([-1, 0, K]), validate=True)


@pytest.mark.parametrize(
    "packed",
    [
        mx.zeros((K,), dtype=mx.int32),
        mx.zeros((K + 2,), dtype=mx.int32),
        mx.zeros((1, K + 1), dtype=mx.int32),
        mx.zeros((K + 1,), dtype=mx.int64),
        mx.zeros((K + 1,), dtype=mx.float32),
    ],
    ids=["short", "long", "2d", "int64", "float32"],
)
def test_packed_list_with_wrong_shape_or_dtype(q, x, packed):
    active = ActiveColumns(packed, mx.zeros((K,)), mx.array(0.0))  # belongs to another x: packed path
    with pytest.raises(ValueError, match=rf"a packed active list must be int32 of shape \({K + 1},\)"):
        zigzag_gemv(x, q, indices=active)


def test_active_columns_of_another_width(q, x):
    other = mx.random.normal((K + 3,), key=mx.random.key(2))
    with pytest.raises(ValueError, match=rf"a packed active list must be int32 of shape \({K + 1},\)"):
        zigzag_gemv(x, q, indices=collect_active(other, 0.1))


# ---- thresholds and collect_active --------------------------------------------------------------


@pytest.mark.parametrize("shape", [(K + 1,), (K - 1,), (1, K), (1,)], ids=str)
def test_threshold_with_wrong_shape(x, shape):
    with pytest.raises(ValueError, match=rf"threshold must be a scalar or have shape \({K},\)"):
        collect_active(x, mx.zeros(shape))


def test_threshold_with_wrong_shape_in_fused_gemv(q, x):
    active = ActiveColumns(mx.zeros((K + 1,), dtype=mx.int32), x, mx.zeros((3,)))
    with pytest.raises(ValueError, match=r"threshold must be a scalar or have shape"):
        zigzag_gemv(x, q, indices=active)


@pytest.mark.parametrize("threshold", ["0.5", None, [0.5], True], ids=["str", "none", "list", "bool"])
def test_threshold_of_wrong_type(x, threshold):
    with pytest.raises(TypeError, match=r"threshold must be a number or an mx.array"):
        collect_active(x, threshold)


def test_threshold_of_non_real_dtype(x):
    with pytest.raises(ValueError, match=r"threshold must be a real number"):
        collect_active(x, mx.array(True))


@pytest.mark.parametrize("shape", [(2, K), (3, 1, K), (2, 2, K)], ids=str)
def test_collect_active_multi_row(shape):
    with pytest.raises(ValueError, match=r"collected for a single token: x must hold one row"):
        collect_active(mx.zeros(shape), 0.5)


def test_fused_gemv_multi_row(q):
    # ActiveColumns come from one row; one built by hand over several rows reads as the threshold
    # it holds, each row taking its own columns (not an error, not one row's list for all).
    x2 = mx.random.normal((2, K), key=mx.random.key(3))
    active = ActiveColumns(mx.zeros((K + 1,), dtype=mx.int32), x2, mx.array(0.5))
    assert mx.array_equal(zigzag_gemv(x2, q, indices=active), zigzag_gemv(x2, q, threshold=0.5))


@pytest.mark.parametrize("dtype", [mx.int32, mx.bool_], ids=str)
def test_collect_active_non_float_x(dtype):
    with pytest.raises(ValueError, match=r"\[collect_active\] x must be float32, float16 or bfloat16"):
        collect_active(mx.zeros((K,), dtype=dtype), 0.5)


def test_collect_active_empty_or_scalar_x():
    with pytest.raises(ValueError, match=r"x must be a non-empty activation"):
        collect_active(mx.zeros((0,)), 0.5)
    with pytest.raises(ValueError, match=r"x must be a non-empty activation"):
        collect_active(mx.array(1.0), 0.5)


@pytest.mark.parametrize("x_in", [np.zeros(K, np.float32), [0.0] * K], ids=["numpy", "list"])
def test_collect_active_non_array(x_in):
    with pytest.raises(TypeError, match=r"x must be an mx.array"):
        collect_active(x_in, 0.5)


# ---- corrupted ZigzagWeight ---------------------------------------------------------------------


def test_wrong_words_per_group(q, x):
    bad = ZigzagWeight(q.weight[..., :3], q.scales, q.biases, q.group_size, q.bits)  # 4 bits * 32 = 4 words
    for op in (lambda: zigzag_gemv(x, bad), lambda: zigzag_dequantize(bad), lambda: zigzag_matmul(x, bad)):
        with pytest.raises(ValueError, match=r"packed weight must be uint32 of shape \(\[E,\] N/group_size, K, 4\)"):
            op()
    # bits that do not match the stored words
    wrong_bits = ZigzagWeight(q.weight, q.scales, q.biases, q.group_size, 3)
    with pytest.raises(ValueError, match=r"packed weight must be uint32 of shape \(\[E,\] N/group_size, K, 3\)"):
        zigzag_gemv(x, wrong_bits)


def test_packed_weight_wrong_dtype_or_rank(q, x):
    for w in (q.weight.astype(mx.int32), q.weight[0], q.weight[None, None]):
        bad = ZigzagWeight(w, q.scales, q.biases, q.group_size, q.bits)
        with pytest.raises(ValueError, match=r"packed weight must be uint32"):
            zigzag_gemv(x, bad)
    # A leading axis is a stack of experts, which zigzag_gemv does not take.
    experts = ZigzagWeight(q.weight[None], q.scales[None], q.biases[None], q.group_size, q.bits)
    with pytest.raises(ValueError, match="several experts: use zigzag_gather_gemv"):
        zigzag_gemv(x, experts)


@pytest.mark.parametrize("which", ["scales", "biases", "both"])
def test_mismatched_scales_shape(q, x, which):
    s = q.scales[:, :-1] if which in ("scales", "both") else q.scales
    b = q.biases[:, :-1] if which in ("biases", "both") else q.biases
    bad = ZigzagWeight(q.weight, s, b, q.group_size, q.bits)
    with pytest.raises(ValueError, match=rf"scales and biases must have shape \(2, {K}\)"):
        zigzag_gemv(x, bad)
    with pytest.raises(ValueError, match=r"scales and biases must have shape"):
        zigzag_dequantize(bad)


def test_non_float_scales(q, x):
    bad = ZigzagWeight(q.weight, q.scales.astype(mx.int32), q.biases, q.group_size, q.bits)
    with pytest.raises(TypeError, match=r"scales must be float32, float16 or bfloat16"):
        zigzag_gemv(x, bad)


def test_biases_dtype_differs_from_scales(q, x):
    bad = ZigzagWeight(q.weight, q.scales, q.biases.astype(mx.float16), q.group_size, q.bits)
    with pytest.raises(ValueError, match=r"scales and biases must share one float dtype"):
        zigzag_gemv(x, bad)


@pytest.mark.parametrize("bits,group_size", [(7, 32), (4, 16), (1, 64)])
def test_corrupted_bits_or_group_size(q, x, bits, group_size):
    bad = ZigzagWeight(q.weight, q.scales, q.biases, group_size, bits)
    with pytest.raises(ValueError, match=r"(bits|group_size) must be one of"):
        zigzag_gemv(x, bad)


def test_astype_to_non_float(q):
    with pytest.raises(TypeError, match=r"dtype must be float32, float16 or bfloat16"):
        q.astype(mx.uint32)


def test_interpreter_survives(q, x):
    """After all of the above, the library still computes correctly."""
    y = zigzag_gemv(x, q, indices=mx.array([0, 1]))
    assert y.shape == (64,) and not np.isnan(np.array(y)).any()


# ---- empty inputs and stream forms --------------------------------------------------------------


def test_empty_inputs_give_empty_outputs():
    """Zero rows or a zero-length sequence give an empty result, as nn.Linear does (MLX's quantized
    matmul divides by the row count: run in a subprocess, so that a crash fails this test only)."""
    import subprocess
    import sys

    code = """
import mlx.core as mx, mlx.nn as nn, spqt_mlx as sq
from spqt_mlx.patch import patch_model, set_thresholds
q = sq.zigzag_quantize(mx.random.normal((64, 40)), group_size=32, bits=4)
shapes = [sq.zigzag_matmul(mx.zeros((0, 40)), q).shape, sq.zigzag_matmul(mx.zeros((2, 0, 40)), q).shape,
          sq.zigzag_gemv(mx.zeros((0, 40)), q).shape]
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(64, 128)
block = Block()
patch_model(block)
for t in (0.0, 0.5):
    set_thresholds(block, t)
    y = block.mlp.up_proj(mx.zeros((1, 0, 64)))
    mx.eval(y)
    shapes.append(y.shape)
print(shapes)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[(0, 64), (2, 0, 64), (0, 64), (1, 0, 128), (1, 0, 128)]"


@pytest.mark.parametrize("stream", [mx.cpu, mx.Device(mx.cpu), mx.default_stream(mx.cpu)],
                         ids=["type", "device", "stream"])
def test_every_op_takes_the_same_stream_forms(q, x, stream):
    rows = mx.random.normal((3, K))
    reference = zigzag_matmul(rows, q)
    assert mx.allclose(zigzag_matmul(rows, q, stream=stream), reference)
    assert mx.allclose(zigzag_gemv(rows, q, stream=stream), reference, atol=1e-5)
    active = collect_active(x, 0.5, stream=stream)
    assert mx.allclose(zigzag_gemv(x, q, indices=active, stream=stream), zigzag_gemv(x, q, indices=active.indices()),
                       atol=1e-5)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_threshold(x, threshold):
    with pytest.raises(ValueError, match="finite"):
        collect_active(x, threshold)


@pytest.mark.parametrize("bands,k", [(0, K), (2, 0)])
def test_empty_packed_weight(q, bands, k):
    empty = ZigzagWeight(mx.zeros((bands, k, 4), dtype=mx.uint32), mx.zeros((bands, k)), mx.zeros((bands, k)), 32, 4)
    with pytest.raises(ValueError, match="empty"):
        zigzag_gemv(mx.zeros((k,)), empty)
    with pytest.raises(ValueError, match="empty"):
        zigzag_matmul(mx.zeros((3, k)), empty)
    from spqt_mlx import _ext

    with pytest.raises(ValueError, match="empty"):  # the op itself, as patched layers call it
        _ext.zigzag_gemv(mx.zeros((k,)), empty.weight, empty.scales, empty.biases, None, _ext.ActiveKind.Dense, 32, 4)


@pytest.mark.parametrize("args,kwargs,error", [((40.5, 64), {}, TypeError), ((40, "64"), {}, TypeError),
                                               ((True, 64), {}, TypeError), ((40, 64), {"dtype": mx.int32}, TypeError),
                                               ((0, 64), {}, ValueError), ((40, 48), {}, ValueError)])
def test_empty_layer_arguments(args, kwargs, error):
    from spqt_mlx.patch import ZigzagLinear

    with pytest.raises(error):
        ZigzagLinear.empty(*args, **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    w = mx.random.normal((64, K))
    w[3, 5] = bad
    with pytest.raises(ValueError, match="non-finite"):
        zigzag_quantize(w, group_size=32, bits=4)


def mlp_block():
    """A module with two MLP projections, as patch_model finds them in a transformer block."""
    import mlx.nn as nn

    block = nn.Module()
    block.mlp = nn.Module()
    block.mlp.up_proj = nn.Linear(64, 128)
    block.mlp.down_proj = nn.Linear(128, 64)
    return block


def test_patch_model_names_the_non_finite_layer_and_changes_nothing():
    import mlx.nn as nn

    from spqt_mlx.patch import patch_model

    block = mlp_block()
    block.mlp.down_proj.weight[0, 0] = float("nan")
    mx.eval(block.parameters())  # loaded weights are evaluated
    with pytest.raises(ValueError, match="mlp.down_proj.*non-finite"):
        patch_model(block)
    assert isinstance(block.mlp.up_proj, nn.Linear) and isinstance(block.mlp.down_proj, nn.Linear)


def test_a_lazy_non_finite_weight_shows_in_the_outputs():
    """A model built lazily stays lazy when patched (patching does not evaluate it); a non-finite
    weight then makes the outputs of its groups NaN instead of finite garbage."""
    from spqt_mlx.patch import patch_model

    block = mlp_block()
    block.mlp.up_proj.weight[70, 3] = float("nan")  # not evaluated; row 70 is in the second band of 64
    patch_model(block)
    y = np.array(block.mlp.up_proj(mx.ones((1, 64))))
    assert np.isfinite(y[0, :64]).all() and np.isnan(y[0, 64:]).all()


@pytest.mark.parametrize("bad", [-0.5, float("nan"), "0.3"])
def test_bad_threshold_changes_no_layer(bad):
    """set_thresholds and patch_model check every value before changing any layer."""
    import mlx.nn as nn

    from spqt_mlx.patch import get_thresholds, patch_model, set_thresholds

    block = mlp_block()
    patch_model(block, thresholds=0.1)
    before = get_thresholds(block)
    with pytest.raises((TypeError, ValueError), match="mlp.up_proj"):
        set_thresholds(block, {"mlp.down_proj": 0.7, "mlp.up_proj": bad})
    assert get_thresholds(block) == before
    fresh = mlp_block()
    with pytest.raises((TypeError, ValueError), match="mlp.up_proj"):
        patch_model(fresh, thresholds={"mlp.down_proj": 0.7, "mlp.up_proj": bad})
    assert isinstance(fresh.mlp.up_proj, nn.Linear) and isinstance(fresh.mlp.down_proj, nn.Linear)
    with pytest.raises((TypeError, ValueError)):
        patch_model(fresh, thresholds=bad)
    assert isinstance(fresh.mlp.up_proj, nn.Linear)
