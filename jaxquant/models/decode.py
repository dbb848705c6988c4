"""Text generation with a KV cache for the decoders (llama family, Gemma 3 with its sliding-window layers).

Contract:
  * `forward(model, tokens, cache, start, pad)` runs tokens (B, T) through the model at cache slots
    start..start+T-1, writes their keys and values there and returns the logits of the last slot (B, V) and the
    new cache. The same function serves the prompt (prefill: T = prompt length, start 0) and every later token
    (T = 1). Every linear is the model's own `Linear`, i.e. `ops.qdot`: a quantized model decodes on the same
    integer / lookup-table paths as it evaluates. The attention math is the model's own (`attn.qkv`,
    `attn.attend`, the block's `__call__`); only the positions, the mask and the cache are this file's.
  * A batch of prompts of different lengths is LEFT-padded (`left_pad`): sequence b has pad[b] pad slots first,
    its token at slot s has RoPE position s - pad[b], and it never attends to a pad slot. All sequences then
    write their next token at the same slot, so one step serves the whole batch.
  * The cache is a list, one (k, v) pair per block, each (B, S, n_kv_heads, head_dim) in `cache_dtype`; S is
    fixed when the cache is made (prompt + new tokens). Sliding-window layers keep all S slots and mask by
    distance (memory S per layer, like the global layers; simple and exact).
  * `Decoder` splits the model once and compiles one executable per (batch, tokens, cache length) with the
    cache donated (updated in place); sampling (sampling.Sampler) runs inside the step, so the next token stays
    on the device and steps are dispatched back to back unless the caller asks for each token on the host.
  * `generate` is the loop: prompts in, new tokens out, with the time to the first token and the decode time
    measured separately from compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant.models.llama import rope_cos_sin
from jaxquant.models.sampling import GREEDY, Sampler, sample


class DecodeError(ValueError):
  """A request the decoder cannot serve (no prompt, no room in the cache, not a decoder): says what to change."""


def is_decoder(model) -> bool:
  """Whether `model` can generate: a token embedding, a block list whose blocks attend causally, a head."""
  layers = getattr(model, "layers", None)
  return (hasattr(model, "embed_tokens") and hasattr(model, "head") and layers is not None and len(layers) > 0
          and all(hasattr(getattr(b, "attn", None), "qkv") for b in layers))


def _check_decoder(model) -> None:
  if not is_decoder(model):
    raise DecodeError(f"{type(model).__name__} is not a decoder (an encoder such as BERT/MiniLM cannot generate "
                      "text): use a llama-family or Gemma 3 model")


def init_cache(model, batch: int, length: int, dtype=jnp.float32) -> list[tuple[jax.Array, jax.Array]]:
  """An empty cache: one (k, v) pair of zeros (batch, length, n_kv_heads, head_dim) per block."""
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
          for shape in cache_shapes(model, batch, length)]


def cache_shapes(model, batch: int, length: int) -> list[tuple[int, int, int, int]]:
  return [(batch, length, block.attn.n_kv_heads, block.attn.head_dim) for block in model.layers]


def forward(model, tokens: jax.Array, cache: list, start: jax.Array, pad: jax.Array
            ) -> tuple[jax.Array, list]:
  """tokens (B, T) int32 at cache slots start..start+T-1 (start () int32), pad (B,) int32 left-pad slots of
  each sequence -> (logits (B, V) float32 of the last slot, new cache). Traceable; see the module docstring."""
  batch, seq = tokens.shape
  length = cache[0][0].shape[1]
  slots = start + jnp.arange(seq, dtype=jnp.int32)  # (T,)
  positions = jnp.maximum(slots[None, :] - pad[:, None], 0)  # (B, T); pad slots' own queries are never used
  key_slots = jnp.arange(length, dtype=jnp.int32)
  distance = slots[None, :, None] - key_slots[None, None, :]  # (1, T, S)
  visible = (distance >= 0) & (key_slots[None, None, :] >= pad[:, None, None])  # (B, T, S)
  tables = {}

  def rope(theta: float, head_dim: int):
    if (theta, head_dim) not in tables:
      cos, sin = rope_cos_sin(length, head_dim, theta)
      tables[theta, head_dim] = (jnp.take(cos, positions, axis=0), jnp.take(sin, positions, axis=0))
    return tables[theta, head_dim]

  h = model.embed_tokens(tokens)
  new_cache = []
  for block, (k_cache, v_cache) in zip(model.layers, cache):
    attn = block.attn
    window = getattr(attn, "sliding_window", None)
    allowed = visible if window is None else visible & (distance < window)

    def attention(x, attn=attn, k_cache=k_cache, v_cache=v_cache, allowed=allowed):
      q, k, v = attn.qkv(x, *rope(attn.rope_theta, attn.head_dim))
      zero = jnp.zeros((), jnp.int32)
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (zero, start, zero, zero))
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (zero, start, zero, zero))
      new_cache.append((k_cache, v_cache))
      return attn.attend(q, k_cache, v_cache, allowed)

    h = block(h, attention)
  return model.head(h[:, -1:])[:, 0], new_cache


def _step(graphdef, treedef, sampler: Sampler, leaves, tokens, cache, start, pad, key):
  model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
  logits, cache = forward(model, tokens, cache, start, pad)
  key, sub = jax.random.split(key)
  return sample(logits, sub, sampler)[:, None], logits, cache, key


class Decoder:
  """A model ready to decode with one sampler: compiled once per (batch, tokens a call, cache length).

  run(tokens (B, T), cache, start, pad, key) -> (next tokens (B, 1) int32, logits (B, V), cache, key): the
  cache passed in is donated (do not use it again); the key is split once a call, its second half sampling.
  """

  def __init__(self, model, sampler: Sampler = GREEDY, cache_dtype=jnp.float32):
    _check_decoder(model)
    self.model = model
    self.sampler = sampler
    self.cache_dtype = jnp.dtype(cache_dtype)
    graphdef, state = nnx.split(model)
    self._leaves, treedef = jax.tree_util.tree_flatten(state)  # flattened once: less work a dispatch
    self._jitted = jax.jit(functools.partial(_step, graphdef, treedef, sampler), donate_argnums=(2,))
    self._compiled: dict[tuple[int, int, int], Callable] = {}
    self.compile_seconds = 0.0

  def init_cache(self, batch: int, length: int) -> list:
    return init_cache(self.model, batch, length, self.cache_dtype)

  def compile(self, batch: int, tokens: int, length: int) -> float:
    """Compile the executable for this shape now (no-op when done); returns the seconds it took."""
    shape = (batch, tokens, length)
    if shape in self._compiled:
      return 0.0
    start = time.perf_counter()
    cache = [(jax.ShapeDtypeStruct(s, self.cache_dtype),) * 2 for s in cache_shapes(self.model, batch, length)]
    key = jax.eval_shape(lambda: jax.random.key(0))
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    self._compiled[shape] = self._jitted.lower(self._leaves, i32(batch, tokens), cache, i32(), i32(batch),
                                               key).compile()
    seconds = time.perf_counter() - start
    self.compile_seconds += seconds
    return seconds

  def run(self, tokens, cache, start, pad, key):
    batch, seq = tokens.shape
    length = cache[0][0].shape[1]
    if start + seq > length:
      raise DecodeError(f"no room in the cache: slots {start}..{start + seq - 1} of a cache of {length}")
    self.compile(batch, seq, length)
    # The jitted function, not the compiled object: it finds the executable compile() made, and its C++ fast
    # path dispatches a step in well under a millisecond where Compiled.__call__ spent ~5 ms of host time on
    # ~300 weight arrays; np.int32, not jnp.int32: no device op of its own.
    return self._jitted(self._leaves, tokens, cache, np.int32(start), pad, key)


def left_pad(prompts, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Prompts (a (B, T) array, or B token sequences of any lengths >= 1) -> (tokens (B, T) int32 right-aligned,
  pad (B,) int32 pad slots before each prompt)."""
  if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
    rows = list(prompts)
  else:
    rows = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  if not rows:
    raise DecodeError("no prompts: give at least one prompt of at least one token")
  lengths = np.array([len(r) for r in rows], np.int32)
  if lengths.min() < 1:
    raise DecodeError("an empty prompt: every prompt needs at least one token (Gemma: at least BOS)")
  width = int(lengths.max())
  tokens = np.full((len(rows), width), pad_id, np.int32)
  for b, row in enumerate(rows):
    tokens[b, width - len(row):] = row
  return tokens, (width - lengths).astype(np.int32)


@dataclasses.dataclass
class Generation:
  """What `generate` produced and how long it took (seconds by wall clock, compilation excluded).

  tokens: (B, N) int32 new tokens (N = max_new_tokens, or fewer when every sequence reached eos_id first; a
  sequence that stopped earlier is filled with eos_id). lengths: (B,) new tokens of each, its EOS included.
  prefill_seconds: prompt in, first new token on the host (time to first token). decode_seconds: the other
  N - 1 tokens (decode_steps steps of the whole batch)."""
  tokens: np.ndarray
  lengths: np.ndarray
  prompt_tokens: int
  prefill_seconds: float
  decode_seconds: float
  decode_steps: int
  compile_seconds: float

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / self.prefill_seconds

  @property
  def decode_tokens_per_s(self) -> float:
    """New tokens a second over the decode steps, the whole batch counted (nan without a decode step)."""
    if self.decode_steps == 0 or self.decode_seconds <= 0:
      return float("nan")
    return self.tokens.shape[0] * self.decode_steps / self.decode_seconds


def generate(model_or_decoder, prompts, max_new_tokens: int, *, sampler: Sampler = GREEDY, seed: int = 0,
             key: jax.Array | None = None, eos_id: int | None = None,
             on_token: Callable[[int, np.ndarray], None] | None = None, cache_dtype=jnp.float32,
             pad_id: int = 0) -> Generation:
  """Prompts (see left_pad) -> `max_new_tokens` new tokens each (see Generation), sampled as `sampler` says from
  the PRNG key (jax.random.key(seed) unless `key` is given): every step splits the key and samples with the
  second half, so a seed gives the same tokens every run.

  on_token(i, tokens (B,) numpy) is called as each new token of the batch is ready (this waits for it on the
  host); without it and without eos_id the steps are dispatched back to back and read once at the end.
  A Decoder may be passed instead of a model to reuse its compilations (its sampler and cache dtype then apply).
  """
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise DecodeError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  decoder = model_or_decoder if isinstance(model_or_decoder, Decoder) else Decoder(model_or_decoder, sampler,
                                                                                  cache_dtype)
  tokens, pad = left_pad(prompts, pad_id)
  batch, width = tokens.shape
  length = width + max_new_tokens
  compile_seconds = decoder.compile(batch, width, length)
  compile_seconds += decoder.compile(batch, 1, length) if max_new_tokens > 1 else 0.0
  key = jax.random.key(seed) if key is None else key
  cache = decoder.init_cache(batch, length)
  tokens_dev, pad_dev = jnp.asarray(tokens), jnp.asarray(pad)
  jax.block_until_ready((cache, tokens_dev, pad_dev))
  watch = on_token is not None or eos_id is not None
  finished = np.zeros(batch, bool)
  lengths = np.zeros(batch, np.int32)
  host: list[np.ndarray] = []

  def arrived(i: int, token_host: np.ndarray) -> None:
    token_host = np.where(finished, eos_id if eos_id is not None else 0, token_host).astype(np.int32)
    lengths[~finished] += 1
    if eos_id is not None:
      finished[token_host == eos_id] = True
    host.append(token_host)
    if on_token is not None:
      on_token(i, token_host)

  begin = time.perf_counter()
  token, _, cache, key = decoder.run(tokens_dev, cache, 0, pad_dev, key)
  arrived(0, np.asarray(token)[:, 0])
  prefill_seconds = time.perf_counter() - begin
  pending = []
  begin = time.perf_counter()
  steps = 0
  for i in range(1, max_new_tokens):
    if finished.all():
      break
    token, _, cache, key = decoder.run(token, cache, width + i - 1, pad_dev, key)
    steps += 1
    if watch:
      arrived(i, np.asarray(token)[:, 0])
    else:
      pending.append(token)
  jax.block_until_ready(token)
  decode_seconds = time.perf_counter() - begin
  for i, t in enumerate(pending, start=1):
    arrived(i, np.asarray(t)[:, 0])
  return Generation(tokens=np.stack(host, axis=1), lengths=lengths, prompt_tokens=int((width - pad).sum()),
                    prefill_seconds=prefill_seconds, decode_seconds=decode_seconds, decode_steps=steps,
                    compile_seconds=compile_seconds)


@nnx.jit
def _logits_at(model, tokens, i):
  return jax.lax.dynamic_index_in_dim(model(tokens)[0], i, keepdims=False)


def reference_greedy(model, prompt: Sequence[int], max_new_tokens: int, window: int | None = None) -> np.ndarray:
  """The greedy continuation by the full forward pass, no cache: the argmax of the logits at the last token of
  the growing sequence, one full pass a token. The sequence sits in a fixed window of `window` tokens (default:
  just long enough), zeros after it, so one compilation serves every pass and every prompt of a test; causal
  attention makes the zeros invisible. For tests."""
  _check_decoder(model)
  end = len(prompt) + max_new_tokens
  buffer = np.zeros((1, max(window or end, end)), np.int32)
  buffer[0, :len(prompt)] = prompt
  for n in range(len(prompt), end):
    buffer[0, n] = int(jnp.argmax(_logits_at(model, jnp.asarray(buffer), n - 1)))
  return buffer[0, len(prompt):end].copy()
