"""Screen one RepQuant setting on the DINOv2 ViT (W4A4 unless the settings say otherwise): the quantized model's
figures on the 48 evaluation crops of experiments/repquant_vit.py, appended as one JSON line (with the commit and
command) to experiments/results/repquant_vit_levers.jsonl. docs/methods.md sums the screens up.

  PYTHONPATH=. .venv/bin/python experiments/repquant_vit_levers.py "recon_weights=True,calibrate_softmax=True" [N_CALIB]

SETTINGS are RepQuantConfig fields (repquant_vit.py's syntax); '' is the recipe's defaults: 100 clipping steps on 2048
tokens, 100 reconstruction steps a block and, from commit 772a961 on, the four choices beyond RepQ-ViT (before it,
RepQ-ViT's own: rows before that commit read their settings against those). Each row records its whole config.
N_CALIB: calibration crops (32).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import common  # noqa: E402
import repquant_vit  # noqa: E402

OUT = common.RESULTS / "repquant_vit_levers.jsonl"


def main() -> None:
  from jaxquant import assets, images, vision
  from jaxquant.methods import repquant as rq
  from jaxquant.sources import onnx as source

  text = sys.argv[1] if len(sys.argv) > 1 else ""
  settings = common.parse_settings(text)
  n_calib = int(sys.argv[2]) if len(sys.argv) > 2 else repquant_vit.N_CALIB
  path = assets.dinov2_onnx_path()
  model = source.load_vit(path)
  ref = vision.reference(model, images.evaluation_images(repquant_vit.N_EVAL),
                         vision.load_decoder(path, model.config.image_size, model.config.grid))
  config = dataclasses.replace(rq.RepQuantConfig(weight_bits=4, act_bits=4), n_samples=n_calib, **settings)
  start = time.perf_counter()
  result = rq.repquant_quantize(model, [images.calibration_images(n_calib)], config, progress=False)
  row = {"settings": settings, "config": dataclasses.asdict(config), "n_calib": n_calib, "seconds": round(time.perf_counter() - start),
         **vision.compare(result.model, ref),
         "norecon_cls_cosine": (vision.compare(result.without_reconstruction, ref)["cls_cosine"]
                                if result.without_reconstruction is not None else None),
         "block_mse": [(b.mse_before, b.mse_after, b.status) for b in result.blocks],
         "finish": dataclasses.asdict(result.finish) if result.finish is not None else None,
         "commit": common.commit(), "command": " ".join(sys.argv)}
  print(json.dumps(row), flush=True)
  with OUT.open("a") as f:
    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
