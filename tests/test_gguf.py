"""GGUF import: every supported tensor type against its float source, names, Q/K order, tokenizer."""

import json

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from gguf_fixtures import (
    GEMMA_TINY,
    SPECIALS,
    TINY,
    gemma_source_weights,
    gemma_vocab,
    llama_cpp_permute,
    tiny_source_weights,
    tiny_vocab,
    write_tiny_gemma3_gguf,
    write_tiny_gguf,
)
from spqt_mlx.gguf import gguf_to_mlx, mlx_name, unpermute_rows

# ---- encoders for the k-quants, which gguf.quants can decode but not encode -----------------


def encode_q4_k(x):
    """Q4_K: 256-value blocks of 8 sub-blocks; w = d*sc*q - dmin*m, 6-bit sc and m, 4-bit q.

    Returns the block bytes and the exact values they decode to.
    """
    rows, cols = x.shape
    b = x.reshape(-1, 8, 32).astype(np.float64)
    lo = np.minimum(b.min(-1), 0.0)
    step = (b.max(-1) - lo) / 15
    d = (step.max(-1) / 63).astype(np.float16)
    dmin = (-lo.min(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float64)[:, None], dmin.astype(np.float64)[:, None]
    sc = np.clip(np.ceil(step / np.where(df > 0, df, 1)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / np.where(dminf > 0, dminf, 1)), 0, 63).astype(np.uint8)
    scale, offset = (df * sc)[..., None], (dminf * m)[..., None]
    q = np.clip(np.round((b + offset) / np.where(scale > 0, scale, 1)), 0, 15).astype(np.uint8)
    values = (scale * q - offset).reshape(rows, cols)

    packed = np.zeros((b.shape[0], 12), np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    pairs = q.reshape(-1, 4, 2, 32)  # sub-blocks 2j (low nibble) and 2j+1 (high nibble) share bytes
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], 1)
    return blocks.reshape(rows, -1), values


def encode_q6_k(x):
    """Q6_K: 256-value blocks of 16 sub-blocks; w = d*sc*(q - 32), int8 sc, 6-bit q."""
    rows, cols = x.shape
    b = x.reshape(-1, 16, 16).astype(np.float64)
    amax = np.abs(b).max(-1)
    d = (amax.max(-1) / 31 / 127).astype(np.float16)
    df = d.astype(np.float64)[:, None]
    sc = np.clip(np.ceil(amax / 31 / np.where(df > 0, df, 1)), -128, 127).astype(np.int8)
    scale = (df * sc)[..., None]
    q = (np.clip(np.round(b / np.where(scale > 0, scale, 1)), -32, 31) + 32).astype(np.uint8)
    values = (scale * (q.astype(np.float64) - 32)).reshape(rows, cols)

    q = q.reshape(-1, 2, 4, 32)  # two halves of 128, each four runs of 32
    ql = np.concatenate([q[:, :, 0] & 15 | (q[:, :, 2] & 15) << 4, q[:, :, 1] & 15 | (q[:, :, 3] & 15) << 4], -1)
    qh = (q[:, :, 0] >> 4) | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (q[:, :, 3] >> 4) << 6
    blocks = np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], 1
    )
    return blocks.reshape(rows, -1), values


# Largest error against the float source, as a fraction of a row's largest magnitude: half a step
# (a whole step for the symmetric types, which clip one end), plus fp16 rounding of the scales.
TOLERANCE = {T.F32: 0, T.F16: 1e-3, T.BF16: 8e-3, T.Q8_0: 1 / 200, T.Q5_0: 1 / 15, T.Q5_1: 1 / 30,
             T.Q4_0: 1 / 7.5, T.Q4_1: 1 / 14}


def package_encoder(qtype):
    def encode(value):
        if qtype == T.F32:
            return value.astype(np.float32), qtype
        if qtype == T.F16:
            return value.astype(np.float16), qtype
        return quants.quantize(value, qtype), qtype

    return encode


def imported(tmp_path, weights, encode, dtype="float32"):
    path = write_tiny_gguf(tmp_path / "m.gguf", weights, encode)
    out = gguf_to_mlx(path, tmp_path / "mlx", dtype=dtype)
    return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(out / "model.safetensors")).items()}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda t: t.name)
def test_types_the_package_encodes(tmp_path, qtype):
    weights = tiny_source_weights()
    got = imported(tmp_path, weights, package_encoder(qtype))
    assert set(got) == set(weights)
    for name, src in weights.items():
        assert got[name].shape == src.shape, name
        if src.ndim == 1:  # norms stay F32
            np.testing.assert_array_equal(got[name], src)
            continue
        bound = TOLERANCE[qtype] * np.abs(src).max(1, keepdims=True)
        err = np.abs(got[name] - src)
        assert (err <= bound).all(), f"{name}: error {err.max():.3g}"
        if qtype not in (T.F32, T.F16):
            assert err.max() > 0  # it really went through the quantizer


@pytest.mark.parametrize("encoder", [encode_q4_k, encode_q6_k], ids=["Q4_K", "Q6_K"])
def test_k_quants(tmp_path, encoder):
    weights = tiny_source_weights()
    qtype = T.Q4_K if encoder is encode_q4_k else T.Q6_K
    exact = {}

    def encode(value):
        data, values = encoder(value)
        exact[value.tobytes()] = values
        return data, qtype

    got = imported(tmp_path, weights, encode)
    for name, src in weights.items():
        if src.ndim == 1:
            continue
        gguf_rows = src
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            heads = TINY["heads"] if "q_proj" in name else TINY["kv_heads"]
            gguf_rows = llama_cpp_permute(src, heads)
        expected = exact[np.ascontiguousarray(gguf_rows).tobytes()]
        if name.endswith("q_proj.weight") or name.endswith("k_proj.weight"):
            expected = unpermute_rows(expected, heads)
        # Bit-exact decode of the blocks we built, and close to the float source.
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)
        relative = np.abs(got[name] - src).max() / np.abs(src).max()
        assert 0 < relative < (0.1 if qtype == T.Q4_K else 0.03), name


def test_names_and_config(tiny_gguf, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == TINY["hidden"]
    assert config["num_hidden_layers"] == TINY["layers"]
    assert config["num_attention_heads"] == TINY["heads"]
    assert config["num_key_value_heads"] == TINY["kv_heads"]
    assert config["head_dim"] == TINY["head_dim"]
    assert config["intermediate_size"] == TINY["ff"]
    assert config["vocab_size"] == len(tiny_vocab())
    assert config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is True  # no output.weight in the file
    weights = mx.load(str(tiny_model_dir / "model.safetensors"))
    assert set(weights) == set(tiny_gguf[1])
    for name, src in tiny_gguf[1].items():  # float32 source: exact, Q/K back in Hugging Face order
        np.testing.assert_array_equal(np.array(weights[name]), src, err_msg=name)


def test_untied_output_head(tmp_path):
    weights = tiny_source_weights()
    weights["lm_head.weight"] = np.random.default_rng(1).normal(size=(len(tiny_vocab()), TINY["hidden"])).astype(np.float32)
    out = gguf_to_mlx(write_tiny_gguf(tmp_path / "m.gguf", weights), tmp_path / "mlx", dtype="float32")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_array_equal(np.array(mx.load(str(out / "model.safetensors"))["lm_head.weight"]),
                                  weights["lm_head.weight"])


def test_unpermute_matches_interleaved_rope(tiny_gguf, tiny_model_dir):
    """llama.cpp's row order with traditional (interleaved) RoPE computes the same model as the
    imported Hugging Face order with mlx-lm's default RoPE: this checks the direction of the
    un-permute independently of how the test file was written."""
    from mlx_lm.models import llama
    from mlx_lm.utils import load_model

    model, config = load_model(tiny_model_dir)
    args = llama.ModelArgs.from_dict({**config, "rope_traditional": True})
    reference = llama.Model(args)
    ref_weights = {}
    for name, w in tiny_gguf[1].items():
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, TINY["heads"])
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, TINY["kv_heads"])
        ref_weights[name] = mx.array(w)
    reference.load_weights(list(ref_weights.items()))
    tokens = mx.array([[5, 70, 80, 90, 100, 110, 120, 130]])
    a, b = model(tokens), reference(tokens)
    assert mx.abs(a - b).max().item() < 1e-4 * mx.abs(b).max().item()
    # while llama.cpp's order under mlx-lm's default RoPE is a different model
    wrong = llama.Model(llama.ModelArgs.from_dict(config))
    wrong.load_weights(list(ref_weights.items()))
    assert mx.abs(wrong(tokens) - b).max().item() > 1e-2 * mx.abs(b).max().item()


def test_unpermute_rows_inverts_the_interleave():
    w = np.arange(4 * 64 * 3, dtype=np.float32).reshape(4 * 64, 3)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, 4), 4), w)
    head = unpermute_rows(np.arange(8, dtype=np.float32)[:, None], 1)[:, 0]
    np.testing.assert_array_equal(head, [0, 2, 4, 6, 1, 3, 5, 7])  # even rows first, then odd
    with pytest.raises(ValueError, match="heads"):
        unpermute_rows(np.zeros((6, 2)), 4)


def test_tokenizer(tiny_model_dir):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    vocab = tiny_vocab()
    ids = tok.encode("hello world", add_special_tokens=False)
    assert [vocab[i] for i in ids] == ["hello", "Ġworld"]  # merges applied, byte-level spaces
    assert tok.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False)[0] == 1  # specials are atomic
    digits = tok.encode("2024", add_special_tokens=False)
    assert [vocab[i] for i in digits] == ["2", "0", "2", "4"]
    assert tok.decode(tok.encode("hello world, 2024!")) == "hello world, 2024!"
    assert tok.eos_token_id == 2 and tok.bos_token == SPECIALS[1]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_that_adds_bos(tmp_path):
    from mlx_lm.utils import load_tokenizer

    path = write_tiny_gguf(tmp_path / "bos.gguf", tiny_source_weights(), add_bos=True)
    tok = load_tokenizer(gguf_to_mlx(path, tmp_path / "mlx"))
    ids = tok.encode("hello world")
    assert ids[0] == 1 and [tiny_vocab()[i] for i in ids[1:]] == ["hello", "Ġworld"]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"


def test_mlx_lm_generates_greedily(tiny_model_dir):
    from mlx_lm import generate, load

    model, tok = load(str(tiny_model_dir))
    ids = tok.encode("hello world")
    prompt_len = len(ids)
    for _ in range(4):  # greedy decoding by hand, with full forwards and no cache
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1])))
    assert generate(model, tok, "hello world", max_tokens=4) == tok.decode(ids[prompt_len:])


def test_dtype_is_applied(tmp_path, tiny_gguf):
    out = gguf_to_mlx(tiny_gguf[0], tmp_path / "bf16", dtype="bfloat16")
    weights = mx.load(str(out / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {mx.bfloat16}


def test_bad_inputs(tmp_path, tiny_gguf):
    with pytest.raises(FileNotFoundError):
        gguf_to_mlx(tmp_path / "missing.gguf", tmp_path / "out")
    with pytest.raises(ValueError, match="dtype"):
        gguf_to_mlx(tiny_gguf[0], tmp_path / "out", dtype="int8")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="GGUF"):
        gguf_to_mlx(tmp_path / "junk.gguf", tmp_path / "out")
    with pytest.raises(ValueError, match="architecture"):
        gguf_to_mlx(write_tiny_gguf(tmp_path / "g.gguf", tiny_source_weights(), arch="gemma"), tmp_path / "out")
    with pytest.raises(ValueError, match="Q2_K"):

        def q2_k(value):  # Q2_K blocks: 84 bytes per 256 values
            return np.zeros((value.shape[0], value.shape[1] // 256 * 84), np.uint8), T.Q2_K

        gguf_to_mlx(write_tiny_gguf(tmp_path / "q2.gguf", tiny_source_weights(), q2_k), tmp_path / "out")
    with pytest.raises(ValueError, match="no counterpart"):
        gguf_to_mlx(write_tiny_gguf(tmp_path / "b.gguf", tiny_source_weights(), extra_tensors=[
            ("blk.0.attn_q.bias", np.zeros(TINY["hidden"], np.float32), T.F32)]), tmp_path / "out")
    with pytest.raises(ValueError, match="no counterpart"):
        mlx_name("blk.0.ssm_in.weight")
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(FileExistsError):
        gguf_to_mlx(tiny_gguf[0], existing)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftover temp dirs


@pytest.mark.parametrize("sizes,message", [({"block_count": 10**9}, "blocks"), ({"block_count": 0}, "block_count"),
                                           ({"head_count": 0}, "head_count"), ({"head_count_kv": 3}, "multiple"),
                                           ({"head_count_kv": 0}, "head_count_kv")])
def test_absurd_header_sizes_fail_fast(tmp_path, sizes, message):
    """Sizes in a GGUF header are checked against each other and the stored tensors before anything is
    allocated from them: a clear ValueError in well under a second, and nothing written."""
    from isolated import expect_error

    path = write_tiny_gguf(tmp_path / "bad.gguf", tiny_source_weights(), sizes=sizes)
    # In a subprocess with a time limit, so that a hang or an allocation that kills the process
    # fails this test only.
    expect_error(f"""
import time
from spqt_mlx.gguf import gguf_to_mlx
start = time.perf_counter()
try:
    gguf_to_mlx({str(path)!r}, {str(tmp_path / "out")!r})
finally:
    assert time.perf_counter() - start < 1.0, "took a second or more"
""", "ValueError", message, timeout=60)
    assert not (tmp_path / "out").exists()


# ---- Gemma 3 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3")
    weights = gemma_source_weights()
    return gguf_to_mlx(write_tiny_gemma3_gguf(root / "g.gguf", weights), root / "mlx", dtype="float32"), weights


def test_gemma3_weights_norms_and_config(gemma_dir):
    out, source = gemma_dir
    config = json.loads((out / "config.json").read_text())
    g = GEMMA_TINY
    assert config["model_type"] == "gemma3_text" and config["architectures"] == ["Gemma3ForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (
        g["hidden"], g["ff"], g["layers"])
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        g["heads"], g["kv_heads"], g["head_dim"])
    assert config["sliding_window"] == g["window"] and config["sliding_window_pattern"] == 6
    assert config["query_pre_attn_scalar"] == g["head_dim"] and config["rope_local_base_freq"] == 10000.0
    assert config["rope_theta"] == 1e6 and config["rms_norm_eps"] == 1e-6 and config["tie_word_embeddings"]
    weights = mx.load(str(out / "model.safetensors"))
    assert set(weights) == set(source)
    for name, src in source.items():  # norms lose the 1 llama.cpp added; nothing is permuted
        np.testing.assert_allclose(np.array(weights[name]), src, rtol=0, atol=1e-6, err_msg=name)


def test_gemma3_loads_and_generates(gemma_dir):
    from mlx_lm import generate, load
    from mlx_lm.models import gemma3_text

    model, tok = load(str(gemma_dir[0]))
    assert isinstance(model, gemma3_text.Model)
    ids = tok.encode("hi abc")
    prompt_len = len(ids)
    for _ in range(3):
        ids.append(int(mx.argmax(model(mx.array([ids]))[0, -1])))
    assert generate(model, tok, "hi abc", max_tokens=3) == tok.decode(ids[prompt_len:])


def test_sentencepiece_tokenizer(gemma_dir):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(gemma_dir[0])
    tokens = gemma_vocab()[0]

    def pieces(text):
        return [tokens[i] for i in tok.encode(text, add_special_tokens=False)]

    assert pieces("abc") == ["a", "bc"]  # the higher-scoring merge wins, not the earlier piece
    assert pieces("hi hi") == ["hi", "▁hi"]  # no space prefix; spaces become ▁
    assert pieces("ab\n\nhi") == ["ab", "\n\n", "hi"]  # user-defined pieces are atomic
    assert pieces("hé") == ["h", "<0xC3>", "<0xA9>"]  # unknown characters fall back to bytes
    assert tok.encode("hi")[0] == 2 and tok.bos_token == "<bos>" and tok.eos_token_id == 1
    for text in ("hi abc", "ab\n\nhi é!", "  hi"):
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_sentencepiece_vocabulary_needs_scores(tmp_path):
    from spqt_mlx.gguf import gguf_tokenizer

    tokens, _, types = gemma_vocab()
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    with pytest.raises(ValueError, match="one score per token"):
        gguf_tokenizer(meta)
    with pytest.raises(ValueError, match="token types"):
        gguf_tokenizer({**meta, "tokenizer.ggml.token_type": types[:-1]})
    with pytest.raises(ValueError, match="'bert' is not supported"):
        gguf_tokenizer({**meta, "tokenizer.ggml.model": "bert"})


def test_end_of_turn_token_stops_generation_too():
    from spqt_mlx.gguf import gguf_config

    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 2,
            "llama.block_count": 1, "llama.feed_forward_length": 128, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.vocab_size": 10, "tokenizer.ggml.eos_token_id": 1}
    names = {"blk.0.attn_q.weight"}
    assert gguf_config(meta, names)["eos_token_id"] == 1
    assert gguf_config({**meta, "tokenizer.ggml.eot_token_id": 7}, names)["eos_token_id"] == [1, 7]
    assert gguf_config({**meta, "tokenizer.ggml.eot_token_id": 1}, names)["eos_token_id"] == 1
