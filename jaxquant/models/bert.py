"""BERT encoder (e.g. all-MiniLM-L6-v2) as small Flax NNX modules, post-LayerNorm, exact (erf) GELU.

Parameter paths, which quantization rules match on:

  embeddings/{word,position,token_type}_embeddings   (vocab, dim), (max_positions, dim), (n_types, dim)
  embeddings/emb_norm/{weight,bias}                  (dim,)
  layers/<i>/attn/{q,k,v,o}_proj/{kernel,bias}       (dim, dim), (dim,)
  layers/<i>/attn_norm/{weight,bias}
  layers/<i>/mlp/up_proj/{kernel,bias}               (dim, ffn), (ffn,)
  layers/<i>/mlp/down_proj/{kernel,bias}             (ffn, dim), (dim,)
  layers/<i>/mlp_norm/{weight,bias}

Block-at-a-time API: `h = model.embeddings(token_ids)`, `h = block(h, mask)` for each block in
`model.layers`. `model.embed_sentences` mean-pools over real tokens and L2-normalises, as sentence-transformers
does for all-MiniLM-L6-v2. `jaxquant.sources.loading.load_model` loads a checkpoint directory.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.models.layers import LayerNorm, Linear
from jaxquant.models.protocol import InputGroup


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape and numerics of a BERT encoder (names follow HF's config.json where they exist)."""
  vocab_size: int
  dim: int
  n_layers: int
  n_heads: int
  ffn_dim: int
  max_positions: int = 512
  n_token_types: int = 2
  norm_eps: float = 1e-12
  gelu_approximate: bool = False  # False: exact erf GELU (HF "gelu"); True: tanh form ("gelu_new")


class Embeddings(nnx.Module):
  """word + position (0..T-1) + token type embeddings, then LayerNorm. token_ids (B, T) -> (B, T, dim)."""

  def __init__(self, word_embeddings: jax.Array, position_embeddings: jax.Array,
               token_type_embeddings: jax.Array, emb_norm: LayerNorm):
    self.word_embeddings = nnx.Param(word_embeddings)
    self.position_embeddings = nnx.Param(position_embeddings)
    self.token_type_embeddings = nnx.Param(token_type_embeddings)
    self.emb_norm = emb_norm

  def __call__(self, token_ids: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
    seq = token_ids.shape[1]
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(token_ids)
    h = (jnp.take(self.word_embeddings.get_value(), token_ids, axis=0)
         + self.position_embeddings.get_value()[None, :seq]
         + jnp.take(self.token_type_embeddings.get_value(), token_type_ids, axis=0))
    return self.emb_norm(h.astype(jnp.float32))


class SelfAttention(nnx.Module):
  """Bidirectional multi-head attention over real tokens. x: (B, T, dim), mask: (B, T) 1/0 -> (B, T, dim).

  q_proj, k_proj, v_proj, o_proj: kernels (dim, dim) with biases (dim,).
  probs_quant: a quantizers.SoftmaxQuant (static) quantizing the attention probabilities before P @ V, or None
  (float softmax).
  """

  probs_quant = None

  def __init__(self, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, n_heads: int):
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
    self.n_heads = n_heads

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    batch, seq, dim = x.shape
    hd = dim // self.n_heads
    split = lambda y: y.reshape(batch, seq, self.n_heads, hd)
    q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd).astype(np.float32)
    keep = (mask != 0)[:, None, None, :]  # (B, 1, 1, S): padded keys get no weight
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    if self.probs_quant is None:
      out = jnp.einsum("bhts,bshd->bthd", probs, v)
    else:
      out = self.probs_quant.attend(probs, v, "bhts,bshd->bthd")
    return self.o_proj(out.reshape(batch, seq, dim))


class MLP(nnx.Module):
  """down(gelu(up(x))). up: (dim, ffn), down: (ffn, dim), both with biases. (B,T,dim)->(B,T,dim)."""

  def __init__(self, up_proj: Linear, down_proj: Linear, gelu_approximate: bool = False):
    self.up_proj, self.down_proj = up_proj, down_proj
    self.gelu_approximate = gelu_approximate

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.gelu(self.up_proj(x), approximate=self.gelu_approximate))


class Block(nnx.Module):
  """Post-LN encoder block: h = attn_norm(h + attn(b(h), mask)); h = mlp_norm(h + mlp(b'(h))). (B,T,dim)->(B,T,dim).

  qkv_branch / up_branch (b, b'): optional modules (B,T,dim)->(B,T,dim) applied to the input of the attention and
  the MLP only, not to the residual stream; None (the float model) is the identity. RepQuant puts its
  reparameterized LayerNorm affine there (see input_groups).
  """

  def __init__(self, attn: SelfAttention, attn_norm: LayerNorm, mlp: MLP, mlp_norm: LayerNorm,
               qkv_branch: nnx.Module | None = None, up_branch: nnx.Module | None = None):
    self.attn, self.attn_norm, self.mlp, self.mlp_norm = attn, attn_norm, mlp, mlp_norm
    self.qkv_branch, self.up_branch = nnx.data(qkv_branch), nnx.data(up_branch)  # data even when None

  def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.qkv_branch(h) if self.qkv_branch is not None else h
    h = self.attn_norm(h + self.attn(x, mask))
    x = self.up_branch(h) if self.up_branch is not None else h
    return self.mlp_norm(h + self.mlp(x))

  @staticmethod
  def input_groups() -> tuple[InputGroup, ...]:
    """The linears reading each activation (see models.protocol). Post-LN: the block input (the previous block's
    mlp_norm, or the embeddings' LayerNorm) feeds q/k/v and attn_norm's output feeds up_proj; both are also the
    residual stream, so a per-channel affine folds into a branch module, not into the norm."""
    return (InputGroup("block_input", ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "previous LayerNorm",
                       "branch", "qkv_branch"),
            InputGroup("attn_out", ("attn.o_proj",)),
            InputGroup("attn_norm", ("mlp.up_proj",), "attn_norm", "branch", "up_branch"),
            InputGroup("mlp_hidden", ("mlp.down_proj",)))


class Bert(nnx.Module):
  """The encoder (a models.protocol.BlockModel). token_ids, mask: (B, T) int -> hidden states (B, T, dim) float32;
  mask None: every token is real."""

  can_generate = False

  def __init__(self, config: BertConfig, embeddings: Embeddings, layers: list[Block]):
    self.config = config
    self.embeddings = embeddings
    self.layers = nnx.List(layers)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """token_ids (B, T) -> the embeddings' LayerNorm output (B, T, dim) (token type 0)."""
    return self.embeddings(tokens)

  def block_extras(self, tokens: jax.Array, mask: jax.Array | None) -> tuple:
    """Every block takes the padding mask (B, T) after h; None: every token is real."""
    return (jnp.ones_like(tokens) if mask is None else mask,)

  def head(self, h: jax.Array) -> jax.Array:
    """The encoder's features are its last hidden states."""
    return h

  def __call__(self, token_ids: jax.Array, mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    mask = jnp.ones_like(token_ids) if mask is None else mask
    h = self.embeddings(token_ids, token_type_ids)
    for block in self.layers:
      h = block(h, mask)
    return h

  def embed_sentences(self, token_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of the hidden states over real tokens, L2-normalised: (B, T) -> (B, dim) float32."""
    return pool_and_normalize(self(token_ids, mask), mask)

  @classmethod
  def from_weights(cls, config: BertConfig, weights: Mapping[str, np.ndarray]) -> "Bert":
    """Build from float arrays keyed by state path (those of nnx.state(model), see weight_shapes), kernels
    (in, out)."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    norm = lambda prefix: LayerNorm(f32(weights[prefix + ".weight"]), f32(weights[prefix + ".bias"]),
                                    config.norm_eps)
    linear = lambda prefix: Linear(f32(weights[prefix + ".kernel"]), f32(weights[prefix + ".bias"]))
    embeddings = Embeddings(f32(weights["embeddings.word_embeddings"]), f32(weights["embeddings.position_embeddings"]),
                            f32(weights["embeddings.token_type_embeddings"]), norm("embeddings.emb_norm"))
    blocks = []
    for i in range(config.n_layers):
      p = f"layers.{i}."
      attn = SelfAttention(linear(p + "attn.q_proj"), linear(p + "attn.k_proj"), linear(p + "attn.v_proj"),
                           linear(p + "attn.o_proj"), config.n_heads)
      mlp = MLP(linear(p + "mlp.up_proj"), linear(p + "mlp.down_proj"), config.gelu_approximate)
      blocks.append(Block(attn, norm(p + "attn_norm"), mlp, norm(p + "mlp_norm")))
    return cls(config, embeddings, blocks)


def weight_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
  """State path -> shape of every float leaf (kernels (in, out))."""
  d, f = config.dim, config.ffn_dim
  shapes = {"embeddings.word_embeddings": (config.vocab_size, d), "embeddings.position_embeddings":
            (config.max_positions, d), "embeddings.token_type_embeddings": (config.n_token_types, d),
            "embeddings.emb_norm.weight": (d,), "embeddings.emb_norm.bias": (d,)}
  for i in range(config.n_layers):
    p = f"layers.{i}."
    for name, (n_in, n_out) in {"attn.q_proj": (d, d), "attn.k_proj": (d, d), "attn.v_proj": (d, d),
                                "attn.o_proj": (d, d), "mlp.up_proj": (d, f), "mlp.down_proj": (f, d)}.items():
      shapes |= {p + name + ".kernel": (n_in, n_out), p + name + ".bias": (n_out,)}
    for name in ("attn_norm", "mlp_norm"):
      shapes |= {p + name + ".weight": (d,), p + name + ".bias": (d,)}
  return shapes


def pool_and_normalize(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """hidden (B, T, D), mask (B, T) -> mean over real tokens, L2-normalised (B, D)."""
  weights = mask.astype(jnp.float32)[..., None]
  pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)
