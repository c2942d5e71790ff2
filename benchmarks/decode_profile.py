"""Where one decode step's time goes: host work, GPU kernels by kind, and the bandwidth bound.

    python benchmarks/decode_profile.py --size 8b --variants mlx 0 0.5 --ncu --json decode_steps.json

With ``--ncu`` each variant's step is also run once under Nsight Compute (a subprocess, as below),
and the rows get the step's kernel count and summed GPU time. By hand:

    ncu --profile-from-start off --clock-control none --cache-control none --csv \\
        --metrics gpu__time_duration.sum python benchmarks/decode_profile.py --size 8b --variants 0.5 \\
        --ncu-step > kernels_0.5.csv
    python benchmarks/decode_profile.py --kernels kernels_0.5.csv [kernels_mlx.csv ...]

Variants: ``mlx`` is mlx-lm's own 4-bit model; a number is the zigzag model (projections zigzag
4-bit with q/k/v and gate/up stacked, embeddings and lm_head quantized as mlx-lm's) at that target
sparsity (models as in decode_cuda.py), decoding through the fused decoder blocks; "0.5/per-projection"
runs every product per projection instead (written to the JSON's ``comparison_rows``). The variants
are timed in interleaved rounds (``--rounds``), the median taken per variant. The first form times decode steps as ``generate_step`` runs them: the host
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

sys.path.insert(0, str(Path(__file__).parent))
from decode_cuda import baseline_quantize, load_model, zigzag_quantize  # noqa: E402
from gemv_cuda import copy_bandwidth  # noqa: E402

import spqt_mlx.calibrate as calibrate  # noqa: E402
from spqt_mlx.patch import (  # noqa: E402
    ZigzagLinear, achieved_sparsity, fuse_blocks, fuse_shared_inputs, record_stats, set_thresholds,
)

PROMPT_TOKENS = 128


def parse_variant(variant):
    """("mlx", None, False) or ("zigzag", sparsity, fused blocks?) from "mlx", "0.5" or "0.5/per-projection"."""
    if variant == "mlx":
        return "mlx", None, False
    value, _, mode = variant.partition("/")
    if mode not in ("", "per-projection"):
        raise SystemExit(f"unknown variant {variant!r}: use mlx, a sparsity, or a sparsity/per-projection")
    return "zigzag", float(value), mode == ""


def build(size, kind):
    """mlx-lm's 4-bit model ("mlx") or the zigzag model (q/k/v and gate/up stacked), evaluated."""
    model, _ = load_model(size, baseline_quantize if kind == "mlx" else zigzag_quantize)
    if kind != "mlx":
        fuse_shared_inputs(model)
    mx.eval(model.parameters())
    return model


def apply(model, sparsity, fused, thresholds):
    """Set the zigzag model to a variant: its calibrated thresholds (cached) and fused blocks or not."""
    if sparsity not in thresholds:
        calib = mx.random.randint(0, model.args.vocab_size, (256,), key=mx.random.key(2))
        thresholds[sparsity] = calibrate.calibrate(model, calib, sparsity, progress=False) if sparsity else 0.0
    set_thresholds(model, thresholds[sparsity])
    fuse_blocks(model, enabled=fused)


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


def time_round(model, steps):
    """One round of ``steps`` pipelined decode steps: per-step (whole step, median graph building,
    median encoding, median wait) in seconds."""
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
    return dict(step=total, build=statistics.median(build_t), encode=statistics.median(encode_t),
                wait=statistics.median(wait_t))


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


def kernels_under_ncu(ncu, size, variant):
    """(kernel count, summed GPU µs) of one decode step, from a subprocess under Nsight Compute."""
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--cache-control", "none", "--csv",
           "--metrics", "gpu__time_duration.sum", sys.executable, __file__, "--size", size, "--variants", variant,
           "--ncu-step"]
    with tempfile.NamedTemporaryFile("w+", suffix=".csv") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.DEVNULL, check=True)
        sums, _ = categorize(f.name)
    return sums


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="8b")
    p.add_argument("--variants", nargs="+", default=["mlx", "0", "0.5"])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--ncu-step", action="store_true", help="profile one decode step of the (single) variant")
    p.add_argument("--kernels", nargs="+", help="ncu CSV files to summarize (nothing is run)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --steps steps per variant")
    p.add_argument("--ncu", nargs="?", const="ncu", metavar="PATH",
                   help="also count each variant's kernels and GPU time under Nsight Compute")
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
        kind, sparsity, fused = parse_variant(args.variants[0])
        model = build(args.size, kind)
        if kind != "mlx":
            apply(model, sparsity, fused, {})
        profile_one_step(model)
        return None

    bw = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bw / 1e9:.0f} GB/s", flush=True)
    variants = [(v, *parse_variant(v)) for v in args.variants]
    models = {kind: build(args.size, kind) for kind in dict.fromkeys(k for _, k, _, _ in variants)}
    thresholds = {}
    info = {}
    for variant, kind, sparsity, fused in variants:
        model = models[kind]
        if kind != "mlx":
            apply(model, sparsity, fused, thresholds)
        record_stats(model, True)
        cache, y = start(model)
        for _ in range(16):
            y = step(model, cache, y)
        mx.eval(y)
        got = achieved_sparsity(model)
        record_stats(model, False)
        achieved = got[0] if got else 0.0
        nbytes = weight_bytes(model, achieved) + kv_bytes(model, PROMPT_TOKENS + args.steps // 2)
        info[variant] = dict(achieved=achieved, bytes=nbytes)
        time_round(model, 8)  # warm-up
    # Rounds interleave the variants: the host's speed drifts over minutes, and every variant is
    # host-bound, so each round compares them under the same conditions.
    rounds = {v: [] for v, *_ in variants}
    for _ in range(args.rounds):
        for variant, kind, sparsity, fused in variants:
            if kind != "mlx":
                apply(models[kind], sparsity, fused, thresholds)
            rounds[variant].append(time_round(models[kind], args.steps))
    del models
    mx.clear_cache()
    rows = []
    for variant, kind, sparsity, fused in variants:
        t = {k: statistics.median(r[k] for r in rounds[variant]) for k in rounds[variant][0]}
        row = dict(size=args.size, variant=variant, **info[variant], **t, bound=info[variant]["bytes"] / bw,
                   build_ms=1e3 * t["build"], encode_ms=1e3 * t["encode"], tok_s=1 / t["step"],
                   fused_blocks=fused)
        if args.ncu:
            sums = kernels_under_ncu(args.ncu, args.size, variant)
            row.update(kernels=sums["kernels"], gpu_ms=sums["total"] / 1e3,
                       gpu_by_kind_ms={k: sums[k] / 1e3 for k in ("projections", "lm_head", "attention", "rest")})
        rows.append(row)
        print(rows[-1], flush=True)
    print(f"\n{'variant':>8} {'achieved':>8} {'step ms':>8} {'tok/s':>7} {'build ms':>8} {'encode ms':>9} "
          f"{'wait ms':>8} {'MB/token':>9} {'bound ms':>8} {'kernels':>7} {'GPU ms':>7}")
    for r in rows:
        print(f"{r['variant']:>8} {r['achieved']:>8.2f} {1e3 * r['step']:>8.2f} {1 / r['step']:>7.1f} "
              f"{r['build_ms']:>8.2f} {r['encode_ms']:>9.2f} {1e3 * r['wait']:>8.2f} "
              f"{r['bytes'] / 1e6:>9.0f} {1e3 * r['bound']:>8.2f} {r.get('kernels', '-'):>7} "
              f"{r.get('gpu_ms', float('nan')):>7.2f}")
    if args.json:
        import datetime

        main_rows = [r for r in rows if "/" not in r["variant"]]
        record = dict(device=mx.device_info().get("device_name", ""), date=datetime.date.today().isoformat(),
                      copy_bandwidth_gbs=bw / 1e9, rows=main_rows,
                      comparison_rows=[r for r in rows if "/" in r["variant"]])
        Path(args.json).write_text(json.dumps(record, indent=1))
    return rows


if __name__ == "__main__":
    main()
