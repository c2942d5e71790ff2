"""Batched decode, as mlx_lm.server runs it: mlx-lm's 4-bit model against the zigzag model, both
driven by mlx-lm's own `BatchGenerator` (issue 16).

    python benchmarks/batched_decode_cuda.py [--sizes 8b 70b] [--batches 1 2 4 8] [--json out.json]

Models are built as in decode_cuda.py (random weights, 4-bit group 64, quantized block by block);
ours runs with fused decoder blocks, as spqt-generate does, with thresholds calibrated (uniform) for
each target sparsity. For a batch of B sequences, B random prompts of `--prompt` tokens are
inserted and each sequence decodes `--tokens` tokens (no stop tokens); decode tok/s is
BatchGenerator's own count of generated tokens over its generation time, summed over the batch.
Each figure is the median of three runs after a warm-up one; where both models fit in memory (all
but the 70B shape) each of our runs is followed by one of the baseline's, and the ratio is against
those. Writes rows `size, model, batch, sparsity, decode_tps` (plus the interleaved baseline's).
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import BatchGenerator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cuda import BASELINE, LABELS, SIZES, baseline_quantize, load_model, write_results, zigzag_quantize  # noqa: E402

import spqt_mlx.calibrate as calibrate  # noqa: E402
from spqt_mlx.patch import fuse_blocks, set_thresholds  # noqa: E402


def batch_speed(model, prompts, tokens):
    """(decode tok/s, prompt tok/s) of one BatchGenerator run over ``prompts``."""
    gen = BatchGenerator(model, stop_tokens=[], max_tokens=tokens, completion_batch_size=len(prompts),
                         prefill_batch_size=len(prompts))
    gen.insert(prompts, [tokens] * len(prompts))
    with gen.stats() as stats:
        while gen.next_generated():
            pass
    gen.close()
    return stats.generation_tps, stats.prompt_tps


def median_speeds(models, prompts, tokens, repeats=3):
    """For each model, the median decode tok/s of ``repeats`` runs (after one warm-up run each),
    the models' runs interleaved so that host drift affects them alike."""
    for m in models:
        batch_speed(m, prompts, min(tokens, 8))
    runs = [[] for _ in models]
    for _ in range(repeats):
        for i, m in enumerate(models):
            runs[i].append(batch_speed(m, prompts, tokens)[0])
    return [sorted(r)[len(r) // 2] for r in runs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["8b"], choices=sorted(SIZES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--prompt", type=int, default=128, help="tokens per prompt")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per sequence")
    p.add_argument("--json")
    args = p.parse_args(argv)

    rows = []
    for size in args.sizes:
        vocab = 128256
        calib = mx.random.randint(0, vocab, (256,), key=mx.random.key(2))
        prompts = {b: mx.random.randint(0, vocab, (b, args.prompt), key=mx.random.key(10 + b)).tolist()
                   for b in args.batches}
        baseline, _ = load_model(size, baseline_quantize)
        interleave = size != "70b"
        if not interleave:
            for b in args.batches:
                (tps,) = median_speeds([baseline], prompts[b], args.tokens)
                rows.append(dict(size=size, label=LABELS[size], model=BASELINE, batch=b, sparsity=0.0, decode_tps=tps))
                print(rows[-1], flush=True)
            del baseline
            baseline = None
            mx.clear_cache()
        model, _ = load_model(size, zigzag_quantize)
        fuse_blocks(model)
        base_runs = {b: [] for b in args.batches}
        for s in args.sparsities:
            set_thresholds(model, calibrate.calibrate(model, calib, s, progress=False) if s else 0.0)
            for b in args.batches:
                row = dict(size=size, label=LABELS[size], model="zigzag 4-bit", batch=b, sparsity=s)
                if interleave:
                    tps, base = median_speeds([model, baseline], prompts[b], args.tokens)
                    row.update(decode_tps=tps, baseline_decode_tps=base)
                    base_runs[b].append(base)
                else:
                    (tps,) = median_speeds([model], prompts[b], args.tokens)
                    row.update(decode_tps=tps)
                rows.append(row)
                print(rows[-1], flush=True)
        if interleave:
            for b in args.batches:
                runs = sorted(base_runs[b])
                rows.append(dict(size=size, label=LABELS[size], model=BASELINE, batch=b, sparsity=0.0,
                                 decode_tps=runs[len(runs) // 2]))
        del model, baseline
        mx.clear_cache()

    def vs(row):
        base = row.get("baseline_decode_tps") or next(
            r["decode_tps"] for r in rows if r["size"] == row["size"] and r["model"] == BASELINE and r["batch"] == row["batch"])
        return row["decode_tps"] / base

    print(f"\n{'size':>4} {'model':<34} {'batch':>5} {'sparsity':>8} {'decode tok/s':>12} {'vs mlx-lm':>9}")
    for r in sorted(rows, key=lambda r: (r["size"], r["batch"], r["model"] != BASELINE, r["sparsity"])):
        print(f"{r['size']:>4} {r['model']:<34} {r['batch']:>5} {r['sparsity']:>8.2f} {r['decode_tps']:>12.1f} {vs(r):>9.2f}")
    if args.json:
        write_results(args.json, rows)


if __name__ == "__main__":
    main()
