"""What every source shares: SourceError, FileTensor (where one state leaf lives in a file) and Source.

A Source is a config, a name table (state path -> FileTensor, in part order) and a reader, a file-format
object with `read(name, shape) -> float32 array` (raising SourceError naming the file and the tensor when it is
missing, misshapen or not finite), `release()` and `close()`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np


class SourceError(ValueError):
  """A checkpoint that cannot be read: names the file and the key or tensor at fault."""


@dataclasses.dataclass(frozen=True)
class FileTensor:
  """Where one state leaf is stored: the file's tensor name and how to bring it to the leaf's layout."""
  name: str
  shape: tuple[int, ...]       # the leaf's shape (kernels (in, out))
  transpose: bool = False      # the file holds the leaf transposed (linears stored (out, in))
  rope_heads: int = 0          # > 0: rows in llama.cpp's q/k order over this many heads, un-permuted
  tied: bool = False           # a copy of another leaf (a tied head): models make their own


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's q/k row permutation. w: (n_heads*hd, in) in GGUF order -> same shape, HF order.

  llama.cpp's converter did w.reshape(n_heads, 2, hd//2, in).swapaxes(1, 2) (interleaving the two halves of
  each head); this is its inverse.
  """
  out_features, in_features = w.shape
  hd = out_features // n_heads
  return w.reshape(n_heads, hd // 2, 2, in_features).swapaxes(1, 2).reshape(out_features, in_features)


def name_table(shapes: Mapping[str, tuple[int, ...]], top: Mapping[str, str], block: Mapping[str, str],
               block_prefix: str, tied: bool = False, rope_heads: Mapping[str, int] | None = None
               ) -> dict[str, FileTensor]:
  """State path -> FileTensor for every leaf of `shapes` (a model's weight_shapes), in its order: `top` names the
  leaves outside the blocks, `block` those inside layers.<i>. (stored inside `block_prefix`<i>.). Every kernel
  is stored transposed; `rope_heads`: block leaves whose rows are in llama.cpp's q/k order; `tied`: the head
  (lm_head.kernel) is the embedding (embed.embedding), transposed."""
  rope_heads = rope_heads or {}
  table = {}
  for path, shape in shapes.items():
    if path.startswith("layers."):
      index, leaf = path.split(".", 2)[1:]
      table[path] = FileTensor(f"{block_prefix}{index}.{block[leaf]}", shape, path.endswith(".kernel"),
                               rope_heads.get(leaf, 0))
    elif path == "lm_head.kernel" and tied:
      table[path] = FileTensor(top["embed.embedding"], shape, transpose=True, tied=True)
    else:
      table[path] = FileTensor(top[path], shape, transpose=path.endswith(".kernel"))
  return table


def part_of(path: str) -> str:
  """The part a state path belongs to: "layers.<i>", "head" (final norm, lm_head) or "embed" (the rest)."""
  parts = path.split(".")
  if parts[0] == "layers":
    return f"layers.{parts[1]}"
  return "head" if parts[0] in ("norm", "lm_head") else "embed"


class Source:
  """A checkpoint readable by state path. `family`, `config`, `description` (stored with checkpoints made from
  it); `part(name)` -> state path -> float32 numpy; `parts()` all of them in order; `weights()` all at once."""

  def __init__(self, family: str, config: Any, table: Mapping[str, FileTensor], reader, description: dict):
    self.family, self.config, self.table, self.description = family, config, dict(table), description
    self._reader = reader
    self._parts: dict[str, list[str]] = {}
    for path in self.table:
      self._parts.setdefault(part_of(path), []).append(path)

  def part_names(self) -> list[str]:
    return list(self._parts)

  def part(self, name: str) -> dict[str, np.ndarray]:
    """One part's leaves, float32 in the leaves' layout (fresh arrays: nothing of the file stays mapped)."""
    return {path: self._read(self.table[path]) for path in self._parts[name]}

  def _read(self, entry: FileTensor) -> np.ndarray:
    array = self._reader.read(entry.name, entry.shape[::-1] if entry.transpose else entry.shape)
    if entry.rope_heads:
      array = unpermute_rope(array, entry.rope_heads)
    return np.ascontiguousarray(array.T) if entry.transpose else array

  def parts(self) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """(part name, its leaves) in order, one part at a time; the reader drops each part's pages after it."""
    for name in self.part_names():
      floats = self.part(name)
      self.release()
      yield name, floats

  def weights(self) -> dict[str, jax.Array]:
    """Every leaf but tied copies, as float32 jax arrays of their own: each is converted as soon as it is read,
    so loading holds about one model, not a numpy model and its jax copy at once."""
    weights = {}
    for name in self.part_names():
      for path in self._parts[name]:
        if not self.table[path].tied:
          weights[path] = jnp.array(self._read(self.table[path]), dtype=jnp.float32)
      self.release()
    return weights

  def release(self) -> None:
    """Drop whatever the reader still holds of the part just read."""
    self._reader.release()

  def close(self) -> None:
    """Release the files."""
    self._reader.close()

  def __enter__(self) -> "Source":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
