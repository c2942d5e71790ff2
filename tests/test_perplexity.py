"""Perplexity: window protocols, sparse evaluation against the real decode kernels, the CLI."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from spqt_mlx import checkpoint, perplexity
from spqt_mlx.calibrate import AUTO_CANDIDATES as AUTO
from spqt_mlx.patch import ZigzagLinear, patch_model, set_thresholds, zigzag_layers

TEXT = (
    "hello world. the quick brown fox jumps over the lazy dog while the hello world program prints "
    "its greeting again and again, 1234 times, until the world says hello back. "
) * 3


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.mark.parametrize("n,window,stride", [(10, 4, None), (10, 4, 1), (10, 4, 3), (33, 8, 5), (5, 16, 4), (2, 2, 1)])
def test_sliding_windows_score_every_token_once(n, window, stride):
    scored = []
    for start, end, first in perplexity.windows(n, window, "sliding", stride):
        assert end - start <= window and start < first < end or first == end == n
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_nonoverlapping_windows():
    assert perplexity.windows(10, 4, "nonoverlap") == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    assert perplexity.windows(9, 4, "nonoverlap") == [(0, 4, 1), (4, 8, 5)]  # a 1-token tail scores nothing


def test_bad_protocol_arguments():
    with pytest.raises(ValueError, match="protocol"):
        perplexity.windows(10, 4, "strided")
    with pytest.raises(ValueError, match="window"):
        perplexity.windows(10, 1, "nonoverlap")
    with pytest.raises(ValueError, match="stride"):
        perplexity.windows(10, 4, "sliding", 4)
    with pytest.raises(ValueError, match="2 tokens"):
        perplexity.windows(1, 4, "nonoverlap")


@pytest.fixture
def tiny(tiny_model_dir):
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model_dir))
    return model, tokenizer, tokenizer.encode(TEXT, add_special_tokens=False)[:40]


def test_nonoverlap_matches_mlx_lm(tiny):
    from mlx_lm.perplexity import eval_ppl

    model, _, tokens = tiny
    ours = perplexity.perplexity(model, tokens, window=20, protocol="nonoverlap")
    theirs, _ = eval_ppl(model, mx.array(tokens).reshape(2, 20), batch_size=2)
    assert ours["tokens"] == 38 and ours["achieved_sparsity"] is None
    assert math.isclose(math.log(ours["perplexity"]), math.log(theirs), abs_tol=1e-5)


@pytest.mark.parametrize("protocol,stride", [("nonoverlap", None), ("sliding", 6)])
@pytest.mark.parametrize("mode", ["masked", "decode"])
def test_bos_starts_every_window_unscored(tiny, protocol, stride, mode):
    model, _, tokens = tiny
    tokens = tokens[:30]
    bos = 1
    got = perplexity.token_losses(model, tokens, window=12, protocol=protocol, stride=stride, mode=mode, bos=bos)
    plain = perplexity.token_losses(model, tokens, window=12, protocol=protocol, stride=stride, mode=mode)
    assert got.shape == plain.shape  # the same tokens are scored
    # each scored token by hand: the model sees BOS, then the window up to that token
    expected = []
    for start, end, first in perplexity.windows(len(tokens), 12, protocol, stride):
        ids = mx.array([bos] + tokens[start:end])
        logits = model(ids[None, :-1])[0]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        expected += [-logp[j, ids[j + 1]].item() for j in range(first - start, end - start)]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got, plain, rtol=1e-3)
    # a window that already starts with BOS does not get a second one
    started = perplexity.token_losses(model, [bos] + tokens[:11], window=12, protocol=protocol, stride=stride,
                                      mode=mode, bos=bos)
    np.testing.assert_allclose(started, perplexity.token_losses(model, [bos] + tokens[:11], window=12, mode=mode,
                                                                protocol=protocol, stride=stride), rtol=1e-6)


def test_sliding_gives_more_context(tiny):
    model, _, tokens = tiny
    full = perplexity.token_losses(model, tokens, window=40, protocol="nonoverlap")
    sliding = perplexity.token_losses(model, tokens, window=16, protocol="sliding", stride=4)
    assert sliding.shape == full.shape == (39,)
    # the first window is the same, later tokens see less context than in one long window
    np.testing.assert_allclose(sliding[:15], full[:15], rtol=1e-4, atol=1e-5)
    assert not np.allclose(sliding[15:], full[15:], rtol=1e-4)


def test_masked_evaluation_matches_the_decode_kernels(tiny):
    model, _, tokens = tiny
    paths = patch_model(model, group_size=64, bits=4)
    dense = perplexity.token_losses(model, tokens[:12], window=12)
    set_thresholds(model, {p: 0.3 + 0.01 * i for i, p in enumerate(paths)})
    masked = perplexity.perplexity(model, tokens[:12], window=12)
    decoded = perplexity.perplexity(model, tokens[:12], window=12, mode="decode")
    assert math.isclose(masked["perplexity"], decoded["perplexity"], rel_tol=1e-4)
    assert 0.05 < masked["achieved_sparsity"] < 0.95
    assert abs(math.log(masked["perplexity"]) - dense.mean()) > 1e-3  # thresholds do change the result
    # without sparse prefill, multi-token calls run dense
    unsparsified = perplexity.perplexity(model, tokens[:12], window=12, sparse_prefill=False)
    assert math.isclose(math.log(unsparsified["perplexity"]), dense.mean(), rel_tol=1e-5)
    # the wrappers are gone afterwards
    assert all(isinstance(m, ZigzagLinear) for m in zigzag_layers(model).values())
    assert len(zigzag_layers(model)) == len(paths)


def test_cli_with_baselines_and_methods(tiny_model_dir, tmp_path, text_file, capsys):
    pytest.importorskip("matplotlib")
    results = perplexity.run([
        "--model", str(tiny_model_dir), "--text", str(text_file), "--sparsity", "0", "0.5",
        "--method", "uniform", "greedy", "--criterion", "teal", "wina", "--calibration-text", str(text_file),
        "--calibration-tokens", "32", "--window", "16", "--max-tokens", "32", "--baselines",
        "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
    ])
    printed = capsys.readouterr().out
    assert "Protocol: non-overlapping windows of 16 tokens" in printed
    rows = [(r["model"], r["criterion"], r["method"], r["target_sparsity"]) for r in results["rows"]]
    assert "quantizer auto -> gptq" in printed  # the default, for a model this small
    spqt = "spqt 4-bit g64 gptq"
    assert rows == [("float", "-", "-", None), ("mlx 4-bit g64", "-", "-", None), (spqt, "-", "-", 0.0),
                    (spqt, "teal", "uniform", 0.5), (spqt, "teal", "greedy", 0.5),
                    (spqt, "wina", "uniform", 0.5), (spqt, "wina", "greedy", 0.5)]
    ppl = {(r["criterion"], r["method"], r["target_sparsity"]): r for r in results["rows"]}
    assert all(r["tokens"] == 30 and r["perplexity"] > 1 for r in results["rows"])
    for criterion in ("teal", "wina"):
        for method in ("uniform", "greedy"):
            assert 0.4 < ppl[(criterion, method, 0.5)]["achieved_sparsity"] < 0.6  # calibrated on the same text
    assert ppl[("teal", "uniform", 0.5)]["perplexity"] != ppl[("wina", "uniform", 0.5)]["perplexity"]
    assert ppl[("-", "-", 0.0)]["achieved_sparsity"] == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["protocol"]["name"] == "nonoverlap" and saved["protocol"]["bos"] is None
    assert saved["device"] and saved["date"] == __import__("datetime").date.today().isoformat()
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_auto_row(tiny_model_dir, tmp_path, text_file, capsys):
    pytest.importorskip("matplotlib")
    results = perplexity.run([
        "--model", str(tiny_model_dir), "--text", str(text_file), "--sparsity", "0", "--auto", "5",
        "--calibration-text", str(text_file), "--calibration-tokens", "64", "--window", "16", "--max-tokens", "32",
        "--plot", str(tmp_path / "r.png"),
    ])
    printed = capsys.readouterr().out
    dense, auto = results["rows"]
    assert (auto["method"], auto["criterion"]) == ("auto", "teal") and auto["target_sparsity"] in (0.0, *AUTO)
    assert f"sparsity auto: {auto['target_sparsity']:.0%}" in printed and "budget 5 %" in printed
    if auto["target_sparsity"]:
        assert abs(auto["achieved_sparsity"] - auto["target_sparsity"]) < 0.15
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="budget"):
        perplexity.run(["--model", str(tiny_model_dir), "--text", str(text_file), "--auto", "-1"])


def test_cli_on_a_saved_checkpoint(tiny_model_dir, tmp_path, text_file, capsys):
    from spqt_mlx import convert

    out = tmp_path / "spqt"
    convert.run(["--model", str(tiny_model_dir), "--out", str(out), "--sparsity", "0.3",
                  "--calibration-text", str(text_file), "--calibration-tokens", "32"])
    results = perplexity.run(["--model", str(out), "--text", str(text_file), "--protocol", "sliding",
                               "--window", "16", "--stride", "8", "--max-tokens", "24"])
    assert "sliding windows of 16 tokens, stride 8" in capsys.readouterr().out
    [row] = results["rows"]
    assert (row["model"], row["method"], row["target_sparsity"], row["tokens"]) == ("spqt 4-bit g64 gptq (saved)", "uniform", 0.3, 23)
    model, tokenizer = checkpoint.load(out)
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)[:24]
    expected = perplexity.perplexity(model, tokens, window=16, protocol="sliding", stride=8)
    assert math.isclose(row["perplexity"], expected["perplexity"], rel_tol=1e-6)
    with pytest.raises(ValueError, match="baselines"):
        perplexity.run(["--model", str(out), "--text", str(text_file), "--baselines"])


def test_cli_errors(tiny_model_dir, tmp_path, text_file):
    with pytest.raises(FileNotFoundError):
        perplexity.run(["--model", str(tiny_model_dir), "--text", str(tmp_path / "none.txt")])
    with pytest.raises(ValueError, match="sparsity"):
        perplexity.run(["--model", str(tiny_model_dir), "--text", str(text_file), "--sparsity", "-0.1"])
    with pytest.raises(ValueError, match="stride"):
        perplexity.run(["--model", str(tiny_model_dir), "--text", str(text_file), "--stride", "4"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        perplexity.run(["--model", str(tiny_model_dir), "--text", str(tmp_path / "empty.txt")])


def test_command_line_exit_codes(tiny_model_dir, text_file, tmp_path):
    """Success exits 0 without printing the results dict to stderr; an expected error exits 2 with one line."""
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "spqt_mlx.perplexity", *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    done = cli("--model", tiny_model_dir, "--text", text_file, "--sparsity", "0", "--window", "16",
               "--max-tokens", "32", "--json", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    assert "{" not in done.stderr and json.loads((tmp_path / "r.json").read_text())
    failed = cli("--model", tiny_model_dir, "--text", tmp_path / "none.txt")
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(lines) == 1 and lines[0].startswith("spqt-perplexity: error:"), failed.stderr
