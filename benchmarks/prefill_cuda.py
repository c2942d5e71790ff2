"""Prefill on the zigzag layout against mlx-lm's 4-bit model: whole models, or single products.

    python benchmarks/prefill_cuda.py --sizes 8b 70b [--prompts 128 512 2048] [--json out.json]
    python benchmarks/prefill_cuda.py [--rows 4 32 128 512] [--json out.json]

With --sizes: models built as in decode_cuda.py (random weights, 4-bit group 64; ours with fused
decoder blocks, as spqt-generate runs), one prompt of each length prefilled by mlx-lm's own
`BatchGenerator` (what mlx_lm.server runs); prefill tok/s is its count of prompt tokens over its
prompt time, the median of three runs after a warm-up one, the two models' runs interleaved where
both fit in memory (all but 70B). Rows `size, model, prompt_tokens, prefill_tps`.

Without: per shape and row count, MLX's `quantized_matmul` on the row-wise layout (what mlx-lm's
prefill runs), `spqt_mlx.zigzag_matmul` (CUDA's tensor-core kernel on the zigzag layout), the bands
dequantized into a transient fp16 copy and one batched matmul (the CUDA path before that kernel,
and float32's), optionally all bands through MLX's non-transposed quantized matmul (Metal's and the
CPU's path), and up to 16 rows the GEMV layers run there. Each figure is the median of chained
calls, as in gemv_cuda.py.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_cuda import chain_time, copies  # noqa: E402

import spqt_mlx as sq  # noqa: E402
from spqt_mlx.layout import dequantize_bands  # noqa: E402
from spqt_mlx.patch.linear import GEMV_MAX_ROWS  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]


def prompt_speed(model, prompt):
    """Prompt tok/s of one BatchGenerator run that prefills ``prompt`` and samples one token."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, stop_tokens=[], max_tokens=1, prefill_batch_size=1)
    gen.insert([prompt], [1])
    with gen.stats() as stats:
        while gen.next_generated():
            pass
    gen.close()
    return stats.prompt_tps


def models(args):
    from decode_cuda import BASELINE, LABELS, baseline_quantize, load_model, write_results, zigzag_quantize
    from spqt_mlx.patch import fuse_blocks

    rows = []
    for size in args.sizes:
        prompts = {n: mx.random.randint(0, 128256, (n,), key=mx.random.key(n)).tolist() for n in args.prompts}
        baseline, _ = load_model(size, baseline_quantize)
        if size == "70b":  # one model at a time
            for n in args.prompts:
                prompt_speed(baseline, prompts[n][:64])
                tps = sorted(prompt_speed(baseline, prompts[n]) for _ in range(3))[1]
                rows.append(dict(size=size, label=LABELS[size], model=BASELINE,
                                 prompt_tokens=n, prefill_tps=tps))
                print(rows[-1], flush=True)
            del baseline
            baseline = None
            mx.clear_cache()
        model, _ = load_model(size, zigzag_quantize)
        fuse_blocks(model)
        for n in args.prompts:
            pair = [model] if baseline is None else [model, baseline]
            for m in pair:
                prompt_speed(m, prompts[n][:64])
            runs = [sorted(prompt_speed(m, prompts[n]) for _ in range(3))[1] for m in pair]
            rows.append(dict(size=size, label=LABELS[size], model="zigzag 4-bit", prompt_tokens=n,
                             prefill_tps=runs[0]))
            if baseline is not None:
                rows.append(dict(size=size, label=LABELS[size], model=BASELINE,
                                 prompt_tokens=n, prefill_tps=runs[1]))
            print(rows[-2:], flush=True)
        del model, baseline
        mx.clear_cache()
    print(f"\n{'size':>4} {'tokens':>6} {'mlx-lm tok/s':>12} {'zigzag tok/s':>12} {'ratio':>6}")
    for size in args.sizes:
        for n in args.prompts:
            base, ours = (next(r["prefill_tps"] for r in rows if r["size"] == size and r["prompt_tokens"] == n and
                               r["model"].startswith(k)) for k in ("mlx", "zigzag"))
            print(f"{size:>4} {n:>6} {base:>12.0f} {ours:>12.0f} {ours / base:>6.2f}")
    if args.json:
        write_results(args.json, rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", choices=["8b", "70b", "1b"], help="whole models instead of products")
    p.add_argument("--prompts", type=int, nargs="+", default=[128, 512, 2048], help="prompt lengths (with --sizes)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 128, 512, 1024, 2048])
    p.add_argument("--per-band", action="store_true", help="also time MLX's non-transposed quantized matmul (slow)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.sizes:
        return models(args)
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

            def per_band(x, w_, s_, b_):
                y = mx.quantized_matmul(x.reshape(1, M, K), w_, s_[..., None], b_[..., None], transpose=False,
                                        group_size=64, bits=4)
                return y.swapaxes(0, 1).reshape(M, N)

            def dequantized(x, w_, s_, b_):
                y = x.reshape(1, M, K) @ dequantize_bands(sq.ZigzagWeight(w_, s_, b_, 64, 4))
                return y.swapaxes(0, 1).reshape(M, N)

            args_ = [(x, *a) for a in zz]
            band = chain_time(per_band, args_, 20, 3) if args.per_band else 0.0
            dequant = chain_time(dequantized, args_, 20, 3)
            ours = chain_time(lambda x, w_, s_, b_: sq.zigzag_matmul(x, sq.ZigzagWeight(w_, s_, b_, 64, 4)),
                              args_, 20, 3)
            r = dict(N=N, K=K, M=M, mlx_us=1e6 * mlx, matmul_us=1e6 * ours, per_band_us=1e6 * band,
                     dequantized_us=1e6 * dequant)
            if M <= GEMV_MAX_ROWS:
                # The GEMV of several rows (what layers run up to GEMV_MAX_ROWS rows): dense, and
                # every row over its own half of the columns.
                t = float(mx.median(mx.abs(x)).item())
                gemv = chain_time(lambda x, w_, s_, b_: sq.zigzag_gemv(x, sq.ZigzagWeight(w_, s_, b_, 64, 4)),
                                  [(x, *a) for a in zz], 20, 3)
                half = chain_time(lambda x, w_, s_, b_: sq.zigzag_gemv(x, sq.ZigzagWeight(w_, s_, b_, 64, 4),
                                                                        threshold=t), [(x, *a) for a in zz], 20, 3)
                r.update(gemv_us=1e6 * gemv, gemv_half_us=1e6 * half)
            results.append(r)
            print(f"{N:>6}x{K:<6} M={M:<4} mlx q4 {r['mlx_us']:8.1f} us  zigzag_matmul {r['matmul_us']:8.1f} us"
                  f"  per-band {r['per_band_us']:8.1f} us  dequantized {r['dequantized_us']:8.1f} us"
                  f"  gemv {r.get('gemv_us', 0):8.1f} us  gemv d=.5 {r.get('gemv_half_us', 0):8.1f} us", flush=True)
        del zz, rw
        mx.clear_cache()
    if args.json:
        from decode_cuda import write_results

        write_results(args.json, results)


if __name__ == "__main__":
    main()
