"""How docs/methods.md chose the logit KL pass's learning rate (jaxquant/methods/logit_kl.py): a slice of SmolLM2-135M
quantized by a recipe's fit alone, then the pass at each learning rate given (60 steps of 4 of LKD's lcet10
windows), each scored by KL against the float slice on alice29 (first 1024 tokens, windows of 512).

  PYTHONPATH=. .venv/bin/python experiments/logit_kl_settings.py 6 lutgemm-bcq3-offset-g128 1e-4 1e-3

Prints one line per learning rate (the pass's report, then perplexity and KL on alice29); about 15 minutes on 2
CPU cores. Perplexities of a truncated model are not meaningful; the KL is the figure.
"""

import sys

import numpy as np

from jaxquant import pipeline, recipes
from jaxquant.measure import evaluate_loaded, quantize_loaded
from jaxquant.methods import lkd, logit_kl


def main(layers: int, name: str, rates: list[float]) -> None:
  loaded = pipeline.load("smollm2-135m", n_layers=layers)
  quantized, seconds = quantize_loaded(loaded, recipes.get_recipe(name), progress=False)
  windows = np.concatenate(lkd.calibration_from_text(loaded.tokenizer, "lcet10"))
  base = evaluate_loaded(loaded, quantized, "alice29", 1024, 512, progress=False)
  print(f"{name} on {layers} blocks ({seconds:.0f} s): alice29 KL {base['kl']:.4f}", flush=True)
  for rate in rates:
    config = logit_kl.LogitKLConfig(steps=60, batch_size=4, learning_rate=rate)
    finished, report = logit_kl.finish_on_logits(loaded.model, quantized, windows, config, progress=False)
    result = evaluate_loaded(loaded, finished, "alice29", 1024, 512, progress=False)
    print(f"lr {rate:g}: {report}; alice29 perplexity {result['perplexity']:.4g}, KL {result['kl']:.4f}", flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2], [float(a) for a in sys.argv[3:]])
