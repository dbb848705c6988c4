"""Helpers shared by the Mosaic GPU (Hopper) kernels: SM count, lowering with no GPU, interpret mode.

Mosaic GPU kernels are persistent (one CTA per SM looping over output tiles), so they need the SM count
when they are traced. On a GPU it comes from the device; on the CPU machine (lowering tests) from an
abstract GPU device installed with `abstract_gpu()`:

  with mgpu_common.abstract_gpu():
    jax.jit(f).trace(*structs).lower(lowering_platforms=("cuda",))

Interpret mode (`interpret=True` in the kernels' wrappers) runs the kernel body on the CPU through
`plgpu.InterpretGPUParams`, which simulates SMEM, TMA (zero-filled out-of-bounds reads, clipped stores),
barriers and warpgroups.
"""

from __future__ import annotations

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels import backend

H200_SMS = 132  # H100 SXM and H200 both have 132 SMs
HOPPER_SMEM_BYTES = 232448  # 227 KiB of dynamic shared memory per block on sm_90


def num_sms(default: int = H200_SMS) -> int:
  """SMs of the target GPU: the abstract device's when one is installed, else the default device's."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  if abstract is not None and abstract.num_cores:
    return int(abstract.num_cores)
  try:
    device = jax.devices()[0]
  except RuntimeError:  # no backend at all
    return default
  return int(getattr(device, "core_count", 0) or default)


def abstract_gpu(num_cores: int = H200_SMS, device_kind: str = "NVIDIA H200"):
  """Trace/lower for a GPU that is not attached (lowering tests on the CPU machine): backend.abstract_gpu."""
  return backend.abstract_gpu(device_kind, num_cores)


def interpret_params(interpret: bool | plgpu.InterpretGPUParams | None):
  """The `interpret=` value for plgpu.kernel: None (compile) or InterpretGPUParams."""
  if interpret is None or interpret is False:
    return None
  if interpret is True:
    return plgpu.InterpretGPUParams()
  return interpret


def cdiv(a: int, b: int) -> int:
  return -(-a // b)
