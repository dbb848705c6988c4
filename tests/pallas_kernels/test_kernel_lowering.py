"""Every kernel configuration the GPU check times lowers to CUDA on this CPU-only machine.

`backend.lower_for_cuda` lowers under an abstract H200 (JAX 0.11): the Pallas lowering runs and verifies its
module (Triton: unsupported primitives, non-power-of-two tensors, wrong dtypes; Mosaic GPU: layouts, shared-memory
budget). Triton's own compilation to PTX happens inside XLA on a GPU and is not covered here.
"""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import act_quant, backend

REPO = pathlib.Path(__file__).resolve().parents[2]


def _gpu_cases():
  sys.path.insert(0, str(REPO / "experiments"))
  spec = importlib.util.spec_from_file_location("gpu_cases", REPO / "experiments" / "gpu_cases.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
  spec.loader.exec_module(module)
  return module


gpu_cases = _gpu_cases()
FULL = gpu_cases.cases(smoke=False, interpret=False)


@pytest.mark.parametrize("case", FULL, ids=[c.name for c in FULL])
def test_every_timed_kernel_lowers_to_cuda(case):
  targets = gpu_cases.lowering_targets(case)
  for label, fn, structs in targets:
    text = backend.lower_for_cuda(fn, *structs).as_text()
    assert "triton" in text or "mosaic" in text, (case.name, label)  # a kernel call, not plain HLO


def test_every_family_has_a_kernel_to_lower():
  families = {c.family for c in FULL if gpu_cases.lowering_targets(c)}
  assert "rmsnorm_quant" in families


S = jax.ShapeDtypeStruct


def test_non_power_of_two_tiles_are_caught_by_lowering():
  """The check has teeth: a kernel holding a (3, 16) value fails to lower."""
  def kernel(x_ref, o_ref):
    a = jnp.zeros((3, 16), jnp.float32) + x_ref[0, 0]
    o_ref[0:1, :] = jnp.sum(a, axis=0, keepdims=True)
  f = lambda x: backend.call(kernel, x, out_shape=S((4, 16), jnp.float32), grid=(1,), interpret=False)
  with pytest.raises(Exception, match="power-of-two"):
    backend.lower_for_cuda(f, S((4, 16), jnp.float32))


def test_interpret_is_forced_by_argument_not_global():
  assert backend.use_interpret(None) == (jax.default_backend() == "cpu")
  assert backend.use_interpret(True) and not backend.use_interpret(False)
  text = backend.lower_for_cuda(lambda x: act_quant.quantize_rows(x, interpret=True), S((4, 64), jnp.float32)).as_text()
  assert "triton" not in text  # interpret mode lowers to plain HLO even when targeting CUDA
