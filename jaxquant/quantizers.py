"""Pure quantizers: float arrays -> QArrays, activations -> integers, and fake-quant for training loops.

The array math (`weight_values`) is traceable and jit-compiled; `quantize_weight` wraps it with the checks that
need concrete values (NaN/Inf, group sizes) so that a bad weight is reported with its parameter path.
`WeightConfig` is what every rule's weight config provides (rules.quantize_tree and the sharded path run it).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.formats import ActQuant, QArray, check_bits, expand_groups, group_grid, pack

GRANULARITIES = ("tensor", "channel", "group", "row_block")


class WeightConfig:
  """What a rule's weight config provides (WeightQuant here; the BCQ configs of methods/bcq.py):

    check(w, path, activation)     raise, naming `path`, for a weight or an activation scheme it refuses
                                   (reads values: NaN/Inf)
    quantizer(path)                the traceable function (w, activation) -> stored format for that parameter;
                                   hashable (jax.jit caches on it), the same object for every call when it does
                                   not depend on the parameter
    check_quantized(q, w, path)    raise for a result that cannot be used (e.g. scales overflowing their dtype)
    quantize(w, path, activation)  the three in order, eagerly (rules.quantize_tree); the sharded path runs the
                                   quantizer under jax.jit instead, placing its outputs on the mesh
  """

  def check(self, w, path: str = "", activation: ActQuant | None = None) -> None:
    check_kernel(w, path)

  def quantizer(self, path: str = ""):
    raise NotImplementedError(f"{type(self).__name__} has no quantizer")

  def check_quantized(self, quantized, w, path: str = "") -> None:
    """Nothing to check by default."""

  def quantize(self, w: jax.Array, path: str = "", activation: ActQuant | None = None):
    """The rules' entry point: w (K, N) float -> stored format. `path` names the parameter in errors."""
    self.check(w, path, activation)
    quantized = self.quantizer(path)(w, activation)
    self.check_quantized(quantized, w, path)
    return quantized


@dataclasses.dataclass(frozen=True)
class WeightQuant(WeightConfig):
  """How one (K, N) weight is quantized.

  granularity: "tensor" (one scale), "channel" (one per output column), "group" (groups of `group_size`
  along the input dim K, per output column), "row_block" (ZeroQuant's reference: groups of `group_size`
  whole output rows share a scale). A group size that does not divide the dimension leaves a shorter last group.
  """

  bits: int = 8
  symmetric: bool = True
  granularity: str = "group"
  group_size: int = 128

  def __post_init__(self):
    check_bits(self.bits, where="weights")
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"unknown granularity {self.granularity!r}: choose one of {GRANULARITIES}")
    if self.granularity in ("group", "row_block") and (
        not isinstance(self.group_size, int) or self.group_size <= 0):
      raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")

  def quantizer(self, path: str = ""):
    return self.round

  def round(self, w: jax.Array, activation: ActQuant | None = None) -> QArray:
    """Traceable round-to-nearest (no checks on values): w (K, N) -> QArray (see round_to_qarray)."""
    return round_to_qarray(w, self, activation)

  def groups(self, shape: tuple[int, int]) -> tuple[int, int]:
    """(k_group, n_group) block sizes for a weight of this shape."""
    k, n = shape
    if self.granularity == "tensor":
      return k, n
    if self.granularity == "channel":
      return k, 1
    if self.granularity == "group":
      return min(self.group_size, k), 1
    return k, min(self.group_size, n)


def _group_reduce(w: jax.Array, k_group: int, n_group: int, reduce) -> jax.Array:
  """Reduce each (k_group, n_group) block of w (K, N) -> (groups_k, groups_n); edge padding keeps min/max exact."""
  k, n = w.shape
  groups_k, groups_n = group_grid((k, n), k_group, n_group)
  padded = jnp.pad(w, ((0, groups_k * k_group - k), (0, groups_n * n_group - n)), mode="edge")
  blocks = padded.reshape(groups_k, k_group, groups_n, n_group)
  return reduce(blocks, axis=(1, 3))


@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "k_group", "n_group"))
def weight_values(w: jax.Array, *, bits: int, symmetric: bool, k_group: int, n_group: int):
  """Round-to-nearest signed values for w (K, N) float.

  Returns (values (K, N) int32 in [-2^(bits-1), 2^(bits-1)), scale (groups_k, groups_n) f32, zero same shape f32
  or None); w ~ (values - zero) * scale.
  Symmetric: scale = absmax / (2^(bits-1) - 1), values = clip(round(w / scale), -qmax, qmax).
  Asymmetric: the range [min(w, 0), max(w, 0)] maps onto [-2^(bits-1), 2^(bits-1) - 1] with an integer zero point.
  An all-zero group gets scale 1 (values decode to exact zeros, never NaN).
  """
  w = w.astype(jnp.float32)
  shape = w.shape
  half = 1 << (bits - 1)
  if symmetric:
    qmax = half - 1
    absmax = _group_reduce(jnp.abs(w), k_group, n_group, jnp.max)
    scale = jnp.where(absmax > 0, absmax / qmax, jnp.float32(1.0))
    full_scale = expand_groups(scale, shape, k_group, n_group)
    values = jnp.clip(jnp.round(w / full_scale), -qmax, qmax).astype(jnp.int32)
    return values, scale, None
  levels = (1 << bits) - 1
  low = jnp.minimum(_group_reduce(w, k_group, n_group, jnp.min), 0.0)
  high = jnp.maximum(_group_reduce(w, k_group, n_group, jnp.max), 0.0)
  scale = jnp.where(high > low, (high - low) / levels, jnp.float32(1.0))
  zero = jnp.clip(jnp.round(-low / scale), 0, levels) - half
  full_scale = expand_groups(scale, shape, k_group, n_group)
  full_zero = expand_groups(zero, shape, k_group, n_group)
  values = jnp.clip(jnp.round(w / full_scale) + full_zero, -half, half - 1).astype(jnp.int32)
  return values, scale, zero


_all_finite = jax.jit(lambda a: jnp.all(jnp.isfinite(a)))


def check_finite(w, path: str) -> None:
  """Raise naming the parameter when a weight holds NaN or Inf (quantizing it would poison every scale)."""
  if bool(_all_finite(w)):  # on the device: a sharded weight is not gathered unless it is bad
    return
  array = np.asarray(w)
  if not np.all(np.isfinite(array)):
    bad = np.argwhere(~np.isfinite(array))
    where = tuple(int(i) for i in bad[0])
    raise ValueError(
        f"parameter {path or '<unnamed>'} has {len(bad)} NaN/Inf value(s) (first at index {where}); "
        "quantization refuses it: fix or reload the checkpoint")


def check_kernel(w, path: str) -> None:
  """Raise naming the parameter unless w is a 2-D (in, out) kernel of finite values."""
  if getattr(w, "ndim", None) != 2:
    raise ValueError(f"parameter {path or '<unnamed>'}: expected a 2-D (in, out) kernel, got shape "
                     f"{getattr(w, 'shape', None)}")
  check_finite(w, path)


def quantize_weight(w: jax.Array, config: WeightQuant, path: str = "",
                    activation: ActQuant | None = None) -> QArray:
  """w (K, N) float -> QArray with really packed codes. `path` names the parameter in errors."""
  return config.quantize(w, path=path, activation=activation)


def round_to_qarray(w: jax.Array, config: WeightQuant, activation: ActQuant | None = None) -> QArray:
  """The traceable core of quantize_weight (no checks on values): w (K, N) -> QArray, codes stored (N, K)."""
  k_group, n_group = config.groups(tuple(w.shape))
  values, scale, zero = weight_values(
      w, bits=config.bits, symmetric=config.symmetric, k_group=k_group, n_group=n_group)
  return QArray(
      packed=pack(values.T, config.bits), scale=scale, zero=zero, activation=activation,
      shape=tuple(int(d) for d in w.shape), bits=config.bits, k_group=k_group, n_group=n_group)


def fake_quant_weight(w: jax.Array, config: WeightQuant) -> jax.Array:
  """Quantize-dequantize w with a straight-through gradient (identity backward), for optax loops."""
  k_group, n_group = config.groups(tuple(w.shape))
  values, scale, zero = weight_values(
      w, bits=config.bits, symmetric=config.symmetric, k_group=k_group, n_group=n_group)
  full_scale = expand_groups(scale, w.shape, k_group, n_group)
  offset = jnp.float32(0) if zero is None else expand_groups(zero, w.shape, k_group, n_group)
  dequantized = (values.astype(jnp.float32) - offset) * full_scale
  return w + jax.lax.stop_gradient(dequantized.astype(w.dtype) - w)


def quantize_tokens(x: jax.Array, bits: int = 8) -> tuple[jax.Array, jax.Array]:
  """Token-wise dynamic quantization: x (..., K) float -> (int8 (..., K), scale (..., 1) float32).

  One absmax scale per token (row); an all-zero token gets scale 1.
  """
  qmax = (1 << (bits - 1)) - 1
  x = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / qmax, jnp.float32(1.0))
  return jnp.clip(jnp.round(x / scale), -qmax, qmax).astype(jnp.int8), scale


def quantize_tensor_static(x: jax.Array, scale: jax.Array, bits: int = 8, zero: jax.Array | None = None
                           ) -> jax.Array:
  """Per-tensor static quantization with a calibrated () scale: x (..., K) float -> int8 (..., K).

  zero None: symmetric, clip(round(x / scale), -(2^(bits-1) - 1), 2^(bits-1) - 1).
  zero given (a () integer-valued float): asymmetric codes u = clip(round(x / scale) + zero, 0, 2^bits - 1),
  returned shifted to signed, u - 2^(bits-1), so that they fit an int8 container for any bits <= 8 (the integer
  matmul adds the shift back through the weights' column sums, see ops._int_dot).
  """
  if zero is None:
    qmax = (1 << (bits - 1)) - 1
    return jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -qmax, qmax).astype(jnp.int8)
  codes = asymmetric_codes(x, scale, zero, bits)
  return (codes - jnp.float32(1 << (bits - 1))).astype(jnp.int8)


def asymmetric_codes(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
  """Unsigned asymmetric codes clip(round(x / scale) + zero, 0, 2^bits - 1) as float32 (integer values).
  scale and zero broadcast against x: () for layer-wise, (K,) for per-channel quantization."""
  levels = jnp.float32((1 << bits) - 1)
  return jnp.clip(jnp.round(x.astype(jnp.float32) / scale) + zero, 0.0, levels)


def static_scale_from_absmax(absmax: float, bits: int = 8) -> jax.Array:
  """The () float32 scale of per-tensor static activation quantization calibrated to an observed absmax."""
  qmax = (1 << (bits - 1)) - 1
  value = float(absmax) / qmax if absmax > 0 and math.isfinite(absmax) else 1.0
  return jnp.asarray(value, jnp.float32)


SOFTMAX_FORMS = ("uniform", "log_sqrt2", "log2")


@dataclasses.dataclass(frozen=True)
class SoftmaxQuant:
  """How attention probabilities P (values in [0, 1]) are quantized before P @ V. Frozen and hashable: it is a
  static attribute of the attention modules (models.llama.Attention / models.bert.SelfAttention.probs_quant).

  form "uniform":   b-bit unsigned codes u = clip(round(P / scale), 0, 2^b - 1), P^ = scale * u
                    (the naive baseline; scale defaults to 1 / (2^b - 1), the calibrated absmax of P being 1).
  form "log_sqrt2": RepQuant's calibration-time quantizer, A = round(-2 log2(P / scale)) (log base sqrt2);
                    codes 0 .. 2^b - 2 are levels, P^ = scale * 2^(-ceil(A/2)) * (1 + (sqrt2 - 1) [A odd])
                    = scale * sqrt2^(-A); the top code 2^b - 1 means P^ = 0 (taken by P = 0, e.g. masked keys,
                    and by every P below the smallest level), so that one b-bit code holds both.
  form "log2":      the same codes, reparameterized for inference into a log2 form (see `attend`): P @ V
                    is computed with exact powers of two 2^(-ceil(A/2)) (an exponent shift of V), split into the
                    even-code and odd-code partial sums; the odd partial sum gets the sqrt2 factor once, in the
                    epilogue (it is absorbed into that accumulator's scale, scale * sqrt2), never per element.
  scale: a Python float (static); probabilities never exceed 1, so 1.0 is the calibrated value for the log forms.
  """

  bits: int
  form: str
  scale: float | None = None

  def __post_init__(self):
    if self.form not in SOFTMAX_FORMS:
      raise ValueError(f"SoftmaxQuant.form must be one of {SOFTMAX_FORMS}, got {self.form!r}")
    if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
      raise ValueError(f"SoftmaxQuant.bits must be an integer in 2..8, got {self.bits!r}")
    if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
      raise ValueError(f"SoftmaxQuant.scale must be a positive finite float, got {self.scale!r}")

  @property
  def step(self) -> float:
    if self.scale is not None:
      return float(self.scale)
    return 1.0 / ((1 << self.bits) - 1) if self.form == "uniform" else 1.0

  @property
  def zero_code(self) -> int:
    """The log forms' code for P^ = 0."""
    return (1 << self.bits) - 1

  def codes(self, probs: jax.Array) -> jax.Array:
    """probs (...) float -> int32 codes (...) in [0, 2^bits - 1]."""
    p = probs.astype(jnp.float32)
    if self.form == "uniform":
      return jnp.clip(jnp.round(p / self.step), 0, (1 << self.bits) - 1).astype(jnp.int32)
    # -2 log2(0) = inf: P = 0 goes to the zero code with everything below the smallest level.
    raw = jnp.round(-2.0 * jnp.log2(jnp.maximum(p, jnp.float32(0.0)) / self.step))
    levels = jnp.clip(raw, 0.0, float(self.zero_code - 1))
    return jnp.where(raw > self.zero_code - 1, self.zero_code, levels).astype(jnp.int32)

  def dequantize(self, codes: jax.Array) -> jax.Array:
    """codes -> P^ (float32), the calibration-time form (log_sqrt2 and log2 share codes and values)."""
    if self.form == "uniform":
      return codes.astype(jnp.float32) * jnp.float32(self.step)
    exponent = (codes + 1) // 2  # ceil(A / 2) for A >= 0
    odd = (codes % 2) == 1
    value = jnp.float32(self.step) * jnp.exp2(-exponent.astype(jnp.float32))
    value = value * jnp.where(odd, jnp.float32(math.sqrt(2.0)), jnp.float32(1.0))
    return jnp.where(codes == self.zero_code, jnp.float32(0.0), value)

  def fake(self, probs: jax.Array) -> jax.Array:
    """Quantize-dequantize with a straight-through gradient (for reconstruction through attention)."""
    probs = probs.astype(jnp.float32)
    return probs + jax.lax.stop_gradient(self.dequantize(self.codes(probs)) - probs)

  def attend(self, probs: jax.Array, v: jax.Array, spec: str) -> jax.Array:
    """einsum(spec, P^, v) with P^ the quantized probs. `spec` is the attention's P @ V einsum, e.g.
    "bhts,bshd->bthd". The log2 form never multiplies by a non-power-of-two inside the sum: with A = 2e or
    A = 2e - 1 (e = ceil(A/2)), sqrt2^(-A) = 2^(-e) for even A and sqrt2 * 2^(-e) for odd A, so
      P^ @ V = scale * (sum_{A even} 2^(-e) V + sqrt2 * sum_{A odd} 2^(-e) V),
    and 2^(-e) V is V with its exponent lowered by e (jnp.ldexp; a right shift on integer V codes)."""
    if self.form != "log2":
      return jnp.einsum(spec, self.fake(probs), v)
    codes = jax.lax.stop_gradient(self.codes(probs))
    exponent = (codes + 1) // 2
    odd = (codes % 2) == 1
    live = codes != self.zero_code
    power = jnp.ldexp(jnp.float32(1.0), -exponent)  # exactly 2^(-e), no rounding
    even_part = jnp.einsum(spec, jnp.where(live & ~odd, power, jnp.float32(0.0)), v)
    odd_part = jnp.einsum(spec, jnp.where(live & odd, power, jnp.float32(0.0)), v)
    return jnp.float32(self.step) * (even_part + jnp.float32(math.sqrt(2.0)) * odd_part)
