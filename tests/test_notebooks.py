"""Every notebook under notebooks/ runs top to bottom on CPU (each is a small real slice)."""

import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
  notebook = nbformat.read(path, as_version=4)
  start = time.perf_counter()
  NotebookClient(notebook, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()
  assert time.perf_counter() - start < 120, f"{path.name} took over two minutes"
  errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
            if o.output_type == "error"]
  assert not errors
