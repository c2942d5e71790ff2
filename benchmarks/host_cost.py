"""Host time to build the graph of a projection call and of a decode step (Python side only).

    python benchmarks/host_cost.py

Nothing is evaluated inside the timed loops, so this measures what the Python forward pass costs
on any backend: per call for mlx-lm's `nn.QuantizedLinear` and for `ZigzagLinear` (dense and
sparse), and per decode step of a 32-layer model with every projection alone and with q/k/v and
gate/up stacked (`fuse_shared_inputs`). Best of 5 rounds.
"""

import copy
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from spqt_mlx.patch import ZigzagLinear, fuse_shared_inputs, patch_model, set_thresholds


def best_of(fn, calls, rounds=5):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn()
        best = min(best, (time.perf_counter() - t) / calls)
        mx.eval(out)
    return best


def main():
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
    stacked = copy.deepcopy(model)
    fuse_shared_inputs(stacked)
    for name, m in [("decode step, unstacked", model), ("decode step, stacked", stacked)]:
        cache = make_prompt_cache(m)
        token = mx.array([[5]])
        mx.eval(m(token, cache=cache))
        print(f"{name:<22} {1e3 * best_of(lambda: m(token, cache=cache), 20):6.2f} ms per step (32 layers)")


if __name__ == "__main__":
    main()
