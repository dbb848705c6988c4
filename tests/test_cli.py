"""The command line on a 2-block slice of the real SmolLM2 (fetched on first use)."""

import json

import pytest

from jaxquant import cli

EXPECTED_KEYS = {"perplexity", "kl", "top1_agreement", "weight_bytes", "fp_weight_bytes", "seconds"}


def _last_json(capsys) -> dict:
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_help_explains_recipes_and_models(capsys):
  with pytest.raises(SystemExit):
    cli.main(["quantize", "--help"])
  text = capsys.readouterr().out
  for word in ("zeroquant-w8a8", "w8a8-per-tensor", "fp", "smollm2-135m", "minilm-l6", "--overwrite"):
    assert word in text


def test_quantize_then_eval_the_saved_directory(tmp_path, capsys):
  out = tmp_path / "q"
  assert cli.main(["quantize", "smollm2-135m", "--layers", "2", "--recipe", "zeroquant-w8a8", "--out", str(out),
                   "--json", "--quiet"]) == 0
  saved = _last_json(capsys)
  assert saved["weight_bytes"] < saved["fp_weight_bytes"]
  assert cli.main(["eval", str(out), "--max-tokens", "512", "--window", "256", "--json", "--quiet"]) == 0
  result = _last_json(capsys)
  assert EXPECTED_KEYS <= set(result)
  assert result["recipe"] == "zeroquant-w8a8" and 0 < result["kl"] < 1 and 0.5 < result["top1_agreement"] <= 1
  # The same recipe applied on the fly gives the same figures as the restored checkpoint.
  assert cli.main(["eval", "smollm2-135m", "--layers", "2", "--recipe", "zeroquant-w8a8", "--max-tokens", "512",
                   "--window", "256", "--json", "--quiet"]) == 0
  assert _last_json(capsys)["kl"] == pytest.approx(result["kl"], rel=1e-6)
  # A different recipe into the same directory is refused without --overwrite.
  assert cli.main(["quantize", "smollm2-135m", "--layers", "2", "--recipe", "fp", "--out", str(out),
                   "--quiet"]) == 2
  assert "--overwrite" in capsys.readouterr().err


def test_lkd_from_the_command_line_streamed_or_loaded_resumable(tmp_path, capsys):
  """LKD on the first block of the real SmolLM2: --stream (the block read from the GGUF file, calibration
  tokenized with the GGUF's tokenizer) stores exactly what the loaded model gives; --lkd-resume keeps finished
  blocks, and a rerun restores them instead of training again."""
  import numpy as np

  from jaxquant import checkpoint, pipeline

  common = ["--layers", "1", "--recipe", "zeroquant-w48a16-lkd", "--lkd-steps", "2", "--json", "--quiet"]
  assert cli.main(["quantize", "smollm2-135m", *common, "--out", str(tmp_path / "loaded"),
                   "--lkd-resume", str(tmp_path / "blocks")]) == 0
  loaded_result = _last_json(capsys)
  assert (tmp_path / "blocks" / "block_000").is_dir()
  assert cli.main(["quantize", "smollm2-135m", *common, "--out", str(tmp_path / "streamed"), "--stream"]) == 0
  streamed_result = _last_json(capsys)
  assert sum(streamed_result["lkd_blocks"].values()) == 1 and streamed_result["lkd_blocks_resumed"] == 0
  assert streamed_result["weight_bytes"] == loaded_result["weight_bytes"]
  import jax
  from flax import nnx
  template = pipeline.load("smollm2-135m", n_layers=1).model
  leaves = [checkpoint.flat_leaves(nnx.state(checkpoint.restore(tmp_path / name, template)))
            for name in ("loaded", "streamed")]
  assert leaves[0].keys() == leaves[1].keys()
  for path in leaves[0]:
    for a, b in zip(jax.tree_util.tree_leaves(leaves[0][path]), jax.tree_util.tree_leaves(leaves[1][path])):
      assert np.array_equal(np.asarray(a), np.asarray(b)), path
  # Other LKD settings make another model: refused before any work without --overwrite.
  assert cli.main(["quantize", "smollm2-135m", *common[:5], "3", "--out", str(tmp_path / "loaded"), "--quiet"]) == 2
  assert "already holds a different checkpoint" in capsys.readouterr().err
  assert cli.main(["quantize", "smollm2-135m", *common[:-2], "--out", str(tmp_path / "again"),
                   "--lkd-resume", str(tmp_path / "blocks")]) == 0
  assert "resumed from" in capsys.readouterr().err
  assert cli.main(["quantize", "smollm2-135m", "--layers", "1", "--recipe", "zeroquant-w8a8", "--lkd-steps", "2",
                   "--out", str(tmp_path / "x"), "--quiet"]) == 2
  assert "apply to LKD recipes" in capsys.readouterr().err
  assert cli.main(["quantize", "smollm2-135m", *common[:5], "0", "--out", str(tmp_path / "x"), "--quiet"]) == 2
  assert "--lkd-steps must be a positive number" in capsys.readouterr().err


def test_unknown_model_lists_the_known_ones(capsys):
  assert cli.main(["eval", "gpt-17", "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "smollm2-135m" in err and "minilm-l6" in err


def test_unknown_recipe_lists_the_recipes(capsys):
  assert cli.main(["eval", "smollm2-135m", "--layers", "1", "--recipe", "w5a5", "--quiet"]) == 2
  assert "zeroquant-w8a8" in capsys.readouterr().err


def test_text_too_short_names_the_file(tmp_path, capsys):
  short = tmp_path / "short.txt"
  short.write_text("Only a few words here.")
  assert cli.main(["eval", "smollm2-135m", "--layers", "1", "--text", str(short), "--quiet"]) == 2
  err = capsys.readouterr().err
  assert "short.txt" in err and "too short" in err
