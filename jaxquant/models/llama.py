"""Llama-family decoder (SmolLM2, Llama 2/3 style) as small Flax NNX modules.

Every weight matmul goes through `layers.Linear` (so a quantizer can swap `Linear.kernel` for a QArray);
the only direct uses of a weight array are the embedding lookup. Parameter paths, which quantization rules
match on:

  embed/embedding                          (vocab, dim)
  layers/<i>/attn_norm/weight              (dim,)
  layers/<i>/attn/{q,k,v,o}_proj/kernel    (dim, n_heads*head_dim) ... (n_heads*head_dim, dim)
  layers/<i>/mlp_norm/weight               (dim,)
  layers/<i>/mlp/{gate,up,down}_proj/kernel
  norm/weight                              (dim,)
  lm_head/kernel                           (dim, vocab); a copy of embedding.T when the embeddings are tied

Block-at-a-time API for layer-wise methods: `h = model.embed_tokens(tokens)`, `h = block(h)` for each block
in `model.layers`, `logits = model.head(h)`. Computation is float32; q and k are in Hugging Face's rotate-half
RoPE layout (sources.llama un-permutes llama.cpp's GGUF order).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.models.layers import Linear, RMSNorm
from jaxquant.models.protocol import InputGroup


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a llama-family decoder."""
  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  add_bos: bool = False          # whether evaluation windows should start with BOS (SmolLM2: no)
  bos_token_id: int | None = None
  eos_token_id: int | None = None    # where generation stops (None: unknown)
  context_length: int | None = None  # positions the model was trained for (None: unknown)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin: (seq_len, head_dim) for positions 0..seq_len-1, HF layout (frequencies repeated in halves)."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  angles = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, hd/2)
  angles = np.concatenate([angles, angles], axis=-1)
  return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: (B, T, heads, hd); cos, sin: (T, hd) shared by the batch, or (B, T, hd) per sequence (decoding a padded
  batch). Rotate-half convention: x*cos + rotate_half(x)*sin."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Embedding(nnx.Module):
  """Token embedding table. embedding: (vocab, dim). tokens (B, T) int -> (B, T, dim) float32."""

  def __init__(self, embedding: jax.Array):
    self.embedding = nnx.Param(embedding)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding.get_value(), tokens, axis=0).astype(jnp.float32)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE. x: (B, T, dim) -> (B, T, dim).

  q_proj: (dim, n_heads*hd), k_proj, v_proj: (dim, n_kv_heads*hd), o_proj: (n_heads*hd, dim).
  Positions are 0..T-1. `qkv` and `attend` are the two halves of __call__, so that a KV-cache decoder
  (models/decode.py) runs the same math with its own positions, keys and mask.
  probs_quant: a quantizers.SoftmaxQuant (static) quantizing the attention probabilities before P @ V, or None
  (float softmax).
  """

  probs_quant = None
  sliding_window = None  # llama attends to every earlier position

  def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear,
               n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float):
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
    self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
    self.rope_theta = rope_theta

  def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (B, T, dim), cos/sin as apply_rope takes them -> q (B, T, n_heads, hd), k, v (B, T, n_kv_heads, hd),
    q and k rotated."""
    batch, seq, _ = x.shape
    hd, n_kv = self.head_dim, self.n_kv_heads
    q = self.q_proj(x).reshape(batch, seq, self.n_heads, hd)
    k = self.k_proj(x).reshape(batch, seq, n_kv, hd)
    v = self.v_proj(x).reshape(batch, seq, n_kv, hd)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """q (B, T, n_heads, hd), k, v (B, S, n_kv_heads, hd), allowed (1 or B, T, S) bool: which key each query
    sees -> o_proj of the attention output, (B, T, dim)."""
    batch, seq = q.shape[:2]
    hd, n_kv = self.head_dim, self.n_kv_heads
    q = q.reshape(batch, seq, n_kv, self.n_heads // n_kv, hd)  # q head j uses kv head j // group
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / np.sqrt(hd).astype(np.float32)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if self.probs_quant is None:
      out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    else:
      out = self.probs_quant.attend(probs, v, "bkgts,bskd->btkgd")
    return self.o_proj(out.reshape(batch, seq, self.n_heads * hd))

  def __call__(self, x: jax.Array) -> jax.Array:
    seq = x.shape[1]
    cos, sin = rope_cos_sin(seq, self.head_dim, self.rope_theta)
    q, k, v = self.qkv(x, cos, sin)
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None]  # (1, T, S)
    return self.attend(q, k, v, causal)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)). gate, up: (dim, ffn); down: (ffn, dim). (B,T,dim)->(B,T,dim)."""

  def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear):
    self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
  """Pre-norm decoder block: h + attn(attn_norm(h)), then + mlp(mlp_norm(.)). h: (B, T, dim) -> (B, T, dim)."""

  def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm, mlp: MLP):
    self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

  def __call__(self, h: jax.Array, attention=None) -> jax.Array:
    """attention: a function x -> attention output standing in for self.attn (the KV-cache decoder passes one
    that reads and writes its cache); None: self.attn."""
    h = h + (self.attn if attention is None else attention)(self.attn_norm(h))
    return h + self.mlp(self.mlp_norm(h))

  @staticmethod
  def input_groups() -> tuple[InputGroup, ...]:
    """The linears reading each activation (see models.protocol): a pre-norm block's norms feed only linears."""
    return (InputGroup("attn_norm", ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn_norm", "norm"),
            InputGroup("attn_out", ("attn.o_proj",)),
            InputGroup("mlp_norm", ("mlp.gate_proj", "mlp.up_proj"), "mlp_norm", "norm"),
            InputGroup("mlp_hidden", ("mlp.down_proj",)))

  @classmethod
  def from_weights(cls, config: "LlamaConfig", weights: Mapping[str, np.ndarray]) -> "Block":
    """One block from float arrays keyed by the block's state paths ("attn_norm.weight", "attn.q_proj.kernel",
    ...): norms (dim,), kernels (in, out), q/k output features in HF rotate-half RoPE order."""
    w = lambda name: jnp.asarray(weights[name], jnp.float32)
    attn = Attention(Linear(w("attn.q_proj.kernel")), Linear(w("attn.k_proj.kernel")),
                     Linear(w("attn.v_proj.kernel")), Linear(w("attn.o_proj.kernel")),
                     config.n_heads, config.n_kv_heads, config.head_dim, config.rope_theta)
    mlp = MLP(Linear(w("mlp.gate_proj.kernel")), Linear(w("mlp.up_proj.kernel")), Linear(w("mlp.down_proj.kernel")))
    return cls(RMSNorm(w("attn_norm.weight"), config.norm_eps), attn, RMSNorm(w("mlp_norm.weight"), config.norm_eps),
               mlp)


class Llama(nnx.Module):
  """The decoder (a models.protocol.BlockModel). tokens (B, T) int32 -> logits (B, T, vocab) float32."""

  can_generate = True

  def __init__(self, config: LlamaConfig, embed: Embedding, layers: list[Block], norm: RMSNorm,
               lm_head: Linear):
    self.config = config
    self.embed = embed
    self.layers = nnx.List(layers)
    self.norm = norm
    self.lm_head = lm_head

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens (B, T) int32 -> h (B, T, dim)."""
    return self.embed(tokens)

  def block_extras(self, tokens: jax.Array, mask: jax.Array | None) -> tuple:
    """A decoder block takes no input but h (causal attention; no padding mask)."""
    return ()

  def head(self, h: jax.Array) -> jax.Array:
    """h (B, T, dim) -> logits (B, T, vocab): final norm, then lm_head."""
    return self.lm_head(self.norm(h))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    h = self.embed_tokens(tokens)
    for block in self.layers:
      h = block(h)
    return self.head(h)

  @classmethod
  def from_weights(cls, config: LlamaConfig, weights: Mapping[str, np.ndarray]) -> "Llama":
    """Build from float arrays keyed by state path (those of nnx.state(model), see weight_shapes), kernels
    (in, out), q/k output features in HF rotate-half RoPE order. With tied embeddings lm_head.kernel may be
    absent (and is ignored): the head is a copy of the embedding, transposed."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    blocks = []
    for i in range(config.n_layers):
      prefix = f"layers.{i}."
      blocks.append(Block.from_weights(config, {path.removeprefix(prefix): array for path, array in weights.items()
                                                if path.startswith(prefix)}))
    embedding = f32(weights["embed.embedding"])
    if config.tie_embeddings or "lm_head.kernel" not in weights:
      head_kernel = jnp.array(embedding.T)  # its own array, so the head can be quantized on its own
    else:
      head_kernel = f32(weights["lm_head.kernel"])
    return cls(config, Embedding(embedding), blocks, RMSNorm(f32(weights["norm.weight"]), config.norm_eps),
               Linear(head_kernel))


def weight_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """State path -> shape of every float leaf (kernels (in, out)); lm_head.kernel also when tied (a copy)."""
  d, q, kv, f = config.dim, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.ffn_dim
  shapes = {"embed.embedding": (config.vocab_size, d)}
  for i in range(config.n_layers):
    shapes |= {f"layers.{i}.{leaf}": shape for leaf, shape in {
        "attn_norm.weight": (d,), "mlp_norm.weight": (d,), "attn.q_proj.kernel": (d, q),
        "attn.k_proj.kernel": (d, kv), "attn.v_proj.kernel": (d, kv), "attn.o_proj.kernel": (q, d),
        "mlp.gate_proj.kernel": (d, f), "mlp.up_proj.kernel": (d, f), "mlp.down_proj.kernel": (f, d)}.items()}
  return shapes | {"norm.weight": (d,), "lm_head.kernel": (d, config.vocab_size)}


def abstract_llama(config: LlamaConfig) -> Llama:
  """A Llama of this config with abstract (shape-only) parameters: a restore template that costs no memory."""
  return nnx.eval_shape(lambda: Llama.from_weights(
      config, {path: jnp.zeros(shape) for path, shape in weight_shapes(config).items()}))


def random_weights(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 weights keyed by state path (std 0.02, norms near 1; no lm_head.kernel when tied): for small
  test models."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)
  norm = lambda: (1.0 + 0.1 * rng.standard_normal(config.dim)).astype(np.float32)
  d, hd = config.dim, config.head_dim
  weights = {"embed.embedding": normal(config.vocab_size, d), "norm.weight": norm()}
  if not config.tie_embeddings:
    weights["lm_head.kernel"] = normal(d, config.vocab_size)
  for i in range(config.n_layers):
    p = f"layers.{i}."
    weights |= {
        p + "attn_norm.weight": norm(), p + "mlp_norm.weight": norm(),
        p + "attn.q_proj.kernel": normal(d, config.n_heads * hd),
        p + "attn.k_proj.kernel": normal(d, config.n_kv_heads * hd),
        p + "attn.v_proj.kernel": normal(d, config.n_kv_heads * hd),
        p + "attn.o_proj.kernel": normal(config.n_heads * hd, d),
        p + "mlp.gate_proj.kernel": normal(d, config.ffn_dim),
        p + "mlp.up_proj.kernel": normal(d, config.ffn_dim),
        p + "mlp.down_proj.kernel": normal(config.ffn_dim, d),
    }
  return weights


def random_llama(config: LlamaConfig, seed: int = 0) -> Llama:
  """A randomly initialised `Llama` (see `random_weights`)."""
  return Llama.from_weights(config, random_weights(config, seed))
