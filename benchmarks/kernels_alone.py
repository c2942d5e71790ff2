"""The CUDA GEMV kernels alone, without MLX: the general kernel (kernels/cuda/zigzag_gemv.cu)
against the tensor-core kernel (zigzag_gemv_mma.cu) and, for dense walks of 16-bit x, the bulk-copy
kernel (zigzag_gemv_bulk.cu) on the same launches, with torch's fp16 GEMV and the copy bandwidth
measured in the same run.

Each kernel is compiled here with nvcc for sm_90, loaded with CuPy and launched as the dispatch
launches it (dispatch/cuda.cpp: same arguments, the same split policy). Beside them, the read
ceiling: a kernel that only reads the same bytes (codes, scales, biases) in the same number of
blocks as the tensor-core kernel's dense launch, each block a contiguous share, many 16-byte loads in
flight per thread. No GEMV on these bytes can be faster than it. And its sparse counterpart: a kernel
that reads only the groups (and scales and biases) of a sorted random column list, at densities 1,
0.5 and 0.25, which bounds the sparse walks the same way. Correctness: every kernel
against a float64 reference on fresh random inputs (fp16, bf16, float32; dense, index lists with
duplicates and junk, fused collection; several split counts). Timing: a CUDA graph of 200 dependent
launches over rotating weight copies larger than the L2, replayed 5 times; the median per launch.

    python benchmarks/kernels_alone.py [--json out.json]      (needs nvcc, CuPy and PyTorch)
    python benchmarks/kernels_alone.py --prologues [--json out.json]   fused prologues' cost
    python benchmarks/kernels_alone.py --against OLD.cu [--json out.json]
        another version of the tensor-core kernel (e.g. `git show REV:kernels/cuda/zigzag_gemv_mma.cu > OLD.cu`)
        checked and timed beside the current one, in place of the general kernel
"""

import argparse
import datetime
import json
import subprocess
import tempfile
from pathlib import Path

import cupy as cp
import numpy as np
import torch

KERNELS = Path(__file__).resolve().parent.parent / "kernels" / "cuda"
SOURCES = {"general": "zigzag_gemv.cu", "tensor-core": "zigzag_gemv_mma.cu", "bulk copies": "zigzag_gemv_bulk.cu"}
# The bulk-copy kernel: dense walks of 16-bit x with K a multiple of 16, 288 threads.
BULK = "bulk copies"
BULK_THREADS = 288
CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
SHAPES = [(14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672), (8192, 8192), (4096, 4096),
          (1024, 4096), (1024, 8192)]
THREADS = 256
SMS = cp.cuda.Device(0).attributes["MultiProcessorCount"]


def build(out_dir, only=None, sources=None):
    """{(kernel, dtype, group_size): CuPy function}, 4-bit: all, or the one ``only`` names. ``sources``
    maps kernel names to files (default: SOURCES, in kernels/cuda)."""
    fns = {}
    for kernel, source in (sources or SOURCES).items():
        for dtype, ctype in CTYPES.items():
            for gs in (64, 128):
                if only is not None and (kernel, dtype, gs) != only or kernel == BULK and dtype == "float32":
                    continue
                name = f"k_{kernel.replace('-', '_').replace(' ', '_')}_{dtype}_g{gs}"
                cubin = Path(out_dir) / f"{name}.cubin"
                subprocess.run(["nvcc", "-std=c++17", "-O3", "-cubin", "-gencode=arch=compute_90,code=sm_90",
                                f"-I{KERNELS}", f"-DSPQT_NAME={name}", f"-DSPQT_T={ctype}", "-DSPQT_BITS=4",
                                f"-DSPQT_GS={gs}", "-DSPQT_MANY_ROWS=0", str(KERNELS / source), "-o", str(cubin)],
                               check=True)
                fns[kernel, dtype, gs] = cp.RawModule(path=str(cubin)).get_function(name)
    return fns


# Reads a block's contiguous share of the codes, then its shares of the scales and biases; the loads
# of a thread are all in flight together (kUnroll per step). What it returns is never used: the
# comparison only keeps the compiler from dropping the loads.
READ_CEILING = r"""
#include <cstdint>
extern "C" __global__ void __launch_bounds__(256) read_ceiling(
    const uint4* __restrict__ codes, long codes16, const uint4* __restrict__ sides, long sides16,
    unsigned* __restrict__ sink) {
  constexpr int kUnroll = 8;
  uint32_t acc = 0;
  auto walk = [&](const uint4* p, long n) {
    for (long i = threadIdx.x; i < n; i += 256L * kUnroll) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = i + u * 256 < n ? __ldcs(p + i + u * 256) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
  };
  walk(codes + blockIdx.x * codes16, codes16);
  walk(sides + blockIdx.x * sides16, sides16);
  if (acc == 0x9E3779B9u) sink[0] = acc;
}
"""


# The same for a sparse walk: reads only the groups of a sorted column list (4-bit, groups of 64: two
# 16-byte loads each) and their 2-byte scales and biases, each block a contiguous share of one band's
# list, up to eight groups per thread in flight. What a walk given those columns cannot beat.
ACTIVE_READ_CEILING = r"""
#include <cstdint>
extern "C" __global__ void __launch_bounds__(256) active_read_ceiling(
    const uint4* __restrict__ codes, const uint16_t* __restrict__ scales, const uint16_t* __restrict__ biases,
    const int* __restrict__ list, int n, int K, int splits, unsigned* __restrict__ sink) {
  constexpr int kUnroll = 8;
  const int band = blockIdx.x / splits;
  const int share = (n + splits - 1) / splits;
  const int begin = (blockIdx.x % splits) * share;
  const int end = min(n, begin + share);
  const uint4* w = codes + int64_t(band) * K * 2;
  const uint16_t* s = scales + int64_t(band) * K;
  const uint16_t* b = biases + int64_t(band) * K;
  uint32_t acc = 0;
  for (int i = begin + threadIdx.x; i < end; i += 256 * kUnroll) {
    uint4 lo[kUnroll], hi[kUnroll];
    uint32_t side[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool in = i + u * 256 < end;
      const int k = in ? list[i + u * 256] : 0;
      lo[u] = in ? __ldcs(w + 2 * k) : make_uint4(0, 0, 0, 0);
      hi[u] = in ? __ldcs(w + 2 * k + 1) : make_uint4(0, 0, 0, 0);
      side[u] = in ? uint32_t(s[k]) << 16 | b[k] : 0u;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) acc ^= lo[u].x ^ lo[u].w ^ hi[u].y ^ hi[u].z ^ side[u];
  }
  if (acc == 0x12345678u) sink[0] = acc;
}
"""


def build_read_ceiling(out_dir):
    """The two read ceilings: (every group, the active groups of a list)."""
    fns = []
    for name, text in (("read_ceiling", READ_CEILING), ("active_read_ceiling", ACTIVE_READ_CEILING)):
        source = Path(out_dir) / f"{name}.cu"
        source.write_text(text)
        cubin = Path(out_dir) / f"{name}.cubin"
        subprocess.run(["nvcc", "-O3", "-cubin", "-gencode=arch=compute_90,code=sm_90", str(source), "-o", str(cubin)],
                       check=True)
        fns.append(cp.RawModule(path=str(cubin)).get_function(name))
    return tuple(fns)


def active_read_ceiling_time(fn, p, copies, lists):
    """µs per launch of the active-groups read ceiling over ``copies`` of ``p``'s weights (group size 64),
    the sorted column lists ``lists`` in turn: the best of two, four and eight blocks per multiprocessor."""
    if p.gs != 64:
        raise ValueError("the active-groups read ceiling reads 4-bit groups of 64 (32 bytes)")
    bands = p.N // p.gs
    sink = cp.zeros(1, cp.uint32)
    best = float("inf")
    for per_sm in (2, 4, 8):
        sp = 1
        while sp < 64 and bands * sp < per_sm * SMS and p.K // (2 * sp) >= 256:
            sp *= 2

        def go(i, sp=sp):
            w, s, b = copies[i % len(copies)]
            cols = lists[i % len(lists)]
            fn((bands * sp,), (256,), (w, s, b, cols, np.int32(len(cols)), np.int32(p.K), np.int32(sp), sink))

        best = min(best, graph_time(go))
    return best


def read_ceiling_time(fn, p, copies):
    """µs per launch of the read ceiling over ``copies`` of ``p``'s weights (codes, then scales and biases,
    one buffer each), as many blocks as the tensor-core kernel's dense launch."""
    blocks = p.N // p.gs * splits("tensor-core", p.N // p.gs, p.K, p.gs)
    code_bytes = p.w.nbytes
    side_bytes = p.s.nbytes + p.b.nbytes
    bufs = [(w, cp.concatenate([s.view(cp.uint8).ravel(), b.view(cp.uint8).ravel()])) for w, s, b in copies]
    sink = cp.zeros(1, cp.uint32)

    def go(i):
        w, sides = bufs[i % len(bufs)]
        fn((blocks,), (256,), (w, np.int64(code_bytes // 16 // blocks), sides, np.int64(side_bytes // 16 // blocks), sink))

    return graph_time(go)


def splits(kernel, bands, K, gs):
    """The dispatch's split policy (dispatch/cuda.cpp)."""
    s = 1
    if kernel == BULK:
        while s < 32 and bands * s < SMS and K // (2 * s) >= 512:
            s *= 2
    elif kernel == "general":
        per_step = 8 * (32 // (gs // 32))
        while s < 32 and bands * s * 2 <= 2 * SMS and K // (2 * s) >= 2 * per_step:
            s *= 2
    else:
        while s < 32 and bands * s < 2 * SMS and K // (2 * s) >= 256:
            s *= 2
    return s


def bf16_bits(a):
    u = a.view(cp.uint32)
    return ((u + ((u >> 16) & 1) + 0x7FFF) >> 16).astype(cp.uint16)


class Problem:
    """Random 4-bit zigzag weights (random codes, scales and biases) and an activation."""

    def __init__(self, N, K, gs, dtype, seed):
        rs = cp.random.RandomState(seed)
        self.N, self.K, self.gs, self.dtype = N, K, gs, dtype
        bands = N // gs
        self.w = rs.randint(0, 2**32, size=(bands, K, gs // 8), dtype=cp.uint64).astype(cp.uint32)
        self.s = self.cast(rs.standard_normal((bands, K), dtype=cp.float32) * 0.005)
        self.b = self.cast(rs.standard_normal((bands, K), dtype=cp.float32) * 0.05)
        self.x = self.cast(rs.standard_normal((K,), dtype=cp.float32))

    def cast(self, v):
        return bf16_bits(v) if self.dtype == "bfloat16" else v.astype(self.dtype)

    def f64(self, v):
        if self.dtype == "bfloat16":
            v = (v.astype(cp.uint32) << 16).view(cp.float32)
        return cp.asnumpy(v).astype(np.float64)

    def reference(self, idx=None):
        bands, K, gs = self.N // self.gs, self.K, self.gs
        words = cp.asnumpy(self.w)
        q = np.stack([(words[:, :, r // 8] >> (4 * (r % 8))) & 15 for r in range(gs)], axis=-1).astype(np.float64)
        count = np.ones(K) if idx is None else np.bincount(idx[(idx >= 0) & (idx < K)], minlength=K)
        xm = self.f64(self.x) * count
        return (np.einsum("k,bk,bkr->br", xm, self.f64(self.s), q) + (self.f64(self.b) @ xm)[:, None]).reshape(-1)

    def launch(self, fn, kernel, weights, kind, active, n, t_value, out, work, count, prologue=0, x=None,
               norm=None, residual=None):
        """One launch; ``prologue`` (kernels/contract.h) reads ``x`` (2K columns for SwiGLU) and ``norm``,
        and ``residual`` is added to y."""
        w, s, b = weights
        bands = self.N // self.gs
        sp = splits(kernel, bands, self.K, self.gs)
        null = np.uint64(0)
        args = (self.x if x is None else x, w, s, b, active, out, work, count, np.int32(1), np.int32(self.N),
                np.int32(self.K), np.int32(1), np.int32(kind), np.int32(n), np.int32(0), np.float32(t_value),
                np.int32(sp), null if norm is None else norm, null if residual is None else residual, np.int32(1),
                np.int32(prologue), np.float32(1e-5))
        if kernel == "general":
            # The general kernel also serves the experts' products: a plain one has no expert list, one
            # expert, x shared by every row, no second weight, and all its bands in the first.
            args += (null, np.int32(1), np.int32(1), null, null, null, np.int32(bands))
        fn((bands * sp, 1), (BULK_THREADS if kernel == BULK else THREADS,), args)

    def buffers(self):
        out = cp.empty((self.N,), {"float16": cp.float16, "bfloat16": cp.uint16, "float32": cp.float32}[self.dtype])
        work = cp.zeros((self.N * 32,), cp.float32)
        count = cp.zeros((self.N // self.gs,), cp.int32)
        return out, work, count


def kernels_of(fns):
    """The kernels ``fns`` holds, in the order they were built."""
    return list(dict.fromkeys(kernel for kernel, _, _ in fns))


def correctness(fns):
    worst = {}
    rng = np.random.default_rng(0)
    for N, K, gs in [(128, 333, 64), (4096, 4096, 64), (14336, 4096, 64), (1024, 14336, 64), (256, 1000, 128),
                     (4096, 4096, 128)]:
        for dtype in CTYPES:
            p = Problem(N, K, gs, dtype, seed=N + K)
            xa = np.abs(p.f64(p.x))
            t = float(np.float32(np.quantile(xa, 0.5)))
            idx = np.concatenate([rng.permutation(K)[: K // 2], [-1, K, 3, 3]]).astype(np.int32)
            cases = [(0, None, 0, 0.0, None), (1, cp.asarray(idx), len(idx), 0.0, idx),
                     (3, p.x, 0, t, np.flatnonzero(xa > t))]
            for kind, active, n, tv, ref_idx in cases:
                ref = p.reference(ref_idx)
                for kernel in kernels_of(fns):
                    if (kernel, dtype, gs) not in fns or kernel == BULK and (kind != 0 or K % 16):
                        continue
                    out, work, count = p.buffers()
                    tol = {"float16": 2e-3, "bfloat16": 1.5e-2, "float32": 1e-5}[dtype]
                    ys = []
                    for _ in range(2):
                        p.launch(fns[kernel, dtype, gs], kernel, (p.w, p.s, p.b), kind,
                                 p.x if active is None else active, n, tv, out, work, count)
                        ys.append(p.f64(out))
                    err = np.linalg.norm(ys[0] - ref) / np.linalg.norm(ref)
                    assert np.isfinite(err) and err < tol, (kernel, dtype, N, K, gs, kind, err)
                    assert np.array_equal(ys[0], ys[1]), "not reproducible"
                    worst[kernel, dtype] = max(worst.get((kernel, dtype), 0.0), float(err))
    return worst


def graph_time(launch, n=200, reps=5):
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        launch(0)
        stream.synchronize()
        stream.begin_capture()
        for i in range(n):
            launch(i)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        times = []
        for _ in range(reps):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) * 1e3 / n)
    return float(np.median(times))


def torch_gemv_time(N, K, n=200):
    copies = [torch.randn(N, K, device="cuda", dtype=torch.float16) for _ in range(max(2, (512 << 20) // (N * K * 2)))]
    x = torch.randn(1, K, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for w in copies:
            x @ w.T
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(n):
                x @ copies[i % len(copies)].T
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / n)
    return float(np.median(times))


def copy_bandwidth():
    a = torch.empty(1 << 28, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * a.nbytes / (start.elapsed_time(end) / 1e3) / 1e9


def timings(fns, ceilings):
    rows = []
    rng = np.random.default_rng(1)
    ceiling, active_ceiling = ceilings
    for N, K in SHAPES:
        rows.append(dict(shape=f"{N}x{K}", variant="fp16 x @ W.T (torch)", density=1.0, us=torch_gemv_time(N, K)))
        p = Problem(N, K, 64, "float16", seed=3)
        nbytes = p.w.nbytes + p.s.nbytes + p.b.nbytes
        copies = [(p.w.copy(), p.s.copy(), p.b.copy()) for _ in range(max(2, (256 << 20) // nbytes))]
        rows.append(dict(shape=f"{N}x{K}", variant="read ceiling", density=1.0, us=read_ceiling_time(ceiling, p, copies)))
        for density in (1.0, 0.5, 0.25):
            lists = [cp.asarray(np.sort(rng.permutation(K)[: int(density * K)]).astype(np.int32)) for _ in range(4)]
            rows.append(dict(shape=f"{N}x{K}", variant="read ceiling, active groups", density=density,
                             us=active_read_ceiling_time(active_ceiling, p, copies, lists)))
        xa = np.abs(p.f64(p.x))
        for kernel in kernels_of(fns):
            fn = fns[kernel, "float16", 64]
            bufs = [p.buffers() for _ in copies]
            for kind, density in [(0, 1.0)] + ([] if kernel == BULK else [(1, 0.5), (1, 0.25), (3, 0.5), (3, 0.25)]):
                lists = [cp.asarray(np.sort(rng.permutation(K)[: int(density * K)]).astype(np.int32)) for _ in range(4)]
                t = float(np.quantile(xa, 1 - density))

                def go(i):
                    out, work, count = bufs[i % len(copies)]
                    active = lists[i % 4] if kind == 1 else p.x
                    p.launch(fn, kernel, copies[i % len(copies)], kind, active, len(lists[i % 4]), t, out, work, count)

                name = {0: "dense", 1: "given indices", 3: "fused collection"}[kind]
                rows.append(dict(shape=f"{N}x{K}", variant=f"{kernel} {name}", density=density, us=graph_time(go)))
        del copies
    return rows


# A decoder block's products (q/k/v stacked, gate/up stacked, down) of the 8B and 70B shapes.
BLOCK_SHAPES = [(6144, 4096), (28672, 4096), (4096, 14336), (10240, 8192), (57344, 8192), (8192, 28672)]
PROLOGUES = {"identity": 0, "rmsnorm": 1, "swiglu": 2}


def prologue_timings(fns):
    """The tensor-core kernel with each fused prologue as a decoder block uses it (RMSNorm before q/k/v and
    gate/up; SwiGLU before down, with the residual added), dense and fused collection at density 0.5:
    what folding a block's neighbours costs the product."""
    rows = []
    for N, K in BLOCK_SHAPES:
        p = Problem(N, K, 64, "float16", seed=3)
        nbytes = p.w.nbytes + p.s.nbytes + p.b.nbytes
        copies = [(p.w.copy(), p.s.copy(), p.b.copy()) for _ in range(max(2, (256 << 20) // nbytes))]
        bufs = [p.buffers() for _ in copies]
        rs = cp.random.RandomState(4)
        x = rs.standard_normal((2 * K,), dtype=cp.float32).astype(cp.float16)
        norm = rs.uniform(0.5, 1.5, (K,), dtype=cp.float32).astype(cp.float16)
        residual = rs.standard_normal((N,), dtype=cp.float32).astype(cp.float16)
        xs = cp.asnumpy(x).astype(np.float64)
        for name, prologue in PROLOGUES.items():
            xp = {0: xs[:K], 1: xs[:K] / np.sqrt(np.mean(xs[:K] ** 2)) * cp.asnumpy(norm),
                  2: xs[:K] / (1 + np.exp(-xs[:K])) * xs[K:]}[prologue]
            for kind, density in [(0, 1.0), (3, 0.5)]:
                t = float(np.quantile(np.abs(xp), 1 - density))  # keeps about `density` of x'

                def go(i):
                    out, work, count = bufs[i % len(copies)]
                    p.launch(fns["tensor-core", "float16", 64], "tensor-core", copies[i % len(copies)], kind, x, 0, t,
                             out, work, count, prologue=prologue, x=x, norm=norm if prologue == 1 else None,
                             residual=residual if prologue == 2 else None)

                us = graph_time(go)
                assert np.all(np.isfinite(p.f64(bufs[0][0]))), (N, K, name)
                rows.append(dict(shape=f"{N}x{K}", prologue=name, density=density, us=us))
        del copies
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--prologues", action="store_true",
                        help="time the tensor-core kernel with each fused prologue on decoder-block shapes instead")
    parser.add_argument("--against", metavar="FILE",
                        help="another version of zigzag_gemv_mma.cu, checked and timed beside the current one "
                             "(in place of the general kernel)")
    args = parser.parse_args()
    sources = SOURCES
    if args.against:
        if not Path(args.against).is_file():
            parser.error(f"--against: no such file: {args.against}")
        sources = {"against": Path(args.against).resolve(), "tensor-core": SOURCES["tensor-core"]}
    with tempfile.TemporaryDirectory() as tmp:
        fns = build(tmp, only=("tensor-core", "float16", 64) if args.prologues else None, sources=sources)
        if args.prologues:
            rows = prologue_timings(fns)
            at = {(r["shape"], r["prologue"], r["density"]): r["us"] for r in rows}
            print(f"device: {torch.cuda.get_device_name()}")
            print("| N×K | " + " | ".join(f"{n} d={d:g}" for d in (1.0, 0.5) for n in PROLOGUES) + " |")
            print("|---" * (1 + 2 * len(PROLOGUES)) + "|")
            for N, K in BLOCK_SHAPES:
                s = f"{N}x{K}"
                print(f"| {s} | " + " | ".join(f"{at[s, n, d]:.1f}" for d in (1.0, 0.5) for n in PROLOGUES) + " |")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                                   rows=rows), f, indent=1)
            return
        worst = correctness(fns)
        for (kernel, dtype), err in sorted(worst.items()):
            print(f"worst relative error vs float64: {kernel:<12} {dtype:<9} {err:.2e}")
        bw = copy_bandwidth()
        rows = timings(fns, build_read_ceiling(tmp))
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth: {bw:.0f} GB/s")
    at = {(r["shape"], r["variant"], r["density"]): r["us"] for r in rows}
    cols = [("dense", 1.0), ("given indices", 0.5), ("given indices", 0.25), ("fused collection", 0.5),
            ("fused collection", 0.25)]
    kernels = list(sources)

    def timed(v, d):  # the kernels with a row for this column
        return [k for k in kernels if any((f"{N}x{K}", f"{k} {v}", d) in at for N, K in SHAPES)]

    print("| N×K | fp16 x@W.T | read ceiling | active groups' read d=1 / 0.5 / 0.25 | "
          + " | ".join(f"{v} d={d:g}: " + " / ".join(timed(v, d)) for v, d in cols) + " | read ceiling / fastest dense |")
    print("|---" * (5 + len(cols)) + "|")
    for N, K in SHAPES:
        s = f"{N}x{K}"
        ceiling = at[s, "read ceiling", 1.0]
        active = " / ".join(f"{at[s, 'read ceiling, active groups', d]:.1f}" for d in (1.0, 0.5, 0.25))
        dense = [at[s, f"{k} dense", 1.0] for k in kernels if (s, f"{k} dense", 1.0) in at]
        print(f"| {s} | {at[s, 'fp16 x @ W.T (torch)', 1.0]:.1f} | {ceiling:.1f} | {active} | " + " | ".join(
            " / ".join(f"{at[s, f'{k} {v}', d]:.1f}" for k in kernels if (s, f"{k} {v}", d) in at) for v, d in cols)
            + f" | {ceiling / min(dense):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                           copy_bandwidth_gbs=bw, worst_error=[dict(kernel=k, dtype=d, error=e) for (k, d), e in worst.items()],
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
