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
from lm_fixtures import free_ports, launcher

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
# Sharded over two processes with group size 32: tests whose tiny models have a projection that is
# not a whole number of 32-row bands per rank (32 or 96 output rows). mlx-lm's shard() raises the
# ValueError naming the layer (patch/sharded.py); real models' projections split evenly.
UNEVEN_SPLITS = {
    "test_deepseek_v41": "a projection of 96 rows",
    "test_llama_model_sliding_attention": "a projection of 32 rows",
    "test_minimax_m3_vl": "a projection of 96 rows",
    "test_all_models[glm4_moe_lite]": "a projection of 96 rows",
    "test_all_models[kimi_k3]": "a projection of 96 rows",
    "test_all_models[minimax_m3_vl]": "a projection of 96 rows",
}
REFUSED_FAMILIES = {"deepseek_v41", "glm4_moe_lite", "kimi_k3", "minimax_m3_vl"}
EXPECTED_SPARSE = 0.05  # the threshold of the sparse runs
EXPECTED = {0.0: ASSUME_FLOAT_WEIGHTS, EXPECTED_SPARSE: {**ASSUME_FLOAT_WEIGHTS, **DENSE_VERSUS_SPARSE}}


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


def failing(test_file: Path, threshold: float | None, patch: str = "spqt",
            shard: bool = False) -> tuple[set[str], str, set[str]]:
    """Names of the tests (or of tests with a failing subtest) that fail, pytest's summary, and the
    model types sharded.

    ``threshold`` None runs the tests as they are; else every model is patched (``patch``: "spqt",
    "mlx" or "none", see the plugin) with that threshold. ``shard`` runs them in two processes
    (mlx.launch, ring backend), every model sharded over both, and only the families with shard().
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", str(test_file.name)]
    if threshold is not None:
        cmd[5:5] = ["-p", "spqt_patch_plugin"]
        env.update(SPQT_TEST_THRESHOLD=str(threshold), SPQT_TEST_PATCH=patch)
    if shard:
        env["SPQT_TEST_SHARD"] = "1"
        # "--": the tool's options (pytest's -p) are not mlx.launch's.
        cmd = [launcher(), "-n", "2", "--backend", "ring", "--starting-port", str(free_ports()), "--python",
               sys.executable, "--", *cmd[1:]]
    done = subprocess.run(cmd, cwd=test_file.parent, capture_output=True, text=True, env=env, timeout=1200)
    out = done.stdout
    summary = out.strip().splitlines()[-1] if out.strip() else done.stderr[-2000:]
    assert re.search(r"\d+ passed", summary), out[-4000:] + done.stderr[-2000:]
    # With two processes both ranks report: a test fails if it fails on either. A failing subtest of
    # the test that loops over families is named by its family.
    names = set()
    for line in re.findall(r"^(?:FAILED|SUBFAILED)\b.*$", out, re.M):
        test = re.search(r"::TestModels::(\w+)", line)
        family = re.match(r"SUBFAILED\[Testing (\w+)\]", line)
        if test:
            names.add(f"{test[1]}[{family[1]}]" if family else test[1])
    if threshold is not None and patch != "none":
        assert "spqt:" in out and " 0 model instances patched" not in out, out[-2000:]
    sharded = {t for line in re.findall(r"^spqt: sharded (.*)$", out, re.M) for t in line.split()}
    return names, summary, sharded


def test_mlx_lm_model_tests_pass_patched(mlx_lm_test_models):
    baseline, _, _ = failing(mlx_lm_test_models, None)  # e.g. Metal-only kernels on Linux
    for threshold, expected in EXPECTED.items():
        failed, summary, _ = failing(mlx_lm_test_models, threshold)
        new = failed - baseline
        # A listed test that already fails without the patch on this platform is not a new failure.
        assert new == set(expected) - baseline, (
            f"threshold {threshold}: failing because of the patch {sorted(new)}, expected {sorted(expected)} ({summary})"
        )



def test_mlx_lm_model_tests_pass_patched_and_sharded(mlx_lm_test_models):
    """The tests of the families with shard(), every model sharded over two processes (after it is
    patched, sparse): what passes sharded unpatched passes sharded patched, listed exceptions
    aside, and the same families shard."""
    baseline, _, families = failing(mlx_lm_test_models, 0.0, patch="none", shard=True)
    failed, summary, sharded = failing(mlx_lm_test_models, EXPECTED_SPARSE, shard=True)
    new = failed - baseline
    assert new <= set(EXPECTED[EXPECTED_SPARSE]) | set(UNEVEN_SPLITS), (
        f"failing sharded because of the patch {sorted(new)} ({summary})")
    assert families - sharded == REFUSED_FAMILIES and len(sharded) >= 15, (families, sharded)
