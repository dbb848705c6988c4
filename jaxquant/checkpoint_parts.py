"""Writing a checkpoint one part at a time (format version 2), e.g. by jaxquant.streaming one block at a time:

  <directory>/jaxquant.json   the manifest (checkpoint_manifest), plus "layout": "parts" and "parts"
  <directory>/parts/<name>/   one orbax StandardCheckpointer item per part ("embed", "layers.0", ..., "head")

checkpoint.restore reads it like any checkpoint.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import shutil
import uuid
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxquant import formats
from jaxquant.checkpoint import check_destination, replace_directory
from jaxquant.checkpoint_manifest import (
    FORMAT, METADATA_FILE, PART_NAME, PARTS_DIR, PARTS_FORMAT_VERSION, CheckpointError, encode_leaf, is_format,
    library_versions, write_metadata)
from jaxquant.rules import path_str


def flat_leaves(state, prefix: str = "") -> dict[str, Any]:
  """nnx state (or any pytree of arrays and quantized formats) -> {prefix + leaf path: array or format}, the
  leaves PartWriter.write takes (e.g. a block's state with prefix "layers.3.")."""
  return {prefix + path_str(key_path): leaf
          for key_path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_format)}




class PartWriter:
  """Write a checkpoint one part at a time, so that only one part's arrays need to be in memory.

    with PartWriter(directory, recipe_name=..., source=...) as writer:
      writer.write("embed", {"embed.embedding": array})
      writer.write("layers.0", {"layers.0.attn.q_proj.kernel": qarray, ...})   # paths as in nnx.state(model)
      ...
  Each part is saved (and waited for) by orbax under parts/<name> of a hidden sibling directory; leaving the
  `with` block normally writes jaxquant.json (version 2) and renames the directory into place atomically, as
  `save` does; an exception leaves any previous checkpoint at `directory` untouched and removes the partial one.
  The result restores with `restore` like any checkpoint (sha256 of every array checked).
  """

  def __init__(self, directory, *, recipe_name: str, source: dict, overwrite: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    try:
      json.dumps(source)
    except (TypeError, ValueError) as err:
      raise CheckpointError(f"cannot save to {self.directory}: `source` must be JSON-serializable ({err})") from None
    check_destination(self.directory, recipe_name, source, overwrite)
    self.recipe_name, self.source = recipe_name, source
    self.leaves: dict[str, dict] = {}
    self.parts: dict[str, list[str]] = {}
    self._tag = uuid.uuid4().hex[:12]
    self.directory.parent.mkdir(parents=True, exist_ok=True)
    self._tmp = self.directory.parent / f".{self.directory.name}.jaxquant-tmp-{self._tag}"
    self._tmp.mkdir()
    (self._tmp / PARTS_DIR).mkdir()
    self._checkpointer = ocp.StandardCheckpointer()

  def write(self, part: str, leaves: Mapping[str, Any]) -> int:
    """Save one part: leaf path -> array or quantized format. Returns the bytes of its arrays."""
    if not PART_NAME.fullmatch(part):
      raise CheckpointError(f"cannot save part {part!r} to {self.directory}: part names are letters, digits, "
                            f"'_', '.' and '-'")
    if part in self.parts:
      raise CheckpointError(f"cannot save part {part!r} to {self.directory}: it was already written")
    arrays: dict[str, Any] = {}
    entries = {}
    for path, leaf in leaves.items():
      if path in self.leaves or path in entries:
        raise CheckpointError(f"cannot save part {part!r} to {self.directory}: leaf {path} was already written")
      entries[path] = encode_leaf(path, leaf, arrays)
    self._checkpointer.save(self._tmp / PARTS_DIR / part, arrays)
    self._checkpointer.wait_until_finished()
    self.leaves |= entries
    self.parts[part] = list(arrays)
    return sum(int(np.prod(np.shape(a))) * jnp.dtype(a.dtype).itemsize for a in arrays.values())

  def commit(self) -> pathlib.Path:
    """Write the manifest last and move the checkpoint into place."""
    self._checkpointer.close()
    meta = {"format": FORMAT, "format_version": PARTS_FORMAT_VERSION, "weight_format": formats.WEIGHT_FORMAT_VERSION,
            "recipe": self.recipe_name,
            "source": self.source, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(), "layout": "parts", "parts": self.parts, "leaves": self.leaves}
    write_metadata(self._tmp / METADATA_FILE, meta)
    replace_directory(self._tmp, self.directory, self._tag)
    return self.directory

  def abort(self) -> None:
    self._checkpointer.close()
    shutil.rmtree(self._tmp, ignore_errors=True)

  def __enter__(self) -> "PartWriter":
    return self

  def __exit__(self, kind, value, traceback) -> None:
    if kind is None:
      try:
        self.commit()
      except BaseException:
        shutil.rmtree(self._tmp, ignore_errors=True)
        raise
    else:
      self.abort()
