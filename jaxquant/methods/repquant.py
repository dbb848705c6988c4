"""RepQuant (after RepQ-ViT): complex quantizers while calibrating, simple ones at inference, exactly equivalent.

Per block of the model, on the float model's own hidden states (block-at-a-time, as LKD: the input of block k is
the float model's, so block k's result depends on float blocks 0..k only):

1. Per-channel dual clipping. The post-norm activations (the input of q/k/v and of the first MLP projection(s))
   get a lower and an upper bound per channel, learned with optax Adam on the calibration tokens to minimise the
   error of the consuming linears' output (repquant_core.clip_loss, straight-through rounding). The other linear
   inputs (o_proj, down_proj) get one learned (lower, upper) pair each, the same way.
2. Reparameterization to layer-wise. Per-channel (s_c, z_c) from the bounds become one (s~, z~) by folding r1, r2
   into the norm's affine parameters and the consumers' kernels and biases (repquant_core). At inference every
   activation is quantized with one static asymmetric (scale, zero) and the matmul runs on integers
   (formats.ActQuant(mode="tensor", zero=...), ops._int_dot). Where the fold goes:
   - SmolLM2 (pre-norm, RMSNorm): the norm's output only feeds the linears, so gamma' replaces the norm weight
     and beta' = s * r2 / r1 becomes a new norm bias (`RMSNormWithBias`; RMSNorm has none) while the consumers
     gain bias' = -(s * r2) @ kernel. Why a bias and not symmetric clipping (r2 = 0): the dual clipping finds
     asymmetric per-channel ranges (a symmetric grid would waste up to half the levels of a one-sided channel),
     and the bias costs one add per element, fused with the norm; the ablation "-rms-symmetric" measures it.
   - MiniLM (post-LN BERT): a LayerNorm's output is also the residual stream, which must stay unchanged. The
     reparameterized affine (gamma', beta') therefore feeds only the quantized branch: `BranchAffine` computes
     x' = (x + s * r2) / r1 = n * gamma' + beta' from the LayerNorm output x (n the normalized values), one
     multiply-add per element, fused with the layer-wise quantizer; the residual keeps x.
3. Softmax quantization. Attention probabilities use the log-sqrt2 quantizer while calibrating/reconstructing
   (quantizers.SoftmaxQuant form "log_sqrt2") and its log2 reparameterization at inference (form "log2": P @ V
   with exact powers of two, the sqrt2 of odd codes applied once to their partial sum).
4. Quantized weight reconstruction. Weights are per-output-channel symmetric; each linear's per-channel weight
   scales (log-parameterized) and biases are learned with optax Adam so that the fake-quantized block (the exact
   forward of the integer block) matches the float block's output on the calibration samples; a block whose
   output MSE does not drop keeps its round-to-nearest scales.

The naive PTQ baseline (same bits): per-channel symmetric weights (round-to-nearest), per-tensor symmetric static
activations (absmax), uniform softmax quantization.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxquant.formats import ActQuant, QArray, pack
from jaxquant.methods import lkd
from jaxquant.methods import repquant_core as core
from jaxquant.methods.repquant_core import RepQuantError
from jaxquant.models import bert as bert_lib
from jaxquant.models import llama as llama_lib
from jaxquant.models.layers import Linear, RMSNorm, _feature
from jaxquant.quantizers import SoftmaxQuant, WeightQuant
from jaxquant.rules import BLOCK_LINEARS, Recipe, Rule

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RepQuantConfig:
  """Settings of one RepQuant run.

  weight_bits, act_bits: b-bit weights (per-output-channel symmetric) and activations (layer-wise asymmetric
    static at inference); softmax_bits defaults to act_bits.
  dual_clipping: learn the clipping bounds (False: min/max of the calibration activations).
  channelwise: per-channel quantization of post-norm activations, reparameterized (False: one layer-wise pair).
  log_softmax: log-sqrt2 -> log2 softmax quantizer (False: uniform).
  reconstruction: learn weight scales and biases block by block (False: round-to-nearest weights).
  symmetric_rms: RMSNorm models use symmetric per-channel clipping (r2 = 0, no norm bias) instead of a norm bias.
  n_samples, seq_len: calibration samples (32 by default, as RepQ-ViT) of seq_len tokens.
  clip_steps, clip_lr, clip_tokens: the bound optimisation (Adam, in units of each channel's absmax), on a random
    subset of clip_tokens calibration tokens.
  recon_steps, recon_lr, recon_batch: the reconstruction (Adam on log weight scales and biases).
  """

  weight_bits: int = 4
  act_bits: int = 4
  softmax_bits: int | None = None
  dual_clipping: bool = True
  channelwise: bool = True
  log_softmax: bool = True
  reconstruction: bool = True
  symmetric_rms: bool = False
  n_samples: int = 32
  seq_len: int = 128
  clip_steps: int = 100
  clip_lr: float = 0.01
  clip_tokens: int = 2048
  recon_steps: int = 100
  recon_lr: float = 1e-3
  recon_batch: int = 4
  seed: int = 0

  def __post_init__(self):
    for name in ("weight_bits", "act_bits"):
      value = getattr(self, name)
      if value not in (2, 3, 4, 5, 6, 7, 8):
        raise RepQuantError(f"RepQuantConfig.{name} must be 2..8 (int8 containers), got {value!r}")
    for name in ("n_samples", "seq_len", "clip_steps", "clip_tokens", "recon_steps", "recon_batch"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise RepQuantError(f"RepQuantConfig.{name} must be a positive integer, got {value!r}")

  @property
  def softmax(self) -> SoftmaxQuant:
    bits = self.softmax_bits or self.act_bits
    return SoftmaxQuant(bits, "log_sqrt2" if self.log_softmax else "uniform")


# ----------------------------------------------------------------------------------------------------------------
# modules of the quantized blocks


class RMSNormWithBias(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * weight + bias: an RMSNorm carrying RepQuant's folded beta'. weight, bias (dim,)."""

  def __init__(self, weight: jax.Array, bias: jax.Array, eps: float):
    self.weight = nnx.Param(weight)
    self.bias = nnx.Param(bias)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    normalized = x * jax.lax.rsqrt(variance + self.eps)
    return normalized * _feature(self.weight.get_value(), x) + _feature(self.bias.get_value(), x)


class BranchAffine(nnx.Module):
  """x' = x * inv_r1 + shift (x (..., C) a post-LN output): the reparameterized LayerNorm affine for the quantized
  branch only, inv_r1 = 1 / r1, shift = s * r2 / r1 (C,); equal to n * gamma' + beta' of the LayerNorm."""

  def __init__(self, inv_r1: jax.Array, shift: jax.Array):
    self.inv_r1 = nnx.Param(inv_r1)
    self.shift = nnx.Param(shift)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * _feature(self.inv_r1.get_value(), x) + _feature(self.shift.get_value(), x)


class RepQBertBlock(nnx.Module):
  """A post-LN BERT block whose quantized linears read reparameterized branches of the LayerNorm outputs:
  h (B, T, dim), mask (B, T) -> (B, T, dim); qkv_branch / up_branch None = the LayerNorm output itself."""

  def __init__(self, attn, attn_norm, mlp, mlp_norm, qkv_branch: BranchAffine | None,
               up_branch: BranchAffine | None):
    self.attn, self.attn_norm, self.mlp, self.mlp_norm = attn, attn_norm, mlp, mlp_norm
    self.qkv_branch, self.up_branch = qkv_branch, up_branch

  def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.qkv_branch(h) if self.qkv_branch is not None else h
    h = self.attn_norm(h + self.attn(x, mask))
    x = self.up_branch(h) if self.up_branch is not None else h
    return self.mlp_norm(h + self.mlp(x))


def _ste_round(v: jax.Array) -> jax.Array:
  return v + jax.lax.stop_gradient(jnp.round(v) - v)


class RQLinear(nnx.Module):
  """The fake-quantized form of a RepQuant linear, for reconstruction; its forward value is what the integer
  linear computes (same codes, same scales). kernel (K, N) float (already folded), bias (N,),
  log_scale (N,) learned offsets of the per-channel weight scales w_scale0 (N,), act_scale / act_zero () the
  layer-wise activation quantizer. x (..., K) -> (..., N)."""

  def __init__(self, kernel: jax.Array, bias: jax.Array | None, weight_bits: int, act_scale, act_zero,
               act_bits: int):
    qmax = (1 << (weight_bits - 1)) - 1
    absmax = jnp.max(jnp.abs(kernel), axis=0)
    self.kernel = nnx.Variable(kernel)  # not trained: the rounding grid moves through the scales
    self.w_scale0 = nnx.Variable(jnp.where(absmax > 0, absmax / qmax, 1.0).astype(jnp.float32))
    self.log_scale = nnx.Param(jnp.zeros(kernel.shape[1], jnp.float32))
    self.bias = nnx.Param(jnp.zeros(kernel.shape[1], jnp.float32) if bias is None else bias)
    self.act_scale = nnx.Variable(jnp.asarray(act_scale, jnp.float32))
    self.act_zero = nnx.Variable(jnp.asarray(act_zero, jnp.float32))
    self.weight_bits, self.act_bits = weight_bits, act_bits

  def weight_scale(self) -> jax.Array:
    return self.w_scale0.get_value() * jnp.exp(self.log_scale.get_value())

  def weight_codes(self) -> jax.Array:
    """Signed integer weight values (K, N) float32 in [-(2^(b-1) - 1), 2^(b-1) - 1] (straight-through)."""
    qmax = (1 << (self.weight_bits - 1)) - 1
    return jnp.clip(_ste_round(self.kernel.get_value() / self.weight_scale()[None, :]), -qmax, qmax)

  def __call__(self, x: jax.Array) -> jax.Array:
    scale, zero = self.act_scale.get_value(), self.act_zero.get_value()
    levels = float((1 << self.act_bits) - 1)
    codes = jnp.clip(_ste_round(x.astype(jnp.float32) / scale) + zero, 0.0, levels)
    xq = (codes - zero) * scale
    w = self.weight_codes() * self.weight_scale()[None, :]
    y = jnp.dot(xq, w, preferred_element_type=jnp.float32)
    return y + _feature(self.bias.get_value(), y)

  def to_linear(self) -> Linear:
    """The real linear: packed b-bit codes (per-channel symmetric), static asymmetric int activations."""
    qmax = (1 << (self.weight_bits - 1)) - 1
    kernel = self.kernel.get_value()
    scale = self.weight_scale()
    values = jnp.clip(jnp.round(kernel / scale[None, :]), -qmax, qmax).astype(jnp.int32)
    activation = ActQuant(bits=self.act_bits, mode="tensor", scale=self.act_scale.get_value(),
                          zero=self.act_zero.get_value())
    qarray = QArray(packed=pack(values.T, self.weight_bits), scale=scale[None, :], zero=None,
                    activation=activation, shape=tuple(int(d) for d in kernel.shape), bits=self.weight_bits,
                    k_group=int(kernel.shape[0]), n_group=1)
    return Linear(qarray, self.bias.get_value())


# ----------------------------------------------------------------------------------------------------------------
# which activations feed which linears


@dataclasses.dataclass(frozen=True)
class InputGroup:
  """Linears (module paths inside a block) reading the same activation; `norm` names the norm whose output it is
  (None for o_proj / down_proj inputs, which are not post-norm)."""
  name: str
  linears: tuple[str, ...]
  norm: str | None


def input_groups(block: nnx.Module) -> tuple[InputGroup, ...]:
  if isinstance(block, llama_lib.Block):
    return (InputGroup("attn_norm", ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "attn_norm"),
            InputGroup("attn_out", ("attn.o_proj",), None),
            InputGroup("mlp_norm", ("mlp.gate_proj", "mlp.up_proj"), "mlp_norm"),
            InputGroup("mlp_hidden", ("mlp.down_proj",), None))
  if isinstance(block, bert_lib.Block):
    # Post-LN: the block input (the previous block's mlp_norm, or the embeddings' LayerNorm) feeds q/k/v;
    # attn_norm's output feeds up_proj.
    return (InputGroup("block_input", ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "previous LayerNorm"),
            InputGroup("attn_out", ("attn.o_proj",), None),
            InputGroup("attn_norm", ("mlp.up_proj",), "attn_norm"),
            InputGroup("mlp_hidden", ("mlp.down_proj",), None))
  raise RepQuantError(f"RepQuant knows llama.Block and bert.Block; got {type(block).__name__}")


def _get(module: nnx.Module, path: str):
  for part in path.split("."):
    module = module[int(part)] if part.isdigit() else getattr(module, part)
  return module


def _set(module: nnx.Module, path: str, value) -> None:
  parts = path.split(".")
  parent = _get(module, ".".join(parts[:-1])) if len(parts) > 1 else module
  setattr(parent, parts[-1], value)


class _Recorder(nnx.Module):
  """Wraps a Linear and sows its input (for capturing calibration activations)."""

  def __init__(self, inner: Linear):
    self.inner = inner

  def __call__(self, x: jax.Array) -> jax.Array:
    self.sow(nnx.Intermediate, "input", x)
    return self.inner(x)


@functools.partial(jax.jit, static_argnums=0)
def _capture(graphdef, state, x, extra):
  block = nnx.merge(graphdef, state)
  out, sown = nnx.capture(block, nnx.Intermediate)(x, *extra)
  return out, sown


def capture_inputs(block: nnx.Module, x: jax.Array, extra: tuple, groups, chunk: int
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(block(x), {group name: the activation entering its linears, (N, T, C)}) over samples in chunks."""
  recorded = nnx.clone(block)
  for group in groups:
    _set(recorded, group.linears[0], _Recorder(_get(recorded, group.linears[0])))
  graphdef, state = nnx.split(recorded)
  outs, acts = [], {g.name: [] for g in groups}
  for s in lkd._chunks(x.shape[0], chunk):
    out, sown = _capture(graphdef, state, x[s], tuple(e[s] for e in extra))
    outs.append(out)
    for group in groups:
      acts[group.name].append(_get_sown(sown, group.linears[0]))
  return jnp.concatenate(outs), {k: jnp.concatenate(v) for k, v in acts.items()}


def _get_sown(sown, path: str) -> jax.Array:
  node = sown
  for part in path.split("."):
    node = node[int(part) if part.isdigit() and not isinstance(node, dict) else part]
  value = node["input"]
  value = value.get_value() if hasattr(value, "get_value") else value
  return value[0] if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------------------------------------------
# 1. dual clipping


@functools.partial(jax.jit, static_argnames=("bits", "steps", "lr"))
def _learn_bounds(x, kernel, lo0, hi0, *, bits: int, steps: int, lr: float):
  """Adam on (lo, hi) in units of the initial absmax per channel; returns the best bounds seen and losses."""
  unit = jnp.maximum(jnp.maximum(jnp.abs(lo0), jnp.abs(hi0)), 1e-8)
  target = jnp.dot(x, kernel)
  optimizer = optax.adam(lr)

  def loss_fn(params):
    return core.clip_loss((params[0] * unit, params[1] * unit), x, kernel, target, bits)

  params = (lo0 / unit, hi0 / unit)
  state = optimizer.init(params)
  first = loss_fn(params)

  def body(carry, _):
    params, state, best, best_loss = carry
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = optimizer.update(grads, state, params)
    better = loss < best_loss
    best = jax.tree_util.tree_map(lambda b, p: jnp.where(better, p, b), best, params)
    best_loss = jnp.minimum(loss, best_loss)
    params = optax.apply_updates(params, updates)
    return (params, state, best, best_loss), loss

  (params, _, best, best_loss), losses = jax.lax.scan(body, (params, state, params, first), None, length=steps)
  final = loss_fn(params)
  take_final = final < best_loss
  best = jax.tree_util.tree_map(lambda b, p: jnp.where(take_final, p, b), best, params)
  return best[0] * unit, best[1] * unit, first, jnp.minimum(final, best_loss)


def calibrate_bounds(x: jax.Array, kernel: jax.Array, bits: int, per_channel: bool, learn: bool, steps: int,
                     lr: float, max_tokens: int, rng: np.random.Generator, where: str):
  """Clipping bounds for activation x (..., C) feeding `kernel` (C, N): per-channel (C,) or layer-wise ();
  learned (dual clipping) or min/max. Returns (lo, hi, loss before, loss after)."""
  core.check_finite_activations(x, where)
  flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  if flat.shape[0] > max_tokens:
    flat = flat[jnp.asarray(np.sort(rng.choice(flat.shape[0], max_tokens, replace=False)))]
  lo, hi = core.init_bounds(flat, per_channel)
  if not learn:
    target = jnp.dot(flat, kernel)
    loss = float(core.clip_loss((lo, hi), flat, kernel, target, bits))
    return lo, hi, loss, loss
  lo_l, hi_l, first, last = _learn_bounds(flat, kernel, lo, hi, bits=bits, steps=steps, lr=lr)
  core.check_bounds(jnp.minimum(lo_l, 0.0), jnp.maximum(hi_l, 0.0), where)
  return lo_l, hi_l, float(first), float(last)


def qparams_from_bounds(lo, hi, bits: int, where: str) -> tuple[jax.Array, jax.Array]:
  """(scale, zero) from bounds, refusing crossed bounds with an error naming `where`."""
  core.check_bounds(lo, hi, where)
  return core.channel_qparams(jnp.asarray(lo), jnp.asarray(hi), bits)


# ----------------------------------------------------------------------------------------------------------------
# 2. reparameterization and the quantized block


@dataclasses.dataclass
class GroupReport:
  name: str
  per_channel: bool
  loss_minmax: float
  loss_learned: float
  layer_scale: float
  layer_zero: float


@dataclasses.dataclass
class BlockReport:
  block: str
  groups: list[GroupReport]
  mse_before: float
  mse_after: float | None
  status: str  # "reconstructed", "rtn-kept", "no-reconstruction", "nan"
  seconds: float


@dataclasses.dataclass(frozen=True)
class GroupQParams:
  """Quantizer of one input group: per-channel (C,) or layer-wise () scale and zero (integer-valued floats)."""
  scale: jax.Array
  zero: jax.Array

  @property
  def per_channel(self) -> bool:
    return self.scale.ndim == 1


def calibrate_block(block: nnx.Module, acts: dict[str, jax.Array], config: RepQuantConfig, index: int,
                    rng: np.random.Generator) -> tuple[dict[str, GroupQParams], list[GroupReport]]:
  """Per input group: bounds (dual clipping or min/max; per-channel for post-norm groups when channelwise) and
  the (scale, zero) they give."""
  is_bert = isinstance(block, bert_lib.Block)
  qparams, reports = {}, []
  for group in input_groups(block):
    where = f"layers.{index}.{group.linears[0]} input ({group.name})"
    kernel = jnp.concatenate([_get(block, path).kernel.get_value() for path in group.linears], axis=1)
    per_channel = config.channelwise and group.norm is not None
    lo, hi, loss0, loss1 = calibrate_bounds(
        acts[group.name], kernel, config.act_bits, per_channel, config.dual_clipping, config.clip_steps,
        config.clip_lr, config.clip_tokens, rng, where)
    scale, zero = qparams_from_bounds(lo, hi, config.act_bits, where)
    if per_channel and not is_bert and config.symmetric_rms:
      # RMSNorm without a bias: symmetric per-channel ranges, every zero point 2^(b-1), so r2 = 0.
      half = 1 << (config.act_bits - 1)
      bound = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
      scale = jnp.where(bound > 0, bound / (half - 1), scale)
      zero = jnp.full_like(zero, float(half))
    qparams[group.name] = GroupQParams(scale, zero)
    reports.append(GroupReport(group.name, per_channel, loss0, loss1, float(jnp.mean(scale)),
                               float(jnp.round(jnp.mean(zero)))))
  return qparams, reports


def fold_block(block: nnx.Module, qparams: dict[str, GroupQParams], symmetric_rms: bool = False
               ) -> tuple[nnx.Module, dict[str, GroupQParams]]:
  """Reparameterization: a float copy of `block` in which every per-channel group's (s_c, z_c) is folded into its
  norm (llama: gamma', beta' in an RMSNormWithBias; BERT: a BranchAffine on the LayerNorm output) and into its
  linears (kernel', bias'). Returns (folded float block, the layer-wise (s~, z~) of every group). The folded block
  computes the same function as `block` (to float rounding)."""
  is_bert = isinstance(block, bert_lib.Block)
  out = nnx.clone(block)
  branches: dict[str, BranchAffine] = {}
  layer_qparams = {}
  for group in input_groups(block):
    q = qparams[group.name]
    if not q.per_channel:
      layer_qparams[group.name] = q
      continue
    layer_scale, layer_zero = core.layerwise_qparams(q.scale, q.zero)
    layer_qparams[group.name] = GroupQParams(layer_scale, layer_zero)
    r1, r2 = core.reparam_factors(q.scale, q.zero, layer_scale, layer_zero)
    if is_bert:
      branches[group.name] = BranchAffine(1.0 / r1, q.scale * r2 / r1)
    else:
      norm = _get(block, group.norm)
      gamma, beta = core.fold_norm(norm.weight.get_value(), None, q.scale, r1, r2)
      _set(out, group.norm, RMSNorm(gamma, norm.eps) if symmetric_rms else RMSNormWithBias(gamma, beta, norm.eps))
    for path in group.linears:
      lin = _get(block, path)
      bias = lin.bias.get_value() if lin.bias is not None else None
      kernel, new_bias = core.fold_linear(lin.kernel.get_value(), bias, q.scale, r1, r2)
      if symmetric_rms and not is_bert and bias is None:
        new_bias = None  # r2 = 0: no correction
      _set(out, path, Linear(kernel, new_bias))
  if is_bert:
    out = RepQBertBlock(out.attn, out.attn_norm, out.mlp, out.mlp_norm, branches.get("block_input"),
                        branches.get("attn_norm"))
  return out, layer_qparams


def fake_quant_block(folded: nnx.Module, layer_qparams: dict[str, GroupQParams], config: RepQuantConfig
                     ) -> nnx.Module:
  """The folded block with RQLinears (layer-wise activation quantizers, b-bit weights) and the softmax quantizer."""
  out = nnx.clone(folded)
  for group in input_groups(folded if not isinstance(folded, RepQBertBlock) else _bert_view(folded)):
    q = layer_qparams[group.name]
    for path in group.linears:
      lin = _get(out, path)
      bias = lin.bias.get_value() if lin.bias is not None else None
      _set(out, path, RQLinear(lin.kernel.get_value(), bias, config.weight_bits, q.scale, q.zero, config.act_bits))
  out.attn.probs_quant = config.softmax
  return out


def _bert_view(block: RepQBertBlock) -> bert_lib.Block:
  return bert_lib.Block(block.attn, block.attn_norm, block.mlp, block.mlp_norm)


def build_fake_block(block: nnx.Module, acts: dict[str, jax.Array], config: RepQuantConfig, index: int,
                     rng: np.random.Generator) -> tuple[nnx.Module, list[GroupReport]]:
  """calibrate_block, fold_block, fake_quant_block: the reparameterized fake-quantized copy of a float block."""
  qparams, reports = calibrate_block(block, acts, config, index, rng)
  folded, layer_qparams = fold_block(block, qparams, config.symmetric_rms)
  return fake_quant_block(folded, layer_qparams, config), reports


def to_real_block(fake: nnx.Module) -> nnx.Module:
  """The inference block: RQLinears become packed integer Linears, the softmax quantizer its log2 form."""
  real = nnx.clone(fake)
  paths = [".".join(str(p) for p in path) for path, node in nnx.iter_graph(real) if isinstance(node, RQLinear)]
  for path in paths:
    _set(real, path, _get(real, path).to_linear())
  sq = real.attn.probs_quant
  if sq is not None and sq.form == "log_sqrt2":
    real.attn.probs_quant = dataclasses.replace(sq, form="log2")
  return real


# ----------------------------------------------------------------------------------------------------------------
# 4. reconstruction


class _ReconStep:
  """One jitted Adam step on a fake block's trainable params; shared by every block of the same graph (the
  graphdef is a static argument), so a model compiles it once."""

  def __init__(self, optimizer):
    self.optimizer = optimizer
    self._step = jax.jit(self._impl, static_argnums=0)

  def _impl(self, graphdef, params, rest, opt_state, x, y, extra):
    def loss_fn(p):
      return jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(x, *extra) - y))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def __call__(self, *args):
    return self._step(*args)


_RECON_STEPS: dict[tuple, _ReconStep] = {}


def reconstruct(fake: nnx.Module, x, y, extra, config: RepQuantConfig, rng: np.random.Generator, bar=None):
  """Adam on every Param of the fake block (log weight scales, biases, folded norm/branch affines) to match y.
  Returns (trained block or None on NaN, losses)."""
  trainable = nnx.All(nnx.Param, nnx.Any(nnx.PathContains("log_scale"), nnx.PathContains("bias")))
  graphdef, params, rest = nnx.split(fake, trainable, ...)
  optimizer = optax.adam(optax.cosine_decay_schedule(config.recon_lr, config.recon_steps))
  step = _RECON_STEPS.setdefault((config.recon_lr, config.recon_steps), _ReconStep(optimizer))
  optimizer = step.optimizer
  params, losses, nan_step = lkd.fit_minibatches(step, graphdef, params, rest, optimizer.init(params), x, y, extra,
                                                 config.recon_steps, min(config.recon_batch, x.shape[0]), rng, bar)
  if nan_step is not None:
    return None, losses
  return nnx.merge(graphdef, params, rest), losses


# ----------------------------------------------------------------------------------------------------------------
# the run


@dataclasses.dataclass
class RepQuantResult:
  """model: the quantized model; without_reconstruction: the same calibration with round-to-nearest weights (the
  "-norecon" ablation for free, when config.reconstruction); blocks: per-block reports."""
  model: nnx.Module
  blocks: list[BlockReport]
  seconds: float
  samples: tuple[int, int]
  without_reconstruction: nnx.Module | None = None


def repquant_quantize(model: nnx.Module, calibration: Iterable, config: RepQuantConfig = RepQuantConfig(),
                      progress: bool = True) -> RepQuantResult:
  """A new model: every block reparameterized and quantized (integer linears, log2 softmax). `model` unchanged.
  calibration: token batches ((B, T) arrays or (tokens, mask) pairs); config.n_samples rows of config.seq_len."""
  start = time.perf_counter()
  family = lkd._family(model)
  sample_config = lkd.LKDConfig(n_samples=config.n_samples, seq_len=config.seq_len,
                                batch_size=min(config.recon_batch, config.n_samples))
  ids, mask = lkd.samples_from_batches(calibration, sample_config)
  if family == "encoder" and mask is None:
    mask = np.ones_like(ids)
  extra = (jnp.asarray(mask),) if family == "encoder" else ()
  chunk = 8
  mg, ms = nnx.split(model)
  x = jnp.concatenate([lkd._embed(mg, ms, jnp.asarray(ids[s]), family) for s in lkd._chunks(len(ids), chunk)])
  del ms
  core.check_finite_activations(x, "the embeddings' output")
  reports, real_blocks, rtn_blocks = [], [], []
  n_blocks = len(model.layers)
  for index, block in enumerate(model.layers):
    t0 = time.perf_counter()
    rng = np.random.default_rng([config.seed, index])
    groups = input_groups(block)
    y, acts = capture_inputs(block, x, extra, groups, chunk)
    fake, group_reports = build_fake_block(block, acts, config, index, rng)
    del acts
    mse_before = lkd.block_mse(fake, x, y, extra, chunk)
    mse_after, status = None, "no-reconstruction"
    if config.reconstruction:
      rtn_blocks.append(to_real_block(fake))
      with tqdm(total=config.recon_steps, desc=f"RepQuant layers.{index} ({index + 1}/{n_blocks})",
                unit="step", disable=not progress, leave=False) as bar:
        trained, losses = reconstruct(fake, x, y, extra, config, rng, bar)
      if trained is None:
        status = "nan"
        log.warning("RepQuant reconstruction of layers.%d: loss became %s; round-to-nearest weights kept",
                    index, losses[-1])
      else:
        mse_after = lkd.block_mse(trained, x, y, extra, chunk)
        if mse_after < mse_before:
          fake, status = trained, "reconstructed"
        else:
          status = "rtn-kept"
    real_blocks.append(to_real_block(fake))
    report = BlockReport(f"layers.{index}", group_reports, mse_before, mse_after, status, time.perf_counter() - t0)
    reports.append(report)
    if progress:
      after = f" -> {mse_after:.4g}" if mse_after is not None else ""
      tqdm.write(f"RepQuant layers.{index}: output MSE {mse_before:.4g}{after} ({status}, {report.seconds:.1f} s)",
                 file=sys.stderr)
    x = y
  seconds = time.perf_counter() - start

  def assemble(blocks):
    out = nnx.merge(*nnx.split(model))
    for index, qblock in enumerate(blocks):
      out.layers[index] = qblock
    return out

  return RepQuantResult(assemble(real_blocks), reports, seconds, tuple(ids.shape),
                        assemble(rtn_blocks) if rtn_blocks else None)


@dataclasses.dataclass(frozen=True)
class RepQuantProcedure:
  """A recipe's procedure (pipeline.quantize_model calls it)."""
  config: RepQuantConfig = RepQuantConfig()

  def __call__(self, model, recipe, calibration=None, progress: bool = True):
    return repquant_quantize(model, calibration, self.config, progress).model

  def template(self, model: nnx.Module) -> nnx.Module:
    """A model with the graph and array shapes this procedure makes from `model`, for checkpoint.restore to fill
    (a RepQuant model has modules and biases the float model lacks). Its values mean nothing: it is the
    procedure run on 4 random sequences of 8 tokens with one optimisation step."""
    config = dataclasses.replace(self.config, n_samples=4, seq_len=8, clip_steps=1, clip_tokens=32, recon_steps=1,
                                 recon_batch=4)
    tokens = np.random.default_rng(0).integers(0, lkd._vocab_size(model), (4, 8)).astype(np.int32)
    batch = (tokens, np.ones_like(tokens)) if lkd._family(model) == "encoder" else tokens
    return repquant_quantize(model, [batch], config, progress=False).model


# ----------------------------------------------------------------------------------------------------------------
# the naive baseline


def set_softmax_quant(model: nnx.Module, probs_quant: SoftmaxQuant | None) -> nnx.Module:
  """The model (modified in place, returned) with every attention module's probs_quant set."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, (llama_lib.Attention, bert_lib.SelfAttention)):
      node.probs_quant = probs_quant
  return model


@dataclasses.dataclass(frozen=True)
class NaivePTQProcedure:
  """Per-channel symmetric round-to-nearest weights, per-tensor static symmetric activations (absmax on the
  calibration tokens), uniform softmax quantization; every block linear; the same integer path."""
  weight_bits: int = 4
  act_bits: int = 4

  def rules(self) -> tuple[Rule, ...]:
    return (Rule(BLOCK_LINEARS, WeightQuant(self.weight_bits, True, "channel"), activation="tensor",
                 activation_bits=self.act_bits),)

  def __call__(self, model, recipe, calibration=None, progress: bool = True):
    from jaxquant import pipeline
    from jaxquant.rules import quantize_tree
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]
    absmax = pipeline.calibrate_input_absmax(model, batches, progress=progress)
    bad = [name for name, value in absmax.items() if not math.isfinite(value)]
    if bad:
      raise RepQuantError(f"calibration activations entering {bad[0]} hold NaN/Inf: the naive PTQ baseline cannot "
                          "set a scale; check the float model and the calibration tokens")
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, quantize_tree(state, self.rules(), absmax, progress=progress))
    return set_softmax_quant(out, SoftmaxQuant(self.act_bits, "uniform"))


# ----------------------------------------------------------------------------------------------------------------
# recipes

ABLATIONS = {
    "noclip": ("without dual clipping (bounds = calibration min/max)", {"dual_clipping": False}),
    "nochannel": ("without per-channel quantization + reparameterization (one learned layer-wise pair)",
                  {"channelwise": False}),
    "nolog": ("without the log-sqrt2/log2 softmax quantizer (uniform)", {"log_softmax": False}),
    "norecon": ("without quantized weight reconstruction (round-to-nearest weights)", {"reconstruction": False}),
    "rms-symmetric": ("with symmetric per-channel clipping for RMSNorm outputs (r2 = 0, no norm bias)",
                      {"symmetric_rms": True}),
}


def _describe(bits: int) -> str:
  return (f"RepQuant W{bits}A{bits}: per-channel dual clipping of post-norm activations reparameterized to one "
          f"layer-wise asymmetric int{bits} scale (folded into norms and linears), learned layer-wise clipping "
          f"elsewhere, log-sqrt2 softmax folded to log2 shifts, per-channel int{bits} weights with block-wise "
          "reconstruction (optax); 32 calibration samples")


_recipes: list[Recipe] = []
for _bits in (4, 6, 8):
  _recipes.append(Recipe(f"repquant-w{_bits}a{_bits}", _describe(_bits),
                  procedure=RepQuantProcedure(RepQuantConfig(weight_bits=_bits, act_bits=_bits)),
                  uses_calibration=True))
  for _name, (_text, _overrides) in ABLATIONS.items():
    _recipes.append(Recipe(f"repquant-w{_bits}a{_bits}-{_name}", f"RepQuant W{_bits}A{_bits} {_text}",
                    procedure=RepQuantProcedure(RepQuantConfig(weight_bits=_bits, act_bits=_bits, **_overrides)),
                    uses_calibration=True))
  _recipes.append(Recipe(f"naive-w{_bits}a{_bits}",
                  f"naive PTQ baseline W{_bits}A{_bits}: per-channel symmetric int{_bits} weights (round-to-nearest), "
                  f"per-tensor static symmetric int{_bits} activations (absmax), uniform {_bits}-bit softmax",
                  procedure=NaivePTQProcedure(_bits, _bits), uses_calibration=True))
RECIPES: tuple[Recipe, ...] = tuple(_recipes)
