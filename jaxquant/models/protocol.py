"""What a quantization method may ask of a model and of its blocks, so that no method names a model class.

A `BlockModel` (Llama, Gemma, Bert, ViT) is an embedding, a list of blocks run in order, and a head:

  model.embed_tokens(tokens (B, T) int32) -> h (B, T, D); a model whose inputs are not token ids (a ViT: images)
      has `input_shape`, one sample's shape (images (B, *input_shape) float32 go where tokens go)
  model.block_extras(tokens (B, T), mask (B, T) | None) -> the extra positional inputs every block takes after
      h: () for a decoder, (mask,) for an encoder (all ones when mask is None)
  model.layers[i](h, *extras) -> h
  model.head(h) -> logits (decoders) / features (encoders)
  model(tokens) -> the whole forward (an encoder's mask defaults to all ones)
  model.can_generate: whether it is a decoder that models.decode can sample from
  model.config.vocab_size (token models only)

A block may describe which linears read the same activation (`block.input_groups()` -> tuple[InputGroup]); RepQuant
needs that and refuses blocks without it. An attention module whose probabilities can be quantized has an attribute
`probs_quant` (a quantizers.SoftmaxQuant or None).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence, runtime_checkable

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class InputGroup:
  """Linears (module paths inside a block) reading the same activation.

  norm: the module path of the norm whose output it is (None where the input is not a norm's output).
  fold: how a per-channel affine on this activation can be folded away: "norm" (into the norm's own affine: the
    norm feeds only these linears), "branch" (the norm's output is also the residual stream, so the affine goes to
    a module at block attribute `branch` that only the quantized branch reads), None (not a norm's output).
  """
  name: str
  linears: tuple[str, ...]
  norm: str | None = None
  fold: str | None = None
  branch: str | None = None


@runtime_checkable
class BlockModel(Protocol):
  layers: Sequence[nnx.Module]
  can_generate: bool

  def embed_tokens(self, tokens: jax.Array) -> jax.Array: ...

  def block_extras(self, tokens: jax.Array, mask: jax.Array | None) -> tuple: ...

  def head(self, h: jax.Array) -> jax.Array: ...


def check_block_model(model, what: str) -> None:
  """Refuse, naming `what` needs it, a model that does not implement BlockModel."""
  missing = [name for name in ("layers", "can_generate", "embed_tokens", "block_extras", "head")
             if not hasattr(model, name)]
  if missing:
    raise TypeError(f"{what} needs a block model (see jaxquant.models.protocol.BlockModel); "
                    f"{type(model).__name__} lacks {', '.join(missing)}")
