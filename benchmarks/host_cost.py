"""Host time to build the graph of a projection call and of a decode step (Python side only), and
with ``--encode`` MLX's time to encode each kind of kernel.

    python benchmarks/host_cost.py [--encode]

Nothing is evaluated inside the timed loops, so this measures what the Python forward pass costs
on any backend: per call for mlx-lm's `nn.QuantizedLinear` and for `ZigzagLinear` (dense and
sparse), and per decode step of a 32-layer model with every projection alone, with q/k/v and
gate/up stacked (`fuse_shared_inputs`), and through the fused decoder blocks. Best of 5 rounds.

``--encode`` (meant for the GPU) builds a chain of 256 dependent single-token products, y = f(y), and
times ``mx.async_eval`` of the chain alone: the host's cost per kernel to encode it (MLX's graph
walk, our dispatch, the CUDA graph node), for an elementwise add, MLX's ``quantized_matmul`` and
the zigzag GEMV dense, sparse and fused with an RMSNorm prologue and a residual. Median of 5.
"""

import argparse
import copy
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from spqt_mlx import _ext
from spqt_mlx.patch import ZigzagLinear, fuse_blocks, fuse_shared_inputs, patch_model, set_thresholds


def best_of(fn, calls, rounds=5):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn()
        best = min(best, (time.perf_counter() - t) / calls)
        mx.eval(out)
    return best


def encode_costs(chain=256, rounds=5):
    """µs per kernel to encode a chain of dependent single-token products (see the module docstring)."""
    K = 4096
    lin = nn.Linear(K, K, bias=False)
    lin.set_dtype(mx.float16)
    quantized = nn.QuantizedLinear.from_linear(lin, 64, 4)
    zig = ZigzagLinear.from_linear(lin, 64, 4)
    norm = mx.ones((K,), dtype=mx.float16)
    threshold = mx.array(0.5)
    mx.eval(quantized.parameters(), zig.parameters(), norm, threshold)
    args = (zig.weight, zig.scales, zig.biases)
    dense, sparse = _ext.ActiveKind.Dense, _ext.ActiveKind.Threshold
    steps = {
        "x + 1 (elementwise)": lambda y: y + 1,
        "mx.quantized_matmul": quantized,
        "zigzag dense": lambda y: _ext.zigzag_gemv(y, *args, None, dense, 64, 4),
        "zigzag sparse": lambda y: _ext.zigzag_gemv(y, *args, threshold, sparse, 64, 4),
        "zigzag sparse + norm + residual": lambda y: _ext.zigzag_gemv(
            y, *args, threshold, sparse, 64, 4, prologue=_ext.Prologue.RmsNorm, norm_weight=norm, eps=1e-5,
            residual=y),
    }
    out = {}
    for name, f in steps.items():
        times = []
        for _ in range(rounds + 1):
            y = mx.random.normal((1, 1, K)).astype(mx.float16) * 0.01
            mx.eval(y)
            for _ in range(chain):
                y = f(y)
            t = time.perf_counter()
            mx.async_eval(y)
            times.append((time.perf_counter() - t) / chain)
            mx.eval(y)
        out[name] = statistics.median(times[1:])
        print(f"{name:<34} {1e6 * out[name]:6.2f} µs per kernel to encode", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encode", action="store_true", help="also time encoding chains of kernels")
    args = p.parse_args()
    if args.encode:
        encode_costs()
    lin = nn.Linear(4096, 4096, bias=False)
    lin.set_dtype(mx.float16)
    quantized = nn.QuantizedLinear.from_linear(lin, 64, 4)
    dense = ZigzagLinear.from_linear(lin, 64, 4)
    sparse = ZigzagLinear.from_linear(lin, 64, 4)
    sparse.threshold = 0.5
    x = mx.random.normal((1, 1, 4096)).astype(mx.float16)
    mx.eval(quantized.parameters(), dense.parameters(), sparse.parameters(), x)
    for name, layer in [("nn.QuantizedLinear", quantized), ("ZigzagLinear dense", dense), ("ZigzagLinear sparse", sparse)]:
        print(f"{name:<22} {1e6 * best_of(lambda: layer(x), 2000):6.2f} µs per call")

    args = llama.ModelArgs(model_type="llama", rms_norm_eps=1e-5, vocab_size=1024, rope_theta=5e5,
                           tie_word_embeddings=False, hidden_size=512, num_hidden_layers=32, intermediate_size=1024,
                           num_attention_heads=8, num_key_value_heads=2)
    model = llama.Model(args)
    model.set_dtype(mx.float16)
    patch_model(model, group_size=64, bits=4)
    set_thresholds(model, 0.5)
    fused = copy.deepcopy(model)  # patch_model installed the fused decoder blocks
    fuse_blocks(model, enabled=False)
    stacked = copy.deepcopy(model)
    fuse_shared_inputs(stacked)
    for name, m in [("decode step, unstacked", model), ("decode step, stacked", stacked),
                    ("decode step, fused blocks", fused)]:
        cache = make_prompt_cache(m)
        token = mx.array([[5]])
        mx.eval(m(token, cache=cache))
        print(f"{name:<22} {1e3 * best_of(lambda: m(token, cache=cache), 20):6.2f} ms per step (32 layers)")


if __name__ == "__main__":
    main()
