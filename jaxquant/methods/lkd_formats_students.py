"""Students of format distillation (lkd_formats): linears that hold a weight format's own parameters, started at
the format's fit, and what that start needs recorded from the block's inputs.

  BCQLinear      BCQ (methods/bcq.py): alphas, offsets, sign planes from latent weights (codes="ste") or fixed
  UniformLinear  uniform codes (quantizers.WeightQuant): scales, zero points, codes from latent weights or fixed
  make_student   a block whose rule-matched Linears are students; to_block: the packed block a student stands for

Starts: the format's own fit (BCQ weighted by the inputs' mean squares, `record_inputs` / `mean_squares`), or GPTQ
with that fit per group (`record_hessians` / `hessians`, gptq_core): the latent weights then start as GPTQ's
updated rows, so the straight-through codes at step 0 are GPTQ's codes.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant import formats
from jaxquant import rules as rules_lib
from jaxquant.formats import ActQuant, BCQArray, QArray
from jaxquant.methods import gptq_core, lkd
from jaxquant.methods import lkd_formats_core as core
from jaxquant.methods.bcq import ActivationAwareBCQ, BCQQuant
from jaxquant.models import surgery
from jaxquant.models.layers import Linear
from jaxquant.quantizers import WeightQuant, weight_values

GPTQ_DAMP = 0.01  # GPTQ's dampening: H + 0.01 mean(diag H) I


class Codes(nnx.Variable):
  """Fixed codes or constants of a student linear: part of its state, never trained."""


def _param(value):
  return None if value is None else nnx.Param(value)


class FormatLinear(nnx.Module):
  """A student linear: y = fq(x) @ W^(params) (+ bias), W^ the format's dequantized kernel. Subclasses hold the
  format's parameters; `stored()` is the packed array those parameters stand for, `to_linear()` the layers.Linear
  that replaces the student in the quantized block."""

  activation: str | None = None
  activation_bits: int = 8

  def weight(self) -> jax.Array:
    raise NotImplementedError

  def stored(self):
    raise NotImplementedError

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.weight()
    x = x.astype(jnp.float32)
    if self.activation is not None:
      k_group = self.k_group if self.activation == "token_group" else w.shape[0]
      x = lkd.fake_quant_activations(x, self.activation_bits, self.activation, k_group)
    y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + jnp.reshape(self.bias.get_value().astype(y.dtype), (1,) * (y.ndim - 1) + (-1,))
    return y

  def to_linear(self) -> Linear:
    return Linear(self.stored(), None if self.bias is None else self.bias.get_value())


def _through_dtype(x: jax.Array, dtype: str) -> jax.Array:
  """x rounded to `dtype` forward, identity backward: the student computes with what is stored."""
  return x + core.sg(x.astype(dtype).astype(jnp.float32) - x)


class BCQLinear(FormatLinear):
  """Student of a BCQQuant kernel (K, N): alpha (q, G, N), offset (G, N) or None, and latent (K, N) (codes="ste")
  or the fit's fixed signs (q, N, G, g) (codes="fixed"). Starts as config.fit(kernel, row_weight) exactly, or,
  given the Hessian (K, K) of its inputs, as GPTQ with the same fit per group (gptq_core.bcq)."""

  def __init__(self, kernel: jax.Array, bias: jax.Array | None, config: BCQQuant, row_weight: jax.Array | None,
               codes: str, hessian: jax.Array | None = None):
    self.shape = tuple(int(d) for d in kernel.shape)
    self.k_group = config.k_group(self.shape[0])
    self.scale_dtype = config.scale_dtype
    if hessian is None:
      signs, alpha, offset, _ = config.fit(kernel, row_weight)
      latent = kernel
    else:  # GPTQ: the latent weights are the rows as GPTQ rounded them, whose nearest codes are its codes
      signs, alpha, offset, latent = gptq_core.bcq(
          jnp.asarray(kernel), hessian, GPTQ_DAMP, q=config.bits, k_group=self.k_group, rounds=config.rounds,
          use_offset=config.offset, init=config.init, scale_dtype=config.scale_dtype)
    self.alpha = nnx.Param(alpha.astype(jnp.float32))
    self.offset = _param(None if offset is None else offset.astype(jnp.float32))
    self.latent = nnx.Param(jnp.asarray(latent, jnp.float32)) if codes == "ste" else None
    self.signs = Codes(core.grouped_signs(signs, self.k_group)) if codes == "fixed" else None
    self.bias = _param(bias)

  def _parameters(self):
    alpha = _through_dtype(self.alpha.get_value(), self.scale_dtype)
    offset = None if self.offset is None else _through_dtype(self.offset.get_value(), self.scale_dtype)
    return alpha, offset

  def weight(self) -> jax.Array:
    alpha, offset = self._parameters()
    latent = None if self.latent is None else self.latent.get_value()
    signs = None if self.signs is None else self.signs.get_value()
    return core.bcq_weight(latent, alpha, offset, self.k_group, signs, self.shape)

  def stored(self) -> BCQArray:
    alpha, offset = self._parameters()
    signs = (core.bcq_signs(self.latent.get_value(), alpha, offset, self.k_group) if self.latent is not None
             else self.signs.get_value())
    dtype = jnp.dtype(self.scale_dtype)
    return BCQArray(planes=formats.pack_planes(core.ungrouped_signs(signs, self.shape[0])), alpha=alpha.astype(dtype),
                    offset=None if offset is None else offset.astype(dtype), shape=self.shape, k_group=self.k_group)


class UniformLinear(FormatLinear):
  """Student of a WeightQuant kernel (K, N): scale and (asymmetric) zero point per group, zero in weight units
  (zero_w = z s0, lkd_formats_core), and latent (K, N) (codes="ste") or the fixed round-to-nearest codes.
  Starts as round-to-nearest exactly, or, given the Hessian (K, K) of its inputs, as GPTQ (gptq_core.uniform)."""

  def __init__(self, kernel: jax.Array, bias: jax.Array | None, config: WeightQuant, activation: str | None,
               activation_bits: int, codes: str, hessian: jax.Array | None = None):
    self.shape = tuple(int(d) for d in kernel.shape)
    self.bits, self.symmetric = config.bits, config.symmetric
    self.k_group, self.n_group = config.groups(self.shape)
    self.activation, self.activation_bits = activation, activation_bits
    if hessian is None:
      values, scale, zero = weight_values(kernel, bits=self.bits, symmetric=self.symmetric, k_group=self.k_group,
                                          n_group=self.n_group)
      latent = kernel
    else:  # GPTQ (per-column groups along K only: make_student checks)
      values, scale, zero, latent = gptq_core.uniform(jnp.asarray(kernel), hessian, GPTQ_DAMP, bits=self.bits,
                                                      symmetric=self.symmetric, k_group=self.k_group)
    self.scale = nnx.Param(scale)
    self.zero = _param(None if zero is None else zero * scale)
    self.scale0 = Codes(scale)
    self.latent = nnx.Param(jnp.asarray(latent, jnp.float32)) if codes == "ste" else None
    self.codes = Codes(values.astype(jnp.float32)) if codes == "fixed" else None
    self.bias = _param(bias)

  def _zero(self):
    return core.uniform_zero(None if self.zero is None else self.zero.get_value(), self.scale0.get_value())

  def _codes(self):
    if self.codes is not None:
      return self.codes.get_value()
    return core.uniform_codes(self.latent.get_value(), self.scale.get_value(), self._zero(), self.bits,
                              self.symmetric, self.k_group, self.n_group)

  def weight(self) -> jax.Array:
    return core.uniform_weight(None, self.scale.get_value(), self._zero(), self.bits, self.symmetric, self.k_group,
                               self.n_group, codes=self._codes())

  def stored(self) -> QArray:
    activation = None if self.activation is None else ActQuant(bits=self.activation_bits, mode=self.activation)
    zero = self._zero()
    return QArray(packed=formats.pack(self._codes().astype(jnp.int32).T, self.bits), scale=self.scale.get_value(),
                  zero=zero, activation=activation, shape=self.shape, bits=self.bits, k_group=self.k_group,
                  n_group=self.n_group)


def check_rules(rules: Sequence[rules_lib.Rule]) -> None:
  """Raise LKDError for a rule whose format this distillation cannot train."""
  for rule in rules:
    if isinstance(rule.weight, BCQQuant):
      if rule.activation is not None:
        raise lkd.LKDError(f"rule {rule.pattern!r}: BCQ is weight-only; use activation=None")
    elif isinstance(rule.weight, WeightQuant):
      if rule.activation not in (None, "token", "token_group"):
        raise lkd.LKDError(f"rule {rule.pattern!r}: format distillation trains through dynamic activation "
                           f"quantization ('token', 'token_group') only, not {rule.activation!r}")
    else:
      raise lkd.LKDError(f"rule {rule.pattern!r}: format distillation trains BCQQuant and WeightQuant kernels, not "
                         f"{type(rule.weight).__name__}")


def _rule_at(rules, prefix: str, path: str):
  return rules_lib.match(rules, f"{prefix}{path}.kernel")


def make_student(block: nnx.Module, prefix: str, rules: Sequence[rules_lib.Rule], codes: str,
                 row_weights: dict[str, jax.Array] | None = None,
                 hessians: dict[str, jax.Array] | None = None) -> nnx.Module:
  """A copy of `block` whose rule-matched Linears are FormatLinears at the format's own fit. row_weights: module
  path ("attn.q_proj") -> (K,) row weights of that linear's BCQ fit (absent: the plain squared error); hessians:
  module path -> (K, K) Hessian of its inputs, for a GPTQ start (absent: the fit)."""
  rules, row_weights, hessians = tuple(rules), row_weights or {}, hessians or {}

  def student_linear(path, linear):
    rule = _rule_at(rules, prefix, path)
    kernel = linear.kernel.get_value()
    bias = linear.bias.get_value() if linear.bias is not None else None
    if isinstance(rule.weight, BCQQuant):
      return BCQLinear(kernel, bias, rule.weight, row_weights.get(path), codes, hessians.get(path))
    hessian = hessians.get(path)
    if hessian is not None and rule.weight.groups(tuple(kernel.shape))[1] != 1:
      raise lkd.LKDError(f"rule {rule.pattern!r}: a GPTQ start takes uniform groups along K only (granularity "
                         f"'channel' or 'group'), not {rule.weight.granularity!r}")
    return UniformLinear(kernel, bias, rule.weight, rule.activation, rule.activation_bits, codes, hessian)

  return surgery.replace_linears(block, lambda path: _rule_at(rules, prefix, path) is not None, student_linear)


def to_block(student: nnx.Module, block: nnx.Module) -> nnx.Module:
  """The quantized block the student stands for, in the float block's own graph: every FormatLinear becomes a
  Linear over its packed array; every other parameter (norms, biases) is the student's."""
  packed = surgery.replace(student, lambda path, module: module.to_linear(), FormatLinear)
  return nnx.merge(nnx.graphdef(block), nnx.state(packed))


def mean_squares(recorded: dict[str, list], damp: float) -> dict[str, jax.Array]:
  """Recorded (sum of squares per feature, count) chunks -> module path -> ActivationAwareBCQ's row weights."""
  out = {}
  for path, values in recorded.items():
    total = np.sum([np.asarray(v, np.float64) for v in values], axis=0)
    out[path] = jnp.asarray(ActivationAwareBCQ(damp).row_weights((total[:-1] / total[-1]).astype(np.float32)))
  return out


def _sum_of_squares_and_count(x: jax.Array) -> jax.Array:
  flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return jnp.concatenate([jnp.sum(flat * flat, axis=0), jnp.full((1,), flat.shape[0], jnp.float32)])


def record_inputs(block: nnx.Module) -> tuple[list[str], Callable]:
  """What run_blocks records for the BCQ fits' row weights: every linear's input, reduced to (sum of squares per
  feature, count) (a few numbers a feature a chunk)."""
  return list(surgery.modules(block)), _sum_of_squares_and_count



def hessians(recorded: dict[str, list]) -> dict[str, jax.Array]:
  """Recorded (X^T X flattened, count) chunks -> module path -> the Hessian X^T X / n (K, K) of its inputs."""
  out = {}
  for path, values in recorded.items():
    total = np.sum([np.asarray(v, np.float64) for v in values], axis=0)
    k = math.isqrt(total.size - 1)
    out[path] = jnp.asarray((total[:-1] / total[-1]).reshape(k, k), jnp.float32)
  return out


def row_weights_of(hessians_by_path: dict[str, jax.Array], damp: float) -> dict[str, jax.Array]:
  """ActivationAwareBCQ's row weights from the Hessians' diagonals (the inputs' mean squares)."""
  return {path: jnp.asarray(ActivationAwareBCQ(damp).row_weights(np.asarray(jnp.diag(h))))
          for path, h in hessians_by_path.items()}


def _gram_and_count(x: jax.Array) -> jax.Array:
  flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return jnp.concatenate([(flat.T @ flat).reshape(-1), jnp.full((1,), flat.shape[0], jnp.float32)])


def record_hessians(block: nnx.Module) -> tuple[list[str], Callable]:
  """What run_blocks records for GPTQ starts: every linear's input reduced to (X^T X, count), K^2 + 1 numbers a
  linear a chunk."""
  return list(surgery.modules(block)), _gram_and_count
