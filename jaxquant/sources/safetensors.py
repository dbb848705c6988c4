"""The safetensors reader: a file's header parsed and checked up front, tensors read one at a time with os.pread
into fresh float32 arrays (no memory map: touched pages of a mapped file count toward the process's resident
memory until the kernel drops them); and Hugging Face directories: config.json + model.safetensors, or
model.safetensors.index.json with its shards.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from jaxquant.sources.base import SourceError

_FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
# Bytes per element of every dtype a header may list; only the float ones can be read.
_ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_HF_DIRECTORY = "a safetensors source is a Hugging Face model directory (config.json + model.safetensors)"


class SafetensorsFile:
  """One .safetensors file: the header parsed and checked up front, tensors read one at a time with os.pread."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    try:
      self._fd = os.open(self.path, os.O_RDONLY)
    except OSError as err:
      raise SourceError(f"cannot open {self.path}: {err.strerror}") from None
    try:
      self.tensors = self._header()
    except SourceError:
      self.close()
      raise

  def _header(self) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    size = os.fstat(self._fd).st_size
    head = os.pread(self._fd, 8, 0)
    if len(head) < 8:
      raise SourceError(f"{self.path} is not a safetensors file: shorter than its 8-byte header length")
    header_len = int.from_bytes(head, "little")
    if header_len > size - 8 or header_len > 100 << 20:
      raise SourceError(f"{self.path} is not a safetensors file: header length {header_len} exceeds the file")
    try:
      header = json.loads(os.pread(self._fd, header_len, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
      raise SourceError(f"{self.path}: the safetensors header cannot be parsed ({err})") from None
    header.pop("__metadata__", None)
    self._data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
      dtype, shape, (begin, end) = info.get("dtype"), tuple(info.get("shape", ())), info.get("data_offsets", (0, 0))
      if dtype not in _ITEMSIZES:
        raise SourceError(f"{self.path}: tensor {name!r} has unknown dtype {dtype!r}")
      if end - begin != int(np.prod(shape)) * _ITEMSIZES[dtype] or self._data_start + end > size or begin < 0:
        raise SourceError(f"{self.path}: tensor {name!r} ({dtype} {list(shape)}) has data offsets "
                          f"[{begin}, {end}) that do not fit its shape or the file ({size} bytes): truncated?")
      tensors[name] = (dtype, shape, begin, end)
    return tensors

  def read(self, name: str) -> np.ndarray:
    """The tensor as a float32 array of its stored shape (a fresh copy; nothing of the file stays mapped)."""
    dtype, shape, begin, end = self.tensors[name]
    if dtype not in _FLOAT_DTYPES:
      raise SourceError(f"{self.path}: tensor {name!r} has dtype {dtype}; streaming reads {', '.join(_FLOAT_DTYPES)}")
    offset, length = self._data_start + begin, end - begin
    buffer = bytearray(length)
    view, done = memoryview(buffer), 0
    while done < length:
      got = os.preadv(self._fd, [view[done:]], offset + done)
      if got <= 0:
        raise SourceError(f"{self.path}: tensor {name!r} is cut short at byte {offset + done}: truncated file")
      done += got
    if hasattr(os, "posix_fadvise"):  # the page cache is not ours to fill with a model we read once
      os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)
    raw = np.frombuffer(buffer, dtype=_FLOAT_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":  # bfloat16 is the top half of a float32
      return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32) if dtype != "F32" else raw

  def close(self) -> None:
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)
      self._fd = None


def read_config_json(directory) -> tuple[dict, pathlib.Path]:
  """(the parsed config.json of a Hugging Face directory, its path); SourceError naming the file if absent or
  unparsable."""
  directory = pathlib.Path(directory)
  file = directory / "config.json"
  try:
    return json.loads(file.read_text()), file
  except FileNotFoundError:
    raise SourceError(f"{directory}: no config.json; {_HF_DIRECTORY}") from None
  except json.JSONDecodeError as err:
    raise SourceError(f"{file} cannot be parsed ({err})") from None


class HFDirectory:
  """The safetensors files of a Hugging Face directory as one reader: `read(name, shape)` finds the file holding
  the tensor (a name absent from the files is also looked up with `prefix` in front, e.g. BERT's "bert.")."""

  def __init__(self, directory, prefix: str = ""):
    self.path = pathlib.Path(directory)
    if not self.path.is_dir():
      raise SourceError(f"{self.path} is not a directory; {_HF_DIRECTORY}")
    index = self.path / "model.safetensors.index.json"
    self._files: dict[pathlib.Path, SafetensorsFile] = {}
    self._where: dict[str, SafetensorsFile] = {}
    try:
      if index.is_file():
        self._index = index
        for name, file in json.loads(index.read_text())["weight_map"].items():
          path = self.path / file
          if path not in self._files:
            self._files[path] = SafetensorsFile(path)
          self._where[name] = self._files[path]
      elif (self.path / "model.safetensors").is_file():
        self._index = self.path / "model.safetensors"
        single = self._files[self._index] = SafetensorsFile(self._index)
        self._where = {name: single for name in single.tensors}
      else:
        raise SourceError(f"{self.path}: neither model.safetensors nor model.safetensors.index.json")
    except SourceError:
      self.close()
      raise
    self._prefix = prefix

  def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor `name` as float32, checked to have `shape` and finite values (SourceError naming file and tensor)."""
    stored = name if name in self._where or not self._prefix else self._prefix + name
    file = self._where.get(stored)
    if file is None or stored not in file.tensors:
      raise SourceError(f"{self._index if file is None else file.path}: missing tensor {name!r}")
    if file.tensors[stored][1] != shape:
      raise SourceError(f"{file.path}: tensor {stored!r} has shape {file.tensors[stored][1]}, expected {shape}")
    array = file.read(stored)
    if not np.all(np.isfinite(array)):
      raise SourceError(f"{file.path}: tensor {stored!r} contains NaN or Inf")
    return array

  def release(self) -> None:
    """Nothing to drop: each tensor is read into a fresh array and its page cache advised away."""

  def close(self) -> None:
    for file in self._files.values():
      file.close()
