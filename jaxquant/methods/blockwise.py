"""The block-wise harness that every calibrating method uses (LKD, RepQuant's reconstruction, BCQ's activation
statistics): calibration samples, the hidden states entering each block, one block's output and MSE, a jitted
minibatch training step, and `run_blocks`, the one loop over a model's blocks.

Contract of `run_blocks`: blocks are taken in order, lazily (a caller may read them from disk); for block k,
x_k is the *float* model's input to it (the embeddings, then float blocks 0..k-1), y_k = block_k(x_k) its float
output, and `fn(k, block, x_k, y_k, recorded)` returns whatever the method makes of the block (with `advance`, fn
is given instead the input the blocks already quantized compute, while y_k stays the float output). Results are yielded
before block k+1 is taken; after each block nothing of it stays referenced and freed memory is handed back to the
OS, so memory is flat in depth. With a `store`, finished results are saved as they come and restored on a rerun.

Samples are token windows (N, T) int32 with an optional padding mask, or images (N, H, W, C) float32 for a model
with an `input_shape`; `extra` is what a block takes after h (models.protocol: `model.block_extras`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import time
from typing import Any, Callable, Iterable, Iterator, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jaxquant import checkpoint
from jaxquant.models import decode, surgery
from jaxquant.models.protocol import check_block_model
from jaxquant.models.sampling import Sampler


class BlockwiseError(ValueError):
  """Samples or settings the harness cannot run with; the message names the setting or data at fault."""


# ----------------------------------------------------------------------------------------------------------------
# samples


def samples_from_batches(batches: Iterable, seq_len: int | None, n_samples: int | None, min_samples: int = 1,
                         what: str = "calibration") -> tuple[np.ndarray, np.ndarray | None]:
  """Calibration batches -> (samples, mask (N, T) int32 or None). A batch is a (B, T) token array, a (tokens,
  mask) pair, or a float array of images (B, H, W, C) for a model whose inputs are images (models.protocol
  `input_shape`). Token rows longer than seq_len are cut into windows of seq_len (the tail dropped); images are
  kept whole as float32. At most n_samples rows are kept (None: all). Fewer than min_samples rows raise
  BlockwiseError."""
  tokens, masks = [], []
  for batch in batches:
    ids, mask = (np.asarray(b) for b in batch) if isinstance(batch, (tuple, list)) else (np.asarray(batch), None)
    if np.issubdtype(ids.dtype, np.floating) and ids.ndim == 4 and mask is None:
      tokens.append(ids.astype(np.float32))  # images: no windows, no padding
      masks.append(None)
      continue
    if ids.ndim != 2:
      raise BlockwiseError(f"{what} batches must be (batch, tokens) arrays or float (batch, height, width, "
                           f"channels) images, got shape {ids.shape}")
    if seq_len is not None and ids.shape[1] > seq_len:
      n = ids.shape[1] // seq_len
      cut = lambda a: a[:, :n * seq_len].reshape(-1, seq_len)
      ids, mask = cut(ids), (cut(mask) if mask is not None else None)
    tokens.append(ids.astype(np.int32))
    masks.append(mask)
  if not tokens:
    raise BlockwiseError(f"got no {what} batches")
  if len({t.shape[1:] for t in tokens}) > 1:
    raise BlockwiseError(f"{what} batches have different lengths {sorted({t.shape[1] for t in tokens})}")
  ids = np.concatenate(tokens)[:n_samples]
  mask = None
  if any(m is not None for m in masks):
    mask = np.concatenate([m if m is not None else np.ones_like(t) for m, t in zip(masks, tokens)])
    mask = mask[:n_samples].astype(np.int32)
  if len(ids) < min_samples:
    kind = (f"image(s) of shape {ids.shape[1:]}" if ids.ndim == 4
            else f"sample(s) of {ids.shape[1]} tokens ({ids.size} tokens)")
    fix = "give more images" if ids.ndim == 4 else "give a longer text or more samples"
    raise BlockwiseError(f"at least {min_samples} {what} samples are needed; the {what} data gives {len(ids)} "
                         f"{kind}: {fix}")
  return ids, mask


def random_inputs(model: nnx.Module, n: int, seq_len: int, seed: int) -> np.ndarray:
  """n random inputs for `model`: standard normal images of its `input_shape` where it has one (a ViT), else
  (n, seq_len) token ids uniform over config.vocab_size."""
  shape = getattr(model, "input_shape", None)
  if shape is not None:
    return np.random.default_rng([seed, 1]).standard_normal((n, *shape)).astype(np.float32)
  return random_tokens(int(model.config.vocab_size), n, seq_len, seed)


def random_tokens(vocab_size: int, n: int, seq_len: int, seed: int) -> np.ndarray:
  """(n, seq_len) int32 uniform over the vocabulary."""
  return np.random.default_rng([seed, 1]).integers(0, vocab_size, size=(n, seq_len), dtype=np.int32)


GENERATE_BATCH = 32  # sequences decoded together: the KV cache of SmolLM2 is ~48 MiB per 32 x 128 tokens a block


def generate_tokens(model: nnx.Module, n: int, seq_len: int, seed: int = 0, temperature: float = 1.0,
                    progress: bool = True, batch_size: int = GENERATE_BATCH) -> np.ndarray:
  """(n, seq_len) int32 sequences sampled from a float decoder itself (models.decode, KV cache): the first token
  uniform over the vocabulary, every next one from softmax(logits / temperature); a model that reads text after
  BOS (config.add_bos, Gemma) gets BOS first and the uniform token second. Sequences are decoded batch_size at a
  time (memory: one batch's cache), batch b from the key fold_in(key(seed), b)."""
  config = model.config
  bos = config.bos_token_id if getattr(config, "add_bos", False) and seq_len > 1 else None
  first = random_tokens(int(config.vocab_size), n, 1, seed)[:, 0]
  out = np.zeros((n, seq_len), np.int32)
  out[:, 0] = first
  if bos is not None:  # [BOS, uniform, sampled...]: decoded from the two-token prompt
    out[:, 0], out[:, 1] = bos, first
  if seq_len == 1 or (bos is not None and seq_len == 2):
    return out
  decoder = decode.Decoder(model, Sampler(temperature=temperature))
  n_batches = math.ceil(n / batch_size)
  with tqdm(total=n_batches * (seq_len - (1 if bos is None else 2)), desc="generate", unit="tok", disable=not progress, leave=False) as bar:
    for b in range(n_batches):
      rows = slice(b * batch_size, min(n, (b + 1) * batch_size))
      width = 1 if bos is None else 2
      prompt = np.zeros((batch_size, width), np.int32)  # a full batch always: one compilation
      prompt[:rows.stop - rows.start] = out[rows, :width]
      result = decode.generate(decoder, prompt, seq_len - width, key=jax.random.fold_in(jax.random.key(seed), b),
                               on_token=lambda i, tokens: bar.update(1))
      out[rows, width:] = result.tokens[:rows.stop - rows.start]
  return out


def digest(ids: np.ndarray, mask: np.ndarray | None) -> str:
  """sha256 of the samples (what a resumed run must have trained on)."""
  return hashlib.sha256(ids.tobytes() + (mask.tobytes() if mask is not None else b"")).hexdigest()


def placer(data_sharding: jax.sharding.Sharding | None, batch_size: int, n_samples: int
           ) -> Callable[[jax.Array], jax.Array]:
  """device_put onto data_sharding (identity without one); refuses a batch its sample axis does not divide."""
  if data_sharding is None:
    return lambda a: a
  if not isinstance(data_sharding, jax.sharding.NamedSharding):
    raise BlockwiseError(f"data_sharding must be a NamedSharding (e.g. NamedSharding(mesh, P('data'))), "
                         f"not {type(data_sharding).__name__}")
  spec = tuple(data_sharding.spec)
  axes = spec[0] if spec else None
  axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
  split = math.prod(data_sharding.mesh.shape[a] for a in axes)
  for what, count in (("batch_size", batch_size), ("number of samples", n_samples)):
    if count % split:
      raise BlockwiseError(f"{what}={count} cannot be split over the {split} devices of data_sharding axis "
                           f"{axes}: use a {what} that is a multiple of {split}")
  return lambda a: jax.device_put(a, data_sharding)


# ----------------------------------------------------------------------------------------------------------------
# hidden states and one block


def chunks(n: int, size: int) -> Iterator[slice]:
  for start in range(0, n, size):
    yield slice(start, min(n, start + size))


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, state, ids):
  return nnx.merge(graphdef, state).embed_tokens(ids)


def embed_samples(embed: Callable[[jax.Array], jax.Array], ids: np.ndarray, chunk: int,
                  place: Callable = lambda a: a) -> jax.Array:
  """The hidden states entering the first block: embed(tokens (B, T)) -> (B, T, D) over the samples ids (N, T),
  `chunk` rows at a time, placed by `place`."""
  return place(jnp.concatenate([embed(jnp.asarray(ids[rows])) for rows in chunks(len(ids), chunk)]))


def model_inputs(model: nnx.Module, ids: np.ndarray, mask: np.ndarray | None, chunk: int,
                 place: Callable = lambda a: a, what: str = "block-wise calibration") -> tuple[jax.Array, tuple]:
  """(x (N, T, D) entering the first block, the blocks' extra inputs) for samples of a models.protocol.BlockModel;
  `model` is not modified."""
  check_block_model(model, what)
  graphdef, state = nnx.split(model)
  x = embed_samples(lambda tokens: _embed(graphdef, state, tokens), ids, chunk, place)
  extra = tuple(place(jnp.asarray(e)) for e in model.block_extras(jnp.asarray(ids),
                                                                   None if mask is None else jnp.asarray(mask)))
  return x, extra


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, x, extra):
  return nnx.merge(graphdef, state)(x, *extra)


@functools.partial(jax.jit, static_argnums=0)
def _sq_err_sum(graphdef, state, x, y, extra):
  return jnp.sum(jnp.square(nnx.merge(graphdef, state)(x, *extra) - y))


@functools.partial(jax.jit, static_argnums=0)
def _apply_recording(graphdef, state, x, extra):
  out, sown = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(x, *extra)
  return out, sown


def apply_block(block: nnx.Module, x: jax.Array, extra: tuple, chunk: int) -> jax.Array:
  """block(x, *extra) over the samples in chunks of `chunk` rows (one compilation per block graph)."""
  graphdef, state = nnx.split(block)
  return jnp.concatenate([_apply(graphdef, state, x[s], tuple(e[s] for e in extra)) for s in chunks(len(x), chunk)])


def apply_recording(block: nnx.Module, x: jax.Array, extra: tuple, chunk: int, paths: Iterable[str],
                    reduce: Callable = surgery.identity) -> tuple[jax.Array, dict[str, list]]:
  """(block(x, *extra), {module path: [reduce(its input) for each chunk of `chunk` rows]}) in one pass."""
  graphdef, state = nnx.split(surgery.recording(block, paths, reduce))
  outs, found = [], {}
  for s in chunks(len(x), chunk):
    out, sown = _apply_recording(graphdef, state, x[s], tuple(e[s] for e in extra))
    outs.append(out)
    for path, values in surgery.recorded(sown).items():
      found.setdefault(path, []).extend(values)
  return jnp.concatenate(outs), found


def block_mse(block: nnx.Module, x: jax.Array, y: jax.Array, extra: tuple, chunk: int) -> float:
  """mean((block(x) - y)^2) over all samples."""
  graphdef, state = nnx.split(block)
  total = sum(float(_sq_err_sum(graphdef, state, x[s], y[s], tuple(e[s] for e in extra)))
              for s in chunks(len(x), chunk))
  return total / y.size


def keep_better(baseline: nnx.Module, baseline_mse: float, candidate: nnx.Module | None, x, y, extra: tuple,
                chunk: int) -> tuple[nnx.Module, float | None, bool]:
  """(the block to keep, the candidate's MSE or None, whether it is the candidate): a candidate (None when its
  training failed) is kept only when its output MSE is lower than the baseline's."""
  if candidate is None:
    return baseline, None, False
  mse = block_mse(candidate, x, y, extra, chunk)
  return (candidate, mse, True) if mse < baseline_mse else (baseline, mse, False)


# ----------------------------------------------------------------------------------------------------------------
# statistics of the whole model's linear inputs


@functools.partial(jax.jit, static_argnums=0)
def _forward_recording(graphdef, state, tokens):
  _, sown = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(tokens)
  return sown


def linear_input_stats(model: nnx.Module, batches: Iterable[np.ndarray], paths: Iterable[str],
                       reduce: Callable[[jax.Array], Any], progress: bool = True, what: str = "calibrate"
                       ) -> dict[str, list]:
  """Run the whole model over token batches ((B, T) arrays; an encoder's mask is all ones) with the modules at
  `paths` recording reduce(their input): module path -> the values, one per batch and call. `model` unchanged."""
  paths = list(paths)
  graphdef, state = nnx.split(surgery.recording(model, paths, reduce))
  found: dict[str, list] = {path: [] for path in paths}
  for tokens in tqdm(list(batches), desc=what, unit="batch", disable=not progress):
    for path, values in surgery.recorded(_forward_recording(graphdef, state, jnp.asarray(tokens))).items():
      found[path].extend(values)
  missing = [path for path, values in found.items() if not values]
  if missing:
    raise BlockwiseError(f"calibration never reached {missing[:3]} (the model's forward does not call them)")
  return found


def _absmax(x: jax.Array) -> jax.Array:
  return jnp.max(jnp.abs(x))


def input_absmax(model: nnx.Module, batches: Iterable[np.ndarray], progress: bool = True) -> dict[str, float]:
  """Kernel path ("layers.3.attn.q_proj.kernel") -> absmax of the activations entering that Linear over the
  batches (static activation scales)."""
  stats = linear_input_stats(model, batches, surgery.modules(model), _absmax, progress)
  return {f"{path}.kernel": max(float(v) for v in values) for path, values in stats.items()}


# ----------------------------------------------------------------------------------------------------------------
# training a block: one jitted step, a minibatch loop


class TrainStep:
  """step(graphdef, params, rest, opt_state, x, y, extra) -> (params, opt_state, loss), jitted with the graphdef
  static: blocks of one model share graphdef and shapes, so it compiles once. loss = mean((block(x) - y)^2)
  before the update. `traces` counts compilations."""

  def __init__(self, optimizer: optax.GradientTransformation):
    self.optimizer = optimizer
    self.traces = 0
    self._step = jax.jit(self._impl, static_argnums=0)

  def _impl(self, graphdef, params, rest, opt_state, x, y, extra):
    self.traces += 1

    def loss_fn(p):
      return jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(x, *extra) - y))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def __call__(self, graphdef, params, rest, opt_state, x, y, extra):
    return self._step(graphdef, params, rest, opt_state, x, y, extra)


def fit_minibatches(step: Callable, graphdef, params, rest, opt_state, x: jax.Array, y: jax.Array, extra: tuple,
                    steps: int, batch_size: int, rng: np.random.Generator, bar=None,
                    place: Callable = lambda a: a) -> tuple[Any, list[float], int | None]:
  """`steps` optimizer steps `step(graphdef, params, rest, opt_state, x, y, extra) -> (params, opt_state, loss)`
  on batches of `batch_size` samples drawn without replacement (a fresh permutation each epoch). Stops at the first
  non-finite loss. Returns (params, losses, index of the non-finite step or None)."""
  order = np.empty(0, np.int64)
  losses = []
  for i in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(len(x))])
    idx, order = np.sort(order[:batch_size]), order[batch_size:]
    idx = jnp.asarray(idx)
    params, opt_state, loss = step(graphdef, params, rest, opt_state, place(x[idx]), place(y[idx]),
                                   tuple(place(e[idx]) for e in extra))
    loss = float(loss)
    losses.append(loss)
    if bar is not None:
      bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
      bar.update(1)
    if not math.isfinite(loss):
      return params, losses, i
  return params, losses, None


def train(module: nnx.Module, trainable, x: jax.Array, y: jax.Array, extra: tuple, step: TrainStep, steps: int,
          batch_size: int, rng: np.random.Generator, bar=None, place: Callable = lambda a: a):
  """Train the `trainable` (an nnx filter) parameters of a copy of `module` to map x -> y with `step`. Returns
  (trained module, or None when the loss or a parameter became NaN/Inf; losses; index of the failing step)."""
  graphdef, params, rest = nnx.split(module, trainable, ...)
  params, losses, nan_step = fit_minibatches(step, graphdef, params, rest, step.optimizer.init(params), x, y, extra,
                                             steps, batch_size, rng, bar, place)
  if nan_step is not None:
    return None, losses, nan_step
  if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(params)):
    return None, losses, steps
  return nnx.merge(graphdef, params, rest), losses, None


# ----------------------------------------------------------------------------------------------------------------
# the loop


class BlockStore(Protocol):
  """Where finished block results are kept for a rerun: load returns None for a block not finished yet."""

  def load(self, index: int, block: nnx.Module) -> Any | None: ...

  def save(self, index: int, block: nnx.Module, result: Any) -> None: ...


@dataclasses.dataclass(frozen=True)
class CheckpointStore:
  """A BlockStore for results (quantized block, report dataclass): each finished block a jaxquant checkpoint under
  directory/block_<k>, tagged with a fingerprint of the float block, the run (method settings) and the data, so a
  rerun resumes only the same run (`error` raised otherwise, naming what differs)."""

  directory: pathlib.Path
  method: str  # e.g. "LKD": names the run in messages and in the fingerprint
  report_type: type
  error: type
  data_digest: str
  run: dict

  def _fingerprint(self, index: int, block: nnx.Module) -> dict:
    teacher = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(block)):
      teacher.update(jax.tree_util.keystr(path, simple=True, separator=".").encode())
      teacher.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return json.loads(json.dumps({"kind": f"jaxquant-{self.method.lower()}-block", "block": index, **self.run,
                                  "teacher_sha256": teacher.hexdigest(), "data_sha256": self.data_digest}))

  def _block_dir(self, index: int) -> pathlib.Path:
    return self.directory / f"block_{index:03d}"

  def load(self, index: int, block: nnx.Module):
    directory = self._block_dir(index)
    if not (directory / checkpoint.METADATA_FILE).exists():
      return None
    start = time.perf_counter()
    fingerprint = self._fingerprint(index, block)
    source = checkpoint.load_metadata(directory)["source"]
    stored = source.get("run")
    if stored != fingerprint:
      differs = sorted(k for k in fingerprint if (stored or {}).get(k) != fingerprint[k])
      raise self.error(f"{directory} holds block {index} of a different {self.method} run ({', '.join(differs)} "
                       "differ): use another checkpoint directory, or delete it to start over")
    report = self.report_type(**{**source["report"], "resumed": True, "seconds": time.perf_counter() - start})
    return checkpoint.restore(directory, block), report

  def save(self, index: int, block: nnx.Module, result) -> None:
    qblock, report = result
    checkpoint.save(self._block_dir(index), qblock, recipe_name=f"{self.method.lower()}-block",
                    source={"run": self._fingerprint(index, block), "report": dataclasses.asdict(report)},
                    overwrite=True)


def release_memory() -> None:
  """Hand memory freed by the finished block back to the OS (glibc's malloc_trim): freed blocks' buffers otherwise
  stay in malloc's per-thread arenas and the process's footprint creeps up block by block. No-op elsewhere."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def run_blocks(blocks: Iterable[nnx.Module], x: jax.Array, fn: Callable[..., Any], *, extra: tuple = (),
               chunk: int, place: Callable = lambda a: a, record: Callable[[nnx.Module], tuple] | None = None,
               store: BlockStore | None = None, advance: Callable[[Any, jax.Array], jax.Array] | None = None,
               record_student: bool = False) -> Iterator[Any]:
  """For each float block k, lazily and in order: y = block(x) over the samples (placed by `place`), then
  fn(k, block, x, y, recorded) -> result, yielded before block k+1 is taken; then x = y.

  advance(result, s) -> the next block's input as the result of block k computes it from s: given, fn receives s
  (the samples' input to block k through the results of blocks 0..k-1; s_0 = x) in place of the float x, and
  trains block k to produce the float output from the input it will see when deployed (AdaRound's "asymmetric"
  reconstruction). The float stream x still gives y (and `recorded`, unless record_student).

  record(block) -> (module paths, reduce): also record reduce(input) of those sub-modules during the forward that
  computes y (`recorded`: path -> one value per chunk; {} without `record`). record_student (with advance): record
  them on the student stream s instead, the input block k will see deployed (one more forward of the float block).
  store: results restored instead of computed where the store has them, saved as they are computed.
  """
  index = -1
  s = x if advance is not None else None  # the student stream
  # Not enumerate(): its reused result tuple would keep block k referenced while block k+1 is read.
  for block in blocks:
    index += 1
    result = store.load(index, block) if store is not None else None
    if record is None or result is not None:
      y, recorded = apply_block(block, x, extra, chunk), {}
    elif record_student and advance is not None:
      y = apply_block(block, x, extra, chunk)
      _, recorded = apply_recording(block, s, extra, chunk, *record(block))
    else:
      y, recorded = apply_recording(block, x, extra, chunk, *record(block))
    y = place(y)
    if result is None:
      result = fn(index, block, x if advance is None else s, y, recorded)
      if store is not None:
        store.save(index, block, result)
    del block, recorded
    if advance is not None:
      s = place(advance(result, s))
    x = y
    release_memory()
    yield result
    del result  # before the next block is taken
