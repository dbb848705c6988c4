"""What the experiment scripts share: paths, running a command as its own measured process, the provenance every
results file records (commit and command), and writing a table into README.md between its markers.

tests/test_readme.py checks that each README region equals its results file and that the recorded commit is not
older than the code the table measures."""

from __future__ import annotations

import ast
import json
import pathlib
import re
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"


def measured_run(args: list[str]) -> dict:
  """Run `python <args>` in a fresh process under /usr/bin/time -v, from the repository root.

  The process must print one JSON object as its last stdout line; returned with process_wall_seconds,
  peak_rss_bytes (the whole process: load, work, save) and the command line added. A failure raises with the
  process's stderr tail."""
  command = ["/usr/bin/time", "-v", sys.executable, *args]
  start = time.perf_counter()
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if done.returncode != 0:
    raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
  result = json.loads(done.stdout.strip().splitlines()[-1])
  peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
  result.update(process_wall_seconds=wall, peak_rss_bytes=peak_kb * 1024,
                command=" ".join(command[2:]).replace(str(REPO) + "/", ""))
  return result


def write_readme_region(name: str, table: str, readme: pathlib.Path = REPO / "README.md") -> bool:
  """Replace what README holds between `<!-- table:<name> begin -->` and `<!-- table:<name> end -->`.
  Returns False (and leaves README alone) when the markers are missing."""
  begin, end = f"<!-- table:{name} begin -->", f"<!-- table:{name} end -->"
  text = readme.read_text() if readme.exists() else ""
  if begin not in text or end not in text:
    return False
  head, rest = text.split(begin, 1)
  readme.write_text(head + begin + "\n" + table + end + rest.split(end, 1)[1])
  return True


def commit() -> str:
  """The repository's HEAD commit (with "+dirty" when tracked files differ from it), recorded with each result."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
  head = git("rev-parse", "--short=12", "HEAD")
  # What the experiments themselves write (results files, README's table regions) does not make a run dirty.
  changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!experiments/results", ":!README.md")
  return head + ("+dirty" if changed else "")


def provenance() -> dict:
  """{"commit", "command"}: what produced a results file, recorded in it (the command as run from the root)."""
  script = pathlib.Path(sys.argv[0]).resolve()
  shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
  return {"commit": commit(), "command": " ".join(["python", str(shown), *sys.argv[1:]])}


def parse_settings(text: str) -> dict:
  """'key=value,key=value' (a script's overrides of a config) -> dict; each value a Python literal (True, 30, 1e-4)
  where it reads as one, true/false in any case as a bool, else the string itself."""
  out = {}
  for key, value in (item.split("=", 1) for item in text.split(",") if item):
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = {"true": True, "false": False}.get(value.lower(), value)
  return out
