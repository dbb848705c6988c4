"""ZeroQuant's layer-by-layer knowledge distillation (LKD), for any model with a block list.

For each block k in order (ZeroQuant, section 4.2):

  teacher input   X_k = the float model's hidden states entering block k (embeddings, then float blocks
                  0..k-1), over the calibration samples;
  teacher output  Y_k = float block k applied to X_k;
  student         a copy of block k whose matching linear kernels are fake-quantized (round-to-nearest in the
                  forward pass, straight-through gradient to latent float weights; token-wise activation
                  fake-quant where the rule quantizes activations), trained with AdamW on mean((student(X_k) -
                  Y_k)^2) over random minibatches of the samples;
  result          the trained block quantized for real (rules.quantize_tree, the same packed QArrays as
                  round-to-nearest) replaces block k in the output model; X_{k+1} = Y_k.

The student never sees another block's quantization error (it takes the teacher's input), so block k's result
depends on blocks 0..k of the float model only, never on later blocks. Only the running teacher hidden states
(two (N, T, D) arrays), one block's student, its optimizer state and its activations are alive at a time: memory
does not grow with depth beyond the output model's quantized blocks. The train step is compiled once per run
(every block has the same graph and shapes; the step is jitted over (graphdef, state) pytrees).

Failure handling. A loss that becomes NaN/Inf stops that block: a warning names the block and step, the block is
quantized without LKD (round-to-nearest of its float weights: the result before LKD) and the run goes on with the
next block (on_nan="raise" stops the run instead). With keep_best (default) a block whose really quantized output
MSE on the samples is not lower after LKD than with round-to-nearest keeps round-to-nearest. With a
`checkpoint_dir`, each finished block is written there atomically (jaxquant.checkpoint) as soon as it is done; a
rerun with the same model, rules, data and settings restores finished blocks and continues with the first missing
one, bit-identical to an uninterrupted run (per-block random streams). An interrupted write leaves no partial
block behind.

Data. `data="calibration"`: token windows from any text (`calibration_from_text`, or the batches that
pipeline.quantize_model passes). Data-free: `data="generated"` samples sequences from the float decoder itself
(first token uniform over the vocabulary, then temperature sampling with a KV cache), `data="random"` uses
uniform random tokens; an encoder cannot generate and gets random tokens for "generated".
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import pathlib
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxquant import rules as rules_lib
from jaxquant.models.layers import Linear
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


def _linears(block: nnx.Module) -> dict[tuple, Linear]:
  return {tuple(path): node for path, node in nnx.iter_graph(block) if isinstance(node, Linear)}


def block_rules(block: nnx.Module, prefix: str, rules: Sequence[rules_lib.Rule]) -> dict[tuple, rules_lib.Rule]:
  """Module path inside the block -> the rule that quantizes its kernel (matched on the full parameter path
  `prefix + "attn.q_proj.kernel"`, e.g. "layers.3.attn.q_proj.kernel")."""
  found = {}
  for path in _linears(block):
    rule = rules_lib.match(tuple(rules), f"{prefix}{'.'.join(str(p) for p in path)}.kernel")
    if rule is not None:
      found[path] = rule
  return found


def make_student(block: nnx.Module, prefix: str, rules: Sequence[rules_lib.Rule]) -> nnx.Module:
  """A copy of `block` (nothing shared with it) whose rule-matched Linears are FakeQuantLinears."""
  student = nnx.clone(block)
  for path, rule in block_rules(student, prefix, rules).items():
    parent = student
    for name in path[:-1]:
      parent = parent[name] if isinstance(name, int) else getattr(parent, name)
    linear = _linears(student)[path]
    bias = linear.bias.get_value() if linear.bias is not None else None
    replacement = FakeQuantLinear(linear.kernel.get_value(), bias, rule.weight, rule.activation, rule.activation_bits)
    if isinstance(path[-1], int):
      parent[path[-1]] = replacement
    else:
      setattr(parent, path[-1], replacement)
  return student


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


# ----------------------------------------------------------------------------------------------------------------
# pure training math: one jitted AdamW step on a block's parameters, compiled once for every block


def make_optimizer(config: LKDConfig) -> optax.GradientTransformation:
  rate = (optax.cosine_decay_schedule(config.learning_rate, config.steps) if config.schedule == "cosine"
          else config.learning_rate)
  return optax.adamw(rate, weight_decay=config.weight_decay)


class TrainStep:
  """step(graphdef, params, rest, opt_state, x, y, extra) -> (params, opt_state, loss), jitted with the graphdef
  static: blocks of one model share graphdef and shapes, so it compiles once. loss = mean((block(x) - y)^2)
  before the update. `traces` counts compilations."""

  def __init__(self, optimizer: optax.GradientTransformation):
    self.optimizer = optimizer
    self.traces = 0
    self._step = jax.jit(self._impl, static_argnums=0)

  def _impl(self, graphdef, params, rest, opt_state, x, y, extra):
    self.traces += 1

    def loss_fn(p):
      out = nnx.merge(graphdef, p, rest)(x, *extra)
      return jnp.mean(jnp.square(out - y))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def __call__(self, graphdef, params, rest, opt_state, x, y, extra):
    return self._step(graphdef, params, rest, opt_state, x, y, extra)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, extra):
  return nnx.merge(graphdef, state)(x, *extra)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _embed(graphdef, state, ids, family):
  model = nnx.merge(graphdef, state)
  return model.embed_tokens(ids) if family == "decoder" else model.embeddings(ids)


@functools.partial(jax.jit, static_argnums=0)
def _sq_err_sum(graphdef, state, x, y, extra):
  return jnp.sum(jnp.square(nnx.merge(graphdef, state)(x, *extra) - y))


def _chunks(n: int, size: int):
  for start in range(0, n, size):
    yield slice(start, min(n, start + size))


def apply_block(block: nnx.Module, x: jax.Array, extra: tuple, chunk: int) -> jax.Array:
  """block(x, *extra) over the samples in chunks of `chunk` rows (one compilation per block graph)."""
  graphdef, state = nnx.split(block)
  return jnp.concatenate([_apply(graphdef, state, x[s], tuple(e[s] for e in extra))
                          for s in _chunks(x.shape[0], chunk)])


def block_mse(block: nnx.Module, x: jax.Array, y: jax.Array, extra: tuple, chunk: int) -> float:
  """mean((block(x) - y)^2) over all samples."""
  graphdef, state = nnx.split(block)
  total = sum(float(_sq_err_sum(graphdef, state, x[s], y[s], tuple(e[s] for e in extra)))
              for s in _chunks(x.shape[0], chunk))
  return total / y.size


def fit_minibatches(step: Callable, graphdef, params, rest, opt_state, x: jax.Array, y: jax.Array, extra: tuple,
                    steps: int, batch_size: int, rng: np.random.Generator, bar=None,
                    place: Callable = lambda a: a) -> tuple[Any, list[float], int | None]:
  """The minibatch loop LKD and RepQuant's reconstruction share: `steps` optimizer steps
  `step(graphdef, params, rest, opt_state, x, y, extra) -> (params, opt_state, loss)` on batches of `batch_size`
  samples drawn without replacement (a fresh permutation each epoch). Stops at the first non-finite loss.
  Returns (params, losses, index of the non-finite step or None)."""
  n = x.shape[0]
  order = np.empty(0, np.int64)
  losses = []
  for i in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(n)])
    idx, order = np.sort(order[:batch_size]), order[batch_size:]
    idx = jnp.asarray(idx)
    params, opt_state, loss = step(graphdef, params, rest, opt_state, place(x[idx]), place(y[idx]),
                                   tuple(place(e[idx]) for e in extra))
    loss = float(loss)
    losses.append(loss)
    if bar is not None:
      bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
      bar.update(1)
    if not math.isfinite(loss):
      return params, losses, i
  return params, losses, None


def train_block(student: nnx.Module, x: jax.Array, y: jax.Array, extra: tuple, config: LKDConfig,
                step: TrainStep, rng: np.random.Generator, bar=None, place: Callable = lambda a: a):
  """Train `student` (in place on a split copy) to map x -> y. Returns (trained state or None when the loss became
  NaN/Inf, losses, step of the NaN or None)."""
  trainable = nnx.Param if config.train == "all" else nnx.All(nnx.Param, nnx.PathContains("kernel"))
  graphdef, params, rest = nnx.split(student, trainable, ...)
  params, losses, nan_step = fit_minibatches(step, graphdef, params, rest, step.optimizer.init(params), x, y,
                                             extra, config.steps, config.batch_size, rng, bar, place)
  if nan_step is not None:
    return None, losses, nan_step
  if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(params)):
    return None, losses, config.steps
  return nnx.merge(graphdef, params, rest), losses, None


# ----------------------------------------------------------------------------------------------------------------
# data


def _family(model: nnx.Module) -> str:
  if hasattr(model, "embed_tokens") and hasattr(model, "layers"):
    return "decoder"
  if hasattr(model, "embeddings") and hasattr(model, "layers"):
    return "encoder"
  raise LKDError(f"LKD needs a model with a block list `layers` and `embed_tokens` (decoder) or `embeddings` "
                 f"(encoder); {type(model).__name__} has neither")


def _vocab_size(model: nnx.Module) -> int:
  config = getattr(model, "config", None)
  if config is not None and hasattr(config, "vocab_size"):
    return int(config.vocab_size)
  raise LKDError(f"{type(model).__name__} has no config.vocab_size: data-free LKD cannot draw tokens")


def calibration_from_text(tokenizer, text: str, config: LKDConfig = BUDGET, seed: int | None = None
                          ) -> list[np.ndarray]:
  """LKD calibration batches from any text file or built-in text name: config.n_samples random windows of
  config.seq_len tokens, in batches of config.batch_size. The text must hold at least one batch of distinct
  windows (batch_size * seq_len tokens): a shorter one raises ValueError naming it."""
  from jaxquant import data
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
  """Calibration batches -> (tokens (N, T) int32, mask (N, T) or None). A batch is a (B, T) token array or a
  (tokens, mask) pair. Rows longer than config.seq_len are cut into windows of seq_len (the tail dropped);
  at most config.n_samples rows are kept. Fewer rows than one batch raise LKDError."""
  tokens, masks = [], []
  for batch in batches:
    if isinstance(batch, (tuple, list)):
      ids, mask = (np.asarray(b) for b in batch)
    else:
      ids, mask = np.asarray(batch), None
    if ids.ndim != 2:
      raise LKDError(f"calibration batches must be (batch, tokens) arrays, got shape {ids.shape}")
    if ids.shape[1] > config.seq_len:
      n = ids.shape[1] // config.seq_len
      cut = lambda a: a[:, :n * config.seq_len].reshape(-1, config.seq_len)
      ids = cut(ids)
      mask = cut(mask) if mask is not None else None
    tokens.append(ids.astype(np.int32))
    masks.append(mask)
  if not tokens:
    raise LKDError("LKD got no calibration batches")
  if len({t.shape[1] for t in tokens}) > 1:
    raise LKDError(f"calibration batches have different lengths {sorted({t.shape[1] for t in tokens})}")
  ids = np.concatenate(tokens)[:config.n_samples]
  mask = None
  if any(m is not None for m in masks):
    mask = np.concatenate([m if m is not None else np.ones_like(t) for m, t in zip(masks, tokens)])
    mask = mask[:config.n_samples].astype(np.int32)
  if len(ids) < config.batch_size:
    raise LKDError(f"LKD needs at least batch_size={config.batch_size} calibration samples; the calibration data "
                   f"gives {len(ids)} sample(s) of {ids.shape[1]} tokens ({ids.size} tokens): give a longer "
                   "calibration text or more samples, or lower batch_size")
  return ids, mask


def random_tokens(vocab_size: int, n: int, seq_len: int, seed: int) -> np.ndarray:
  """(n, seq_len) int32 uniform over the vocabulary."""
  return np.random.default_rng([seed, 1]).integers(0, vocab_size, size=(n, seq_len), dtype=np.int32)


GENERATE_BATCH = 32  # sequences decoded together: the KV cache of SmolLM2 is ~48 MiB per 32 x 128 tokens a block


def generate_tokens(model: nnx.Module, n: int, seq_len: int, seed: int = 0, temperature: float = 1.0,
                    progress: bool = True, batch_size: int = GENERATE_BATCH) -> np.ndarray:
  """(n, seq_len) int32 sequences sampled from the float decoder itself (models.decode, KV cache): the first
  token uniform over the vocabulary, every next one from softmax(logits / temperature). Sequences are decoded
  batch_size at a time (memory: one batch's cache), batch b from the key fold_in(key(seed), b)."""
  from jaxquant.models import decode
  from jaxquant.models.sampling import Sampler
  vocab = _vocab_size(model)
  first = random_tokens(vocab, n, 1, seed)[:, 0]
  out = np.zeros((n, seq_len), np.int32)
  out[:, 0] = first
  if seq_len == 1:
    return out
  decoder = decode.Decoder(model, Sampler(temperature=temperature))
  n_batches = math.ceil(n / batch_size)
  with tqdm(total=n_batches * (seq_len - 1), desc="generate", unit="tok", disable=not progress, leave=False) as bar:
    for b in range(n_batches):
      rows = slice(b * batch_size, min(n, (b + 1) * batch_size))
      prompt = np.zeros((batch_size, 1), np.int32)  # a full batch always: one compilation
      prompt[:rows.stop - rows.start, 0] = first[rows]
      result = decode.generate(decoder, prompt, seq_len - 1, key=jax.random.fold_in(jax.random.key(seed), b),
                               on_token=lambda i, tokens: bar.update(1))
      out[rows, 1:] = result.tokens[:rows.stop - rows.start]
  return out


def sample_tokens(config: LKDConfig, calibration: Iterable | None = None, *, vocab_size: int | None = None,
                  generate: Callable[..., np.ndarray] | None = None, progress: bool = True
                  ) -> tuple[np.ndarray, np.ndarray | None, str]:
  """(tokens (N, T), mask or None, where they came from) for config.data: windows of the calibration batches,
  `generate(n, seq_len, seed, temperature, progress)` for "generated", uniform tokens over vocab_size for
  "random"."""
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
  if vocab_size is None:
    raise LKDError("LKD with data='random' needs the vocabulary size")
  return random_tokens(vocab_size, config.n_samples, config.seq_len, config.seed), None, "random"


def lkd_samples(model: nnx.Module, calibration: Iterable | None, config: LKDConfig, progress: bool = True
                ) -> tuple[np.ndarray, np.ndarray | None, str]:
  """(tokens (N, T), mask or None, description) that LKD trains on, as config.data says."""
  family = _family(model)
  if config.data == "generated" and family == "encoder":
    log.info("an encoder cannot generate text: data-free LKD uses random tokens")
    config = dataclasses.replace(config, data="random")
  vocab_size = _vocab_size(model) if config.data == "random" else None
  generate = functools.partial(generate_tokens, model) if family == "decoder" else None
  return sample_tokens(config, calibration, vocab_size=vocab_size, generate=generate, progress=progress)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints of finished blocks (resume)


def _digest_tree(tree) -> str:
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    h.update(rules_lib.path_str(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()


def _fingerprint(block: nnx.Module, index: int, rules, config: LKDConfig, data_digest: str) -> dict:
  return {"kind": "jaxquant-lkd-block", "block": index, "rules": repr(tuple(rules)),
          "config": dataclasses.asdict(config), "teacher_sha256": _digest_tree(nnx.state(block)),
          "data_sha256": data_digest}


def _block_dir(checkpoint_dir: pathlib.Path, index: int) -> pathlib.Path:
  return checkpoint_dir / f"block_{index:03d}"


def _load_finished(directory: pathlib.Path, template: nnx.Module, fingerprint: dict):
  from jaxquant import checkpoint
  meta = checkpoint.load_metadata(directory)
  stored = meta["source"].get("lkd")
  if stored != json.loads(json.dumps(fingerprint)):
    differs = sorted(k for k in fingerprint if (stored or {}).get(k) != json.loads(json.dumps(fingerprint[k])))
    raise LKDError(f"{directory} holds block {fingerprint['block']} of a different LKD run ({', '.join(differs)} "
                   "differ): use another checkpoint_dir, or delete it to start over")
  return checkpoint.restore(directory, template), meta["source"]["report"]


def _save_finished(directory: pathlib.Path, qblock: nnx.Module, fingerprint: dict, report: BlockReport) -> None:
  from jaxquant import checkpoint
  checkpoint.save(directory, qblock, recipe_name="lkd-block",
                  source={"lkd": fingerprint, "report": dataclasses.asdict(report)}, overwrite=True)


# ----------------------------------------------------------------------------------------------------------------
# the run


def _placer(data_sharding: jax.sharding.NamedSharding | None, batch_size: int, n_samples: int
            ) -> Callable[[jax.Array], jax.Array]:
  """device_put onto data_sharding (identity without one); refuses a batch its sample axis does not divide."""
  if data_sharding is None:
    return lambda a: a
  if not isinstance(data_sharding, jax.sharding.NamedSharding):
    raise LKDError(f"data_sharding must be a NamedSharding (e.g. NamedSharding(mesh, P('data'))), "
                   f"not {type(data_sharding).__name__}")
  spec = tuple(data_sharding.spec)
  axes = spec[0] if spec else None
  axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
  split = math.prod(data_sharding.mesh.shape[a] for a in axes)
  for what, count in (("batch_size", batch_size), ("number of samples", n_samples)):
    if count % split:
      raise LKDError(f"LKD {what}={count} cannot be split over the {split} devices of data_sharding axis "
                     f"{axes}: use a {what} that is a multiple of {split}")
  return lambda a: jax.device_put(a, data_sharding)


def prepare_samples(ids: np.ndarray, mask: np.ndarray | None, family: str, config: LKDConfig,
                    data_sharding: jax.sharding.Sharding | None = None):
  """(extra block inputs, place, data digest) for the samples: an encoder's mask (all ones when none) as the
  block's extra input, the function that puts arrays on data_sharding, and the samples' sha256 (for resume)."""
  if family == "encoder" and mask is None:
    mask = np.ones_like(ids)
  place = _placer(data_sharding, config.batch_size, ids.shape[0])
  extra = (place(jnp.asarray(mask)),) if family == "encoder" else ()
  digest = hashlib.sha256(ids.tobytes() + (mask.tobytes() if mask is not None else b"")).hexdigest()
  return extra, place, digest


def embed_samples(embed: Callable[[jax.Array], jax.Array], ids: np.ndarray, chunk: int,
                  place: Callable = lambda a: a) -> jax.Array:
  """The hidden states entering the first block: embed(tokens (B, T)) -> (B, T, D) over the samples ids (N, T),
  `chunk` rows at a time, placed by `place`."""
  return place(jnp.concatenate([embed(jnp.asarray(ids[rows])) for rows in _chunks(len(ids), chunk)]))


def distill_blocks(blocks: Iterable[nnx.Module], x: jax.Array, rules: Sequence[rules_lib.Rule], config: LKDConfig,
                   step: TrainStep, *, extra: tuple = (), data_digest: str = "", place: Callable = lambda a: a,
                   checkpoint_dir: pathlib.Path | None = None, n_blocks: int | None = None,
                   progress: bool = True) -> Iterable[tuple[nnx.Module, BlockReport]]:
  """LKD over float blocks given in order, lazily: yields (really quantized block, report) for each block before
  the next one is taken from `blocks`, so a caller that reads blocks from disk and writes each result away holds
  one block at a time. x: the samples' hidden states entering the first block, (N, T, D)."""
  chunk = config.batch_size
  index = -1
  # Not enumerate(): its reused result tuple would keep block k referenced while block k+1 is read.
  for block in blocks:
    index += 1
    prefix = f"layers.{index}."
    name = f"layers.{index}"
    start = time.perf_counter()
    y = place(apply_block(block, x, extra, chunk))
    fingerprint = _fingerprint(block, index, rules, config, data_digest) if checkpoint_dir is not None else None
    directory = _block_dir(checkpoint_dir, index) if checkpoint_dir is not None else None
    if directory is not None and directory.exists():
      from jaxquant import checkpoint
      if (directory / checkpoint.METADATA_FILE).exists():
        qblock, stored = _load_finished(directory, block, fingerprint)
        report = BlockReport(**{**stored, "resumed": True, "seconds": time.perf_counter() - start})
        if progress:
          tqdm.write(f"LKD {name}: resumed from {directory}", file=sys.stderr)
        x = y
        del block  # nothing of this block but its result stays alive while the caller holds it
        yield qblock, report
        del qblock, report
        continue

    rtn = quantize_block(block, prefix, rules)
    mse_rtn = block_mse(rtn, x, y, extra, chunk)
    student = make_student(block, prefix, rules)
    rng = np.random.default_rng([config.seed, 2, index])
    total = f"/{n_blocks}" if n_blocks else ""
    with tqdm(total=config.steps, desc=f"LKD {name} ({index + 1}{total})", unit="step",
              disable=not progress, leave=False) as bar:
      trained, losses, nan_step = train_block(student, x, y, extra, config, step, rng, bar, place)
    del student
    first = losses[0] if losses else None
    last = losses[-1] if losses else None
    if trained is None:
      message = (f"LKD of block {name}: the loss became {losses[-1] if losses else 'NaN'} at step {nan_step} "
                 f"(learning_rate={config.learning_rate}); ")
      if config.on_nan == "raise":
        raise LKDError(message + "stopping (on_nan='raise')")
      warnings.warn(message + "this block is quantized without LKD (round-to-nearest) and LKD goes on with the "
                    "next block", RuntimeWarning, stacklevel=3)
      qblock, status, mse_lkd = rtn, "nan", None
    else:
      # Put the trained values back into a float block of the teacher's own graph, then quantize it for real.
      float_block = nnx.merge(nnx.graphdef(block), nnx.state(trained))
      qblock = quantize_block(float_block, prefix, rules)
      del trained, float_block
      mse_lkd = block_mse(qblock, x, y, extra, chunk)
      status = "lkd"
      if config.keep_best and not mse_lkd < mse_rtn:
        qblock, status = rtn, "rtn-kept"
    del rtn, block
    report = BlockReport(block=name, status=status, mse_rtn=mse_rtn, mse_lkd=mse_lkd, first_loss=first,
                         last_loss=last, steps=len(losses), nan_step=nan_step, seconds=time.perf_counter() - start)
    if directory is not None:
      _save_finished(directory, qblock, fingerprint, report)
    if progress:
      gain = f", LKD {mse_lkd:.4g}" if mse_lkd is not None else ""
      tqdm.write(f"LKD {name}: {status}; output MSE round-to-nearest {mse_rtn:.4g}{gain} ({report.seconds:.1f} s)",
                 file=sys.stderr)
    x = y
    _return_freed_memory()
    yield qblock, report
    del qblock, report  # before the next block is taken


def _return_freed_memory() -> None:
  """Hand memory freed by the finished block back to the OS (glibc's malloc_trim): freed blocks' buffers otherwise
  stay in malloc's per-thread arenas and the process's footprint creeps up block by block. No-op elsewhere."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def lkd_quantize(model: nnx.Module, rules: Sequence[rules_lib.Rule], calibration: Iterable | None = None,
                 config: LKDConfig = BUDGET, *, checkpoint_dir: str | pathlib.Path | None = None,
                 progress: bool = True, callback: Callable[[int, BlockReport], None] | None = None,
                 data_sharding: jax.sharding.Sharding | None = None) -> LKDResult:
  """A new model: every block of `model` LKD-trained and quantized by `rules`, then any other rule-matched
  parameter (outside the blocks) quantized round-to-nearest. `model` is not modified.

  calibration: batches of token ids ((B, T) arrays, or (tokens, mask) pairs for an encoder), for
    config.data="calibration". checkpoint_dir: where finished blocks are written / resumed from.
  callback(block_index, report) is called after each block (after its checkpoint is written).
  data_sharding: where the samples' activations and every training batch live, split along the sample axis
    (e.g. NamedSharding(mesh, P("data"))): the teacher passes and the training steps then run data-parallel.
    The model's own parameters keep their placement (e.g. sharding.shard_model for tensor parallelism).
  The caller holds the whole float model; jaxquant.streaming.stream_quantize runs the same LKD reading one float
  block at a time from disk.
  """
  rules = tuple(rules)
  check_rules(rules)
  family = _family(model)
  ids, mask, source = lkd_samples(model, calibration, config, progress)
  n, seq = ids.shape
  extra, place, data_digest = prepare_samples(ids, mask, family, config, data_sharding)
  checkpoint_dir = pathlib.Path(checkpoint_dir) if checkpoint_dir is not None else None
  if checkpoint_dir is not None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

  mg, ms = nnx.split(model)
  x = embed_samples(lambda tokens: _embed(mg, ms, tokens, family), ids, config.batch_size, place)
  del ms

  step = TrainStep(make_optimizer(config))
  distilled = distill_blocks(model.layers, x, rules, config, step, extra=extra, data_digest=data_digest,
                             place=place, checkpoint_dir=checkpoint_dir, n_blocks=len(model.layers),
                             progress=progress)
  del x  # the generator owns the running hidden states from here
  reports: list[BlockReport] = []
  qblocks = []
  for index, (qblock, report) in enumerate(distilled):
    reports.append(report)
    qblocks.append(qblock)
    if callback is not None:
      callback(index, report)

  out = nnx.merge(*nnx.split(model))  # new Variables over the same (immutable) arrays: `model` stays as it is
  for index, qblock in enumerate(qblocks):
    out.layers[index] = qblock
  graphdef, state = nnx.split(out)
  out = nnx.merge(graphdef, rules_lib.quantize_tree(state, rules, progress=False))  # rules outside the blocks
  return LKDResult(model=out, blocks=reports, compilations=step.traces, samples=(n, seq),
                   data=source)


@dataclasses.dataclass(frozen=True)
class LKDProcedure:
  """A recipe's procedure: `procedure(model, recipe, calibration, progress)` runs LKD with `config` over the
  recipe's rules (pipeline.quantize_model calls it). checkpoint_dir: see lkd_quantize."""

  config: LKDConfig = BUDGET
  checkpoint_dir: str | None = None

  def __call__(self, model, recipe, calibration=None, progress: bool = True):
    result = lkd_quantize(model, recipe.rules, calibration, self.config, checkpoint_dir=self.checkpoint_dir,
                          progress=progress)
    kept = [f"{b.block} ({b.status})" for b in result.blocks if b.status != "lkd"]
    if kept:
      log.info("LKD kept round-to-nearest for %s", ", ".join(kept))
    return result.model


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
