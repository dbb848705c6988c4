"""Gemma 3 text decoder (e.g. Gemma-3-270M) as small Flax NNX modules, with the same block-at-a-time API as
`llama.Llama`.

What differs from the llama family (checked against Hugging Face's modeling_gemma3.py and llama.cpp's gemma3
graph):
  * token embeddings are multiplied by sqrt(dim) (the tied output head uses the unscaled table);
  * sandwich norms: each block normalizes before AND after attention and before AND after the MLP, the
    residual adds the post-normed output;
  * QK-norm: an RMSNorm over head_dim on every q and k head, before RoPE;
  * attention logits scaled by query_pre_attn_scalar**-0.5 (not head_dim**-0.5, though equal for 270M);
  * GeGLU MLP: down(gelu_tanh(gate(x)) * up(x));
  * sliding-window (local) attention on layers i with (i + 1) % pattern != 0, each with its own RoPE base;
    the others are global (full causal) layers with the global base.
RMSNorm weights are the multiplier itself (GGUF stores HF's `1 + weight` already).

Parameter paths, which quantization rules match on (the linears carry the llama names, so rules.BLOCK_LINEARS
and friends apply unchanged):

  embed/embedding                               (vocab, dim)
  layers/<i>/attn_norm/weight, post_attn_norm/weight, mlp_norm/weight, post_mlp_norm/weight   (dim,)
  layers/<i>/attn/{q,k,v,o}_proj/kernel         (dim, n_heads*head_dim) ... (n_heads*head_dim, dim)
  layers/<i>/attn/{q,k}_norm/weight             (head_dim,)
  layers/<i>/mlp/{gate,up,down}_proj/kernel
  norm/weight                                   (dim,)
  lm_head/kernel                                (dim, vocab); a copy of embedding.T (tied)

Block-at-a-time: `h = model.embed_tokens(tokens)` (scaled), `h = block(h)` per block, `logits = model.head(h)`.
Computation is float32; q and k are in rotate-half RoPE layout (llama.cpp's gemma3 uses NEOX RoPE, so the GGUF
rows are in that order already).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.models.layers import Linear, RMSNorm
from jaxquant.models.llama import Embedding, Llama, apply_rope, rope_cos_sin


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Shape and numerics of a Gemma 3 text decoder (defaults: Gemma 3's fixed choices that GGUF omits)."""
  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_theta: float = 1_000_000.0        # global (full-attention) layers
  rope_local_theta: float = 10_000.0     # sliding-window layers
  sliding_window: int = 512              # a query sees keys at distance < sliding_window on local layers
  sliding_window_pattern: int = 6        # layer i is global iff (i + 1) % pattern == 0
  query_pre_attn_scalar: float = 256.0   # attention logits are scaled by its -1/2 power
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  add_bos: bool = True                   # evaluation windows start with BOS (Gemma needs it)
  bos_token_id: int | None = 2
  eos_token_id: int | None = None        # where generation stops (None: unknown)
  context_length: int | None = None      # positions the model was trained for (None: unknown)

  def is_sliding(self, layer: int) -> bool:
    """Whether block `layer` uses sliding-window (local) attention."""
    return (layer + 1) % self.sliding_window_pattern != 0


def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU, tanh approximation (HF's gelu_pytorch_tanh)."""
  return jax.nn.gelu(x, approximate=True)


class ScaledEmbedding(Embedding):
  """Token embedding multiplied by sqrt(dim). embedding: (vocab, dim); tokens (B, T) -> (B, T, dim) float32."""

  def __call__(self, tokens: jax.Array) -> jax.Array:
    table = self.embedding.get_value()
    scale = np.float32(np.sqrt(table.shape[1]))
    return jnp.take(table, tokens, axis=0).astype(jnp.float32) * scale


class GemmaAttention(nnx.Module):
  """Causal grouped-query attention with QK-norm, RoPE and an optional sliding window. x: (B,T,dim)->(B,T,dim).

  q_proj: (dim, n_heads*hd), k_proj, v_proj: (dim, n_kv_heads*hd), o_proj: (n_heads*hd, dim);
  q_norm, k_norm: RMSNorm over hd. sliding_window None means full causal attention. Positions are 0..T-1.
  """

  def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, q_norm: RMSNorm,
               k_norm: RMSNorm, n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float,
               query_pre_attn_scalar: float, sliding_window: int | None):
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
    self.q_norm, self.k_norm = q_norm, k_norm
    self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
    self.rope_theta = rope_theta
    self.query_pre_attn_scalar = query_pre_attn_scalar
    self.sliding_window = sliding_window

  def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (B, T, dim), cos/sin as llama.apply_rope takes them -> q (B, T, n_heads, hd), k, v (B, T, n_kv_heads,
    hd): q and k normed, then rotated."""
    batch, seq, _ = x.shape
    hd, n_kv = self.head_dim, self.n_kv_heads
    q = self.q_norm(self.q_proj(x).reshape(batch, seq, self.n_heads, hd))
    k = self.k_norm(self.k_proj(x).reshape(batch, seq, n_kv, hd))
    v = self.v_proj(x).reshape(batch, seq, n_kv, hd)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """q (B, T, n_heads, hd), k, v (B, S, n_kv_heads, hd), allowed (1 or B, T, S) bool (causal and, on a
    sliding layer, the window: the caller's) -> o_proj of the attention output, (B, T, dim)."""
    batch, seq = q.shape[:2]
    hd, n_kv = self.head_dim, self.n_kv_heads
    q = q.reshape(batch, seq, n_kv, self.n_heads // n_kv, hd)  # q head j uses kv head j // group
    scale = np.float32(self.query_pre_attn_scalar ** -0.5)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) * scale
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, seq, self.n_heads * hd)
    return self.o_proj(out)

  def __call__(self, x: jax.Array) -> jax.Array:
    seq = x.shape[1]
    cos, sin = rope_cos_sin(seq, self.head_dim, self.rope_theta)
    q, k, v = self.qkv(x, cos, sin)
    query_pos = np.arange(seq)[:, None]
    key_pos = np.arange(seq)[None, :]
    allowed = key_pos <= query_pos
    if self.sliding_window is not None:
      allowed &= query_pos - key_pos < self.sliding_window
    return self.attend(q, k, v, allowed[None])


class GemmaMLP(nnx.Module):
  """GeGLU: down(gelu_tanh(gate(x)) * up(x)). gate, up: (dim, ffn); down: (ffn, dim). (B,T,dim)->(B,T,dim)."""

  def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear):
    self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class GemmaBlock(nnx.Module):
  """Sandwich-norm block. h: (B, T, dim) -> (B, T, dim):
  h + post_attn_norm(attn(attn_norm(h))), then + post_mlp_norm(mlp(mlp_norm(.)))."""

  def __init__(self, attn_norm: RMSNorm, attn: GemmaAttention, post_attn_norm: RMSNorm, mlp_norm: RMSNorm,
               mlp: GemmaMLP, post_mlp_norm: RMSNorm):
    self.attn_norm, self.attn, self.post_attn_norm = attn_norm, attn, post_attn_norm
    self.mlp_norm, self.mlp, self.post_mlp_norm = mlp_norm, mlp, post_mlp_norm

  def __call__(self, h: jax.Array, attention=None) -> jax.Array:
    """attention: a function x -> attention output standing in for self.attn (see llama.Block); None: self.attn."""
    h = h + self.post_attn_norm((self.attn if attention is None else attention)(self.attn_norm(h)))
    return h + self.post_mlp_norm(self.mlp(self.mlp_norm(h)))


class Gemma(Llama):
  """The Gemma 3 decoder (a models.protocol.BlockModel): Llama's embed -> blocks -> norm -> lm_head with a scaled
  embedding and sandwich-norm blocks. tokens (B, T) int32 -> logits (B, T, vocab) float32."""

  @classmethod
  def from_weights(cls, config: GemmaConfig, weights: Mapping[str, np.ndarray]) -> "Gemma":
    """Build from float arrays keyed by state path (those of nnx.state(model), see weight_shapes), kernels
    (in, out); norm weights are the multipliers themselves. With tied embeddings lm_head.kernel may be absent
    (and is ignored): the head is a copy of the embedding, transposed."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    eps = config.norm_eps
    blocks = []
    for i in range(config.n_layers):
      w = lambda name: f32(weights[f"layers.{i}.{name}"])
      sliding = config.is_sliding(i)
      attn = GemmaAttention(
          Linear(w("attn.q_proj.kernel")), Linear(w("attn.k_proj.kernel")), Linear(w("attn.v_proj.kernel")),
          Linear(w("attn.o_proj.kernel")), RMSNorm(w("attn.q_norm.weight"), eps),
          RMSNorm(w("attn.k_norm.weight"), eps), config.n_heads, config.n_kv_heads, config.head_dim,
          config.rope_local_theta if sliding else config.rope_theta, config.query_pre_attn_scalar,
          config.sliding_window if sliding else None)
      mlp = GemmaMLP(Linear(w("mlp.gate_proj.kernel")), Linear(w("mlp.up_proj.kernel")),
                     Linear(w("mlp.down_proj.kernel")))
      blocks.append(GemmaBlock(RMSNorm(w("attn_norm.weight"), eps), attn, RMSNorm(w("post_attn_norm.weight"), eps),
                               RMSNorm(w("mlp_norm.weight"), eps), mlp, RMSNorm(w("post_mlp_norm.weight"), eps)))
    embedding = f32(weights["embed.embedding"])
    if config.tie_embeddings or "lm_head.kernel" not in weights:
      head_kernel = jnp.array(embedding.T)  # its own array, so the head can be quantized on its own
    else:
      head_kernel = f32(weights["lm_head.kernel"])
    return cls(config, ScaledEmbedding(embedding), blocks, RMSNorm(f32(weights["norm.weight"]), eps),
               Linear(head_kernel))


def weight_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
  """State path -> shape of every float leaf (kernels (in, out)); lm_head.kernel also when tied (a copy)."""
  d, hd, f = config.dim, config.head_dim, config.ffn_dim
  q, kv = config.n_heads * hd, config.n_kv_heads * hd
  shapes = {"embed.embedding": (config.vocab_size, d)}
  for i in range(config.n_layers):
    shapes |= {f"layers.{i}.{leaf}": shape for leaf, shape in {
        "attn_norm.weight": (d,), "post_attn_norm.weight": (d,), "mlp_norm.weight": (d,),
        "post_mlp_norm.weight": (d,), "attn.q_norm.weight": (hd,), "attn.k_norm.weight": (hd,),
        "attn.q_proj.kernel": (d, q), "attn.k_proj.kernel": (d, kv), "attn.v_proj.kernel": (d, kv),
        "attn.o_proj.kernel": (q, d), "mlp.gate_proj.kernel": (d, f), "mlp.up_proj.kernel": (d, f),
        "mlp.down_proj.kernel": (f, d)}.items()}
  return shapes | {"norm.weight": (d,), "lm_head.kernel": (d, config.vocab_size)}


def random_weights(config: GemmaConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 weights keyed by state path (std 0.02, norms near 1; no lm_head.kernel when tied): for small
  test models."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)
  norm = lambda n: (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
  d, hd = config.dim, config.head_dim
  weights = {"embed.embedding": normal(config.vocab_size, d), "norm.weight": norm(d)}
  if not config.tie_embeddings:
    weights["lm_head.kernel"] = normal(d, config.vocab_size)
  for i in range(config.n_layers):
    p = f"layers.{i}."
    weights |= {p + f"{name}.weight": norm(d) for name in ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm")}
    weights |= {
        p + "attn.q_norm.weight": norm(hd), p + "attn.k_norm.weight": norm(hd),
        p + "attn.q_proj.kernel": normal(d, config.n_heads * hd),
        p + "attn.k_proj.kernel": normal(d, config.n_kv_heads * hd),
        p + "attn.v_proj.kernel": normal(d, config.n_kv_heads * hd),
        p + "attn.o_proj.kernel": normal(config.n_heads * hd, d),
        p + "mlp.gate_proj.kernel": normal(d, config.ffn_dim),
        p + "mlp.up_proj.kernel": normal(d, config.ffn_dim),
        p + "mlp.down_proj.kernel": normal(config.ffn_dim, d),
    }
  return weights


def random_gemma(config: GemmaConfig, seed: int = 0) -> Gemma:
  """A randomly initialised `Gemma` (see `random_weights`)."""
  return Gemma.from_weights(config, random_weights(config, seed))
