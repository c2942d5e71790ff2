"""What the command-line tools share: how they end, and the options they spell alike."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

# Errors a user can cause and fix (a missing file, an existing output, a bad value): one line, no
# traceback. Anything else is a bug and keeps its traceback.
EXPECTED = (OSError, ValueError)


def run(prog: str, work: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None) -> None:
    """Run ``work(argv)``. Return normally (exit status 0) on success; on an expected error print
    ``prog: error: ...`` on stderr and exit with status 2, as argparse does for bad arguments."""
    try:
        work(argv)
    except EXPECTED as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def sparsity_value(text: str):
    """The type of ``--sparsity``: a number or ``auto`` (the range is checked with the other values)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) or 'auto', got {text!r}") from None


def add_quantizer_argument(parser) -> None:
    """``--quantizer`` (:data:`spqt_mlx.layout.TOOL_QUANTIZERS`) on a parser or an argument group."""
    from .layout import DEFAULT_QUANTIZER, TOOL_QUANTIZERS
    from .patch.model import AUTO_GPTQ_WEIGHTS

    parser.add_argument("--quantizer", choices=TOOL_QUANTIZERS, default=DEFAULT_QUANTIZER,
                        help="how each group's scale and bias are chosen: minmax (as mx.quantize), search (the "
                        "lowest squared error), gptq (search plus GPTQ's error feedback from the calibration "
                        "text's input statistics; the most accurate, and slower) or auto (gptq for models of at "
                        f"most {AUTO_GPTQ_WEIGHTS / 1e9:g}B projection weights, else search); "
                        f"default {DEFAULT_QUANTIZER}")


_DEFAULT = object()


def add_criterion_argument(parser, several: bool = False, default=_DEFAULT) -> None:
    """``--criterion`` (:data:`spqt_mlx.patch.CRITERIA`) on a parser or an argument group; with
    ``several``, a list of them. ``default`` None: the model's own (a converted model's saved one)."""
    from .patch.linear import CRITERIA, DEFAULT_CRITERION

    if default is _DEFAULT:
        default = [DEFAULT_CRITERION] if several else DEFAULT_CRITERION
    parser.add_argument("--criterion", choices=CRITERIA, nargs="+" if several else None, default=default,
                        help="which input columns a sparse decode step skips: teal (small |x_j|) or wina (small "
                        f"|x_j| * ||W[:, j]||, the column's share of the output); default "
                        + (f"{DEFAULT_CRITERION}" if default is not None else
                           f"a converted model's own, else {DEFAULT_CRITERION}"))
