"""Weight error of each quantizer on a real model's projections: zigzag "minmax" (as mx.quantize, per
zigzag group), zigzag "search" (spqt_mlx.layout.QUANTIZERS) and MLX's own row-wise affine quantization
(what nn.QuantizedLinear holds), at the same bits and group size.

    python benchmarks/quantizer_error.py [--model smollm2] [--bits 4] [--group-size 64] [--json out.json]

Reports, over all attention and MLP projections, the relative Frobenius error ||W_q - W|| / ||W||
(float64 sums) and the seconds each quantizer took. Runs on any backend; the default model is the
offline one (spqt_mlx.assets).
"""

import argparse
import datetime
import json
import platform
import time

import mlx.core as mx
import numpy as np

from spqt_mlx.layout import QUANTIZERS, zigzag_dequantize, zigzag_quantize
from spqt_mlx.patch import projections
from spqt_mlx.sources import load_source


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--json")
    args = p.parse_args(argv)
    net, _, _ = load_source(args.model, dtype=args.dtype, progress=False)
    modules = dict(net.named_modules())
    paths = projections(net)
    sq = {name: 0.0 for name in (*QUANTIZERS, "mx.quantize")}
    seconds = dict.fromkeys(sq, 0.0)
    total = 0.0
    for path in paths:
        w = modules[path].weight
        mx.eval(w)
        w64 = np.array(w.astype(mx.float32), dtype=np.float64)
        total += float(np.sum(w64 ** 2))
        for name in sq:
            t = time.perf_counter()
            if name == "mx.quantize":
                wq, s, b = mx.quantize(w, group_size=args.group_size, bits=args.bits)
                deq = mx.dequantize(wq, s, b, group_size=args.group_size, bits=args.bits)
            else:
                deq = zigzag_dequantize(zigzag_quantize(w, args.group_size, args.bits, quantizer=name))
            mx.eval(deq)
            seconds[name] += time.perf_counter() - t
            sq[name] += float(np.sum((np.array(deq.astype(mx.float32), dtype=np.float64) - w64) ** 2))
    rows = [dict(quantizer=name, layout="row-wise" if name == "mx.quantize" else "zigzag",
                 relative_error=(sq[name] / total) ** 0.5, seconds=seconds[name]) for name in sq]
    print(f"{args.model}: {len(paths)} projections, {args.bits}-bit, group size {args.group_size}, {args.dtype}")
    print("| quantizer | relative weight error | seconds |\n|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} {r['quantizer']} | {r['relative_error']:.4f} | {r['seconds']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=f"{platform.machine()} CPU" if mx.default_device() == mx.cpu else str(mx.default_device()),
                           date=datetime.date.today().isoformat(), model=args.model, bits=args.bits,
                           group_size=args.group_size, dtype=args.dtype, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
