"""A finishing pass on the final logits (issue 18, item 2): after block-wise distillation, the continuous parameters
of every stored weight-only format train jointly on KL(float || quantized) of the next-token distributions.

Block-wise distillation matches each block's output on the float model's input to that block, so the errors of
the blocks before it are never seen; this pass trains all blocks at once against the model's own output. What
trains: BCQArray's alphas and offsets and weight-only QArray's scales, through their stored dtype (float16 alphas
are rounded forward, straight through backward: the stored model computes what was trained). What stays: the
codes (sign planes, integer codes and zero points) and every float parameter outside the formats. W8A8 kernels
are left as they are (their dynamic activation rounding passes no gradient).

Loss: mean over tokens of KL(p_float || p_quantized), p the softmax of the logits at every position of a window
of calibration tokens; Adam with a cosine decay from LogitKLConfig.learning_rate. The last `check_windows`
calibration windows are held out: the pass keeps its result only when their KL fell (else the input model is
returned unchanged, with a warning saying why), as block distillation keeps a format's own fit.
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

from jaxquant import formats
from jaxquant.formats import BCQArray, QArray
from jaxquant.models import surgery

TRAINED_FIELDS = {BCQArray: ("alpha", "offset"), QArray: ("scale",)}


class LogitKLError(ValueError):
  """Settings or inputs the logit pass cannot run with."""


@dataclasses.dataclass(frozen=True)
class LogitKLConfig:
  """steps of Adam over batch_size calibration windows each; the last check_windows windows are held out."""

  steps: int = 60
  batch_size: int = 4
  learning_rate: float = 1e-4
  check_windows: int = 8
  seed: int = 0

  def __post_init__(self):
    for name in ("steps", "batch_size", "check_windows"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise LogitKLError(f"LogitKLConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
    if not self.learning_rate > 0:
      raise LogitKLError(f"LogitKLConfig.learning_rate must be positive, got {self.learning_rate!r}")


@dataclasses.dataclass(frozen=True)
class LogitKLReport:
  kl_before: float  # held-out windows' mean KL per token before the pass
  kl_after: float   # ... after it
  kept: bool        # whether the trained parameters were kept (kl_after < kl_before, finite)
  arrays: int       # stored arrays whose parameters trained
  steps: int
  seconds: float


def _trained(leaf) -> bool:
  return isinstance(leaf, BCQArray) or (isinstance(leaf, QArray) and leaf.activation is None)


def _through_dtype(x: jax.Array, dtype) -> jax.Array:
  """x rounded to the stored dtype forward, identity backward."""
  return x + jax.lax.stop_gradient(x.astype(dtype).astype(jnp.float32) - x)


def _rebuild(leaves: list, index: list[int], params: list[dict]) -> list:
  out = list(leaves)
  for i, p in zip(index, params):
    out[i] = dataclasses.replace(leaves[i], **{f: _through_dtype(v, getattr(leaves[i], f).dtype)
                                               for f, v in p.items()})
  return out


def mean_kl(teacher_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """Mean over tokens of KL(softmax(teacher) || softmax(logits)), float32."""
  logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1))


def finish_on_logits(teacher: nnx.Module, student: nnx.Module, windows: np.ndarray,
                     config: LogitKLConfig = LogitKLConfig(), progress: bool = True
                     ) -> tuple[nnx.Module, LogitKLReport]:
  """(student with its formats' continuous parameters trained on the logits' KL against teacher, report).

  teacher: the float model; student: the same model quantized (BCQArray / QArray kernels), run on the XLA path;
  windows: (N, T) int token ids of calibration text, N > config.check_windows. Neither model is modified."""
  windows = np.asarray(windows)
  if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer):
    raise LogitKLError(f"windows must be (N, T) integer token ids, got {windows.dtype} {windows.shape}")
  if windows.shape[0] <= config.check_windows:
    raise LogitKLError(f"{windows.shape[0]} calibration windows: the pass needs more than check_windows="
                       f"{config.check_windows} (those are held out)")
  start = time.perf_counter()
  graphdef_as_given = nnx.graphdef(student)
  student = nnx.clone(student)
  for module in surgery.modules(student).values():
    module.backend = "xla"  # gradients need the XLA path: the Pallas kernels have none
  graphdef, state = nnx.split(student)
  leaves, treedef = jax.tree_util.tree_flatten(state, is_leaf=formats.is_qarray)
  index = [i for i, leaf in enumerate(leaves) if _trained(leaf)]
  if not index:
    raise LogitKLError("the model holds no weight-only BCQArray or QArray kernel to train")
  params = [{f: getattr(leaves[i], f).astype(jnp.float32) for f in TRAINED_FIELDS[type(leaves[i])]
             if getattr(leaves[i], f) is not None} for i in index]

  def logits(params, leaves, tokens):
    model = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, _rebuild(leaves, index, params)))
    return model(tokens)

  teacher_logits = nnx.jit(lambda model, tokens: model(tokens))
  loss = lambda params, leaves, tokens, target: mean_kl(target, logits(params, leaves, tokens))
  check_kl = jax.jit(loss)
  optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.steps))

  @jax.jit
  def step(params, opt_state, leaves, tokens, target):
    value, grads = jax.value_and_grad(loss)(params, leaves, tokens, target)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  train, held_out = windows[:-config.check_windows], windows[-config.check_windows:]
  held_target = teacher_logits(teacher, jnp.asarray(held_out))
  held = jnp.asarray(held_out)
  kl_before = float(check_kl(params, leaves, held, held_target))
  rng = np.random.default_rng(config.seed)
  opt_state = optimizer.init(params)
  trained = params
  with tqdm(total=config.steps, desc="logit KL", unit="step", disable=not progress, leave=False) as bar:
    for _ in range(config.steps):
      tokens = jnp.asarray(train[rng.choice(len(train), size=min(config.batch_size, len(train)), replace=False)])
      trained, opt_state, value = step(trained, opt_state, leaves, tokens, teacher_logits(teacher, tokens))
      bar.set_postfix(kl=f"{float(value):.4g}")
      bar.update()
  kl_after = float(check_kl(trained, leaves, held, held_target))
  kept = bool(np.isfinite(kl_after) and kl_after < kl_before)
  if not kept:
    warnings.warn(f"logit KL pass: the held-out KL went {kl_before:.4g} -> {kl_after:.4g} "
                  f"(learning_rate={config.learning_rate}); the model keeps its block-wise parameters",
                  RuntimeWarning, stacklevel=2)
    trained = params
  stored = [dataclasses.replace(leaves[i], **{f: v.astype(getattr(leaves[i], f).dtype) for f, v in p.items()})
            for i, p in zip(index, trained)]
  out = list(leaves)
  for i, array in zip(index, stored):
    out[i] = array
  model = nnx.merge(graphdef_as_given, jax.tree_util.tree_unflatten(treedef, out))
  return model, LogitKLReport(kl_before=kl_before, kl_after=kl_after, kept=kept, arrays=len(index),
                              steps=config.steps, seconds=time.perf_counter() - start)
