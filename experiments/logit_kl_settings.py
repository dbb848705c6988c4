"""How docs/methods.md chose the logit KL pass's settings (jaxquant/methods/logit_kl.py): SmolLM2-135M (a slice of
N blocks, or "all") quantized by a recipe (a fit alone, or an -lkd recipe's block distillation), then the pass with
each variant's LogitKLConfig (a bare number is a learning rate with 60 steps of 4 of LKD's lcet10 windows, as
before; otherwise comma-separated field=value pairs over LogitKLConfig's defaults), each scored by KL against the
float model: a slice on alice29 (first 1024 tokens, windows of 512), the whole model as README's lkd_formats table
is (first 4096 tokens of alice29 and asyoulik).

  PYTHONPATH=. .venv/bin/python experiments/logit_kl_settings.py 6 lutgemm-bcq3-offset-g128 1e-4 1e-3
  PYTHONPATH=. .venv/bin/python experiments/logit_kl_settings.py all lutgemm-bcq4-offset-g128-lkd \
      learning_rate=3e-5 learning_rate=3e-5,steps=120

Prints one line per variant (the pass's report, then perplexity and KL). A slice of 6 blocks takes about 15
minutes on 2 CPU cores; the whole model about 10 minutes a variant after its recipe. Perplexities of a truncated
model are not meaningful; the KL is the figure.
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import common  # noqa: E402  (experiments/common.py)
from jaxquant import pipeline, recipes
from jaxquant.measure import evaluate_loaded, quantize_loaded
from jaxquant.methods import lkd, logit_kl


def config_of(variant: str) -> logit_kl.LogitKLConfig:
  try:
    return logit_kl.LogitKLConfig(steps=60, batch_size=4, learning_rate=float(variant))
  except ValueError:
    return logit_kl.LogitKLConfig(**common.parse_settings(variant))


def main(layers: str, name: str, variants: list[str]) -> None:
  whole = layers == "all"
  loaded = pipeline.load("smollm2-135m", n_layers=None if whole else int(layers))
  texts, tokens = (("alice29", "asyoulik"), 4096) if whole else (("alice29",), 1024)
  quantized, seconds = quantize_loaded(loaded, recipes.get_recipe(name), progress=False)
  windows = np.concatenate(lkd.calibration_from_text(loaded.tokenizer, "lcet10"))

  def scores(model) -> str:
    results = [(text, evaluate_loaded(loaded, model, text, tokens, 512, progress=False)) for text in texts]
    return "; ".join(f"{text} perplexity {r['perplexity']:.4g}, KL {r['kl']:.4f}" for text, r in results)

  print(f"{name} on {layers} blocks ({seconds:.0f} s): {scores(quantized)}", flush=True)
  for variant in variants:
    finished, report = logit_kl.finish_on_logits(loaded.model, quantized, windows, config_of(variant),
                                                 progress=False)
    print(f"[{variant}] {report}; {scores(finished)}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3:])
