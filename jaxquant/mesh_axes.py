"""Device counts along a mesh's axes, and the error every layout refusal raises (ShardingError).

Shared by jaxquant.sharding (layouts) and jaxquant.ops (the sharded matmul); both name the parameter, the axis
and the fix in the message.
"""

from __future__ import annotations

import math

from jax.sharding import Mesh


class ShardingError(ValueError):
  """A parameter or batch cannot be laid out on the mesh as asked; the message names it, the axis and the fix."""


def axis_size(mesh: Mesh, entry) -> int:
  """Devices along one spec entry: None -> 1, a name -> its size, a tuple of names -> their product."""
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  for name in names:
    if name not in mesh.shape:
      raise ShardingError(f"mesh axis {name!r} is not in the mesh (axes {tuple(mesh.shape)})")
  return math.prod(mesh.shape[name] for name in names)
