"""README's tables equal their results files, and each results file is not older than the code it measures.

Each `<!-- table:NAME begin/end -->` region of README.md is written by an experiment script (through
experiments/common.write_readme_region) from a results file that records the commit and the command that produced
it. Two checks per table:

1. The region equals the results file's rendering (the `.md` the script wrote beside its `.json`; for `gpu`, the
   table gpu_check.py renders from its two reports).
2. The recorded commit is not older than the last git change to the code the table measures: DEPENDS_ON below
   names, per table, the experiment script and the method file(s) whose algorithm the figures come from. Not the
   whole package (shared plumbing such as the CLI, loaders or this harness is refactored without changing
   figures, and every such refactor would otherwise invalidate every table); a change to those files must come
   with a rerun. Rows rerun one by one each record their commit; a file where some rows record one and others do
   not holds rows left from an older run and fails. Skipped, with the reason, outside a git checkout and for
   results files that record no commit.
"""

import json
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
sys.path.insert(0, str(REPO / "experiments"))

# table -> (results file, files whose last change the recorded commit must include)
DEPENDS_ON = {
    "w8a8": ("zeroquant_w8a8.json", ["experiments/zeroquant_w8a8.py", "jaxquant/methods/zeroquant.py"]),
    "w8a8_layers": ("w8a8_layers.json", ["experiments/w8a8_layers.py"]),
    "lutgemm": ("lutgemm.json", ["experiments/lutgemm.py", "jaxquant/methods/bcq.py", "jaxquant/methods/bcq_core.py"]),
    "zeroquant": ("zeroquant.json", ["experiments/zeroquant.py", "jaxquant/methods/zeroquant.py",
                                     "jaxquant/methods/lkd.py"]),
    "repquant": ("repquant.json", ["experiments/repquant.py", "jaxquant/methods/repquant.py",
                                   "jaxquant/methods/repquant_core.py", "jaxquant/methods/repquant_layers.py",
                                   "jaxquant/methods/repquant_finish.py"]),
    "repquant_vit": ("repquant_vit.json", ["experiments/repquant_vit.py", "jaxquant/methods/repquant.py",
                                           "jaxquant/methods/repquant_core.py", "jaxquant/methods/repquant_layers.py",
                                           "jaxquant/methods/repquant_finish.py"]),
    "scaling": ("scaling.json", ["experiments/scaling.py", "jaxquant/streaming.py", "jaxquant/sharding.py"]),
    "lkd_formats": ("lkd_formats.json", ["experiments/lkd_formats.py", "jaxquant/methods/lkd_formats.py",
                                         "jaxquant/methods/lkd_formats_students.py",
                                         "jaxquant/methods/lkd_formats_core.py", "jaxquant/methods/logit_kl.py",
                                         "jaxquant/methods/lkd.py", "jaxquant/methods/bcq.py"]),
    "e2e_decode": ("e2e_decode.json", ["experiments/e2e_decode.py", "jaxquant/models/decode.py"]),
    "gpu": ("gpu/gpu_check_weight_only.json", ["pallas_kernels/int8_matmul_mgpu.py", "pallas_kernels/act_quant.py",
                                               "pallas_kernels/weight_only_gemv_mgpu.py",
                                               "pallas_kernels/weight_only_decode_mgpu.py"]),
}
# Commits that touched a dependency above without changing what it computes (imports, recipe registration, help
# text), each with why; the check looks past them.
REFACTORS = {
    "4e98dce83cee": "BOS first in LKD windows and generated samples of models with add_bos (Gemma); no table's "
                    "model has it, and a tiny llama's generated samples are bit-identical",
    "0993f0d3c5eb": "logit_kl.py back to its state at c990a6e (the relative option removed)",
    "d92305567507": "an opt-in logit KL setting (LogitKLConfig.relative, off in every recipe); the tiny llama pass "
                    "(lutgemm-bcq3-offset-g128, rtn-w3-g64) stores bit-identical arrays at the default",
    "3ecae88f0055": "reconstruction and the finishing pass build their optimizer in one function; tiny runs with "
                    "paper, default and finishing settings give bit-identical outputs",
    "36394b334e62": "a check that refuses the finishing pass on too few samples (finish_steps, 0 in every table)",
    "772a961acc4e": "the four RepQuant options become the recipes' defaults: every repquant_vit row's config equals "
                    "its recipe's now (checked row by row); repquant.py's table is rerun after it",
    "1ce412ebab15": "RepQuantConfig gains finish_steps (off by default) and functions move between repquant files; "
                    "tiny llama and ViT runs, paper and full options, give bit-identical outputs before and after",
    "14e6a4531056": "experiments share common.parse_settings (same values for every setting the tables use); "
                    "repquant_vit.py's ROWS wrapped",
    "a705a0a67240": "repquant.py's module docstring names the four RepQuantConfig options (docstring only)",
    "6fa0b46f89b3": "RepQuantConfig gains recon_weights, recon_act_scales, recon_inputs and calibrate_softmax, all off "
                    "by default; a tiny RepQuant run's outputs are bit-identical before and after (the repquant "
                    "table's recipes compute the same)",
    "d5ab4736a790": "recipe registry moved to jaxquant/recipes.py (methods define RECIPES tuples; -mse descriptions); "
                    "experiments import jaxquant.measure instead of jaxquant.cli",
    "99bad26afd6e": "repquant / repquant_vit footnotes name the 'without weight reconstruction' rows (table text only)",
    "99a677af661b": "experiments/lkd_formats.py gains --model (Gemma rows, one table per model); SmolLM2's rows "
                    "run the same worker",
    "3f7653298bad": "lkd_formats table footnote says each block trains on the quantized blocks' input (table text only)",
    "1bc3405c7cc2": "lkd_formats.py's screening figures move to docs/methods.md (docstring only)",
    "dc3e897cf51a": "lkd_formats' students move to lkd_formats_students.py and FormatOptions gains start='gptq'; the "
                    "table's recipes keep start='fit' and compute the same",
    "30194c8fa389": "FormatOptions gains fit_inputs and blockwise.run_blocks record_student, both off by default; "
                    "every table's recipes compute the same",
    "ef846a273b43": "lutgemm.py's docstring states the run times (docstring only)",
    "58c155a4285c": "lkd_formats' warnings name the start a block keeps (message text only)",
    "8f6a2ab0929f": "the same warnings' wording (message text only)",
    "877c1ec5e73b": "run_blocks' branches reordered and lkd_formats' docstring reflowed (behaviour unchanged)",
}
# Known stale: needs a GPU to rerun, which a CPU session cannot do.
STALE = {"gpu": "pallas_kernels/int8_matmul_mgpu.py changed after the H200 run at 4b711da; rerun "
                "experiments/gpu_check.py on a GPU"}
GPU_REPORTS = ("gpu/gpu_check_w8a8_sweep.json", "gpu/gpu_check_weight_only.json")


def _regions() -> dict[str, str]:
  text = (REPO / "README.md").read_text()
  return {m.group(1): m.group(2) for m in re.finditer(r"<!-- table:(\w+) begin -->\n(.*?)<!-- table:\1 end -->",
                                                       text, re.S)}


def _rendered(name: str) -> str:
  if name == "gpu":
    import gpu_check  # experiments/gpu_check.py: the function its --readme runs
    return gpu_check.summary([json.loads((RESULTS / path).read_text()) for path in GPU_REPORTS])
  return (RESULTS / DEPENDS_ON[name][0]).with_suffix(".md").read_text()


def _commits(value) -> set[str]:
  """Every "commit" recorded anywhere in a results file (per row, per report, or at the top)."""
  found = set()
  if isinstance(value, dict):
    for key, item in value.items():
      if key == "commit" and isinstance(item, str):
        found.add(item.split("+")[0])
      else:
        found |= _commits(item)
  elif isinstance(value, list):
    for item in value:
      found |= _commits(item)
  return found


def _rows(value, inherited: bool = False) -> list[bool]:
  """For each row (a dict naming a "recipe"): whether it, or a dict holding it, records a "commit"."""
  if isinstance(value, dict):
    inherited = inherited or "commit" in value
    own = [inherited] if "recipe" in value else []
    return own + [flag for item in value.values() for flag in _rows(item, inherited)]
  if isinstance(value, list):
    return [flag for item in value for flag in _rows(item, inherited)]
  return []


def _git(*args) -> subprocess.CompletedProcess:
  return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def test_every_region_is_listed_here():
  assert set(_regions()) == set(DEPENDS_ON)


def test_rows_left_from_an_older_run_are_found():
  whole_run = {"commit": "abc", "rows": [{"recipe": "fp"}, {"recipe": "x"}]}
  partial_rerun = [{"recipe": "fp", "commit": "abc"}, {"recipe": "x"}]
  assert all(_rows(whole_run)) and not all(_rows(partial_rerun)) and any(_rows(partial_rerun))


@pytest.mark.parametrize("name", sorted(DEPENDS_ON))
def test_readme_table_equals_its_results_file(name):
  region = _regions().get(name)
  assert region is not None, f"README has no table:{name} region"
  assert region.strip() == _rendered(name).strip(), (
      f"README's table:{name} differs from experiments/results/{DEPENDS_ON[name][0]}: rerun its script")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=STALE[n], strict=True))
                                  if n in STALE else n for n in sorted(DEPENDS_ON)])
def test_results_are_not_older_than_the_code_they_measure(name):
  if _git("rev-parse", "--git-dir").returncode != 0:
    pytest.skip("not a git checkout: the commits cannot be compared")
  results, files = DEPENDS_ON[name]
  commits = _commits(json.loads((RESULTS / results).read_text()))
  command = json.dumps(json.loads((RESULTS / results).read_text())).find('"command"') >= 0
  if not commits:
    pytest.skip(f"experiments/results/{results} records no commit (measured before results recorded one); "
                f"rerun {files[0]} to record it")
  assert command, f"experiments/results/{results} records no command"
  # A file whose rows carry commits must carry one on every row: the others are left over from an older run.
  # (A file measured in one run may instead record its commit once, beside the rows.)
  rows = _rows(json.loads((RESULTS / results).read_text()))
  assert all(rows) or not any(rows), (
      f"experiments/results/{results}: {rows.count(False)} of {len(rows)} rows record no commit: rerun {files[0]}")
  changes = _git("log", "--format=%H", "--", *files).stdout.split()
  last = next(c for c in changes if not any(c.startswith(r) for r in REFACTORS))
  for commit in sorted(commits):
    if _git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
      pytest.skip(f"commit {commit} recorded in {results} is not in this clone (shallow or other history)")
    assert _git("merge-base", "--is-ancestor", last, commit).returncode == 0, (
        f"experiments/results/{results} was measured at {commit}, before the last change to {', '.join(files)} "
        f"({last[:12]}): rerun {files[0]}")
