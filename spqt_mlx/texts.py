"""Token streams for calibration and evaluation: text files, or text the model writes itself."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

# The README quick start's prompt, which the self-test and the text check (benchmarks/quickstart_text.py)
# decode too.
QUICK_START_PROMPT = "Explain why the sky is blue."

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


def leading_token(tokenizer) -> int | None:
    """The id the tokenizer puts in front of every text (a BOS, as Gemma's does), or None.

    Models trained that way need it at the start of every sequence they see: Gemma 3's
    perplexity triples without it. Token streams cut from a text carry none, so whoever starts a
    sequence from them (a window, a calibration run) puts this in front.
    """
    full = list(tokenizer.encode("a"))
    bare = list(tokenizer.encode("a", add_special_tokens=False))
    return full[0] if len(full) == len(bare) + 1 and full[1:] == bare else None


def with_leading(ids, bos: int | None) -> list[int]:
    """``ids`` as a list that starts with ``bos`` (``leading_token``): put in front unless already there."""
    ids = [int(i) for i in ids]
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def read_text(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file {path} is empty.")
    return text


def self_generated_tokens(
    model, tokenizer, n_tokens: int, *, seed: int = 0, temperature: float = 0.8, progress: bool = True
) -> list[int]:
    """About ``n_tokens`` tokens of text the model writes itself (prompts included).

    Used for calibration when no text is given: thresholds then follow the activations the model
    produces on its own kind of text.
    """
    from mlx_lm.generate import generate_step
    from tqdm.auto import tqdm

    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}.")
    # Sampled with keys of its own: the global random state (the user's generation after
    # calibration) is left as it was.
    key = mx.random.key(seed)

    def sampler(logprobs):
        nonlocal key
        key, draw = mx.random.split(key)
        return mx.random.categorical(logprobs * (1 / temperature), key=draw)

    eos = set(getattr(tokenizer, "eos_token_ids", []) or [])
    bos = leading_token(tokenizer)
    tokens: list[int] = []
    prompts = iter(CALIBRATION_PROMPTS * (1 + n_tokens // 16))
    with tqdm(total=n_tokens, desc="writing calibration text", unit="tok", disable=not progress, leave=False) as bar:
        while len(tokens) < n_tokens:
            prompt = next(prompts)
            if getattr(tokenizer, "chat_template", None):
                ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            else:
                ids = with_leading(text_tokens(tokenizer, prompt + "\n"), bos)
            ids = list(ids)
            budget = max(n_tokens - len(tokens) - len(ids), 8)
            out = []
            bar.update(min(len(ids), n_tokens - bar.n))
            for token, _ in generate_step(mx.array(ids), model, max_tokens=budget, sampler=sampler):
                token = int(token)
                out.append(token)
                bar.update(min(1, n_tokens - bar.n))
                if token in eos:
                    break
            tokens.extend(ids + out)
    return tokens[:n_tokens]


def calibration_tokens(model, tokenizer, *, text_file=None, n_tokens: int = 512, seed: int = 0, progress: bool = True):
    """``(tokens, description)``: the first ``n_tokens`` of ``text_file`` (after the tokenizer's
    leading token, if it has one), else self-generated text."""
    if n_tokens <= 0:
        raise ValueError(f"calibration tokens must be positive, got {n_tokens}.")
    if text_file is not None:
        tokens = with_leading(text_tokens(tokenizer, read_text(text_file), n_tokens), leading_token(tokenizer))[:n_tokens]
        if len(tokens) < 2:
            raise ValueError(f"{text_file} holds fewer than 2 tokens.")
        return tokens, f"{len(tokens)} tokens of {Path(text_file).name}"
    tokens = self_generated_tokens(model, tokenizer, n_tokens, seed=seed, progress=progress)
    return tokens, f"{len(tokens)} tokens of self-generated text"
