"""Save and restore quantized models: orbax array files plus a JSON manifest, written atomically.

A checkpoint is a directory:

  <directory>/jaxquant.json   metadata (below)
  <directory>/state/          orbax StandardCheckpointer files: a flat dict of arrays, one entry per stored array

Every leaf of `nnx.state(model)` is stored. A plain array at path P (e.g. "layers.0.attn.q_proj.bias") is the
orbax entry "P"; a QArray at P stores its data fields as "P.packed", "P.scale", "P.zero" (asymmetric only) and
"P.activation.scale" (static activation scales only). Its static fields live only in the manifest.

jaxquant.json holds:
  format, format_version   "jaxquant-checkpoint", FORMAT_VERSION
  recipe                   the recipe name the model was quantized with
  source                   the caller's description of the float model (family, name, path, sha256 ...), as given
  created, versions        when, and with which jax / flax / orbax-checkpoint
  leaves                   path -> {"type": "array", "shape", "dtype", "sha256"}
                           or {"type": "qarray", "shape" (logical K, N), "bits", "k_group", "n_group",
                               "zero": bool, "activation": null or {"bits", "mode"},
                               "arrays": field -> {"shape", "dtype", "sha256"}}
The sha256 is over each array's C-order bytes, so a corrupt array file is caught on restore.

No pickle anywhere: `restore` builds the typed target (jax.ShapeDtypeStructs, QArray/ActQuant structure) from the
manifest, checks it against the caller's template model, restores into it with orbax and merges the result with
the template's graphdef.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxquant.formats import ActQuant, QArray, is_qarray
from jaxquant.rules import path_str

FORMAT = "jaxquant-checkpoint"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
METADATA_FILE = "jaxquant.json"
STATE_DIR = "state"


class CheckpointError(ValueError):
  """A checkpoint cannot be written or read; the message names the file or directory and what is wrong."""


# ----------------------------------------------------------------------------------------------------------------
# manifest


def _digest(x) -> str:
  return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def _array_spec(x) -> dict:
  return {"shape": list(np.shape(x)), "dtype": jnp.dtype(x.dtype).name, "sha256": _digest(x)}


def _qarray_fields(q: QArray) -> dict[str, Any]:
  """Field name -> array, for the data fields of a QArray that are present."""
  fields = {"packed": q.packed, "scale": q.scale}
  if q.zero is not None:
    fields["zero"] = q.zero
  if q.activation is not None and q.activation.scale is not None:
    fields["activation.scale"] = q.activation.scale
  return fields


def _check_array(path: str, x) -> None:
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    raise CheckpointError(f"cannot save leaf {path}: a {type(x).__name__}, not an array or QArray")
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    raise CheckpointError(f"cannot save leaf {path}: PRNG key arrays are not supported")


def _flatten(state) -> tuple[dict[str, dict], dict[str, Any]]:
  """nnx state -> (manifest leaves, flat orbax dict)."""
  leaves, arrays = {}, {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_qarray):
    path = path_str(key_path)
    if path in leaves:
      raise CheckpointError(f"cannot save: two leaves share the path {path}")
    if isinstance(leaf, QArray):
      fields = _qarray_fields(leaf)
      for name, x in fields.items():
        _check_array(f"{path}.{name}", x)
        arrays[f"{path}.{name}"] = x
      activation = None if leaf.activation is None else {"bits": leaf.activation.bits, "mode": leaf.activation.mode}
      leaves[path] = {"type": "qarray", "shape": list(leaf.shape), "bits": leaf.bits, "k_group": leaf.k_group,
                      "n_group": leaf.n_group, "zero": leaf.zero is not None, "activation": activation,
                      "arrays": {name: _array_spec(x) for name, x in fields.items()}}
    else:
      _check_array(path, leaf)
      arrays[path] = leaf
      leaves[path] = {"type": "array", **_array_spec(leaf)}
  return leaves, arrays


def _stored_arrays(leaves: dict[str, dict]) -> dict[str, tuple[str, dict]]:
  """orbax key -> (leaf path, array spec), from the manifest."""
  out = {}
  for path, entry in leaves.items():
    if entry["type"] == "qarray":
      for name, spec in entry["arrays"].items():
        out[f"{path}.{name}"] = (path, spec)
    else:
      out[path] = (path, entry)
  return out


# ----------------------------------------------------------------------------------------------------------------
# metadata


def load_metadata(directory) -> dict:
  """The parsed jaxquant.json of the checkpoint at `directory` (format version checked)."""
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
  return meta


def _write_metadata(file: pathlib.Path, meta: dict) -> None:
  with open(file, "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
    f.flush()
    os.fsync(f.fileno())


def _versions() -> dict[str, str]:
  import flax
  return {"jax": jax.__version__, "flax": flax.__version__, "orbax-checkpoint": ocp.__version__}


# ----------------------------------------------------------------------------------------------------------------
# save


def _check_destination(directory: pathlib.Path, recipe_name: str, source: dict, overwrite: bool) -> None:
  """Refuse to replace anything that is not this same checkpoint, unless overwrite=True (and it is ours)."""
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
  _check_destination(directory, recipe_name, source, overwrite)
  leaves, arrays = _flatten(nnx.state(model))
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "recipe": recipe_name, "source": source,
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
    stored, wanted = tuple(leaves[path]["shape"]), tuple(np.shape(leaf))
    if stored != wanted:
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


def _first_line(err: Exception) -> str:
  """The useful head of an orbax/tensorstore error (they append a long TensorStore spec)."""
  text = (str(err).splitlines() or [type(err).__name__])[0]
  return text.split(" See full TensorStore details")[0][:300]


def restore(directory, model_template: nnx.Module) -> nnx.Module:
  """The quantized model saved at `directory`, built on `model_template`'s graph.

  The template is the float model the checkpoint was made from (real or abstract, e.g. from nnx.eval_shape); only
  its structure and shapes are used. Arrays come back bit-identical to what was saved.
  """
  directory = pathlib.Path(directory).absolute()
  meta = load_metadata(directory)
  leaves = meta["leaves"]
  graphdef, state = nnx.split(model_template)
  template = {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=is_qarray)}
  _check_template(directory, leaves, template)

  stored = _stored_arrays(leaves)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {key: jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]), sharding=sharding)
            for key, (_, spec) in stored.items()}
  state_dir = directory / STATE_DIR
  if not state_dir.is_dir():
    raise CheckpointError(f"checkpoint {directory} is incomplete: the array directory {state_dir} is missing")
  try:
    arrays = _orbax_restore(state_dir, target)
  except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise plain Exception, ValueError, JSONDecodeError ...
    failed = _find_unreadable(state_dir, target)
    if not failed or len(failed) == len(target) > 1:
      raise CheckpointError(f"checkpoint {directory}: orbax cannot read the array files in {state_dir}; they are "
                            f"truncated or corrupt ({_first_line(err)})") from err
    key, message = failed[0]
    more = f" (and {len(failed) - 1} more arrays)" if len(failed) > 1 else ""
    raise CheckpointError(f"checkpoint {directory}: the array {key} of leaf {stored[key][0]}{more} cannot be read "
                          f"from {state_dir}; the array files are truncated or corrupt ({message})") from err

  for key, (path, spec) in stored.items():
    if _digest(arrays[key]) != spec["sha256"]:
      raise CheckpointError(f"checkpoint {directory}: the array {key} of leaf {path} does not match its sha256 in "
                            f"{METADATA_FILE}; the array files in {state_dir} are corrupt")

  def rebuild(key_path, _):
    path = path_str(key_path)
    entry = leaves[path]
    if entry["type"] != "qarray":
      return jnp.asarray(arrays[path])
    get = lambda name: jnp.asarray(arrays[f"{path}.{name}"])
    activation = None
    if entry["activation"] is not None:
      has_scale = "activation.scale" in entry["arrays"]
      activation = ActQuant(bits=entry["activation"]["bits"], mode=entry["activation"]["mode"],
                            scale=get("activation.scale") if has_scale else None)
    return QArray(packed=get("packed"), scale=get("scale"), zero=get("zero") if entry["zero"] else None,
                  activation=activation, shape=tuple(entry["shape"]), bits=entry["bits"],
                  k_group=entry["k_group"], n_group=entry["n_group"])

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(rebuild, state, is_leaf=is_qarray))
