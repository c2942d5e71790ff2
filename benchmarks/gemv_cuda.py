"""Zigzag GEMV against MLX's quantized_matmul, fp16 GEMV and copy bandwidth, on MLX's GPU stream.

Every variant is timed as decode runs it: a dependent chain of calls (call i+1 waits for call i
through mx.depends, which adds no kernel) over rotating weight copies larger than the L2, many calls
per evaluation. Reports the median microseconds per call of several chains and the effective GB/s
on the bytes each call must read (codes, scales and biases of the active columns, x and y).

    python benchmarks/gemv_cuda.py [--quick] [--json out.json] [--plot out.png]
"""

import argparse
import datetime
import json
import statistics
import time

import numpy as np

import mlx.core as mx

import spqt_mlx as sq

# Llama-3-8B's (4096 hidden, 14336 MLP) and Llama-3-70B's (8192 hidden, 28672 MLP, 1024 for k/v).
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336),
          (8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)]
DENSITIES = [1.0, 0.75, 0.5, 0.4, 0.25, 0.1]
ROTATE_BYTES = 256 << 20  # weight copies per variant, well past the 50 MB L2


def chain_time(call, inputs, calls, repeats):
    """Median seconds per call over `repeats` chains of `calls` dependent calls."""

    def run():
        y = None
        for i in range(calls):
            args = inputs[i % len(inputs)]
            x = args[0] if y is None else mx.depends(args[0], y)
            y = call(x, *args[1:])
        mx.eval(y)

    run()  # warm-up: kernel loading, graph building
    times = []
    for _ in range(repeats):
        mx.synchronize()
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def copy_bandwidth():
    a = mx.random.uniform(shape=(64 << 20,))  # 256 MB
    mx.eval(a)
    t = chain_time(lambda x: x + 1.0, [(a,)], 10, 5)
    return 2 * a.nbytes / t


def copies(make, nbytes):
    return [make(i) for i in range(max(2, ROTATE_BYTES // max(nbytes, 1)))]


def bench_shape(N, K, bits, gs, calls, repeats, densities, rows):
    dtype = mx.float16
    mx.random.seed(N + K + bits)
    w = (mx.random.normal((N, K)) * 0.02).astype(dtype)
    qw = sq.zigzag_quantize(w, gs, bits)
    wq, s, b = mx.quantize(w, group_size=gs, bits=bits)
    mx.eval(w, qw.weight, wq)
    xs = [mx.random.normal((1, K)).astype(dtype) for _ in range(8)]
    mx.eval(xs)
    io_bytes = 2 * (K + N)

    def zz_copy(i):
        c = sq.ZigzagWeight(qw.weight + 0, qw.scales + 0, qw.biases + 0, gs, bits)
        mx.eval(c.weight, c.scales, c.biases)
        return c

    zz = copies(zz_copy, qw.nbytes)
    rowwise = copies(lambda i: tuple(mx.eval(t := (wq + 0, s + 0, b + 0)) or t), qw.nbytes)
    dense = copies(lambda i: mx.eval(c := w + 0) or c, w.nbytes)

    def add(variant, density, t, nbytes):
        rows.append(dict(shape=f"{N}x{K}", bits=bits, variant=variant, density=density,
                         us=t * 1e6, gbs=nbytes / t / 1e9))

    qmm = chain_time(
        lambda x, c: mx.quantized_matmul(x, *c, transpose=True, group_size=gs, bits=bits),
        [(xs[i % 8], rowwise[i]) for i in range(len(rowwise))], calls, repeats)
    add("mlx quantized_matmul", 1.0, qmm, qw.nbytes + io_bytes)
    if bits == 4:
        fp16 = chain_time(lambda x, c: x @ c.T, [(xs[i % 8], dense[i]) for i in range(len(dense))], calls, repeats)
        add("fp16 x @ W.T", 1.0, fp16, w.nbytes + io_bytes)
    t = chain_time(lambda x, c: sq.zigzag_gemv(x, c), [(xs[i % 8], zz[i]) for i in range(len(zz))], calls, repeats)
    add("zigzag dense", 1.0, t, qw.nbytes + io_bytes)
    rng = np.random.default_rng(0)
    for d in densities:
        n = int(round(d * K))
        idx = [mx.array(np.sort(rng.permutation(K)[:n]).astype(np.int32)) for _ in range(8)]
        t = chain_time(lambda x, c, i: sq.zigzag_gemv(x, c, indices=i),
                       [(xs[i % 8], zz[i], idx[i % 8]) for i in range(len(zz))], calls, repeats)
        add("zigzag sparse, given indices", d, t, d * qw.nbytes + io_bytes)
        # Thresholds live on the device, as in a patched model (a Python float would cost a
        # host-to-device copy per call).
        thresholds = [mx.array(float(np.quantile(np.abs(np.array(x.astype(mx.float32))), 1 - d)) if d < 1 else -1.0)
                      for x in xs]
        mx.eval(thresholds)
        t = chain_time(lambda x, c, th: sq.zigzag_gemv(x, c, indices=sq.collect_active(x, th)),
                       [(xs[i % 8], zz[i], thresholds[i % 8]) for i in range(len(zz))], calls, repeats)
        add("zigzag collect+sparse (fused)", d, t, d * qw.nbytes + io_bytes)


def check_against_cpu():
    """One sanity check per run: GPU and CPU kernels agree."""
    qw = sq.zigzag_quantize(mx.random.normal((1024, 4096)).astype(mx.float16), 64, 4)
    x = mx.random.normal((1, 4096)).astype(mx.float16)
    a = sq.zigzag_gemv(x, qw, indices=sq.collect_active(x, 0.7), stream=mx.gpu).astype(mx.float32)
    b = sq.zigzag_gemv(x.astype(mx.float32), qw.astype(mx.float32), indices=sq.collect_active(x.astype(mx.float32), 0.7), stream=mx.cpu)
    err = (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()
    assert err < 2e-3, err
    return err


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer calls and densities")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    p.add_argument("--json")
    p.add_argument("--plot")
    p.add_argument("--markdown", metavar="JSON", help="print the BENCHMARKS.md tables of a saved run and exit")
    args = p.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return
    calls, repeats = (100, 3) if args.quick else (300, 5)
    densities = [1.0, 0.5, 0.25] if args.quick else DENSITIES
    print(f"device: {mx.gpu} {mx.device_info().get('device_name', '')}")
    print(f"gpu vs cpu kernels, relative error: {check_against_cpu():.2e}")
    bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bw / 1e9:.0f} GB/s")
    rows = []
    for bits in args.bits:
        for N, K in SHAPES:
            bench_shape(N, K, bits, 64, calls, repeats, densities, rows)
    for r in rows:
        r["pct_copy_bw"] = 100 * r["gbs"] * 1e9 / bw
    base = {(r["shape"], r["bits"]): r["us"] for r in rows if r["variant"] == "mlx quantized_matmul"}
    dense = {(r["shape"], r["bits"]): r["us"] for r in rows if r["variant"] == "zigzag dense"}
    print(f"\n{'shape':>11} {'bits':>4} {'variant':<30} {'dens':>5} {'us':>8} {'GB/s':>6} {'%bw':>5} "
          f"{'vs qmm':>6} {'t/t_dense':>9}")
    for r in rows:
        key = (r["shape"], r["bits"])
        print(f"{r['shape']:>11} {r['bits']:>4} {r['variant']:<30} {r['density']:>5.2f} {r['us']:>8.2f} "
              f"{r['gbs']:>6.0f} {r['pct_copy_bw']:>5.1f} {base[key] / r['us']:>6.2f} {r['us'] / dense[key]:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=mx.device_info().get("device_name", str(mx.gpu)),
                           date=datetime.date.today().isoformat(), copy_bandwidth_gbs=bw / 1e9, rows=rows), f, indent=1)
    if args.plot:
        plot(rows, args.plot)


def markdown(run):
    """The tables of BENCHMARKS.md from a saved run (--json): µs per call and the targets."""
    rows = run["rows"]
    at = {(r["shape"], r["bits"], r["variant"], r["density"]): r for r in rows}
    out = []
    for bits in sorted({r["bits"] for r in rows}):
        dens = sorted({r["density"] for r in rows if r["variant"].startswith("zigzag sparse")}, reverse=True)
        out.append(f"\n**{bits}-bit, group 64, fp16, batch 1**: µs per call, chained\n")
        out.append("| N×K | MLX quantized_matmul | fp16 x@W.T | zigzag dense (% copy BW) | "
                   + " | ".join(f"sparse d={d:g}" for d in dens) + " | "
                   + " | ".join(f"fused d={d:g}" for d in dens) + " |")
        out.append("|---" * (4 + 2 * len(dens)) + "|")
        for shape in dict.fromkeys(r["shape"] for r in rows if r["bits"] == bits):
            def us(variant, d=1.0):
                r = at.get((shape, bits, variant, d))
                return f"{r['us']:.1f}" if r else "–"
            dense = at[(shape, bits, "zigzag dense", 1.0)]
            out.append(f"| {shape} | {us('mlx quantized_matmul')} | {us('fp16 x @ W.T')} | "
                       f"{dense['us']:.1f} ({dense['pct_copy_bw']:.0f} %) | "
                       + " | ".join(us("zigzag sparse, given indices", d) for d in dens) + " | "
                       + " | ".join(us("zigzag collect+sparse (fused)", d) for d in dens) + " |")
    out.append("\n**Targets** (4-bit; ratios of chained times from the table above)\n")
    out.append("| N×K | dense % copy BW | dense vs MLX q4 | t(0.5)/t(1) | t(0.25)/t(1) | fused/sparse at 0.5 |")
    out.append("|---|---|---|---|---|---|")
    for shape in dict.fromkeys(r["shape"] for r in rows if r["bits"] == 4):
        g = lambda v, d=1.0: at[(shape, 4, v, d)]["us"]
        sparse = "zigzag sparse, given indices"
        try:
            out.append(f"| {shape} | {at[(shape, 4, 'zigzag dense', 1.0)]['pct_copy_bw']:.0f} % | "
                       f"{g('mlx quantized_matmul') / g('zigzag dense'):.2f}x | "
                       f"{g(sparse, 0.5) / g(sparse):.2f} | {g(sparse, 0.25) / g(sparse):.2f} | "
                       f"{g('zigzag collect+sparse (fused)', 0.5) / g(sparse, 0.5):.2f} |")
        except KeyError:
            pass
    return "\n".join(out)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["shape"], r["bits"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.5), squeeze=False)
    for ax, (shape, bits) in zip(axes[0], shapes):
        sel = [r for r in rows if r["shape"] == shape and r["bits"] == bits]
        for variant in ("zigzag sparse, given indices", "zigzag collect+sparse (fused)"):
            pts = sorted((r["density"], r["us"]) for r in sel if r["variant"] == variant)
            ax.plot(*zip(*pts), marker="o", label=variant)
        for variant, style in (("mlx quantized_matmul", "--"), ("zigzag dense", ":")):
            for r in sel:
                if r["variant"] == variant:
                    ax.axhline(r["us"], linestyle=style, color="gray", label=variant)
        ax.set_title(f"{shape}, {bits}-bit g64")
        ax.set_xlabel("density")
        ax.set_ylabel("us per call")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
