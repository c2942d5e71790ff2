"""Tiny Llama GGUF files written with gguf.GGUFWriter, for the model I/O tests."""

import numpy as np

TINY = dict(hidden=256, ff=512, layers=2, heads=4, kv_heads=2, head_dim=64)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_vocab():
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [m.replace(" ", "") for m in MERGES]
    return SPECIALS + alphabet + merged


def llama_cpp_permute(w, n_heads):
    """Hugging Face row order -> llama.cpp's interleaved rotary pairs (the inverse of the import)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def projection_weights(rng, prefix, sizes):
    """A block's seven projections (mlx-lm names under ``prefix``), scaled by 1/sqrt(inputs)."""
    h, ff, hd = sizes["hidden"], sizes["ff"], sizes["head_dim"]
    q, kv = sizes["heads"] * hd, sizes["kv_heads"] * hd
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h), "mlp.down_proj": (h, ff)}
    return {f"{prefix}{name}.weight": rng.normal(0, 1 / np.sqrt(shape[1]), shape) for name, shape in shapes.items()}


def tiny_source_weights(seed=0):
    """Float weights of a tiny Llama, in mlx-lm names and Hugging Face row order."""
    rng = np.random.default_rng(seed)
    h, sizes = TINY["hidden"], TINY
    vocab = len(tiny_vocab())
    w = {"model.embed_tokens.weight": rng.normal(0, 0.1, (vocab, h)), "model.norm.weight": 1 + 0.1 * rng.normal(size=h)}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=h)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=h)
        w.update(projection_weights(rng, p, sizes))
    return {k: v.astype(np.float32) for k, v in w.items()}


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(name, names=GGUF_NAMES):
    """The GGUF name of an mlx-lm parameter, by the table ``names`` (global names, then block ones)."""
    if name in names:
        return names[name]
    _, _, i, rest = name.split(".", 3)
    return f"blk.{i}.{names[rest]}"


def write_tiny_gguf(path, weights, encode=None, *, arch="llama", permute=True, extra_tensors=(), add_bos=False,
                    sizes=None):
    """Write ``weights`` (mlx-lm names, float32) as a tiny Llama GGUF.

    ``encode(array) -> (data, qtype)`` stores a 2-D weight quantized (norms stay F32, as in
    llama.cpp); by default everything is F32. Q and K rows are interleaved as llama.cpp does.
    ``sizes`` overrides the metadata's block_count, head_count and head_count_kv (bad headers).
    """
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    sizes = {"block_count": TINY["layers"], "head_count": TINY["heads"], "head_count_kv": TINY["kv_heads"],
             **(sizes or {})}
    w.add_block_count(sizes["block_count"])
    w.add_context_length(256)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ff"])
    w.add_head_count(sizes["head_count"])
    w.add_head_count_kv(sizes["head_count_kv"])
    w.add_rope_dimension_count(TINY["head_dim"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    vocab = tiny_vocab()
    w.add_vocab_size(len(vocab))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, value in weights.items():
        if permute and name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, TINY["heads"])
        elif permute and name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, TINY["kv_heads"])
        if encode is not None and value.ndim == 2:
            data, qtype = encode(value)
            w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(value, dtype=np.float32))
    for name, data, qtype in extra_tensors:
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- a tiny Gemma 3 with a SentencePiece vocabulary ----------------------------------------------

# Six layers: mlx-lm's Gemma 3 needs one whole pattern of five sliding-window layers and a global one.
GEMMA_TINY = dict(hidden=64, ff=128, layers=6, heads=2, kv_heads=1, head_dim=32, window=8)
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
GEMMA_USER = ["\n\n"]
# Normal pieces with their scores. "bc" outscores "ab", so SentencePiece splits "abc" as a + bc
# although "ab" comes first in the vocabulary.
GEMMA_PIECES = [("▁", -1.0), ("a", -2.0), ("b", -3.0), ("c", -4.0), ("h", -5.0), ("i", -6.0), ("ab", -20.0),
                ("bc", -10.0), ("▁h", -11.0), ("▁hi", -12.0), ("hi", -13.0)]


def gemma_vocab():
    """``(tokens, scores, types)`` in vocabulary order: specials, user-defined, bytes, pieces."""
    tokens = GEMMA_SPECIALS + GEMMA_USER + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in GEMMA_PIECES]
    scores = [-1000.0] * (len(tokens) - len(GEMMA_PIECES)) + [s for _, s in GEMMA_PIECES]
    types = [3] * len(GEMMA_SPECIALS) + [4] * len(GEMMA_USER) + [6] * 256 + [1] * len(GEMMA_PIECES)
    return tokens, scores, types


def gemma_source_weights(seed=0):
    """Float weights of a tiny Gemma 3 in mlx-lm names; norms as mlx-lm keeps them (it adds the 1)."""
    rng = np.random.default_rng(seed)
    g = sizes = GEMMA_TINY
    h, hd = g["hidden"], g["head_dim"]
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (len(gemma_vocab()[0]), h)),
         "model.norm.weight": 0.1 * rng.normal(size=h)}
    for i in range(g["layers"]):
        p = f"model.layers.{i}."
        for norm, size in (("input_layernorm", h), ("post_attention_layernorm", h), ("pre_feedforward_layernorm", h),
                           ("post_feedforward_layernorm", h), ("self_attn.q_norm", hd), ("self_attn.k_norm", hd)):
            w[p + norm + ".weight"] = 0.1 * rng.normal(size=size)
        w.update(projection_weights(rng, p, sizes))
    return {k: v.astype(np.float32) for k, v in w.items()}


GEMMA_GGUF_NAMES = {
    **GGUF_NAMES,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}


def write_tiny_gemma3_gguf(path, weights):
    """Write ``weights`` as llama.cpp's converter writes Gemma 3: norms stored as 1 + weight."""
    import gguf

    g = GEMMA_TINY
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(g["layers"])
    w.add_context_length(128)
    w.add_embedding_length(g["hidden"])
    w.add_feed_forward_length(g["ff"])
    w.add_head_count(g["heads"])
    w.add_head_count_kv(g["kv_heads"])
    w.add_key_length(g["head_dim"])
    w.add_value_length(g["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1000000.0)
    w.add_sliding_window(g["window"])
    tokens, scores, types = gemma_vocab()
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    for name, value in weights.items():
        if name.endswith("norm.weight"):
            value = value + 1
        w.add_tensor(gguf_name(name, GEMMA_GGUF_NAMES), np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
