"""Write notebooks/lut_gemm.ipynb from the cells below and execute it in place (outputs saved).

  .venv/bin/python notebooks/build_lut_gemm.py
"""

from notebook_builder import write_executed


CELLS = [
    ("markdown", """# LUT-GEMM weights: binary-coding quantization (BCQ) vs round-to-nearest, on a real slice of SmolLM2-135M

BCQ stores a weight as `W ~ sum_i alpha_i * B_i` with q binary planes `B_i` in {-1, +1} (1 bit a weight each) and
one float16 `alpha` per plane, per group of 128 input rows and per output column: a non-uniform grid of 2^q values
per group, which LUT-GEMM multiplies through lookup tables of activation sums without dequantizing. Uniform
quantization is a special case (alpha_i = (s/2) 2^i plus an offset), so one kernel serves both.

Here: the first 2 blocks of the real model (fetched through pip on first use), 3-bit group-128 weights, two ways:
round-to-nearest uniform (`rtn-w3-g128`) and BCQ whose fit weighs every input row by its mean square activation on
calibration text (`lutgemm-bcq3-g128`, the default), then, on one kernel, why that weighting matters. A 2-block
slice is not a language model: compare it with its own float version through KL divergence and top-1 agreement."""),
    ("code", """import time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxquant import pipeline, recipes, data, evaluate, formats
from jaxquant.models import surgery
from jaxquant.methods.bcq import bits_per_weight

loaded = pipeline.load("smollm2-135m", n_layers=2)   # the first 2 of 30 blocks, float32
ids = data.tokenize(loaded.tokenizer, data.load_text("lcet10")[0])
calibration = data.calibration_batches(ids, n_samples=4, seq_len=256, batch_size=4)  # not an evaluation text
print(loaded.family, "blocks:", len(loaded.model.layers), "calibration:", calibration[0].shape)"""),
    ("code", """models, seconds = {}, {}
for name in ("rtn-w3-g128", "lutgemm-bcq3-g128"):
    recipe = recipes.get_recipe(name)
    start = time.perf_counter()
    models[name] = pipeline.quantize_model(loaded.model, recipe, calibration if recipe.needs_calibration else None,
                                           progress=False)
    jax.block_until_ready(jax.tree_util.tree_leaves(nnx.state(models[name])))
    seconds[name] = time.perf_counter() - start
    print(f"{name:<22} {seconds[name]:5.1f} s (jit compilation included)  {recipe.description[:90]}...")"""),
    ("code", """# What is really stored: packed sign planes and float16 alphas.
w = models["lutgemm-bcq3-g128"].layers[0].mlp.up_proj.kernel.get_value()
print(type(w).__name__, "logical", w.shape, "| planes", w.planes.shape, w.planes.dtype,
      "| alpha", w.alpha.shape, w.alpha.dtype, "| offset", w.offset, "| k_group", w.k_group)
print(f"bits per weight of this kernel: {bits_per_weight(w):.3f}  (3 planes + 3 x 16 bits x 5 groups / 576 rows)")

def block_linear_bytes(model):
    return sum(m.kernel.get_value().nbytes for n, m in surgery.modules(model).items() if n.startswith("layers."))
fp_bytes = sum(m.kernel.get_value().size * 4 for n, m in surgery.modules(loaded.model).items()
               if n.startswith("layers."))
for name, model in models.items():
    b = block_linear_bytes(model)
    print(f"{name:<22} block linears {b / 1e6:6.3f} MB  ({b * 8 / (fp_bytes / 4):.3f} bits/weight; float32 {fp_bytes / 1e6:.2f} MB)")"""),
    ("code", """text, source = data.load_text("alice29")
windows = data.eval_windows(data.tokenize(loaded.tokenizer, text), window=256, max_tokens=1024, source=source)
for name, model in models.items():
    f = evaluate.compare_to_reference(model, loaded.model, windows, progress=False)
    print(f"{name:<22} KL {f['kl']:.4f}  top-1 {f['top1']:.3f}  (vs the float 2-block slice, {f['n_tokens']} tokens)")"""),
    ("code", """# Weight error is not what the model sees. The paper's data-free fit (BCQQuant alone) minimises the plain squared
# weight error: lowest MSE, but its least-squares alphas clip the few large weights. The default recipe weighs each
# input row k by E[x_k^2] on calibration text, the diagonal of the output error E||x (W - W^)||^2.
from jaxquant.methods.bcq import BCQQuant, input_mean_squares
path = "layers.1.mlp.down_proj.kernel"
w = loaded.model.layers[1].mlp.down_proj.kernel.get_value()
h = input_mean_squares(loaded.model, calibration, [path], progress=False)[path]
config = BCQQuant(bits=3, group_size=128)
fits = {"plain (data-free)": config.quantize(w, path=path),
        "activation-weighted": config.quantize(w, path=path, row_weight=h / h.mean() + 0.01)}
rtn = models["rtn-w3-g128"].layers[1].mlp.down_proj.kernel.get_value()
print(f"{path}: E[x_k^2] spans {h.min():.2g} .. {h.max():.2g}")
for name, q in {"RTN": rtn, **fits}.items():
    err = q.dequantize() - w
    print(f"{name:<20} weight MSE {float(jnp.mean(err ** 2)):.3e}   max |err| {float(jnp.max(jnp.abs(err))):.3f}   "
          f"activation-weighted error {float(jnp.sum(h[:, None] * err ** 2)):.4g}")"""),
    ("code", """# Uniform-as-BCQ: the RTN weights converted exactly to planes + alphas + offset (the same LUT kernel runs them).
uniform = pipeline.quantize_model(loaded.model, recipes.get_recipe("lutgemm-uniform3-g128"), progress=False)
u = uniform.layers[0].attn.q_proj.kernel.get_value()
r = models["rtn-w3-g128"].layers[0].attn.q_proj.kernel.get_value()
print(type(u).__name__, u.planes.shape, "alpha", u.alpha.dtype, "offset", u.offset.shape,
      "| max |uniform-as-BCQ - RTN| =", float(jnp.max(jnp.abs(u.dequantize() - r.dequantize()))))"""),
]


if __name__ == "__main__":
  write_executed(CELLS, "lut_gemm.ipynb")
