"""Layer-wise distillation over any weight format: LKD whose student trains the format's own parameters.

ZeroQuant's LKD (methods/lkd.py) trains latent float kernels through a round-to-nearest fake-quant and quantizes
the trained block for real at the end, which suits uniform codes whose scales follow from the weights; for a
format with fitted parameters (BCQ's alphas and offsets) re-running the fit on trained weights throws the trained
parameters away. Here, for each block k in order (the same harness, blockwise.run_blocks):

  1. start from the format's own fit of every rule-matched kernel: BCQ (methods/bcq.py: planes, alphas, offset;
     the fit weighted by each input feature's mean square on block k's own samples, as ActivationAwareBCQ does on
     calibration text) or uniform round-to-nearest (quantizers.WeightQuant: codes, scales, zero points); with
     start="gptq", GPTQ with that fit per group on the Hessian of each linear's inputs (gptq_core);
  2. train a student whose linears hold exactly those parameters (lkd_formats_students, lkd_formats_core): BCQ
     alphas and offsets, uniform scales and zero points, and, with codes="ste", latent float weights from which
     the codes (sign planes, integer codes) are re-derived at every step with a straight-through gradient
     (codes="fixed": the fit's codes are kept and only the format's parameters train); with LKDConfig.train="all"
     the block's norms and biases train too. Loss: LKD's block MSE mean((student(X_k) - Y_k)^2), Y_k the float model's output of
     block k and X_k its input: the float model's (inputs="float", LKD's) or the one blocks 0..k-1 as already
     quantized compute (inputs="quantized", the recipes': block k learns to undo what the blocks before it left);
  3. store the trained parameters as they are, in the same packed array as the fit (BCQArray, QArray: kernels and
     checkpoints see no difference); alphas / offsets are trained through their stored dtype (float16), so the
     stored block computes what the student computed.

Design (measured, experiments/lkd_formats_block.py, lutgemm-bcq3-offset-g128-lkd on SmolLM2-135M blocks 0 / 1,
output MSE on 32 held-out alice29 windows; fit 0.0850 / 0.0777): codes="ste" (the default) 0.0616 / 0.0567 beats
codes="fixed" 0.0679 / 0.0609; at block 0, learning rate 1e-4 0.0682, 1e-3 0.0612 (block 1: 0.0590), format_lr
0.3 0.0621, 3 0.0637: LKD's budget (lkd.BUDGET: 50 steps, cosine) with format_lr 1 is kept.
Inputs and learning rate: docs/methods.md (experiments/lkd_levers.py).

Failure handling (LKD's): a NaN/Inf loss keeps the block's start (the format's own fit, or GPTQ's) for that block
(on_nan="raise" stops); with keep_best (the default) a block whose stored output MSE is not below the start's keeps
the start; both warn naming the block and why. checkpoint_dir resumes finished blocks (blockwise.CheckpointStore);
streaming feeds blocks read from disk (FormatLKDProcedure has LKDProcedure's hooks). Recipes: `RECIPES`
(registered by jaxquant.recipes).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
import warnings
from typing import Callable, Iterable, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxquant import rules as rules_lib
from jaxquant.methods import blockwise, lkd, logit_kl
from jaxquant.methods import lkd_formats_students as students
from jaxquant.methods.bcq import BCQQuant
from jaxquant.quantizers import WeightQuant

CODES = ("ste", "fixed")
INPUTS = ("float", "quantized")
STARTS = ("fit", "gptq")
FORMAT_PARAMS = ("alpha", "offset", "scale", "zero")  # the format's own parameters (format_lr applies to them)


def _has(names: Iterable[str]):
  names = set(names)
  return lambda path: bool(names & {str(getattr(key, "key", getattr(key, "name", key))) for key in path})


def optimizer(config: lkd.LKDConfig, format_lr: float) -> optax.GradientTransformation:
  """AdamW (LKD's schedule) with the format's parameters (alpha, offset, scale, zero) at format_lr times the
  learning rate, and weight decay on the latent weights only (decay would pull scales and offsets to zero)."""
  def rate(factor):
    peak = config.learning_rate * factor
    return optax.cosine_decay_schedule(peak, config.steps) if config.schedule == "cosine" else peak

  is_format, is_latent = _has(FORMAT_PARAMS), _has(("latent",))
  labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: "format" if is_format(p) else "rest", params)
  decay = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: is_latent(p), params)
  return optax.multi_transform({"format": optax.adam(rate(format_lr)),
                                "rest": optax.adamw(rate(1.0), weight_decay=config.weight_decay, mask=decay)}, labels)


# ----------------------------------------------------------------------------------------------------------------
# the run


@dataclasses.dataclass(frozen=True)
class FormatOptions:
  """What format distillation adds to LKDConfig. codes: "ste" (codes re-derived from trained latent weights,
  straight-through) or "fixed" (the fit's codes kept; only the format's parameters and, with train="all", norms
  and biases train). format_lr: the format's parameters' learning rate, as a multiple of LKDConfig's.
  row_weighted: BCQ fits weigh each input row by its mean square on the block's samples (ActivationAwareBCQ,
  floor `damp`); False: the plain squared weight error. inputs: what block k trains on, "float" (the float
  model's input to it, LKD's) or "quantized" (its input through the blocks already quantized; the target stays
  the float block's output on the float input, so block k learns to undo the error the blocks before it left).
  start: "fit" (the format's own fit of each kernel) or "gptq" (GPTQ with that fit per group, on the Hessian of
  each linear's inputs: lkd_formats_students, gptq_core). fit_inputs: where those inputs (the Hessians, the row
  weights) are recorded: "float" (the float model's input to the block) or "quantized" (the input the quantized
  blocks before it compute, as sequential GPTQ; needs inputs="quantized")."""

  codes: str = "ste"
  format_lr: float = 1.0
  row_weighted: bool = True
  damp: float = 0.01
  inputs: str = "float"
  start: str = "fit"
  fit_inputs: str = "float"

  def __post_init__(self):
    if self.codes not in CODES:
      raise lkd.LKDError(f"codes must be one of {CODES}, got {self.codes!r}")
    if not self.format_lr > 0:
      raise lkd.LKDError(f"format_lr must be positive, got {self.format_lr!r}")
    if self.inputs not in INPUTS:
      raise lkd.LKDError(f"inputs must be one of {INPUTS}, got {self.inputs!r}")
    if self.start not in STARTS:
      raise lkd.LKDError(f"start must be one of {STARTS}, got {self.start!r}")
    if self.fit_inputs not in INPUTS:
      raise lkd.LKDError(f"fit_inputs must be one of {INPUTS}, got {self.fit_inputs!r}")
    if self.fit_inputs == "quantized" and self.inputs != "quantized":
      raise lkd.LKDError("fit_inputs='quantized' records the quantized stream, which only inputs='quantized' "
                         f"computes; got inputs={self.inputs!r}")


def distill_block(index: int, block: nnx.Module, x: jax.Array, y: jax.Array, recorded: dict, *, extra: tuple,
                  rules: Sequence[rules_lib.Rule], config: lkd.LKDConfig, options: FormatOptions,
                  step: blockwise.TrainStep, place: Callable = lambda a: a, progress: str | None = None
                  ) -> tuple[nnx.Module, lkd.BlockReport]:
  """Format distillation of one float block on its float input x and output y: (quantized block, report; its
  mse_rtn is the start's output MSE: the format's own fit, or GPTQ's). recorded: module path -> chunks of (sum of
  x^2 per feature, count) for the BCQ row weights, or of the Hessian for GPTQ."""
  name, prefix, chunk = f"layers.{index}", f"layers.{index}.", config.batch_size
  start = time.perf_counter()
  if options.start == "gptq":
    hessians = students.hessians(recorded)
    row_weights = students.row_weights_of(hessians, options.damp) if options.row_weighted else None
  else:
    hessians, row_weights = None, students.mean_squares(recorded, options.damp)
  student = students.make_student(block, prefix, rules, options.codes, row_weights, hessians)
  fit = students.to_block(student, block)
  mse_fit = blockwise.block_mse(fit, x, y, extra, chunk)
  kernels = _has(("latent", *FORMAT_PARAMS))  # train="kernels": the format linears' own parameters only
  trainable = nnx.Param if config.train == "all" else nnx.All(nnx.Param, lambda path, _: kernels(path))
  rng = np.random.default_rng([config.seed, 2, index])
  with tqdm(total=config.steps, desc=f"LKD {name}{progress or ''}", unit="step", disable=progress is None,
            leave=False) as bar:
    trained, losses, nan_step = blockwise.train(student, trainable, x, y, extra, step, config.steps,
                                                config.batch_size, rng, bar, place)
  del student
  candidate = None
  if trained is None:
    message = (f"LKD of block {name}: the loss became {losses[-1] if losses else 'NaN'} at step {nan_step} "
               f"(learning_rate={config.learning_rate}); ")
    if config.on_nan == "raise":
      raise lkd.LKDError(message + "stopping (on_nan='raise')")
    warnings.warn(message + f"this block keeps its start (start={options.start!r}) and LKD goes on with the next block",
                  RuntimeWarning, stacklevel=4)
  else:
    candidate = students.to_block(trained, block)
    del trained
  if candidate is None:
    qblock, mse, status = fit, None, "nan"
  elif config.keep_best:
    qblock, mse, took = blockwise.keep_better(fit, mse_fit, candidate, x, y, extra, chunk)
    status = "lkd" if took else "fit-kept"
    if not took:
      warnings.warn(f"LKD of block {name}: the distilled block's output MSE {mse:.4g} is not below its start's "
                    f"{mse_fit:.4g} (learning_rate={config.learning_rate}); this block keeps its start "
                    f"(start={options.start!r})",
                    RuntimeWarning, stacklevel=4)
  else:
    qblock, mse, status = candidate, blockwise.block_mse(candidate, x, y, extra, chunk), "lkd"
  report = lkd.BlockReport(block=name, status=status, mse_rtn=mse_fit, mse_lkd=mse,
                           first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
                           steps=len(losses), nan_step=nan_step, seconds=time.perf_counter() - start)
  return qblock, report


def distill_blocks(blocks: Iterable[nnx.Module], x: jax.Array, rules: Sequence[rules_lib.Rule],
                   config: lkd.LKDConfig, options: FormatOptions, step: blockwise.TrainStep, *, extra: tuple = (),
                   data_digest: str = "", place: Callable = lambda a: a,
                   checkpoint_dir: pathlib.Path | None = None, n_blocks: int | None = None, progress: bool = True
                   ) -> Iterable[tuple[nnx.Module, lkd.BlockReport]]:
  """Format distillation over float blocks given in order, lazily (blockwise.run_blocks), as lkd.distill_blocks:
  yields (quantized block, report) before the next block is taken. x: (N, T, D) entering the first block."""
  rules = tuple(rules)
  store = None
  if checkpoint_dir is not None:
    store = blockwise.CheckpointStore(pathlib.Path(checkpoint_dir), "LKD", lkd.BlockReport, lkd.LKDError,
                                      data_digest, {"rules": repr(rules), "config": dataclasses.asdict(config),
                                                    "format": dataclasses.asdict(options)})
  total = f"/{n_blocks}" if n_blocks else ""

  def fn(index, block, x, y, recorded):
    return distill_block(index, block, x, y, recorded, extra=extra, rules=rules, config=config, options=options,
                         step=step, place=place, progress=f" ({index + 1}{total})" if progress else None)

  advance = None
  if options.inputs == "quantized":
    advance = lambda result, s: blockwise.apply_block(result[0], s, extra, config.batch_size)
  for qblock, report in blockwise.run_blocks(blocks, x, fn, extra=extra, chunk=config.batch_size, place=place,
                                             record=_record(options), store=store, advance=advance,
                                             record_student=options.fit_inputs == "quantized"):
    if progress:
      if report.resumed:
        tqdm.write(f"LKD {report.block}: resumed from {checkpoint_dir}", file=sys.stderr)
      else:
        gain = f", distilled {report.mse_lkd:.4g}" if report.mse_lkd is not None else ""
        tqdm.write(f"LKD {report.block}: {report.status}; output MSE fit {report.mse_rtn:.4g}{gain} "
                   f"({report.seconds:.1f} s)", file=sys.stderr)
    yield qblock, report
    del qblock, report


def _record(options: FormatOptions) -> Callable | None:
  """What run_blocks records from each block's input: Hessians for GPTQ, mean squares for row weights."""
  if options.start == "gptq":
    return students.record_hessians
  return students.record_inputs if options.row_weighted else None


@dataclasses.dataclass(frozen=True)
class FormatLKDProcedure(lkd.LKDProcedure):
  """A recipe's procedure: format distillation of every block (lkd.lkd_quantize with this procedure's hooks), then
  rule-matched parameters outside the blocks quantized by the rules. config: LKD's settings (the recipes':
  BUDGET); options: FormatOptions. `jaxquant quantize --lkd-steps / --lkd-resume`, lkd.with_lkd_options and
  streaming treat it as any LKD procedure."""

  options: FormatOptions = FormatOptions()
  finish: logit_kl.LogitKLConfig | None = None  # then the logit KL pass over the whole model (methods/logit_kl)

  @property
  def distills_blocks(self) -> bool:  # streaming feeds blocks one at a time: no whole model for the logit pass
    return self.finish is None

  def __call__(self, model, recipe, calibration=None, progress: bool = True):
    calibration = None if calibration is None else list(calibration)
    if self.finish is not None and (calibration is None or isinstance(calibration[0], tuple)):
      raise lkd.LKDError(f"recipe {recipe.name!r}: the logit KL pass trains a decoder on calibration text "
                         "windows; pass (B, T) token batches")
    result = lkd.lkd_quantize(model, recipe.rules, calibration, checkpoint_dir=self.checkpoint_dir,
                              progress=progress, method=self)
    kept = [f"{b.block} ({b.status})" for b in result.blocks if b.status != "lkd"]
    if kept:
      lkd.log.info("format LKD kept the format's own fit for %s", ", ".join(kept))
    if self.finish is None:
      return result.model
    windows = np.concatenate([np.asarray(batch) for batch in calibration])
    quantized, report = logit_kl.finish_on_logits(model, result.model, windows, self.finish, progress)
    lkd.log.info("logit KL pass: held-out KL %.4g -> %.4g (%s, %.0f s)", report.kl_before, report.kl_after,
                 "kept" if report.kept else "not kept", report.seconds)
    return quantized

  def settings(self) -> dict:
    return {"lkd": dataclasses.asdict(self.config), "lkd_format": dataclasses.asdict(self.options),
            **({"logit_kl": dataclasses.asdict(self.finish)} if self.finish is not None else {})}

  def check(self, rules: Sequence[rules_lib.Rule]) -> None:
    students.check_rules(rules)

  def train_step(self) -> blockwise.TrainStep:
    return blockwise.TrainStep(optimizer(self.config, self.options.format_lr))

  def distill(self, blocks, x, rules, step, **options):
    return distill_blocks(blocks, x, rules, self.config, self.options, step, **options)

  def configure(self, recipe: rules_lib.Recipe, checkpoint_dir: str | None = None, **overrides) -> rules_lib.Recipe:
    """The recipe with other settings: FormatOptions fields (codes=, format_lr=, ...) and LKDConfig fields."""
    names = {f.name for f in dataclasses.fields(FormatOptions)}
    mine = {k: v for k, v in overrides.items() if k in names}
    recipe = lkd.with_lkd_options(recipe, checkpoint_dir, **{k: v for k, v in overrides.items() if k not in names})
    procedure = dataclasses.replace(recipe.procedure, options=dataclasses.replace(self.options, **mine))
    return dataclasses.replace(recipe, procedure=procedure)


def with_options(recipe: rules_lib.Recipe, checkpoint_dir: str | None = None, **overrides) -> rules_lib.Recipe:
  """A format-LKD recipe with other settings (LKDConfig or FormatOptions fields) or a checkpoint_dir."""
  if not isinstance(recipe.procedure, FormatLKDProcedure):
    raise lkd.LKDError(f"recipe {recipe.name!r} is not a format-LKD recipe")
  return recipe.procedure.configure(recipe, checkpoint_dir, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# recipes

# LKD's budget (50 steps a block, batch 8 x 128 tokens, cosine, 128 calibration windows), each block trained on
# the input the quantized blocks before it compute, at a learning rate by bits: 1e-3 at 2 and 3 bits, LKD's 3e-4
# at 4, where the fit starts closer (experiments/lkd_levers.py; the module docstring).
BUDGET = lkd.BUDGET
LEARNING_RATES = {2: 1e-3, 3: 1e-3, 4: 3e-4}
OPTIONS = FormatOptions(inputs="quantized")
_HOW = ("then each block, on the input the quantized blocks before it compute, distilled against the float block "
        "(LKD's block MSE, {steps} steps of {batch} x {seq} tokens, lr {lr}): {what}, stored in the same format")
_BCQ_WHAT = "alphas{offset} and latent weights whose sign planes are re-derived each step (straight-through)"
_UNIFORM_WHAT = "scales, zero points and latent weights whose codes are re-derived each step (straight-through)"


def _rate(value: float) -> str:
  return f"{value:.0e}".replace("e-0", "e-")  # 3e-4, not 0.0003


def _how(what: str, config: lkd.LKDConfig = BUDGET) -> str:
  return _HOW.format(steps=config.steps, batch=config.batch_size, seq=config.seq_len, lr=_rate(config.learning_rate),
                     what=what)


_FINISH = ("; then the alphas, offsets and scales of all blocks trained together on the final logits' KL against "
           "the float model ({steps} steps of {batch} calibration windows, lr {lr}; methods/logit_kl.py)")


def _recipe(name: str, start: str, rule: rules_lib.Rule, what: str, data: str = "calibration",
            finish: logit_kl.LogitKLConfig | None = None) -> rules_lib.Recipe:
  config = dataclasses.replace(BUDGET, data=data, learning_rate=LEARNING_RATES[rule.weight.bits])
  source = "calibration text (--calib-text, default lcet10)" if data == "calibration" else \
      "no data (sequences generated by the float model)"
  base, _, detail = start.partition(" (")
  trained = "alphas, offsets and sign planes" if "offset" in what else (
      "alphas and sign planes" if "alphas" in what else "scales, zero points and codes")
  return rules_lib.Recipe(name, f"{base} + layer-wise distillation of its {trained}{' (data-free)' if data != 'calibration' else ''}; "
                          f"{base} ({detail} is each block linear's start, {_how(what, config)}; {source}"
                          + ("" if finish is None else _FINISH.format(steps=finish.steps, batch=finish.batch_size,
                                                                      lr=_rate(finish.learning_rate))) + "; weight-only",
                          (rule,), procedure=FormatLKDProcedure(config, options=OPTIONS, finish=finish),
                          uses_calibration=data == "calibration")


def _recipes() -> tuple[rules_lib.Recipe, ...]:
  specs = []  # (name of the fit, its description, rule, what distillation trains)
  for q in (2, 3, 4):
    for g in (64, 128):
      for offset in (False, True):
        base = f"lutgemm-bcq{q}{'-offset' if offset else ''}-g{g}"
        specs.append((base, f"{base} (BCQ, {q} planes, group {g}, fit weighted by the block's input mean squares)",
                      rules_lib.Rule(rules_lib.BLOCK_LINEARS, BCQQuant(bits=q, group_size=g, offset=offset)),
                      _BCQ_WHAT.format(offset=" and offsets" if offset else "")))
  for q in (2, 3, 4):
    for g in (64, 128):
      specs.append((f"rtn-w{q}-g{g}", f"rtn-w{q}-g{g} (uniform asymmetric, group {g})",
                    rules_lib.Rule(rules_lib.BLOCK_LINEARS, WeightQuant(bits=q, symmetric=False, granularity="group",
                                                                        group_size=g)), _UNIFORM_WHAT))
  out = [_recipe(f"{base}-lkd", start, rule, what) for base, start, rule, what in specs]
  out += [_recipe(f"{base}-lkd-kl", start, rule, what, finish=logit_kl.LogitKLConfig())
          for base, start, rule, what in specs if base in KL_FITS]  # issue 18, item 2: the table's fits
  generated = {"lutgemm-bcq3-offset-g128": "lutgemm-bcq3-offset-g128 (BCQ, 3 planes, group 128, fit weighted by the "
                                           "generated samples' input mean squares)"}
  out += [_recipe(f"{base}-lkd-datafree", generated.get(base, start), rule, what, data="generated")
          for base, start, rule, what in specs if base in ("lutgemm-bcq3-offset-g128", "rtn-w3-g128")]
  return tuple(out)


KL_FITS = ("lutgemm-bcq4-offset-g128", "lutgemm-bcq3-offset-g128", "lutgemm-bcq2-g128", "lutgemm-bcq3-offset-g64",
           "rtn-w3-g128")
RECIPES: tuple[rules_lib.Recipe, ...] = _recipes()
