"""Saved SpQt directories: exact round trip, atomic writes, and refusal of damaged directories."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from spqt_mlx import checkpoint, files
from spqt_mlx.patch import ZigzagLinear, get_thresholds, patch_model, set_thresholds

TOKENS = mx.array([[5, 70, 80, 90, 100, 110, 120, 130]])


def patched_tiny(model_dir, bits=4, group_size=64):
    from mlx_lm import load

    model, tokenizer, config = load(str(model_dir), return_config=True)
    paths = patch_model(model, group_size=group_size, bits=bits)
    # distinct, positive thresholds so that a mix-up between layers would show
    set_thresholds(model, {p: 0.01 + 0.002 * i for i, p in enumerate(paths)})
    return model, tokenizer, config


@pytest.fixture
def saved(tiny_model_dir, tmp_path):
    model, tokenizer, config = patched_tiny(tiny_model_dir)
    out = checkpoint.save(model, tokenizer, config, tmp_path / "spqt", {"bits": 4, "group_size": 64, "sparsity": 0.3,
                                                                         "method": "uniform", "source": "tiny"})
    return model, out


def decode_logits(model, tokens):
    """Logits of single-token steps (the sparse kernel path) after a dense prefill."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(tokens[:, :4], cache=cache)
    return mx.concatenate([model(tokens[:, i : i + 1], cache=cache) for i in range(4, tokens.shape[1])], axis=1)


def test_round_trip_is_exact(saved, tiny_model_dir):
    model, out = saved
    loaded, tokenizer = checkpoint.load(out)
    a, b = dict(tree_flatten(model.parameters())), dict(tree_flatten(loaded.parameters()))
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert mx.array_equal(a[name], b[name]).item(), name
    assert get_thresholds(loaded) == get_thresholds(model)
    assert all(isinstance(m, ZigzagLinear) for m in get_layers(loaded).values())
    assert mx.array_equal(loaded(TOKENS), model(TOKENS)).item()
    assert mx.array_equal(decode_logits(loaded, TOKENS), decode_logits(model, TOKENS)).item()
    from mlx_lm.utils import load_tokenizer

    original = load_tokenizer(tiny_model_dir)
    text = "hello world, <|im_start|>2024"
    assert tokenizer.encode(text) == original.encode(text)


def get_layers(model):
    from spqt_mlx.patch import zigzag_layers

    return zigzag_layers(model)


def test_directory_contents(saved):
    model, out = saved
    config = json.loads((out / "config.json").read_text())
    spqt = config["spqt"]
    assert spqt["format_version"] == checkpoint.FORMAT_VERSION
    assert (spqt["bits"], spqt["group_size"], spqt["sparsity"], spqt["method"], spqt["source"]) == (4, 64, 0.3, "uniform", "tiny")
    assert spqt["layers"] == sorted(get_layers(model))
    assert spqt["thresholds"] == get_thresholds(model)
    [(name, entry)] = spqt["files"].items()
    assert entry["sha256"] == files.sha256_file(out / name)
    weights = mx.load(str(out / name))
    layer = spqt["layers"][0]
    assert {f"{layer}.weight", f"{layer}.scales", f"{layer}.biases"} <= set(weights)
    assert weights[f"{layer}.weight"].dtype == mx.uint32
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_mlx_lm_load_with_trust_remote_code(saved):
    from mlx_lm import load

    model, out = saved
    loaded, _ = load(str(out), trust_remote_code=True)
    assert mx.array_equal(loaded(TOKENS), model(TOKENS)).item()
    assert get_thresholds(loaded) == get_thresholds(model)
    with pytest.raises(ValueError, match="trust_remote_code"):
        load(str(out))


class Boom(Exception):
    pass


def failing_tokenizer(tokenizer, monkeypatch):
    """Make saving fail after the weights are written, as a crash mid-save would."""

    def save_pretrained(path):
        assert any(p.suffix == ".safetensors" for p in Path(path).iterdir())
        raise Boom("disk full")

    class Wrapper:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

    w = Wrapper()
    w.save_pretrained = save_pretrained
    return w


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_failed_save_leaves_nothing(tiny_model_dir, tmp_path, error, monkeypatch):
    model, tokenizer, config = patched_tiny(tiny_model_dir)
    real_save = checkpoint.mx.save_safetensors

    def interrupted(path, arrays, metadata=None):
        real_save(path, arrays, metadata=metadata)  # a complete weight file, then the crash
        raise error()

    monkeypatch.setattr(checkpoint.mx, "save_safetensors", interrupted)
    with pytest.raises(error):
        checkpoint.save(model, tokenizer, config, tmp_path / "out", {"bits": 4, "group_size": 64})
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_directory(saved, tiny_model_dir, monkeypatch):
    _, out = saved
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    model, tokenizer, config = patched_tiny(tiny_model_dir, bits=8)
    with pytest.raises(Boom):
        checkpoint.save(model, failing_tokenizer(tokenizer, monkeypatch), config, out,
                        {"bits": 8, "group_size": 64}, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    checkpoint.load(out)


def test_overwrite(saved, tiny_model_dir):
    _, out = saved
    model, tokenizer, config = patched_tiny(tiny_model_dir, bits=8)
    with pytest.raises(FileExistsError):
        checkpoint.save(model, tokenizer, config, out, {"bits": 8, "group_size": 64})
    assert json.loads((out / "config.json").read_text())["spqt"]["bits"] == 4
    checkpoint.save(model, tokenizer, config, out, {"bits": 8, "group_size": 64}, overwrite=True)
    loaded, _ = checkpoint.load(out)
    assert all(m.bits == 8 for m in get_layers(loaded).values())
    assert mx.array_equal(loaded(TOKENS), model(TOKENS)).item()
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def rewrite_weights(out, change):
    """Apply ``change`` to the saved tensors and record the new file's sha256, so that only the
    tensor checks can catch it."""
    config = json.loads((out / "config.json").read_text())
    [(name, entry)] = config["spqt"]["files"].items()
    weights = dict(mx.load(str(out / name)))
    change(weights)
    mx.save_safetensors(str(out / name), weights)
    entry["sha256"] = files.sha256_file(out / name)
    entry["tensors"] = sorted(weights)
    (out / "config.json").write_text(json.dumps(config))


def test_corrupted_weight_file_is_refused(saved):
    _, out = saved
    f = out / checkpoint.WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the tensor data
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        checkpoint.load(out)


def test_missing_tensor_is_refused(saved):
    _, out = saved
    layer = json.loads((out / "config.json").read_text())["spqt"]["layers"][0]
    rewrite_weights(out, lambda w: w.pop(f"{layer}.scales"))
    with pytest.raises(ValueError, match=f"missing tensors.*{layer}.scales"):
        checkpoint.load(out)


def test_wrong_shape_is_refused(saved):
    _, out = saved
    layer = json.loads((out / "config.json").read_text())["spqt"]["layers"][0]

    def shrink(w):
        w[f"{layer}.biases"] = w[f"{layer}.biases"][:, :-1]

    rewrite_weights(out, shrink)
    with pytest.raises(ValueError, match=f"{layer}.biases has shape"):
        checkpoint.load(out)


def test_extra_tensor_is_refused(saved):
    _, out = saved
    rewrite_weights(out, lambda w: w.update({"model.extra.weight": mx.zeros((2,))}))
    with pytest.raises(ValueError, match="unexpected tensors"):
        checkpoint.load(out)


def test_missing_weight_file_is_refused(saved):
    _, out = saved
    (out / checkpoint.WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        checkpoint.load(out)


def test_format_version_mismatch_is_refused(saved):
    _, out = saved
    config = json.loads((out / "config.json").read_text())
    config["spqt"]["format_version"] = checkpoint.FORMAT_VERSION + 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format version"):
        checkpoint.load(out)


def test_not_a_checkpoint(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="not an SpQt checkpoint"):
        checkpoint.load(tiny_model_dir)
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "nothing")
    assert not checkpoint.is_spqt_checkpoint(tiny_model_dir)


def test_save_checks_its_arguments(tiny_model_dir, tmp_path):
    from mlx_lm import load

    model, tokenizer, config = load(str(tiny_model_dir), return_config=True)
    with pytest.raises(ValueError, match="no zigzag layers"):
        checkpoint.save(model, tokenizer, config, tmp_path / "a", {"bits": 4, "group_size": 64})
    patch_model(model, group_size=64, bits=4)
    with pytest.raises(ValueError, match="bits/group_size"):
        checkpoint.save(model, tokenizer, config, tmp_path / "a", {"bits": 3, "group_size": 64})
    path = next(iter(get_layers(model)))
    with pytest.raises(ValueError, match="disagrees"):
        checkpoint.save(model, tokenizer, config, tmp_path / "a", {"bits": 4, "group_size": 64, "thresholds": {path: 0.5}})
    with pytest.raises(TypeError):
        checkpoint.save(model, tokenizer, config, tmp_path / "a", None)
    assert list(tmp_path.iterdir()) == []


def test_group_size_and_bits_survive(tiny_model_dir, tmp_path):
    model, tokenizer, config = patched_tiny(tiny_model_dir, bits=3, group_size=128)
    out = checkpoint.save(model, tokenizer, config, tmp_path / "g128", {"bits": 3, "group_size": 128})
    loaded, _ = checkpoint.load(out)
    assert {(m.bits, m.group_size) for m in get_layers(loaded).values()} == {(3, 128)}
    np.testing.assert_array_equal(np.array(loaded(TOKENS)), np.array(model(TOKENS)))


def test_quantized_source_keeps_its_other_quantized_layers(tiny_model_dir, tmp_path):
    """From an MLX-quantized model, the projections become zigzag layers and the embedding stays
    MLX-quantized; both loaders rebuild that mix."""
    import mlx.nn as nn
    from mlx_lm import load

    model, tokenizer, config = load(str(tiny_model_dir), return_config=True)
    nn.quantize(model, group_size=64, bits=4)
    config["quantization"] = {"group_size": 64, "bits": 4, "mode": "affine"}
    patch_model(model, group_size=64, bits=4)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    out = checkpoint.save(model, tokenizer, config, tmp_path / "q", {"bits": 4, "group_size": 64})
    for loaded in (checkpoint.load(out)[0], load(str(out), trust_remote_code=True)[0]):
        assert isinstance(loaded.model.embed_tokens, nn.QuantizedEmbedding)
        assert len(get_layers(loaded)) == 14
        assert mx.array_equal(loaded(TOKENS), model(TOKENS)).item()


def test_manifest_cannot_name_files_outside_the_directory(saved, tmp_path):
    """config.json is data from wherever the directory came from: its file names must not make load() read
    files elsewhere (a '..' path, an absolute path, a link out of the directory), even matching ones."""
    import shutil

    _, out = saved
    original = (out / "config.json").read_text()
    outside = tmp_path / "elsewhere" / checkpoint.WEIGHTS_FILE
    outside.parent.mkdir()
    shutil.copy(out / checkpoint.WEIGHTS_FILE, outside)  # same bytes: the sha256 check alone would pass
    (out / "link.safetensors").symlink_to(outside)
    for name in [f"../{tmp_path.name}/elsewhere/{checkpoint.WEIGHTS_FILE}", str(outside), "link.safetensors"]:
        config = json.loads(original)
        config["spqt"]["files"] = {name: next(iter(config["spqt"]["files"].values()))}
        (out / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match="not a file of this directory"):
            checkpoint.load(out)


@pytest.mark.parametrize("key,value", [("files", ["model.safetensors"]), ("thresholds", [0.1]), ("layers", "q_proj"),
                                       ("bits", "4"), ("group_size", True)])
def test_malformed_manifest_types_are_refused(saved, key, value):
    _, out = saved
    config = json.loads((out / "config.json").read_text())
    config["spqt"][key] = value
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"spqt {key}.*wrong type"):
        checkpoint.load(out)


def test_replacement_killed_between_its_renames_is_recovered(tmp_path):
    """A process killed after moving the old directory aside and before moving the new one in
    leaves no directory at the target; the next write to it puts the old one back first."""
    import subprocess
    import sys

    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    code = f"""
import os, signal
from pathlib import Path
from spqt_mlx import files
target = Path({str(target)!r})
real = os.replace
def replace(src, dst):
    if Path(dst) == target and ".tmp-" in Path(src).name:
        os.kill(os.getpid(), signal.SIGKILL)  # between the two renames
    return real(src, dst)
os.replace = replace
with files.atomic_directory(target, overwrite=True) as tmp:
    (tmp / "new.txt").write_text("new")
"""
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert not target.exists()
    with pytest.raises(FileNotFoundError, match="interrupted replacement"):
        checkpoint.read_spqt_config(target)
    with pytest.raises(FileExistsError):  # the old directory is back, so not replaced without overwrite
        with files.atomic_directory(target):
            pass
    assert (target / "old.txt").read_text() == "old"
    with files.atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model.old-")) == []


def test_writer_killed_midway_leaves_nothing_after_the_next_write(tmp_path):
    """A writer killed before its rename leaves its temporary directory; the next write to the same
    target removes it (a live writer's is kept)."""
    import subprocess
    import sys

    target = tmp_path / "model"
    code = f"""
import os, signal
from pathlib import Path
from spqt_mlx import files
with files.atomic_directory(Path({str(target)!r})) as tmp:
    (tmp / "part.safetensors").write_bytes(b"x" * 1000)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.tmp-"), left
    live = tmp_path / f".model.tmp-{files._writer()}-live"  # a writer of this host that still runs
    elsewhere = tmp_path / ".model.tmp-otherhost-999999-x"  # another machine's writer: not ours to judge
    live.mkdir()
    elsewhere.mkdir()
    with files.atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name, elsewhere.name])


def test_atomic_write_text(tmp_path):
    path = tmp_path / "summary.json"
    files.atomic_write_text(path, "first")
    files.atomic_write_text(path, "second")
    assert path.read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    with pytest.raises(OSError):
        files.atomic_write_text(tmp_path / "missing" / "x.json", "never")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
