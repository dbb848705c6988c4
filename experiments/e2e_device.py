"""The device mode of experiments/e2e_decode.py: a Llama-3-8B-shaped decoder with random weights made on the
accelerator, decoded with jaxquant's KV-cache decoder, bf16 against each recipe.

  * Weights: random bf16 arrays generated on the device (nothing read from disk), each layer's weights its own
    arrays; `models.decode` runs the layers unrolled in one jitted step with the KV cache donated (the
    structure GPU.md measured at 181 tok/s, not lax.scan over stacked layers).
  * Recipes quantize the block linears of that same bf16 model on the device with the jitted quantizers
    (quantizers.round_to_qarray, bcq_core.fit), never through host numpy; embeddings, norms and the head stay
    the bf16 arrays the float model holds (shared, not copied). The BCQ fit runs greedy + 1 refinement round:
    random weights, so only the format (3 sign planes, float16 alphas, group 128) matters for speed.
  * Rows "bf16" (float bf16 weights through ops.qdot, like every jaxquant linear) and "bf16-xla-dot" (the same
    decoder whose linears are a plain bf16 x bf16 -> f32 jnp.dot: a baseline, not a model path) show whether
    ops.qdot's float path costs anything against XLA's own bf16 dot.
  * Decode: the cache holds `prompt` positions of random keys/values (random weights: a prefill would compute
    nothing more meaningful, and costs a compile) and `new` steps are timed by wall clock, dispatched back to
    back, after 2 warm-up steps; steps are cut to fit `cap_s` seconds for slow paths. --device-prefill also
    compiles and times a real prefill of the prompt (time to first token).
One JSON line per (recipe, batch) is appended to <out>/e2e_decode_device.jsonl as soon as it is measured; a case
that raises is recorded with its error and the next one starts; cases left when the budget is spent are recorded
as skipped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import formats, ops, quantizers, recipes, rules
from jaxquant.formats import ActQuant, BCQArray, is_qarray
from jaxquant.methods.bcq import BCQQuant
from jaxquant.models import decode, llama
from jaxquant.models.layers import Linear, RMSNorm
from jaxquant.quantizers import WeightQuant

SHAPES = {
    "llama3-8b": llama.LlamaConfig(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                                   head_dim=128, ffn_dim=14336, rope_theta=500000.0, tie_embeddings=False),
    # CI: every path of the 8B mode on a CPU in seconds (K = 256 and 512: whole groups of 128)
    "tiny": llama.LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64,
                              ffn_dim=512, tie_embeddings=False),
}
BF16, PLAIN = "bf16", "bf16-xla-dot"
# In the order of the goals (W4 and BCQ3 at batch 1, W8A8 at 1 and 32), so that a spent budget drops the
# least asked-for rows: W4/8 has no goal of its own.
RECIPES = ("rtn-w4-g128", "lutgemm-bcq3-g128", "zeroquant-w8a8", "zeroquant-w48a16")


class PlainBF16Linear(Linear):
  """Baseline only (row "bf16-xla-dot"): x @ kernel as XLA's bf16 dot with float32 accumulation."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(jnp.bfloat16), self.kernel.get_value(), preferred_element_type=jnp.float32)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, scale):
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(jnp.bfloat16)


def random_weights(config: llama.LlamaConfig, seed: int = 0) -> dict[str, jax.Array]:
  """bf16 arrays on the default device, keyed by state path (kernels (in, out))."""
  d, hd = config.dim, config.head_dim
  shapes = {"embed.embedding": (config.vocab_size, d), "lm_head.kernel": (d, config.vocab_size), "norm.weight": (d,)}
  for i in range(config.n_layers):
    p = f"layers.{i}."
    shapes |= {p + "attn_norm.weight": (d,), p + "mlp_norm.weight": (d,),
               p + "attn.q_proj.kernel": (d, config.n_heads * hd),
               p + "attn.k_proj.kernel": (d, config.n_kv_heads * hd),
               p + "attn.v_proj.kernel": (d, config.n_kv_heads * hd),
               p + "attn.o_proj.kernel": (config.n_heads * hd, d), p + "mlp.gate_proj.kernel": (d, config.ffn_dim),
               p + "mlp.up_proj.kernel": (d, config.ffn_dim), p + "mlp.down_proj.kernel": (config.ffn_dim, d)}
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  out = {}
  for key, (name, shape) in zip(keys, shapes.items()):
    out[name] = _normal(key, shape, 0.02) if len(shape) == 2 else 1.0 + _normal(key, shape, 0.1)
  return out


def assemble(config: llama.LlamaConfig, w: dict[str, jax.Array], linear=Linear) -> llama.Llama:
  """A Llama holding the arrays of `w` themselves (no copy, no cast)."""
  eps = config.norm_eps
  blocks = []
  for i in range(config.n_layers):
    p = lambda name: w[f"layers.{i}.{name}"]
    attn = llama.Attention(linear(p("attn.q_proj.kernel")), linear(p("attn.k_proj.kernel")),
                           linear(p("attn.v_proj.kernel")), linear(p("attn.o_proj.kernel")),
                           config.n_heads, config.n_kv_heads, config.head_dim, config.rope_theta)
    mlp = llama.MLP(linear(p("mlp.gate_proj.kernel")), linear(p("mlp.up_proj.kernel")),
                    linear(p("mlp.down_proj.kernel")))
    blocks.append(llama.Block(RMSNorm(p("attn_norm.weight"), eps), attn, RMSNorm(p("mlp_norm.weight"), eps), mlp))
  return llama.Llama(config, llama.Embedding(w["embed.embedding"]), blocks, RMSNorm(w["norm.weight"], eps),
                     linear(w["lm_head.kernel"]))


_round = jax.jit(quantizers.round_to_qarray, static_argnums=(1,))
_pack_planes = jax.jit(formats.pack_planes)


def _quantize_leaf(w: jax.Array, rule: rules.Rule):
  if rule.activation not in (None, "token", "token_group"):
    raise ValueError(f"device mode has no calibration: activation {rule.activation!r} is not supported")
  activation = None if rule.activation is None else ActQuant(bits=rule.activation_bits, mode=rule.activation)
  if isinstance(rule.weight, WeightQuant):
    return _round(w, rule.weight, activation)
  if isinstance(rule.weight, BCQQuant):
    config = dataclasses.replace(rule.weight, rounds=1, init="greedy")  # random weights: the format is what counts
    signs, alpha, offset, _ = config.fit(w)
    return BCQArray(planes=_pack_planes(signs), alpha=alpha, offset=offset, shape=tuple(w.shape),
                    k_group=config.k_group(int(w.shape[0])))
  raise ValueError(f"device mode cannot quantize with {type(rule.weight).__name__}")


def quantize_on_device(model: nnx.Module, recipe_name: str) -> nnx.Module:
  """The model with the linears its recipe's rules match quantized on the device; other arrays shared."""
  recipe = recipes.get_recipe(recipe_name)
  graphdef, state = nnx.split(model)

  def convert(path, leaf):
    rule = None if is_qarray(leaf) else rules.match(recipe.rules, rules.path_str(path))
    return leaf if rule is None else _quantize_leaf(leaf, rule)

  out = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(convert, state, is_leaf=is_qarray))
  jax.block_until_ready(jax.tree_util.tree_leaves(nnx.state(out)))
  return out


def _random_cache(decoder: decode.Decoder, batch: int, length: int, filled: int, seed: int) -> list:
  """A cache whose first `filled` slots hold random keys/values (as a prefill of random weights would)."""
  cache = []
  for i, shape in enumerate(decode.cache_shapes(decoder.model, batch, length)):
    k, v = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
    mask = (jnp.arange(length) < filled)[None, :, None, None]
    cache.append(tuple(jnp.where(mask, jax.random.normal(r, shape, decoder.cache_dtype), 0) for r in (k, v)))
  return cache


def time_decode(model, batch: int, prompt: int, new: int, cap_s: float, prefill: bool, seed: int = 0) -> dict:
  """Compile the one-token step for (batch, cache of prompt + new), warm it up, time up to `new` steps."""
  decoder = decode.Decoder(model, cache_dtype=jnp.bfloat16)
  length = prompt + new
  compile_s = decoder.compile(batch, 1, length)
  pad = jnp.zeros((batch,), jnp.int32)
  key = jax.random.key(seed)
  token = jax.random.randint(jax.random.key(seed + 1), (batch, 1), 0, model.config.vocab_size, jnp.int32)
  row = {}
  if prefill:
    tokens = jax.random.randint(jax.random.key(seed + 2), (batch, prompt), 0, model.config.vocab_size, jnp.int32)
    row["prefill_compile_s"] = decoder.compile(batch, prompt, length)
    times = []
    for _ in range(2):  # the first run warms the executable up
      cache = decoder.init_cache(batch, length)
      jax.block_until_ready(cache)
      begin = time.perf_counter()
      jax.block_until_ready(decoder.run(tokens, cache, 0, pad, key)[0])
      times.append(time.perf_counter() - begin)
    row.update(time_to_first_token_s=times[-1], prefill_tokens_per_s=batch * prompt / times[-1])
  warm = _random_cache(decoder, batch, length, prompt, seed)
  begin = time.perf_counter()
  for i in range(2):
    token, _, warm, key = decoder.run(token, warm, prompt + i, pad, key)
  jax.block_until_ready(token)
  estimate = (time.perf_counter() - begin) / 2
  del warm
  steps = max(4, min(new, int(cap_s / max(estimate, 1e-6))))
  cache = _random_cache(decoder, batch, length, prompt, seed)
  jax.block_until_ready(cache)
  begin = time.perf_counter()
  for i in range(steps):
    token, _, cache, key = decoder.run(token, cache, prompt + i, pad, key)
  jax.block_until_ready(token)
  seconds = time.perf_counter() - begin
  return {**row, "steps": steps, "ms_per_step": 1e3 * seconds / steps, "tokens_per_s": batch * steps / seconds,
          "compile_s": compile_s}


def device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def run(shape: str, out: pathlib.Path, batches=(1, 32), prompt: int = 128, new: int = 64,
        recipes=RECIPES, budget_s: float = 170.0, cap_s: float = 8.0, prefill: bool = False,
        meta: dict | None = None) -> list[dict]:
  """Every (recipe, batch), batch-major (all batch-1 rows first: the case the weight-only kernels exist for;
  the XLA-dot baseline right after bf16 at batch 1, last at the other batches); each row appended to
  <out>/e2e_decode_device.jsonl as it ends. Returns the rows."""
  start = time.perf_counter()
  config = SHAPES[shape]
  out.mkdir(parents=True, exist_ok=True)
  lines = out / "e2e_decode_device.jsonl"
  base = {"mode": "device", "model": shape, "prompt": prompt, "new_tokens": new, "device": str(jax.devices()[0]),
          "backend": ops.resolve_backend("auto"), **(meta or {})}
  weights = random_weights(config)
  jax.block_until_ready(weights)
  built = {BF16: assemble(config, weights), PLAIN: assemble(config, weights, PlainBF16Linear)}
  build_s = {BF16: time.perf_counter() - start, PLAIN: 0.0}
  rows = []
  for batch in batches:
    for name in (BF16, PLAIN, *recipes) if batch == 1 else (BF16, *recipes, PLAIN):
      row = {**base, "recipe": name, "batch": batch}
      try:
        if time.perf_counter() - start > budget_s:
          raise TimeoutError(f"skipped: the {budget_s:.0f} s budget was spent")
        if name not in built:
          begin = time.perf_counter()
          built[name] = quantize_on_device(built[BF16], name)
          build_s[name] = time.perf_counter() - begin
        model = built[name]
        row.update(weight_bytes=formats.tree_nbytes(nnx.state(model)),
                   block_bytes=formats.tree_nbytes(nnx.state(model.layers)), build_s=build_s[name])
        row.update(time_decode(model, batch, prompt, new, cap_s, prefill))
      except Exception as error:  # one case's failure (a kernel that does not compile, memory) loses nothing else
        row["error"] = f"{type(error).__name__}: {error}"[:2000]
        if not isinstance(error, TimeoutError):
          row["traceback"] = traceback.format_exc()[-3000:]
      row.update(elapsed_s=time.perf_counter() - start, device_peak_bytes=device_peak_bytes())
      rows.append(row)
      with lines.open("a") as f:
        f.write(json.dumps(row) + "\n")
      shown = ("recipe", "batch", "tokens_per_s", "ms_per_step", "compile_s", "build_s", "elapsed_s", "error")
      print(json.dumps({k: row[k] for k in shown if k in row}), flush=True)
  return rows
