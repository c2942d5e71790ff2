"""Decode speed of tensor-parallel models: mlx-lm's 4-bit model against the zigzag model, both
sharded with ``model.shard(group)`` over the processes of ``mlx.launch`` (issue 14).

    python benchmarks/decode_sharded.py --sizes 8b 70b --json single.json     # one process: the scaling base
    mlx.launch -n 2 --backend nccl python benchmarks/decode_sharded.py --sizes 8b 70b --json sharded.json
    python benchmarks/decode_sharded.py --merge single.json sharded.json --json decode_sharded.json

Models are built as in decode_cuda.py (random weights, the same on every rank, quantized block by
block), calibrated for the target sparsity on the whole model (identically on every rank), then
sharded. Rank 0 writes rows ``size, model, processes, sparsity, decode_tps, prefill_tps``, and with
several processes ``collectives``: the time of one ``all_sum`` of a token's hidden state in a chain
of them, as a sharded decode step runs two per block. ``--merge`` joins such files (one per
process count, from one machine) into one and prints the scaling table.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cuda import (BASELINE, SIZES, baseline_quantize, decode_speed, load_model, write_results,  # noqa: E402
                         zigzag_quantize)

import spqt_mlx.calibrate as calibrate  # noqa: E402
from spqt_mlx.patch import fuse_shared_inputs, set_thresholds  # noqa: E402
from spqt_mlx.patch.sharded import make_shardable  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", choices=sorted(SIZES), nargs="+", default=["8b"])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--json")
    p.add_argument("--merge", nargs="+", metavar="FILE", help="join these results files instead of measuring")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)

    group = mx.distributed.init()
    n = group.size()
    prompt = mx.random.randint(0, 128256, (128,), key=mx.random.key(1))
    calib = mx.random.randint(0, 128256, (256,), key=mx.random.key(2))
    rows, collectives = [], []

    def record(size, model_name, sparsity, model):
        mx.eval(mx.distributed.all_sum(mx.array(1.0)))  # start together
        pre, dec = decode_speed(model, prompt, args.tokens)
        rows.append(dict(size=size, model=model_name, processes=n, sparsity=sparsity, prefill_tps=pre,
                         decode_tps=dec))
        if group.rank() == 0:
            print(rows[-1], flush=True)
            if args.json:
                write_results(args.json, rows, collectives=collectives)  # a run cut short keeps its rows

    for size in args.sizes:
        if n > 1:
            collectives.append(dict(size=size, processes=n, all_sum_us=all_sum_us(SIZES[size]["hidden_size"], group)))
            if group.rank() == 0:
                print(collectives[-1], flush=True)
        model, _ = load_model(size, baseline_quantize)
        if n > 1:
            model.shard(group)
            mx.eval(model.parameters())
        record(size, BASELINE, 0.0, model)
        del model
        mx.clear_cache()

        model, _ = load_model(size, zigzag_quantize)
        thresholds = {s: calibrate.calibrate(model, calib, s, progress=False) if s else 0.0 for s in args.sparsities}
        if n > 1:
            make_shardable(model)  # load_model patched block by block: the model itself was not seen
            model.shard(group)
            mx.eval(model.parameters())
        fuse_shared_inputs(model)
        for s in args.sparsities:
            set_thresholds(model, thresholds[s])
            record(size, "zigzag 4-bit", s, model)

        del model
        mx.clear_cache()


def all_sum_us(hidden, group, chain=160, repeats=5):
    """µs per ``all_sum`` of one token's fp16 hidden state, in a chain where each waits for the
    previous one (as a decode step's do), less the same chain's other work; best of ``repeats``."""
    def best(reduce):
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            x = mx.ones((1, 1, hidden), dtype=mx.float16)
            mx.eval(x)
            t0 = time.perf_counter()
            for _ in range(chain):
                x = (reduce(x) if reduce else x) * 0.5
            mx.eval(x)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    return 1e6 * (best(lambda x: mx.distributed.all_sum(x, group=group)) - best(None)) / chain


def merge(paths, out):
    """Join results files of one machine and print decode tokens/s by process count."""
    files = [json.loads(Path(path).read_text()) for path in paths]
    rows = [row for f in files for row in f["rows"]]
    collectives = [c for f in files for c in f.get("collectives", [])]
    for c in collectives:
        print(f"{c['size']}: one all_sum of a token's hidden state over {c['processes']} processes: "
              f"{c['all_sum_us']:.0f} us")
    tps = {(r["size"], r["model"], r["sparsity"], r["processes"]): r["decode_tps"] for r in rows}
    base = {(r["size"], r["processes"]): r["decode_tps"] for r in rows if r["model"] == BASELINE}
    print("size  model                              sparsity  procs  tok/s  vs 1 proc  vs mlx-lm")
    for (size, model, sparsity, n), t in tps.items():
        one = tps.get((size, model, sparsity, 1))
        print(f"{size:5s} {model:34s} {sparsity:8.2f} {n:6d} {t:6.1f} {t / one if one else float('nan'):9.2f}x "
              f"{t / base[size, n] if (size, n) in base else float('nan'):8.2f}x")
    if out:
        gpus = max(r["processes"] for r in rows)  # one GPU per process
        device = files[0]["device"] if gpus == 1 else f"{gpus}x {files[0]['device']} (one host)"
        with open(out, "w") as f:
            json.dump(dict(device=device, date=files[0]["date"], rows=rows, collectives=collectives), f, indent=1)


if __name__ == "__main__":
    main()
