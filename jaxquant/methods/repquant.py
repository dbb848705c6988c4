"""RepQuant (after RepQ-ViT): complex quantizers while calibrating, simple ones at inference, exactly equivalent.

For each block, on the block-wise harness (float inputs, as LKD): per-channel dual clipping of post-norm
activations (learned bounds), reparameterized into one layer-wise asymmetric scale by folding the per-channel
factors into the norm's affine or a branch affine (models.protocol.InputGroup.fold) and into the consuming linears;
log-sqrt2 softmax while calibrating, its log2 form at inference; per-channel weights whose scales and biases are
reconstructed block-wise against the float block (kept only when the output MSE drops). The result runs on the
integer path (formats.ActQuant "tensor" with a zero point). Four choices beyond RepQ-ViT's, on by default, train
more in the same inference form: latent weights, activation scales, quantized block inputs, a calibrated softmax
step (RepQuantConfig; the "-paper" recipes turn them off). docs/methods.md has the derivation, the choices and the
screens.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxquant.methods import blockwise
from jaxquant.methods import repquant_core as core
from jaxquant.methods.naive_ptq import NaivePTQProcedure
from jaxquant.methods.repquant_core import RepQuantError
from jaxquant.methods.repquant_finish import FinishReport, finish_on_output, held_out
from jaxquant.methods.repquant_layers import (SOFTMAX_STEPS, BranchAffine, CalibratedSoftmax, RMSNormWithBias,
                                             RQLinear, calibrate_softmax, to_real_block)
from jaxquant.models import surgery
from jaxquant.models.layers import LayerNorm, Linear, RMSNorm
from jaxquant.models.protocol import InputGroup
from jaxquant.quantizers import SoftmaxQuant
from jaxquant.rules import Recipe

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
  The next four go beyond RepQ-ViT (on by default; PAPER turns them off, as the "-paper" recipes do):
  recon_weights, recon_weight_lr: also train the latent float weights (straight-through rounding), at their own
    learning rate.
  recon_act_scales: also train each linear's layer-wise activation scale (LSQ-style; zero points stay).
  calibrate_softmax: pick each block's log softmax step from sqrt2^0 .. sqrt2^-SOFTMAX_STEPS by the block's
    output error (a CalibratedSoftmax, saved with the model); False: step 1, as RepQ-ViT.
  recon_inputs: "quantized" (each block learns from its input through the blocks already quantized, as deployed;
    the target stays the float block's output) or "float" (from the float model's input to it, as RepQ-ViT).
  finish_steps, finish_lr, finish_weight_lr: after reconstruction, that many steps training every block together
    on the model's output (methods/repquant_finish; 0: no such pass), latent weights at finish_weight_lr.
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
  recon_weights: bool = True
  recon_weight_lr: float = 1e-4
  recon_act_scales: bool = True
  recon_inputs: str = "quantized"
  calibrate_softmax: bool = True
  finish_steps: int = 0
  finish_lr: float = 1e-4
  finish_weight_lr: float = 1e-5
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
    if not isinstance(self.finish_steps, int) or self.finish_steps < 0:
      raise RepQuantError(f"RepQuantConfig.finish_steps must be an integer >= 0, got {self.finish_steps!r}")
    if self.finish_steps and not self.reconstruction:
      raise RepQuantError("RepQuantConfig.finish_steps trains what reconstruction trains: it needs reconstruction=True")
    if self.recon_inputs not in ("float", "quantized"):
      raise RepQuantError(f"RepQuantConfig.recon_inputs must be 'float' or 'quantized', got {self.recon_inputs!r}")

  @property
  def softmax(self) -> SoftmaxQuant:
    bits = self.softmax_bits or self.act_bits
    return SoftmaxQuant(bits, "log_sqrt2" if self.log_softmax else "uniform")


# ----------------------------------------------------------------------------------------------------------------
# which activations feed which linears


def input_groups(block: nnx.Module) -> tuple[InputGroup, ...]:
  """The block's linears grouped by the activation they read (models.protocol: `block.input_groups()`)."""
  groups = getattr(block, "input_groups", None)
  if groups is None:
    raise RepQuantError(f"RepQuant needs blocks that list their linears' input groups (input_groups(), see "
                        f"jaxquant.models.protocol); {type(block).__name__} does not")
  return groups()


def capture_inputs(block: nnx.Module, x: jax.Array, extra: tuple, groups, chunk: int
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(block(x), {group name: the activation entering its linears, (N, T, C)}) over samples in chunks."""
  y, recorded = blockwise.apply_recording(block, x, extra, chunk, [g.linears[0] for g in groups])
  return y, {g.name: jnp.concatenate(recorded[g.linears[0]]) for g in groups}


# ----------------------------------------------------------------------------------------------------------------
# 1. dual clipping


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
  lo_l, hi_l, first, last = core.learn_bounds(flat, kernel, lo, hi, bits=bits, steps=steps, lr=lr)
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
  qparams, reports = {}, []
  for group in input_groups(block):
    where = f"layers.{index}.{group.linears[0]} input ({group.name})"
    kernel = jnp.concatenate([surgery.get(block, path).kernel.get_value() for path in group.linears], axis=1)
    per_channel = config.channelwise and group.norm is not None
    lo, hi, loss0, loss1 = calibrate_bounds(
        acts[group.name], kernel, config.act_bits, per_channel, config.dual_clipping, config.clip_steps,
        config.clip_lr, config.clip_tokens, rng, where)
    scale, zero = qparams_from_bounds(lo, hi, config.act_bits, where)
    if per_channel and group.fold == "norm" and config.symmetric_rms:
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
  linears (kernel', bias') and into the affine before them: the norm's own (group.fold "norm": gamma', beta' in an
  RMSNormWithBias, or in the LayerNorm itself, which has a bias) or a BranchAffine at the block's branch attribute
  (fold "branch": a post-LN output that is also the residual stream). Returns (folded float block, the layer-wise
  (s~, z~) of every group). The folded block computes the same function as `block` (to float rounding)."""
  out = nnx.clone(block)
  layer_qparams = {}
  for group in input_groups(block):
    q = qparams[group.name]
    if not q.per_channel:
      layer_qparams[group.name] = q
      continue
    layer_scale, layer_zero = core.layerwise_qparams(q.scale, q.zero)
    layer_qparams[group.name] = GroupQParams(layer_scale, layer_zero)
    r1, r2 = core.reparam_factors(q.scale, q.zero, layer_scale, layer_zero)
    in_norm = group.fold == "norm"
    if in_norm:
      norm = surgery.get(block, group.norm)
      if isinstance(norm, LayerNorm):
        gamma, beta = core.fold_norm(norm.weight.get_value(), norm.bias.get_value(), q.scale, r1, r2)
        surgery.put(out, group.norm, LayerNorm(gamma, beta, norm.eps))
      else:
        gamma, beta = core.fold_norm(norm.weight.get_value(), None, q.scale, r1, r2)
        surgery.put(out, group.norm, RMSNorm(gamma, norm.eps) if symmetric_rms
                    else RMSNormWithBias(gamma, beta, norm.eps))
    elif group.fold == "branch":
      surgery.put(out, group.branch, BranchAffine(1.0 / r1, q.scale * r2 / r1))
    else:
      raise RepQuantError(f"input group {group.name!r} is per-channel but names no way to fold it (fold={group.fold!r})")
    for path in group.linears:
      lin = surgery.get(block, path)
      bias = lin.bias.get_value() if lin.bias is not None else None
      kernel, new_bias = core.fold_linear(lin.kernel.get_value(), bias, q.scale, r1, r2)
      if symmetric_rms and in_norm and bias is None:
        new_bias = None  # r2 = 0: no correction
      surgery.put(out, path, Linear(kernel, new_bias))
  return out, layer_qparams


def fake_quant_block(folded: nnx.Module, layer_qparams: dict[str, GroupQParams], config: RepQuantConfig
                     ) -> nnx.Module:
  """The folded block with RQLinears (layer-wise activation quantizers, b-bit weights) and the softmax quantizer."""
  quantizer = {path: layer_qparams[group.name] for group in input_groups(folded) for path in group.linears}

  def fake_linear(path, lin):
    q = quantizer[path]
    bias = lin.bias.get_value() if lin.bias is not None else None
    return RQLinear(lin.kernel.get_value(), bias, config.weight_bits, q.scale, q.zero, config.act_bits)

  out = surgery.replace_linears(folded, lambda path: path in quantizer, fake_linear)
  out.attn.probs_quant = config.softmax
  return out


def build_fake_block(block: nnx.Module, acts: dict[str, jax.Array], config: RepQuantConfig, index: int,
                     rng: np.random.Generator) -> tuple[nnx.Module, list[GroupReport]]:
  """calibrate_block, fold_block, fake_quant_block: the reparameterized fake-quantized copy of a float block."""
  qparams, reports = calibrate_block(block, acts, config, index, rng)
  folded, layer_qparams = fold_block(block, qparams, config.symmetric_rms)
  return fake_quant_block(folded, layer_qparams, config), reports


# ----------------------------------------------------------------------------------------------------------------
# 4. reconstruction


_RECON_STEPS: dict[tuple, blockwise.TrainStep] = {}  # one jitted step per optimizer: a model compiles it once


def _recon_step(config: RepQuantConfig) -> blockwise.TrainStep:
  key = (config.recon_lr, config.recon_steps, config.recon_weights and config.recon_weight_lr)
  if key not in _RECON_STEPS:
    _RECON_STEPS[key] = blockwise.TrainStep(core.weights_and_rest_adam(config.recon_lr, config.recon_weight_lr,
                                                                       config.recon_steps))
  return _RECON_STEPS[key]


def trainable(config: RepQuantConfig):
  """The nnx filter of what reconstruction trains in a fake block: log weight scales and biases, and as
  configured latent weights and activation scales."""
  names = ["log_scale", "bias"] + ["kernel"] * config.recon_weights + ["act_scale"] * config.recon_act_scales
  return nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(n) for n in names)))


def reconstruct(fake: nnx.Module, x, y, extra, config: RepQuantConfig, rng: np.random.Generator, bar=None):
  """Adam on the `trainable(config)` parameters of the fake block to match y. Returns (trained block or None on
  NaN, losses)."""
  trained, losses, _ = blockwise.train(fake, trainable(config), x, y, extra, _recon_step(config), config.recon_steps,
                                       min(config.recon_batch, x.shape[0]), rng, bar)
  return trained, losses


# ----------------------------------------------------------------------------------------------------------------
# the run


@dataclasses.dataclass
class RepQuantResult:
  """model: the quantized model; without_reconstruction: the same calibration with round-to-nearest weights (the
  "-norecon" ablation for free, when config.reconstruction); blocks: per-block reports; finish: the finishing
  pass's report (config.finish_steps > 0)."""
  model: nnx.Module
  blocks: list[BlockReport]
  seconds: float
  samples: tuple[int, int]
  without_reconstruction: nnx.Module | None = None
  finish: FinishReport | None = None


def quantize_block(index: int, block: nnx.Module, x, y, acts: dict[str, jax.Array], extra: tuple,
                   config: RepQuantConfig, progress: str | None = None
                   ) -> tuple[nnx.Module, nnx.Module | None, BlockReport]:
  """RepQuant of one float block on its float input x and output y, `acts` its groups' inputs: (fake-quantized
  block (to_real_block gives the inference one), the real block before reconstruction or None without
  reconstruction, report). progress: the progress bar's text
  after the block name (None: no bar)."""
  t0 = time.perf_counter()
  chunk = RUN_CHUNK
  rng = np.random.default_rng([config.seed, index])
  fake, group_reports = build_fake_block(block, acts, config, index, rng)
  if config.calibrate_softmax and config.softmax.form != "uniform":
    calibrate_softmax(fake, x, y, extra, chunk)
  mse_before = blockwise.block_mse(fake, x, y, extra, chunk)
  mse_after, status, rtn = None, "no-reconstruction", None
  if config.reconstruction:
    rtn = to_real_block(fake)
    with tqdm(total=config.recon_steps, desc=f"RepQuant layers.{index}{progress or ''}", unit="step",
              disable=progress is None, leave=False) as bar:
      trained, losses = reconstruct(fake, x, y, extra, config, rng, bar)
    if trained is None:
      status = "nan"
      log.warning("RepQuant reconstruction of layers.%d: loss became %s; round-to-nearest weights kept",
                  index, losses[-1])
    fake, mse_after, took = blockwise.keep_better(fake, mse_before, trained, x, y, extra, chunk)
    if trained is not None:
      status = "reconstructed" if took else "rtn-kept"
  report = BlockReport(f"layers.{index}", group_reports, mse_before, mse_after, status, time.perf_counter() - t0)
  return fake, rtn, report


RUN_CHUNK = 8  # samples a jitted forward takes at once


def repquant_quantize(model: nnx.Module, calibration: Iterable, config: RepQuantConfig = RepQuantConfig(),
                      progress: bool = True) -> RepQuantResult:
  """A new model: every block reparameterized and quantized (integer linears, log2 softmax). `model` (a
  models.protocol.BlockModel) unchanged. calibration: token batches ((B, T) arrays or (tokens, mask) pairs;
  config.n_samples rows of config.seq_len) or image batches (B, H, W, C) float for an image model (config.n_samples
  images; seq_len unused)."""
  start = time.perf_counter()
  try:
    ids, mask = blockwise.samples_from_batches(calibration, config.seq_len, config.n_samples,
                                               min(config.recon_batch, config.n_samples))
  except blockwise.BlockwiseError as err:
    raise RepQuantError(f"RepQuant: {err}") from None
  if config.finish_steps and len(ids) - held_out(len(ids)) < 1:
    raise RepQuantError(f"RepQuantConfig.finish_steps: the finishing pass holds out {held_out(len(ids))} of "
                        f"{len(ids)} calibration samples and needs at least one more to train on")
  x, extra = blockwise.model_inputs(model, ids, mask, RUN_CHUNK, what="RepQuant")
  core.check_finite_activations(x, "the embeddings' output")
  n_blocks = len(model.layers)

  def fn(index, block, x, y, recorded):
    acts = {g.name: jnp.concatenate(recorded[g.linears[0]]) for g in input_groups(block)}
    return quantize_block(index, block, x, y, acts, extra, config,
                          f" ({index + 1}/{n_blocks})" if progress else None)

  record = lambda block: ([g.linears[0] for g in input_groups(block)], surgery.identity)
  advance = None
  if config.recon_inputs == "quantized":
    advance = lambda result, s: blockwise.apply_block(to_real_block(result[0]), s, extra, RUN_CHUNK)
  reports, fake_blocks, rtn_blocks = [], [], []
  for fake, rtn, report in blockwise.run_blocks(model.layers, x, fn, extra=extra, chunk=RUN_CHUNK, record=record,
                                                advance=advance, record_student=advance is not None):
    fake_blocks.append(fake)
    if rtn is not None:
      rtn_blocks.append(rtn)
    reports.append(report)
    if progress:
      after = f" -> {report.mse_after:.4g}" if report.mse_after is not None else ""
      tqdm.write(f"RepQuant {report.block}: output MSE {report.mse_before:.4g}{after} ({report.status}, "
                 f"{report.seconds:.1f} s)", file=sys.stderr)

  def assemble(blocks):
    out = nnx.merge(*nnx.split(model))
    for index, qblock in enumerate(blocks):
      out.layers[index] = qblock
    return out

  finish = None
  if config.finish_steps:
    fake_blocks, finish = finish_on_output(
        model, fake_blocks, x, extra, trainable(config), config.finish_steps, config.finish_lr,
        config.finish_weight_lr, min(config.recon_batch, config.n_samples),
        np.random.default_rng([config.seed, len(fake_blocks)]), progress)
    if progress:
      tqdm.write(f"RepQuant finishing pass: held-out {finish.loss} {finish.loss_before:.4g} -> "
                 f"{finish.loss_after:.4g} ({'kept' if finish.kept else 'not kept'}, {finish.seconds:.1f} s)",
                 file=sys.stderr)
  return RepQuantResult(assemble([to_real_block(fake) for fake in fake_blocks]), reports,
                        time.perf_counter() - start, tuple(ids.shape), assemble(rtn_blocks) if rtn_blocks else None,
                        finish)


@dataclasses.dataclass(frozen=True)
class RepQuantProcedure:
  """A recipe's procedure (pipeline.quantize_model calls it)."""
  config: RepQuantConfig = RepQuantConfig()

  def __call__(self, model, recipe, calibration=None, progress: bool = True):
    return repquant_quantize(model, calibration, self.config, progress).model

  def template(self, model: nnx.Module) -> nnx.Module:
    """A model with the graph and array shapes this procedure makes from `model`, for checkpoint.restore to fill
    (a RepQuant model has modules and biases the float model lacks). Its values mean nothing: it is the
    procedure run on 4 random inputs (sequences of 8 tokens, or images) with one optimisation step."""
    config = dataclasses.replace(self.config, n_samples=4, seq_len=8, clip_steps=1, clip_tokens=32, recon_steps=1,
                                 recon_batch=4, finish_steps=0)
    return repquant_quantize(model, [blockwise.random_inputs(model, 4, 8, 0)], config, progress=False).model


# ----------------------------------------------------------------------------------------------------------------
# recipes

# RepQ-ViT's own choices where RepQuantConfig's defaults go further
PAPER = {"recon_weights": False, "recon_act_scales": False, "recon_inputs": "float", "calibrate_softmax": False}
ABLATIONS = {
    "noclip": ("without dual clipping (bounds = calibration min/max)", {"dual_clipping": False}),
    "nochannel": ("without per-channel quantization + reparameterization (one learned layer-wise pair)",
                  {"channelwise": False}),
    "nolog": ("without the log-sqrt2/log2 softmax quantizer (uniform)", {"log_softmax": False}),
    "norecon": ("without quantized weight reconstruction (round-to-nearest weights)", {"reconstruction": False}),
    "rms-symmetric": ("with symmetric per-channel clipping for RMSNorm outputs (r2 = 0, no norm bias)",
                      {"symmetric_rms": True}),
    "paper": ("as RepQ-ViT (softmax step 1; only weight scales and biases reconstructed, on float block inputs)",
              PAPER),
    "step1": ("with softmax step 1 (not calibrated)", {"calibrate_softmax": False}),
}


def _describe(bits: int) -> str:
  return (f"RepQuant W{bits}A{bits}: per-channel dual clipping of post-norm activations reparameterized to one "
          f"layer-wise asymmetric int{bits} scale (folded into norms and linears), learned layer-wise clipping "
          f"elsewhere, log-sqrt2 softmax (calibrated step) folded to log2 shifts, per-channel int{bits} weights "
          "with block-wise reconstruction of weights, scales, biases and activation scales on the quantized blocks' "
          "inputs (optax); 32 calibration samples")


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
