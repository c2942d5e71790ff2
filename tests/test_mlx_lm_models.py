"""mlx-lm's own model tests, unchanged, with every model patched by SpQt before its first forward.

``tests/test_models.py`` is taken from the sdist of the installed mlx-lm version (downloaded once,
cached) and run in a subprocess three times: as it is (what fails on this platform without SpQt),
patched with dense zigzag layers (threshold 0), and patched with sparse ones (a small positive
threshold: single-token steps skip inputs). Every test must pass patched that passes unpatched,
except the ones listed below with their reasons.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parent / "mlx_lm_suite"

# Tests that fail for any quantized model: mlx-lm's own quantization (nn.QuantizedLinear over the
# same layers, SPQT_TEST_PATCH=mlx) fails them the same way.
ASSUME_FLOAT_WEIGHTS = {
    "test_minicpm3": "its left-padding check casts every parameter to float32, the packed integer weights too",
    "test_phixtral": "its left-padding check casts every parameter to float32, the packed integer weights too",
    "test_falcon_h1_without_cache": "it takes gradients of the projection weights, which quantized layers keep frozen",
    "test_prism_hadamard_qwen35_matches_qwen3_5": "it compares two models whose weights differ by a rotation to "
    "2e-2; quantizing each rounds them differently",
}
# Tests that compare a dense multi-token pass with single-token steps: with a positive threshold the
# steps run sparse, so they differ by what sparsity skips.
DENSE_VERSUS_SPARSE = {
    "test_llama4_chunked_kv_cache": "a 12-token forward pass against 12 single-token steps, to 1e-3",
}
EXPECTED = {0.0: ASSUME_FLOAT_WEIGHTS, 0.05: {**ASSUME_FLOAT_WEIGHTS, **DENSE_VERSUS_SPARSE}}


@pytest.fixture(scope="module")
def mlx_lm_test_models(tmp_path_factory) -> Path:
    """mlx-lm's tests/test_models.py from the sdist of the installed version."""
    from spqt_mlx.assets import resolve_cache_dir

    v = version("mlx-lm")
    cached = resolve_cache_dir() / f"mlx-lm-{v}-tests" / "test_models.py"
    if not cached.is_file():
        download = tmp_path_factory.mktemp("mlx-lm-sdist")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--disable-pip-version-check",
               "--quiet", "--dest", str(download), f"mlx-lm=={v}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        sdists = sorted(download.glob("mlx_lm-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            pytest.skip(f"could not download the mlx-lm {v} sdist (needs PyPI): {done.stderr.strip()[-300:]}")
        with tarfile.open(sdists[0]) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/tests/test_models.py"))
            data = tar.extractfile(member).read()
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(cached)
    # A directory of its own: pytest puts the test file's directory on sys.path.
    work = tmp_path_factory.mktemp("mlx-lm-tests")
    (work / "test_models.py").write_bytes(cached.read_bytes())
    return work / "test_models.py"


def failing(test_file: Path, threshold: float | None) -> tuple[set[str], str]:
    """Names of the tests (or of tests with a failing subtest) that fail, and pytest's summary."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", str(test_file.name)]
    if threshold is not None:
        cmd[5:5] = ["-p", "spqt_patch_plugin"]
        env["SPQT_TEST_THRESHOLD"] = str(threshold)
    done = subprocess.run(cmd, cwd=test_file.parent, capture_output=True, text=True, env=env, timeout=1200)
    out = done.stdout
    summary = out.strip().splitlines()[-1] if out.strip() else done.stderr[-2000:]
    assert re.search(r"\d+ passed", summary), out[-4000:] + done.stderr[-2000:]
    names = set(re.findall(r"^(?:FAILED|SUBFAILED)\b.*?::TestModels::(\w+)", out, re.M))
    if threshold is not None:
        assert "spqt:" in out and " 0 model instances patched" not in out, out[-2000:]
    return names, summary


def test_mlx_lm_model_tests_pass_patched(mlx_lm_test_models):
    baseline, _ = failing(mlx_lm_test_models, None)  # e.g. Metal-only kernels on Linux
    for threshold, expected in EXPECTED.items():
        failed, summary = failing(mlx_lm_test_models, threshold)
        new = failed - baseline
        # A listed test that already fails without the patch on this platform is not a new failure.
        assert new == set(expected) - baseline, (
            f"threshold {threshold}: failing because of the patch {sorted(new)}, expected {sorted(expected)} ({summary})"
        )
