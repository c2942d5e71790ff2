"""Where one decode step's time goes: host work, GPU kernels by kind, and the bandwidth bound.

    python benchmarks/decode_profile.py --size 8b --variants mlx 0 0.5 --json steps.json
    ncu --profile-from-start off --clock-control none --cache-control none --csv \\
        --metrics gpu__time_duration.sum python benchmarks/decode_profile.py --size 8b --variants 0.5 \\
        --ncu-step > kernels_0.5.csv
    python benchmarks/decode_profile.py --kernels kernels_0.5.csv [kernels_mlx.csv ...]

Variants: ``mlx`` is mlx-lm's own 4-bit model; a number is the zigzag model (projections zigzag
4-bit with q/k/v and gate/up stacked, embeddings and lm_head quantized as mlx-lm's) at that target
sparsity (models as in decode_cuda.py). The first form times decode steps as ``generate_step`` runs them: the host
builds step i+1's graph and encodes its kernels while the GPU runs step i. Per step it reports the
host's graph building (Python), its kernel encoding (``mx.async_eval``), the wait for the previous
token, and the bytes the step must read over the measured copy bandwidth. ``--ncu-step`` runs
one decode step between cuProfilerStart/Stop for Nsight Compute, and ``--kernels`` sums those
kernel times by kind: projections, lm_head, attention (SDPA, RoPE, KV-cache writes), the rest.
"""

import argparse
import csv
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).parent))
from decode_cuda import baseline_quantize, load_model, zigzag_quantize  # noqa: E402
from gemv_cuda import copy_bandwidth  # noqa: E402

import spqt_mlx.calibrate as calibrate  # noqa: E402
from spqt_mlx.patch import ZigzagLinear, achieved_sparsity, fuse_shared_inputs, record_stats, set_thresholds  # noqa: E402

PROMPT_TOKENS = 128


def build(size, variant):
    model, _ = load_model(size, baseline_quantize if variant == "mlx" else zigzag_quantize)
    vocab = model.args.vocab_size
    calib = mx.random.randint(0, vocab, (256,), key=mx.random.key(2))
    if variant != "mlx":
        fuse_shared_inputs(model)
        s = float(variant)
        set_thresholds(model, calibrate.calibrate(model, calib, s, progress=False) if s else 0.0)
    mx.eval(model.parameters())
    return model


def start(model):
    vocab = model.args.vocab_size
    prompt = mx.random.randint(0, vocab, (PROMPT_TOKENS,), key=mx.random.key(1))
    cache = make_prompt_cache(model)
    y = mx.argmax(model(prompt[None], cache=cache)[:, -1], axis=-1)
    mx.eval(y)
    return cache, y


def step(model, cache, y):
    return mx.argmax(model(y[None], cache=cache)[:, -1], axis=-1)


def weight_bytes(model, sparsity):
    """Bytes one decode token must read from the weights: every projection's active share, the
    whole lm_head, one embedding row."""
    total = 0.0
    for path, m in model.named_modules():
        if isinstance(m, ZigzagLinear):
            total += (m.weight.nbytes + m.scales.nbytes + m.biases.nbytes) * (1.0 - sparsity)
        elif isinstance(m, (nn.QuantizedLinear, nn.Linear)):
            total += sum(v.nbytes for _, v in m.parameters().items() if isinstance(v, mx.array))
        elif isinstance(m, (nn.QuantizedEmbedding, nn.Embedding)):
            rows = m.weight.shape[0]
            total += sum(v.nbytes for _, v in m.parameters().items() if isinstance(v, mx.array)) / rows
    return total


def kv_bytes(model, context):
    args = model.args
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    return 2 * args.num_hidden_layers * args.num_key_value_heads * head_dim * context * 2


def time_steps(model, steps=64, repeats=3):
    """Per-step medians (seconds) of: the whole step, graph building, encoding, waiting."""
    out = []
    for _ in range(repeats + 1):  # the first round warms up
        cache, y = start(model)
        build_t, encode_t, wait_t = [], [], []
        t_begin = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            nxt = step(model, cache, y)
            t1 = time.perf_counter()
            mx.async_eval(nxt)
            t2 = time.perf_counter()
            y.item()
            t3 = time.perf_counter()
            build_t.append(t1 - t0)
            encode_t.append(t2 - t1)
            wait_t.append(t3 - t2)
            y = nxt
        y.item()
        total = (time.perf_counter() - t_begin) / steps
        out.append(dict(step=total, build=statistics.median(build_t), encode=statistics.median(encode_t),
                        wait=statistics.median(wait_t)))
    runs = out[1:]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def profile_one_step(model):
    cache, y = start(model)
    for _ in range(4):
        y = step(model, cache, y)
        mx.eval(y)
    mx.synchronize()
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuProfilerStart()
    y = step(model, cache, y)
    mx.eval(y)
    mx.synchronize()
    cuda.cuProfilerStop()


# ---- kernel categories -------------------------------------------------------------------------

ATTENTION = ("sdpa", "attention", "rope", "flash")


def categorize(csv_path):
    """Sum ncu's kernel times (µs) of one step by kind. The step's last quantized matmul kernel is
    the lm_head (it runs after every block)."""
    lines = [line for line in Path(csv_path).read_text(errors="replace").splitlines() if line.startswith('"')]
    rows = list(csv.reader(lines))
    header, body = rows[0], rows[1:]
    kernels = []
    for r in body:
        d = dict(zip(header, r))
        if d.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = d.get("Metric Unit", "nsecond")
        value = float(d["Metric Value"].replace(",", ""))
        scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(unit, 1e-3)
        kernels.append((int(d["ID"]), d["Kernel Name"], value * scale))
    kernels.sort()
    quantized = [i for i, (_, name, _) in enumerate(kernels) if "qmv" in name.lower() or "qmm" in name.lower()]
    head = quantized[-1] if quantized else None
    sums = dict(projections=0.0, lm_head=0.0, attention=0.0, rest=0.0)
    names = {}
    for i, (_, name, us) in enumerate(kernels):
        low = name.lower()
        if i == head:
            kind = "lm_head"
        elif "spqt" in low or "qmv" in low or "qmm" in low:
            kind = "projections"
        elif any(a in low for a in ATTENTION):
            kind = "attention"
        else:
            kind = "rest"
        sums[kind] += us
        key = (kind, name.split("(")[0].split("<")[0][:60])
        names[key] = names.get(key, 0.0) + us
    sums["total"] = sum(sums.values())
    sums["kernels"] = len(kernels)
    top = sorted(names.items(), key=lambda kv: -kv[1])[:12]
    return sums, [(k[0], k[1], v) for k, v in top]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="8b")
    p.add_argument("--variants", nargs="+", default=["mlx", "0", "0.5"])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--ncu-step", action="store_true", help="profile one decode step of the (single) variant")
    p.add_argument("--kernels", nargs="+", help="ncu CSV files to summarize (nothing is run)")
    p.add_argument("--json")
    args = p.parse_args(argv)

    if args.kernels:
        result = {}
        for path in args.kernels:
            sums, top = categorize(path)
            result[Path(path).stem] = dict(sums=sums, top=top)
            print(f"{Path(path).stem}: {sums['kernels']} kernels, "
                  + ", ".join(f"{k} {sums[k]:.0f} µs" for k in ("projections", "lm_head", "attention", "rest", "total")))
            for kind, name, us in top:
                print(f"    {kind:<12} {us:8.1f} µs  {name}")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return result

    if args.ncu_step:
        profile_one_step(build(args.size, args.variants[0]))
        return None

    bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    for variant in args.variants:
        model = build(args.size, variant)
        record_stats(model, True)
        cache, y = start(model)
        for _ in range(16):
            y = step(model, cache, y)
        mx.eval(y)
        got = achieved_sparsity(model)
        record_stats(model, False)
        sparsity = got[0] if got else 0.0
        t = time_steps(model, args.steps)
        context = PROMPT_TOKENS + args.steps // 2
        nbytes = weight_bytes(model, sparsity) + kv_bytes(model, context)
        rows.append(dict(size=args.size, variant=variant, achieved=sparsity, **t, bytes=nbytes,
                         bound=nbytes / bw))
        print(rows[-1], flush=True)
        del model
        mx.clear_cache()
    print(f"\n{'variant':>8} {'achieved':>8} {'step ms':>8} {'tok/s':>7} {'build ms':>8} {'encode ms':>9} "
          f"{'wait ms':>8} {'MB/token':>9} {'bound ms':>8}")
    for r in rows:
        print(f"{r['variant']:>8} {r['achieved']:>8.2f} {1e3 * r['step']:>8.2f} {1 / r['step']:>7.1f} "
              f"{1e3 * r['build']:>8.2f} {1e3 * r['encode']:>9.2f} {1e3 * r['wait']:>8.2f} "
              f"{r['bytes'] / 1e6:>9.0f} {1e3 * r['bound']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(copy_bandwidth_gbs=bw / 1e9, rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
