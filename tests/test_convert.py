"""The convert CLI on a tiny model: sources, calibration, atomic output, errors."""

import json

import mlx.core as mx
import pytest

from spqt_mlx import checkpoint, convert, sources, texts
from spqt_mlx.layout import zigzag_dequantize, zigzag_quantize
from spqt_mlx.patch import get_criterion, get_thresholds, zigzag_layers
from spqt_mlx.patch.linear import DEFAULT_CRITERION
from spqt_mlx.perplexity import thresholded_inputs

CALIBRATION_TEXT = (
    "the river ran past the old mill and under the stone bridge, where children threw pebbles "
    "into the water and counted the rings. in the evening the lamps were lit along the road, "
    "and the baker closed his shutters while the last cart rolled home from the market. "
) * 4


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(CALIBRATION_TEXT)
    return path


def achieved(model, tokens):
    with thresholded_inputs(model) as wrapped:
        mx.eval(model(mx.array([tokens])), wrapped.counters())
        return wrapped.achieved()


def test_convert_with_calibration_text(tiny_model_dir, tmp_path, text_file, capsys):
    out = tmp_path / "spqt"
    summary = convert.run(["--model", str(tiny_model_dir), "--out", str(out), "--sparsity", "0.5",
                            "--calibration-text", str(text_file), "--calibration-tokens", "48",
                            "--json", str(tmp_path / "summary.json")])
    printed = capsys.readouterr().out
    # The default quantizer, auto, takes gptq for a model this small and says why.
    assert f"Saved {out}" in printed and "zigzag layers 14 (4-bit, group size 64, gptq quantizer)" in printed
    assert "quantizer auto -> gptq: the projections hold" in printed
    assert summary["layers"] == 14 and summary["calibration"] == "48 tokens of calibration.txt"
    assert json.loads((tmp_path / "summary.json").read_text())["out"] == str(out)
    model, tokenizer = checkpoint.load(out)
    spqt = json.loads((out / "config.json").read_text())["spqt"]
    assert (spqt["sparsity"], spqt["method"], spqt["source"]) == (0.5, "uniform", str(tiny_model_dir))
    assert spqt["quantizer"] == summary["quantizer"] == "gptq"
    assert spqt["criterion"] == summary["criterion"] == DEFAULT_CRITERION
    assert spqt["thresholds"] == get_thresholds(model) and min(spqt["thresholds"].values()) > 0
    # the saved thresholds skip about half of every projection's inputs on the calibration text
    tokens = texts.text_tokens(tokenizer, CALIBRATION_TEXT, 48)
    assert 0.4 < achieved(model, tokens) < 0.6


def test_convert_self_generated_greedy_from_gguf(tiny_gguf, tmp_path):
    out = tmp_path / "spqt"
    summary = convert.run(["--model", str(tiny_gguf[0]), "--out", str(out), "--sparsity", "0.4", "--bits", "3",
                            "--group-size", "32", "--calibration-method", "greedy", "--calibration-tokens", "32",
                            "--dtype", "float32", "--criterion", "wina"])
    assert summary["calibration"] == "32 tokens of self-generated text"
    model, _ = checkpoint.load(out)
    assert {(m.bits, m.group_size) for m in zigzag_layers(model).values()} == {(3, 32)}
    spqt = json.loads((out / "config.json").read_text())["spqt"]
    assert spqt["method"] == "greedy" and spqt["criterion"] == summary["criterion"] == get_criterion(model) == "wina"
    assert len(set(spqt["thresholds"].values())) > 1


def test_self_generated_tokens_are_reproducible(tiny_model_dir):
    model, tokenizer, _ = sources.load_source(str(tiny_model_dir))
    a = texts.self_generated_tokens(model, tokenizer, 24, seed=3)
    b = texts.self_generated_tokens(model, tokenizer, 24, seed=3)
    assert a == b and len(a) == 24
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": texts.CALIBRATION_PROMPTS[0]}],
                                           add_generation_prompt=True)
    assert a[: len(prompt)] == list(prompt)[:24]


def test_sparsity_zero_needs_no_calibration(tiny_model_dir, tmp_path, monkeypatch):
    import spqt_mlx.calibrate

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrate was called for sparsity 0")

    monkeypatch.setattr(spqt_mlx.calibrate, "calibrate", no_calibration)
    convert.run(["--model", str(tiny_model_dir), "--out", str(tmp_path / "dense"), "--sparsity", "0"])
    model, _ = checkpoint.load(tmp_path / "dense")
    assert set(get_thresholds(model).values()) == {0.0}


def test_repo_id_goes_through_the_hub(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(tiny_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    convert.run(["--model", "someone/tiny-llama", "--out", str(tmp_path / "o"), "--sparsity", "0"])
    assert asked == ["someone/tiny-llama"]

    def offline(repo_id, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="someone/other.*no network"):
        convert.run(["--model", "someone/other", "--out", str(tmp_path / "p")])
    assert not (tmp_path / "p").exists()


def test_failure_during_conversion_leaves_nothing(tiny_model_dir, tmp_path, text_file, monkeypatch):
    import spqt_mlx.calibrate

    def broken(*args, **kwargs):
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(spqt_mlx.calibrate, "_record", broken)  # the forward pass every calibration makes
    with pytest.raises(RuntimeError, match="calibration failed"):
        convert.run(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
                      "--calibration-text", str(text_file)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.txt"]


def test_bad_arguments(tiny_model_dir, tmp_path, text_file):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert.run(["--model", str(tiny_model_dir), "--out", str(existing)])
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="sparsity"):
        convert.run(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--sparsity", "1.0"])
    with pytest.raises(SystemExit):  # argparse: a number or 'auto'
        convert.run(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--sparsity", "most"])
    for bad in (1.0, "most", -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            convert.convert(str(tiny_model_dir), tmp_path / "o", sparsity=bad)
    with pytest.raises(FileNotFoundError):
        convert.run(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError):
        convert.run(["--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="not a .gguf"):
        convert.run(["--model", str(text_file), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="calibration text|text file"):
        convert.run(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
                      "--calibration-text", str(tmp_path / "none.txt")])
    with pytest.raises(ValueError, match="bits"):
        convert.run(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--bits", "7", "--sparsity", "0"])
    with pytest.raises(SystemExit):
        convert.run(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--calibration-method", "best"])
    with pytest.raises(SystemExit):
        convert.run(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--quantizer", "nearest"])
    with pytest.raises(ValueError, match="quantizer"):
        convert.convert(str(tiny_model_dir), tmp_path / "o", quantizer="nearest")
    with pytest.raises(SystemExit):
        convert.run(["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--criterion", "largest"])
    with pytest.raises(ValueError, match="criterion"):
        convert.convert(str(tiny_model_dir), tmp_path / "o", criterion="largest")
    assert not (tmp_path / "o").exists()


def test_the_quantizer_option_chooses_the_saved_weights(tiny_model_dir, tmp_path):
    # minmax writes mx.quantize's groups; search writes groups of lower error in the same format.
    source, _, _ = sources.load_source(str(tiny_model_dir), progress=False)
    weight = source.model.layers[0].mlp.down_proj.weight
    errors = {}
    for quantizer in ("minmax", "search"):
        out = tmp_path / quantizer
        convert.run(["--model", str(tiny_model_dir), "--out", str(out), "--sparsity", "0", "--quantizer", quantizer])
        layer = checkpoint.load(out)[0].model.layers[0].mlp.down_proj
        assert json.loads((out / "config.json").read_text())["spqt"]["quantizer"] == quantizer
        expected = zigzag_quantize(weight, 64, 4, quantizer=quantizer)
        assert mx.array_equal(layer.weight, expected.weight) and mx.array_equal(layer.scales, expected.scales)
        errors[quantizer] = mx.sum(mx.square(zigzag_dequantize(expected) - weight)).item()
    assert errors["search"] < errors["minmax"]


def test_gptq_quantizer_uses_the_calibration_text(tiny_model_dir, tmp_path):
    from lm_fixtures import TEXT

    text = tmp_path / "calibration.txt"
    text.write_text(TEXT * 8)
    outs = {}
    for quantizer in ("search", "gptq"):
        outs[quantizer] = tmp_path / quantizer
        convert.run(["--model", str(tiny_model_dir), "--out", str(outs[quantizer]), "--sparsity", "0",
                     "--quantizer", quantizer, "--calibration-text", str(text), "--calibration-tokens", "128"])
    spqt = json.loads((outs["gptq"] / "config.json").read_text())["spqt"]
    assert spqt["quantizer"] == "gptq" and "calibration.txt" in spqt["calibration"]
    search, gptq = (checkpoint.load(outs[q])[0].model.layers[0].mlp.down_proj for q in ("search", "gptq"))
    assert search.weight.shape == gptq.weight.shape and not mx.array_equal(search.weight, gptq.weight)


def cli(module, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_command_line_exit_codes(tiny_model_dir, tmp_path, text_file):
    """Success exits 0 with the summary on stdout only; an expected error exits 2 with one line and no traceback."""
    out = tmp_path / "spqt"
    done = cli("spqt_mlx.convert", "--model", tiny_model_dir, "--out", out, "--sparsity", "0.5",
               "--calibration-text", text_file, "--calibration-tokens", "32")
    assert done.returncode == 0, done.stderr
    assert f"Saved {out}" in done.stdout and "{" not in done.stderr
    for args, message in [(["--model", tiny_model_dir, "--out", out], "overwrite"),
                          (["--model", tmp_path / "nowhere", "--out", tmp_path / "o"], "nowhere"),
                          (["--model", tiny_model_dir, "--out", tmp_path / "o", "--sparsity", "1.5"], "sparsity")]:
        failed = cli("spqt_mlx.convert", *args)
        assert failed.returncode == 2
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("spqt-convert: error:") and message in lines[0], failed.stderr
    assert not (tmp_path / "o").exists()


def test_long_steps_show_progress(tiny_gguf, tmp_path, capsys):
    """Reading a GGUF, writing calibration text, quantizing, calibrating, checking a saved model and
    scoring perplexity windows each show a progress bar; progress=False silences them."""
    from spqt_mlx import perplexity

    out = tmp_path / "spqt"
    convert.convert(str(tiny_gguf[0]), out, sparsity=0.5, calibration_tokens_count=32, dtype="float32")
    model, tokenizer = checkpoint.load(out)
    perplexity.perplexity(model, list(range(3, 40)), window=16)
    err = capsys.readouterr().err
    for step in ("reading GGUF tensors", "writing calibration text", "zigzag-quantizing", "calibration forward",
                 "checking model.safetensors", "perplexity windows"):
        assert step in err, step
    convert.convert(str(tiny_gguf[0]), out, sparsity=0.5, calibration_tokens_count=32, dtype="float32",
                    overwrite=True, progress=False)
    checkpoint.load(out, progress=False)
    perplexity.perplexity(model, list(range(3, 40)), window=16, progress=False)
    assert "|" not in capsys.readouterr().err


def test_self_generated_text_leaves_the_global_random_state_alone(tiny_model_dir):
    """Calibration text is sampled with keys of its own: a user's sampling after it (--temp > 0
    without --seed) is not made the same on every run."""
    model, tokenizer, _ = sources.load_source(str(tiny_model_dir))
    mx.random.seed(11)
    want = mx.random.uniform(shape=(4,))
    mx.random.seed(11)
    texts.self_generated_tokens(model, tokenizer, 16, seed=3, progress=False)
    assert mx.array_equal(mx.random.uniform(shape=(4,)), want).item()
