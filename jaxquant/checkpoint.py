"""Save and restore quantized models: orbax array files plus a JSON manifest, written atomically.

A checkpoint is a directory:

  <directory>/jaxquant.json   metadata: the manifest (checkpoint_manifest: how each leaf is encoded, versions)
  <directory>/state/          orbax StandardCheckpointer files: a flat dict of arrays, one entry per stored array

or, written part by part (checkpoint_parts.PartWriter, format version 2), <directory>/parts/<name>/ instead of
state/, one orbax item per part. `restore` reads both layouts; given `shardings` (e.g.
sharding.leaf_shardings(mesh, rules)) it restores every array directly onto them, whatever mesh or device count
the checkpoint was written from.

No pickle anywhere: `restore` rebuilds the typed target from the manifest (jax.ShapeDtypeStructs; the format
classes are looked up by name among jaxquant.formats' dataclasses only), checks it against the caller's template
model, restores into it with orbax and merges the result with the template's graphdef.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import pathlib
import shutil
import sys
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxquant import formats
from jaxquant.checkpoint_manifest import (
    FORMAT, FORMAT_VERSION, METADATA_FILE, PARTS_DIR, PARTS_FORMAT_VERSION, STATE_DIR, CheckpointError,
    abstract_leaf, decode_leaf, digest, encode_state, is_format, library_versions, load_metadata, logical_shape,
    stored_arrays, write_metadata)
from jaxquant.rules import path_str


# ----------------------------------------------------------------------------------------------------------------
# save


def check_destination(directory: pathlib.Path, recipe_name: str, source: dict, overwrite: bool) -> None:
  """Refuse to replace anything that is not this same checkpoint, unless overwrite=True (and it is ours). Call it
  before a long quantization to fail before the work, not after."""
  if not directory.exists():
    return
  if not directory.is_dir():
    raise CheckpointError(f"cannot save to {directory}: it exists and is a file, not a checkpoint directory")
  if not (directory / METADATA_FILE).exists():
    if any(directory.iterdir()):
      raise CheckpointError(f"cannot save to {directory}: it exists, is not empty and is not a jaxquant checkpoint "
                            f"(no {METADATA_FILE}); refusing to replace it even with overwrite=True: choose another "
                            f"directory or remove it yourself")
    return
  try:
    old = load_metadata(directory)
  except CheckpointError as err:
    if overwrite:
      return
    raise CheckpointError(f"cannot save to {directory}: it holds a jaxquant checkpoint that cannot be read ({err}); "
                          f"pass overwrite=True (--overwrite) to replace it") from None
  if (old["recipe"], old["source"]) == (recipe_name, json.loads(json.dumps(source))) or overwrite:
    return
  raise CheckpointError(
      f"cannot save to {directory}: it already holds a different checkpoint (recipe {old['recipe']!r}, source "
      f"{json.dumps(old['source'])}; saving recipe {recipe_name!r}, source {json.dumps(source)}); pass "
      f"overwrite=True (--overwrite) to replace it")


def save(directory, model: nnx.Module, *, recipe_name: str, source: dict, overwrite: bool = False) -> pathlib.Path:
  """Write nnx.state(model) and its manifest to `directory`; returns the directory.

  Atomic: everything is written to a hidden sibling directory which is then renamed into place, so an
  interrupted save leaves whatever was at `directory` intact. A different existing checkpoint is replaced only
  with overwrite=True (old one renamed aside, new one renamed in, old one deleted); a non-empty directory that
  is not a jaxquant checkpoint is never replaced.
  """
  directory = pathlib.Path(directory).absolute()
  try:
    json.dumps(source)
  except (TypeError, ValueError) as err:
    raise CheckpointError(f"cannot save to {directory}: `source` must be JSON-serializable ({err})") from None
  check_destination(directory, recipe_name, source, overwrite)
  leaves, arrays = encode_state(nnx.state(model))
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "weight_format": formats.WEIGHT_FORMAT_VERSION,
          "recipe": recipe_name, "source": source,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "versions": library_versions(), "leaves": leaves}

  directory.parent.mkdir(parents=True, exist_ok=True)
  tag = uuid.uuid4().hex[:12]
  tmp = directory.parent / f".{directory.name}.jaxquant-tmp-{tag}"
  try:
    tmp.mkdir()
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / STATE_DIR, arrays)
      checkpointer.wait_until_finished()
    write_metadata(tmp / METADATA_FILE, meta)  # last: a directory with jaxquant.json is complete
    replace_directory(tmp, directory, tag)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def replace_directory(new: pathlib.Path, directory: pathlib.Path, tag: str) -> None:
  """Rename `new` to `directory`; an existing `directory` is renamed aside first and deleted afterwards."""
  if not directory.exists():
    os.rename(new, directory)
    return
  aside = directory.parent / f".{directory.name}.jaxquant-old-{tag}"
  os.rename(directory, aside)
  try:
    os.rename(new, directory)
  except BaseException:
    os.rename(aside, directory)
    raise
  shutil.rmtree(aside, ignore_errors=True)



def _check_template(directory: pathlib.Path, leaves: dict[str, dict], template: dict[str, Any]) -> None:
  """The manifest must describe exactly the template's leaves, with the same (logical) shapes."""
  missing = [p for p in template if p not in leaves]
  extra = [p for p in leaves if p not in template]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"the template model has {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                   f"which the checkpoint lacks")
    if extra:
      parts.append(f"the checkpoint has {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} "
                   f"which the template model lacks")
    raise CheckpointError(f"checkpoint {directory} does not match the template model: {'; '.join(parts)}. "
                          f"The checkpoint was made from a different model")
  for path, leaf in template.items():
    stored, wanted = logical_shape(leaves[path]), tuple(np.shape(leaf))
    if stored is not None and stored != wanted:
      raise CheckpointError(f"checkpoint {directory} does not match the template model: {path} has shape {stored} "
                            f"in the checkpoint but {wanted} in the template. The checkpoint was made from a "
                            f"different model")


def _orbax_restore(state_dir: pathlib.Path, target: dict) -> dict:
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(state_dir, target)


def _find_unreadable(state_dir: pathlib.Path, target: dict) -> list[tuple[str, str]]:
  """After a failed restore: the orbax keys that cannot be read one at a time, each with its error."""
  failed = []
  with ocp.PyTreeCheckpointer() as checkpointer:
    for key, struct in target.items():
      try:
        checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
            item={key: struct}, partial_restore=True,
            restore_args={key: ocp.ArrayRestoreArgs(dtype=struct.dtype, sharding=struct.sharding)}))
      except Exception as err:  # noqa: BLE001 - any failure here means this array is unreadable
        failed.append((key, _first_line(err)))
  return failed


def _collect_abandoned_reads() -> None:
  """When one read fails, orbax abandons its other pending reads; their coroutines raise again when garbage
  collected ("Exception ignored in <coroutine ...>"). Collect them now, without that noise."""
  hook = sys.unraisablehook

  def quiet(unraisable):
    if "orbax" not in getattr(getattr(unraisable.object, "cr_code", None), "co_filename", ""):
      hook(unraisable)

  sys.unraisablehook = quiet
  try:
    gc.collect()
  finally:
    sys.unraisablehook = hook


def _first_line(err: Exception) -> str:
  """The useful head of an orbax/tensorstore error (they append a long TensorStore spec)."""
  text = (str(err).splitlines() or [type(err).__name__])[0]
  return text.split(" See full TensorStore details")[0][:300]


def _read_arrays(directory: pathlib.Path, state_dir: pathlib.Path, target: dict,
                 stored: dict[str, tuple[str, dict]]) -> dict:
  """orbax-restore `target` (orbax key -> ShapeDtypeStruct with sharding) from `state_dir`; clear errors."""
  if not state_dir.is_dir():
    raise CheckpointError(f"checkpoint {directory} is incomplete: the array directory {state_dir} is missing")
  try:
    return _orbax_restore(state_dir, target)
  except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise plain Exception, ValueError, JSONDecodeError ...
    failed = _find_unreadable(state_dir, target)
    _collect_abandoned_reads()
    if not failed or len(failed) == len(target) > 1:
      raise CheckpointError(f"checkpoint {directory}: orbax cannot read the array files in {state_dir}; they are "
                            f"truncated or corrupt ({_first_line(err)})") from err
    key, message = failed[0]
    more = f" (and {len(failed) - 1} more arrays)" if len(failed) > 1 else ""
    raise CheckpointError(f"checkpoint {directory}: the array {key} of leaf {stored[key][0]}{more} cannot be read "
                          f"from {state_dir}; the array files are truncated or corrupt ({message})") from err


def array_shardings(leaves: dict[str, dict], shardings) -> dict[str, Any]:
  """orbax key -> sharding for every array the manifest lists, from `shardings`: (path, abstract leaf) -> the
  leaf's shardings (a pytree of its structure)."""
  out = {}
  for path, entry in leaves.items():
    tree = shardings(path, abstract_leaf(path, entry))
    if entry["type"] == "array":
      out[path] = tree
      continue
    for key_path, value in jax.tree_util.tree_leaves_with_path(tree):
      out[path + "." + ".".join(k.name for k in key_path)] = value
  return out


def restore(directory, model_template: nnx.Module, shardings=None) -> nnx.Module:
  """The quantized model saved at `directory`, built on `model_template`'s graph.

  The template is the float model the checkpoint was made from (real or abstract, e.g. from nnx.eval_shape); only
  its structure and shapes are used. Arrays come back bit-identical to what was saved.

  shardings: None (everything on the first device), or a function (leaf path, abstract leaf) -> that leaf's
  shardings (a pytree of its structure), e.g. sharding.leaf_shardings(mesh, rules): every array is restored
  straight onto them, whatever mesh the checkpoint was saved from. Whatever it raises (a mesh that cannot split
  some array: sharding.ShardingError) propagates.
  """
  directory = pathlib.Path(directory).absolute()
  meta = load_metadata(directory)
  leaves = meta["leaves"]
  graphdef, state = nnx.split(model_template)
  template = {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_format)}
  _check_template(directory, leaves, template)

  stored = stored_arrays(leaves)
  convert = meta.get("weight_format", 1) != formats.WEIGHT_FORMAT_VERSION
  if shardings is None or convert:  # an old layout is read whole, converted, then placed
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    array_placement = {key: single for key in stored}
  else:
    array_placement = array_shardings(leaves, shardings)
  target = {key: jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]), sharding=array_placement[key])
            for key, (_, spec) in stored.items()}
  if meta["format_version"] == PARTS_FORMAT_VERSION:
    arrays = {}
    for part, keys in meta["parts"].items():
      arrays |= _read_arrays(directory, directory / PARTS_DIR / part, {key: target[key] for key in keys}, stored)
  else:
    arrays = _read_arrays(directory, directory / STATE_DIR, target, stored)

  for key, (path, spec) in stored.items():
    if digest(arrays[key]) != spec["sha256"]:
      raise CheckpointError(f"checkpoint {directory}: the array {key} of leaf {path} does not match its sha256 in "
                            f"{METADATA_FILE}; the array files are corrupt")

  def rebuild(key_path, _):
    path = path_str(key_path)
    leaf = decode_leaf(directory, path, leaves[path], arrays)
    if not convert:
      return leaf
    leaf = formats.from_v1(leaf)
    return leaf if shardings is None else jax.device_put(leaf, shardings(path, leaf))

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(rebuild, state, is_leaf=is_format))
