"""Every notebook under notebooks/ runs top to bottom on CPU (each is a small real slice) and prints what its
committed outputs say: the same text, the same integers (shapes, counts, dtypes), the same figures to a
tolerance. Wall times ("12.3 s") are not compared. A notebook whose code no longer produces its stated results
(a changed storage layout, a worse KL) fails; rebuild it with notebooks/build_<name>.py."""

import pathlib
import re
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
# A number, or a wall time (a number followed by " s" or "s" as a word): times are masked, not compared.
NUMBER = re.compile(r"(?P<time>\d+(?:\.\d+)?\s?s\b)|(?P<num>[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)")


def _printed(cell) -> str:
  """What a code cell printed to stdout and its result's text (stderr holds warnings that vary by machine)."""
  parts = []
  for output in cell.get("outputs", []):
    if output["output_type"] == "stream" and output["name"] == "stdout":
      parts.append(output["text"])
    elif output["output_type"] == "execute_result":
      parts.append(output["data"].get("text/plain", ""))
  return "".join(parts)


def _tokens(text: str):
  """(text with numbers replaced by '#' and times by 'T', the numbers as strings)."""
  numbers = []

  def replace(match):
    if match.group("time"):
      return "T"
    numbers.append(match.group("num"))
    return "#"

  # Runs of spaces collapse: right-aligned columns shift when a number gains a digit.
  return re.sub(r" +", " ", NUMBER.sub(replace, text)), numbers


def _same_number(a: str, b: str) -> bool:
  """Integers exactly; floats to 5% or 1e-4 (figures computed on another CPU differ in their last digits, and a
  value at rounding-noise level, like a max difference of 3e-6, in more)."""
  if not any(c in a + b for c in ".eE"):
    return a == b
  x, y = float(a), float(b)
  return abs(x - y) <= 0.05 * max(abs(x), abs(y)) + 1e-4


def compare_outputs(committed: str, fresh: str) -> list[str]:
  """The differences between two printed texts, as messages (empty when they agree)."""
  (text_a, nums_a), (text_b, nums_b) = _tokens(committed), _tokens(fresh)
  if text_a != text_b:
    return [f"text differs:\n  committed: {committed!r}\n  now:       {fresh!r}"]
  return [f"{a} (committed) vs {b} (now) in {fresh!r}" for a, b in zip(nums_a, nums_b) if not _same_number(a, b)]


def test_compare_outputs_masks_times_and_keeps_the_rest():
  assert compare_outputs("RTN: 5.5 s, KL 0.0488 (1020 tokens)", "RTN: 7.1 s, KL 0.0490 (1020 tokens)") == []
  assert compare_outputs("KL 0.0488", "KL 0.0900")  # a figure that moved
  assert compare_outputs("packed (1536, 576) uint8", "packed (576, 1536) int8")  # a layout that changed
  assert compare_outputs("1020 tokens", "1019 tokens")
  assert compare_outputs("max 3.0e-06", "max 5.9e-06") == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_and_prints_its_committed_outputs(path):
  notebook = nbformat.read(path, as_version=4)
  committed = [_printed(cell) for cell in notebook.cells if cell.cell_type == "code"]
  start = time.perf_counter()
  NotebookClient(notebook, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()
  assert time.perf_counter() - start < 120, f"{path.name} took over two minutes"
  errors = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs
            if o.output_type == "error"]
  assert not errors
  fresh = [_printed(cell) for cell in notebook.cells if cell.cell_type == "code"]
  problems = [f"cell {i}: {p}" for i, (a, b) in enumerate(zip(committed, fresh)) for p in compare_outputs(a, b)]
  assert not problems, f"{path.name} no longer prints its committed outputs (rebuild it with " \
                       f"notebooks/build_{path.stem}.py):\n" + "\n".join(problems)
