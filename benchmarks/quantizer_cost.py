"""What each zigzag quantizer costs: seconds to quantize a model, and GPTQ's per-layer cost.

For a model (a short name such as ``smollm2``, a directory or a GGUF), each quantizer patches a fresh
copy: ``gptq`` first collects its input statistics on calibration text (timed apart). Then GPTQ
alone on weights of the given shapes (random weights, the statistics of correlated random inputs),
which is how its cost grows to larger models: one graph per column of input, each as wide as the
weight has rows.

    python benchmarks/quantizer_cost.py --model smollm2 --calibration-text emma.txt \\
        --shapes 4096x4096 14336x4096 4096x14336 --json quantizer_cost.json
"""

import argparse
import datetime
import json
import time

import mlx.core as mx
import numpy as np

from spqt_mlx import zigzag_quantize
from spqt_mlx.gptq import input_hessians
from spqt_mlx.layout import QUANTIZERS
from spqt_mlx.patch import patch_model
from spqt_mlx.sources import load_source
from spqt_mlx.texts import calibration_tokens, leading_token


def model_rows(args) -> list[dict]:
    rows = []
    tokens = None
    for quantizer in args.quantizers:
        model, tokenizer, _ = load_source(args.model, dtype=args.dtype, progress=False)
        hessians, t_stats = None, 0.0
        if quantizer == "gptq":
            if tokens is None:
                tokens, _ = calibration_tokens(model, tokenizer, text_file=args.calibration_text,
                                               n_tokens=args.calibration_tokens, progress=False)
            t = time.perf_counter()
            hessians = input_hessians(model, tokens, bos=leading_token(tokenizer))
            t_stats = time.perf_counter() - t
        t = time.perf_counter()
        paths = patch_model(model, quantizer=quantizer, hessians=hessians)
        mx.eval(model.parameters())
        rows.append({"model": args.model, "quantizer": quantizer, "layers": len(paths),
                     "statistics_s": t_stats, "quantize_s": time.perf_counter() - t})
        print(f"{args.model} {quantizer}: {len(paths)} layers, statistics {t_stats:.1f} s, "
              f"quantize {rows[-1]['quantize_s']:.1f} s", flush=True)
    return rows


def shape_rows(shapes, dtype) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for shape in shapes:
        N, K = (int(v) for v in shape.split("x"))
        w = (mx.random.normal((N, K), key=mx.random.key(N + K)) * 0.02).astype(dtype)
        X = rng.standard_normal((2048, K)).astype(np.float32) @ (rng.standard_normal((K, K)).astype(np.float32)
                                                                  / np.sqrt(K))
        H = X.T.astype(np.float64) @ X / len(X)
        for quantizer in ("search", "gptq"):
            t = time.perf_counter()
            q = zigzag_quantize(w, 64, 4, quantizer=quantizer, hessian=H if quantizer == "gptq" else None)
            mx.eval(q.weight, q.scales, q.biases)
            rows.append({"shape": shape, "quantizer": quantizer, "seconds": time.perf_counter() - t})
            print(f"{shape} {quantizer}: {rows[-1]['seconds']:.2f} s", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantizers", nargs="+", choices=QUANTIZERS, default=list(QUANTIZERS))
    p.add_argument("--calibration-text", default=None)
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--shapes", nargs="*", default=[], help="NxK weights to time GPTQ on, e.g. 14336x4096")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = mx.device_info().get("device_name", "") or str(mx.default_device())
    result = {"device": device, "date": datetime.date.today().isoformat(),
              "models": model_rows(args) if args.model else [],
              "shapes": shape_rows(args.shapes, mx.float16)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
