"""Evaluation: perplexity, KL to the full-precision model, top-1 agreement, sentence-embedding cosine.

Windows are evaluated in fixed-size batches under `jax.jit` over (graphdef, state) of the NNX model, so one
compilation serves every batch (the last batch is padded and its padding weighted out). Token-level figures
are over the predicted positions: in a window of T tokens, positions 0..T-2 predict tokens 1..T-1.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm


def _batches(arrays: tuple[np.ndarray, ...], batch_size: int):
  """Yield (batch arrays padded to batch_size rows with zeros, row weights (batch_size,) float32)."""
  n = len(arrays[0])
  for start in range(0, n, batch_size):
    rows = min(batch_size, n - start)
    weights = np.zeros(batch_size, np.float32)
    weights[:rows] = 1.0
    padded = []
    for a in arrays:
      chunk = np.asarray(a[start:start + rows])
      if rows < batch_size:
        chunk = np.concatenate([chunk, np.zeros((batch_size - rows,) + chunk.shape[1:], chunk.dtype)])
      padded.append(chunk)
    yield padded, weights, rows


def _next_token_logp(model, tokens):
  """log-probabilities (B, T-1, V) of the next token at positions 0..T-2, and the targets (B, T-1)."""
  logits = model(tokens)[:, :-1].astype(jnp.float32)
  return jax.nn.log_softmax(logits, axis=-1), tokens[:, 1:]


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(graphdef, state, tokens, weights):
  """Sum over rows (weighted) and predicted positions of -log p(target)."""
  logp, targets = _next_token_logp(nnx.merge(graphdef, state), tokens)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # (B, T-1)
  return jnp.sum(nll * weights[:, None])


@functools.partial(jax.jit, static_argnums=(0, 2))
def _compare_sums(graphdef, state, ref_graphdef, ref_state, tokens, weights):
  """Weighted sums over predicted positions: NLL, reference NLL, KL(p_ref || p), top-1 agreement."""
  logp, targets = _next_token_logp(nnx.merge(graphdef, state), tokens)
  ref_logp, _ = _next_token_logp(nnx.merge(ref_graphdef, ref_state), tokens)
  pick = lambda lp: -jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
  kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)  # (B, T-1)
  agree = (jnp.argmax(logp, axis=-1) == jnp.argmax(ref_logp, axis=-1)).astype(jnp.float32)
  w = weights[:, None]
  return jnp.stack([jnp.sum(pick(logp) * w), jnp.sum(pick(ref_logp) * w), jnp.sum(kl * w), jnp.sum(agree * w)])


def perplexity(model: nnx.Module, windows: np.ndarray, batch_size: int = 4, progress: bool = True) -> float:
  """exp(mean NLL) over all predicted tokens of windows (n_windows, T) int32: n_windows*(T-1) tokens."""
  windows = np.asarray(windows, np.int32)
  graphdef, state = nnx.split(model)
  total = 0.0
  with tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress) as bar:
    for (tokens,), weights, rows in _batches((windows,), batch_size):
      total += float(_nll_sum(graphdef, state, tokens, weights))
      bar.update(rows)
  return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))


def compare_to_reference(model: nnx.Module, ref_model: nnx.Module, windows: np.ndarray, batch_size: int = 4,
                         progress: bool = True) -> dict[str, float]:
  """A (quantized) model against the full-precision reference on windows (n_windows, T) int32.

  Returns {'perplexity', 'ref_perplexity', 'kl' (mean over predicted tokens of KL(p_ref || p_model), nats),
  'top1' (fraction of predicted positions where both argmax tokens agree), 'n_tokens'}.
  """
  windows = np.asarray(windows, np.int32)
  graphdef, state = nnx.split(model)
  ref_graphdef, ref_state = nnx.split(ref_model)
  sums = np.zeros(4, np.float64)
  with tqdm(total=len(windows), desc="compare", unit="window", disable=not progress) as bar:
    for (tokens,), weights, rows in _batches((windows,), batch_size):
      sums += np.asarray(_compare_sums(graphdef, state, ref_graphdef, ref_state, tokens, weights), np.float64)
      bar.update(rows)
  n_tokens = windows.shape[0] * (windows.shape[1] - 1)
  nll, ref_nll, kl, agree = sums / n_tokens
  return {"perplexity": math.exp(nll), "ref_perplexity": math.exp(ref_nll), "kl": float(kl),
          "top1": float(agree), "n_tokens": int(n_tokens)}


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, token_ids, mask):
  return nnx.merge(graphdef, state).embed_sentences(token_ids, mask)


def sentence_embeddings(model: nnx.Module, token_ids: np.ndarray, mask: np.ndarray, batch_size: int = 64,
                        progress: bool = False) -> np.ndarray:
  """model.embed_sentences over token_ids, mask (N, T) in batches: (N, D) float32 unit vectors."""
  graphdef, state = nnx.split(model)
  out = []
  with tqdm(total=len(token_ids), desc="embed", unit="sentence", disable=not progress) as bar:
    for (ids, m), _, rows in _batches((np.asarray(token_ids, np.int32), np.asarray(mask, np.int32)), batch_size):
      out.append(np.asarray(_embed(graphdef, state, ids, m))[:rows])
      bar.update(rows)
  return np.concatenate(out)


def embedding_cosine(model: nnx.Module, ref_model: nnx.Module, token_ids: np.ndarray, mask: np.ndarray,
                     batch_size: int = 64, progress: bool = False) -> float:
  """Mean over sentences of cosine(model embedding, reference embedding); token_ids, mask: (N, T) int32
  (from `sources.tokenizer.encode_batch`)."""
  emb = sentence_embeddings(model, token_ids, mask, batch_size, progress)
  ref = sentence_embeddings(ref_model, token_ids, mask, batch_size, progress)
  cos = np.sum(emb * ref, -1) / (np.linalg.norm(emb, axis=-1) * np.linalg.norm(ref, axis=-1))
  return float(np.mean(cos))
