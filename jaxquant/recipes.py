"""The named recipes: one ordered registry of every method's `Recipe` objects, looked up, listed and described.

Each method module defines its recipes as a module-level `RECIPES` tuple and knows nothing of this registry; this
module imports each one explicitly, in the order `jaxquant recipes` shows them (grouped by method and paper).
A name with a "-g<N>" suffix (e.g. "zeroquant-w8a8-g64") is the named recipe with group size N on every group-wise
rule (rules.with_group_size); a recipe without group-wise rules refuses it.
"""

from __future__ import annotations

import dataclasses
import re
import textwrap

from flax import nnx

from jaxquant.methods import bcq, lkd_formats, repquant, zeroquant
from jaxquant.quantizers import WeightQuant
from jaxquant.rules import BLOCK_LINEARS, Recipe, Rule, is_group_wise, with_group_size

BASELINES: tuple[Recipe, ...] = (
    Recipe("fp", "full precision (float32); the reference every other recipe is compared with"),
    Recipe("w8a8-per-tensor",
           "naive PTQ baseline: int8 weights with one scale per tensor, int8 activations with one static scale per "
           "tensor calibrated (absmax) on calibration text; every block linear",
           (Rule(BLOCK_LINEARS, WeightQuant(bits=8, symmetric=True, granularity="tensor"), activation="tensor"),)),
)


@dataclasses.dataclass(frozen=True)
class Group:
  """The recipes of one method, as `jaxquant recipes` lists them under a heading."""
  title: str
  recipes: tuple[Recipe, ...]


GROUPS: tuple[Group, ...] = (
    Group("Baselines: float reference and naive round-to-nearest W8A8", BASELINES),
    Group("ZeroQuant (Yao et al., NeurIPS 2022): W8A8, W4/8 and layer-by-layer distillation (LKD)",
          zeroquant.RECIPES),
    Group("LUT-GEMM (Park et al., ICLR 2024): binary-coding (BCQ) weights, with round-to-nearest baselines",
          bcq.RECIPES),
    Group("Layer-wise distillation over any weight format: ZeroQuant's LKD training BCQ and uniform formats' own "
          "parameters", lkd_formats.RECIPES),
    Group("RepQuant (Li et al., 2024): reparameterized W4A4 / W6A6 / W8A8, ablations and naive PTQ baselines",
          repquant.RECIPES),
)

RECIPES: dict[str, Recipe] = {recipe.name: recipe for group in GROUPS for recipe in group.recipes}
assert len(RECIPES) == sum(len(group.recipes) for group in GROUPS), "two recipes share a name"

LINE_WIDTH = 118  # one line a recipe in `jaxquant recipes` and the commands' --help


def get_recipe(name: str) -> Recipe:
  """A registered recipe by name; a "-g<N>" suffix (e.g. "zeroquant-w8a8-kgroup-g64") sets its group size."""
  suffix = re.fullmatch(r"(.+)-g(\d+)", name)
  if name not in RECIPES and suffix and suffix.group(1) in RECIPES:
    return with_group_size(RECIPES[suffix.group(1)], int(suffix.group(2)))
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}: choose one of {sorted(RECIPES)}")
  return RECIPES[name]


def restore_template(model: nnx.Module, recipe_name: str) -> nnx.Module:
  """What checkpoint.restore needs to restore a model quantized by `recipe_name` from float `model`: the float
  model itself, unless the recipe's procedure changes the graph (RepQuant adds modules and biases) and says how
  to build that graph (`procedure.template(model)`). Unknown recipe names (made by other code) use `model`."""
  try:
    recipe = get_recipe(recipe_name)
  except (KeyError, ValueError):
    return model
  template = getattr(recipe.procedure, "template", None)
  return template(model) if template is not None else model


def _first_clause(description: str, width: int) -> str:
  """The description up to its first ';' (or ': ' detail), cut at a word to fit `width`."""
  text = " ".join(description.split(";")[0].split())
  return text if len(text) <= width else textwrap.shorten(text, width, placeholder=" ...")


def listing() -> str:
  """Every recipe, one line each under its method's heading; the name column fits the longest name."""
  name_width = max(len(name) for name in RECIPES) + 2
  lines = []
  for group in GROUPS:
    lines.append(f"{group.title}:")
    lines += [f"  {recipe.name:<{name_width}}{_first_clause(recipe.description, LINE_WIDTH - name_width - 2)}"
              for recipe in group.recipes]
  lines.append("Append -g<N> to a name with group-wise weights to set its group size (e.g. zeroquant-w8a8-g64).")
  lines.append("`jaxquant recipes NAME` prints a recipe's whole description, rules, bits and group size.")
  return "\n".join(lines)


def _weight_text(weight) -> str:
  """One rule's weight scheme in words."""
  if isinstance(weight, WeightQuant):
    kind = f"int{weight.bits} {'symmetric' if weight.symmetric else 'asymmetric'}"
    where = {"tensor": "one scale per tensor", "channel": "one scale per output channel",
             "group": f"groups of {weight.group_size} along the input dim",
             "row_block": f"row blocks of {weight.group_size} output channels"}[weight.granularity]
    return f"{kind}, {where}"
  fields = {f.name: getattr(weight, f.name) for f in dataclasses.fields(weight)} if dataclasses.is_dataclass(weight) \
      else {}
  return f"{type(weight).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def describe(name: str) -> str:
  """A recipe's details: its heading, full description, rules, procedure, calibration and group-size suffix."""
  recipe = get_recipe(name)
  base = RECIPES.get(name) or RECIPES[re.fullmatch(r"(.+)-g\d+", name).group(1)]
  group = next(g for g in GROUPS if base in g.recipes)
  lines = [recipe.name, f"  method: {group.title}"]
  lines += textwrap.wrap(recipe.description, LINE_WIDTH, initial_indent="  ", subsequent_indent="  ",
                         break_on_hyphens=False, break_long_words=False)
  if recipe.rules:
    lines.append("  rules (the first whose pattern matches a parameter path decides):")
    for rule in recipe.rules:
      activation = {None: "float (weight-only)", "token": f"int{rule.activation_bits}, one dynamic scale per token",
                    "token_group": f"int{rule.activation_bits}, one dynamic scale per token and K-group",
                    "tensor": f"int{rule.activation_bits}, one static scale per tensor (calibrated)"}[rule.activation]
      lines += [f"    {rule.pattern}", f"      weights: {_weight_text(rule.weight)}", f"      activations: {activation}"]
  else:
    lines.append("  rules: none" + ("" if recipe.procedure else " (the float model itself)"))
  if recipe.procedure is not None:
    lines.append(f"  procedure: {recipe.procedure!r}")
  lines.append(f"  calibration text: {'read (--calib-text)' if recipe.needs_calibration else 'not needed'}")
  sizes = sorted({rule.weight.group_size for rule in recipe.rules if is_group_wise(rule.weight)})
  lines.append(f"  -g<N> suffix: sets the group size (now {', '.join(map(str, sizes))}), e.g. {base.name}-g64"
               if sizes else "  -g<N> suffix: refused (no group-wise rule)")
  return "\n".join(lines)
