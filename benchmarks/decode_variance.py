"""Why decode speed varies between generations: both models' step times, generation by generation.

Per-step times of mlx-lm's 4-bit model and ours, with what each generation did on the host (issue 12).

    python benchmarks/decode_variance.py --size 8b --sparsity 0.5 --json decode_variance.json \\
        [--driver-calls driver_calls.so] [--config "graphs off" MLX_USE_CUDA_GRAPHS=0 ...]

Each configuration runs in its own process (MLX reads its environment once): both models are built
(as in decode_cuda.py), then ``--generations`` greedy generations of ``--tokens`` tokens alternate
between them, timed as ``generate_step`` yields tokens. Per generation it records decode tokens/s,
the step times' median, 90th percentile and maximum, how many steps took over twice the median,
the process's CPU time over wall time, Python's garbage collections and their time, and, with
``--driver-calls`` (driver_calls.cpp built as a shared library), the CUDA driver calls the
generation made: graph instantiations, graph updates and failed ones, graph launches, allocations,
synchronizations, and the host time in each.
"""

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).parent))
from decode_cuda import baseline_quantize, load_model, write_results, zigzag_quantize  # noqa: E402

import spqt_mlx.calibrate as calibrate  # noqa: E402
from spqt_mlx.patch import fuse_blocks, fuse_shared_inputs, set_thresholds  # noqa: E402

# Driver calls reported by name; the rest are summed into "other".
WATCHED = {
    "instantiate": ("cuGraphInstantiate", "cuGraphInstantiate_v2", "cuGraphInstantiateWithFlags",
                    "cuGraphInstantiateWithParams", "cuGraphInstantiateWithParams_ptsz"),
    "update": ("cuGraphExecUpdate", "cuGraphExecUpdate_v2"),
    "launch": ("cuGraphLaunch", "cuGraphLaunch_ptsz"),
    "alloc": ("cuMemAlloc", "cuMemAlloc_v2", "cuMemAllocAsync", "cuMemAllocAsync_ptsz", "cuMemAllocManaged",
              "cuMemAllocHost", "cuMemAllocHost_v2", "cuMemHostAlloc", "cuMemAllocFromPoolAsync",
              "cuMemAllocFromPoolAsync_ptsz"),
    "free": ("cuMemFree", "cuMemFree_v2", "cuMemFreeAsync", "cuMemFreeAsync_ptsz", "cuMemFreeHost"),
    "sync": ("cuStreamSynchronize", "cuStreamSynchronize_ptsz", "cuCtxSynchronize", "cuCtxSynchronize_v2",
             "cuEventSynchronize", "cuMemcpy", "cuMemcpy_ptds", "cuMemcpyDtoH", "cuMemcpyDtoH_v2",
             "cuMemcpyHtoD", "cuMemcpyHtoD_v2"),
}


class DriverCalls:
    """The CUDA driver calls made between ``start()`` and ``read()``, from driver_calls.so."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.driver_calls_name.restype = ctypes.c_char_p
        self.by_name = {name: kind for kind, names in WATCHED.items() for name in names}

    def start(self):
        if self.lib.driver_calls_start() != 0:
            raise RuntimeError("CUPTI refused the subscription (is another profiler attached?)")

    def read(self):
        n = 1024
        ids = (ctypes.c_int * n)()
        counts, failed, ns = ((ctypes.c_int64 * n)() for _ in range(3))
        k = self.lib.driver_calls_read(ids, counts, failed, ns, n)
        out = {kind: 0 for kind in WATCHED} | {f"{kind}_ms": 0.0 for kind in WATCHED}
        out.update(update_failed=0, other=0, other_ms=0.0)
        top = []
        for i in range(k):
            name = self.lib.driver_calls_name(ids[i]).decode()
            kind = self.by_name.get(name, "other")
            out[kind] += counts[i]
            out[f"{kind}_ms"] += ns[i] / 1e6
            if kind == "update":
                out["update_failed"] += failed[i]
            top.append((ns[i] / 1e6, name, counts[i]))
        out["top"] = [dict(name=name, calls=c, ms=round(ms, 3)) for ms, name, c in sorted(top, reverse=True)[:8]]
        return out


class GcTimes:
    """Python's garbage collections and the time they took, since the last ``reset()``."""

    def __init__(self):
        self.count, self.seconds, self._t0 = 0, 0.0, None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase, info):
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.count += 1
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    def reset(self):
        self.count, self.seconds = 0, 0.0


def generation(model, prompt, tokens):
    """Token arrival times of one greedy generation, the first being the prompt's."""
    times = []
    for _ in generate_step(prompt, model, max_tokens=tokens):
        times.append(time.perf_counter())
    return times


def split_generation(model, prompt, tokens, clocks):
    """Per decode step (graph building, encoding, waiting for the previous token, SM clock in MHz)
    of one greedy generation that does what ``generate_step`` does (its stream, log-probabilities,
    argmax, one step ahead), with the host's phases timed apart."""
    stream = generation_stream
    cache = make_prompt_cache(model)

    def step(tokens_in):
        with mx.stream(stream):
            logits = model(tokens_in[None], cache=cache)[:, -1, :]
            logprobs = logits - mx.logsumexp(logits, keepdims=True)
            return mx.argmax(logprobs, axis=-1), logprobs.squeeze(0)

    with mx.stream(stream):
        model(prompt[:-1][None], cache=cache)
        mx.eval([c.state for c in cache])
    y, logprobs = step(prompt[-1:])
    mx.eval(y)
    phases = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        next_y, next_logprobs = step(y)
        t1 = time.perf_counter()
        mx.async_eval(next_y, next_logprobs)
        t2 = time.perf_counter()
        y.item()
        t3 = time.perf_counter()
        phases.append((t1 - t0, t2 - t1, t3 - t2, clocks.sm_mhz() if clocks else 0))
        y, logprobs = next_y, next_logprobs
    y.item()
    return phases


class Clocks:
    """The GPU's SM clock through NVML, if nvidia-ml-py is installed."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    def sm_mhz(self):
        return self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM)

    @classmethod
    def maybe(cls):
        try:
            return cls()
        except Exception:
            return None


def summarize(times):
    steps = [b - a for a, b in zip(times, times[1:])]
    median = statistics.median(steps)
    ordered = sorted(steps)
    return dict(tok_s=len(steps) / (times[-1] - times[0]), step_ms_median=median * 1e3,
                step_ms_p90=ordered[int(0.9 * (len(ordered) - 1))] * 1e3, step_ms_max=ordered[-1] * 1e3,
                slow_steps=sum(s > 2 * median for s in steps), steps_ms=[round(s * 1e3, 3) for s in steps])


def pin_main_thread():
    """Pin this (the main) thread to one CPU and every other thread of the process off that CPU's
    core (its SMT siblings included). Returns (cpu, siblings)."""
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[0]
    path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
    siblings = {cpu}
    if path.exists():
        for part in path.read_text().strip().split(","):
            lo, _, hi = part.partition("-")
            siblings |= set(range(int(lo), int(hi or lo) + 1))
    others = set(allowed) - siblings
    main = threading.get_native_id()
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != main and others:
            try:
                os.sched_setaffinity(int(tid), others)
            except OSError:
                pass  # a thread that ended meanwhile
    os.sched_setaffinity(0, {cpu})
    return cpu, sorted(siblings)


def run_config(args):
    """This process's rows: the generations of both models, alternating."""
    calls = DriverCalls(args.driver_calls) if args.driver_calls else None
    gc_times = GcTimes()
    clocks = Clocks.maybe() if args.split else None
    baseline, _ = load_model(args.size, baseline_quantize)
    ours, _ = load_model(args.size, zigzag_quantize)
    fuse_shared_inputs(ours)
    fuse_blocks(ours)
    vocab = ours.args.vocab_size
    prompt = mx.random.randint(0, vocab, (128,), key=mx.random.key(1))
    calib = mx.random.randint(0, vocab, (256,), key=mx.random.key(2))
    set_thresholds(ours, calibrate.calibrate(ours, calib, args.sparsity, progress=False) if args.sparsity else 0.0)
    models = {"mlx": baseline, str(args.sparsity): ours}
    for model in models.values():  # warm-up: kernels compiled, buffers cached
        generation(model, prompt, args.tokens)
    if args.pin:
        print("main thread on CPU {}, its core's CPUs {} left to it".format(*pin_main_thread()), flush=True)
    rows = []
    for g in range(args.generations):
        for variant, model in models.items():
            gc_times.reset()
            if calls:
                calls.start()
            cpu0 = time.process_time()
            times = generation(model, prompt, args.tokens)
            cpu = time.process_time() - cpu0
            row = dict(config=args.name, size=args.size, variant=variant, generation=g, **summarize(times),
                       cpu_over_wall=cpu / (times[-1] - times[0] + 1e-12), gc_count=gc_times.count,
                       gc_ms=gc_times.seconds * 1e3)
            if calls:
                row["driver"] = calls.read()
            if args.split:
                phases = split_generation(model, prompt, args.tokens, clocks)
                row["split_ms"] = [[round(a * 1e3, 3), round(b * 1e3, 3), round(c * 1e3, 3), m]
                                   for a, b, c, m in phases]
                build, encode, wait, mhz = zip(*phases)
                row.update(split_tok_s=len(phases) / sum(map(sum, zip(build, encode, wait))),
                           build_ms=statistics.median(build) * 1e3, encode_ms=statistics.median(encode) * 1e3,
                           wait_ms=statistics.median(wait) * 1e3, sm_mhz_min=min(mhz), sm_mhz_max=max(mhz))
            rows.append(row)
            print(f"{args.name:<14} {variant:>4} gen {g}: {row['tok_s']:6.1f} tok/s, step median "
                  f"{row['step_ms_median']:.2f} p90 {row['step_ms_p90']:.2f} max {row['step_ms_max']:.2f} ms, "
                  f"{row['slow_steps']} slow, gc {row['gc_count']}" +
                  (f", inst {row['driver']['instantiate']} upd {row['driver']['update']}"
                   f"/{row['driver']['update_failed']} failed, alloc {row['driver']['alloc']}, "
                   f"sync {row['driver']['sync']}" if calls else "") +
                  (f" | split {row['split_tok_s']:.0f} tok/s: build {row['build_ms']:.2f} encode {row['encode_ms']:.2f} "
                   f"wait {row['wait_ms']:.2f} ms, SM {row['sm_mhz_min']}-{row['sm_mhz_max']} MHz" if args.split else ""),
                  flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="8b", choices=["70b", "8b", "1b", "smollm2"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--driver-calls", help="driver_calls.so: count CUDA driver calls per generation")
    p.add_argument("--config", nargs="+", action="append", default=[], metavar=("NAME", "VAR=VALUE"),
                   help="a configuration: its name and environment variables (repeatable)")
    p.add_argument("--split", action="store_true",
                   help="after each generation, one more timed by phase (building, encoding, waiting) with the SM clock")
    p.add_argument("--pin", action="store_true",
                   help="pin the main thread to one CPU and the process's other threads off its core")
    p.add_argument("--json")
    p.add_argument("--name", default="default", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        rows = run_config(args)
        Path(args.child).write_text(json.dumps(rows))
        return rows
    configs = [["default"]] + args.config
    rows = []
    for name, *env in configs:
        bad = [e for e in env if "=" not in e]
        if bad:
            raise SystemExit(f"--config {name}: expected VAR=VALUE, got {bad[0]!r}")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, __file__, "--size", args.size, "--sparsity", str(args.sparsity),
                   "--generations", str(args.generations), "--tokens", str(args.tokens), "--name", name,
                   "--child", str(out)] + (["--split"] if args.split else []) + \
                (["--pin"] if args.pin else [])
            if args.driver_calls:
                cmd += ["--driver-calls", args.driver_calls]
            subprocess.run(cmd, check=True, env=os.environ | dict(e.split("=", 1) for e in env))
            rows += json.loads(out.read_text())
    print(f"\n{'config':<16} {'variant':>7} {'tok/s by generation':<48} {'slow':>5} {'inst':>5} {'upd fail':>8}")
    for name, *_ in configs:
        for variant in ("mlx", str(args.sparsity)):
            mine = [r for r in rows if r["config"] == name and r["variant"] == variant]
            speeds = " ".join(f"{r['tok_s']:.0f}" for r in mine)
            slow = sum(r["slow_steps"] for r in mine)
            inst = sum(r.get("driver", {}).get("instantiate", 0) for r in mine)
            fail = sum(r.get("driver", {}).get("update_failed", 0) for r in mine)
            print(f"{name:<16} {variant:>7} {speeds:<48} {slow:>5} {inst:>5} {fail:>8}")
    if args.json:
        write_results(args.json, rows)
    return rows


if __name__ == "__main__":
    main()
