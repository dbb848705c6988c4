"""Pallas kernels of jaxquant: each written once over refs, run in interpret mode on CPU and with Triton on GPU.

  int8_matmul   W8A8: int8 x int8 -> int32 accumulation, fused scale/bias epilogue (per-channel or K-groups)
  act_quant     token-wise dynamic int8 quantization, alone or fused with RMSNorm / LayerNorm
  lut_gemm      weight-only matmul of BCQ (and uniform-as-BCQ) weights: lookup tables at small batch,
                in-register decode + dot at larger batch; never a dequantized matrix in HBM

Every public wrapper takes `interpret=None|True|False` (see backend.py) and has a `reference()` beside it.
The kernels know nothing of jaxquant's pytrees except `bcq_matmul`, which reads a BCQArray by attribute.
Import from the submodules (`from pallas_kernels.int8_matmul import int8_matmul`): the package re-exports
nothing, so that `pallas_kernels.int8_matmul` and `pallas_kernels.lut_gemm` stay the modules.
"""
