"""Lowering-time audit of a Mosaic GPU kernel's asynchronous copies, with no GPU.

Interpret mode does not model address alignment, and a misaligned TMA or bulk copy only shows on the GPU as an
asynchronous CUDA_ERROR_MISALIGNED_ADDRESS that kills the context. The PTX rules checked here:
  - cp.async.bulk.tensor (TMA, tiled): the SMEM address 128-byte aligned (CUDA C++ Programming Guide,
    "alignment requirements for multi-dimensional TMA"); a swizzled SMEM tile aligned to its swizzle pattern
    (8 rows x swizzle bytes: 1024 for 128B) or the data lands permuted.
  - cp.async.bulk (1-D bulk copy, which Mosaic GPU emits for a contiguous unswizzled copy without zero fill):
    both addresses 16-byte aligned and the size a multiple of 16 bytes.

Usage (while lowering for CUDA, e.g. `jax.jit(f).trace(*structs).lower(lowering_platforms=("cuda",))`):

  with mgpu_audit.record() as copies:
    ...lower...
  assert not mgpu_audit.problems(copies)

`record` wraps LaunchContext.async_copy, which every GMEM <-> SMEM copy of a kernel goes through (Pallas
`copy_gmem_to_smem`/`copy_smem_to_gmem`, emit_pipeline's stage copies), and evaluates the SMEM address of the
copy from the IR as an affine form `c + sum_i a_i * s_i` over unknowns s_i (the warpgroup index, pipeline
slots, loop indices). An address is aligned to A when c and every a_i are multiples of A: this is exact for
the unknowns that range over consecutive integers (warpgroup, slot), and conservative otherwise. The dynamic
SMEM base is taken as 1024-aligned (Pallas aligns every SMEM allocation to 1024 bytes) and GMEM kernel
arguments as 16-aligned (what XLA guarantees for buffers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import threading

from jax._src.lib.mlir import ir
from jax.experimental.mosaic.gpu import launch_context as lc
from jax.experimental.mosaic.gpu import utils as mgpu_utils

TMA_SMEM_ALIGN = 128
BULK_ALIGN = 16
_DYNAMIC = -2 ** 63  # MLIR ShapedType::kDynamic (static_offsets entries given by operands)


@dataclasses.dataclass(frozen=True)
class Affine:
  """c + sum(a_i * s_i) over unknown integers s_i (keys: symbol ids)."""
  const: int = 0
  coeffs: tuple[tuple[int, int], ...] = ()

  def __add__(self, o: Affine) -> Affine:
    d = dict(self.coeffs)
    for s, a in o.coeffs:
      d[s] = d.get(s, 0) + a
    return Affine(self.const + o.const, tuple(sorted((s, a) for s, a in d.items() if a)))

  def __neg__(self) -> Affine:
    return Affine(-self.const, tuple((s, -a) for s, a in self.coeffs))

  def scale(self, k: int) -> Affine:
    return Affine(self.const * k, tuple((s, a * k) for s, a in self.coeffs if a * k))

  @property
  def is_const(self) -> bool:
    return not self.coeffs

  def aligned(self, a: int) -> bool:
    return self.const % a == 0 and all(c % a == 0 for _, c in self.coeffs)

  def __str__(self) -> str:
    return " + ".join([str(self.const)] + [f"{a}*s{s}" for s, a in self.coeffs])


@dataclasses.dataclass(frozen=True)
class Copy:
  """One async copy as lowered: direction, path, SMEM address (bytes), GMEM address of a bulk copy, size."""
  direction: str  # "load" (GMEM -> SMEM) or "store"
  kind: str  # "tma" (cp.async.bulk.tensor) or "bulk" (cp.async.bulk)
  smem_type: str
  gmem_type: str
  swizzle: int | None
  smem_addr: Affine
  gmem_addr: Affine | None  # bulk copies only: byte offset from the kernel argument
  nbytes: int

  def problems(self) -> list[str]:
    out = []
    if self.kind == "tma":
      if not self.smem_addr.aligned(TMA_SMEM_ALIGN):
        out.append(f"TMA SMEM address {self.smem_addr} is not {TMA_SMEM_ALIGN}-byte aligned")
      if self.swizzle and not self.smem_addr.aligned(8 * self.swizzle):
        out.append(f"swizzled ({self.swizzle}B) SMEM tile at {self.smem_addr} is not aligned to its "
                   f"{8 * self.swizzle}-byte pattern")
    else:
      if not self.smem_addr.aligned(BULK_ALIGN):
        out.append(f"bulk-copy SMEM address {self.smem_addr} is not 16-byte aligned")
      if self.gmem_addr is not None and not self.gmem_addr.aligned(BULK_ALIGN):
        out.append(f"bulk-copy GMEM offset {self.gmem_addr} is not 16-byte aligned")
      if self.nbytes % BULK_ALIGN:
        out.append(f"bulk-copy size {self.nbytes} bytes is not a multiple of 16")
    return [f"{self.direction} {self.gmem_type} <-> {self.smem_type}: {p}" for p in out]


class _Eval:
  """Affine evaluation of index values and of memref addresses (bytes) from their defining ops."""

  def __init__(self):
    self._sym = itertools.count()

  def fresh(self) -> Affine:
    return Affine(0, ((next(self._sym), 1),))

  @staticmethod
  def _op(v: ir.Value):
    owner = v.owner
    if isinstance(owner, ir.Block):
      return None
    return owner.operation if hasattr(owner, "operation") else owner

  def int(self, v) -> Affine:
    if isinstance(v, int):
      return Affine(v)
    op = self._op(v)
    if op is None:
      return self.fresh()  # block argument: a loop index, a pipeline slot
    name = op.name
    if name in ("arith.constant", "llvm.mlir.constant"):
      attr = op.attributes["value"]
      if isinstance(attr, ir.IntegerAttr):
        return Affine(ir.IntegerAttr(attr).value)
      return self.fresh()
    if name in ("arith.index_cast", "arith.index_castui", "arith.extui", "arith.extsi", "arith.trunci"):
      return self.int(op.operands[0])
    if name == "arith.addi":
      return self.int(op.operands[0]) + self.int(op.operands[1])
    if name == "arith.subi":
      return self.int(op.operands[0]) + -self.int(op.operands[1])
    if name == "arith.muli":
      a, b = self.int(op.operands[0]), self.int(op.operands[1])
      if a.is_const:
        return b.scale(a.const)
      if b.is_const:
        return a.scale(b.const)
      return self.fresh()
    if name == "arith.shli":
      a, b = self.int(op.operands[0]), self.int(op.operands[1])
      return a.scale(2 ** b.const) if b.is_const else self.fresh()
    return self.fresh()  # thread ids, shuffles, divisions, selects: unknown integers

  @staticmethod
  def _static_and_dynamic(op, attr: str, dyn_operands) -> list:
    vals, dyn = [], iter(dyn_operands)
    for s in ir.DenseI64ArrayAttr(op.attributes[attr]):
      vals.append(next(dyn) if s == _DYNAMIC else s)
    return vals

  @staticmethod
  def _segments(op) -> list[int]:
    return list(ir.DenseI32ArrayAttr(op.attributes["operandSegmentSizes"]))

  def addr(self, v: ir.Value) -> tuple[Affine, Affine]:
    """(aligned pointer, address of element 0) of a memref, in bytes from the allocation's base."""
    op = self._op(v)
    if op is None:
      if ir.MemRefType(v.type).memory_space is None:
        return Affine(0), Affine(0)  # a GMEM kernel argument
      raise NotImplementedError(f"SMEM memref from a block argument: {v}")
    name = op.name
    if name == "gpu.dynamic_shared_memory":
      return Affine(0), Affine(0)
    if name == "builtin.unrealized_conversion_cast" and ir.MemRefType(v.type).memory_space is None:
      return Affine(0), Affine(0)  # a GMEM kernel argument (Mosaic GPU casts the raw pointers to memrefs)
    if name == "memref.view":
      _, a = self.addr(op.operands[0])
      a = a + self.int(op.operands[1])
      return a, a
    if name == "memref.subview":
      src = op.operands[0]
      p, a = self.addr(src)
      n_src, n_off, _, _ = self._segments(op)
      offsets = self._static_and_dynamic(op, "static_offsets", op.operands[n_src:n_src + n_off])
      src_ty = ir.MemRefType(src.type)
      strides, _ = src_ty.get_strides_and_offset()
      eb = mgpu_utils.bitwidth(src_ty.element_type) // 8
      for o, s in zip(offsets, strides, strict=True):
        if s == _DYNAMIC:
          raise NotImplementedError(f"dynamic stride in {op}")
        a = a + self.int(o).scale(s * eb)
      return p, a
    if name == "memref.reinterpret_cast":
      src = op.operands[0]
      p, _ = self.addr(src)
      n_src, n_off, _, _ = self._segments(op)
      (off,) = self._static_and_dynamic(op, "static_offsets", op.operands[n_src:n_src + n_off])
      eb = mgpu_utils.bitwidth(ir.MemRefType(v.type).element_type) // 8
      return p, p + self.int(off).scale(eb)
    if name in ("memref.expand_shape", "memref.collapse_shape", "memref.transpose", "memref.cast",
                "memref.memory_space_cast", "builtin.unrealized_conversion_cast"):
      return self.addr(op.operands[0])
    raise NotImplementedError(f"address of a memref made by {name}: {op}")


_state = threading.local()


@contextlib.contextmanager
def record():
  """Collects a Copy for every async copy lowered inside the block (yields the list)."""
  copies: list[Copy] = []
  orig_copy, orig_desc = lc.LaunchContext.async_copy, lc.LaunchContext._get_tma_desc

  def get_tma_desc(self, *args, **kwargs):
    _state.tma = True
    return orig_desc(self, *args, **kwargs)

  def async_copy(self, **kw):
    src, dst = kw["src_ref"], kw["dst_ref"]
    load = mgpu_utils.is_smem_ref(dst)
    smem, gmem = (dst, src) if load else (src, dst)
    _state.tma = False
    out = orig_copy(self, **kw)
    ev = _Eval()
    smem_ty = ir.MemRefType(smem.type)
    eb = mgpu_utils.bitwidth(smem_ty.element_type) // 8
    _, smem_addr = ev.addr(smem)
    gmem_addr = None
    if not _state.tma and not kw.get("gmem_transform"):  # 1-D bulk copy: its GMEM address matters too
      gmem_ty = ir.MemRefType(gmem.type)
      starts, _, _ = mgpu_utils.parse_indices(kw.get("gmem_slice", ()), gmem_ty.shape, check_oob=False)
      strides, _ = gmem_ty.get_strides_and_offset()
      gmem_addr = ev.addr(gmem)[1]
      for i, s in zip(starts, strides):
        gmem_addr = gmem_addr + ev.int(i).scale(s * eb)
    swizzle = kw.get("swizzle")
    swizzle = None if swizzle in (None, 16) else int(swizzle)  # 16: Mosaic GPU's "no swizzle"
    copies.append(Copy("load" if load else "store", "tma" if _state.tma else "bulk", str(smem.type),
                       str(gmem.type), swizzle, smem_addr, gmem_addr,
                       math.prod(smem_ty.shape) * eb))
    return out

  lc.LaunchContext.async_copy, lc.LaunchContext._get_tma_desc = async_copy, get_tma_desc
  try:
    yield copies
  finally:
    lc.LaunchContext.async_copy, lc.LaunchContext._get_tma_desc = orig_copy, orig_desc


def problems(copies: list[Copy]) -> list[str]:
  """Every alignment rule a recorded copy breaks (empty: all copies are legal)."""
  return sorted({p for c in copies for p in c.problems()})
