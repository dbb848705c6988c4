"""Full-precision SmolLM2-135M perplexity on alice29 and asyoulik.

Protocol: text read as latin-1 with universal newlines (alice29 from its first "CHAPTER I"), no BOS,
non-overlapping 512-token windows, mean NLL over the predicted tokens (T-1 per window).
Reference figures: alice29 first 4096 tokens 23.58, asyoulik first 4096 tokens 29.21 (both within 0.5%);
asyoulik over the whole file (77 windows) is also printed.
Run: .venv/bin/python experiments/check_fp.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jaxquant import assets, data, evaluate
from jaxquant.sources.loading import load_model
from jaxquant.sources.tokenizer import tokenizer_from_gguf


def main():
  start = time.perf_counter()
  path = assets.smollm2_gguf_path()
  model = load_model(path, family="llama")
  tokenizer = tokenizer_from_gguf(path)
  print(f"loaded SmolLM2-135M in {time.perf_counter() - start:.1f}s")
  for name, max_tokens in (("alice29", 4096), ("asyoulik", 4096), ("asyoulik", None)):
    t = time.perf_counter()
    windows = data.text_windows(tokenizer, name, window=512, max_tokens=max_tokens)
    ppl = evaluate.perplexity(model, windows, batch_size=4)
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    span = f"first {max_tokens} tokens" if max_tokens else "whole file"
    print(f"{name} ({span}): perplexity {ppl:.3f} over {n_tokens} predicted tokens "
          f"({windows.shape[0]} windows of 512) in {time.perf_counter() - t:.1f}s")
  print(f"total {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
  main()
