"""End-to-end decode speed: mlx-lm's own 4-bit model against the zigzag-patched model at several
sparsities, on random-weight Llama-architecture models (issue 6, speed part).

    python benchmarks/decode_cuda.py [--sizes 8b 1b] [--tokens 128] [--json out.json]

For each size: one random fp16 Llama model; mlx-lm's `nn.quantize` (4-bit, group 64) as the
baseline; the same float weights patched to zigzag 4-bit, group 64, with thresholds calibrated
(uniform, TEAL-style) on random prompts for each target sparsity. Decode tokens/s over `--tokens`
generated tokens after a 128-token prompt and a full warm-up generation; prefill tokens/s from the
prompt; each figure is the median of three generations. Random weights are fine for speed; the
activations' statistics are what the thresholds are calibrated on.
"""

import argparse
import copy
import json
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.models import llama

import spqt_mlx.calibrate as calibrate
from spqt_mlx.patch import achieved_sparsity, patch_model, record_stats, set_thresholds

SIZES = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8),
}
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.6, 0.7]


def random_model(size):
    args = llama.ModelArgs(model_type="llama", rms_norm_eps=1e-5, vocab_size=128256, rope_theta=500000.0,
                           tie_word_embeddings=False, **SIZES[size])
    mx.random.seed(0)
    model = llama.Model(args)
    model.set_dtype(mx.float16)
    mx.eval(model.parameters())
    return model


def decode_speed(model, prompt, tokens, repeats=3):
    """Median (prefill tokens/s, decode tokens/s) of `repeats` greedy generations, after a warm-up
    one. Decode is host-bound, so single runs vary by tens of percent."""
    def run():
        times = []
        t0 = time.perf_counter()
        for _ in generate_step(prompt, model, max_tokens=tokens):
            times.append(time.perf_counter())
        return t0, times

    run()
    runs = [run() for _ in range(repeats)]
    prefill = sorted(len(prompt) / (times[0] - t0) for t0, times in runs)
    decode = sorted((len(times) - 1) / (times[-1] - times[0]) for _, times in runs)
    return prefill[len(runs) // 2], decode[len(runs) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["8b", "1b"], choices=sorted(SIZES))
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    prompt = mx.random.randint(0, 128256, (128,), key=mx.random.key(1))
    calib = mx.random.randint(0, 128256, (256,), key=mx.random.key(2))
    for size in args.sizes:
        model = random_model(size)
        baseline = copy.deepcopy(model)
        nn.quantize(baseline, group_size=64, bits=4)
        mx.eval(baseline.parameters())
        pre, dec = decode_speed(baseline, prompt, args.tokens)
        rows.append(dict(size=size, model="mlx-lm 4-bit (nn.QuantizedLinear)", sparsity=0.0, prefill_tps=pre,
                         decode_tps=dec, achieved=0.0))
        print(rows[-1], flush=True)
        del baseline
        patch_model(model, group_size=64, bits=4)
        mx.eval(model.parameters())
        for s in SPARSITIES:
            set_thresholds(model, calibrate.calibrate(model, calib, s, progress=False) if s else 0.0)
            record_stats(model, True)
            decode_speed(model, prompt[:16], 8, repeats=1)
            got = achieved_sparsity(model)
            record_stats(model, False)
            pre, dec = decode_speed(model, prompt, args.tokens)
            rows.append(dict(size=size, model="zigzag 4-bit", sparsity=s, prefill_tps=pre, decode_tps=dec,
                             achieved=got[0] if got else 0.0))
            print(rows[-1], flush=True)
        del model
        mx.clear_cache()
    print(f"\n{'size':>4} {'model':<36} {'target':>6} {'achieved':>8} {'prefill tok/s':>13} {'decode tok/s':>12} {'vs mlx-lm':>9}")
    for r in rows:
        base = next(b["decode_tps"] for b in rows if b["size"] == r["size"] and b["model"].startswith("mlx"))
        print(f"{r['size']:>4} {r['model']:<36} {r['sparsity']:>6.2f} {r['achieved']:>8.2f} {r['prefill_tps']:>13.0f} "
              f"{r['decode_tps']:>12.1f} {r['decode_tps'] / base:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=mx.device_info().get("device_name", ""), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
