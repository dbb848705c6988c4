"""One entry point for weight-only y = x @ W on Hopper: picks the Mosaic GPU kernel or XLA by M and format.

  weight_only_matmul(x, fmt="uniform", codes=..., scale=..., zero=..., bits=..., k_group=...)
  weight_only_matmul(x, fmt="bcq", planes=..., alpha=..., offset=..., k_group=...)

Storage v2 for both (see weight_only_gemv_mgpu). Paths:
  "mgpu_gemv"     weight_only_gemv_mgpu: the packed weights streamed once per M tile of <= 64 tokens
  "mgpu_prefill"  weight_only_matmul_mgpu (uniform 2/4-bit, 128 x 256 tiles, warp specialized): correct in
                  interpret mode and lowers for CUDA, never timed on a GPU yet, so `choose_path` does not pick it
  "xla"           dequantize W to x's dtype with jnp and let XLA run the dot (a W-sized temporary each call)
`choose_path` holds the table; `path=` forces one. A group size the kernel cannot do raises ValueError from the
kernel's checks (`kernel_supports` tells beforehand), so the caller can pick "xla" and log why.

Measured with the defaults (H200, CUPTI, all kernels of the call incl. the x permutation and split-K sum;
28672 x 7168 unless said; XLA bf16 dot 93.8 us at M=1, 96.3 at M=8; tests/pallas_kernels/gpu_weight_only_mgpu.py):
  uniform 4-bit g128  M=1 35.0 us (2.68x; kernel alone 32.3 us, 2.90x), M=4 35.5, M=8 36.1 (2.67x),
                      zero points 36.1, f16 x 35.0, g64 36.1, g=K 34.3, g32+zero 43.4 (2.16x);
                      8192 x 8192 M=1 13.9 us vs 33.0 (2.37x); M=16 40.6 us (2.45x of 99.4)
  uniform 2-bit g128  M=1 35.9 us (2.61x: the wgmma count, not the bytes, bounds M <= 16)
  BCQ g128 + offset   M=1 q=2 51.3 us (1.83x), q=3 69.3 us (1.35x), q=4 88.7 us (1.06x); q=3 M=8 70.4 us
                      (XLA's dequantize-then-dot path is ~0.28x at these M)
  M=64 uniform 4-bit 90.5 us (1.06x); M=256: 306.5 us (0.49x of bf16's 150.7 us)
  M=4096 uniform 4-bit: this kernel 5541 us (0.38x) vs XLA dequantize + dot ~2500 us (0.9x, GPU.md)
The kernel's time grows with ceil(M / 64) (each M tile re-streams the weights, ~1.2 us per token past 64);
XLA's dequantize path costs ~350 us + the bf16 GEMM: they cross near M ~ 500 (estimate).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels import weight_only_gemv_mgpu as gemv
from pallas_kernels import weight_only_matmul_mgpu as prefill

GEMV_MAX_M = 512  # M above this: "xla" (estimated crossover ~500 from M = 64, 256 and 4096; see above)
FORMATS = ("uniform", "bcq")
PATHS = ("mgpu_gemv", "mgpu_prefill", "xla")  # mgpu_prefill: only when asked (untimed, see the report)


def kernel_supports(fmt: str, *, k_group: int, k: int, bits: int = 4) -> bool:
  """Whether the Mosaic GPU kernel takes this format / group size (else it raises ValueError)."""
  if fmt == "uniform":
    return bits in gemv.BITS and (k_group >= k or k_group % 32 == 0)
  return k_group >= k or k_group % 128 == 0


def choose_path(m: int, fmt: str, *, k_group: int, k: int, bits: int = 4) -> str:
  if not kernel_supports(fmt, k_group=k_group, k=k, bits=bits):
    return "xla"
  return "mgpu_gemv" if m <= GEMV_MAX_M else "xla"


def _unpack_uniform(codes, k, bits):
  """uint8 (N, >= ceil(K/8)*bits) -> int32 (N, K) signed codes, in jnp (for the XLA path)."""
  n = codes.shape[0]
  b = codes[:, :-(-k // 8) * bits].astype(jnp.uint32).reshape(n, -1, bits)
  word = b[:, :, 0]
  for i in range(1, bits):
    word = word | (b[:, :, i] << (8 * i))
  v = jnp.stack([(word >> (bits * j)) & ((1 << bits) - 1) for j in range(8)], -1).reshape(n, -1)[:, :k]
  v = v.astype(jnp.int32)
  return jnp.where(v >= 1 << (bits - 1), v - (1 << bits), v)


def dequantize(fmt, k, *, codes=None, scale=None, zero=None, bits=4, n_group=1, planes=None, alpha=None,
               offset=None, k_group, dtype=jnp.float32):
  """W (K, N) from storage v2, in jnp."""
  g = jnp.arange(k) // min(k_group, k)
  if fmt == "uniform":
    v = _unpack_uniform(codes, k, bits).T.astype(jnp.float32)  # (K, N)
    h = jnp.arange(v.shape[1]) // n_group
    s = scale.astype(jnp.float32)[g][:, h]
    z = 0.0 if zero is None else zero.astype(jnp.float32)[g][:, h]
    return ((v - z) * s).astype(dtype)
  q, n, c = planes.shape
  bits_ = (planes[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
  signs = 2.0 * bits_.reshape(q, n, c * 8)[:, :, :k].astype(jnp.float32) - 1.0  # (q, N, K)
  w = jnp.einsum("qnk,qkn->kn", signs, alpha.astype(jnp.float32)[:, g, :], precision=lax.Precision.HIGHEST)
  if offset is not None:
    w = w + offset.astype(jnp.float32)[g]
  return w.astype(dtype)


def weight_only_matmul(x, *, fmt: str, k_group: int, codes=None, scale=None, zero=None, bits: int = 4,
                       n_group: int = 1, planes=None, alpha=None, offset=None, bias=None, path: str | None = None,
                       config: gemv.TuningConfig | None = None, out_dtype=None, interpret: bool | None = None):
  """y = x @ W (+ bias); see the module docstring. Returns (M, N) in x's dtype (bf16 for f32 x) unless given."""
  if fmt not in FORMATS:
    raise ValueError(f"fmt: one of {FORMATS}, got {fmt!r}")
  if x.ndim != 2:
    raise ValueError(f"x: (M, K), got shape {tuple(x.shape)}")
  m, k = x.shape
  path = path or choose_path(m, fmt, k_group=k_group, k=k, bits=bits)
  if path not in PATHS:
    raise ValueError(f"path: one of {PATHS}, got {path!r}")
  if path == "mgpu_prefill":
    if fmt != "uniform" or n_group != 1 or bias is not None:
      raise ValueError("path: 'mgpu_prefill' takes uniform codes with n_group=1 and no bias")
    return prefill.uniform_matmul(x, codes, scale, zero, bits=bits, k_group=k_group, out_dtype=out_dtype,
                                  interpret=interpret)
  if path == "mgpu_gemv":
    if fmt == "uniform":
      return gemv.uniform_matmul(x, codes, scale, zero, bits=bits, k_group=k_group, n_group=n_group, bias=bias,
                                 config=config, out_dtype=out_dtype, interpret=interpret)
    return gemv.bcq_matmul(x, planes, alpha, offset, k_group=k_group, bias=bias, config=config,
                           out_dtype=out_dtype, interpret=interpret)
  dtype = jnp.bfloat16 if x.dtype == jnp.float32 else x.dtype
  w = dequantize(fmt, k, codes=codes, scale=scale, zero=zero, bits=bits, n_group=n_group, planes=planes,
                 alpha=alpha, offset=offset, k_group=k_group, dtype=dtype)
  y = jnp.dot(x.astype(dtype), w, preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(out_dtype or dtype)


def expected_bytes(fmt: str, n: int, k: int, *, k_group: int, bits: int = 4, q: int = 3, with_zero=False,
                   with_offset=True, coef_bytes: int = 2) -> int:
  """Bytes of weights one call streams (each byte once per M tile of <= 64 tokens)."""
  g = -(-k // min(k_group, k))
  if fmt == "uniform":
    return n * (-(-k // 8) * bits) + g * n * coef_bytes * (2 if with_zero else 1)
  return q * n * -(-k // 8) + g * n * coef_bytes * (q + (1 if with_offset else 0))

