"""Where models come from: local directories, Hugging Face repo ids, GGUF files, short names.

Every CLI that takes ``--model`` resolves it here, so each accepts the same things.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import mlx.core as mx

from . import assets
from .layout import dtype_from_name

# Models known by a short name, fetched without the Hugging Face hub (see spqt_mlx.assets).
SHORT_NAMES = tuple(assets.MODELS)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_dtype() -> str:
    """float32 on the CPU (half-precision quantized matmuls are very slow there), else float16."""
    return "float32" if mx.default_device() == mx.cpu else "float16"


def resolve_short_name(model: str, *, dtype: str | None = None) -> str:
    """``model``, or for a short name (``"smollm2"``, ``"gemma3"``) the cached mlx-lm directory of that model.

    The directory holds ``dtype`` weights (default ``default_dtype()``); it is fetched and
    converted on first use.
    """
    if model not in SHORT_NAMES or Path(model).exists():  # a local directory of that name comes first
        return model
    return str(assets.model_dir(model, dtype=dtype or default_dtype()))


def load_source(model: str, *, dtype: str | None = None, progress: bool = True):
    """Load ``model`` (directory, repo id, ``.gguf`` or short name) with mlx-lm.

    Returns ``(model, tokenizer, config)``. ``dtype`` casts the float parameters (a GGUF is
    dequantized straight to it, default ``default_dtype()``). ``progress`` shows a progress bar
    while a GGUF is read.
    """
    from mlx_lm.utils import load

    if dtype is not None:
        dtype_from_name(dtype)
    model = resolve_short_name(model, dtype=dtype)
    path = Path(model).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; give a model directory, a repo id or a .gguf file.")
        from .gguf import gguf_to_mlx

        with tempfile.TemporaryDirectory(prefix="spqt-gguf-") as tmp:
            out = gguf_to_mlx(path, Path(tmp) / "model", dtype=dtype or default_dtype(), progress=progress)
            model_, tokenizer, config = load(str(out), return_config=True)
        return model_, tokenizer, config
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; it is not a model directory.")
        local = path
    elif _REPO_ID.match(model):
        local = _snapshot(model)
    else:
        raise FileNotFoundError(
            f"{model!r} is neither a model directory, a .gguf file, a Hugging Face repo id nor one of "
            f"the short names {', '.join(SHORT_NAMES)}."
        )
    model_, tokenizer, config = load(str(local), return_config=True)
    if dtype is not None:
        model_.set_dtype(dtype_from_name(dtype))
        config["torch_dtype"] = dtype
    return model_, tokenizer, config


def _snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo: all surface here
        raise FileNotFoundError(
            f"could not get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "give a local directory or a .gguf file instead."
        ) from e
