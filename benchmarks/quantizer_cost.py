"""What each zigzag quantizer costs: seconds to quantize a model, and GPTQ's per-layer cost.

For a model (a short name such as ``smollm2``, a directory or a GGUF), each quantizer patches a fresh
copy: ``gptq`` first collects its input statistics on calibration text (timed apart). Then GPTQ
alone on weights of the given shapes (random weights, the statistics of correlated random inputs),
which is how its cost grows to larger models: one graph per column of input, each as wide as the
weight has rows, and one factorization of H per layer. With ``--layers``, that many weights of each
shape are walked together, as a model's layers of one shape are, in batches of at most
``--batch-mb``.

    python benchmarks/quantizer_cost.py --model smollm2 --calibration-text emma.txt \\
        --shapes 4096x4096 14336x4096 4096x14336 --layers 8 --batch-mb 128 4096 --json quantizer_cost.json
"""

import argparse
import datetime
import json
import time

import mlx.core as mx
import numpy as np

from spqt_mlx import zigzag_quantize
from spqt_mlx.gptq import BATCH_BYTES, error_weights, gptq_quantize_many, input_hessians
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


def shape_rows(shapes, dtype, layers=1, batch_mbs=(None,)) -> list[dict]:
    """Per shape: ``search`` on one weight; GPTQ's error weights (the factorization of H, NumPy on
    the CPU) for one H; and GPTQ on ``layers`` weights of that shape walked together in batches of
    at most each of ``batch_mbs`` MB (None: the library's default). ``seconds`` is per layer."""
    rows = []
    rng = np.random.default_rng(0)
    for shape in shapes:
        N, K = (int(v) for v in shape.split("x"))
        ws = [(mx.random.normal((N, K), key=mx.random.key(N + K + i)) * 0.02).astype(dtype) for i in range(layers)]
        mx.eval(ws)
        X = rng.standard_normal((2048, K)).astype(np.float32) @ (rng.standard_normal((K, K)).astype(np.float32)
                                                                  / np.sqrt(K))
        H = X.T.astype(np.float64) @ X / len(X)
        t = time.perf_counter()
        q = zigzag_quantize(ws[0], 64, 4, quantizer="search")
        mx.eval(q.weight, q.scales, q.biases)
        rows.append({"shape": shape, "quantizer": "search", "layers": 1, "seconds": time.perf_counter() - t})
        t = time.perf_counter()
        error_weights(H)
        rows.append({"shape": shape, "quantizer": "gptq: error weights (H's factorization)", "layers": 1,
                     "seconds": time.perf_counter() - t})
        for mb in batch_mbs:
            t = time.perf_counter()
            out = gptq_quantize_many(ws, [H] * layers, 64, 4, batch_bytes=None if mb is None else mb << 20)
            mx.eval([r[1:] for r in out])
            total = time.perf_counter() - t
            rows.append({"shape": shape, "quantizer": "gptq", "layers": layers,
                         "batch_mb": (BATCH_BYTES[mx.default_device().type] >> 20) if mb is None else mb, "seconds": total / layers})
        for r in rows[-2 - len(batch_mbs):]:
            print(f"{shape} {r['quantizer']}: {r['seconds']:.2f} s per layer"
                  + (f" ({r['layers']} layers, batches <= {r['batch_mb']} MB)" if "batch_mb" in r else ""), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default=None)
    p.add_argument("--quantizers", nargs="+", choices=QUANTIZERS, default=list(QUANTIZERS))
    p.add_argument("--calibration-text", default=None)
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--shapes", nargs="*", default=[], help="NxK weights to time GPTQ on, e.g. 14336x4096")
    p.add_argument("--layers", type=int, default=1, help="weights of each shape that GPTQ walks together")
    p.add_argument("--batch-mb", type=int, nargs="+", default=None,
                   help="GPTQ's batch limits to time (MB); default the library's")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    device = mx.device_info().get("device_name", "") or str(mx.default_device())
    result = {"device": device, "date": datetime.date.today().isoformat(),
              "models": model_rows(args) if args.model else [],
              "shapes": shape_rows(args.shapes, mx.float16, args.layers, args.batch_mb or [None])}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
