"""`jaxquant generate`: streams a continuation and reports its figures, from a built-in name, a GGUF path or a saved
checkpoint (2-block slices of the real models); bad requests are refused in one line, exit code 2, before any
model is loaded."""

import json

import pytest

from jaxquant import assets, cli, pipeline

FIGURES = {"time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_bytes",
           "weight_bytes", "new_tokens", "prompt_tokens", "text", "recipe"}


def _last_json(capsys) -> tuple[dict, str]:
  out = capsys.readouterr().out
  return json.loads(out.strip().splitlines()[-1]), out


@pytest.fixture
def no_loading(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded")
  monkeypatch.setattr(pipeline, "load", refuse)


@pytest.mark.parametrize("argv, message", [
    (["smollm2-135m", "--prompt", ""], "the prompt is empty: give some text"),
    (["smollm2-135m", "--prompt", "   "], "the prompt is empty: give some text"),
    (["smollm2-135m", "--prompt", "Hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["smollm2-135m", "--prompt", "Hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["smollm2-135m", "--prompt", "Hi", "--top-k", "0"], "--top-k must be at least 1"),
    (["minilm-l6", "--prompt", "Hi"], "minilm-l6 is an encoder (bert): it embeds text and cannot generate any; "
                                      "give a decoder"),
    (["smollm2-135m", "--prompt", "word " * 9000], "longer than the model's context of 8192: shorten it"),
    (["smollm2-135m", "--prompt", "word " * 8000, "--max-new-tokens", "500"],
     "plus --max-new-tokens 500 exceed the model's context of 8192: lower --max-new-tokens to at most"),
])
def test_bad_requests_are_refused_before_loading(argv, message, capsys, no_loading):
  assert cli.main(["generate", *argv, "--json"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxquant generate: error: ") and message in lines[0], lines


def test_a_saved_encoder_checkpoint_is_refused_before_loading(tmp_path, capsys, monkeypatch):
  out = tmp_path / "minilm"
  assert cli.main(["quantize", "minilm-l6", "--layers", "1", "--recipe", "zeroquant-w8a8", "--out", str(out),
                   "--quiet"]) == 0
  capsys.readouterr()
  monkeypatch.setattr(pipeline, "load", lambda *a, **k: pytest.fail("a model was loaded"))
  assert cli.main(["generate", str(out), "--prompt", "Hi"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "is an encoder (bert)" in err[0]


def test_generate_streams_text_and_reports_figures(capsys):
  common = ["--layers", "2", "--prompt", "Once upon a time", "--max-new-tokens", "6", "--json", "--quiet"]
  assert cli.main(["generate", "smollm2-135m", *common]) == 0
  result, out = _last_json(capsys)
  assert FIGURES <= set(result) and result["recipe"] == "fp" and 1 <= result["new_tokens"] <= 6
  assert out.startswith("Once upon a time" + result["text"])  # the text came out before the figures
  assert result["decode_tokens_per_s"] > 0 and result["time_to_first_token_s"] > 0
  # a GGUF path, a recipe applied on the fly, and sampling that a seed repeats
  sampled = ["--temperature", "1.0", "--top-k", "20", "--seed", "7"]
  path = str(assets.smollm2_gguf_path())
  assert cli.main(["generate", path, *common, "--recipe", "zeroquant-w8a8", *sampled]) == 0
  first, _ = _last_json(capsys)
  assert first["recipe"] == "zeroquant-w8a8" and first["weight_bytes"] < result["weight_bytes"]
  assert cli.main(["generate", path, *common, "--recipe", "zeroquant-w8a8", *sampled]) == 0
  assert _last_json(capsys)[0]["text"] == first["text"]


def test_generate_from_a_saved_checkpoint_equals_the_recipe_on_the_fly(tmp_path, capsys):
  out = tmp_path / "w48"
  assert cli.main(["quantize", "smollm2-135m", "--layers", "2", "--recipe", "zeroquant-w48a16", "--out", str(out),
                   "--quiet"]) == 0
  capsys.readouterr()
  common = ["--prompt", "The weather today", "--max-new-tokens", "5", "--json", "--quiet"]
  assert cli.main(["generate", str(out), *common]) == 0
  saved, _ = _last_json(capsys)
  assert cli.main(["generate", "smollm2-135m", "--layers", "2", "--recipe", "zeroquant-w48a16", *common]) == 0
  on_the_fly, _ = _last_json(capsys)
  assert saved["recipe"] == "zeroquant-w48a16" and saved["text"] == on_the_fly["text"]
  assert saved["weight_bytes"] == on_the_fly["weight_bytes"]
