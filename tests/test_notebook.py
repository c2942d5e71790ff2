"""The quickstart notebook runs from top to bottom (on the CPU backend with tiny token counts)."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "spqt_quickstart.ipynb"


def test_quickstart_notebook_executes(real_model_dir, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="executing the notebook needs the 'test' extra (nbformat)")
    nbclient = pytest.importorskip("nbclient", reason="executing the notebook needs the 'test' extra (nbclient)")
    pytest.importorskip("ipykernel", reason="executing the notebook needs the 'test' extra (ipykernel)")
    pytest.importorskip("matplotlib", reason="the notebook plots with matplotlib (the 'test' extra)")

    # The kernel's temporary files go to a directory of their own, which must end up empty: the
    # notebook removes the model it converts. (MLX keeps its compiled-kernel cache there too.)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert sorted(p.name for p in scratch.iterdir() if p.name != "mlx") == []

    outputs = {i: "".join(o.get("text", "") for o in c.get("outputs", [])) for i, c in enumerate(nb.cells)
               if c.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert "Paris" in text
    assert "of the projection weights were skipped per decoded token" in text
    assert "dense" in text and "tok/s" in text
    assert "target 0.50" in text and "float model:" in text
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
