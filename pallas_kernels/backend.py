"""How a Pallas kernel body runs: interpret mode on CPU, Triton on GPU.

Every kernel in this package is written once over refs and launched through `call`. The choice of backend
is made here and only here:

  interpret=None   (default) interpret mode when jax's default backend is the CPU, Triton otherwise.
  interpret=True   force interpret mode (the kernel body runs as ordinary XLA ops, on any backend).
  interpret=False  force a compiled launch with Triton compiler params, even when the default backend is the
                   CPU: this is what the lowering tests use, `jax.jit(f).trace(...).lower(lowering_platforms=
                   ("cuda",))` on a machine with no GPU.

jax 0.10 lowers a `pallas_call` without compiler params to Mosaic GPU; we always pass
`jax.experimental.pallas.triton.CompilerParams` so that the Triton lowering is used.

Conventions shared by the kernels (what the Triton lowering of jax 0.10.2 accepts):
  - no BlockSpecs: every ref is the whole array, and the body computes its tile offsets from `pl.program_id`
    and reads/writes with `load`/`store` below, masked at unaligned edges (the Triton lowering does not mask
    partial edge blocks by itself; interpret mode pads, so masks make both agree);
  - every loaded/stored/computed value has a power-of-two number of elements;
  - no value-level gather, dynamic_slice, static slice or round; ref gathers with integer index arrays.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def abstract_gpu(device_kind: str = "NVIDIA H200", num_cores: int = 132):
  """A context in which jit lowers for this GPU with no GPU present (JAX 0.11's abstract devices): Triton reads
  the compute capability from the kind, Mosaic GPU kernels the SM count from `num_cores`."""
  from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh
  device = AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform="gpu")
  return use_abstract_mesh(AbstractMesh((1,), ("gpu",), (AxisType.Auto,), abstract_device=device))


def lower_for_cuda(fn: Callable, *structs: jax.ShapeDtypeStruct, device_kind: str = "NVIDIA H200",
                   num_cores: int = 132):
  """jax.jit(fn) lowered for CUDA on any machine: the Pallas lowering (Triton or Mosaic GPU) and its checks run,
  e.g. Mosaic GPU's shared-memory budget; returns the jax Lowered object."""
  with abstract_gpu(device_kind, num_cores):
    return jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",))


def use_interpret(interpret: bool | None = None) -> bool:
  """Resolve the `interpret` argument of the public wrappers (None: interpret exactly when on CPU)."""
  if interpret is None:
    return jax.default_backend() == "cpu"
  return bool(interpret)


def triton_params(num_warps: int = 4, num_stages: int = 3) -> plgpu.CompilerParams:
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def call(
    kernel: Callable[..., None],
    *args: jax.Array,
    out_shape: Any,
    grid: Sequence[int],
    interpret: bool | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    name: str | None = None,
) -> Any:
  """Launch `kernel` over `grid` with whole-array refs for `args` and outputs `out_shape`."""
  grid = tuple(int(g) for g in grid)
  if any(g < 1 for g in grid):
    raise ValueError(f"grid must be positive, got {grid}")
  interp = use_interpret(interpret)
  return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=grid,
      interpret=interp,
      compiler_params=None if interp else triton_params(num_warps, num_stages),
      name=name,
  )(*args)


# ---- helpers used inside kernel bodies ------------------------------------------------------------------

def all_masks(*masks):
  """The conjunction of the masks that are not None (None when all are: an unmasked access)."""
  present = [mask for mask in masks if mask is not None]
  if not present:
    return None
  out = present[0]
  for mask in present[1:]:
    out = out & mask
  return out


def load(ref, mask=None, other=None):
  """Masked load of a ref view; `other` (default 0) fills masked-out lanes."""
  if mask is None:
    return plgpu.load(ref)
  if other is None:
    other = 0
  return plgpu.load(ref, mask=mask, other=other)


def store(ref, value, mask=None) -> None:
  if mask is None:
    plgpu.store(ref, value)
  else:
    plgpu.store(ref, value, mask=mask)


def whole(size: int):
  """The slice 0:size with an int32 start (a bare `:` becomes an int64 start under jax x64, which the
  interpret-mode store cannot mix with int32 program ids)."""
  return pl.ds(jnp.int32(0), size)


def lanes(start, size: int) -> jax.Array:
  """The indices start .. start+size-1 as an int32 vector (size a power of two)."""
  return start + jnp.arange(size, dtype=jnp.int32)


def round_half_even(v: jax.Array) -> jax.Array:
  """jnp.round (ties to even) from floor, which the Triton lowering has (it has no round).

  Exact in float32 for |v| < 2^22: v - floor(v) is exact there.
  """
  f = jnp.floor(v)
  d = v - f
  odd = f - 2.0 * jnp.floor(f * 0.5)  # 1.0 where f is odd, else 0.0
  return jnp.where(d > 0.5, f + 1.0, jnp.where(d < 0.5, f, f + odd))


def pow2_floor(n: int) -> int:
  """Largest power of two <= n (n >= 1)."""
  return 1 << (max(int(n), 1).bit_length() - 1)


def pow2_ceil(n: int) -> int:
  """Smallest power of two >= n (n >= 1)."""
  n = max(int(n), 1)
  return 1 << (n - 1).bit_length()


def pow2_divisor(n: int, cap: int) -> int:
  """Largest power of two that divides n and is <= cap."""
  p = n & -n if n > 0 else cap
  return min(p, pow2_floor(cap))


def is_pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def float_dtype(dtype: Any, name: str, allowed=(jnp.float32, jnp.bfloat16, jnp.float16)) -> jnp.dtype:
  dt = jnp.dtype(dtype)
  if dt not in [jnp.dtype(a) for a in allowed]:
    raise ValueError(f"{name}: unsupported dtype {dt}; choose one of {[str(jnp.dtype(a)) for a in allowed]}")
  return dt
