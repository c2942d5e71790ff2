"""The quick start's greedy text at 4 bits, with and without SpQt: does a sentence repeat?

For a model (default the quick start's, SmolLM2-135M-Instruct) and a prompt (default the quick
start's), greedy decoding of ``--max-tokens`` tokens from: the float model; mlx-lm's 4-bit model
(``nn.quantize``, groups of 64, embeddings included, as the decode benchmarks build it); and the
zigzag 4-bit model of each quantizer with sparsity off, prepared as `spqt-generate --spqt
--sparsity 0 --quantizer Q` prepares it (GPTQ's input statistics on its default calibration text).
Each text is checked for a sentence that occurs twice (issue 13's fluency check, "no sentence
repeated in 128 tokens"), which separates what 4-bit weights cost this model's text from what
sparsity costs it.

    python benchmarks/quickstart_text.py [--model smollm2] [--json out.json]
"""

import argparse
import datetime
import json
import platform
import re
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm import generate

from spqt_mlx.generate import add_arguments, check_arguments, convert_and_calibrate
from spqt_mlx.layout import QUANTIZERS
from spqt_mlx.sources import load_source
from spqt_mlx.texts import QUICK_START_PROMPT


def repeated_sentence(text: str) -> str | None:
    """A sentence of ``text`` that occurs in it twice (the one whose second occurrence comes first), else
    None. A sentence is what ends at ".", "!" or "?" followed by white space (or at the text's end,
    so a last sentence cut off by the token limit counts as one), of three words or more, compared
    exactly after collapsing white space."""
    seen = set()
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        key = " ".join(sentence.split())
        if len(key.split()) < 3:
            continue
        if key in seen:
            return key
        seen.add(key)
    return None


def build(model_name: str, variant: str):
    model, tokenizer, _ = load_source(model_name, progress=False)
    if variant == "mlx 4-bit":
        nn.quantize(model, group_size=64, bits=4)
    elif variant.startswith("zigzag 4-bit"):
        # What `spqt-generate --spqt --sparsity 0 --quantizer Q` does to the model, with its defaults.
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--spqt", "--sparsity", "0", "--quantizer", variant.split()[-1]])
        check_arguments(args)
        convert_and_calibrate(model, tokenizer, args)
    mx.eval(model.parameters())
    return model, tokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompt", default=QUICK_START_PROMPT)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--json")
    args = p.parse_args()
    variants = ["float", "mlx 4-bit", *(f"zigzag 4-bit, {q}" for q in QUANTIZERS)]
    rows = []
    for variant in variants:
        t = time.perf_counter()
        model, tokenizer = build(args.model, variant)
        prepared = time.perf_counter() - t
        prompt = args.prompt
        if tokenizer.has_chat_template:  # as mlx_lm.generate's command line does
            messages = [{"role": "user", "content": prompt}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = generate(model, tokenizer, prompt=prompt, max_tokens=args.max_tokens, verbose=False)
        repeat = repeated_sentence(text)
        rows.append(dict(model=args.model, variant=variant, prepare_s=round(prepared, 1), text=text,
                         repeated=repeat))
        print(f"== {variant} (prepared in {prepared:.0f} s): repeats {repeat!r}\n{text}\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=f"{platform.machine()}, {mx.default_device()}",
                           date=datetime.date.today().isoformat(), prompt=args.prompt, max_tokens=args.max_tokens,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
