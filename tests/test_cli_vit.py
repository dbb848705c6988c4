"""The command line on the ViT: `jaxquant quantize <file>.onnx --recipe repquant-w6a6-norecon` then `jaxquant eval` of
the saved directory, on a 1-block slice of the real DINOv2 ViT-S/14 (calibration and evaluation on photo crops).
The -norecon recipe skips the weight reconstruction steps (20 s of the 40 here), which
tests/methods/test_repquant.py runs on image samples; the CLI's part (ONNX in, calibration, save, eval) is the same."""

import json

from jaxquant import assets, cli, measure


def _last_json(capsys) -> dict:
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_quantize_an_onnx_file_with_repquant_then_eval_the_saved_directory(tmp_path, capsys):
  out = tmp_path / "q"
  assert cli.main(["quantize", str(assets.dinov2_onnx_path()), "--layers", "1", "--recipe", "repquant-w6a6-norecon",
                   "--out", str(out), "--json", "--quiet"]) == 0
  saved = _last_json(capsys)
  assert saved["recipe"] == "repquant-w6a6-norecon" and saved["weight_bytes"] < saved["fp_weight_bytes"]
  assert cli.main(["eval", str(out), "--json", "--quiet"]) == 0
  result = _last_json(capsys)
  assert result["recipe"] == "repquant-w6a6-norecon" and result["n_images"] == measure.VIT_EVAL_IMAGES
  assert result["block_bytes"] < result["fp_block_bytes"]
  assert result["cls_cosine"] > 0.95 and result["patch_cosine"] > 0.95 and result["saliency_corr"] > 0.9
  assert result["perplexity"] is None
