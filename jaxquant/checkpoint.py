"""Save and restore quantized models: orbax array files plus a JSON manifest, written atomically.

A checkpoint is a directory:

  <directory>/jaxquant.json   metadata (below)
  <directory>/state/          orbax StandardCheckpointer files: a flat dict of arrays, one entry per stored array

Every leaf of `nnx.state(model)` is stored. A plain array at path P (e.g. "layers.0.attn.q_proj.bias") is the
orbax entry "P". A quantized-format leaf (any dataclass of jaxquant.formats: QArray, BCQArray ..., with ActQuant
nested inside a QArray) stores each array field F as the orbax entry "P.F" (e.g. "P.packed", "P.scale",
"P.activation.scale"); its static fields and absent (None) fields live only in the manifest.

jaxquant.json holds:
  format, format_version   "jaxquant-checkpoint", FORMAT_VERSION
  weight_format            jaxquant.formats.WEIGHT_FORMAT_VERSION: how QArray / BCQArray store their codes (2: signed
                           values, K contiguous per output channel). A checkpoint without it is version 1 (unsigned
                           codes, K-major); `restore` converts it exactly (formats.from_v1)
  recipe                   the recipe name the model was quantized with
  source                   the caller's description of the float model (family, name, path, sha256 ...), as given
  created, versions        when, and with which jax / flax / orbax-checkpoint
  leaves                   path -> entry, where an entry is
                             {"type": "array", "shape", "dtype", "sha256"}, or
                             {"type": "QArray" | "BCQArray" | "ActQuant" ..., "meta": static fields (shape, bits,
                              k_group, n_group, mode ...), "fields": data field -> entry or null}
                           e.g. a W8A8 QArray: meta {shape, bits, k_group, n_group}, fields {packed, scale,
                           zero: null (symmetric), activation: {"type": "ActQuant", meta {bits, mode}, fields {scale}}}
The sha256 is over each array's C-order bytes, so a corrupt array file is caught on restore.

Per-part layout (format version 2, written by `PartWriter`, e.g. by jaxquant.streaming one block at a time):

  <directory>/jaxquant.json   the same manifest, plus "layout": "parts" and "parts": part name -> its orbax keys
  <directory>/parts/<name>/   one orbax StandardCheckpointer item per part ("embed", "layers.0", ..., "head")

`restore` reads both layouts. With `mesh=` it restores every array directly onto a device mesh (split by
jaxquant.sharding's partition rules), whatever mesh or device count the checkpoint was written from.

No pickle anywhere: `restore` rebuilds the typed target from the manifest (jax.ShapeDtypeStructs; the format
classes are looked up by name among jaxquant.formats' dataclasses only), checks it against the caller's template
model, restores into it with orbax and merges the result with the template's graphdef.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import json
import os
import pathlib
import re
import shutil
import sys
import uuid
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxquant import formats
from jaxquant.rules import path_str

FORMAT = "jaxquant-checkpoint"
FORMAT_VERSION = 1
PARTS_FORMAT_VERSION = 2  # the per-part layout: older readers refuse it with "upgrade jaxquant"
SUPPORTED_VERSIONS = (1, 2)
WEIGHT_FORMATS = (1, formats.WEIGHT_FORMAT_VERSION)  # 1 is converted on restore
METADATA_FILE = "jaxquant.json"
STATE_DIR = "state"
PARTS_DIR = "parts"
PART_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

# Quantized-format classes, by name: the dataclasses defined in jaxquant.formats (QArray, BCQArray, ActQuant ...).
FORMAT_CLASSES: dict[str, type] = {
    name: cls for name, cls in vars(formats).items()
    if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == formats.__name__}


class CheckpointError(ValueError):
  """A checkpoint cannot be written or read; the message names the file or directory and what is wrong."""


# ----------------------------------------------------------------------------------------------------------------
# manifest


def _digest(x) -> str:
  return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def _is_format(x) -> bool:
  return FORMAT_CLASSES.get(type(x).__name__) is type(x)


def _check_array(path: str, x) -> None:
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise CheckpointError(f"cannot save leaf {path}: a {type(x).__name__}, not an array or a jaxquant.formats class")
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    raise CheckpointError(f"cannot save leaf {path}: PRNG key arrays are not supported")


def _json_static(path: str, value):
  """A static (meta) field as JSON: tuples become lists."""
  if isinstance(value, (tuple, list)):
    return [_json_static(path, v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise CheckpointError(f"cannot save leaf {path}: static field of type {type(value).__name__} is not JSON")


def _from_json_static(value):
  return tuple(_from_json_static(v) for v in value) if isinstance(value, list) else value


def _encode(path: str, x, arrays: dict[str, Any]) -> dict:
  """Manifest entry for `x` at `path`; its arrays are added to `arrays` under their orbax keys."""
  if not _is_format(x):
    _check_array(path, x)
    arrays[path] = x
    return {"type": "array", "shape": list(np.shape(x)), "dtype": jnp.dtype(x.dtype).name, "sha256": _digest(x)}
  meta, fields = {}, {}
  for field in dataclasses.fields(x):
    value = getattr(x, field.name)
    if value is None:
      fields[field.name] = None
    elif _is_format(value) or (hasattr(value, "shape") and hasattr(value, "dtype")):
      fields[field.name] = _encode(f"{path}.{field.name}", value, arrays)
    else:
      meta[field.name] = _json_static(f"{path}.{field.name}", value)
  return {"type": type(x).__name__, "meta": meta, "fields": fields}


def flat_leaves(state, prefix: str = "") -> dict[str, Any]:
  """nnx state (or any pytree of arrays and quantized formats) -> {prefix + leaf path: array or format}, the
  leaves PartWriter.write takes (e.g. a block's state with prefix "layers.3.")."""
  return {prefix + path_str(key_path): leaf
          for key_path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_format)}


def _flatten(state) -> tuple[dict[str, dict], dict[str, Any]]:
  """nnx state -> (manifest leaves, flat orbax dict of arrays)."""
  leaves, arrays = {}, {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_format):
    path = path_str(key_path)
    if path in leaves:
      raise CheckpointError(f"cannot save: two leaves share the path {path}")
    leaves[path] = _encode(path, leaf, arrays)
  return leaves, arrays


def _stored_arrays(leaves: dict[str, dict]) -> dict[str, tuple[str, dict]]:
  """orbax key -> (leaf path, array entry), for every array the manifest lists."""
  out = {}

  def walk(key, entry, leaf):
    if entry["type"] == "array":
      out[key] = (leaf, entry)
    else:
      for name, sub in entry["fields"].items():
        if sub is not None:
          walk(f"{key}.{name}", sub, leaf)

  for path, entry in leaves.items():
    walk(path, entry, path)
  return out


def _decode(directory: pathlib.Path, path: str, entry: dict, arrays: dict[str, Any]):
  """Inverse of _encode, from the restored orbax arrays."""
  if entry["type"] == "array":
    return jnp.asarray(arrays[path])
  kwargs = {name: _from_json_static(value) for name, value in entry["meta"].items()}
  for name, sub in entry["fields"].items():
    kwargs[name] = None if sub is None else _decode(directory, f"{path}.{name}", sub, arrays)
  try:
    return FORMAT_CLASSES[entry["type"]](**kwargs)
  except TypeError as err:
    raise CheckpointError(f"checkpoint {directory}: leaf {path} cannot be rebuilt as a {entry['type']} ({err}); "
                          f"the checkpoint was written by another jaxquant version") from None


def _logical_shape(entry: dict):
  """An entry's (logical) shape: an array's shape, a quantized format's `shape` static field; None if unknown."""
  shape = entry["shape"] if entry["type"] == "array" else entry["meta"].get("shape")
  return None if shape is None else tuple(shape)


def _check_entries(directory: pathlib.Path, leaves: dict[str, dict]) -> None:
  """Every manifest entry must be a well-formed array or a known format class (checked before any restore)."""
  def check(path, entry):
    kind = entry.get("type") if isinstance(entry, dict) else None
    if kind == "array" and {"shape", "dtype", "sha256"} <= entry.keys():
      return
    if kind in FORMAT_CLASSES and isinstance(entry.get("meta"), dict) and isinstance(entry.get("fields"), dict):
      for name, sub in entry["fields"].items():
        if sub is not None:
          check(f"{path}.{name}", sub)
      return
    if isinstance(kind, str) and kind != "array" and kind not in FORMAT_CLASSES:
      raise CheckpointError(f"{directory / METADATA_FILE}: leaf {path} has the unknown format {kind!r}; this "
                            f"jaxquant knows {sorted(FORMAT_CLASSES)}: upgrade jaxquant")
    raise CheckpointError(f"{directory / METADATA_FILE}: the manifest entry of {path} is malformed")

  if not isinstance(leaves, dict):
    raise CheckpointError(f"{directory / METADATA_FILE}: 'leaves' is not a mapping; the metadata is corrupt")
  for path, entry in leaves.items():
    check(path, entry)


# ----------------------------------------------------------------------------------------------------------------
# metadata


def load_metadata(directory) -> dict:
  """The parsed jaxquant.json of the checkpoint at `directory` (format version and manifest entries checked)."""
  directory = pathlib.Path(directory)
  if not directory.exists():
    raise CheckpointError(f"no checkpoint at {directory}: the directory does not exist")
  if not directory.is_dir():
    raise CheckpointError(f"no checkpoint at {directory}: it is a file, not a checkpoint directory")
  file = directory / METADATA_FILE
  if not file.is_file():
    raise CheckpointError(f"{directory} is not a jaxquant checkpoint: {METADATA_FILE} is missing")
  try:
    meta = json.loads(file.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise CheckpointError(f"{file} cannot be parsed ({err}): the checkpoint metadata is corrupt") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(f"{file} is not jaxquant checkpoint metadata (format is not {FORMAT!r})")
  version = meta.get("format_version")
  if version not in SUPPORTED_VERSIONS:
    raise CheckpointError(f"{file} has format version {version!r}; this jaxquant reads version(s) "
                          f"{', '.join(map(str, SUPPORTED_VERSIONS))}: upgrade jaxquant or re-quantize the model")
  for field in ("recipe", "source", "leaves"):
    if field not in meta:
      raise CheckpointError(f"{file} lacks the field {field!r}: the checkpoint metadata is corrupt")
  weight_format = meta.get("weight_format", 1)
  if weight_format not in WEIGHT_FORMATS:
    raise CheckpointError(f"{file} stores weights in format {weight_format!r}; this jaxquant reads weight format(s) "
                          f"{', '.join(map(str, WEIGHT_FORMATS))}: upgrade jaxquant or re-quantize the model")
  _check_entries(directory, meta["leaves"])
  if version == PARTS_FORMAT_VERSION:
    _check_parts(directory, meta)
  return meta


def _check_parts(directory: pathlib.Path, meta: dict) -> None:
  """A per-part manifest: every stored array belongs to exactly one well-named part."""
  file = directory / METADATA_FILE
  parts = meta.get("parts")
  if meta.get("layout") != "parts" or not isinstance(parts, dict):
    raise CheckpointError(f"{file}: format version {PARTS_FORMAT_VERSION} needs 'layout': 'parts' and a 'parts' "
                          f"mapping; the checkpoint metadata is corrupt")
  owner = {}
  for name, keys in parts.items():
    if not PART_NAME.fullmatch(name) or not isinstance(keys, list):
      raise CheckpointError(f"{file}: part {name!r} is malformed; the checkpoint metadata is corrupt")
    for key in keys:
      if key in owner:
        raise CheckpointError(f"{file}: array {key} is listed in parts {owner[key]!r} and {name!r}; the "
                              f"checkpoint metadata is corrupt")
      owner[key] = name
  stored = set(_stored_arrays(meta["leaves"]))
  if stored != set(owner):
    missing = sorted(stored - set(owner))[:3] or sorted(set(owner) - stored)[:3]
    raise CheckpointError(f"{file}: the parts do not list exactly the manifest's arrays (e.g. {missing}); the "
                          f"checkpoint metadata is corrupt")


def _write_metadata(file: pathlib.Path, meta: dict) -> None:
  with open(file, "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
    f.flush()
    os.fsync(f.fileno())


def _versions() -> dict[str, str]:
  return {"jax": jax.__version__, "flax": flax.__version__, "orbax-checkpoint": ocp.__version__}


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
  leaves, arrays = _flatten(nnx.state(model))
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "weight_format": formats.WEIGHT_FORMAT_VERSION,
          "recipe": recipe_name, "source": source,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "versions": _versions(), "leaves": leaves}

  directory.parent.mkdir(parents=True, exist_ok=True)
  tag = uuid.uuid4().hex[:12]
  tmp = directory.parent / f".{directory.name}.jaxquant-tmp-{tag}"
  try:
    tmp.mkdir()
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / STATE_DIR, arrays)
      checkpointer.wait_until_finished()
    _write_metadata(tmp / METADATA_FILE, meta)  # last: a directory with jaxquant.json is complete
    _replace(tmp, directory, tag)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def _replace(new: pathlib.Path, directory: pathlib.Path, tag: str) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# restore


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
    stored, wanted = _logical_shape(leaves[path]), tuple(np.shape(leaf))
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


def _abstract_leaf(path: str, entry: dict):
  """A manifest entry as an abstract leaf (ShapeDtypeStructs inside the format class): for computing shardings."""
  if entry["type"] == "array":
    return jax.ShapeDtypeStruct(tuple(entry["shape"]), jnp.dtype(entry["dtype"]))
  kwargs = {name: _from_json_static(value) for name, value in entry["meta"].items()}
  for name, sub in entry["fields"].items():
    kwargs[name] = None if sub is None else _abstract_leaf(f"{path}.{name}", sub)
  return FORMAT_CLASSES[entry["type"]](**kwargs)


def array_shardings(leaves: dict[str, dict], mesh, partition_rules) -> dict[str, Any]:
  """orbax key -> NamedSharding on `mesh` for every array the manifest lists (jaxquant.sharding's layout)."""
  from jaxquant import sharding as sharding_lib

  out = {}
  for path, entry in leaves.items():
    leaf = _abstract_leaf(path, entry)
    ndim = 2 if formats.is_qarray(leaf) else len(entry.get("shape", ()))
    spec = sharding_lib.partition_spec(path, partition_rules, ndim)
    tree = sharding_lib.format_shardings(leaf, spec, mesh, path)
    if entry["type"] == "array":
      out[path] = tree
      continue
    for key_path, value in jax.tree_util.tree_leaves_with_path(tree):
      out[path + "." + ".".join(k.name for k in key_path)] = value
  return out


def restore(directory, model_template: nnx.Module, mesh=None, partition_rules=None) -> nnx.Module:
  """The quantized model saved at `directory`, built on `model_template`'s graph.

  The template is the float model the checkpoint was made from (real or abstract, e.g. from nnx.eval_shape); only
  its structure and shapes are used. Arrays come back bit-identical to what was saved.

  mesh: restore every array straight onto this jax.sharding.Mesh, split by `partition_rules`
  (default jaxquant.sharding.TENSOR_PARALLEL); the mesh need not match the one the checkpoint was saved from.
  None: everything on the first device. A mesh that cannot split some array raises sharding.ShardingError.
  """
  directory = pathlib.Path(directory).absolute()
  meta = load_metadata(directory)
  leaves = meta["leaves"]
  graphdef, state = nnx.split(model_template)
  template = {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_format)}
  _check_template(directory, leaves, template)

  stored = _stored_arrays(leaves)
  convert = meta.get("weight_format", 1) != formats.WEIGHT_FORMAT_VERSION
  if partition_rules is None:
    from jaxquant.sharding import TENSOR_PARALLEL as partition_rules
  if mesh is None or convert:  # an old layout is read whole, converted, then placed on the mesh
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {key: single for key in stored}
  else:
    shardings = array_shardings(leaves, mesh, partition_rules)
  target = {key: jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]), sharding=shardings[key])
            for key, (_, spec) in stored.items()}
  if meta["format_version"] == PARTS_FORMAT_VERSION:
    arrays = {}
    for part, keys in meta["parts"].items():
      arrays |= _read_arrays(directory, directory / PARTS_DIR / part, {key: target[key] for key in keys}, stored)
  else:
    arrays = _read_arrays(directory, directory / STATE_DIR, target, stored)

  for key, (path, spec) in stored.items():
    if _digest(arrays[key]) != spec["sha256"]:
      raise CheckpointError(f"checkpoint {directory}: the array {key} of leaf {path} does not match its sha256 in "
                            f"{METADATA_FILE}; the array files are corrupt")

  def rebuild(key_path, _):
    path = path_str(key_path)
    leaf = _decode(directory, path, leaves[path], arrays)
    return formats.from_v1(leaf) if convert else leaf

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(rebuild, state, is_leaf=_is_format))
  if convert and mesh is not None:
    from jaxquant.sharding import shard_model
    model = shard_model(model, mesh, partition_rules)
  return model


# ----------------------------------------------------------------------------------------------------------------
# per-part writing (streaming)


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
      entries[path] = _encode(path, leaf, arrays)
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
            "versions": _versions(), "layout": "parts", "parts": self.parts, "leaves": self.leaves}
    _write_metadata(self._tmp / METADATA_FILE, meta)
    _replace(self._tmp, self.directory, self._tag)
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
