"""Independent numpy references for the tests, written from docs/formats.md, DESIGN.md's quantizer definitions and
Hugging Face's modeling_llama; they import nothing from jaxquant, so a bug there cannot hide in both.

Quantization schemes (docs/formats.md): a weight W of logical shape (K, N); a group is a block of k_group
consecutive inputs by n_group consecutive outputs, the last block shorter where the size does not divide;
W = (v - zero) * scale with v signed b-bit codes stored (N, K).
"""

from __future__ import annotations

import numpy as np


# --------------------------------------------------------------------------------------------------- bit streams


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
  """(..., K) integer codes -> stored bytes along the last axis. bits 8: the int8 values themselves. bits < 8: a
  little-endian bit stream, code i's bit j at stream bit i*bits + j, K padded with zero codes to a multiple of 8
  (so 8 codes make one word of `bits` bytes)."""
  codes = np.asarray(codes).astype(np.int64)
  if bits == 8:
    return (codes & 0xFF).astype(np.uint8).view(np.int8)
  lead, k = codes.shape[:-1], codes.shape[-1]
  padded = -(-k // 8) * 8
  stream = np.zeros(lead + (padded * bits,), np.uint8)
  for j in range(bits):
    stream[..., j:k * bits:bits] = (codes >> j) & 1
  return np.packbits(stream, axis=-1, bitorder="little")


def unpack(packed: np.ndarray, bits: int, k: int, signed: bool = True) -> np.ndarray:
  """Inverse of pack: (..., K) int64 codes (two's complement sign-extended when signed)."""
  packed = np.asarray(packed)
  if bits == 8:
    raw = packed.view(np.uint8).astype(np.int64)
  else:
    stream = np.unpackbits(packed.view(np.uint8), axis=-1, bitorder="little").astype(np.int64)
    raw = sum(stream[..., j:k * bits:bits] << j for j in range(bits))
  if signed:
    raw = np.where(raw >= 1 << (bits - 1), raw - (1 << bits), raw)
  return raw


# ------------------------------------------------------------------------------------------------ quantization


def groups(shape: tuple[int, int], granularity: str, group_size: int) -> tuple[int, int]:
  """(k_group, n_group) of a scheme (the table in jaxquant/formats.py's docstring); a group size larger than the
  dimension is the whole dimension."""
  k, n = shape
  return {"tensor": (k, n), "channel": (k, 1), "group": (min(group_size, k), 1),
          "row_block": (k, min(group_size, n))}[granularity]


def _blocks(size: int, group: int):
  return [slice(start, min(start + group, size)) for start in range(0, size, group)]


def quantize(w: np.ndarray, bits: int, symmetric: bool, k_group: int, n_group: int):
  """Round-to-nearest, float64, one block at a time: returns (v (K, N) int64, scale (Gk, Gn), zero (Gk, Gn) or
  None), W ~ (v - zero) * scale.

  Symmetric: scale = max|w| / (2^(b-1) - 1), v = clip(round(w / scale), -(2^(b-1) - 1), 2^(b-1) - 1).
  Asymmetric: [min(w, 0), max(w, 0)] onto the 2^b unsigned codes u = clip(round(w / scale) + z, 0, 2^b - 1)
  with scale = range / (2^b - 1) and the integer zero point z = round(-min / scale); stored signed,
  v = u - 2^(b-1) and zero = z - 2^(b-1). A group of zeros gets scale 1.
  """
  w = np.asarray(w, np.float64)
  k, n = w.shape
  rows, cols = _blocks(k, k_group), _blocks(n, n_group)
  half, levels = 1 << (bits - 1), (1 << bits) - 1
  values = np.zeros((k, n), np.int64)
  scale = np.ones((len(rows), len(cols)))
  zero = None if symmetric else np.zeros((len(rows), len(cols)))
  for g, r in enumerate(rows):
    for h, c in enumerate(cols):
      block = w[r, c]
      if symmetric:
        absmax = np.abs(block).max()
        s = absmax / (half - 1) if absmax > 0 else 1.0
        values[r, c] = np.clip(np.round(block / s), -(half - 1), half - 1)
        scale[g, h] = s
      else:
        low, high = min(block.min(), 0.0), max(block.max(), 0.0)
        s = (high - low) / levels if high > low else 1.0
        z = np.clip(np.round(-low / s), 0, levels)
        values[r, c] = np.clip(np.round(block / s) + z, 0, levels) - half
        scale[g, h], zero[g, h] = s, z - half
  return values, scale, zero


def expand(grid: np.ndarray, shape: tuple[int, int], k_group: int, n_group: int) -> np.ndarray:
  """A (Gk, Gn) per-group array repeated over each group's block -> (K, N)."""
  return np.repeat(np.repeat(grid, k_group, axis=0)[:shape[0]], n_group, axis=1)[:, :shape[1]]


def dequantize(values, scale, zero, k_group: int, n_group: int) -> np.ndarray:
  """(v - zero) * scale per block, float64 (K, N)."""
  values = np.asarray(values, np.float64)
  shape = values.shape
  offset = 0.0 if zero is None else expand(np.asarray(zero, np.float64), shape, k_group, n_group)
  return (values - offset) * expand(np.asarray(scale, np.float64), shape, k_group, n_group)


def fake_quant(w, bits, symmetric, granularity, group_size) -> np.ndarray:
  """Quantize-dequantize a float (K, N) weight by a scheme name (float64)."""
  k_group, n_group = groups(np.shape(w), granularity, group_size)
  values, scale, zero = quantize(w, bits, symmetric, k_group, n_group)
  return dequantize(values, scale, zero, k_group, n_group)


def stored_dequantize(q) -> np.ndarray:
  """A QArray's (K, N) float64 weight read from its stored bytes alone (packed (N, K) codes, scale, zero)."""
  k, _ = q.shape
  values = unpack(np.asarray(q.packed), q.bits, k).T
  zero = None if q.zero is None else np.asarray(q.zero)
  return dequantize(values, np.asarray(q.scale), zero, q.k_group, q.n_group)


def code_mismatches(values, w, bits: int, symmetric: bool, k_group: int, n_group: int) -> np.ndarray:
  """(row, column) indices where integer codes `values` (K, N) differ from this reference's by more than
  float32 arithmetic can explain: by one only where w / scale lies within 1e-4 of a rounding tie."""
  ref, scale, _ = quantize(w, bits, symmetric, k_group, n_group)
  quotient = np.asarray(w, np.float64) / expand(scale, ref.shape, k_group, n_group)
  near_tie = np.abs(quotient - np.floor(quotient) - 0.5) < 1e-4
  diff = np.abs(np.asarray(values, np.int64) - ref)
  return np.argwhere((diff > 1) | ((diff == 1) & ~near_tie))


def quantize_rows(x: np.ndarray, bits: int = 8, group: int | None = None) -> np.ndarray:
  """Dynamic symmetric activation quantization, dequantized (float64): one absmax scale per row of x (..., K), or
  per row and block of `group` consecutive inputs (short last block). An all-zero row (block) stays zero."""
  x = np.asarray(x, np.float64)
  qmax = (1 << (bits - 1)) - 1
  out = np.empty_like(x)
  for cols in _blocks(x.shape[-1], group or x.shape[-1]):
    block = x[..., cols]
    absmax = np.abs(block).max(axis=-1, keepdims=True)
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    out[..., cols] = np.clip(np.round(block / scale), -qmax, qmax) * scale
  return out


def quantize_static(x: np.ndarray, absmax: float, bits: int = 8) -> np.ndarray:
  """Static per-tensor symmetric activation quantization calibrated to `absmax`, dequantized (float64)."""
  qmax = (1 << (bits - 1)) - 1
  scale = absmax / qmax if absmax > 0 else 1.0
  return np.clip(np.round(np.asarray(x, np.float64) / scale), -qmax, qmax) * scale


# ------------------------------------------------------------------------------------------------ llama forward


HF_LINEARS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "down_proj": "mlp.down_proj"}


def llama_forward(hf: dict, config: dict, tokens: np.ndarray, linear=None) -> np.ndarray:
  """Hugging Face LlamaForCausalLM in numpy float64, from its safetensors tensors and config.json keys.

  hf: tensor name -> array ("model.layers.<i>.self_attn.q_proj.weight" (out, in), ...); tokens (T,) int.
  linear(name, x, weight_out_in) -> x @ weight.T by default; a test passes its own to simulate quantized
  linears (name: "layers.<i>.<q_proj|...>"). Returns logits (T, vocab).
  """
  linear = linear or (lambda name, x, w: x @ w.T)
  get = lambda name: np.asarray(hf[name], np.float64)
  dim, n_heads = config["hidden_size"], config["num_attention_heads"]
  n_kv = config.get("num_key_value_heads", n_heads)
  hd = config.get("head_dim") or dim // n_heads
  eps, theta = config.get("rms_norm_eps", 1e-6), config.get("rope_theta", 10000.0)
  seq = len(tokens)

  def rms(x, weight):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight

  inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  angle = np.arange(seq)[:, None] * inv_freq[None, :]
  cos, sin = np.cos(np.concatenate([angle, angle], -1)), np.sin(np.concatenate([angle, angle], -1))

  def rope(x):  # (T, heads, hd), rotate_half(x) = cat(-x2, x1)
    rotated = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]

  x = get("model.embed_tokens.weight")[tokens]
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    lin = lambda name, h: linear(f"layers.{i}.{name}", h, get(p + HF_LINEARS[name] + ".weight"))
    h = rms(x, get(p + "input_layernorm.weight"))
    q = rope(lin("q_proj", h).reshape(seq, n_heads, hd))
    k = rope(lin("k_proj", h).reshape(seq, n_kv, hd))
    v = lin("v_proj", h).reshape(seq, n_kv, hd)
    out = np.zeros((seq, n_heads, hd))
    for head in range(n_heads):
      kv = head // (n_heads // n_kv)  # HF repeat_kv: consecutive query heads share a kv head
      scores = q[:, head] @ k[:, kv].T / np.sqrt(hd)
      scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, head] = (probs / probs.sum(-1, keepdims=True)) @ v[:, kv]
    x = x + lin("o_proj", out.reshape(seq, n_heads * hd))
    h = rms(x, get(p + "post_attention_layernorm.weight"))
    gate = lin("gate_proj", h)
    x = x + lin("down_proj", gate / (1 + np.exp(-gate)) * lin("up_proj", h))
  head = get("model.embed_tokens.weight") if config.get("tie_word_embeddings") else get("lm_head.weight")
  return rms(x, get("model.norm.weight")) @ head.T


def hf_from_weights(weights: dict, n_layers: int, tie: bool) -> dict:
  """Float weights keyed by state path (kernels (in, out)) renamed and transposed to HF's tensors (out, in)."""
  hf = {"model.embed_tokens.weight": weights["embed.embedding"], "model.norm.weight": weights["norm.weight"]}
  if not tie:
    hf["lm_head.weight"] = np.asarray(weights["lm_head.kernel"]).T
  for i in range(n_layers):
    p = f"model.layers.{i}."
    hf[p + "input_layernorm.weight"] = weights[f"layers.{i}.attn_norm.weight"]
    hf[p + "post_attention_layernorm.weight"] = weights[f"layers.{i}.mlp_norm.weight"]
    for name, hf_name in HF_LINEARS.items():
      module = "attn" if hf_name.startswith("self_attn.") else "mlp"
      hf[p + hf_name + ".weight"] = np.asarray(weights[f"layers.{i}.{module}.{name}.kernel"]).T
  return hf


def kl_top1(ref_logits: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
  """Mean KL(p_ref || p) in nats and top-1 agreement over rows of (..., V) logits, float64."""
  def log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  ref, cur = log_softmax(ref_logits), log_softmax(logits)
  kl = np.sum(np.exp(ref) * (ref - cur), axis=-1)
  return float(kl.mean()), float(np.mean(np.argmax(ref, -1) == np.argmax(cur, -1)))
