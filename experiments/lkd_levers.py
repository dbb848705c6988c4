"""Screening what moves format distillation (jaxquant/methods/lkd_formats.py) on a slice of SmolLM2-135M: the first
N blocks quantized by a -lkd recipe with each variant's settings (LKDConfig / FormatOptions fields), each scored by
KL against the float slice on alice29 (first 2048 tokens, windows of 512).

  PYTHONPATH=. .venv/bin/python experiments/lkd_levers.py 8 lutgemm-bcq3-offset-g128-lkd "" inputs=quantized \
      steps=100 learning_rate=1e-3

A variant is "" (the recipe as registered) or comma-separated field=value pairs. Prints one line per variant:
quantize seconds, alice29 perplexity and KL. Perplexities of a truncated model are not meaningful; KL is the figure.
N = "all": the whole model, scored as README's lkd_formats table is (first 4096 tokens of alice29 and asyoulik):

  PYTHONPATH=. .venv/bin/python experiments/lkd_levers.py all lutgemm-bcq4-offset-g128-lkd start=gptq
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402  (experiments/common.py)
from jaxquant import pipeline, recipes
from jaxquant.measure import evaluate_loaded, quantize_loaded
from jaxquant.methods import lkd_formats


def main(layers: str, name: str, variants: list[str]) -> None:
  whole = layers == "all"
  loaded = pipeline.load("smollm2-135m", n_layers=None if whole else int(layers))
  texts, tokens = (("alice29", "asyoulik"), 4096) if whole else (("alice29",), 2048)
  base = recipes.get_recipe(name)
  for variant in variants:
    recipe = lkd_formats.with_options(base, **common.parse_settings(variant))
    quantized, seconds = quantize_loaded(loaded, recipe, progress=False)
    scores = []
    for text in texts:
      result = evaluate_loaded(loaded, quantized, text, tokens, 512, progress=False)
      scores.append(f"{text} perplexity {result['perplexity']:.4g}, KL {result['kl']:.4f}")
    print(f"{name} [{variant or 'as registered'}] on {layers} blocks: {seconds:.0f} s, {'; '.join(scores)}",
          flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3:])
