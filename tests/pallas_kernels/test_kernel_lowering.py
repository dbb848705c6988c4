"""Every configuration the benchmark times lowers to CUDA (Triton) on this CPU-only machine.

`jax.jit(f).trace(*ShapeDtypeStructs).lower(lowering_platforms=("cuda",))` runs the Pallas Triton lowering
and verifies the Triton MLIR module: unsupported primitives, non-power-of-two tensors and wrong dtypes fail
here. It does not run Triton's own compilation to PTX (that happens inside XLA on a GPU).
"""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from pallas_kernels import backend, int8_matmul as im, lut_gemm as lg

REPO = pathlib.Path(__file__).resolve().parents[2]


def _bench():
  spec = importlib.util.spec_from_file_location("bench_kernels", REPO / "experiments" / "bench_kernels.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
  spec.loader.exec_module(module)
  return module


bench = _bench()


def _lower(fn, *structs):
  return jax.jit(fn).trace(*structs).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("shape", list(bench.SHAPES))
@pytest.mark.parametrize("variant", bench.VARIANTS)
def test_benchmark_configurations_lower_to_cuda(variant, shape):
  cases = bench.build_cases([variant], {shape: bench.SHAPES[shape]}, bench.MS, interpret=False)
  assert len(cases) == len(bench.MS)
  for case in cases:
    for label, fn, structs in bench.lowering_targets(case):
      text = _lower(fn, *structs).as_text()
      if label.startswith("pallas"):
        assert "__gpu$xla.gpu.triton" in text, (variant, shape, case.m, label)  # Triton, not Mosaic GPU


S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("m,k,n,k_group,xs", [
    (7, 200, 33, 100, (2, 7, 1)), (3, 576, 40, 128, ()), (70, 129, 130, None, (70, 1))])
def test_unaligned_and_grouped_int8_lowers(m, k, n, k_group, xs):
  groups = -(-k // (k_group or k))
  f = lambda x, w, a, b, bias: im.int8_matmul(x, w, a, b, k_group=k_group, bias=bias, out_dtype=jnp.float16,
                                              interpret=False)
  _lower(f, S((m, k), jnp.int8), S((k, n), jnp.int8), S(xs, jnp.float32), S((groups, n), jnp.bfloat16), S((n,), jnp.float32))
  _lower(lambda x, w: im.int8_matmul_int32(x, w, interpret=False), S((m, k), jnp.int8), S((k, n), jnp.int8))
  _lower(f, S((m, k), jnp.int8), S((k, n), jnp.uint8), S(xs, jnp.float32), S((groups, n), jnp.float32),
         S((n,), jnp.bfloat16))  # uint8 codes with offset 128


@pytest.mark.parametrize("method", ["lut", "decode"])
@pytest.mark.parametrize("m,k,n,k_group,q", [(1, 576, 40, 128, 3), (2, 300, 24, 24, 4), (5, 200, 33, 100, 2),
                                             (64, 136, 20, 64, 1)])
def test_unaligned_and_odd_group_lut_gemm_lowers(method, m, k, n, k_group, q):
  if method == "lut" and k_group % 8:
    pytest.skip("the lut strategy needs k_group % 8 == 0")
  c, groups = -(-k // 8), -(-k // k_group)
  f = lambda x, p, a, o: lg.lut_gemm(x, p, a, o, k_group=k_group, method=method, interpret=False)
  _lower(f, S((m, k), jnp.float32), S((q, c, n), jnp.uint8), S((q, groups, n), jnp.float32), S((groups, n), jnp.float32))


def test_non_power_of_two_tiles_are_caught_by_lowering():
  """The check has teeth: a kernel holding a (3, 16) value fails to lower."""
  def kernel(x_ref, o_ref):
    a = jnp.zeros((3, 16), jnp.float32) + x_ref[0, 0]
    o_ref[0:1, :] = jnp.sum(a, axis=0, keepdims=True)
  f = lambda x: backend.call(kernel, x, out_shape=S((4, 16), jnp.float32), grid=(1,), interpret=False)
  with pytest.raises(Exception, match="power-of-two"):
    _lower(f, S((4, 16), jnp.float32))


def test_interpret_is_forced_by_argument_not_global():
  assert backend.use_interpret(None) == (jax.default_backend() == "cpu")
  assert backend.use_interpret(True) and not backend.use_interpret(False)
  text = _lower(lambda x: im.int8_matmul_int32(x, x, interpret=True), S((16, 16), jnp.int8)).as_text()
  assert "triton" not in text  # interpret mode lowers to plain HLO even when targeting CUDA
