"""dispatch/metal.cpp, the first code a Mac runs, compiled syntax-only on Linux.

The headers come from MLX's own macOS wheel (``mlx-metal``, same version as the installed mlx):
MLX's Metal backend and Apple's metal-cpp. Apple's system headers are replaced by the few
declarations metal-cpp needs (host_stubs/). A compile error, a wrong MLX API call or a missing
include fails; the test is skipped only when clang or the wheel cannot be had (.ci/run installs
clang).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parents[2]
STUBS = Path(__file__).resolve().parent / "host_stubs"


@pytest.fixture(scope="module")
def clang():
    compiler = shutil.which("clang++") or shutil.which("clang++-14")
    if compiler is None:
        pytest.skip("no clang++ (metal-cpp uses blocks, which only clang compiles); .ci/run installs it")
    return compiler


@pytest.fixture(scope="module")
def mlx_metal_include(tmp_path_factory):
    """include/ of the mlx-metal wheel for the installed mlx version, downloaded once per cache."""
    from spqt_mlx.assets import resolve_cache_dir

    version = mx.__version__
    root = resolve_cache_dir() / f"mlx-metal-{version}"
    include = root / "include"
    if (include / "mlx" / "backend" / "metal" / "device.h").is_file():
        return include
    download = tmp_path_factory.mktemp("mlx-metal")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--platform",
           "macosx_14_0_arm64", "--disable-pip-version-check", "--quiet", "--dest", str(download),
           f"mlx-metal=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wheels = sorted(download.glob("mlx_metal-*.whl"))
    if done.returncode != 0 or not wheels:
        pytest.skip(f"could not download mlx-metal=={version} (needs PyPI): {done.stderr.strip()[-300:]}")
    staging = tmp_path_factory.mktemp("mlx-metal-include")
    with zipfile.ZipFile(wheels[0]) as wheel:
        for name in wheel.namelist():
            if name.startswith("mlx/include/"):
                wheel.extract(name, staging)
    root.mkdir(parents=True, exist_ok=True)
    target = root / "include"
    if not target.exists():
        # Copied beside the cache first (the temp dir may be another filesystem), then renamed in.
        beside = Path(tempfile.mkdtemp(prefix=".include-", dir=root))
        shutil.copytree(staging / "mlx" / "include", beside / "include")
        try:
            os.replace(beside / "include", target)
        except OSError:
            if not target.exists():
                raise
        finally:
            shutil.rmtree(beside, ignore_errors=True)
    return target


def compile_metal_host(clang, include, source: Path) -> subprocess.CompletedProcess:
    cmd = [clang, "-fsyntax-only", "-std=c++20", "-fblocks", "-Wall", "-Wextra", "-Werror", "-D_METAL_",
           "-I", str(STUBS), "-I", str(ROOT), "-I", str(ROOT / "dispatch"),
           "-isystem", str(include), "-isystem", str(include / "metal_cpp"), str(source)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_metal_host_code_compiles(clang, mlx_metal_include):
    done = compile_metal_host(clang, mlx_metal_include, ROOT / "dispatch" / "metal.cpp")
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("right,wrong", [
    ("encoder_.set_input_array(a, slot);", "encoder_.set_input_arrays(a, slot);"),  # no such MLX call
    ("pipeline_->maxTotalThreadsPerThreadgroup()", "pipeline_->maxThreadsPerThreadgroup()"),  # no such Metal call
    ('#include "mlx/backend/metal/device.h"\n', ""),  # a missing include
])
def test_a_wrong_call_fails_the_compile(clang, mlx_metal_include, tmp_path, right, wrong):
    source = (ROOT / "dispatch" / "metal.cpp").read_text()
    assert source.count(right) == 1, f"metal.cpp no longer contains {right!r}: update this test"
    broken = tmp_path / "metal.cpp"
    broken.write_text(source.replace(right, wrong))
    done = compile_metal_host(clang, mlx_metal_include, broken)
    assert done.returncode != 0 and "error" in done.stderr
