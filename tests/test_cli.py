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
