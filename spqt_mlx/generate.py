"""``mlx_lm.generate`` with SpQt: every mlx-lm option plus ``--spqt`` and its settings.

``python -m spqt_mlx.generate`` and ``spqt-generate`` run mlx-lm's own generate CLI with two of its
module globals swapped for the run: ``setup_arg_parser`` (adds the SpQt options) and ``load``
(patches and calibrates the loaded model). The same swap is installed into ``mlx_lm.generate``
itself by the import hook that spqt-mlx ships, so ``mlx_lm.generate --spqt`` works as well.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from pathlib import Path

_MARK = "__spqt_hook__"
DEFAULT_SPARSITY = 0.5

# Short, generic openings for self-generated calibration text (spqt-mlx ships no corpus).


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the SpQt options to an ``mlx_lm.generate`` argument parser."""
    group = parser.add_argument_group("SpQt (dynamic activation sparsity)")
    group.add_argument(
        "--spqt",
        action="store_true",
        help="Run the attention and MLP projections as zigzag-quantized sparse layers.",
    )
    group.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help=f"Target fraction of skipped projection inputs per decoded token (default: {DEFAULT_SPARSITY}; a "
        "directory from spqt-convert keeps its calibrated thresholds unless this is given).",
    )
    group.add_argument(
        "--calibration-text",
        type=str,
        default=None,
        help="Text file to calibrate the thresholds on (default: text the model generates itself).",
    )
    group.add_argument(
        "--calibration-method",
        choices=("uniform", "greedy"),
        default="uniform",
        help="uniform: one sparsity for every projection; greedy: TEAL's per-block allocation.",
    )
    group.add_argument(
        "--calibration-tokens",
        type=int,
        default=256,
        help="Number of calibration tokens (default: 256).",
    )
    group.add_argument("--group-size", type=int, default=64, help="Zigzag group size: 32, 64 or 128 (default: 64).")
    group.add_argument("--bits", type=int, default=4, help="Zigzag bits: 2, 3, 4, 5, 6 or 8 (default: 4).")


def check_arguments(args: argparse.Namespace) -> None:
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must lie in [0, 1), got {args.sparsity}.")
    if args.calibration_tokens < 2:
        raise ValueError(f"--calibration-tokens must be at least 2, got {args.calibration_tokens}.")
    if args.calibration_text is not None and not Path(args.calibration_text).is_file():
        raise ValueError(f"--calibration-text: no such file: {args.calibration_text}")
    from .layout import check_bits_group_size

    check_bits_group_size(args.group_size, args.bits)


def _log(message: str) -> None:
    print(f"[spqt] {message}", file=sys.stderr, flush=True)


# ---- calibration data ----------------------------------------------------------------------------


def calibration_tokens(model, tokenizer, args) -> list[int]:
    if args.calibration_text is not None:
        from .convert import text_tokens  # tokenizes a prefix only, not a whole novel

        text = Path(args.calibration_text).read_text(encoding="utf-8")
        tokens = text_tokens(tokenizer, text, args.calibration_tokens)
        if len(tokens) < 2:
            raise ValueError(f"--calibration-text {args.calibration_text} holds fewer than 2 tokens.")
        return tokens
    from .convert import self_generated_tokens  # the one source of self-generated calibration text

    return self_generated_tokens(model, tokenizer, args.calibration_tokens)


# ---- model preparation ---------------------------------------------------------------------------


def _spqt_config(path_or_repo) -> dict | None:
    config = Path(path_or_repo) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("spqt")
    except (OSError, ValueError):
        return None


def _load_converted(path, *, return_config: bool = False, lazy: bool = False, **_):
    """Load a directory written by spqt-convert (its config has an ``spqt`` section).

    Returns what ``mlx_lm.load`` would; its tokenizer, adapter and model options do not apply.
    """
    try:
        checkpoint = importlib.import_module("spqt_mlx.checkpoint")
    except ImportError:
        checkpoint = None
    if checkpoint is None or not hasattr(checkpoint, "load"):
        raise ValueError(f"{path} holds an spqt-converted model, but this spqt-mlx cannot load those.")
    model, tokenizer = checkpoint.load(path, lazy=lazy)
    if return_config:
        return model, tokenizer, json.loads((Path(path) / "config.json").read_text())
    return model, tokenizer


def convert_and_calibrate(model, tokenizer, args) -> list[str]:
    """Patch ``model`` in memory and calibrate its thresholds for ``args.sparsity``."""
    from .patch import patch_model

    t0 = time.perf_counter()
    paths = patch_model(model, group_size=args.group_size, bits=args.bits)
    if not paths:
        raise ValueError("--spqt: the model has no attention or MLP projections that can be patched.")
    _log(f"{len(paths)} projections -> {args.bits}-bit zigzag (group size {args.group_size}) in {time.perf_counter() - t0:.1f} s")
    sparsity = DEFAULT_SPARSITY if args.sparsity is None else args.sparsity
    if sparsity > 0:
        recalibrate(model, tokenizer, args, sparsity)
    from .patch import fuse_shared_inputs

    groups = fuse_shared_inputs(model)
    _log(f"{groups} groups of projections that share an input run as one product each")
    return paths


def recalibrate(model, tokenizer, args, sparsity: float) -> None:
    """Calibrate the thresholds of a patched ``model`` for ``sparsity`` (0 turns sparsity off)."""
    from .calibrate import apply_thresholds, calibrate

    if sparsity == 0:
        apply_thresholds(model, 0.0)
        return
    t0 = time.perf_counter()
    tokens = calibration_tokens(model, tokenizer, args)
    source = args.calibration_text or "self-generated text"
    _log(f"calibrating {args.calibration_method} thresholds for {sparsity:.0%} sparsity on {len(tokens)} tokens of {source}")
    apply_thresholds(model, calibrate(model, tokens, sparsity, method=args.calibration_method))
    if getattr(args, "seed", None) is not None:
        import mlx.core as mx

        mx.random.seed(args.seed)  # sampling the calibration text used the global generator
    _log(f"calibrated in {time.perf_counter() - t0:.1f} s")


def report(model, elapsed: float | None = None, file=None) -> str:
    """Print and return one line on the sparsity achieved per token since ``record_stats``.

    With ``elapsed`` (seconds), the line also gives the overall rate of single-token steps.
    """
    from .patch import achieved_sparsity, zigzag_layers

    layers = len(zigzag_layers(model))
    result = achieved_sparsity(model)
    if result is None:
        line = f"SpQt: {layers} zigzag projections, all thresholds 0: no sparse steps"
    else:
        sparsity, calls = result
        line = (
            f"SpQt: {layers} sparse projections, achieved sparsity {sparsity:.1%} per token "
            f"(mean over {calls} single-token steps)"
        )
        if elapsed:
            line += f", {calls / elapsed:.1f} tokens-per-sec overall"
    print(line, file=file or sys.stdout, flush=True)
    return line


# ---- mlx_lm.generate hooks -----------------------------------------------------------------------


def install(namespace: dict):
    """Swap ``setup_arg_parser`` and ``load`` in ``namespace`` (mlx_lm.generate's globals).

    Without ``--spqt`` the wrapped functions behave exactly like mlx-lm's. Returns a function that
    restores the originals; installing twice is a no-op (its restore is too).
    """
    if getattr(namespace.get("setup_arg_parser"), _MARK, False):
        return lambda: None
    base_parser = namespace["setup_arg_parser"]
    base_load = namespace["load"]
    state: dict = {}

    @functools.wraps(base_parser)
    def setup_arg_parser():
        parser = base_parser()
        add_arguments(parser)
        base_parse = parser.parse_args

        def parse_args(*a, **kw):
            args = base_parse(*a, **kw)
            if args.spqt:
                try:
                    check_arguments(args)
                except ValueError as e:
                    parser.error(str(e))
                state.clear()
                state["args"] = args
                _install_generate(namespace, state)
            else:
                model = getattr(args, "model", None)
                if model and _spqt_config(model) is not None:
                    # mlx-lm would fail on its zigzag weights and suggest trust_remote_code, which
                    # skips our verified load.
                    parser.error(f"{args.model} was written by spqt-convert: pass --spqt to load it.")
                state.clear()
            return args

        parser.parse_args = parse_args
        return parser

    @functools.wraps(base_load)
    def load(path_or_hf_repo, *a, **kw):
        args = state.get("args")
        if args is None or state.get("model") is not None:
            return base_load(path_or_hf_repo, *a, **kw)  # plain runs, and the draft model
        if (saved := _spqt_config(path_or_hf_repo)) is not None:
            out = _load_converted(path_or_hf_repo, **kw)
            _log(f"loaded the spqt-converted model at {path_or_hf_repo}")
            if args.sparsity is not None and args.sparsity != saved.get("sparsity"):
                recalibrate(out[0], out[1], args, args.sparsity)
        else:
            out = base_load(path_or_hf_repo, *a, **kw)
            convert_and_calibrate(out[0], out[1], args)
        state["model"] = out[0]
        return out

    setattr(setup_arg_parser, _MARK, True)
    setattr(load, _MARK, True)
    namespace["setup_arg_parser"] = setup_arg_parser
    namespace["load"] = load

    def restore():
        namespace["setup_arg_parser"] = base_parser
        namespace["load"] = base_load
        _uninstall_generate(namespace)

    return restore


def _install_generate(namespace: dict, state: dict) -> None:
    """Wrap ``generate`` for this run so that the achieved sparsity is reported after it."""
    current = namespace["generate"]
    base = getattr(current, "__wrapped_generate__", current)

    @functools.wraps(base)
    def generate(model, *a, **kw):
        from .patch import record_stats

        if model is not state.get("model"):
            return base(model, *a, **kw)
        record_stats(model)
        try:
            t0 = time.perf_counter()
            text = base(model, *a, **kw)
            elapsed = time.perf_counter() - t0
            verbose = kw.get("verbose", a[2] if len(a) > 2 else False)
            # Verbose runs already print mlx-lm's tokens-per-sec; quiet ones keep stdout for the text.
            report(model, None if verbose else elapsed, file=None if verbose else sys.stderr)
            return text
        finally:
            record_stats(model, False)

    generate.__wrapped_generate__ = base
    namespace["generate"] = generate


def _uninstall_generate(namespace: dict) -> None:
    base = getattr(namespace.get("generate"), "__wrapped_generate__", None)
    if base is not None:
        namespace["generate"] = base


def main(argv: list[str] | None = None) -> None:
    """Run ``mlx_lm.generate``'s CLI with the SpQt options (``argv`` defaults to ``sys.argv[1:]``)."""
    G = importlib.import_module("mlx_lm.generate")
    restore = install(G.__dict__)
    saved_argv = sys.argv
    if argv is not None:
        sys.argv = [saved_argv[0] if saved_argv else "spqt-generate", *argv]
    try:
        G.main()
    finally:
        sys.argv = saved_argv
        restore()


if __name__ == "__main__":
    main()
