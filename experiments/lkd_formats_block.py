"""Design probe for format distillation (jaxquant/methods/lkd_formats.py) on real SmolLM2-135M blocks: for the
first --blocks blocks, the format's own fit against distillation variants (which parameters train, learning rate),
by output MSE against the float block on the training windows (lcet10) and on held-out windows of alice29
(evaluation text: measured on, never trained on), and seconds a block.

  PYTHONPATH=. .venv/bin/python experiments/lkd_formats_block.py --recipe lutgemm-bcq3-offset-g128-lkd \
      --variant codes=ste --variant codes=fixed --variant codes=ste,learning_rate=1e-4

Each --variant is comma-separated overrides of LKDConfig / FormatOptions fields (lkd_formats.with_options).
Prints one JSON line per (block, variant).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
import warnings

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import common  # noqa: E402  (experiments/common.py)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--recipe", default="lutgemm-bcq3-offset-g128-lkd")
  parser.add_argument("--variant", action="append", default=None, help="overrides, e.g. codes=fixed,learning_rate=1e-3")
  parser.add_argument("--blocks", type=int, default=2)
  parser.add_argument("--heldout", type=int, default=32, help="held-out windows of alice29 (128 tokens each)")
  args = parser.parse_args()

  import numpy as np

  from jaxquant import data, pipeline, recipes
  from jaxquant.methods import blockwise, lkd, lkd_formats, lkd_formats_students
  loaded = pipeline.load("smollm2-135m", n_layers=args.blocks)
  base = recipes.get_recipe(args.recipe)
  variants = args.variant or ["codes=ste"]
  config = base.procedure.config
  calibration = lkd.calibration_from_text(loaded.tokenizer, "lcet10", config)
  ids, mask = lkd.samples_from_batches(calibration, config)
  body, source = data.load_text("alice29")
  held = data.calibration_samples(data.tokenize(loaded.tokenizer, body), args.heldout, config.seq_len, 1, source)
  x, extra = blockwise.model_inputs(loaded.model, ids, mask, config.batch_size)
  hx, hextra = blockwise.model_inputs(loaded.model, np.asarray(held), None, config.batch_size)
  for index in range(args.blocks):
    block = loaded.model.layers[index]
    y = blockwise.apply_block(block, x, extra, config.batch_size)
    hy = blockwise.apply_block(block, hx, hextra, config.batch_size)
    _, recorded = blockwise.apply_recording(block, x, extra, config.batch_size, *lkd_formats_students.record_inputs(block))
    for text in variants:
      recipe = lkd_formats.with_options(base, **common.parse_settings(text))
      procedure = recipe.procedure
      start = time.perf_counter()
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qblock, report = lkd_formats.distill_block(
            index, block, x, y, recorded, extra=extra, rules=recipe.rules, config=procedure.config,
            options=procedure.options, step=procedure.train_step(), progress=None)
      seconds = time.perf_counter() - start
      student = lkd_formats_students.make_student(block, f"layers.{index}.", recipe.rules, procedure.options.codes,
                                         lkd_formats_students.mean_squares(recorded, procedure.options.damp))
      fit = lkd_formats_students.to_block(student, block)
      row = {"recipe": args.recipe, "block": index, "variant": text, "status": report.status,
             "mse_fit": report.mse_rtn, "mse_lkd": report.mse_lkd,
             "heldout_mse_fit": blockwise.block_mse(fit, hx, hy, hextra, config.batch_size),
             "heldout_mse_lkd": blockwise.block_mse(qblock, hx, hy, hextra, config.batch_size),
             "first_loss": report.first_loss, "last_loss": report.last_loss, "seconds": seconds,
             "warnings": [str(w.message) for w in caught]}
      print(json.dumps(row), flush=True)
    x, hx = y, hy  # the float model's input to the next block


if __name__ == "__main__":
  main()
