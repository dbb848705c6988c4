"""Module surgery on NNX models: find sub-modules by path, replace them, record what enters them.

Paths are dotted module paths as `nnx.iter_graph` gives them ("layers.3.attn.q_proj"); a Linear's kernel leaf is
path + ".kernel". Every method that rewrites a model's modules (LKD's students, RepQuant's folds, sharded kernels)
or records the inputs of its linears (static activation scales, BCQ's activation weights, RepQuant's clipping)
does it through these functions, which never modify the module they are given.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
from flax import nnx

from jaxquant.models.layers import Linear

RECORDED = "recorded_input"  # the nnx.Intermediate name an InputRecorder sows under


def dotted(path: Iterable[Any]) -> str:
  """("layers", 3, "attn") -> "layers.3.attn"."""
  return ".".join(str(p) for p in path)


def get(module: nnx.Module, path: str) -> Any:
  """The sub-module (or attribute) at a dotted path; "" is the module itself."""
  for part in path.split(".") if path else ():
    module = module[int(part)] if part.isdigit() else getattr(module, part)
  return module


def put(module: nnx.Module, path: str, value: Any) -> None:
  """Set the sub-module at a dotted path of `module` (in place: callers pass a clone)."""
  parent_path, _, name = path.rpartition(".")
  parent = get(module, parent_path)
  if name.isdigit():
    parent[int(name)] = value
  else:
    setattr(parent, name, value)


def modules(module: nnx.Module, kind: type = Linear) -> dict[str, Any]:
  """Dotted path -> every sub-module of type `kind` (Linear by default), in graph order."""
  return {dotted(path): node for path, node in nnx.iter_graph(module) if isinstance(node, kind)}


def replace(module: nnx.Module, fn: Callable[[str, Any], Any], kind: type = Linear,
            where: Callable[[str], bool] = lambda path: True) -> nnx.Module:
  """A copy of `module` (nothing shared with it) in which every sub-module of type `kind` at a path `where` accepts
  is replaced by fn(path, that sub-module)."""
  out = nnx.clone(module)
  for path, node in modules(out, kind).items():
    if where(path):
      put(out, path, fn(path, node))
  return out


def replace_linears(module: nnx.Module, where: Callable[[str], bool], fn: Callable[[str, Linear], Any]
                    ) -> nnx.Module:
  """A copy of `module` whose Linears at paths `where` accepts are fn(path, linear)."""
  return replace(module, fn, Linear, where)


class InputRecorder(nnx.Module):
  """Wraps a module and sows reduce(x) of the input x it is called with (an nnx.Intermediate named RECORDED).
  reduce is a static function (e.g. the absmax, the per-feature sum of squares, or the identity)."""

  def __init__(self, inner: nnx.Module, reduce: Callable[[jax.Array], Any]):
    self.inner = inner
    self.reduce = reduce

  def __call__(self, x: jax.Array, *args, **kwargs):
    self.sow(nnx.Intermediate, RECORDED, self.reduce(x))
    return self.inner(x, *args, **kwargs)


def identity(x: jax.Array) -> jax.Array:
  return x


def recording(module: nnx.Module, paths: Iterable[str], reduce: Callable[[jax.Array], Any] = identity
              ) -> nnx.Module:
  """A copy of `module` whose sub-modules at `paths` record reduce(their input) when called."""
  wanted = set(paths)
  out = replace(module, lambda path, node: InputRecorder(node, reduce), nnx.Module, lambda path: path in wanted)
  found = {path for path, node in modules(out, InputRecorder).items()}
  if found != wanted:
    raise ValueError(f"no module at {sorted(wanted - found)[:3]} to record the input of")
  return out


def recorded(sown) -> dict[str, list]:
  """What the recorders sowed (the state `nnx.capture(..., nnx.Intermediate)` returns): path of the recorded
  module -> the values sown, one per call, in call order."""
  found: dict[str, list] = {}
  for path, value in jax.tree_util.tree_leaves_with_path(sown):
    module_path = jax.tree_util.keystr(path, simple=True, separator=".").split(f".{RECORDED}")[0]
    found.setdefault(module_path, []).append(value)
  return found
