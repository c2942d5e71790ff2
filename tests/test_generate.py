"""The generate CLI: spqt-generate in process and mlx_lm.generate --spqt through the import hook."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import pytest

import mlx_lm
from spqt_mlx.generate import main

from lm_fixtures import TEXT, write_model_dir

COMMON = ["--prompt", "the quick brown fox", "--max-tokens", "12", "--ignore-chat-template", "--temp", "0"]
SPARSITY_LINE = re.compile(r"achieved sparsity ([0-9.]+)% per token \(mean over (\d+) decoded tokens\)")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    return write_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def generated_text(out: str) -> str:
    return out.split("==========")[1].strip()


def test_spqt_run_reports_speed_and_sparsity(model_dir, capsys):
    main(["--model", str(model_dir), *COMMON, "--spqt", "--sparsity", "0.5"])
    out = capsys.readouterr()
    assert "Generation: 12 tokens" in out.out and "tokens-per-sec" in out.out
    match = SPARSITY_LINE.search(out.out)
    assert match, out.out
    assert 30 < float(match.group(1)) < 70 and int(match.group(2)) >= 12
    assert "14 projections -> 4-bit zigzag" in out.err
    assert "self-generated text" in out.err


@pytest.mark.parametrize("fused", [True, False])
def test_sparsity_measured_after_generation_equals_counting_while_decoding(model_dir, fused):
    """The report replays the decoded tokens (decoded_sparsity) instead of counting in every
    layer while decoding; both give the same steps and sparsity."""
    from mlx_lm import load, stream_generate

    from spqt_mlx.calibrate import sparsify
    from spqt_mlx.patch import achieved_sparsity, fuse_shared_inputs, patch_model, record_stats
    from spqt_mlx.perplexity import decoded_sparsity

    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    patch_model(model, group_size=64, bits=4)
    sparsify(model, tokenizer.encode(TEXT)[:64], 0.5, progress=False)
    if fused:
        fuse_shared_inputs(model)
    prompt = tokenizer.encode("the quick brown fox jumps")
    assert decoded_sparsity(model, prompt, []) is not None
    record_stats(model)
    generated = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=10)]
    counted = achieved_sparsity(model)
    record_stats(model, False)
    replayed = decoded_sparsity(model, prompt, generated)
    assert replayed[1] == counted[1] == len(generated) + 1  # the prompt's last token and each generated one
    assert abs(replayed[0] - counted[0]) < 2e-3 and 0.3 < replayed[0] < 0.7
    with pytest.raises(ValueError, match="vocabulary"):
        decoded_sparsity(model, prompt, [10**6])
    sparsify(model, [], 0.0)
    assert decoded_sparsity(model, prompt, generated) is None


def test_report_without_replay_counts_in_the_layers(model_dir, capsys, monkeypatch):
    """With a prompt cache the steps cannot be replayed (the cache may hold an earlier run's
    context): the layers count instead, and the line is the same."""
    import importlib

    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from spqt_mlx.calibrate import sparsify
    from spqt_mlx.generate import _install_generate, _uninstall_generate
    from spqt_mlx.patch import patch_model

    model, tokenizer = load(str(model_dir))
    model.set_dtype(mx.float32)
    patch_model(model, group_size=64, bits=4)
    sparsify(model, tokenizer.encode(TEXT)[:64], 0.5, progress=False)
    namespace = vars(importlib.import_module("mlx_lm.generate"))
    original = namespace["generate"]
    _install_generate(namespace, {"model": model})
    try:
        lines = []
        for kw in ({}, {"prompt_cache": make_prompt_cache(model)}):
            namespace["generate"](model, tokenizer, "the quick brown fox", max_tokens=6, **kw)
            lines.append(SPARSITY_LINE.search(capsys.readouterr().err))
        # A report that fails costs the run its report, never its text.
        from spqt_mlx import perplexity

        def failing(*a, **kw):
            raise MemoryError("no room for the replay")

        monkeypatch.setattr(perplexity, "decoded_sparsity", failing)
        text = namespace["generate"](model, tokenizer, "the quick brown fox", max_tokens=6)
        err = capsys.readouterr().err
        assert text and "could not measure the achieved sparsity: no room for the replay" in err
    finally:
        _uninstall_generate(namespace)
    assert namespace["generate"] is original
    assert all(lines) and [m.group(2) for m in lines] == ["7", "7"]
    assert abs(float(lines[0].group(1)) - float(lines[1].group(1))) < 0.5


def test_runs_without_spqt_are_unchanged(model_dir, capsys):
    main(["--model", str(model_dir), *COMMON])
    out = capsys.readouterr()
    assert "SpQt" not in out.out and "[spqt]" not in out.err
    model, tokenizer = mlx_lm.load(str(model_dir))
    expected = mlx_lm.generate(model, tokenizer, "the quick brown fox", max_tokens=12)
    assert generated_text(out.out) == expected.strip()


def test_zero_sparsity_generates_what_the_dense_patched_model_does(model_dir, capsys):
    from spqt_mlx.patch import patch_model

    main(["--model", str(model_dir), *COMMON, "--spqt", "--sparsity", "0", "--bits", "8", "--group-size", "32",
          "--quantizer", "search"])
    out = capsys.readouterr()
    assert "8-bit zigzag (group size 32, search quantizer)" in out.err and "calibrating" not in out.err
    assert "quantizer auto" not in out.err
    assert "all thresholds 0: no sparse steps" in out.out
    model, tokenizer = mlx_lm.load(str(model_dir))
    patch_model(model, group_size=32, bits=8, quantizer="search")
    expected = mlx_lm.generate(model, tokenizer, "the quick brown fox", max_tokens=12)
    assert generated_text(out.out) == expected.strip()


def test_calibration_text_and_quiet_output(model_dir, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT * 4)
    main(["--model", str(model_dir), *COMMON, "--spqt", "--calibration-text", str(text), "--verbose", "False"])
    out = capsys.readouterr()
    assert f"of {text}" in out.err
    # Quiet runs keep stdout for the text; the SpQt line, with its own rate, goes to stderr.
    assert "SpQt" not in out.out and out.out.strip()
    assert SPARSITY_LINE.search(out.err) and "tokens-per-sec overall" in out.err


def test_gptq_quantizer_collects_statistics_before_patching(model_dir, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT * 4)
    main(["--model", str(model_dir), *COMMON, "--spqt", "--sparsity", "0", "--quantizer", "gptq",
          "--calibration-text", str(text)])
    out = capsys.readouterr()
    assert "gptq: input statistics of the float model on" in out.err and "calibration.txt" in out.err
    assert "4-bit zigzag (group size 64, gptq quantizer)" in out.err
    assert generated_text(out.out)


def test_gptq_and_thresholds_share_one_calibration_text(model_dir, capsys, monkeypatch):
    from spqt_mlx import texts

    drawn = []
    original = texts.calibration_tokens

    def counted(*a, **kw):
        drawn.append(original(*a, **kw))
        return drawn[-1]

    monkeypatch.setattr(texts, "calibration_tokens", counted)
    # The default quantizer, auto, takes gptq for a model this small.
    main(["--model", str(model_dir), *COMMON, "--spqt", "--sparsity", "0.4", "--calibration-tokens", "64"])
    out = capsys.readouterr()
    assert "quantizer auto -> gptq: the projections hold" in out.err and "gptq quantizer)" in out.err
    assert len(drawn) == 1 and "self-generated text" in out.err  # written once, by the float model
    assert SPARSITY_LINE.search(out.out)


def test_bad_options(model_dir, tmp_path, capsys):
    for bad in (["--sparsity", "1.5"], ["--bits", "7"], ["--calibration-text", str(tmp_path / "missing.txt")]):
        with pytest.raises(SystemExit):
            main(["--model", str(model_dir), *COMMON, "--spqt", *bad])
        assert "error" in capsys.readouterr().err


hook_installed = importlib.util.find_spec("_spqt_mlx_lm_hook") is not None


@pytest.mark.skipif(not hook_installed, reason="spqt-mlx is not pip-installed (no mlx_lm.generate hook)")
@pytest.mark.parametrize("how", ["console-script", "python -m"])
def test_mlx_lm_generate_spqt(model_dir, how):
    if how == "console-script":
        exe = shutil.which("mlx_lm.generate")
        if exe is None:
            pytest.skip("no mlx_lm.generate console script on PATH")
        cmd = [exe]
    else:
        cmd = [sys.executable, "-m", "mlx_lm.generate"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run(
        [*cmd, "--model", str(model_dir), *COMMON, "--spqt", "--sparsity", "0.4"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "tokens-per-sec" in run.stdout
    match = SPARSITY_LINE.search(run.stdout)
    assert match, run.stdout + run.stderr
    assert 20 < float(match.group(1)) < 60
    plain = subprocess.run([*cmd, "--help"], capture_output=True, text=True, env=env, timeout=300)
    assert "--spqt" in plain.stdout and "--calibration-method" in plain.stdout


@pytest.mark.skipif(not hook_installed, reason="spqt-mlx is not pip-installed (no mlx_lm.generate hook)")
def test_the_hook_is_import_cheap():
    code = "import sys; import _spqt_mlx_lm_hook; print(sorted(m for m in sys.modules if 'mlx' in m))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    loaded = eval(run.stdout)
    assert "mlx" not in loaded and "spqt_mlx" not in loaded and "mlx_lm" not in loaded


def test_install_wraps_and_restores_a_generate_namespace():
    import argparse

    from spqt_mlx.generate import install

    def setup_arg_parser():
        parser = argparse.ArgumentParser()
        parser.add_argument("--model")
        return parser

    def load(path, **kwargs):
        return ("model", "tokenizer", {"path": path})

    def generate(model, tokenizer, prompt, **kwargs):
        return "text"

    ns = {"setup_arg_parser": setup_arg_parser, "load": load, "generate": generate}
    restore = install(ns)
    assert install(ns)() is None  # a second install changes nothing
    args = ns["setup_arg_parser"]().parse_args(["--model", "m"])
    # No --sparsity: 0.5, or a converted directory's own thresholds.
    assert args.spqt is False and args.sparsity is None and args.calibration_method == "uniform"
    # Without --spqt everything passes straight through.
    assert ns["load"]("m", lazy=True) == ("model", "tokenizer", {"path": "m"})
    assert ns["generate"] is generate
    ns["setup_arg_parser"]().parse_args(["--model", "m", "--spqt"])
    assert ns["generate"] is not generate and ns["generate"]("other", "tok", "p") == "text"
    restore()
    assert ns == {"setup_arg_parser": setup_arg_parser, "load": load, "generate": generate}


def test_converted_directory_is_loaded_with_its_thresholds(model_dir, tmp_path, capsys):
    convert = pytest.importorskip("spqt_mlx.convert")
    out = tmp_path / "converted"
    convert.convert(str(model_dir), out, sparsity=0.5, calibration_tokens_count=128)
    capsys.readouterr()
    main(["--model", str(out), *COMMON, "--spqt"])
    captured = capsys.readouterr()
    assert "loaded the spqt-converted model" in captured.err and "calibrating" not in captured.err
    match = SPARSITY_LINE.search(captured.out)
    assert match and 30 < float(match.group(1)) < 70
    # --sparsity given for a converted directory recalibrates for it.
    main(["--model", str(out), *COMMON, "--spqt", "--sparsity", "0.2"])
    captured = capsys.readouterr()
    assert "calibrating uniform thresholds for 20% sparsity" in captured.err
    match = SPARSITY_LINE.search(captured.out)
    assert match and 5 < float(match.group(1)) < 40
    # Without --spqt: one clear line saying what to do, not mlx-lm's failure on zigzag weights.
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(out), *COMMON])
    assert exit_info.value.code == 2 and "pass --spqt" in capsys.readouterr().err


def test_the_hook_never_breaks_mlx_lm(monkeypatch, capsys):
    import argparse

    from spqt_mlx import _mlx_lm_hook

    def setup_arg_parser():
        return argparse.ArgumentParser(prog="mlx_lm.generate")

    ns = {"setup_arg_parser": setup_arg_parser}
    _mlx_lm_hook.install(ns)
    assert ns["setup_arg_parser"] is not setup_arg_parser
    monkeypatch.setitem(sys.modules, "spqt_mlx.generate", None)  # importing it now fails
    parser = ns["setup_arg_parser"]()
    assert parser.prog == "mlx_lm.generate" and "--spqt" not in parser.format_help()
    assert ns["setup_arg_parser"] is setup_arg_parser  # back to mlx-lm's own
    assert "hook is disabled" in capsys.readouterr().err
    _mlx_lm_hook.install({})  # nothing to wrap: no error


def test_negative_max_tokens_is_rejected(model_dir, capsys):
    for extra in ([], ["--spqt"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(model_dir), "--prompt", "x", "--max-tokens", "-1", *extra])
        assert exit_info.value.code == 2 and "--max-tokens must be 0 or more" in capsys.readouterr().err


def test_short_name_of_the_default_model(model_dir, monkeypatch, capsys):
    from spqt_mlx import assets, sources

    asked = []

    def cached_model_dir(name, cache_dir=None, *, dtype="float16"):
        asked.append((name, dtype))
        return model_dir

    monkeypatch.setattr(assets, "model_dir", cached_model_dir)
    main(["--model", "smollm2", *COMMON, "--spqt", "--sparsity", "0.4"])
    assert SPARSITY_LINE.search(capsys.readouterr().out)
    model, tokenizer, config = sources.load_source("gemma3")
    assert config["hidden_size"] == 128
    assert asked == [("smollm2", sources.default_dtype()), ("gemma3", sources.default_dtype())]


# ---- the other mlx-lm tools, through the import hook ---------------------------------------------


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny-chat-llama"), chat_template=True)


def mlx_lm_tool(tool, *args, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "mlx_lm", tool, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, **kwargs)


@pytest.mark.skipif(not hook_installed, reason="spqt-mlx is not pip-installed (no mlx-lm hook)")
def test_mlx_lm_chat_and_benchmark_spqt(chat_model_dir):
    chat = mlx_lm_tool("chat", "--model", chat_model_dir, "--spqt", "--sparsity", "0.4", "--max-tokens", "8",
                       input="hello there\nq\n")
    assert chat.returncode == 0, chat.stderr
    assert "[spqt] calibrating uniform thresholds for 40% sparsity" in chat.stderr and "tok/s" in chat.stdout
    bench = mlx_lm_tool("benchmark", "--model", chat_model_dir, "--spqt", "--sparsity", "0.4", "-p", "16", "-g", "8",
                        "-n", "1")
    assert bench.returncode == 0, bench.stderr
    assert "[spqt] calibrating" in bench.stderr and "Averages: prompt_tps=" in bench.stdout
    for tool in ("chat", "benchmark", "server"):
        assert "--spqt" in mlx_lm_tool(tool, "--help").stdout
    plain = mlx_lm_tool("benchmark", "--model", chat_model_dir, "-p", "16", "-g", "8", "-n", "1")
    assert plain.returncode == 0 and "[spqt]" not in plain.stderr


def rss_kb(pid: int) -> int:
    """Resident memory of a process, in KiB (ps works on Linux and macOS alike)."""
    return int(subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(not hook_installed, reason="spqt-mlx is not pip-installed (no mlx-lm hook)")
def test_mlx_lm_server_spqt_answers_an_openai_client(chat_model_dir, tmp_path):
    """mlx_lm.server --spqt on localhost, driven by the OpenAI Python client: a bounded load of
    rounds of concurrent requests (decoded as batches through the sparse batched products), every
    answer complete, and the server's memory flat from one round to the next."""
    import socket
    import time
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlx_lm", "server", "--model", str(chat_model_dir), "--spqt", "--sparsity", "0.4",
             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)

        def chat(i):
            return client.chat.completions.create(
                model="default_model", messages=[{"role": "user", "content": f"hello {i}, tell me about {i % 4}"}],
                max_tokens=6 + i % 3, temperature=0
            )

        memory = []
        for round_ in range(4):
            with ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(chat, range(6 * round_, 6 * round_ + 6)))
            assert [a.usage.completion_tokens for a in answers] == [6 + i % 3 for i in range(6 * round_, 6 * round_ + 6)]
            assert all(a.choices[0].message.content is not None for a in answers)
            memory.append(rss_kb(server.pid))
        # The first round allocates caches and compiled kernels; later rounds reuse them.
        assert memory[-1] - memory[1] < 64 * 1024, memory
        text = client.completions.create(model="default_model", prompt="the quick brown fox", max_tokens=5, temperature=0)
        assert text.usage.completion_tokens == 5
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(30)
    printed = log.read_text()
    assert "[spqt] 14 projections -> 4-bit zigzag" in printed and "[spqt] calibrating" in printed, printed


def test_spqt_generate_exit_codes(model_dir, tmp_path):
    """spqt-generate: 0 on success; 2 and one line, no traceback, for a model that is not there or
    a bad value."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "spqt_mlx.generate"]
    done = subprocess.run([*cmd, "--model", str(model_dir), *COMMON, "--spqt"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    for args, message in ((["--model", str(tmp_path / "nowhere")], "no such directory"),
                          (["--model", str(model_dir), "--max-tokens", "-3"], "--max-tokens"),
                          (["--model", str(model_dir), "--spqt", "--sparsity", "2"], "--sparsity")):
        failed = subprocess.run([*cmd, *args, "--prompt", "x"], capture_output=True, text=True, env=env, timeout=300)
        assert failed.returncode == 2, failed.stderr
        assert "Traceback" not in failed.stderr and message in failed.stderr.strip().splitlines()[-1]


def test_sparsity_auto_is_the_default(model_dir, capsys):
    main(["--model", str(model_dir), *COMMON, "--spqt", "--max-ppl-increase", "50"])
    err = capsys.readouterr().err
    assert "choosing the sparsity within a 50 % perplexity budget" in err and "sparsity auto:" in err
