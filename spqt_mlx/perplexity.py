"""Perplexity of SpQt models at several sparsities, offline.

    spqt-perplexity --model ./SmolLM2-135M-Instruct-mlx --text book.txt --sparsity 0 0.25 0.5

Two protocols (never compare numbers across them):

* ``nonoverlap`` (GPTQ/Wanda style): the text is cut into windows of ``--window`` tokens; every
  token after the first of each window is scored.
* ``sliding``: windows of ``--window`` tokens advance by ``--stride``; each window scores only the
  tokens no earlier window scored, so every token after the first window sees at least
  ``window - stride`` tokens of context. Absolute values come out lower.

Sparse rows threshold the projection inputs of *every* token, exactly as the single-token decode
kernels do (an input the layer's criterion puts at or below its threshold is skipped), computed in
batched form. ``--mode decode`` instead
feeds tokens one at a time through the real sparse kernels (slow; for validation).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm.auto import tqdm

from . import _cli
from .calibrate import METHODS, check_budget, choose_sparsity, describe_choice, sparsify
from .files import atomic_write_text
from .layout import DEFAULT_QUANTIZER, DTYPES, dtype_from_name
from .patch.linear import DEFAULT_CRITERION, check_criterion
from .sources import load_source
from .texts import calibration_tokens, leading_token, read_text, text_tokens, with_leading

PROTOCOLS = ("nonoverlap", "sliding")
DEFAULT_SPARSITIES = (0.0, 0.25, 0.4, 0.5)
MODES = ("masked", "decode")


# ---- sparse evaluation of whole sequences -------------------------------------------------------


class ThresholdedInput(nn.Module):
    """Wraps a zigzag layer (ZigzagLinear or ZigzagSwitchLinear): zeroes the inputs its decode
    kernel would skip, for any number of tokens, and counts how many it zeroed."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self._sparse = layer.threshold > 0
        self._skipped = mx.array(0, dtype=mx.int64)
        self._seen = 0

    def __call__(self, x, *args, **kwargs):
        if self._sparse:
            keep = self.layer.active_mask(x)
            self._skipped = self._skipped + (keep.size - keep.sum())
            x = mx.where(keep, x, mx.zeros_like(x))
        self._seen += x.size
        return self.layer(x, *args, **kwargs)

    def skipped_fraction(self) -> float:
        return float(self._skipped.item()) / self._seen if self._seen else 0.0


class _Wrapped:
    def __init__(self, wrappers):
        self.wrappers = wrappers

    def counters(self) -> list[mx.array]:
        return [w._skipped for w in self.wrappers]

    def achieved(self) -> float:
        """Fraction of weight columns skipped, averaged over layers weighted by their sizes."""
        sizes = [w.layer.input_dims * w.layer.output_dims * w.layer.rows_per_token for w in self.wrappers]
        total = sum(sizes)
        return sum(s * w.skipped_fraction() for s, w in zip(sizes, self.wrappers)) / total if total else 0.0


@contextlib.contextmanager
def thresholded_inputs(model):
    """Within the block, every zigzag layer of ``model`` sparsifies all tokens, not only single
    ones. Yields an object whose ``achieved()`` is the sparsity reached so far."""
    from mlx.utils import tree_map

    from .patch.model import ZIGZAG_TYPES

    originals = model.leaf_modules()
    wrappers = []

    def wrap(module):
        if isinstance(module, ZIGZAG_TYPES):
            wrappers.append(ThresholdedInput(module))
            return wrappers[-1]
        return module

    model.update_modules(tree_map(wrap, originals, is_leaf=nn.Module.is_module))
    try:
        yield _Wrapped(wrappers)
    finally:
        model.update_modules(originals)


def decoded_sparsity(model, prompt, generated) -> tuple[float, int] | None:
    """``(sparsity, steps)`` that the decode steps of a finished generation reached, or None
    when ``model`` skips nothing.

    mlx-lm prefills all of ``prompt`` but its last token, then decodes one token per step: the
    prompt's last token and every ``generated`` token. The same prefill into a cache, then the
    decoded tokens in one thresholded call, sees the active sets the decode kernels saw, so
    generation itself runs without counting anything. Layers are weighted by size, as
    ``patch.achieved_sparsity`` weighs them.
    """
    from mlx_lm.models.cache import make_prompt_cache

    from .calibrate import _token_batch
    from .patch import zigzag_layers

    if not any(layer.threshold > 0 for layer in zigzag_layers(model).values()):
        return None
    ids = [int(t) for t in prompt] + [int(t) for t in generated]
    if len(ids) >= 2:
        _token_batch(ids, model)  # ids outside the vocabulary: a clear error, not a silent lookup
    prefill = max(len(prompt) - 1, 0)
    if len(ids) == prefill:
        return None
    cache = make_prompt_cache(model)
    step = 2048  # tokens per call, as mlx-lm prefills, so memory stays bounded
    for start in range(0, prefill, step):
        model(mx.array(ids[start:min(start + step, prefill)])[None], cache=cache)
        mx.eval([c.state for c in cache])
    with thresholded_inputs(model) as wrapped:
        for start in range(prefill, len(ids), step):
            mx.eval(model(mx.array(ids[start:start + step])[None], cache=cache)[:, -1], wrapped.counters(),
                    [c.state for c in cache])
        return wrapped.achieved(), len(ids) - prefill


# ---- windows and losses -------------------------------------------------------------------------


def check_protocol(protocol: str, window: int, stride: int | None = None, mode: str = "masked") -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer of at least 2 tokens, got {window!r}.")
    if protocol == "sliding" and stride is not None and not 1 <= stride <= window - 1:
        raise ValueError(f"stride must be in [1, window - 1] = [1, {window - 1}], got {stride}.")
    if protocol == "nonoverlap" and stride is not None:
        raise ValueError("stride applies only to the sliding protocol.")


def windows(n_tokens: int, window: int, protocol: str, stride: int | None = None):
    """``(start, end, first_scored)`` triples: run tokens[start:end] and score the predictions of
    tokens[first_scored:end]."""
    check_protocol(protocol, window, stride)
    if n_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score, got {n_tokens}.")
    out = []
    if protocol == "nonoverlap":
        for start in range(0, n_tokens, window):
            end = min(start + window, n_tokens)
            if end - start >= 2:
                out.append((start, end, start + 1))
        return out
    stride = max(window // 2, 1) if stride is None else stride
    scored_to, start = 1, 0
    while scored_to < n_tokens:
        end = min(start + window, n_tokens)
        out.append((start, end, scored_to))
        scored_to, start = end, start + stride
        if end == n_tokens:
            break
    return out


def _window_losses(model, ids: mx.array, first: int) -> mx.array:
    logits = model(ids[None, :-1])[0].astype(mx.float32)
    losses = nn.losses.cross_entropy(logits, ids[1:], reduction="none")
    return losses[first - 1 :]


def _decode_losses(model, ids: mx.array, first: int) -> mx.array:
    # One token at a time through the model's own single-token (sparse) path.
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    losses = []
    for i in range(ids.size - 1):
        logits = model(ids[None, i : i + 1], cache=cache)[0, -1].astype(mx.float32)
        if i + 1 >= first:
            losses.append(nn.losses.cross_entropy(logits, ids[i + 1], reduction="none"))
        mx.eval(losses[-1] if losses else logits)
    return mx.stack(losses)


def token_losses(model, tokens, *, window: int = 512, protocol: str = "nonoverlap", stride: int | None = None,
                 mode: str = "masked", bos: int | None = None, also_eval=list, progress: bool = True) -> np.ndarray:
    """Negative log-likelihood of every scored token (natural log), in text order.

    ``bos`` (``texts.leading_token``) goes in front of every window that does not start with
    it, unscored: the window's tokens are scored as without it, now with the start a model like
    Gemma expects.
    ``also_eval()`` returns arrays to evaluate with each window's losses (e.g. counters), so no
    window's activations stay alive in a lazy graph.
    """
    check_protocol(protocol, window, stride, mode)
    ids = np.asarray(tokens, dtype=np.int32)
    out = []
    step = _decode_losses if mode == "decode" else _window_losses
    spans = list(windows(ids.size, window, protocol, stride))
    for start, end, first in tqdm(spans, desc="perplexity windows", unit="window", disable=not progress, leave=False):
        span = with_leading(ids[start:end], bos)
        losses = step(model, mx.array(span), first - start + len(span) - (end - start))
        mx.eval(losses, also_eval())
        out.append(np.array(losses))
    return np.concatenate(out)


def perplexity(model, tokens, *, window: int = 512, protocol: str = "nonoverlap", stride: int | None = None,
               mode: str = "masked", bos: int | None = None, sparse_prefill: bool = True,
               progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``tokens``: ``{"perplexity", "stderr", "tokens", "achieved_sparsity"}``.

    ``bos`` starts every window (see ``token_losses``).
    With ``sparse_prefill`` (and ``mode="masked"``) zigzag layers sparsify every token as decode
    does; otherwise multi-token calls run dense, as mlx-lm's prefill does.
    """
    from .patch import zigzag_layers

    kwargs = dict(window=window, protocol=protocol, stride=stride, mode=mode, bos=bos, progress=progress)
    achieved = None
    if sparse_prefill and mode == "masked" and zigzag_layers(model):
        with thresholded_inputs(model) as wrapped:
            losses = token_losses(model, tokens, **kwargs, also_eval=wrapped.counters)
            achieved = wrapped.achieved()
    else:
        losses = token_losses(model, tokens, **kwargs)
    mean = float(losses.mean())
    ppl = math.exp(mean)
    stderr = ppl * float(losses.std(ddof=1)) / math.sqrt(losses.size) if losses.size > 1 else float("nan")
    return {"perplexity": ppl, "stderr": stderr, "tokens": int(losses.size), "achieved_sparsity": achieved}


def describe_protocol(protocol: str, window: int, stride: int | None, mode: str, bos: int | None = None) -> str:
    if protocol == "nonoverlap":
        text = f"non-overlapping windows of {window} tokens, all but the first token of each window scored"
    else:
        stride = window // 2 if stride is None else stride
        text = (f"sliding windows of {window} tokens, stride {stride}; each token scored once, "
                f"with at least {window - stride} tokens of context after the first window")
    text += "; no BOS" if bos is None else f"; each window after the tokenizer's BOS (id {bos}), not scored"
    if mode == "decode":
        text += "; tokens decoded one at a time through the sparse kernels"
    else:
        text += "; sparse rows threshold every token's projection inputs, as single-token decode does"
    return text


# ---- the comparison -----------------------------------------------------------------------------


def _mlx_quantized_baseline(model_path, dtype, bits, group_size, layer_paths):
    net, _, _ = load_source(model_path, dtype=dtype)
    chosen = set(layer_paths)

    def predicate(path, module):
        return path in chosen and isinstance(module, nn.Linear) and module.weight.shape[1] % group_size == 0

    nn.quantize(net, group_size=group_size, bits=bits, class_predicate=predicate)
    return net


def evaluate(
    model: str,
    text_file,
    *,
    sparsities=None,
    methods=("uniform",),
    criteria=(DEFAULT_CRITERION,),
    calibration_text=None,
    calibration_tokens_count: int = 512,
    window: int = 512,
    stride: int | None = None,
    protocol: str = "nonoverlap",
    max_tokens: int | None = None,
    bits: int = 4,
    quantizer: str = DEFAULT_QUANTIZER,
    group_size: int = 64,
    dtype: str | None = None,
    baselines: bool = False,
    auto: float | None = None,
    mode: str = "masked",
    seed: int = 0,
    log=print,
) -> dict:
    """Perplexity of ``model`` on ``text_file`` per sparsity, criterion and calibration method.

    ``model`` is anything ``spqt-convert`` takes, or a saved SpQt directory: that one is scored
    as saved, and re-calibrated for each of ``sparsities`` if given. For other models
    ``sparsities`` defaults to ``DEFAULT_SPARSITIES``. ``auto`` (a perplexity budget in percent)
    adds a row at the sparsity ``--sparsity auto`` picks within it, as spqt-generate and
    spqt-convert choose it (uniform thresholds, the default criterion, on the calibration tokens).
    Returns a dict with the device, date, protocol and rows.
    """
    from . import checkpoint
    from .layout import check_bits_group_size, check_quantizer
    from .patch import choose_quantizer, patch_model

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {m!r}.")
    for c in criteria:
        check_criterion(c)
    if auto is not None:
        check_budget(auto)
    is_spqt = Path(model).is_dir() and checkpoint.is_spqt_checkpoint(model)
    if sparsities is None:
        sparsities = () if is_spqt else DEFAULT_SPARSITIES
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {s}.")
    check_protocol(protocol, window, stride, mode)
    if protocol == "sliding" and stride is None:
        stride = max(window // 2, 1)
    if not is_spqt:
        check_bits_group_size(group_size, bits)
        check_quantizer(quantizer, tool=True)
    text = read_text(text_file)
    if is_spqt:
        if baselines:
            raise ValueError("baselines need the float source model; give that instead of an SpQt checkpoint.")
        net, tokenizer = checkpoint.load(model)
        section = checkpoint.read_spqt_config(model)["spqt"]
        bits, group_size = section["bits"], section["group_size"]
        quantizer = section.get("quantizer", "minmax")  # checkpoints before the option were min/max
        if dtype is not None:
            net.set_dtype(dtype_from_name(dtype))
    else:
        net, tokenizer, _ = load_source(model, dtype=dtype)
        quantizer, why = choose_quantizer(net, quantizer)
        if why:
            log(why)
    tokens = text_tokens(tokenizer, text, max_tokens)
    if len(tokens) < 2:
        raise ValueError(f"{text_file} has fewer than 2 tokens.")
    run = dict(window=window, protocol=protocol, stride=stride, mode=mode, bos=leading_token(tokenizer))
    rows = []
    label = f"spqt {bits}-bit g{group_size} {quantizer}"

    def add(name, method, target, result, seconds, criterion="-"):
        rows.append({"model": name, "method": method, "criterion": criterion, "target_sparsity": target, **result,
                     "seconds": seconds})
        r = rows[-1]
        achieved = "-" if r["achieved_sparsity"] is None else f"{r['achieved_sparsity']:.3f}"
        target_s = "-" if target is None else f"{target:.2f}"
        log(f"  {name:<18} {criterion:<9} {method:<8} {target_s:>6} {achieved:>8} {r['perplexity']:>11.3f}  "
            f"({seconds:.1f} s)")

    log(f"Perplexity of {model} on {Path(text_file).name}: {len(tokens)} tokens")
    log(f"Protocol: {describe_protocol(protocol, window, stride, mode, run['bos'])}")
    needs_calibration = any(s > 0 for s in sparsities) or auto is not None or (quantizer == "gptq" and not is_spqt)
    if needs_calibration:
        cal_tokens, described = calibration_tokens(
            net, tokenizer, text_file=calibration_text, n_tokens=calibration_tokens_count, seed=seed
        )
        log(f"Thresholds{' and gptq' if quantizer == 'gptq' and not is_spqt else ''} calibrated on {described}")
    else:
        cal_tokens, described = [], None
    log(f"  {'model':<18} {'criterion':<9} {'method':<8} {'target':>6} {'achieved':>8} {'perplexity':>11}")

    if is_spqt:
        t = time.perf_counter()
        add(f"{label} (saved)", section.get("method") or "-", section.get("sparsity"),
            perplexity(net, tokens, **run), time.perf_counter() - t, section.get("criterion", "teal"))
    if baselines:
        t = time.perf_counter()
        add("float", "-", None, perplexity(net, tokens, **run), time.perf_counter() - t)
    if not is_spqt:
        hessians = None
        if quantizer == "gptq":
            from .gptq import input_hessians

            hessians = input_hessians(net, cal_tokens, bos=run["bos"])
        layers = patch_model(net, group_size=group_size, bits=bits, quantizer=quantizer, hessians=hessians)
        if not layers:
            raise ValueError(f"no projection of {model} can be zigzag-quantized with group size {group_size}.")
        if baselines:
            t = time.perf_counter()
            base = _mlx_quantized_baseline(model, dtype, bits, group_size, layers)
            add(f"mlx {bits}-bit g{group_size}", "-", None, perplexity(base, tokens, **run), time.perf_counter() - t)
            del base

    for s in sorted(set(sparsities)):
        for criterion in (("-",) if s == 0 else criteria):
            for method in (("-",) if s == 0 else methods):
                t = time.perf_counter()
                sparsify(net, cal_tokens, s, "uniform" if method == "-" else method,
                         criterion=None if criterion == "-" else criterion, bos=run["bos"])
                add(label, method, s, perplexity(net, tokens, **run), time.perf_counter() - t, criterion)
    if auto is not None:
        t = time.perf_counter()
        chosen, _, tried = choose_sparsity(net, cal_tokens, max_increase=auto, criterion=DEFAULT_CRITERION,
                                           bos=run["bos"])
        log(f"  {describe_choice(chosen, tried, auto, described)}")
        add(label, "auto", chosen, perplexity(net, tokens, **run), time.perf_counter() - t, DEFAULT_CRITERION)

    return {
        "device": mx.device_info().get("device_name", "") or str(mx.default_device()),
        "date": datetime.date.today().isoformat(),
        "model": str(model),
        "text": Path(text_file).name,
        "tokens": len(tokens),
        "protocol": {"name": protocol, "window": window, "stride": stride if protocol == "sliding" else None,
                     "mode": mode, "bos": run["bos"],
                     "description": describe_protocol(protocol, window, stride, mode, run["bos"])},
        "calibration": described,
        "rows": rows,
    }


def plot(results: dict, path) -> None:
    """Perplexity against target sparsity, one line per calibration method, baselines dashed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'spqt-mlx[plot]'") from e

    rows = results["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    dense = [r for r in rows if r["target_sparsity"] == 0 and r["method"] != "auto"]
    # One line per criterion and method (rows of older files have no criterion: TEAL's).
    lines = sorted({(r.get("criterion", "teal"), r["method"]) for r in rows
                    if r["target_sparsity"] not in (None, 0) and r["method"] != "auto"})
    for criterion, method in lines or [("-", "-")]:
        pts = dense + [r for r in rows if (r.get("criterion", "teal"), r["method"]) == (criterion, method)
                       and r["target_sparsity"]]
        pts.sort(key=lambda r: r["target_sparsity"])
        ax.plot([r["target_sparsity"] for r in pts], [r["perplexity"] for r in pts], marker="o",
                label=f"{pts[0]['model'] if pts else 'spqt'} ({criterion}, {method})")
    for r in rows:
        if r["method"] == "auto":
            ax.plot([r["target_sparsity"]], [r["perplexity"]], marker="*", markersize=12, linestyle="none",
                    color="black", label=f"sparsity auto ({r['target_sparsity']:.0%})")
        elif r["target_sparsity"] is None:
            ax.axhline(r["perplexity"], linestyle="--", linewidth=1, label=r["model"], color="gray" if r["model"] == "float" else "C3")
    ax.set_xlabel("target activation sparsity")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{Path(results['model']).name} on {results['text']} ({results['protocol']['name']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spqt-perplexity", description="Perplexity of SpQt models at several sparsities.")
    p.add_argument("--model", required=True, help="model directory, Hugging Face repo id, .gguf file, SpQt checkpoint, "
                   "or a short name (smollm2, gemma3)")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--sparsity", type=float, nargs="+",
                   help="target sparsities (default 0 0.25 0.4 0.5; for an SpQt checkpoint: only as saved)")
    p.add_argument("--method", nargs="+", choices=METHODS, default=["uniform"], help="calibration methods")
    _cli.add_criterion_argument(p, several=True)
    p.add_argument("--calibration-text", help="text to calibrate on (default: self-generated text)")
    p.add_argument("--calibration-tokens", type=int, default=512)
    p.add_argument("--protocol", choices=PROTOCOLS, default="nonoverlap")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, help="sliding protocol: tokens the window advances (default window/2)")
    p.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    _cli.add_quantizer_argument(p)
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--mode", choices=MODES, default="masked",
                   help="masked: batched windows with thresholded inputs (default); decode: one token at a time")
    p.add_argument("--baselines", action="store_true", help="add the float model and MLX's own quantization")
    p.add_argument("--auto", type=float, metavar="P",
                   help="add a row at the sparsity that --sparsity auto picks within a perplexity budget of P percent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="write a plot (PNG) here")
    p.add_argument("--json", help="write the results here")
    return p


def run(argv=None) -> dict:
    """The work of ``spqt-perplexity``: parse ``argv``, evaluate, write what was asked and return the results."""
    args = build_parser().parse_args(argv)
    results = evaluate(
        args.model, args.text, sparsities=args.sparsity, methods=args.method, criteria=args.criterion,
        calibration_text=args.calibration_text,
        calibration_tokens_count=args.calibration_tokens, window=args.window, stride=args.stride,
        protocol=args.protocol, max_tokens=args.max_tokens, bits=args.bits, group_size=args.group_size,
        quantizer=args.quantizer,
        dtype=args.dtype, baselines=args.baselines, auto=args.auto, mode=args.mode, seed=args.seed,
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    return results


def main(argv=None) -> None:
    """``spqt-perplexity``: exit status 0 on success, 2 with a one-line message on an expected error."""
    _cli.run("spqt-perplexity", run, argv)


if __name__ == "__main__":
    main()
