"""Import GGUF files (llama.cpp's format) of Llama and Gemma 3 models as mlx-lm model directories.

The tensors are read and dequantized with the ``gguf`` package and renamed to mlx-lm's names. What
llama.cpp's converter changed is undone: for Llama the query/key rows it interleaves for its rotary
embedding are put back in Hugging Face order; for Gemma 3 the 1 it adds to every RMSNorm weight is
taken off again (mlx-lm's Gemma norms multiply by ``1 + weight``). The tokenizer is rebuilt from the
vocabulary stored in the file with ``tokenizers``: byte-level BPE, or SentencePiece BPE from scores.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from .files import atomic_directory
from .layout import DTYPES, dtype_from_name

# GGUF architecture -> mlx-lm model_type and Hugging Face architecture of the directory written.
_MODEL_TYPES = {"llama": ("llama", "LlamaForCausalLM"), "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
SUPPORTED_ARCHITECTURES = tuple(_MODEL_TYPES)

# Tensor types this importer accepts, all dequantized by gguf.quants.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K")

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_PROJECTION_NAMES = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# Per architecture, the block tensors' GGUF names -> mlx-lm names. llama.cpp calls Gemma 3's norm in
# front of the MLP ``ffn_norm``, Llama's ``ffn_norm`` is its post-attention norm.
_BLOCK_NAMES = {
    "llama": {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        **_PROJECTION_NAMES,
    },
    "gemma3": {
        "attn_norm.weight": "input_layernorm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
        **_PROJECTION_NAMES,
    },
}

# Gemma 3 values llama.cpp does not store but fixes for the architecture (its llama-model.cpp):
# every sixth layer attends globally, the others over a sliding window with a RoPE base of 10000.
_GEMMA3_SLIDING_WINDOW_PATTERN = 6
_GEMMA3_ROPE_LOCAL_BASE = 10000.0

# llama.cpp token types (llama_token_type) that the import treats specially.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

# Pre-tokenizer regexes of the byte-level BPE vocabularies llama.cpp knows by name.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _reader(gguf_path):
    from gguf import GGUFReader

    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueErrors/asserts on damaged files
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def read_metadata(reader) -> dict:
    """The key/value metadata of a GGUF file as plain Python values."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        meta[key] = field.contents()
    return meta


def gguf_config(meta: dict, tensor_names) -> dict:
    """An mlx-lm ``config.json`` for the model described by the GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"the GGUF metadata lacks {arch}.{key}.")
        return value

    def count(key, value):
        # Sizes come from the file: check them before anything is allocated from them.
        if isinstance(value, (bool, list)) or not isinstance(value, (int, np.integer)) or not 0 < value < 1 << 31:
            raise ValueError(f"the GGUF metadata's {arch}.{key} must be a positive integer, got {value!r}.")
        return int(value)

    hidden = count("embedding_length", get("embedding_length"))
    heads = count("attention.head_count", get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise ValueError("per-layer KV head counts are not supported.")
    kv_heads = count("attention.head_count_kv", kv_heads)
    if heads % kv_heads:
        raise ValueError(f"the GGUF metadata gives {heads} attention heads, not a multiple of its {kv_heads} KV heads.")
    head_dim = count("attention.key_length", meta.get(f"{arch}.attention.key_length", hidden // heads))
    blocks = count("block_count", get("block_count"))
    stored = {int(name.split(".")[1]) for name in tensor_names if name.startswith("blk.")}
    if len(stored) != blocks or min(stored) != 0 or max(stored) != blocks - 1:  # the set is range(blocks)
        raise ValueError(
            f"the GGUF metadata gives {blocks} blocks, but the file has tensors for "
            f"{len(stored)} (indices {min(stored, default=None)} to {max(stored, default=None)})."
        )
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    if not vocab:
        raise ValueError("the GGUF metadata gives no vocabulary size.")
    vocab = count("vocab_size", vocab)
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": blocks,
        "intermediate_size": count("feed_forward_length", get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    config["model_type"], architecture = _MODEL_TYPES[arch]
    config["architectures"] = [architecture]
    if arch == "llama":
        config.update({"attention_bias": False, "mlp_bias": False})
    else:
        config.update({
            "sliding_window": count("attention.sliding_window", get("attention.sliding_window")),
            "sliding_window_pattern": _GEMMA3_SLIDING_WINDOW_PATTERN,
            "rope_local_base_freq": _GEMMA3_ROPE_LOCAL_BASE,
            # Queries are scaled by head_dim**-0.5, except in the 27B model (62 layers), whose
            # scale comes from hidden / heads; llama.cpp tells the two apart the same way.
            "query_pre_attn_scalar": hidden // heads if blocks == 62 else head_dim,
        })
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise ValueError(f"rope scaling {scaling!r} is not supported (only linear).")
        config["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        if f"tokenizer.ggml.{name}_token_id" in meta:
            config[key] = int(meta[f"tokenizer.ggml.{name}_token_id"])
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) != config.get("eos_token_id"):
        # Chat models end a turn with their own token (Gemma's <end_of_turn>); mlx-lm stops on any listed.
        config["eos_token_id"] = [i for i in (config.get("eos_token_id"), int(eot)) if i is not None]
    return config


def _f32(value) -> float:
    # GGUF stores float32; print the shortest decimal of that float32 (1e-05, not 9.99999974e-06).
    return float(str(np.float32(value)))


def mlx_name(gguf_name: str, arch: str = "llama") -> str:
    """The mlx-lm parameter path of a GGUF tensor name in a model of architecture ``arch``."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _BLOCK_NAMES[arch]:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[arch][m.group(2)]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in an mlx-lm {_MODEL_TYPES[arch][0]} model.")


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row interleave of a query or key projection.

    Within each head llama.cpp stores rotary pair i as rows (2i, 2i+1); Hugging Face and mlx-lm
    keep the two halves apart, rows (i, i + head_dim/2). So even rows go first, odd rows second.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of rotary pairs.")
    rest = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in (out, in) order (GGUF lists dimensions innermost first)."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TENSOR_TYPES:
        raise ValueError(
            f"tensor {tensor.name} has type {kind}; supported types: {', '.join(SUPPORTED_TENSOR_TYPES)}."
        )
    values = quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.asarray(values, dtype=np.float32).reshape(shape)


def gguf_weights(reader, config: dict, dtype: str = "float32", *, progress: bool = True) -> dict[str, mx.array]:
    """All tensors of the file, dequantized, keyed by mlx-lm parameter paths, in ``dtype``.

    Tensors are converted one at a time, so only one float32 copy exists at any moment.
    """
    from tqdm.auto import tqdm

    dtype_from_name(dtype)
    arch = next(a for a, (model_type, _) in _MODEL_TYPES.items() if model_type == config["model_type"])
    heads = {"self_attn.q_proj.weight": config["num_attention_heads"],
             "self_attn.k_proj.weight": config["num_key_value_heads"]}
    weights = {}
    for tensor in tqdm(reader.tensors, desc="reading GGUF tensors", unit="tensor", disable=not progress, leave=False):
        name = mlx_name(tensor.name, arch)
        w = dequantize_tensor(tensor)
        if arch == "llama":
            for suffix, n in heads.items():
                if name.endswith(suffix):
                    w = unpermute_rows(w, n)
        elif name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's 1 + weight; mlx-lm adds the 1 itself
        weights[name] = mx.array(w).astype(dtype_from_name(dtype))
        mx.eval(weights[name])
    return weights


def _byte_level_bpe(meta: dict, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp splits every digit on its own before the GPT-2 pattern.
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in ("llama-bpe", "llama3", "smaug-bpe"):
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in ("default", "gpt2", "gpt-2"):
        tokenizer.pre_tokenizer = byte_level
    else:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, llama-bpe, gpt2 are).")
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_bpe(meta: dict, tokens: list[str], types: list[int]):
    """SentencePiece's BPE (llama.cpp's "llama" vocabularies: Gemma, Llama 2) from pieces and scores.

    SentencePiece merges, at each step, the adjacent pair of pieces whose joined piece scores
    highest. As ranked merges that is every split of a normal piece into two normal pieces, ranked
    by the joined piece's score. Characters outside the vocabulary fall back to byte pieces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError("the GGUF SentencePiece vocabulary lacks one score per token (tokenizer.ggml.scores).")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    normal = {tok: float(score) for tok, kind, score in zip(tokens, types, scores) if kind == _NORMAL}
    ranked = []
    for piece, score in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, vocab[piece], left, right))
    ranked.sort()
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(vocab, [(left, right) for _, _, left, right in ranked], fuse_unk=True, byte_fallback=True,
                       unk_token=tokens[int(unk)] if unk is not None else None)
    tokenizer = Tokenizer(model)
    # Spaces become "▁"; pieces never cross a word start, so splitting there first changes no
    # result and keeps BPE's words short.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=True)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def gguf_tokenizer(meta: dict):
    """Rebuild the tokenizer from the GGUF vocabulary: byte-level BPE or SentencePiece BPE.

    Returns ``(tokenizer, tokenizer_config)``: a ``tokenizers.Tokenizer`` and the dict for
    ``tokenizer_config.json`` (special tokens, chat template).
    """
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported; byte-level BPE ('gpt2') and SentencePiece "
            "('llama') vocabularies are."
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    if len(types) != len(tokens):
        raise ValueError(f"the GGUF vocabulary has {len(tokens)} tokens but {len(types)} token types.")
    tokenizer = _byte_level_bpe(meta, tokens) if kind == "gpt2" else _sentencepiece_bpe(meta, tokens, types)

    special = [AddedToken(tok, special=True, normalized=False)
               for tok, t in zip(tokens, types) if t == _CONTROL]
    user = [AddedToken(tok, special=False, normalized=False)
            for tok, t in zip(tokens, types) if t == _USER_DEFINED]
    tokenizer.add_special_tokens(special)
    if user:
        tokenizer.add_tokens(user)

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        # The tokenizer itself prepends BOS, as llama.cpp does for these vocabularies.
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 2048)),
    }
    for key in ("bos", "eos", "unknown", "padding"):
        if (tok := token(key)) is not None:
            name = {"unknown": "unk", "padding": "pad"}.get(key, key)
            tokenizer_config[f"{name}_token"] = tok
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    tokenizer_config["additional_special_tokens"] = [t.content for t in special]
    return tokenizer, tokenizer_config


def _save_weights(directory: Path, weights: dict) -> None:
    # mlx-lm's sharding and names: model.safetensors, or model-0000i-of-0000n.safetensors + index.
    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    if len(shards) == 1:
        mx.save_safetensors(str(directory / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def gguf_to_mlx(gguf_path, out_dir, *, dtype: str = "float16", overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a Llama-family GGUF file into an mlx-lm model directory that ``mlx_lm.load`` reads.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the directory to create. It is written atomically: a failure leaves nothing
            behind, and an existing directory is replaced only when ``overwrite`` is set.
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` for the saved weights.
        progress: show a progress bar over the tensors.
    """
    dtype_from_name(dtype)
    reader = _reader(gguf_path)
    meta = read_metadata(reader)
    config = gguf_config(meta, {t.name for t in reader.tensors})
    tokenizer, tokenizer_config = gguf_tokenizer(meta)
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it.")
    weights = gguf_weights(reader, config, dtype, progress=progress)
    if "model.embed_tokens.weight" not in weights:
        raise ValueError(f"{gguf_path} has no token_embd.weight tensor.")
    config["torch_dtype"] = dtype

    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _save_weights(tmp, weights)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        (tmp / "special_tokens_map.json").write_text(json.dumps(
            {k: v for k, v in tokenizer_config.items() if k.endswith("_token")}, indent=2))
    return Path(out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m spqt_mlx.gguf", description="Convert a Llama-family GGUF file to an mlx-lm directory."
    )
    parser.add_argument("gguf", help="the .gguf file")
    parser.add_argument("out", help="the directory to write")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    args = parser.parse_args(argv)
    out = gguf_to_mlx(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
