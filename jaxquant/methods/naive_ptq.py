"""The naive PTQ baseline RepQuant is measured against: per-channel symmetric round-to-nearest weights, per-tensor
static symmetric activations (absmax on calibration tokens), uniform softmax quantization, on the same integer
path as RepQuant's models."""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from jaxquant.methods import blockwise
from jaxquant.methods.repquant_core import RepQuantError
from jaxquant.quantizers import SoftmaxQuant, WeightQuant
from jaxquant.rules import BLOCK_LINEARS, Rule, quantize_tree


def set_softmax_quant(model: nnx.Module, probs_quant: SoftmaxQuant | None) -> nnx.Module:
  """The model (modified in place, returned) with every attention module's probs_quant set."""
  for _, node in nnx.iter_graph(model):
    if hasattr(node, "probs_quant"):  # models.protocol: an attention whose probabilities can be quantized
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
    batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calibration]
    absmax = blockwise.input_absmax(model, batches, progress=progress)
    bad = [name for name, value in absmax.items() if not math.isfinite(value)]
    if bad:
      raise RepQuantError(f"calibration activations entering {bad[0]} hold NaN/Inf: the naive PTQ baseline "
                          "cannot set a scale; check the float model and the calibration tokens")
    graphdef, state = nnx.split(model)
    out = nnx.merge(graphdef, quantize_tree(state, self.rules(), absmax, progress=progress))
    return set_softmax_quant(out, SoftmaxQuant(self.act_bits, "uniform"))
