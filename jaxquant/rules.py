"""Which parameter gets which scheme: rules on parameter paths, applied to a pytree; what a recipe is.

A path is the dotted string of a leaf's keys in the model state, e.g. "layers.3.mlp.up_proj.kernel".
The first rule whose regular expression matches (re.search) decides; a leaf no rule matches stays as it is.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Protocol

import jax
from tqdm import tqdm

from jaxquant.formats import ActQuant, is_qarray
from jaxquant.quantizers import static_scale_from_absmax

# Every linear inside a transformer block of either model family (llama decoder, BERT encoder).
BLOCK_LINEARS = r"(^|\.)layers\.\d+\.(attn|mlp)\.[a-z_]+\.kernel$"
ATTN_LINEARS = r"(^|\.)layers\.\d+\.attn\.[a-z_]+\.kernel$"
MLP_LINEARS = r"(^|\.)layers\.\d+\.mlp\.[a-z_]+\.kernel$"


@dataclasses.dataclass(frozen=True)
class Rule:
  """Quantize the leaves whose path matches `pattern` with `weight`; `activation` is None (weight-only),
  "token" (dynamic, one scale per token), "token_group" (per token and K-group) or "tensor" (static, calibrated).

  `weight` is a frozen quantizers.WeightConfig: its `quantize(w, path=..., activation=...)` returns a stored
  format (WeightQuant -> QArray here; the LUT-GEMM method's BCQ config -> BCQArray).
  """

  pattern: str
  weight: Any
  activation: str | None = None
  activation_bits: int = 8

  def __post_init__(self):
    if self.activation not in (None, "token", "token_group", "tensor"):
      raise ValueError(f"activation must be None, 'token', 'token_group' or 'tensor', got {self.activation!r}")
    re.compile(self.pattern)

  def activation_quant(self, path: str, act_absmax: Mapping[str, float] | None = None) -> ActQuant | None:
    """The ActQuant this rule asks for at `path` (a "tensor" rule reads its static scale from act_absmax)."""
    if self.activation in ("token", "token_group"):
      return ActQuant(bits=self.activation_bits, mode=self.activation)
    if self.activation == "tensor":
      if act_absmax is None or path not in act_absmax:
        raise ValueError(f"parameter {path}: static activation quantization needs calibration; none recorded")
      return ActQuant(bits=self.activation_bits, mode="tensor",
                      scale=static_scale_from_absmax(act_absmax[path], self.activation_bits))
    return None


class Procedure(Protocol):
  """A recipe's procedure: a method that is more than a rule pass (LKD, RepQuant, activation-aware BCQ).

  Required: procedure(model, recipe, calibration_batches, progress) -> quantized model (pipeline.quantize_model
  calls it). Optional hooks, looked up by name; a procedure without one takes no part in what it serves:
    settings() -> dict: what a checkpoint's source records of the run (a rerun with other settings is another
      model), e.g. {"lkd": {...}}
    calibration_from_text(tokenizer, text) -> batches: its own calibration windows (else the caller's default)
    configure(recipe, **options) -> Recipe: the recipe with other settings by name (the CLI's --lkd-steps /
      --lkd-resume pass steps= / checkpoint_dir=)
    template(model) -> model: the graph a checkpoint restores onto, where the procedure changes the float graph
    distills_blocks: True where it works one float block at a time (streaming feeds it blocks read from disk)
  """

  def __call__(self, model: Any, recipe: "Recipe", calibration: Any = None, progress: bool = True) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A named way to quantize a model.

  rules: applied by `quantize_tree` (round-to-nearest and friends).
  procedure: for methods that are more than a rule pass (LKD, reconstruction): called by
    pipeline.quantize_model as procedure(model, recipe, calibration_batches, progress) -> quantized model.
  uses_calibration: the procedure reads calibration batches.
  """

  name: str
  description: str
  rules: tuple[Rule, ...] = ()
  procedure: Procedure | None = None
  uses_calibration: bool = False

  @property
  def needs_calibration(self) -> bool:
    """Calibration text must be read before quantizing (static activation scales, or a data-driven method)."""
    return self.uses_calibration or any(rule.activation == "tensor" for rule in self.rules)


def path_str(path) -> str:
  """jax key path -> "layers.3.mlp.up_proj.kernel" (NNX's trailing ".value" dropped)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(key))
  if parts and parts[-1] == "value":
    parts.pop()
  return ".".join(parts)


def match(rules: tuple[Rule, ...], path: str) -> Rule | None:
  for rule in rules:
    if re.search(rule.pattern, path):
      return rule
  return None


def quantize_tree(tree: Any, rules: tuple[Rule, ...], act_absmax: Mapping[str, float] | None = None,
                  progress: bool = True) -> Any:
  """Pure: returns a new pytree with matching float leaves replaced by QArrays.

  act_absmax maps a kernel's path to the absmax of the activations entering that linear (for "tensor" rules).
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_qarray)
  todo = {path_str(p) for p, leaf in leaves if not is_qarray(leaf) and match(rules, path_str(p))}
  bar = tqdm(total=len(todo), desc="quantize", unit="w", disable=not progress or not todo, leave=False)

  def convert(path, leaf):
    name = path_str(path)
    if name not in todo:
      return leaf
    rule = match(rules, name)
    result = rule.weight.quantize(leaf, path=name, activation=rule.activation_quant(name, act_absmax))
    bar.update(1)
    return result

  try:
    return jax.tree_util.tree_map_with_path(convert, tree, is_leaf=is_qarray)
  finally:
    bar.close()


def is_group_wise(weight) -> bool:
  """Whether a rule's weight config has groups whose size a -g<N> suffix sets (group along K or row blocks; BCQ
  configs group along K)."""
  return (getattr(weight, "group_size", None) is not None
          and getattr(weight, "granularity", "group") in ("group", "row_block"))


def with_group_size(recipe: Recipe, group_size: int) -> Recipe:
  """The same recipe with every group-wise rule using another group size. A recipe with none (per-tensor or
  per-channel weights, or a procedure with its own settings) is refused: the size would change nothing."""
  if not any(is_group_wise(rule.weight) for rule in recipe.rules):
    raise ValueError(f"recipe {recipe.name!r} has no group-wise rule: a group size ({group_size}) would change "
                     f"nothing; drop the -g{group_size} suffix / --group-size")
  rules = tuple(
      dataclasses.replace(rule, weight=dataclasses.replace(rule.weight, group_size=group_size))
      if getattr(rule.weight, "group_size", None) is not None else rule
      for rule in recipe.rules)
  return dataclasses.replace(recipe, name=f"{recipe.name}-g{group_size}", rules=rules)


