"""A checkpoint's manifest (jaxquant.json): how each leaf of a model's state is encoded, and reading it back.

Every leaf of `nnx.state(model)` is stored. A plain array at path P (e.g. "layers.0.attn.q_proj.bias") is the
orbax entry "P". A quantized-format leaf (any dataclass of jaxquant.formats: QArray, BCQArray ..., with ActQuant
nested inside a QArray) stores each array field F as the orbax entry "P.F" (e.g. "P.packed", "P.scale",
"P.activation.scale"); its static fields and absent (None) fields live only in the manifest.

jaxquant.json holds:
  format, format_version   "jaxquant-checkpoint", FORMAT_VERSION (PARTS_FORMAT_VERSION for the per-part layout,
                           which adds "layout": "parts" and "parts": part name -> its orbax keys)
  weight_format            jaxquant.formats.WEIGHT_FORMAT_VERSION: how QArray / BCQArray store their codes (2: signed
                           values, K contiguous per output channel). A checkpoint without it is version 1 (unsigned
                           codes, K-major); checkpoint.restore converts it exactly (formats.from_v1)
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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

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
# encoding



def digest(x) -> str:
  return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def is_format(x) -> bool:
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


def encode_leaf(path: str, x, arrays: dict[str, Any]) -> dict:
  """Manifest entry for `x` at `path`; its arrays are added to `arrays` under their orbax keys."""
  if not is_format(x):
    _check_array(path, x)
    arrays[path] = x
    return {"type": "array", "shape": list(np.shape(x)), "dtype": jnp.dtype(x.dtype).name, "sha256": digest(x)}
  meta, fields = {}, {}
  for field in dataclasses.fields(x):
    value = getattr(x, field.name)
    if value is None:
      fields[field.name] = None
    elif is_format(value) or (hasattr(value, "shape") and hasattr(value, "dtype")):
      fields[field.name] = encode_leaf(f"{path}.{field.name}", value, arrays)
    else:
      meta[field.name] = _json_static(f"{path}.{field.name}", value)
  return {"type": type(x).__name__, "meta": meta, "fields": fields}


def encode_state(state) -> tuple[dict[str, dict], dict[str, Any]]:
  """nnx state -> (manifest leaves, flat orbax dict of arrays)."""
  leaves, arrays = {}, {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_format):
    path = path_str(key_path)
    if path in leaves:
      raise CheckpointError(f"cannot save: two leaves share the path {path}")
    leaves[path] = encode_leaf(path, leaf, arrays)
  return leaves, arrays


def stored_arrays(leaves: dict[str, dict]) -> dict[str, tuple[str, dict]]:
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


def decode_leaf(directory: pathlib.Path, path: str, entry: dict, arrays: dict[str, Any]):
  """Inverse of encode_leaf, from the restored orbax arrays."""
  if entry["type"] == "array":
    return jnp.asarray(arrays[path])
  kwargs = {name: _from_json_static(value) for name, value in entry["meta"].items()}
  for name, sub in entry["fields"].items():
    kwargs[name] = None if sub is None else decode_leaf(directory, f"{path}.{name}", sub, arrays)
  try:
    return FORMAT_CLASSES[entry["type"]](**kwargs)
  except TypeError as err:
    raise CheckpointError(f"checkpoint {directory}: leaf {path} cannot be rebuilt as a {entry['type']} ({err}); "
                          f"the checkpoint was written by another jaxquant version") from None


def abstract_leaf(path: str, entry: dict):
  """A manifest entry as an abstract leaf (ShapeDtypeStructs inside the format class): for computing shardings."""
  if entry["type"] == "array":
    return jax.ShapeDtypeStruct(tuple(entry["shape"]), jnp.dtype(entry["dtype"]))
  kwargs = {name: _from_json_static(value) for name, value in entry["meta"].items()}
  for name, sub in entry["fields"].items():
    kwargs[name] = None if sub is None else abstract_leaf(f"{path}.{name}", sub)
  return FORMAT_CLASSES[entry["type"]](**kwargs)


def logical_shape(entry: dict):
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
# reading and writing jaxquant.json


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
  stored = set(stored_arrays(meta["leaves"]))
  if stored != set(owner):
    missing = sorted(stored - set(owner))[:3] or sorted(set(owner) - stored)[:3]
    raise CheckpointError(f"{file}: the parts do not list exactly the manifest's arrays (e.g. {missing}); the "
                          f"checkpoint metadata is corrupt")


def write_metadata(file: pathlib.Path, meta: dict) -> None:
  with open(file, "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
    f.flush()
    os.fsync(f.fileno())


def library_versions() -> dict[str, str]:
  return {"jax": jax.__version__, "flax": flax.__version__, "orbax-checkpoint": ocp.__version__}


