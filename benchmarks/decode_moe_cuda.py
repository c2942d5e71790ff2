"""Mixture-of-experts decode: mlx-lm's own 4-bit Qwen3-30B-A3B-shaped model against the zigzag-patched
model (attention and experts zigzag, routers exact) at sparsity 0 and 50 % (issue 18).

    python benchmarks/decode_moe_cuda.py [--tokens 128] [--sparsities 0 0.5] [--products] [--json out.json]
    python benchmarks/decode_moe_cuda.py --markdown out.json [--plot out.png]   (table and plot of a run)

Model: random fp16 weights of the Qwen3-30B-A3B shape (48 blocks, hidden 2048, 32 query and 4 key/value
heads of 128, 128 experts of 768 rows, 8 per token, vocabulary 151936), built block by block and
quantized as it goes. Baseline: mlx-lm's ``nn.quantize`` (4-bit, group 64; the experts as
QuantizedSwitchLinear through ``mx.gather_qmm``, the routers as mlx-lm's recipe leaves them, 4-bit).
Ours: the same float weights, attention projections and experts zigzag-quantized (4-bit, group 64),
routers, embeddings and lm_head quantized exactly as the baseline's. Thresholds are calibrated
(uniform) on 256 random tokens. Each of our generations runs next to one of the baseline's (both
models fit one GPU); figures are medians of three generations after a warm-up one
(decode_cuda.decode_speed).

Also, the experts' products alone, as a decode step chains them (``--products``): a token's gate,
up and down products over its 8 experts, 100 tokens chained, ours dense and at 50 % against
``mx.gather_qmm`` on mlx-lm's layout, in microseconds per product.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3_moe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_cuda import decode_speed, write_results  # noqa: E402

import spqt_mlx  # noqa: E402
import spqt_mlx.calibrate as calibrate  # noqa: E402
from spqt_mlx.patch import achieved_sparsity, patch_model, record_stats, set_thresholds  # noqa: E402
from spqt_mlx.patch.model import ZIGZAG_TYPES  # noqa: E402

SHAPE = dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, intermediate_size=6144,
             num_attention_heads=32, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, vocab_size=151936,
             num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
             moe_intermediate_size=768, rope_theta=1e6, tie_word_embeddings=False, max_position_embeddings=40960,
             norm_topk_prob=True)
LABEL = "Qwen3-30B-A3B arch (random)"
BASELINE = "mlx-lm 4-bit (QuantizedSwitchLinear)"


def build(ours: bool):
    """The model of SHAPE with seeded random fp16 weights, quantized block by block: by mlx-lm's
    ``nn.quantize``, or (``ours``) with attention and experts zigzag-patched."""
    mx.random.seed(0)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs(**SHAPE))
    model.set_dtype(mx.float16)
    for block in model.layers:
        if ours:
            patch_model(block, group_size=64, bits=4)
        rest = (lambda p, m: hasattr(m, "to_quantized") and not isinstance(m, ZIGZAG_TYPES))
        nn.quantize(block, group_size=64, bits=4, class_predicate=rest)
        mx.eval(block.parameters())  # one float block at a time
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and not isinstance(m, ZIGZAG_TYPES))
    mx.eval(model.parameters())
    return model


def products(repeats=100):
    """Microseconds per expert product of one token (8 experts), chained as decode runs them."""
    E, k, hidden, inner = SHAPE["num_experts"], SHAPE["num_experts_per_tok"], SHAPE["hidden_size"], \
        SHAPE["moe_intermediate_size"]
    rows = []
    for name, (N, K) in (("gate/up", (inner, hidden)), ("down", (hidden, inner))):
        w = (mx.random.normal((E, N, K)) * K ** -0.5).astype(mx.float16)
        mlx_q = mx.quantize(w, group_size=64, bits=4)
        zz = spqt_mlx.zigzag_quantize(w, 64, 4)
        # gate/up: one token's input, shared by its experts; down: one input per expert.
        x = mx.random.normal((1, 1, K) if name == "gate/up" else (k, 1, K)).astype(mx.float16)
        median = mx.sort(mx.abs(x.astype(mx.float32)).reshape(-1))[x.size // 2]
        mx.eval(w, *mlx_q, zz.weight, zz.scales, zz.biases, x, median)
        t = mx.full((E,), median.item(), dtype=mx.float32)
        ids = mx.random.randint(0, E, (repeats, k)).astype(mx.int32)

        def chain(product):
            # Each call depends on the previous one's output (0 times it), as decode's do.
            y, feed = None, x
            for i in range(repeats):
                if y is not None:
                    feed = x + 0 * y.reshape(-1)[0]
                y = product(feed, ids[i])
            return y

        def theirs(xi, idx):
            return mx.gather_qmm(xi, *mlx_q, rhs_indices=idx.astype(mx.uint32), transpose=True, group_size=64, bits=4)

        def ours(threshold):
            return lambda xi, idx: spqt_mlx.zigzag_gather_gemv(xi.reshape(-1, K), zz, idx, threshold=threshold)

        for label, product in ((BASELINE, theirs), ("zigzag 4-bit", ours(None)), ("zigzag 4-bit, 50 %", ours(t))):
            mx.eval(chain(product))
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                mx.eval(chain(product))
                times.append((time.perf_counter() - t0) / repeats * 1e6)
            rows.append(dict(product=name, shape=f"{k} x ({N}, {K})", model=label, us=sorted(times)[2]))
            print(rows[-1], flush=True)
    return rows


def markdown(results):
    """The BENCHMARKS.md tables of a run: decode against mlx-lm's interleaved generations, and the
    products alone."""
    rows = results["rows"]
    out = ["| model | target sparsity | achieved | prefill tok/s | decode tok/s | decode vs mlx-lm 4-bit |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        base = r.get("baseline_decode_tps", rows[0]["decode_tps"])
        out.append(f"| {r['model']} | {r['sparsity']:.2f} | {r['achieved']:.2f} | {r['prefill_tps']:.0f} | "
                   f"{r['decode_tps']:.1f} | {r['decode_tps'] / base:.2f}× |")
    if results.get("products"):
        out += ["", "| product | shape | model | µs per product |", "|---|---|---|---|"]
        out += [f"| {r['product']} | {r['shape']} | {r['model']} | {r['us']:.1f} |" for r in results["products"]]
    return "\n".join(out)


def plot(results, path):
    """Decode tokens/s of each row, mlx-lm's 4-bit model first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    labels = [("mlx-lm 4-bit" if r["model"].startswith("mlx") else f"zigzag, {r['sparsity']:.0%}") for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(labels, [r["decode_tps"] for r in rows], color=["C3"] + ["C0"] * (len(rows) - 1))
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{LABEL}, {results['device']}, {results['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", metavar="JSON", help="print the tables of this run's results (runs nothing)")
    p.add_argument("--plot", help="with --markdown: also plot them into this PNG")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--products", action="store_true", help="also time the experts' products alone")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.markdown:
        results = json.load(open(args.markdown))
        print(markdown(results))
        if args.plot:
            plot(results, args.plot)
        return results
    baseline = build(ours=False)
    model = build(ours=True)
    vocab = SHAPE["vocab_size"]
    prompt = mx.random.randint(0, vocab, (128,), key=mx.random.key(1))
    calib = mx.random.randint(0, vocab, (256,), key=mx.random.key(2))
    rows, base_runs = [], []
    for s in args.sparsities:
        set_thresholds(model, calibrate.calibrate(model, calib, s, progress=False) if s else 0.0)
        record_stats(model, True)
        decode_speed(model, prompt[:16], 8, repeats=1)
        got = achieved_sparsity(model)
        record_stats(model, False)
        pre, dec, base_pre, base_dec = decode_speed(model, prompt, args.tokens, baseline=baseline)
        base_runs.append((base_pre, base_dec))
        rows.append(dict(size="30b-a3b", label=LABEL, model="zigzag 4-bit", sparsity=s, achieved=got[0] if got else 0.0,
                         prefill_tps=pre, decode_tps=dec, baseline_prefill_tps=base_pre, baseline_decode_tps=base_dec))
        print(rows[-1], flush=True)
    pre = sorted(p for p, _ in base_runs)[len(base_runs) // 2]
    dec = sorted(d for _, d in base_runs)[len(base_runs) // 2]
    rows.insert(0, dict(size="30b-a3b", label=LABEL, model=BASELINE, sparsity=0.0, achieved=0.0,
                        prefill_tps=pre, decode_tps=dec))
    del model, baseline
    mx.clear_cache()
    product_rows = products() if args.products else []
    print(f"\n{'model':<38} {'target':>6} {'achieved':>8} {'prefill tok/s':>13} {'decode tok/s':>12} {'vs mlx-lm':>9}")
    for r in rows:
        base = r.get("baseline_decode_tps", rows[0]["decode_tps"])
        print(f"{r['model']:<38} {r['sparsity']:>6.2f} {r['achieved']:>8.2f} {r['prefill_tps']:>13.0f} "
              f"{r['decode_tps']:>12.1f} {r['decode_tps'] / base:>9.2f}")
    for r in product_rows:
        print(f"{r['product']:<8} {r['shape']:<18} {r['model']:<38} {r['us']:>8.1f} us")
    if args.json:
        write_results(args.json, rows, products=product_rows)


if __name__ == "__main__":
    main()
