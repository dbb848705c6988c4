"""RepQuant's finishing pass (RepQuantConfig.finish_steps): after block-wise reconstruction, the fake-quantized
blocks train together on the model's output against the float model's.

Block-wise reconstruction matches each block's output on its own input, so the error the blocks hand each other
is seen at most one block at a time; this pass trains every block's continuous parameters at once against the
head's output: what reconstruction trains (log weight scales, biases, and as configured latent weights and
activation scales), nothing else (the embeddings, the head and the softmax steps stay). The inference form is
unchanged: the blocks convert to integer ones afterwards exactly as without the pass.

Loss: a decoder's head gives logits: mean over tokens of KL(p_float || p_quantized); an encoder's gives features:
their mean squared error. Adam with a cosine decay, on minibatches of the calibration samples; the last
`held_out(n)` samples are held out, and the pass is kept only when their loss fell (else the blocks come back as
reconstruction left them, with a warning saying why).
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxquant.methods.logit_kl import mean_kl
from jaxquant.methods.repquant_core import weights_and_rest_adam


@dataclasses.dataclass(frozen=True)
class FinishReport:
  loss: str            # "kl" (decoder logits) or "mse" (encoder features)
  loss_before: float   # on the held-out calibration samples
  loss_after: float
  kept: bool           # loss_after < loss_before (finite)
  steps: int
  held_out: int        # samples held out for the check
  seconds: float


def held_out(n: int) -> int:
  """Calibration samples held out for the keep-or-not check: an eighth, at least one."""
  return max(1, n // 8)


class _Chain(nnx.Module):
  """The blocks then the head of `model` (whose layers the caller replaced): x (N, T, D) -> head output."""

  def __init__(self, model: nnx.Module):
    self.model = model

  def __call__(self, x: jax.Array, *extra) -> jax.Array:
    for block in self.model.layers:
      x = block(x, *extra)
    return self.model.head(x)


def _loss_fn(decoder: bool):
  if decoder:
    return lambda out, target: mean_kl(target, out)
  return lambda out, target: jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)))


def finish_on_output(model: nnx.Module, fake_blocks: list[nnx.Module], x: jax.Array, extra: tuple, trainable,
                     steps: int, learning_rate: float, weight_learning_rate: float, batch_size: int,
                     rng: np.random.Generator, progress: bool = True) -> tuple[list[nnx.Module], FinishReport]:
  """(fake_blocks trained together on the output of `model` with them in place of its layers, report).

  model: the float BlockModel (unchanged); fake_blocks: its blocks fake-quantized (RQLinear, ...); x (N, T, D):
  the calibration samples entering the first block, extra: the blocks' extra inputs (N, ...); trainable: an nnx
  filter over one block's parameters (reconstruction's). Latent weights ("kernel") train at weight_learning_rate,
  everything else at learning_rate."""
  start = time.perf_counter()
  teacher = _Chain(model)
  student_model = nnx.merge(*nnx.split(model))
  for index, block in enumerate(fake_blocks):
    student_model.layers[index] = nnx.clone(block)
  student = _Chain(student_model)
  in_layers = nnx.All(trainable, nnx.PathContains("layers"))
  graphdef, params, rest = nnx.split(student, in_layers, ...)
  teacher_def, teacher_state = nnx.split(teacher)
  loss = _loss_fn(bool(model.can_generate))

  optimizer = weights_and_rest_adam(learning_rate, weight_learning_rate, steps)

  @jax.jit
  def target_of(state, x, extra):
    return nnx.merge(teacher_def, state)(x, *extra)

  @jax.jit
  def value(params, rest, x, extra, target):
    return loss(nnx.merge(graphdef, params, rest)(x, *extra), target)

  @jax.jit
  def step(params, rest, opt_state, x, extra, target):
    value_, grads = jax.value_and_grad(value)(params, rest, x, extra, target)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value_

  n_check = held_out(x.shape[0])
  if x.shape[0] - n_check < 1:
    raise ValueError(f"the finishing pass holds out {n_check} of {x.shape[0]} calibration samples and needs at least "
                     "one more to train on: give more calibration samples or finish_steps=0")
  train_idx = np.arange(x.shape[0] - n_check)
  check_x = x[-n_check:]
  check_extra = tuple(e[-n_check:] for e in extra)
  check_target = target_of(teacher_state, check_x, check_extra)
  before = float(value(params, rest, check_x, check_extra, check_target))
  trained, opt_state = params, optimizer.init(params)
  batch = min(batch_size, len(train_idx))
  with tqdm(total=steps, desc="RepQuant finish", unit="step", disable=not progress, leave=False) as bar:
    for _ in range(steps):
      idx = jnp.asarray(np.sort(rng.choice(train_idx, size=batch, replace=False)))
      xb, eb = x[idx], tuple(e[idx] for e in extra)
      trained, opt_state, v = step(trained, rest, opt_state, xb, eb, target_of(teacher_state, xb, eb))
      bar.set_postfix(loss=f"{float(v):.4g}", refresh=False)
      bar.update(1)
  after = float(value(trained, rest, check_x, check_extra, check_target))
  kept = bool(np.isfinite(after) and after < before)
  if not kept:
    warnings.warn(f"RepQuant finishing pass: the held-out loss went {before:.4g} -> {after:.4g} "
                  f"(finish_lr={learning_rate}); the blocks keep their block-wise reconstruction",
                  RuntimeWarning, stacklevel=2)
    trained = params
  out = nnx.merge(graphdef, trained, rest)
  report = FinishReport("kl" if model.can_generate else "mse", before, after, kept, steps, n_check,
                        time.perf_counter() - start)
  return list(out.model.layers), report
