"""Why block distillation breaks Gemma-3-270M (README, format distillation): the residual stream's squared norm per
position after each float block, on 4 of LKD's lcet10 calibration windows ([BOS] + 127 tokens), and the BOS
position's share of the sum of squares, which is its share of a block-MSE loss's weight.

  PYTHONPATH=. .venv/bin/python experiments/gemma_residual_norms.py   # about a minute; writes
  experiments/results/gemma_residual_norms.json
"""

import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402  (experiments/common.py)
from jaxquant import pipeline, recipes
from jaxquant.measure import bos_id, own_calibration

OUT = pathlib.Path(__file__).resolve().parent / "results" / "gemma_residual_norms.json"


def main() -> None:
  loaded = pipeline.load("gemma3-270m")
  recipe = recipes.get_recipe("lutgemm-bcq3-offset-g128-lkd")
  windows = own_calibration(recipe, loaded.tokenizer, "lcet10", bos_id(loaded))[0][:4]
  h = loaded.model.embed_tokens(jnp.asarray(windows))
  rows = []
  for index, block in enumerate(loaded.model.layers):
    h = block(h)
    norms = np.asarray(jnp.sum(h * h, axis=-1), np.float64)  # (windows, positions)
    rows.append({"block": index, "bos_sq_norm": float(norms[:, 0].mean()), "other_sq_norm": float(norms[:, 1:].mean()),
                 "bos_share": float(norms[:, 0].sum() / norms.sum())})
    print(json.dumps(rows[-1]), flush=True)
  OUT.write_text(json.dumps({"rows": rows, "windows": list(windows.shape), **common.provenance()}, indent=1))


if __name__ == "__main__":
  main()
