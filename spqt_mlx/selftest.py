"""Checks the GPU kernels against the CPU reference and times them: ``python -m spqt_mlx.selftest``.

On a Mac every op runs on the GPU stream and on the CPU stream (all bits x group sizes x dtypes;
dense, index lists, packed lists and fused thresholds; several rows), the largest relative difference
is reported per dtype, and the GPU path is timed on a 4096x4096 4-bit layer against
``mx.quantized_matmul``. Without a GPU backend only the CPU path is checked, against a float64
reference. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import mlx.core as mx
import numpy as np

from . import ActiveColumns, collect_active, zigzag_dequantize, zigzag_gemv, zigzag_quantize
from .layout import DTYPES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

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


def time_gpu(repeats=200, rounds=3, K=4096, bits=4, gs=64):
    """µs per call of chained GEMVs (each call consumes the previous output), best of ``rounds``."""
    rng = np.random.default_rng(1)
    w = mx.array((rng.normal(size=(K, K)) / np.sqrt(K)).astype(np.float32)).astype(mx.float16)
    q = zigzag_quantize(w, gs, bits)
    wq, sc, bi = mx.quantize(w, group_size=gs, bits=bits)
    x0 = mx.array(rng.normal(size=(1, K)).astype(np.float32)).astype(mx.float16)
    t = mx.array(float(np.median(np.abs(np.array(x0.astype(mx.float32))))), dtype=mx.float32)
    idx = mx.array(rng.permutation(K)[: K // 2].astype(np.int32))
    mx.eval(q.weight, q.scales, q.biases, wq, sc, bi, x0, idx)

    variants = {
        "mx.quantized_matmul (dense)": lambda x: mx.quantized_matmul(x, wq, sc, bi, transpose=True, group_size=gs, bits=bits),
        "zigzag_gemv dense": lambda x: zigzag_gemv(x, q),
        "zigzag_gemv 50% (index list)": lambda x: zigzag_gemv(x, q, indices=idx),
        "zigzag_gemv ~50% (fused threshold)": lambda x: zigzag_gemv(x, q, indices=collect_active(x, t)),
    }
    results = {}
    for name, op in variants.items():
        y = x0
        for _ in range(10):
            y = op(y)
        mx.eval(y)
        best = float("inf")
        for _ in range(rounds):
            y = x0
            start = time.perf_counter()
            for _ in range(repeats):
                y = op(y)
            mx.eval(y)
            best = min(best, (time.perf_counter() - start) / repeats * 1e6)
        results[name] = best
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-timing", action="store_true", help="only check correctness")
    args = parser.parse_args(argv)

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

    if gpu and not args.no_timing:
        results = time_gpu()
        base = results["mx.quantized_matmul (dense)"]
        print("\n4096x4096, 4 bits, group size 64, float16, one token (µs per call, chained):")
        print(f"{'op':<36} {'µs':>8} {'speedup':>8}")
        for name, us in results.items():
            print(f"{name:<36} {us:>8.1f} {base / us:>7.2f}x")

    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
