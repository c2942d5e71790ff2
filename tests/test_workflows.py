"""The CI workflows (.github/workflows) are valid, and their steps are commands that work here too.

The macOS workflow cannot run on Linux, so each file is checked against GitHub's workflow schema
(check-jsonschema's vendored copy, offline), and every step that is not marked macOS-only runs here
as written, or is a script this suite covers otherwise.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spqt_mlx.selftest import gpu_available

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def lint(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    return subprocess.run([exe, "--builtin-schema", "vendor.github-workflows", str(path)],
                          capture_output=True, text=True, timeout=120)


def portable_steps(path: Path) -> list[str]:
    """The ``run:`` commands of the steps without a macOS-only condition."""
    workflow = yaml.safe_load(path.read_text())
    commands = []
    for job in workflow["jobs"].values():
        for step in job["steps"]:
            if "run" in step and "macOS" not in str(step.get("if", "")):
                commands.append(step["run"].strip())
    return commands


def test_there_is_a_macos_workflow():
    assert any(yaml.safe_load(p.read_text())["jobs"]["apple-gpu"]["runs-on"].startswith("macos") for p in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_valid(path, tmp_path):
    done = lint(path)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / path.name  # the linter is not vacuous: a job without runs-on is refused
    broken.write_text(path.read_text().replace("runs-on:", "runs-where:"))
    assert lint(broken).returncode != 0


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_portable_steps_work_here(path, tmp_path):
    for command in portable_steps(path):
        argv = shlex.split(command)
        if argv == ["bash", ".ci/run"]:
            # The CI entry point itself: it runs this suite (README's test command).
            assert os.access(ROOT / ".ci" / "run", os.R_OK)
            continue
        assert argv[0] == ".venv/bin/python", f"a step this test does not know how to run here: {command}"
        # Run it as written, with this interpreter in place of the workflow's virtual environment.
        # Where a GPU backend is present (the Apple runner itself) the step times every kernel and
        # decodes a real model, which the workflow's next step does anyway: checks only, here.
        extra = ["--no-timing"] if gpu_available() and "spqt_mlx.selftest" in argv else []
        done = subprocess.run([sys.executable, *argv[1:], *extra], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    results = json.loads((tmp_path / "selftest.json").read_text())  # what the upload step sends back
    assert results["checks"]["passed"] and results["versions"]["spqt-mlx"]


def test_selftest_measurements(real_model_dir, tmp_path):
    """The selftest's GEMV and decode comparison (what a Mac sends back), on the CPU with tiny sizes."""
    out = tmp_path / "selftest.json"
    done = subprocess.run([sys.executable, "-m", "spqt_mlx.selftest", "--quick", "--timing-on-cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["timed_on"] in ("cpu", "gpu")
    variants = {(r["rows"], r["variant"], r["density"]) for r in results["gemv"]}
    assert (1, "mx.quantized_matmul", 1.0) in variants and (1, "zigzag collect+sparse", 0.5) in variants
    assert (4, "mx.quantized_matmul", 1.0) in variants and (4, "zigzag threshold", 0.5) in variants
    assert all(r["us"] > 0 for r in results["gemv"])
    assert [(r["model"], r["sparsity"]) for r in results["decode"]] == [
        ("mlx-lm 4-bit (nn.QuantizedLinear)", 0.0), ("zigzag 4-bit", 0.0), ("zigzag 4-bit", 0.5)]
    assert all(r["decode_tps"] > 0 for r in results["decode"])
    assert "speedup over mlx-lm 4-bit" in done.stdout
