"""Shared by the notebooks/build_*.py scripts: turn a list of (kind, source) cells into an executed notebook."""

import pathlib

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent


def build(cells) -> nbformat.NotebookNode:
  """cells: [("markdown" | "code", source), ...] -> an unexecuted notebook."""
  notebook = nbformat.v4.new_notebook()
  for kind, source in cells:
    cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
    notebook.cells.append(cell)
  notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  return notebook


def write_executed(cells, filename: str) -> None:
  """Execute the cells in a fresh kernel (run from notebooks/) and write notebooks/<filename> with outputs."""
  notebook = build(cells)
  NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
  nbformat.write(notebook, HERE / filename)
  print("wrote", HERE / filename)
