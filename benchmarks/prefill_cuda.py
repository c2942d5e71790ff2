"""Multi-token products (prefill) on the zigzag layout against MLX's 4-bit quantized matmul.

    python benchmarks/prefill_cuda.py [--rows 4 32 128 512] [--json out.json]

Per shape and row count: MLX's `quantized_matmul` on the row-wise layout (what mlx-lm's prefill
runs), and the two zigzag products of `spqt_mlx.ops`: all bands through MLX's non-transposed
quantized matmul (Metal's and the CPU's path), and the bands dequantized then one batched fp16
matmul (the CUDA path). Each figure is the median of chained calls, as in gemv_cuda.py.
"""

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).parent))
from gemv_cuda import chain_time, copies  # noqa: E402

import spqt_mlx as sq  # noqa: E402
from spqt_mlx import ops  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[4, 32, 128, 512])
    p.add_argument("--json")
    args = p.parse_args(argv)
    results = []
    for N, K in SHAPES:
        w = (mx.random.normal((N, K)) * 0.02).astype(mx.float16)
        qw = sq.zigzag_quantize(w, 64, 4)
        wq, s, b = mx.quantize(w, group_size=64, bits=4)
        mx.eval(qw.weight, qw.scales, qw.biases, wq, s, b)
        zz = copies(lambda i: (qw.weight + 0, qw.scales + 0, qw.biases + 0), qw.nbytes)
        rw = copies(lambda i: (wq + 0, s + 0, b + 0), wq.nbytes + s.nbytes + b.nbytes)
        mx.eval(zz, rw)
        for M in args.rows:
            x = mx.random.normal((M, K)).astype(mx.float16)
            mlx = chain_time(lambda x, w_, s_, b_: mx.quantized_matmul(x, w_, s_, b_, True, 64, 4),
                             [(x, *a) for a in rw], 20, 3)

            def zig(product):
                def call(x, w_, s_, b_):
                    y = product(x.reshape(1, M, K), sq.ZigzagWeight(w_, s_, b_, 64, 4), None)
                    return y.swapaxes(0, 1).reshape(M, N)
                return call

            per_band = chain_time(zig(ops._matmul_per_band), [(x, *a) for a in zz], 20, 3)
            dequant = chain_time(zig(ops._matmul_dequantized), [(x, *a) for a in zz], 20, 3)
            results.append(dict(N=N, K=K, M=M, mlx_us=1e6 * mlx, per_band_us=1e6 * per_band, dequantized_us=1e6 * dequant))
            r = results[-1]
            print(f"{N:>6}x{K:<6} M={M:<4} mlx q4 {r['mlx_us']:9.1f} us  zigzag per-band {r['per_band_us']:9.1f} us"
                  f"  zigzag dequantized {r['dequantized_us']:9.1f} us", flush=True)
        del zz, rw
        mx.clear_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
