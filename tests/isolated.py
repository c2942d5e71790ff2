"""Runs test code that could crash or hang the interpreter in a subprocess with a time limit, so
that a crash or a hang fails its test instead of the whole run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -c code`` with the test helpers importable; a hang raises subprocess.TimeoutExpired."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def expect_error(code: str, error: str, match: str, timeout: float = 120) -> None:
    """``code`` must raise ``error`` with ``match`` in its message (not crash, not hang)."""
    wrapped = f"""
try:
{chr(10).join('    ' + line for line in code.strip().splitlines())}
except {error} as e:
    print("RAISED", e)
else:
    print("NOTHING RAISED")
"""
    done = run_python(wrapped, timeout)
    assert done.returncode == 0, f"exit status {done.returncode}: {done.stderr[-2000:]}"
    assert done.stdout.startswith("RAISED") and match in done.stdout, done.stdout + done.stderr[-2000:]
