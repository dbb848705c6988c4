"""Scaling: streaming quantization's peak memory and time vs depth (1 and 8 devices), and sharded == unsharded
on SmolLM2-135M.

Streaming. Synthetic llama-family models with random weights (std 0.02 linears, norms near 1; vocabulary 32000,
tied embeddings) are written to disk as Hugging Face directories (config.json + one float32 model.safetensors),
64 blocks deep at two widths; the depth-d model is the first d blocks (config n_layers=d: streaming never reads
the others). Each point quantizes with `zeroquant-w48a16-g64` (int4 MLP / int8 attention, K groups of 64)
through jaxquant.streaming in its own process under /usr/bin/time -v: peak RSS and wall seconds of the whole
process (start, read, quantize, write). On 8 simulated CPU devices (jax_num_cpu_devices=8) each block is split
tensor-parallel over a mesh of 8 and quantized per shard. For contrast, the whole-model path (load every weight,
quantize_model, checkpoint.save) at the smaller width.

SmolLM2. The full 30-block model in one process with 8 simulated devices: quantized unsharded and sharded
(weight-only W4/8 column-parallel on data 2 x model 4; W8A8 per-channel tensor-parallel on model 8), stored bytes
compared, logits on 4 x 128 tokens of alice29 compared; the W8A8 checkpoint saved from the 8 devices is
restored on a mesh of 2 in that process and on 1 device in a separate 1-device process, logits compared.
And the real SmolLM2-135M GGUF quantized through the CLI with and without --stream, each its own measured process.

  nice -n 10 .venv/bin/python experiments/scaling.py            # everything (~10-15 min on 2 shared cores)
  .venv/bin/python experiments/scaling.py point --source DIR --depth 4 --devices 8 --out /tmp/q
  .venv/bin/python experiments/scaling.py smollm2               # the SmolLM2 checks alone (prints JSON)
  .venv/bin/python experiments/scaling.py --stages smollm2-streaming   # rerun one stage, keep the others
  .venv/bin/python experiments/scaling.py --stages ""           # only rewrite table, figure and README

Writes experiments/results/scaling.json, scaling.md, scaling.svg and README's table:scaling region.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "tests"))  # tests/fixtures_hf.py writes the synthetic sources

import common  # noqa: E402  (experiments/common.py)

RESULTS = REPO / "experiments" / "results"
RECIPE = "zeroquant-w48a16-g64"
DEPTHS = (4, 8, 16, 32, 64)
WIDTHS = {  # name -> LlamaConfig fields (llama proportions: ffn 3x dim, grouped-query attention, head_dim 64)
    "d512": dict(vocab_size=32000, dim=512, n_heads=8, n_kv_heads=4, head_dim=64, ffn_dim=1536),
    "d1024": dict(vocab_size=32000, dim=1024, n_heads=16, n_kv_heads=8, head_dim=64, ffn_dim=3072),
}
WHOLE_WIDTH = "d512"
SMOL_TOKENS = (4, 128)
SMOL_STREAM_RECIPE = "zeroquant-w48a16"


def _config(width: str, n_layers: int):
  from jaxquant.models.llama import LlamaConfig
  return LlamaConfig(n_layers=n_layers, **WIDTHS[width])


# ----------------------------------------------------------------------------------------------------------------
# child processes


def point_main(argv: list[str]) -> None:
  """One measured point: stream (or load whole and quantize) one source at one depth on 1 or N devices."""
  parser = argparse.ArgumentParser(prog="scaling.py point")
  parser.add_argument("--source", required=True)
  parser.add_argument("--depth", type=int, required=True)
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--out", required=True)
  parser.add_argument("--recipe", default=RECIPE)
  parser.add_argument("--whole", action="store_true", help="load the whole model, quantize_model, save")
  args = parser.parse_args(argv)
  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  import time
  from jaxquant import checkpoint, pipeline, recipes, rules, sharding, streaming
  from jaxquant.sources.loading import load_model

  recipe = recipes.get_recipe(args.recipe)
  if args.whole:
    start = time.perf_counter()
    model = load_model(args.source, n_layers=args.depth, family="llama")
    quantized = pipeline.quantize_model(model, recipe, progress=False)
    checkpoint.save(args.out, quantized, recipe_name=recipe.name, source={"name": args.source, "n_layers": args.depth})
    print(json.dumps({"seconds": time.perf_counter() - start, "devices": 1}))
    return
  mesh = sharding.make_mesh(model=args.devices) if args.devices > 1 else None
  report = streaming.stream_quantize(args.source, args.out, recipe, n_layers=args.depth, mesh=mesh, progress=False)
  print(json.dumps({"seconds": report.seconds, "parts": report.parts, "read_bytes": report.read_bytes,
                    "stored_bytes": report.stored_bytes, "devices": len(jax.devices())}))


ONE_DEVICE_RESTORE = """
import json, sys, jax, numpy as np
from flax import nnx
from jaxquant import checkpoint, pipeline
loaded = pipeline.load("smollm2-135m")
model = checkpoint.restore(sys.argv[1], loaded.model)
logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, np.load(sys.argv[2])))
np.save(sys.argv[3], logits)
print(json.dumps({"devices": len(jax.devices())}))
"""


def smollm2_main(argv: list[str]) -> dict:
  """Sharded vs unsharded quantization and logits on the full SmolLM2-135M; checkpoints 8 -> 2 -> 1 device."""
  import jax
  jax.config.update("jax_num_cpu_devices", 8)
  import subprocess

  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from jaxquant import checkpoint, data, pipeline, recipes, rules, sharding
  from jaxquant.quantizers import WeightQuant

  loaded = pipeline.load("smollm2-135m")
  text, _ = data.load_text("alice29")
  count = SMOL_TOKENS[0] * SMOL_TOKENS[1]
  tokens = np.asarray(data.tokenize(loaded.tokenizer, text)[:count], np.int32).reshape(SMOL_TOKENS)
  forward = nnx.jit(lambda m, t: m(t))
  logits = lambda model, batch: np.asarray(forward(model, batch))

  def leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(nnx.state(a)), jax.tree_util.tree_leaves(nnx.state(b))
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))

  def compare(name, recipe_rules, layout, mesh_shape):
    mesh = sharding.make_mesh(**mesh_shape)
    reference = pipeline.quantize_model(loaded.model, rules.Recipe(name, name, recipe_rules), progress=False)
    sharded = sharding.quantize_model_sharded(loaded.model, recipe_rules, mesh, sharding.LAYOUTS[layout],
                                              progress=False)
    expected = logits(reference, tokens)
    batch = sharding.shard_batch(tokens, mesh) if mesh_shape.get("data", 1) > 1 else tokens
    got = logits(sharded, batch)
    identical = leaves_equal(sharded, reference)
    graphdef, state = nnx.split(nnx.clone(reference))  # a copy: the reference itself stays as quantized
    embedding = state["embed"]["embedding"]
    embedding.set_value(jnp.nextafter(embedding.get_value(), jnp.float32(np.inf)))
    one_ulp = np.abs(logits(nnx.merge(graphdef, state), tokens) - expected)
    difference = np.abs(got - expected)
    row = {"recipe": name, "layout": layout, "mesh": mesh_shape, "stored_bytes_identical": identical,
           "max_abs_logit_difference": float(difference.max()), "mean_abs_logit_difference": float(difference.mean()),
           "top1_agreement": float(np.mean(got.argmax(-1) == expected.argmax(-1))),
           "max_abs_logit": float(np.abs(expected).max()),
           "one_ulp_embedding_max_difference": float(one_ulp.max()),
           "one_ulp_embedding_mean_difference": float(one_ulp.mean())}
    print(json.dumps(row), flush=True)
    return row, sharded, reference, expected

  w48 = recipes.get_recipe("zeroquant-w48a16").rules
  w8a8 = (rules.Rule(rules.BLOCK_LINEARS, WeightQuant(8, True, "channel"), activation="token"),)
  rows = [compare("zeroquant-w48a16", w48, "column", {"data": 2, "model": 4})[0]]
  row, sharded, reference, expected = compare("w8a8-channel", w8a8, "tensor", {"model": 8})
  rows.append(row)

  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    checkpoint.save(tmp / "on8", sharded, recipe_name="w8a8-channel", source=loaded.source)
    on_two = checkpoint.restore(tmp / "on8", loaded.model,
                                shardings=sharding.leaf_shardings(sharding.make_mesh(model=2)))
    two = logits(on_two, tokens)
    np.save(tmp / "tokens.npy", tokens)
    done = subprocess.run([sys.executable, "-c", ONE_DEVICE_RESTORE, str(tmp / "on8"), str(tmp / "tokens.npy"),
                           str(tmp / "one.npy")], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(done.stderr[-3000:])
    one_devices = json.loads(done.stdout.strip().splitlines()[-1])["devices"]
    one = np.load(tmp / "one.npy")
    restore = {"saved_from_devices": 8,
               "restored_on_2_stored_bytes_identical": leaves_equal(on_two, reference),
               "restored_on_2_max_abs_logit_difference": float(np.abs(two - logits(sharded, tokens)).max()),
               "restored_on_1_process_devices": one_devices,
               "restored_on_1_logits_identical_to_unsharded": bool(np.array_equal(one, expected)),
               "restored_on_1_max_abs_logit_difference": float(np.abs(one - expected).max())}
  print(json.dumps(restore), flush=True)
  return {"tokens": list(SMOL_TOKENS), "rows": rows, "checkpoint": restore}


# ----------------------------------------------------------------------------------------------------------------
# the sweep


def run_points(work: pathlib.Path) -> list[dict]:
  from fixtures_hf import write_hf_llama

  rows = []
  for width in WIDTHS:
    source = work / f"synthetic-{width}"
    written = write_hf_llama(source, _config(width, max(DEPTHS)), seed=0)
    print(f"wrote {source} ({written / 2**30:.2f} GiB)", flush=True)
    series = [(1, False), (8, False)] + ([(1, True)] if width == WHOLE_WIDTH else [])
    for devices, whole in series:
      for depth in DEPTHS:
        out = work / "out"
        args = [str(pathlib.Path(__file__).resolve()), "point", "--source", str(source), "--depth", str(depth),
                "--devices", str(devices), "--out", str(out)] + (["--whole"] if whole else [])
        result = common.measured_run(args)
        row = {"width": width, "dim": WIDTHS[width]["dim"], "depth": depth, "devices": devices,
               "mode": "whole model" if whole else "streaming", **result}
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("width", "depth", "devices", "mode", "peak_rss_bytes", "seconds")}),
              flush=True)
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(source, ignore_errors=True)
  return rows


def series_key(row: dict) -> str:
  return f"{row['width']}, {row['devices']} device{'s' if row['devices'] > 1 else ''}, {row['mode']}"


def render(rows: list[dict], smol: dict, smol_streaming: list[dict]) -> str:
  keys = list(dict.fromkeys(series_key(r) for r in rows))
  table = {(series_key(r), r["depth"]): r for r in rows}
  lines = ["Peak RSS (MiB) and wall seconds of one process quantizing a synthetic llama with "
           f"`{RECIPE}`, by depth (blocks):", "",
           "| series | " + " | ".join(f"{d} blocks" for d in DEPTHS) + " | peak 64 / peak 4 |",
           "|---|" + "---|" * (len(DEPTHS) + 1)]
  for key in keys:
    cells = []
    for depth in DEPTHS:
      row = table.get((key, depth))
      cells.append("" if row is None else f"{row['peak_rss_bytes'] / 2**20:.0f} MiB, {row['seconds']:.1f} s")
    first, last = table.get((key, DEPTHS[0])), table.get((key, DEPTHS[-1]))
    ratio = f"{last['peak_rss_bytes'] / first['peak_rss_bytes']:.2f}x" if first and last else ""
    lines.append(f"| {key} | " + " | ".join(cells) + f" | {ratio} |")
  lines.append("")
  overhead = [r["process_wall_seconds"] - r["seconds"] for r in rows]
  sizes = {r["width"]: r for r in rows if r["depth"] == DEPTHS[-1] and r["mode"] == "streaming" and "read_bytes" in r}
  lines.append("Float32 weights read at 64 blocks: " + ", ".join(
      f"{w} {r['read_bytes'] / 2**30:.2f} GiB (stored quantized {r['stored_bytes'] / 2**30:.2f} GiB)"
      for w, r in sizes.items()) + ". Seconds: streaming's own (read, quantize, write), or load + quantize + save "
      "for the whole-model rows; the process's start and imports add "
      f"{min(overhead):.1f} to {max(overhead):.1f} s more (process wall time minus these seconds).")
  stream, whole = (next(r for r in smol_streaming if r["mode"] == mode) for mode in ("streaming", "whole model"))
  lines += ["", f"The real SmolLM2-135M GGUF (30 blocks), `jaxquant quantize smollm2-135m --recipe "
            f"{SMOL_STREAM_RECIPE}` with `--stream`: peak RSS {stream['peak_rss_bytes'] / 2**20:.0f} MiB, "
            f"{stream['process_wall_seconds']:.1f} s; without (load the whole model, quantize, save): "
            f"{whole['peak_rss_bytes'] / 2**20:.0f} MiB, {whole['process_wall_seconds']:.1f} s (process wall "
            f"times); both store {stream['weight_bytes'] / 1e6:.1f} MB."]
  if smol:
    lines += ["", f"SmolLM2-135M (30 blocks), logits on {smol['tokens'][0]} x {smol['tokens'][1]} tokens of "
              "alice29, sharded vs unsharded quantization on 8 simulated CPU devices:", "",
              "| recipe | layout | mesh | stored bytes identical | max abs logit diff | mean abs diff | top-1 "
              "agreement | one-ulp embedding change: max / mean diff |", "|---|---|---|---|---|---|---|---|"]
    for row in smol["rows"]:
      mesh = " x ".join(f"{k} {v}" for k, v in row["mesh"].items())
      lines.append(f"| `{row['recipe']}` | {row['layout']} | {mesh} | {row['stored_bytes_identical']} | "
                   f"{row['max_abs_logit_difference']:.3g} | {row['mean_abs_logit_difference']:.3g} | "
                   f"{row['top1_agreement']:.4f} | {row['one_ulp_embedding_max_difference']:.3g} / "
                   f"{row['one_ulp_embedding_mean_difference']:.3g} |")
    c = smol["checkpoint"]
    lines += ["", f"Checkpoint of the W8A8 model saved from 8 devices: restored on a mesh of 2, stored bytes "
              f"identical: {c['restored_on_2_stored_bytes_identical']} (max logit difference to the 8-device model "
              f"{c['restored_on_2_max_abs_logit_difference']:.3g}); restored in a {c['restored_on_1_process_devices']}"
              f"-device process, logits identical to the unsharded quantized model: "
              f"{c['restored_on_1_logits_identical_to_unsharded']} (max difference "
              f"{c['restored_on_1_max_abs_logit_difference']:.3g})."]
  return "\n".join(lines) + "\n"


def svg_plot(rows: list[dict], file: pathlib.Path) -> None:
  """Two panels (peak RSS, seconds) vs depth on a log2 axis, one line per series; plain SVG, no plotting library."""
  import math

  keys = list(dict.fromkeys(series_key(r) for r in rows))
  colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
  width, height, margin = 440, 300, dict(left=64, right=16, top=30, bottom=44)
  panels = [("peak RSS (MiB)", lambda r: r["peak_rss_bytes"] / 2**20), ("seconds", lambda r: r["seconds"])]
  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{height + 26 * len(keys) // 2 + 30}" '
         f'font-family="sans-serif" font-size="12">', '<rect width="100%" height="100%" fill="white"/>']
  for panel, (title, value) in enumerate(panels):
    x0 = panel * width
    top = max(value(r) for r in rows) * 1.1
    step = 10 ** math.floor(math.log10(top / 4))
    step *= 2 if top / step > 10 else 1
    px = lambda depth: x0 + margin["left"] + (math.log2(depth) - 2) / 4 * (width - margin["left"] - margin["right"])
    py = lambda v: height - margin["bottom"] - v / top * (height - margin["top"] - margin["bottom"])
    out.append(f'<text x="{x0 + width / 2}" y="18" text-anchor="middle" font-weight="bold">{title} vs depth</text>')
    out.append(f'<line x1="{px(4)}" y1="{py(0)}" x2="{px(64)}" y2="{py(0)}" stroke="black"/>')
    out.append(f'<line x1="{px(4)}" y1="{py(0)}" x2="{px(4)}" y2="{py(top)}" stroke="black"/>')
    for depth in DEPTHS:
      out.append(f'<text x="{px(depth)}" y="{py(0) + 16}" text-anchor="middle">{depth}</text>')
    out.append(f'<text x="{(px(4) + px(64)) / 2}" y="{py(0) + 34}" text-anchor="middle">blocks</text>')
    tick = 0.0
    while tick <= top:
      out.append(f'<line x1="{px(4) - 4}" y1="{py(tick)}" x2="{px(64)}" y2="{py(tick)}" stroke="#ddd"/>')
      out.append(f'<text x="{px(4) - 6}" y="{py(tick) + 4}" text-anchor="end">{tick:g}</text>')
      tick += step
    for index, key in enumerate(keys):
      points = sorted((r["depth"], value(r)) for r in rows if series_key(r) == key)
      dash = ' stroke-dasharray="5,3"' if "whole" in key else ""
      path = " ".join(f"{px(d):.1f},{py(v):.1f}" for d, v in points)
      out.append(f'<polyline points="{path}" fill="none" stroke="{colors[index % len(colors)]}" '
                 f'stroke-width="2"{dash}/>')
      for d, v in points:
        out.append(f'<circle cx="{px(d):.1f}" cy="{py(v):.1f}" r="3" fill="{colors[index % len(colors)]}"/>')
  for index, key in enumerate(keys):
    x, y = 20 + (index % 2) * width, height + 10 + (index // 2) * 22
    dash = ' stroke-dasharray="5,3"' if "whole" in key else ""
    out.append(f'<line x1="{x}" y1="{y}" x2="{x + 24}" y2="{y}" stroke="{colors[index % len(colors)]}" '
               f'stroke-width="2"{dash}/><text x="{x + 30}" y="{y + 4}">{key}</text>')
  out.append("</svg>")
  file.write_text("\n".join(out) + "\n")


def run_smollm2_streaming() -> list[dict]:
  """The real SmolLM2-135M GGUF through the CLI, streamed and whole, each its own measured process."""
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for stream in (True, False):
      out = pathlib.Path(tmp) / ("stream" if stream else "whole")
      args = ["-m", "jaxquant.cli", "quantize", "smollm2-135m", "--recipe", SMOL_STREAM_RECIPE, "--out", str(out),
              "--json", "--quiet"] + (["--stream"] if stream else [])
      rows.append({"mode": "streaming" if stream else "whole model", **common.measured_run(args)})
      print(json.dumps(rows[-1]), flush=True)
  return rows


STAGES = ("points", "smollm2", "smollm2-streaming")


def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1] == "point":
    point_main(sys.argv[2:])
    return
  if len(sys.argv) > 1 and sys.argv[1] == "smollm2":
    print(json.dumps(smollm2_main(sys.argv[2:])))
    return
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--stages", default=",".join(STAGES),
                      help=f"comma-separated stages to (re)run, of {STAGES}; the others are kept from "
                           f"results/scaling.json (none: only rewrite table, figure and README)")
  args = parser.parse_args()
  stages = [stage for stage in args.stages.split(",") if stage]
  unknown = set(stages) - set(STAGES)
  if unknown:
    parser.error(f"unknown stages {sorted(unknown)}: choose from {STAGES}")
  file = RESULTS / "scaling.json"
  results = json.loads(file.read_text()) if file.exists() else {}
  missing = [stage for stage in STAGES if stage not in stages and not results.get(stage.replace("-", "_"))
             and not (stage == "points" and results.get("points"))]
  if missing:
    parser.error(f"{file} lacks the stages {missing}: run them too")
  if "smollm2" in stages:
    results["smollm2"] = common.measured_run([str(pathlib.Path(__file__).resolve()), "smollm2"])
  if "smollm2-streaming" in stages:
    results["smollm2_streaming"] = run_smollm2_streaming()
  if "points" in stages:
    work = pathlib.Path(tempfile.gettempdir()) / "jaxquant-scaling"  # the synthetic sources are a few GiB
    work.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
      results["points"] = run_points(pathlib.Path(tmp))
  # Stages rerun at different times keep their own commit and command.
  results |= {"recipe": RECIPE, "widths": WIDTHS,
              "provenance": {**results.get("provenance", {}), **{stage: common.provenance() for stage in stages}}}
  RESULTS.mkdir(parents=True, exist_ok=True)
  file.write_text(json.dumps(results, indent=1))
  svg_plot(results["points"], RESULTS / "scaling.svg")
  table = render(results["points"], results["smollm2"], results["smollm2_streaming"])
  (RESULTS / "scaling.md").write_text(table)
  common.write_readme_region("scaling", table)
  print(table)


if __name__ == "__main__":
  main()
