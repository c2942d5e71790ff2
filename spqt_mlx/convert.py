"""Convert a model to SpQt: zigzag-quantize its projections, calibrate thresholds, save.

    spqt-convert --model ./SmolLM2-135M-Instruct-mlx --out ./smollm2-spqt --sparsity 0.5

``--model`` is a local mlx-lm or Hugging Face directory, a Hugging Face repo id, or a ``.gguf``
file. Without ``--calibration-text`` the thresholds are calibrated on text the model writes
itself from a few short prompts.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import _cli
from .gguf import DTYPES

CALIBRATION_METHODS = ("uniform", "greedy")

# Prompts for self-generated calibration text: varied registers, no third-party text needed.
CALIBRATION_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works, step by step.",
    "Describe a busy market in a coastal town on a summer morning.",
    "Write a Python function that checks whether a number is prime, and explain it.",
    "What are the main causes of inflation? Answer in a few paragraphs.",
    "Write a letter to a friend about a recent trip to the mountains.",
    "Summarize the rules of chess for a beginner.",
    "Give some advice for someone learning to cook at home.",
)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_dtype() -> str:
    """float32 on the CPU (half-precision quantized matmuls are very slow there), else float16."""
    return "float32" if mx.default_device() == mx.cpu else "float16"


def _check_dtype(dtype):
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")


def load_source(model: str, *, dtype: str | None = None):
    """Load ``model`` (directory, repo id or ``.gguf``) with mlx-lm.

    Returns ``(model, tokenizer, config)``. ``dtype`` casts the float parameters (a GGUF is
    dequantized straight to it, default ``default_dtype()``).
    """
    from mlx_lm.utils import load

    _check_dtype(dtype)
    path = Path(model).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; give a model directory, a repo id or a .gguf file.")
        from .gguf import gguf_to_mlx

        with tempfile.TemporaryDirectory(prefix="spqt-gguf-") as tmp:
            out = gguf_to_mlx(path, Path(tmp) / "model", dtype=dtype or default_dtype())
            model_, tokenizer, config = load(str(out), return_config=True)
        return model_, tokenizer, config
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; it is not a model directory.")
        local = path
    elif _REPO_ID.match(model):
        local = _snapshot(model)
    else:
        raise FileNotFoundError(f"{model!r} is neither a model directory, a .gguf file nor a Hugging Face repo id.")
    model_, tokenizer, config = load(str(local), return_config=True)
    if dtype is not None:
        model_.set_dtype(DTYPES[dtype])
        config["torch_dtype"] = dtype
    return model_, tokenizer, config


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all surface here
        raise FileNotFoundError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "give a local directory or a .gguf file instead."
        ) from e


def text_tokens(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of ``text`` (no BOS is added), cut to ``max_tokens``."""
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}.")
    if max_tokens:
        # Tokenize a generous prefix only (a token is rarely over 16 characters); the whole text
        # when that prefix falls short.
        ids = list(tokenizer.encode(text[: 16 * max_tokens + 64], add_special_tokens=False))
        if len(ids) > max_tokens or len(text) <= 16 * max_tokens + 64:
            return ids[:max_tokens]
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ids[:max_tokens] if max_tokens else ids


def read_text(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file {path} is empty.")
    return text


def self_generated_tokens(model, tokenizer, n_tokens: int, *, seed: int = 0, temperature: float = 0.8) -> list[int]:
    """About ``n_tokens`` tokens of text the model writes itself (prompts included).

    Used for calibration when no text is given: thresholds then follow the activations the model
    produces on its own kind of text.
    """
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}.")
    mx.random.seed(seed)
    sampler = make_sampler(temp=temperature)
    eos = set(getattr(tokenizer, "eos_token_ids", []) or [])
    tokens: list[int] = []
    prompts = iter(CALIBRATION_PROMPTS * (1 + n_tokens // 16))
    while len(tokens) < n_tokens:
        prompt = next(prompts)
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        else:
            ids = text_tokens(tokenizer, prompt + "\n")
        ids = list(ids)
        budget = max(n_tokens - len(tokens) - len(ids), 8)
        out = []
        for token, _ in generate_step(mx.array(ids), model, max_tokens=budget, sampler=sampler):
            token = int(token)
            out.append(token)
            if token in eos:
                break
        tokens.extend(ids + out)
    return tokens[:n_tokens]


def calibration_tokens(model, tokenizer, *, text_file=None, n_tokens: int = 512, seed: int = 0):
    """``(tokens, description)``: the first ``n_tokens`` of ``text_file``, else self-generated text."""
    if n_tokens <= 0:
        raise ValueError(f"calibration tokens must be positive, got {n_tokens}.")
    if text_file is not None:
        tokens = text_tokens(tokenizer, read_text(text_file), n_tokens)
        return tokens, f"{len(tokens)} tokens of {Path(text_file).name}"
    tokens = self_generated_tokens(model, tokenizer, n_tokens, seed=seed)
    return tokens, f"{len(tokens)} tokens of self-generated text"


def sparsify(model, tokens, sparsity: float, method: str) -> dict[str, float]:
    """Calibrate per-layer thresholds for ``sparsity`` on ``tokens`` and set them on the model."""
    from .calibrate import calibrate
    from .patch import set_thresholds, zigzag_layers

    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}.")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}.")
    if sparsity == 0.0:
        thresholds = {p: 0.0 for p in zigzag_layers(model)}
    else:
        thresholds = calibrate(model, mx.array(np.asarray(tokens, dtype=np.int32)), sparsity, method=method)
    set_thresholds(model, thresholds)
    return thresholds


def convert(
    model: str,
    out,
    *,
    bits: int = 4,
    group_size: int = 64,
    sparsity: float = 0.5,
    calibration_text=None,
    calibration_method: str = "uniform",
    calibration_tokens_count: int = 512,
    dtype: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> dict:
    """Convert, calibrate and save atomically. Returns a summary dict (also stored in config.json)."""
    from .checkpoint import save
    from .layout import check_bits_group_size
    from .patch import patch_model

    # Argument errors surface before any loading or calibration.
    check_bits_group_size(group_size, bits)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}.")
    if calibration_text is not None and not Path(calibration_text).is_file():
        raise FileNotFoundError(f"calibration text file not found: {calibration_text}")
    if calibration_method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {calibration_method!r}.")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it.")
    start = time.perf_counter()
    net, tokenizer, config = load_source(model, dtype=dtype)
    tokens, described = [], "none (sparsity 0)"
    if sparsity > 0:
        # Calibration text is generated by the unpatched model, before quantization.
        tokens, described = calibration_tokens(
            net, tokenizer, text_file=calibration_text, n_tokens=calibration_tokens_count, seed=seed
        )
    patched = patch_model(net, group_size=group_size, bits=bits)
    if not patched:
        raise ValueError(f"{model}: no projection could be zigzag-quantized with group size {group_size}.")
    thresholds = sparsify(net, tokens, sparsity, calibration_method)
    meta = {
        "bits": bits,
        "group_size": group_size,
        "thresholds": thresholds,
        "sparsity": sparsity,
        "method": calibration_method,
        "source": str(model),
        "calibration": described,
    }
    save(net, tokenizer, config, out, meta, overwrite=overwrite)
    values = np.array(list(thresholds.values()), dtype=np.float64)
    weights_bytes = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    return {
        "source": str(model),
        "out": str(out),
        "layers": len(patched),
        "bits": bits,
        "group_size": group_size,
        "sparsity": sparsity,
        "method": calibration_method,
        "calibration": described,
        "threshold_min": float(values.min()),
        "threshold_median": float(np.median(values)),
        "threshold_max": float(values.max()),
        "weights_mb": weights_bytes / 2**20,
        "seconds": time.perf_counter() - start,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="spqt-convert",
        description="Zigzag-quantize a model's projections, calibrate activation-sparsity thresholds, and save it.",
    )
    p.add_argument("--model", required=True, help="mlx-lm/Hugging Face directory, Hugging Face repo id, or .gguf file")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--bits", type=int, default=4, help="bits per weight (2, 3, 4, 5, 6, 8; default 4)")
    p.add_argument("--group-size", type=int, default=64, help="rows per quantization group (32, 64, 128; default 64)")
    p.add_argument("--sparsity", type=float, default=0.5, help="target activation sparsity in [0, 1) (default 0.5)")
    p.add_argument("--calibration-text", help="UTF-8 text file to calibrate on (default: self-generated text)")
    p.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="uniform")
    p.add_argument("--calibration-tokens", type=int, default=512, help="calibration tokens (default 512)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="float dtype of the model (default: source dtype; "
                   "for a .gguf float32 on the CPU, else float16)")
    p.add_argument("--seed", type=int, default=0, help="seed for self-generated calibration text")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", help="also write the summary to this JSON file")
    return p


def run(argv=None) -> dict:
    """The work of ``spqt-convert``: parse ``argv``, convert, print the summary and return it."""
    args = build_parser().parse_args(argv)
    summary = convert(
        args.model,
        args.out,
        bits=args.bits,
        group_size=args.group_size,
        sparsity=args.sparsity,
        calibration_text=args.calibration_text,
        calibration_method=args.calibration_method,
        calibration_tokens_count=args.calibration_tokens,
        dtype=args.dtype,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    print(f"Saved {summary['out']}")
    print(f"  source        {summary['source']}")
    print(f"  zigzag layers {summary['layers']} ({summary['bits']}-bit, group size {summary['group_size']})")
    print(f"  sparsity      {summary['sparsity']:.2f} ({summary['method']}), calibrated on {summary['calibration']}")
    print(
        f"  thresholds    min {summary['threshold_min']:.4g}, median {summary['threshold_median']:.4g},"
        f" max {summary['threshold_max']:.4g}"
    )
    print(f"  weights       {summary['weights_mb']:.1f} MB")
    print(f"  time          {summary['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> None:
    """``spqt-convert``: exit status 0 on success, 2 with a one-line message on an expected error."""
    _cli.run("spqt-convert", run, argv)


if __name__ == "__main__":
    main()
