"""End-to-end decode speed: mlx-lm's own 4-bit model against the zigzag-patched model at several
sparsities (issue 6, speed part).

    python benchmarks/decode_cuda.py [--sizes 70b 8b 1b smollm2] [--text book.txt] [--json out.json]

Models: random-weight fp16 Llama models of the Llama-3-70B, Llama-3-8B and Llama-3.2-1B shapes,
built and quantized block by block (peak memory: the quantized model plus one fp16 block, so the
70B shape fits one 80 GB GPU), and SmolLM2-135M-Instruct with its real weights (from the cached
GGUF, see spqt_mlx.assets).
Baseline: mlx-lm's `nn.quantize` (4-bit, group 64; embeddings and lm_head included). Ours: the same
float weights with the attention and MLP projections zigzag-quantized (4-bit, group 64) and the
embeddings and lm_head quantized exactly as the baseline's, so the two differ only in the
projections. "zigzag 4-bit" decodes through the fused decoder blocks (patch/blocks.py), as
spqt-generate does; "(stacked)" runs every product per projection with q/k/v and gate/up stacked,
"(unstacked)" every projection alone; "(wina)" decodes fused under WINA's criterion (--wina). Thresholds are calibrated (uniform, TEAL-style) for each
target sparsity on 256 tokens:
of `--text` if given (also the prompt's source), else random tokens. Decode tokens/s over
`--tokens` generated tokens after a 128-token prompt and a full warm-up generation; prefill
tokens/s from the prompt; each figure is the median of three generations. Where both models fit in
memory (all but the 70B shape), each of our generations is followed by one of the baseline's, and
a row's ratio is against those: the host's speed drifts over minutes, and decode is host-bound.
"""

import argparse
import copy
import datetime
import json
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step
from mlx_lm.models import llama

import spqt_mlx.calibrate as calibrate
from spqt_mlx.patch import (ZigzagLinear, achieved_sparsity, fuse_blocks, fuse_shared_inputs, patch_model,
                             record_stats, set_criterion, set_thresholds)

SIZES = {
    "70b": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                num_key_value_heads=8),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
               num_key_value_heads=8),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8),
}
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.6, 0.7]
UNSTACKED = [0.0, 0.5]  # also measured with every projection run alone
STACKED = [0.0, 0.5]  # also measured per projection with q/k/v and gate/up stacked, blocks not fused
LABELS = {"70b": "Llama-3-70B arch (random)", "8b": "Llama-3-8B arch (random)", "1b": "Llama-3.2-1B-sized (random)", "smollm2": "SmolLM2-135M (real)"}


BASELINE = "mlx-lm 4-bit (nn.QuantizedLinear)"


def write_results(path, rows, **more):
    """The benchmarks' results file: the device, today's date, the rows and any ``more`` entries."""
    with open(path, "w") as f:
        json.dump(dict(device=mx.device_info().get("device_name", ""), date=datetime.date.today().isoformat(),
                       rows=rows, **more), f, indent=1)


def baseline_quantize(module):
    nn.quantize(module, group_size=64, bits=4)


def zigzag_quantize(module):
    patch_model(module, group_size=64, bits=4)


def load_model(size, quantize_blocks):
    """(model, tokenizer or None) for a benchmark size, its blocks quantized by ``quantize_blocks``
    and its embeddings and lm_head as mlx-lm's 4-bit model has them."""
    if size == "smollm2":
        from mlx_lm import load

        from spqt_mlx.assets import default_model_dir

        model, tokenizer = load(str(default_model_dir(dtype="float16")))
    else:
        model, tokenizer = random_model(size), None
    for block in model.layers:
        quantize_blocks(block)
        mx.eval(block.parameters())  # one float block at a time
    quantize_rest(model)
    mx.eval(model.parameters())
    return model, tokenizer


def quantize_rest(model, group_size=64, bits=4):
    """Quantize what the blocks leave in float (embeddings, lm_head) as mlx-lm's baseline does."""
    def predicate(path, module):
        return hasattr(module, "to_quantized") and not isinstance(module, ZigzagLinear) and \
            not path.startswith("model.layers.") and module.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)


def random_model(size):
    """A random fp16 Llama of ``size`` whose parameters stay lazy until its blocks are quantized."""
    args = llama.ModelArgs(model_type="llama", rms_norm_eps=1e-5, vocab_size=128256, rope_theta=500000.0,
                           tie_word_embeddings=False, **SIZES[size])
    mx.random.seed(0)
    model = llama.Model(args)
    model.set_dtype(mx.float16)
    return model


def decode_speed(model, prompt, tokens, repeats=3, baseline=None, record=None):
    """Median (prefill tokens/s, decode tokens/s) of `repeats` greedy generations, after a warm-up
    one. Decode is host-bound, so single runs vary by tens of percent, and the host's speed drifts
    over minutes: with ``baseline`` (another model) each generation is followed by one of the
    baseline's, and its median (prefill, decode) tokens/s come back too, from the same minutes.
    ``record`` (a dict) gets each generation's decode tokens/s, in order."""
    def run(m):
        times = []
        t0 = time.perf_counter()
        for _ in generate_step(prompt, m, max_tokens=tokens):
            times.append(time.perf_counter())
        return t0, times

    def medians(runs):
        prefill = sorted(len(prompt) / (times[0] - t0) for t0, times in runs)
        decode = sorted((len(times) - 1) / (times[-1] - times[0]) for _, times in runs)
        return prefill[len(runs) // 2], decode[len(runs) // 2]

    models = [model] if baseline is None else [model, baseline]
    for m in models:
        run(m)
    runs = [[] for _ in models]
    for _ in range(repeats):
        for i, m in enumerate(models):
            runs[i].append(run(m))
    if record is not None:
        for key, model_runs in zip(("decode_tps_runs", "baseline_decode_tps_runs"), runs):
            record[key] = [(len(times) - 1) / (times[-1] - times[0]) for _, times in model_runs]
    out = medians(runs[0])
    return out if baseline is None else (*out, *medians(runs[1]))


def ratio(row, rows):
    """Decode tokens/s against mlx-lm's: the baseline generations interleaved with this row's where
    they were, else the baseline's own row."""
    if row["model"].startswith("mlx"):
        return 1.0
    base = row.get("baseline_decode_tps")
    if base is None:
        base = next(b for b in rows if b["size"] == row["size"] and b["model"].startswith("mlx"))["decode_tps"]
    return row["decode_tps"] / base


def markdown(rows):
    """The BENCHMARKS.md table of decode runs (rows of one or more --json files)."""
    out = ["| model | variant | target sparsity | achieved | prefill tok/s | decode tok/s | decode vs mlx-lm 4-bit |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        variant = "mlx-lm 4-bit" if r["model"].startswith("mlx") else r["model"]
        out.append(f"| {r.get('label', r['size'])} | {variant} | {r['sparsity']:.2f} | {r['achieved']:.2f} | "
                   f"{r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | {ratio(r, rows):.2f}× |")
    return "\n".join(out)


def plot(rows, path):
    """Decode tokens/s against target sparsity, one panel per model, mlx-lm's 4-bit model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        base = next(r for r in rows if r["size"] == size and r["model"].startswith("mlx"))
        mine = [r for r in rows if r["size"] == size and not r["model"].startswith("mlx")]
        for name in dict.fromkeys(r["model"] for r in mine):
            pts = [r for r in mine if r["model"] == name]
            ax.plot([r["sparsity"] for r in pts], [r["decode_tps"] for r in pts], marker="o", label=name)
        ax.axhline(base["decode_tps"], linestyle="--", color="C3", label="mlx-lm 4-bit")
        ax.set_title(base.get("label", size), fontsize=9)
        ax.set_xlabel("target activation sparsity")
        ax.set_ylim(0, 1.25 * max(r["decode_tps"] for r in [base, *mine]))
    axes[0][0].set_ylabel("decode tokens/s")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", nargs="+", metavar="JSON", help="print the table of these results (runs nothing)")
    p.add_argument("--plot", help="with --markdown: also plot them into this PNG")
    p.add_argument("--sizes", nargs="+", default=["8b", "1b"], choices=[*SIZES, "smollm2"])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="generations per variant (the median is reported)")
    p.add_argument("--sparsities", type=float, nargs="+", default=SPARSITIES)
    p.add_argument("--unstacked", type=float, nargs="*", default=UNSTACKED,
                   help="sparsities also measured with every projection run alone")
    p.add_argument("--stacked", type=float, nargs="*", default=STACKED,
                   help="sparsities also measured per projection with q/k/v and gate/up stacked (blocks not fused)")
    p.add_argument("--wina", type=float, nargs="*", default=[],
                   help="sparsities also measured under WINA's criterion (fused blocks; set_criterion)")
    p.add_argument("--text", help="UTF-8 text: prompt and calibration tokens for models with a tokenizer")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.markdown:
        rows = [r for path in args.markdown for r in json.load(open(path))["rows"]]
        print(markdown(rows))
        if args.plot:
            plot(rows, args.plot)
        return rows
    rows = []
    for size in args.sizes:
        # The baseline and ours are built one after the other from the same random weights.
        model, tokenizer = load_model(size, baseline_quantize)
        vocab = model.args.vocab_size
        if args.text and tokenizer is not None:
            with open(args.text, encoding="utf-8") as f:
                ids = tokenizer.encode(f.read()[:200_000], add_special_tokens=False)
            prompt, calib = mx.array(ids[:128]), mx.array(ids[5000:5256])
        else:
            prompt = mx.random.randint(0, vocab, (128,), key=mx.random.key(1))
            calib = mx.random.randint(0, vocab, (256,), key=mx.random.key(2))
        # Both models stay in memory where they fit (all but the 70B shape), so that each of our
        # generations runs next to one of the baseline's.
        interleave = size != "70b"
        if interleave:
            baseline = model
        else:
            pre, dec = decode_speed(model, prompt, args.tokens, args.repeats)
            rows.append(dict(size=size, label=LABELS[size], model=BASELINE, sparsity=0.0,
                             prefill_tps=pre, decode_tps=dec, achieved=0.0))
            print(rows[-1], flush=True)
            del model
            mx.clear_cache()
        model, _ = load_model(size, zigzag_quantize)
        # Each projection alone first (--unstacked), then q/k/v and gate/up stacked (--stacked), then
        # the fused decoder blocks, as spqt-generate runs.
        fuse_blocks(model, enabled=False)
        base_runs = []
        for mode, sparsities in (("unstacked", args.unstacked), ("stacked", args.stacked), ("fused", args.sparsities),
                                 ("wina", args.wina)):
            if mode == "stacked":
                fuse_shared_inputs(model)
            if mode == "fused":
                fuse_blocks(model)
            if mode == "wina" and sparsities:
                set_criterion(model, "wina")
            for s in sparsities:
                set_thresholds(model, calibrate.calibrate(model, calib, s, progress=False) if s else 0.0)
                record_stats(model, True)
                decode_speed(model, prompt[:16], 8, repeats=1)
                got = achieved_sparsity(model)
                record_stats(model, False)
                row = dict(size=size, label=LABELS[size], model="zigzag 4-bit" + ("" if mode == "fused" else f" ({mode})"),
                           sparsity=s, achieved=got[0] if got else 0.0)
                if interleave:
                    pre, dec, base_pre, base_dec = decode_speed(model, prompt, args.tokens, args.repeats,
                                                                baseline=baseline, record=row)
                    row.update(baseline_prefill_tps=base_pre, baseline_decode_tps=base_dec)
                    base_runs.append((base_pre, base_dec))
                else:
                    pre, dec = decode_speed(model, prompt, args.tokens, args.repeats, record=row)
                rows.append(dict(row, prefill_tps=pre, decode_tps=dec))
                print(rows[-1], flush=True)
        if interleave:
            # The baseline's row: the median of its medians over all of our variants' windows.
            pre = sorted(p for p, _ in base_runs)[len(base_runs) // 2]
            dec = sorted(d for _, d in base_runs)[len(base_runs) // 2]
            rows.insert(len(rows) - len(base_runs), dict(
                size=size, label=LABELS[size], model=BASELINE, sparsity=0.0,
                prefill_tps=pre, decode_tps=dec, achieved=0.0))
            del baseline
        del model
        mx.clear_cache()
    print(f"\n{'size':>4} {'model':<36} {'target':>6} {'achieved':>8} {'prefill tok/s':>13} {'decode tok/s':>12} {'vs mlx-lm':>9}")
    for r in rows:
        print(f"{r['size']:>4} {r['model']:<36} {r['sparsity']:>6.2f} {r['achieved']:>8.2f} {r['prefill_tps']:>13.0f} "
              f"{r['decode_tps']:>12.1f} {ratio(r, rows):>9.2f}")
    if args.json:
        write_results(args.json, rows)


if __name__ == "__main__":
    main()
