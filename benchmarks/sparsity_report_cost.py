"""What reporting the achieved sparsity costs a generation.

Two ways to learn the sparsity a generation reached: count active columns in every projection
while decoding (``patch.record_stats``), or replay the decoded tokens once afterwards
(``perplexity.decoded_sparsity``, what spqt-generate does). Both run alternately on one patched,
fused model; the table gives decode tokens per second and the sparsity each reports.

    python benchmarks/sparsity_report_cost.py --model smollm2 --calibration-text emma.txt
"""

import argparse
import statistics
import time

from mlx_lm import stream_generate

from spqt_mlx.calibrate import sparsify
from spqt_mlx.patch import achieved_sparsity, fuse_shared_inputs, patch_model, record_stats
from spqt_mlx.perplexity import decoded_sparsity
from spqt_mlx.sources import load_source
from spqt_mlx.texts import calibration_tokens


def timed(model, tokenizer, prompt, max_tokens, count):
    """(decode tok/s, (sparsity, steps), seconds the report took) of one generation."""
    if count:
        record_stats(model)
    t = time.perf_counter()
    tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)]
    rate = len(tokens) / (time.perf_counter() - t)
    t = time.perf_counter()
    if count:
        result = achieved_sparsity(model)
        record_stats(model, False)
    else:
        result = decoded_sparsity(model, prompt, tokens)
    return rate, result, time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--dtype", default=None)
    p.add_argument("--calibration-text", required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    model, tokenizer, _ = load_source(args.model, dtype=args.dtype, progress=False)
    patch_model(model, group_size=64, bits=4, quantizer="search")
    cal, _ = calibration_tokens(model, tokenizer, text_file=args.calibration_text, n_tokens=2048, progress=False)
    sparsify(model, cal, args.sparsity, progress=False)
    fuse_shared_inputs(model)
    prompt = tokenizer.encode("It is a truth universally acknowledged that")
    for count in (False, True):  # warm-up
        timed(model, tokenizer, prompt, 16, count)
    runs = {True: [], False: []}
    for _ in range(args.repeats):
        for count in (True, False):
            runs[count].append(timed(model, tokenizer, prompt, args.tokens, count))
    print(f"{args.model}, {args.sparsity:.0%} target, {args.tokens} tokens, median of {args.repeats}")
    print("| report | decode tok/s | achieved sparsity (steps) | report time |")
    print("|---|---|---|---|")
    for count, name in ((True, "counting while decoding"), (False, "replayed after generation")):
        rate = statistics.median(r[0] for r in runs[count])
        sparsity, steps = runs[count][-1][1]
        print(f"| {name} | {rate:.1f} | {sparsity:.2%} ({steps}) | {1e3 * runs[count][-1][2]:.0f} ms |")


if __name__ == "__main__":
    main()
