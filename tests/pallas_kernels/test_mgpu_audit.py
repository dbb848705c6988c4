"""mgpu_audit on a minimal Mosaic GPU kernel: it sees each rule PTX sets on copies, and passes legal ones.

The kernel TMA-loads 16 float32 into a slice of an SMEM buffer and stores them back. With the default
zero-filling load Mosaic GPU emits cp.async.bulk.tensor (128-byte aligned SMEM); with OOBFillMode.UNDEFINED, and
for the unswizzled store, the 1-D cp.async.bulk (16-byte aligned addresses, 16-byte multiple sizes).
"""

import functools

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import pytest

from pallas_kernels import mgpu_audit, mgpu_common

S = jax.ShapeDtypeStruct


def _copies(slot: int, start: int, oob=None, gmem_start: int = 0):
  def body(x_g, o_g):
    @functools.partial(pl.run_scoped, buf=plgpu.SMEM((2, slot), jnp.float32), bar=plgpu.Barrier(num_barriers=1))
    def _(buf, bar):
      dst = buf.at[1, pl.ds(start, 16)]  # row 1 of the buffer starts slot * 4 bytes in
      plgpu.copy_gmem_to_smem(x_g.at[pl.ds(gmem_start, 16)], dst, bar.at[0], oob_mode=oob)
      plgpu.barrier_wait(bar.at[0])
      plgpu.copy_smem_to_gmem(dst, o_g)
      plgpu.wait_smem_to_gmem(0)

  f = plgpu.kernel(body, out_type=S((16,), jnp.float32), grid=(1,), grid_names=("x",),
                   compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  jax.clear_caches()
  with mgpu_common.abstract_gpu(), mgpu_audit.record() as copies:
    jax.jit(f).trace(S((64,), jnp.float32)).lower(lowering_platforms=("cuda",))
  return copies


def test_aligned_copies_pass():
  copies = _copies(32, 0)
  assert [(c.direction, c.kind, c.smem_addr.const) for c in copies] == [("load", "tma", 128), ("store", "bulk", 128)]
  assert mgpu_audit.problems(copies) == []


def test_tma_destination_at_64_mod_128_is_reported():
  (p,) = mgpu_audit.problems(_copies(16, 0))  # the W8A8 small-M fault: row 1 of a (2, 16) f32 buffer
  assert p.startswith("load ") and "TMA SMEM address 64 is not 128-byte aligned" in p


@pytest.mark.parametrize("start,gmem_start,expect", [
    (2, 0, "bulk-copy SMEM address 136 is not 16-byte aligned"),
    (4, 2, "bulk-copy GMEM offset 8 is not 16-byte aligned"),
    (4, 4, None),
])
def test_bulk_copy_rules(start, gmem_start, expect):
  copies = _copies(32, start, plgpu.OOBFillMode.UNDEFINED, gmem_start)
  assert {c.kind for c in copies} == {"bulk"}
  found = mgpu_audit.problems(copies)
  assert (not found) if expect is None else any(expect in p for p in found), found
