"""ZeroQuant's layer-by-layer knowledge distillation (LKD), for any block model (models.protocol).

For each block k in order (ZeroQuant, section 4.2), on the block-wise harness (methods.blockwise.run_blocks):
the student is a copy of float block k whose rule-matched linears are fake-quantized (round-to-nearest forward,
straight-through gradient to latent float weights; token-wise activation fake-quant where the rule quantizes
activations), trained with AdamW on mean((student(X_k) - Y_k)^2), X_k / Y_k the float model's input / output of
block k; the trained block is then quantized for real (rules.quantize_tree: the same packed QArrays as
round-to-nearest). Block k's result depends on float blocks 0..k only, and memory is flat in depth.

Failure handling: a NaN/Inf loss keeps round-to-nearest for that block with a warning naming it (on_nan="raise"
stops); with keep_best a block whose quantized output MSE LKD did not lower keeps round-to-nearest. With a
checkpoint_dir, finished blocks are written as they come and a rerun with the same model, rules, data and
settings resumes bit-identically. Data: calibration text, or data-free ("generated" from the float decoder,
"random" tokens). docs/methods.md has the details and the measured budget.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import sys
import time
import warnings
from typing import Any, Callable, ClassVar, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxquant import data
from jaxquant import rules as rules_lib
from jaxquant.methods import blockwise
from jaxquant.models import surgery
from jaxquant.models.protocol import check_block_model
from jaxquant.quantizers import WeightQuant, fake_quant_weight, quantize_tokens

log = logging.getLogger(__name__)

DATA_SOURCES = ("calibration", "generated", "random")


class LKDError(ValueError):
  """LKD cannot run or cannot go on; the message names the block, the setting or the data at fault."""


@dataclasses.dataclass(frozen=True)
class LKDConfig:
  """Settings of one LKD run.

  steps, batch_size, learning_rate, weight_decay: the optimisation of each block (optax AdamW).
  schedule: "constant" learning rate, or "cosine" decay from learning_rate to 0 over the block's steps.
    The defaults are ZeroQuant's reference settings (100 steps a block, batch 32, lr 5e-6, weight decay 0.01);
    jaxquant's recipes use `BUDGET` (below), sized for a 2-core CPU.
  seq_len: tokens a sample; longer calibration rows are cut into windows of seq_len.
  n_samples: calibration samples (rows) kept; minibatches of batch_size are drawn from them, an epoch at a time.
  data: "calibration" (batches given by the caller), "generated" (sampled from the float decoder), "random".
  temperature: sampling temperature for data="generated".
  train: "all" trains every float parameter of the block (kernels through fake-quant, norms, biases);
    "kernels" trains only the quantized kernels.
  on_nan: "rtn" warns, quantizes that block without LKD and goes on; "raise" stops with LKDError.
  keep_best: keep round-to-nearest for a block whose quantized output MSE LKD did not lower.
  seed: everything random (sample choice, minibatches, generated data) derives from it.
  """

  steps: int = 100
  batch_size: int = 32
  learning_rate: float = 5e-6
  weight_decay: float = 0.01
  schedule: str = "constant"
  seq_len: int = 128
  n_samples: int = 128
  data: str = "calibration"
  temperature: float = 1.0
  train: str = "all"
  on_nan: str = "rtn"
  keep_best: bool = True
  seed: int = 0

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "n_samples"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise LKDError(f"LKDConfig.{name} must be a positive integer, got {value!r}")
    if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
      raise LKDError(f"LKDConfig.learning_rate must be positive, got {self.learning_rate!r}")
    if self.weight_decay < 0:
      raise LKDError(f"LKDConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
    if self.schedule not in ("constant", "cosine"):
      raise LKDError(f"LKDConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
    if self.data not in DATA_SOURCES:
      raise LKDError(f"LKDConfig.data must be one of {DATA_SOURCES}, got {self.data!r}")
    if self.train not in ("all", "kernels"):
      raise LKDError(f"LKDConfig.train must be 'all' or 'kernels', got {self.train!r}")
    if self.on_nan not in ("rtn", "raise"):
      raise LKDError(f"LKDConfig.on_nan must be 'rtn' or 'raise', got {self.on_nan!r}")
    if self.temperature <= 0:
      raise LKDError(f"LKDConfig.temperature must be positive, got {self.temperature!r}")


# ZeroQuant's reference settings, as published.
REFERENCE = LKDConfig()
# jaxquant's default budget for its recipes (see experiments/zeroquant.py for how quality moves with steps).
BUDGET = LKDConfig(steps=50, batch_size=8, learning_rate=3e-4, schedule="cosine", seq_len=128, n_samples=128)


@dataclasses.dataclass
class BlockReport:
  """What LKD did to one block. mse_* are the really quantized block's output MSE against the teacher's output
  on all samples (mse_rtn: round-to-nearest, mse_lkd: after LKD); status is "lkd", "rtn-kept" (LKD did not
  lower the MSE) or "nan" (loss became NaN/Inf at nan_step: round-to-nearest used); resumed: the block was
  restored from checkpoint_dir (its figures are those of the run that distilled it)."""

  block: str
  status: str
  mse_rtn: float
  mse_lkd: float | None
  first_loss: float | None
  last_loss: float | None
  steps: int
  nan_step: int | None
  seconds: float
  resumed: bool = False


@dataclasses.dataclass
class LKDResult:
  model: nnx.Module
  blocks: list[BlockReport]
  compilations: int  # how many times the train step was traced (1 when every block shares one graph)
  samples: tuple[int, int]  # (n_samples, seq_len) of the data used
  data: str  # where the samples came from: "calibration", "generated" or "random"


# ----------------------------------------------------------------------------------------------------------------
# the student: fake-quantized linears (straight-through), a drop-in for layers.Linear inside a copied block


def fake_quant_activations(x: jax.Array, bits: int, mode: str, k_group: int) -> jax.Array:
  """Token-wise (mode "token") or token-and-K-group-wise ("token_group") quantize-dequantize of x (..., K) with a
  straight-through gradient: the forward value is what the integer path computes with."""
  if mode == "token":
    q, scale = quantize_tokens(x, bits)
    xq = q.astype(jnp.float32) * scale
  elif mode == "token_group":
    k = x.shape[-1]
    groups = math.ceil(k / k_group)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, groups * k_group - k)])
    q, scale = quantize_tokens(padded.reshape(*x.shape[:-1], groups, k_group), bits)
    xq = (q.astype(jnp.float32) * scale).reshape(*x.shape[:-1], groups * k_group)[..., :k]
  else:
    raise LKDError(f"LKD cannot train through activation mode {mode!r} (static per-tensor scales need "
                   "calibration of each block's input; use 'token' or 'token_group')")
  return x + jax.lax.stop_gradient(xq - x)


def fake_quant(weight_config: Any, w: jax.Array) -> jax.Array:
  """Quantize-dequantize of a kernel with a straight-through gradient, for any supported weight scheme."""
  if hasattr(weight_config, "fake_quant"):
    return weight_config.fake_quant(w)
  if isinstance(weight_config, WeightQuant):
    return fake_quant_weight(w, weight_config)
  raise LKDError(f"LKD needs a weight scheme with a straight-through fake-quant: {type(weight_config).__name__} "
                 "has none (WeightQuant has; other schemes may define fake_quant(w))")


class FakeQuantLinear(nnx.Module):
  """y = fq(x) @ fq(kernel) (+ bias): layers.Linear with fake-quantization, parameters under the same names
  (kernel (in, out), bias) so that its state drops back into the float block unchanged."""

  def __init__(self, kernel: jax.Array, bias: jax.Array | None, weight_config: Any, activation: str | None,
               activation_bits: int):
    self.kernel = nnx.Param(kernel)
    self.bias = nnx.Param(bias) if bias is not None else None
    self.weight_config = weight_config
    self.activation = activation
    self.activation_bits = activation_bits

  def __call__(self, x: jax.Array) -> jax.Array:
    w = fake_quant(self.weight_config, self.kernel.get_value().astype(jnp.float32))
    x = x.astype(jnp.float32)
    if self.activation is not None:
      k_group = self.weight_config.groups(tuple(w.shape))[0] if self.activation == "token_group" else w.shape[0]
      x = fake_quant_activations(x, self.activation_bits, self.activation, k_group)
    y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + jnp.reshape(self.bias.get_value().astype(y.dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


def make_student(block: nnx.Module, prefix: str, rules: Sequence[rules_lib.Rule]) -> nnx.Module:
  """A copy of `block` (nothing shared with it) whose rule-matched Linears are FakeQuantLinears; rules match the
  full parameter path `prefix + "attn.q_proj.kernel"` (e.g. "layers.3.attn.q_proj.kernel")."""
  rules = tuple(rules)
  rule_at = lambda path: rules_lib.match(rules, f"{prefix}{path}.kernel")

  def student_linear(path, linear):
    rule = rule_at(path)
    bias = linear.bias.get_value() if linear.bias is not None else None
    return FakeQuantLinear(linear.kernel.get_value(), bias, rule.weight, rule.activation, rule.activation_bits)

  return surgery.replace_linears(block, lambda path: rule_at(path) is not None, student_linear)


def check_rules(rules: Sequence[rules_lib.Rule]) -> None:
  for rule in rules:
    if rule.activation == "tensor":
      raise LKDError(f"rule {rule.pattern!r}: LKD does not support static per-tensor activation scales; use "
                     "activation='token' or 'token_group'")
    if not (hasattr(rule.weight, "fake_quant") or isinstance(rule.weight, WeightQuant)):
      fake_quant(rule.weight, jnp.zeros((1, 1)))  # raises the explanatory error


def quantize_block(block: nnx.Module, prefix: str, rules: Sequence[rules_lib.Rule]) -> nnx.Module:
  """`block` with its rule-matched kernels really quantized (packed QArrays), matched on full parameter paths."""
  graphdef, state = nnx.split(block)
  parts = prefix.rstrip(".").split(".")
  tree: Any = state
  for part in reversed(parts):
    tree = {part: tree}
  quantized = rules_lib.quantize_tree(tree, tuple(rules), progress=False)
  for part in parts:
    quantized = quantized[part]
  return nnx.merge(graphdef, quantized)


def train_step(config: LKDConfig) -> blockwise.TrainStep:
  """The jitted AdamW step (constant or cosine learning rate) every block of a run shares."""
  rate = (optax.cosine_decay_schedule(config.learning_rate, config.steps) if config.schedule == "cosine"
          else config.learning_rate)
  return blockwise.TrainStep(optax.adamw(rate, weight_decay=config.weight_decay))


# ----------------------------------------------------------------------------------------------------------------
# data


def calibration_from_text(tokenizer, text: str, config: LKDConfig = BUDGET, seed: int | None = None
                          ) -> list[np.ndarray]:
  """LKD calibration batches from any text file or built-in text name: config.n_samples random windows of
  config.seq_len tokens, in batches of config.batch_size. The text must hold at least one batch of distinct
  windows (batch_size * seq_len tokens): a shorter one raises LKDError naming it."""
  body, source = data.load_text(text)
  ids = data.tokenize(tokenizer, body)
  need = config.batch_size * config.seq_len
  if len(ids) < need:
    raise LKDError(f"calibration text {source} has {len(ids)} tokens, fewer than one LKD batch of "
                   f"{config.batch_size} x {config.seq_len} = {need} tokens: give a longer text (or a smaller "
                   "batch_size / seq_len)")
  return data.calibration_batches(ids, n_samples=config.n_samples, seq_len=config.seq_len,
                                  batch_size=config.batch_size, seed=config.seed if seed is None else seed,
                                  source=source)


def samples_from_batches(batches: Iterable, config: LKDConfig) -> tuple[np.ndarray, np.ndarray | None]:
  """Calibration batches -> (tokens (N, T) int32, mask or None): windows of config.seq_len, at most
  config.n_samples rows (blockwise.samples_from_batches); fewer rows than one batch raise LKDError."""
  try:
    ids, mask = blockwise.samples_from_batches(batches, config.seq_len, config.n_samples)
  except blockwise.BlockwiseError as err:
    raise LKDError(f"LKD: {err}") from None
  if len(ids) < config.batch_size:
    raise LKDError(f"LKD needs at least batch_size={config.batch_size} calibration samples; the calibration data "
                   f"gives {len(ids)} sample(s) of {ids.shape[1]} tokens ({ids.size} tokens): give a longer "
                   "calibration text or more samples, or lower batch_size")
  return ids, mask


def sample_tokens(config: LKDConfig, calibration: Iterable | None = None, *, vocab_size: int | None = None,
                  generate: Callable[..., np.ndarray] | None = None, random: Callable[..., np.ndarray] | None = None,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray | None, str]:
  """(samples, mask or None, where they came from) for config.data: windows of the calibration batches (or its
  images), `generate(n, seq_len, seed, temperature, progress)` for "generated", and for "random"
  `random(n, seq_len, seed)` (blockwise.random_inputs: images for an image model) or else uniform tokens over
  vocab_size."""
  if config.data == "calibration":
    if calibration is None:
      raise LKDError("LKD with data='calibration' needs calibration batches (or use data='generated'/'random')")
    ids, mask = samples_from_batches(calibration, config)
    return ids, mask, "calibration"
  if config.batch_size > config.n_samples:
    raise LKDError(f"LKD needs n_samples >= batch_size, got n_samples={config.n_samples}, "
                   f"batch_size={config.batch_size}")
  if config.data == "generated":
    if generate is None:
      raise LKDError("LKD with data='generated' needs the float model to sample from")
    return generate(config.n_samples, config.seq_len, config.seed, config.temperature, progress), None, "generated"
  if random is not None:
    return random(config.n_samples, config.seq_len, config.seed), None, "random"
  if vocab_size is None:
    raise LKDError("LKD with data='random' needs the vocabulary size")
  return blockwise.random_tokens(vocab_size, config.n_samples, config.seq_len, config.seed), None, "random"


def lkd_samples(model: nnx.Module, calibration: Iterable | None, config: LKDConfig, progress: bool = True
                ) -> tuple[np.ndarray, np.ndarray | None, str]:
  """(samples (N, T) tokens or (N, H, W, C) images, mask or None, description) that LKD trains on, as
  config.data says."""
  if config.data == "generated" and not model.can_generate:
    log.info("an encoder cannot generate text: data-free LKD uses random inputs")
    config = dataclasses.replace(config, data="random")

  def generate(n, seq_len, seed, temperature, progress):
    return blockwise.generate_tokens(model, n, seq_len, seed, temperature, progress)

  def random(n, seq_len, seed):
    return blockwise.random_inputs(model, n, seq_len, seed)

  return sample_tokens(config, calibration, generate=generate, random=random, progress=progress)


# ----------------------------------------------------------------------------------------------------------------
# the run


def distill_block(index: int, block: nnx.Module, x: jax.Array, y: jax.Array, *, extra: tuple,
                  rules: Sequence[rules_lib.Rule], config: LKDConfig, step: blockwise.TrainStep,
                  place: Callable = lambda a: a, progress: str | None = None) -> tuple[nnx.Module, BlockReport]:
  """LKD of one float block on its float input x and output y: (really quantized block, report). progress: the
  text after the block's name on its progress bar (None: no bar)."""
  name, prefix, chunk = f"layers.{index}", f"layers.{index}.", config.batch_size
  start = time.perf_counter()
  rtn = quantize_block(block, prefix, rules)
  mse_rtn = blockwise.block_mse(rtn, x, y, extra, chunk)
  trainable = nnx.Param if config.train == "all" else nnx.All(nnx.Param, nnx.PathContains("kernel"))
  rng = np.random.default_rng([config.seed, 2, index])
  with tqdm(total=config.steps, desc=f"LKD {name}{progress or ''}", unit="step", disable=progress is None,
            leave=False) as bar:
    trained, losses, nan_step = blockwise.train(make_student(block, prefix, rules), trainable, x, y, extra, step,
                                                config.steps, config.batch_size, rng, bar, place)
  candidate = None
  if trained is None:
    message = (f"LKD of block {name}: the loss became {losses[-1] if losses else 'NaN'} at step {nan_step} "
               f"(learning_rate={config.learning_rate}); ")
    if config.on_nan == "raise":
      raise LKDError(message + "stopping (on_nan='raise')")
    warnings.warn(message + "this block is quantized without LKD (round-to-nearest) and LKD goes on with the "
                  "next block", RuntimeWarning, stacklevel=4)
  else:
    # Put the trained values back into a float block of the teacher's own graph, then quantize it for real.
    candidate = quantize_block(nnx.merge(nnx.graphdef(block), nnx.state(trained)), prefix, rules)
    del trained
  if candidate is None:
    qblock, mse_lkd, status = rtn, None, "nan"
  elif config.keep_best:
    qblock, mse_lkd, took = blockwise.keep_better(rtn, mse_rtn, candidate, x, y, extra, chunk)
    status = "lkd" if took else "rtn-kept"
  else:
    qblock, mse_lkd, status = candidate, blockwise.block_mse(candidate, x, y, extra, chunk), "lkd"
  report = BlockReport(block=name, status=status, mse_rtn=mse_rtn, mse_lkd=mse_lkd,
                       first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                       steps=len(losses), nan_step=nan_step, seconds=time.perf_counter() - start)
  return qblock, report


def distill_blocks(blocks: Iterable[nnx.Module], x: jax.Array, rules: Sequence[rules_lib.Rule], config: LKDConfig,
                   step: blockwise.TrainStep, *, extra: tuple = (), data_digest: str = "",
                   place: Callable = lambda a: a, checkpoint_dir: pathlib.Path | None = None,
                   n_blocks: int | None = None, progress: bool = True) -> Iterable[tuple[nnx.Module, BlockReport]]:
  """LKD over float blocks given in order, lazily (blockwise.run_blocks): yields (really quantized block, report)
  for each block before the next one is taken from `blocks`. x: the samples' hidden states entering the first
  block, (N, T, D)."""
  rules = tuple(rules)
  store = None
  if checkpoint_dir is not None:
    store = blockwise.CheckpointStore(pathlib.Path(checkpoint_dir), "LKD", BlockReport, LKDError, data_digest,
                                      {"rules": repr(rules), "config": dataclasses.asdict(config)})
  total = f"/{n_blocks}" if n_blocks else ""

  def fn(index, block, x, y, recorded):
    return distill_block(index, block, x, y, extra=extra, rules=rules, config=config, step=step, place=place,
                         progress=f" ({index + 1}{total})" if progress else None)

  for qblock, report in blockwise.run_blocks(blocks, x, fn, extra=extra, chunk=config.batch_size, place=place,
                                             store=store):
    if progress:
      if report.resumed:
        tqdm.write(f"LKD {report.block}: resumed from {checkpoint_dir}", file=sys.stderr)
      else:
        gain = f", LKD {report.mse_lkd:.4g}" if report.mse_lkd is not None else ""
        tqdm.write(f"LKD {report.block}: {report.status}; output MSE round-to-nearest {report.mse_rtn:.4g}{gain} "
                   f"({report.seconds:.1f} s)", file=sys.stderr)
    yield qblock, report
    del qblock, report  # before the next block is taken


def lkd_quantize(model: nnx.Module, rules: Sequence[rules_lib.Rule], calibration: Iterable | None = None,
                 config: LKDConfig = BUDGET, *, checkpoint_dir: str | pathlib.Path | None = None,
                 progress: bool = True, callback: Callable[[int, BlockReport], None] | None = None,
                 data_sharding: jax.sharding.Sharding | None = None, method: "LKDProcedure | None" = None
                 ) -> LKDResult:
  """A new model: every block of `model` (a models.protocol.BlockModel) LKD-trained and quantized by `rules`, then
  any other rule-matched parameter (outside the blocks) quantized round-to-nearest. `model` is not modified.

  calibration: batches of token ids ((B, T) arrays, or (tokens, mask) pairs for an encoder) or of images
    ((B, H, W, C) float, an image model), for config.data="calibration". checkpoint_dir: where finished blocks are written / resumed from.
  callback(block_index, report) is called after each block (after its checkpoint is written).
  data_sharding: where the samples' activations and every training batch live, split along the sample axis
    (e.g. NamedSharding(mesh, P("data"))): the teacher passes and the training steps then run data-parallel.
    The model's own parameters keep their placement (e.g. sharding.shard_model for tensor parallelism).
  method: what distills the blocks (its check / train_step / distill hooks, e.g. lkd_formats.FormatLKDProcedure,
    whose config replaces `config`); None: this module's LKD with `config`.
  jaxquant.streaming.stream_quantize runs the same LKD reading one float block at a time from disk.
  """
  method = LKDProcedure(config) if method is None else method
  config, rules = method.config, tuple(rules)
  method.check(rules)
  check_block_model(model, "LKD")
  ids, mask, source = lkd_samples(model, calibration, config, progress)
  try:
    place = blockwise.placer(data_sharding, config.batch_size, ids.shape[0])
  except blockwise.BlockwiseError as err:
    raise LKDError(f"LKD {err}") from None
  x, extra = blockwise.model_inputs(model, ids, mask, config.batch_size, place, "LKD")
  if checkpoint_dir is not None:
    pathlib.Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
  step = method.train_step()
  distilled = method.distill(model.layers, x, rules, step, extra=extra, data_digest=blockwise.digest(ids, mask),
                             place=place, checkpoint_dir=checkpoint_dir, n_blocks=len(model.layers),
                             progress=progress)
  del x  # the generator owns the running hidden states from here
  reports: list[BlockReport] = []
  out = nnx.merge(*nnx.split(model))  # new Variables over the same (immutable) arrays: `model` stays as it is
  for index, (qblock, report) in enumerate(distilled):
    reports.append(report)
    out.layers[index] = qblock
    del qblock
    if callback is not None:
      callback(index, report)
  graphdef, state = nnx.split(out)
  out = nnx.merge(graphdef, rules_lib.quantize_tree(state, rules, progress=False))  # rules outside the blocks
  return LKDResult(model=out, blocks=reports, compilations=step.traces, samples=tuple(ids.shape), data=source)


@dataclasses.dataclass(frozen=True)
class LKDProcedure:
  """A recipe's procedure: `procedure(model, recipe, calibration, progress)` runs LKD with `config` over the
  recipe's rules (pipeline.quantize_model calls it). checkpoint_dir: see lkd_quantize."""

  config: LKDConfig = BUDGET
  checkpoint_dir: str | None = None
  distills_blocks: ClassVar[bool] = True  # streaming may feed it one float block at a time

  def __call__(self, model, recipe, calibration=None, progress: bool = True):
    result = lkd_quantize(model, recipe.rules, calibration, self.config, checkpoint_dir=self.checkpoint_dir,
                          progress=progress)
    kept = [f"{b.block} ({b.status})" for b in result.blocks if b.status != "lkd"]
    if kept:
      log.info("LKD kept round-to-nearest for %s", ", ".join(kept))
    return result.model

  def settings(self) -> dict:
    """What a checkpoint records of the run: a rerun with other LKD settings is another model."""
    return {"lkd": dataclasses.asdict(self.config)}

  # The hooks lkd_quantize and streaming distill with (a subclass distilling otherwise overrides all three).
  def check(self, rules: Sequence[rules_lib.Rule]) -> None:
    check_rules(rules)

  def train_step(self) -> blockwise.TrainStep:
    return train_step(self.config)

  def distill(self, blocks, x, rules, step, **options) -> Iterable[tuple[nnx.Module, BlockReport]]:
    """distill_blocks with this procedure's config (options: its keyword arguments)."""
    return distill_blocks(blocks, x, rules, self.config, step, **options)

  def calibration_from_text(self, tokenizer, text: str) -> list[np.ndarray]:
    """LKD draws its own windows (n_samples x seq_len) from a text."""
    return calibration_from_text(tokenizer, text, self.config)

  def configure(self, recipe: rules_lib.Recipe, checkpoint_dir: str | None = None, **config_overrides
                ) -> rules_lib.Recipe:
    return with_lkd_options(recipe, checkpoint_dir, **config_overrides)


def with_lkd_options(recipe: rules_lib.Recipe, checkpoint_dir: str | None = None, **config_overrides
                     ) -> rules_lib.Recipe:
  """The same LKD recipe with other LKD settings (steps=..., learning_rate=..., data=...) or a checkpoint_dir."""
  if not isinstance(recipe.procedure, LKDProcedure):
    raise LKDError(f"recipe {recipe.name!r} is not an LKD recipe")
  procedure = recipe.procedure
  config = dataclasses.replace(procedure.config, **config_overrides)
  procedure = dataclasses.replace(procedure, config=config,
                                  checkpoint_dir=checkpoint_dir if checkpoint_dir is not None
                                  else procedure.checkpoint_dir)
  uses_calibration = config.data == "calibration"
  return dataclasses.replace(recipe, procedure=procedure, uses_calibration=uses_calibration)
