"""Checks the GPU kernels against the CPU reference and times them: ``python -m spqt_mlx.selftest``.

On a Mac every op runs on the GPU stream and on the CPU stream (all bits x group sizes x dtypes;
dense, index lists, packed lists and fused thresholds; several rows), and the largest relative
difference is reported per dtype. Then it measures, against MLX's own kernels in the same run:

* the GEMV: µs per chained call of ``mx.quantized_matmul`` and of the zigzag GEMV (dense, and at
  50 % and 25 % of the columns, given and collected in the kernel) on Llama-sized 4-bit layers, for
  one token and for 4 sequences' tokens (a batch's decode step, every row over its own columns);
* decoding: tokens per second of the default model (SmolLM2-135M) as mlx-lm's 4-bit model and as
  the zigzag 4-bit model with sparsity off and at 50 %.

``--json FILE`` writes everything (device, versions, date) to send back. Without a GPU backend only
the CPU path is checked, against a float64 reference (``--timing-on-cpu`` times the CPU anyway,
for testing the benchmark itself: those numbers mean nothing). Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

import mlx.core as mx
import numpy as np

from . import ActiveColumns, collect_active, zigzag_dequantize, zigzag_gemv, zigzag_quantize
from .layout import DTYPES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from .texts import QUICK_START_PROMPT

# Largest acceptable difference, relative to the largest output magnitude.
TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}


def gpu_available() -> bool:
    return mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())


def max_rel_error(got: mx.array, want: np.ndarray) -> float:
    got = np.array(got.astype(mx.float32), dtype=np.float64)
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-6)
    return float(np.abs(got - want).max(initial=0.0)) / scale


def cases(rng, K):
    """(name, indices): the index sets every zigzag_gemv is checked with."""
    half = rng.permutation(K)[: K // 2].astype(np.int32)
    messy = np.concatenate([half[:100], [-1, K, K + 3], half[:7]]).astype(np.int32)
    rng.shuffle(messy)
    return [
        ("dense", None),
        ("indices", mx.array(messy)),
        ("one column", mx.array(half[:1])),
        ("no column", mx.array(np.zeros(0, dtype=np.int32))),
    ]


def check_ops(devices, N=256, K=1000, seed=0):
    """Runs every op on each stream in ``devices``. Returns {dtype: worst relative error} of the first
    stream against the second (against float64 when there is one stream), and whether collect_active
    agrees on every stream."""
    rng = np.random.default_rng(seed)
    worst = {name: 0.0 for name in DTYPES}
    collect_ok = True
    for type_name, dtype in DTYPES.items():
        for bits in SUPPORTED_BITS:
            for gs in SUPPORTED_GROUP_SIZES:
                w = mx.array(rng.normal(size=(N, K)).astype(np.float32)).astype(dtype)
                q = zigzag_quantize(w, gs, bits, stream=mx.cpu)
                wd = np.array(zigzag_dequantize(q, stream=mx.cpu).astype(mx.float32), dtype=np.float64)
                x = mx.array(rng.normal(size=(1, K)).astype(np.float32)).astype(dtype)
                xm = mx.array(rng.normal(size=(4, K)).astype(np.float32)).astype(dtype)
                xd = np.array(x.astype(mx.float32), dtype=np.float64)
                t = mx.array(float(np.median(np.abs(xd))), dtype=mx.float32)

                runs = []  # (label, callable(stream), float64 reference)
                for name, idx in cases(rng, K):
                    cols = np.arange(K) if idx is None else np.array(idx)
                    cols = cols[(cols >= 0) & (cols < K)]
                    runs.append((name, lambda s, idx=idx: zigzag_gemv(x, q, indices=idx, stream=s),
                                 xd[:, cols] @ wd[:, cols].T))
                xmd = np.array(xm.astype(mx.float32), dtype=np.float64)
                runs.append(("4 rows", lambda s: zigzag_gemv(xm, q, stream=s), xmd @ wd.T))
                on = np.nonzero(np.abs(xd[0]) > float(t.item()))[0]
                runs.append(("threshold", lambda s: zigzag_gemv(x, q, indices=collect_active(x, t, stream=s), stream=s),
                             xd[:, on] @ wd[:, on].T))
                runs.append(("packed", lambda s: zigzag_gemv(
                    x, q, indices=ActiveColumns(collect_active(x, t, stream=s).packed, None, None), stream=s),
                    xd[:, on] @ wd[:, on].T))
                # A batch's decode step: every row over its own columns (a threshold a little above
                # the median, so that no column is active in every row).
                tm = float(np.quantile(np.abs(xmd), 0.6))
                kept = np.where(np.abs(xmd) > np.float32(tm), xmd, 0.0)
                runs.append(("4 rows, threshold", lambda s: zigzag_gemv(xm, q, threshold=tm, stream=s), kept @ wd.T))

                for _, run, ref in runs:
                    outs = [run(s) for s in devices]
                    mx.eval(outs)
                    if len(outs) == 1:
                        worst[type_name] = max(worst[type_name], max_rel_error(outs[0], ref))
                    else:
                        want = np.array(outs[1].astype(mx.float32), dtype=np.float64)
                        worst[type_name] = max(worst[type_name], max_rel_error(outs[0], want))

                packed = [np.array(collect_active(x, t, stream=s).packed) for s in devices]
                collect_ok &= all(np.array_equal(p, packed[0]) for p in packed)
    return worst, collect_ok


# Layer shapes (out, in) of the GEMV table: Llama-3-8B's attention and MLP, and a small one.
GEMV_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096))
QUICK_GEMV_SHAPES = ((512, 256),)


def chained_us(op, x0, repeats: int, rounds: int) -> float:
    """µs per call of ``op`` chained as decoding runs it (each call waits for the previous one's
    output), best of ``rounds``."""

    def chain(n):
        y = op(x0)
        for _ in range(n - 1):
            y = op(mx.depends(x0, y))
        mx.eval(y)

    chain(5)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        chain(repeats)
        best = min(best, (time.perf_counter() - start) / repeats * 1e6)
    return best


def time_gemv(shapes=GEMV_SHAPES, repeats=200, rounds=3, bits=4, gs=64) -> list[dict]:
    """Rows ``{shape, rows, variant, density, us}``: MLX's quantized matmul and the zigzag GEMV,
    float16, for one token and for a batch's decode step of 4 sequences."""
    rng = np.random.default_rng(1)
    rows = []
    for N, K in shapes:
        w = mx.array((rng.normal(size=(N, K)) / np.sqrt(K)).astype(np.float32)).astype(mx.float16)
        q = zigzag_quantize(w, gs, bits)
        wq, sc, bi = mx.quantize(w, group_size=gs, bits=bits)
        x0 = mx.array(rng.normal(size=(1, K)).astype(np.float32)).astype(mx.float16)
        mx.eval(q.weight, q.scales, q.biases, wq, sc, bi, x0)

        def add(variant, density, op, x=x0):
            rows.append({"shape": f"{N}x{K}", "rows": x.shape[0], "variant": variant, "density": density,
                         "us": chained_us(op, x, repeats, rounds)})

        add("mx.quantized_matmul", 1.0,
            lambda x: mx.quantized_matmul(x, wq, sc, bi, transpose=True, group_size=gs, bits=bits))
        add("zigzag dense", 1.0, lambda x: zigzag_gemv(x, q))
        xs = np.abs(np.array(x0.astype(mx.float32)))[0]
        for density in (0.5, 0.25):
            idx = mx.array(np.sort(rng.permutation(K)[: int(K * density)]).astype(np.int32))
            # On the device, as in a patched model (a Python float would cost a copy per call).
            t = mx.array(float(np.quantile(xs, 1 - density)), dtype=mx.float32)
            mx.eval(idx, t)
            add("zigzag given indices", density, lambda x, idx=idx: zigzag_gemv(x, q, indices=idx))
            add("zigzag collect+sparse", density, lambda x, t=t: zigzag_gemv(x, q, indices=collect_active(x, t)))
        # 4 sequences' tokens: MLX's matmul of 4 rows, and the zigzag GEMV dense and with every row
        # over its own half of the columns (the kernels read the union once).
        x4 = mx.array(rng.normal(size=(4, K)).astype(np.float32)).astype(mx.float16)
        t4 = mx.array(float(np.median(np.abs(np.array(x4.astype(mx.float32))))), dtype=mx.float32)
        mx.eval(x4, t4)
        add("mx.quantized_matmul", 1.0,
            lambda x: mx.quantized_matmul(x, wq, sc, bi, transpose=True, group_size=gs, bits=bits), x4)
        add("zigzag dense", 1.0, lambda x: zigzag_gemv(x, q), x4)
        add("zigzag threshold", 0.5, lambda x: zigzag_gemv(x, q, threshold=t4), x4)
    return rows


def time_decode(model="smollm2", tokens=64, prompt=QUICK_START_PROMPT) -> list[dict]:
    """Rows ``{model, sparsity, decode_tps, prefill_tps}``: mlx-lm's 4-bit model and the zigzag
    4-bit model (sparsity 0 and 0.5, calibrated on self-generated text) of the default model."""
    import mlx.nn as nn
    from mlx_lm import stream_generate
    from mlx_lm.utils import load

    from .calibrate import sparsify
    from .patch import patch_model
    from .sources import resolve_short_name
    from .texts import calibration_tokens

    path = resolve_short_name(model)

    def run(net, tokenizer):
        for _ in stream_generate(net, tokenizer, prompt, max_tokens=4):  # warm-up
            pass
        last = None
        for last in stream_generate(net, tokenizer, prompt, max_tokens=tokens):
            pass
        return last.generation_tps, last.prompt_tps

    rows = []
    net, tokenizer = load(path)
    nn.quantize(net, group_size=64, bits=4)
    decode, prefill = run(net, tokenizer)
    rows.append({"model": "mlx-lm 4-bit (nn.QuantizedLinear)", "sparsity": 0.0, "decode_tps": decode,
                 "prefill_tps": prefill})
    del net
    net, tokenizer = load(path)
    cal, _ = calibration_tokens(net, tokenizer, n_tokens=128, progress=False)
    patch_model(net, group_size=64, bits=4)
    for sparsity in (0.0, 0.5):
        sparsify(net, cal, sparsity, progress=False)
        decode, prefill = run(net, tokenizer)
        rows.append({"model": "zigzag 4-bit", "sparsity": sparsity, "decode_tps": decode, "prefill_tps": prefill})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-timing", action="store_true", help="only check correctness")
    parser.add_argument("--json", help="write the results (device, versions, date, checks, timings) here")
    parser.add_argument("--model", default="smollm2", help="model of the decode comparison (default: smollm2)")
    parser.add_argument("--decode-tokens", type=int, default=64, help="tokens per timed generation (default 64)")
    parser.add_argument("--quick", action="store_true", help="a small layer and 8 decode tokens (for testing)")
    parser.add_argument("--timing-on-cpu", action="store_true",
                        help="time the CPU when there is no GPU (tests the benchmark; the numbers mean nothing)")
    args = parser.parse_args(argv)
    if args.decode_tokens < 1:
        parser.error(f"--decode-tokens must be positive, got {args.decode_tokens}.")

    gpu = gpu_available()
    if gpu:
        print(f"GPU available ({mx.default_device()}): comparing the GPU stream with the CPU stream.")
        devices = [mx.gpu, mx.cpu]
    else:
        print("No GPU backend in this MLX: the GPU path is not available here; checking the CPU path "
              "against a float64 reference.")
        devices = [mx.cpu]

    worst, collect_ok = check_ops(devices)
    ok = collect_ok
    print(f"\n{'dtype':<10} {'max rel error':>14} {'tolerance':>10}  result")
    for name, err in worst.items():
        passed = err <= TOLERANCE[name]
        ok &= passed
        print(f"{name:<10} {err:>14.2e} {TOLERANCE[name]:>10.0e}  {'ok' if passed else 'FAIL'}")
    if len(devices) > 1:
        print(f"collect_active: {'identical on both streams' if collect_ok else 'DIFFERS between the streams'}")

    gemv_rows, decode_rows = [], []
    if (gpu or args.timing_on_cpu) and not args.no_timing:
        if not gpu:
            print("\nTiming the CPU (--timing-on-cpu): these numbers are not performance claims.")
        shapes = QUICK_GEMV_SHAPES if args.quick else GEMV_SHAPES
        gemv_rows = time_gemv(shapes, repeats=20 if args.quick else 200, rounds=1 if args.quick else 3)
        print("\nGEMV, 4 bits, group size 64, float16, one token or 4 sequences' tokens "
              "(µs per chained call; speedup over MLX with as many rows):")
        print(f"{'shape':<12} {'rows':>4} {'op':<26} {'density':>7} {'µs':>8} {'speedup':>8}")
        base = {(r["shape"], r["rows"]): r["us"] for r in gemv_rows if r["variant"] == "mx.quantized_matmul"}
        for r in gemv_rows:
            print(f"{r['shape']:<12} {r['rows']:>4} {r['variant']:<26} {r['density']:>7.2f} {r['us']:>8.1f} "
                  f"{base[r['shape'], r['rows']] / r['us']:>7.2f}x")
        decode_rows = time_decode(args.model, 8 if args.quick else args.decode_tokens)
        print(f"\nDecode, {args.model} (tokens per second; speedup over mlx-lm 4-bit):")
        base_tps = decode_rows[0]["decode_tps"]
        for r in decode_rows:
            print(f"{r['model']:<34} sparsity {r['sparsity']:.2f} {r['decode_tps']:>9.1f} "
                  f"{r['decode_tps'] / base_tps:>7.2f}x")

    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    if args.json:
        from importlib.metadata import version

        from .files import atomic_write_text

        results = {
            "device": mx.device_info() if gpu else {"device": "cpu"},
            "platform": platform.platform(),
            "machine": platform.machine(),
            "versions": {"mlx": mx.__version__, "mlx-lm": version("mlx-lm"), "spqt-mlx": version("spqt-mlx")},
            "date": datetime.date.today().isoformat(),
            "timed_on": "gpu" if gpu else ("cpu" if gemv_rows else None),
            "checks": {"passed": bool(ok), "max_rel_error": worst, "collect_identical": bool(collect_ok)},
            "gemv": gemv_rows,
            "decode": decode_rows,
        }
        atomic_write_text(args.json, json.dumps(results, indent=2, default=str))
        print(f"results written to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
