"""LUT-GEMM's weight formats as rule configs and recipes: binary-coding quantization (BCQ) and uniform-as-BCQ.

`BCQQuant` fits W ~ sum_i alpha_i B_i (+ offset) group-wise along the input dim (the array math is in
`bcq_core`) and stores a `formats.BCQArray`: q packed sign planes (1 bit a weight each) plus alpha (and offset)
in `scale_dtype` (float16 by default: the paper's storage; float32 alphas would cost 32 q / g bits a weight).
`UniformAsBCQ` is round-to-nearest asymmetric uniform quantization converted exactly to the same format, so that
one kernel (pallas_kernels/weight_only_gemv_mgpu.py, via ops.qdot) serves both. Both are weight-only.

Stored bits a weight of a (K, N) kernel, group g, G = ceil(K / g) groups:
  q + 16 G (q [+ 1]) / K   (BCQ, float16 alpha [and offset]);  SmolLM2's K = 576 with g = 128 has G = 5,
  so BCQ q=3 without offset stores 3.42 bits a weight, with offset 3.56.

Recipes (`RECIPES`, registered by jaxquant.recipes; every linear of every block; embeddings and head stay float):
  rtn-w{2,3,4}-g{64,128}               uniform asymmetric round-to-nearest QArray (the baseline)
  lutgemm-bcq{2,3,4}-g{64,128}         BCQ, no offset, fit weighted by calibration activations (see below)
  lutgemm-bcq{2,3,4}-offset-g{64,128}  the same with a per-group offset
  lutgemm-bcq{2,3,4}-mse-g{64,128}     BCQ fit to the plain squared weight error (data-free, the paper's fit)
  lutgemm-uniform{3,4}-g{64,128}       uniform-as-BCQ (exact conversion of the RTN weights, float32 alpha/offset)

Why the default BCQ recipes read calibration text: the plain squared-error fit lowers SmolLM2's weight MSE by
about 25% against RTN at 3 bits but multiplies the largest error of a group by 3-7 (the least-squares alphas
clip the few large weights), and end to end it is far worse than RTN (alice29 perplexity 807 vs 107 on 1024
tokens, float 25.3). Weighing each input row k by E[x_k^2] (the diagonal of the output error E||x(W - W^)||^2,
`ActivationAwareBCQ`) keeps what the activations need: 51.8 on the same tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from jaxquant import formats
from jaxquant.formats import ActQuant, BCQArray
from jaxquant.methods import bcq_core, blockwise
from jaxquant.models.layers import Linear
from jaxquant.quantizers import WeightConfig, WeightQuant, check_kernel
from jaxquant.rules import BLOCK_LINEARS, Recipe, Rule, match, path_str, quantize_tree

BCQ_BITS = (1, 2, 3, 4)
SCALE_DTYPES = ("float16", "bfloat16", "float32")


def _check_group_size(group_size) -> None:
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
    raise ValueError(f"group_size must be a positive integer (rows of K per group; >= K for whole rows), "
                     f"got {group_size!r}")


def _check_weight(w, path: str, activation, what: str) -> None:
  name = path or "<unnamed>"
  if activation is not None:
    raise ValueError(f"parameter {name}: {what} is weight-only (activations stay float); the rule asks for "
                     f"activation quantization ({activation.mode}, {activation.bits} bits): use activation=None")
  check_kernel(w, path)


_pack_planes = jax.jit(formats.pack_planes)


@dataclasses.dataclass(frozen=True)
class BCQQuant(WeightConfig):
  """Binary-coding quantization of a (K, N) kernel, group-wise along K (LUT-GEMM's non-uniform format).

  bits: q, the number of binary planes (1..4).
  group_size: rows of K that share alphas (a shorter last group where it does not divide K; >= K: whole rows).
  rounds: alternating least-squares / nearest-code rounds after the start (0: the start alone).
  offset: also fit one offset per group and column (an extra 16 bits a group with float16).
  init: "both" (greedy and uniform-grid starts refined side by side, the better kept per group and column),
    "greedy" (the paper's start) or "uniform".
  scale_dtype: stored dtype of alpha and offset ("float16", "bfloat16" or "float32").
  """

  bits: int = 3
  group_size: int = 128
  rounds: int = 15
  offset: bool = False
  init: str = "both"
  scale_dtype: str = "float16"

  def __post_init__(self):
    if isinstance(self.bits, bool) or self.bits not in BCQ_BITS:
      raise ValueError(f"unsupported bits={self.bits!r} for BCQ: choose one of {BCQ_BITS} binary planes")
    _check_group_size(self.group_size)
    if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
      raise ValueError(f"rounds must be a non-negative integer, got {self.rounds!r}")
    if self.init not in bcq_core.INITS:
      raise ValueError(f"unknown init {self.init!r}: choose one of {bcq_core.INITS}")
    if self.scale_dtype not in SCALE_DTYPES:
      raise ValueError(f"unsupported scale_dtype {self.scale_dtype!r}: choose one of {SCALE_DTYPES}")

  def k_group(self, k: int) -> int:
    return min(self.group_size, k)

  def fit(self, w: jax.Array, row_weight: jax.Array | None = None):
    """bcq_core.fit with this config: (signs (q, K, N) bool, alpha, offset, errors per round)."""
    w = jnp.asarray(w)
    row_weight = None if row_weight is None else jnp.asarray(row_weight, jnp.float32)
    return bcq_core.fit(w, row_weight, q=self.bits, k_group=self.k_group(int(w.shape[0])), rounds=self.rounds,
                        use_offset=self.offset, init=self.init, scale_dtype=self.scale_dtype)

  def quantize(self, w: jax.Array, path: str = "", activation: ActQuant | None = None,
               row_weight: jax.Array | None = None) -> BCQArray:
    """The rules' entry point: w (K, N) float -> BCQArray. `path` names the parameter in errors.

    row_weight: optional (K,) positive importance of each input row (see bcq_core.fit); None: plain squared error.
    """
    if row_weight is None:
      return super().quantize(w, path=path, activation=activation)
    return _RowWeighted(self, {path: row_weight}).quantize(w, path=path, activation=activation)

  def check(self, w, path: str = "", activation: ActQuant | None = None) -> None:
    _check_weight(w, path, activation, "BCQ (LUT-GEMM)")

  def quantizer(self, path: str = ""):
    return self.encode

  def encode(self, w: jax.Array, activation: ActQuant | None = None, row_weight: jax.Array | None = None
             ) -> BCQArray:
    """Traceable fit (no checks on values): w (K, N) -> BCQArray; activation must be None (checked by `check`)."""
    signs, alpha, offset, _ = self.fit(w, row_weight)
    return BCQArray(planes=_pack_planes(signs), alpha=alpha, offset=offset,
                    shape=tuple(int(d) for d in w.shape), k_group=self.k_group(int(w.shape[0])))

  def check_quantized(self, quantized: BCQArray, w, path: str = "") -> None:
    for name, value in (("alpha", quantized.alpha), ("offset", quantized.offset)):
      if value is not None and not bool(jnp.all(jnp.isfinite(value))):
        raise ValueError(f"parameter {path or '<unnamed>'}: BCQ {name} overflows {self.scale_dtype} "
                         f"(largest weight {float(jnp.max(jnp.abs(w))):.3g}); use scale_dtype='float32'")


@dataclasses.dataclass(frozen=True)
class UniformAsBCQ(WeightConfig):
  """Round-to-nearest uniform asymmetric q-bit quantization, group-wise along K, stored as a BCQArray.

  The conversion (formats.uniform_to_bcq) is exact: the BCQArray dequantizes to the same floats as the
  uniform QArray (alpha_i = (s/2) 2^i and the offset in float32).
  """

  bits: int = 4
  group_size: int = 128

  def __post_init__(self):
    if isinstance(self.bits, bool) or self.bits not in (2, 3, 4):
      raise ValueError(f"unsupported bits={self.bits!r} for uniform-as-BCQ: choose one of (2, 3, 4)")
    _check_group_size(self.group_size)

  def uniform(self) -> WeightQuant:
    return WeightQuant(bits=self.bits, symmetric=False, granularity="group", group_size=self.group_size)

  def check(self, w, path: str = "", activation: ActQuant | None = None) -> None:
    _check_weight(w, path, activation, "uniform-as-BCQ (LUT-GEMM)")

  def quantizer(self, path: str = ""):
    return self.encode

  def encode(self, w: jax.Array, activation: ActQuant | None = None) -> BCQArray:
    """Traceable (no checks on values): w (K, N) -> BCQArray; activation must be None (checked by `check`)."""
    return formats.uniform_to_bcq(self.uniform().round(w))


def _sum_of_squares_and_count(x: jax.Array) -> jax.Array:
  """(K + 1,): the sum over tokens of each squared input feature, then the token count."""
  flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  return jnp.concatenate([jnp.sum(flat * flat, axis=0), jnp.full((1,), flat.shape[0], jnp.float32)])


def input_mean_squares(model: nnx.Module, batches: Iterable[np.ndarray], kernels: Iterable[str],
                       progress: bool = True) -> dict[str, np.ndarray]:
  """kernel path ("layers.3.mlp.up_proj.kernel") -> (K,) mean over calibration tokens of each squared input
  feature of that linear (the diagonal of E[x^T x]); the model is untouched (blockwise.linear_input_stats)."""
  paths = [name[: -len(".kernel")] for name in kernels]
  stats = blockwise.linear_input_stats(model, batches, paths, _sum_of_squares_and_count, progress)
  out = {}
  for path, values in stats.items():
    total = np.sum([np.asarray(v, np.float64) for v in values], axis=0)
    out[f"{path}.kernel"] = (total[:-1] / total[-1]).astype(np.float32)
  return out


@dataclasses.dataclass(frozen=True)
class _RowWeighted(WeightConfig):
  """A rule's weight config with per-parameter row weights (an internal step of ActivationAwareBCQ).
  Its quantizer differs per parameter (a new one each call: jax.jit compiles it per parameter)."""

  config: BCQQuant
  row_weights: Mapping[str, np.ndarray]

  @property
  def group_size(self) -> int:
    return self.config.group_size

  def check(self, w, path: str = "", activation: ActQuant | None = None) -> None:
    self.config.check(w, path, activation)
    row_weight = np.asarray(self.row_weights[path], np.float32)
    if row_weight.shape != (w.shape[0],) or not np.all(np.isfinite(row_weight)) or not np.all(row_weight > 0):
      raise ValueError(f"parameter {path or '<unnamed>'}: row_weight must be {w.shape[0]} positive finite "
                       f"values, got shape {row_weight.shape}")

  def quantizer(self, path: str = ""):
    row_weight = np.asarray(self.row_weights[path], np.float32)
    return lambda w, activation=None: self.config.encode(w, activation, row_weight=row_weight)

  def check_quantized(self, quantized: BCQArray, w, path: str = "") -> None:
    self.config.check_quantized(quantized, w, path)


@dataclasses.dataclass(frozen=True)
class ActivationAwareBCQ:
  """Recipe procedure: BCQ whose fit weighs each input row k by E[x_k^2] over calibration tokens.

  Minimising sum_k E[x_k^2] (w_k - w^_k)^2 is the diagonal approximation of the output error
  E ||x (W - W^)||^2 that the model actually sees; the plain squared error treats a weight on a feature that
  carries huge activations like any other and, at 3 bits, clips the large weights that SmolLM2 relies on.
  Row weights are normalised per kernel and floored at `damp` times their mean (rows unseen in calibration
  still count a little). Rules whose weight config is not a BCQQuant are applied as they are.
  """

  damp: float = 0.01

  def row_weights(self, stats: np.ndarray) -> np.ndarray:
    mean = float(np.mean(stats))
    if not np.isfinite(mean) or mean <= 0:
      return np.ones_like(stats)
    return (stats / mean + self.damp).astype(np.float32)

  def __call__(self, model: nnx.Module, recipe: Recipe, calibration, progress: bool = True) -> nnx.Module:
    graphdef, state = nnx.split(model)
    kernels = [path_str(p) for p, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=formats.is_qarray)
               if not formats.is_qarray(leaf) and isinstance(getattr(match(recipe.rules, path_str(p)), "weight", None),
                                                              BCQQuant)]
    stats = input_mean_squares(model, calibration, kernels, progress=progress)
    weights = {name: self.row_weights(value) for name, value in stats.items()}
    rules = tuple(dataclasses.replace(rule, weight=_RowWeighted(rule.weight, weights))
                  if isinstance(rule.weight, BCQQuant) else rule for rule in recipe.rules)
    return nnx.merge(graphdef, quantize_tree(state, rules, progress=progress))


def bits_per_weight(w) -> float:
  """Stored bits a weight of a QArray / BCQArray (every array it holds: planes or codes, scales, offsets)."""
  return w.nbytes * 8 / (w.shape[0] * w.shape[1])


def _bcq_bits_text(q: int, g: int, offset: bool) -> str:
  k = 576  # SmolLM2's width: most block linears have K = 576
  groups = -(-k // g)
  return f"{q + 16 * groups * (q + offset) / k:.2f}"


_recipes: list[Recipe] = []
for _q in (2, 3, 4):
  for _g in (64, 128):
    _recipes.append(Recipe(
        f"rtn-w{_q}-g{_g}",
        f"round-to-nearest baseline: {_q}-bit uniform asymmetric weights, group {_g} along the input dim "
        f"(float32 scale and zero a group); every block linear; weight-only",
        (Rule(BLOCK_LINEARS, WeightQuant(bits=_q, symmetric=False, granularity="group", group_size=_g)),)))
_AWARE = ("fit weighted by each input feature's mean square on calibration text (calibration: --calib-text, "
          "default lcet10)")
for _q in (2, 3, 4):
  for _g in (64, 128):
    _recipes.append(Recipe(
        f"lutgemm-bcq{_q}-g{_g}",
        f"LUT-GEMM BCQ: W ~ sum of {_q} binary planes x float16 alphas per (group of {_g} along the input dim, "
        f"column), greedy and uniform starts + 15 alternating least-squares rounds, {_AWARE}; no offset "
        f"({_bcq_bits_text(_q, _g, False)} bits/weight at K=576); every block linear; weight-only",
        (Rule(BLOCK_LINEARS, BCQQuant(bits=_q, group_size=_g)),),
        procedure=ActivationAwareBCQ(), uses_calibration=True))
for _q in (2, 3, 4):
  for _g in (64, 128):
    _recipes.append(Recipe(
        f"lutgemm-bcq{_q}-offset-g{_g}",
        f"as lutgemm-bcq{_q}-g{_g} plus a float16 offset per group and column "
        f"({_bcq_bits_text(_q, _g, True)} bits/weight at K=576)",
        (Rule(BLOCK_LINEARS, BCQQuant(bits=_q, group_size=_g, offset=True)),),
        procedure=ActivationAwareBCQ(), uses_calibration=True))
for _q in (2, 3, 4):
  for _g in (64, 128):
    _recipes.append(Recipe(
        f"lutgemm-bcq{_q}-mse-g{_g}",
        f"as lutgemm-bcq{_q}-g{_g} ({_q} planes, group {_g}) but data-free: the fit minimises the plain squared "
        f"weight error (the paper's objective), which clips the largest weights "
        f"({_bcq_bits_text(_q, _g, False)} bits/weight at K=576)",
        (Rule(BLOCK_LINEARS, BCQQuant(bits=_q, group_size=_g)),)))
for _q in (3, 4):
  for _g in (64, 128):
    _recipes.append(Recipe(
        f"lutgemm-uniform{_q}-g{_g}",
        f"LUT-GEMM uniform-as-BCQ: rtn-w{_q}-g{_g} converted exactly to BCQ planes + float32 alphas and offset "
        f"(one LUT kernel for both formats); every block linear; weight-only",
        (Rule(BLOCK_LINEARS, UniformAsBCQ(bits=_q, group_size=_g)),)))
RECIPES: tuple[Recipe, ...] = tuple(_recipes)
