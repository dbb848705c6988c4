"""qdot: the one place that chooses how a (possibly quantized) matmul runs.

Paths are chosen from the weight's type and an explicit `backend` argument (each Linear carries its own as a
static attribute; see pipeline.set_backend), never by intercepting jax.lax globally:

  backend "xla" (the portable path):
    float kernel                      -> jnp.dot in float32
    QArray / BCQArray, weight-only    -> dequantize, then float dot
    QArray with an ActQuant (W8A8 ..) -> activations quantized to int8, int8 x int8 -> int32 dot_general
                                         contracting the stored (N, K) weight's last dim (no transpose:
                                         cuBLASLt's int8 GEMM reads it as is), batched over K-groups when
                                         the weight is group-wise along K,
                                         scales applied to the int32 accumulators afterwards; a static
                                         asymmetric activation (zero point) is corrected in int32 with
                                         the weights' integer column sums.
  backend "pallas" / "interpret" (the kernels of pallas_kernels/, compiled, or interpreted on CPU):
    QArray with an ActQuant           -> int8_matmul_mgpu (Mosaic GPU: TMA + int8 wgmma, int32 accumulation,
                                         fused scale epilogue); token-wise activations quantized by the
                                         act_quant kernel. Weights it cannot take run the xla path (logged once)
    BCQArray, uniform 2/3/4-bit QArray -> weight_only_mgpu: the GEMV kernel streams the packed codes / sign
                                         planes once, decoded in registers (M up to its table's limit), else
                                         XLA dequantizes to bf16 and runs the dot
    anything else                     -> the xla path (activation zero points: an error naming the fix)
  backend "auto": "pallas" on a Hopper GPU (the Mosaic GPU kernels need sm_90), "xla" elsewhere.

sharded_qdot runs the same choice on each device's shard of a weight split over a mesh (inside jax.shard_map,
a psum after a K split); jaxquant.sharding computes the weight's layout.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxquant import quantizers
from jaxquant.formats import BCQArray, QArray
from jaxquant.mesh_axes import ShardingError, axis_size


BACKENDS = ("auto", "xla", "pallas", "interpret")


def resolve_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}: choose one of {BACKENDS}")
  if backend == "auto":
    return "pallas" if _is_hopper() else "xla"
  return backend


def _is_hopper() -> bool:
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def qdot(x: jax.Array, w, backend: str = "auto") -> jax.Array:
  """x: (..., K) float; w: (K, N) float array, QArray or BCQArray. Returns (..., N) float32."""
  backend = resolve_backend(backend)
  if backend != "xla" and isinstance(w, (QArray, BCQArray)):
    if x.shape[-1] != w.shape[0]:
      raise ValueError(f"qdot: x has {x.shape[-1]} features but the weight expects K={w.shape[0]}")
    result = kernel_dot(x, w, interpret=backend == "interpret")
    if result is not None:
      return result
  if isinstance(w, BCQArray):
    return jnp.dot(x.astype(jnp.float32), w.dequantize(jnp.float32), preferred_element_type=jnp.float32)
  if not isinstance(w, QArray):
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), preferred_element_type=jnp.float32)
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"qdot: x has {x.shape[-1]} features but the weight expects K={w.shape[0]}")
  if w.activation is None:
    return jnp.dot(x.astype(jnp.float32), w.dequantize(jnp.float32), preferred_element_type=jnp.float32)
  return _int_dot(x, w)


def _quantize_input(x: jax.Array, w: QArray) -> tuple[jax.Array, jax.Array]:
  """x (M, K) -> (int8 (M, K), scale broadcastable to (M, 1))."""
  act = w.activation
  if act.mode in ("token", "token_group"):
    # A token's scale spans all of K (for token_group: the weight has a single K-group).
    return quantizers.quantize_tokens(x, act.bits)
  if act.mode == "tensor":
    return (quantizers.quantize_tensor_static(x, act.scale, act.bits, act.zero),
            jnp.reshape(act.scale, (1, 1)))
  raise ValueError(f"unknown activation mode {act.mode!r}")


def _int_dot(x: jax.Array, w: QArray) -> jax.Array:
  """Integer matmul of a symmetric QArray with quantized activations, scales applied to the int32 sums.

  Asymmetric static activations (ActQuant with a zero point): the int8 operand is q = u - 2^(bits-1) (u the
  unsigned code), so x = scale * (u - zero) = scale * (q + c) with the integer c = 2^(bits-1) - zero, and
  x @ W_int = q @ W_int + c * colsum(W_int): one int32 correction per output column, exact integer math.
  """
  if not w.symmetric:
    raise ValueError("integer activation path needs symmetric weights (asymmetric zero points are weight-only)")
  if w.activation.bits > 8:
    raise ValueError(f"activation bits {w.activation.bits} > 8 are not an int8 path")
  lead, k = x.shape[:-1], x.shape[-1]
  n = w.shape[1]
  x2 = x.reshape(-1, k)
  w_int = w.values()  # (N, K) int8: the stored layout, K contiguous
  groups_k = w.scale.shape[0]
  act = w.activation
  shift = None  # () int32: c = 2^(bits-1) - zero for asymmetric activations
  if act.zero is not None:
    if act.mode != "tensor":
      raise ValueError(f"activation zero points need mode 'tensor' (static), got mode {act.mode!r}")
    shift = jnp.int32(1 << (act.bits - 1)) - jnp.round(act.zero).astype(jnp.int32)
  if groups_k == 1:
    x_int, x_scale = _quantize_input(x2, w)  # (M, K) int8, (M, 1)
    acc = jax.lax.dot_general(x_int, w_int, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    if shift is not None:
      acc = acc + shift * jnp.sum(w_int.astype(jnp.int32), axis=1)[None, :]
    w_scale = jnp.repeat(w.scale[0], w.n_group, total_repeat_length=w.scale.shape[1] * w.n_group)[:n]
    y = acc.astype(jnp.float32) * x_scale * w_scale[None, :]
    return y.reshape(*lead, n)
  # Group-wise along K: one int32 accumulator per group, then sum_g acc_g * x_scale_g * w_scale_g.
  # Zero padding of the short last group adds nothing to the integer sums.
  padded_k = groups_k * w.k_group
  if w.activation.mode == "token_group":
    # One scale per (token, K-group): the epilogue already scales each group's accumulator, so finer
    # activation scales cost no extra integer work.
    x_groups = jnp.pad(x2, ((0, 0), (0, padded_k - k))).reshape(-1, groups_k, w.k_group)
    x_int, x_scale = quantizers.quantize_tokens(x_groups, w.activation.bits)  # (M, G, kg), (M, G, 1)
    x_scale = jnp.transpose(x_scale, (1, 0, 2))  # (G, M, 1)
  else:
    x_int, x_scale = _quantize_input(x2, w)  # (M, K), scale (M, 1) or (1, 1)
    x_int = jnp.pad(x_int, ((0, 0), (0, padded_k - k))).reshape(-1, groups_k, w.k_group)
    x_scale = x_scale[None]  # (1, M or 1, 1)
  w_groups = jnp.pad(w_int, ((0, 0), (0, padded_k - k))).reshape(n, groups_k, w.k_group)
  acc = jax.lax.dot_general(
      x_int, w_groups, (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.int32)  # (G, M, N)
  if shift is not None:
    # The padded inputs of the last group have weight 0, so per-group column sums stay exact.
    acc = acc + shift * jnp.sum(w_groups.astype(jnp.int32), axis=2).T[:, None, :]
  w_scale = jnp.repeat(w.scale, w.n_group, axis=1, total_repeat_length=w.scale.shape[1] * w.n_group)[:, :n]
  y = jnp.sum(acc.astype(jnp.float32) * x_scale * w_scale[:, None, :], axis=0)
  return y.reshape(*lead, n)


def kernel_dot(x: jax.Array, w, interpret: bool) -> jax.Array | None:
  """The Pallas kernel for this weight (compiled, or interpreted on CPU), or None where no kernel applies; the
  caller then takes the XLA path, and the reason is logged once."""
  from pallas_kernels import act_quant, int8_matmul_mgpu

  lead, k = x.shape[:-1], x.shape[-1]
  n = w.shape[1]
  x2 = x.reshape(-1, k)
  if isinstance(w, QArray) and w.activation is not None:
    if w.activation.zero is not None:
      raise ValueError(
          f"backend {'interpret' if interpret else 'pallas'}: the W8A8 kernel has no activation zero point "
          "(asymmetric static activations, e.g. RepQuant's layer-wise (s~, z~)); run these layers with "
          "backend='xla' (pipeline.set_backend(model, 'xla')), which takes the exact integer path")
    groups_k = w.scale.shape[0]
    why = _w8a8_unsupported(w, x2.shape[0], k, n, groups_k, interpret)
    if why:
      _log_once(f"W8A8 weight {w.shape} ({why}): the XLA int8 path runs instead of the Mosaic GPU kernel")
      return None
    w_scale = jnp.repeat(w.scale, w.n_group, axis=1, total_repeat_length=w.scale.shape[1] * w.n_group)[:, :n]
    mode = w.activation.mode
    if mode == "tensor":
      x_int = quantizers.quantize_tensor_static(x2, w.activation.scale, w.activation.bits)
      x_scale = w.activation.scale
    elif mode == "token_group" and groups_k > 1:
      padded_k = groups_k * w.k_group
      x_groups = jnp.pad(x2, ((0, 0), (0, padded_k - k))).reshape(-1, groups_k, w.k_group)
      x_int, x_scale = quantizers.quantize_tokens(x_groups, w.activation.bits)
      x_int = x_int.reshape(-1, padded_k)[:, :k]
      x_scale = jnp.transpose(x_scale, (1, 0, 2))  # (G, M, 1)
    else:
      x_int, x_scale = act_quant.quantize_rows(x2, bits=w.activation.bits, interpret=interpret)
    y = int8_matmul_mgpu.int8_matmul(x_int, w.packed, x_scale, w_scale, k_group=w.k_group if groups_k > 1 else None,
                                     out_dtype=jnp.float32, interpret=interpret)
    return y.reshape(*lead, n)
  y = _weight_only_dot(x2, w, interpret)
  return None if y is None else y.reshape(*lead, n)


def _weight_only_dot(x2: jax.Array, w, interpret: bool) -> jax.Array | None:
  """Weight-only QArray / BCQArray through pallas_kernels.weight_only_mgpu (the GEMV kernel for M <= its table's
  limit, else XLA's bf16 dequantize-then-dot), in float32."""
  from pallas_kernels import weight_only_mgpu
  from jaxquant.formats import uniform_to_bcq

  m, k = x2.shape
  if isinstance(w, QArray):
    if w.n_group != 1 and w.bits not in (2, 4):
      _log_once(f"weight-only {w.bits}-bit weight with n_group={w.n_group}: no kernel; XLA dequantizes it")
      return None
    if w.bits not in (2, 4):  # 3-bit codes: the kernel reads sign planes
      if w.bits != 3:
        _log_once(f"weight-only {w.bits}-bit codes: no kernel; XLA dequantizes them")
        return None
      _log_once("3-bit uniform codes are converted to sign planes on every call: quantize with a lutgemm "
                "recipe (stored as planes) to skip it")
      w = uniform_to_bcq(w)
  if isinstance(w, QArray):
    fmt, args = "uniform", dict(codes=w.packed, scale=w.scale, zero=w.zero, bits=w.bits, n_group=w.n_group)
  else:
    fmt, args = "bcq", dict(planes=w.planes, alpha=w.alpha, offset=w.offset)
  bits = w.bits if fmt == "uniform" else 4
  path = weight_only_mgpu.choose_path(m, fmt, k_group=w.k_group, k=k, bits=bits)
  if path != "mgpu_gemv":
    _log_once(f"weight-only {fmt} weight {w.shape}, k_group={w.k_group}, M={m}: "
              + ("the kernel takes no such group size" if not weight_only_mgpu.kernel_supports(
                  fmt, k_group=w.k_group, k=k, bits=bits) else f"M > {weight_only_mgpu.GEMV_MAX_M}")
              + "; XLA dequantizes to bf16 and runs the dot")
  y = weight_only_mgpu.weight_only_matmul(x2, fmt=fmt, k_group=w.k_group, path=path, out_dtype=jnp.float32,
                                          interpret=interpret, **args)
  return y


# M up to which int8_matmul_mgpu uses its weight-streaming schedule: that schedule faulted on an H200
# (CUDA_ERROR_MISALIGNED_ADDRESS at M=16 on 8192 x 8192, experiments/results/gpu/gpu_check_w8a8_sweep.*), so until
# it is fixed and measured, compiled W8A8 at these M runs XLA's int8 dot (interpret mode keeps the kernel).
W8A8_KERNEL_MIN_M = 257


def _w8a8_unsupported(w: QArray, m: int, k: int, n: int, groups_k: int, interpret: bool) -> str:
  """Why the Mosaic GPU W8A8 kernel cannot take this weight ("" when it can)."""
  if m < W8A8_KERNEL_MIN_M and not interpret:
    return f"M={m} < {W8A8_KERNEL_MIN_M}: the small-batch schedule is not yet verified on a GPU"
  if not w.symmetric or w.bits != 8:
    return f"{w.bits}-bit {'symmetric' if w.symmetric else 'asymmetric'} codes; the kernel takes symmetric int8"
  if w.activation.bits > 8:
    return f"{w.activation.bits}-bit activations"
  if k % 32 or n % 8:
    return f"K={k} not a multiple of 32 or N={n} not a multiple of 8"
  if groups_k > 1 and w.k_group % 32:
    return f"k_group={w.k_group} not a multiple of 32"
  return ""


_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
  if message not in _LOGGED:
    _LOGGED.add(message)
    logging.getLogger(__name__).warning(message)


def _local(w, k_shards: int, n_shards: int):
  """The per-device view of a quantized weight inside shard_map: the static shape (and a group size that spanned
  the whole global dimension) become the shard's."""
  k, n = w.shape[0] // k_shards, w.shape[1] // n_shards
  if isinstance(w, QArray):
    return dataclasses.replace(w, shape=(k, n), k_group=min(w.k_group, k), n_group=min(w.n_group, n))
  return dataclasses.replace(w, shape=(k, n), k_group=min(w.k_group, k))


def sharded_qdot(x: jax.Array, w, w_shardings, spec: tuple, batch_axis: str | None = None,
                 backend: str = "auto", path: str = "<weight>") -> jax.Array:
  """qdot with the weight split by `spec` = (k_axis, n_axis) and x's rows split over `batch_axis`: the Pallas
  kernels (int8_matmul_mgpu, weight_only_mgpu, act_quant) run on each device's shard inside jax.shard_map; a K
  split sums the partial products with a psum over k_axis.

  x: (..., K) float; w: QArray / BCQArray (K, N), placed or not (it is moved to `w_shardings`: NamedShardings
  of w's structure on one mesh, as sharding.format_shardings(w, spec, mesh, path) gives them).
  Returns (..., N) float32 split (batch_axis, n_axis). backend "xla" runs qdot per shard instead.
  """
  from pallas_kernels import act_quant, int8_matmul_mgpu

  backend = resolve_backend(backend)
  k_entry, n_entry = tuple(spec) + (None,) * (2 - len(spec))
  mesh = jax.tree_util.tree_leaves(w_shardings)[0].mesh
  w = jax.device_put(w, w_shardings)
  k_shards, n_shards = axis_size(mesh, k_entry), axis_size(mesh, n_entry)
  lead, k = x.shape[:-1], x.shape[-1]
  if k != w.shape[0]:
    raise ValueError(f"sharded_qdot: x has {k} features but {path} expects K={w.shape[0]}")
  x2 = x.reshape(-1, k)
  rows = axis_size(mesh, batch_axis)
  if x2.shape[0] % rows:
    raise ShardingError(f"sharded_qdot: {x2.shape[0]} rows of x cannot be split over mesh axis {batch_axis!r} of "
                        f"size {rows}")
  interpret = backend == "interpret"
  w_specs = jax.tree_util.tree_map(lambda s: s.spec, w_shardings)
  int8_k_split = (k_shards > 1 and backend != "xla" and isinstance(w, QArray) and w.activation is not None
                  and w.symmetric and w.bits == 8 and w.activation.mode in ("token", "tensor"))

  if int8_k_split:
    # A token's activation scale spans all of K: quantize full rows first (act_quant kernel per row shard),
    # then each device multiplies its K slice in int8 and the float partials are summed.
    if w.activation.mode == "token":
      quantize_rows = jax.shard_map(
          lambda xl: act_quant.quantize_rows(xl, bits=w.activation.bits, interpret=interpret),
          mesh=mesh, in_specs=P(batch_axis, None), out_specs=(P(batch_axis, None), P(batch_axis, None)),
          check_vma=False)
      x_int, x_scale = quantize_rows(x2)
      x_scale_spec = P(batch_axis, None)
    else:
      x_int = quantizers.quantize_tensor_static(x2, w.activation.scale, w.activation.bits)
      x_scale, x_scale_spec = w.activation.scale, P()

    def int8_body(xl, sl, wl):
      wl = _local(wl, k_shards, n_shards)
      groups_k = wl.scale.shape[0]
      w_scale = jnp.repeat(wl.scale, wl.n_group, axis=1,
                           total_repeat_length=wl.scale.shape[1] * wl.n_group)[:, :wl.shape[1]]
      y = int8_matmul_mgpu.int8_matmul(xl, wl.packed, sl, w_scale, k_group=wl.k_group if groups_k > 1 else None,
                                       out_dtype=jnp.float32, interpret=interpret)
      return jax.lax.psum(y, k_entry)

    run = jax.shard_map(int8_body, mesh=mesh, in_specs=(P(batch_axis, k_entry), x_scale_spec, w_specs),
                        out_specs=P(batch_axis, n_entry), check_vma=False)
    return run(x_int, x_scale, w).reshape(*lead, w.shape[1])

  if k_shards > 1 and isinstance(w, QArray) and w.activation is not None and w.activation.mode == "token":
    raise ShardingError(f"sharded_qdot: {path} quantizes activations per token over all of K; a K split needs "
                        f"8-bit symmetric weights (the int8 kernel path) or an N split")

  def body(xl, wl):
    wl = _local(wl, k_shards, n_shards)
    y = None if backend == "xla" else kernel_dot(xl, wl, interpret=interpret)
    if y is None:
      y = qdot(xl, wl, backend="xla")
    return y if k_shards == 1 else jax.lax.psum(y, k_entry)

  # check_vma=False: Pallas calls (interpret mode included) carry no varying-manual-axes annotations.
  run = jax.shard_map(body, mesh=mesh, in_specs=(P(batch_axis, k_entry), w_specs),
                      out_specs=P(batch_axis, n_entry), check_vma=False)
  return run(x2, w).reshape(*lead, w.shape[1])
