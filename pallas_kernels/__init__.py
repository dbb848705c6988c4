"""Pallas kernels of jaxquant. Mosaic GPU (Hopper) kernels run compiled on sm_90 and in Mosaic GPU's interpret mode
on CPU; the one Triton kernel (act_quant) stays because it measured faster than XLA on an H200.

  int8_matmul_mgpu        W8A8: TMA + int8 wgmma, int32 accumulation inside K-groups, fused scale/bias epilogue
  int8_matmul_tuning      its tile configurations (default per shape, sweep candidates, SMEM estimate)
  weight_only_mgpu        weight-only entry point: picks the GEMV kernel or XLA by M and format
  weight_only_gemv_mgpu   M <= 64 tokens: uniform 2/4-bit codes or BCQ sign planes streamed once, decoded in
                          registers (weight_only_decode_mgpu), the wgmma A operand ("swap AB")
  weight_only_matmul_mgpu prefill-sized M (uniform 2/4-bit): opt-in until it is timed on a GPU
  act_quant               token-wise dynamic int8 quantization, alone or fused with RMSNorm / LayerNorm (Triton)
  backend, mgpu_common    interpret vs compiled, lowering for CUDA with no GPU (an abstract H200), SM count

Every public wrapper takes `interpret=` and has a `reference()` beside it. The kernels know nothing of jaxquant's
pytrees: they take the raw arrays of weight format 2 (docs/formats.md); jaxquant.ops is the only caller.
"""
