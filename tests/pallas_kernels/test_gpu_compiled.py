"""The Mosaic GPU kernels compiled on a real Hopper GPU against numpy float64 (run by experiments/gpu_check.py as
`pytest -m gpu`; skipped anywhere else). Shapes are those of the interpret-mode tests, plus the real model widths
that interpret mode is too slow for; each test is bounded to a few seconds of GPU time."""

import numpy as np
import jax.numpy as jnp
import pytest

from jaxquant import ops, pipeline, recipes
from jaxquant.models.llama import LlamaConfig, random_llama
from pallas_kernels import int8_matmul_mgpu as mk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ops._is_hopper(), reason="needs a Hopper GPU (sm_90)")]  # noqa: SLF001


def _numpy_w8a8(x, w, xs, ws, k_group):
  m, k = x.shape
  kg = k_group or k
  groups = -(-k // kg)
  xs = np.asarray(xs, np.float64)
  xs = xs.reshape(groups, m, 1) if xs.ndim == 3 else np.broadcast_to(xs.reshape(-1, 1), (m, 1))[None]
  y = np.zeros((m, w.shape[0]))
  for g in range(groups):
    sl = slice(g * kg, min(k, (g + 1) * kg))
    y += (x[:, sl].astype(np.int64) @ w[:, sl].astype(np.int64).T) * xs[min(g, len(xs) - 1)] * ws[g][None, :]
  return y


@pytest.mark.parametrize("m,n,k,k_group,xs_mode", [
    (1, 28672, 7168, None, "token"), (16, 8192, 8192, None, "token"), (13, 1536, 576, 128, "token"),
    (4096, 1024, 2048, None, "tensor"), (300, 576, 576, 128, "token_group"), (70, 72, 576, 128, "token")])
def test_w8a8_kernel_compiled_matches_numpy(m, n, k, k_group, xs_mode):
  rng = np.random.default_rng(m + n + k)
  x = rng.integers(-128, 128, (m, k), dtype=np.int8)
  w = rng.integers(-128, 128, (n, k), dtype=np.int8)
  groups = 1 if k_group is None else -(-k // k_group)
  xs = {"tensor": np.float32(0.01), "token": rng.uniform(0.5, 2, (m, 1)) / 128,
        "token_group": rng.uniform(0.5, 2, (groups, m, 1)) / 128}[xs_mode].astype(np.float32)
  ws = (rng.uniform(0.5, 2, (groups, n)) / 128).astype(np.float32)
  y = mk.int8_matmul(jnp.asarray(x), jnp.asarray(w), jnp.asarray(xs), jnp.asarray(ws), k_group=k_group,
                     out_dtype=jnp.float32)
  ref = _numpy_w8a8(x, w, xs, ws, k_group)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  raw = mk.int8_matmul_int32(jnp.asarray(x), jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(raw), x.astype(np.int64) @ w.astype(np.int64).T)


# (recipe, tokens, tolerance): W8A8 at M = 320 >= ops.W8A8_KERNEL_MIN_M (exact integer sums, float epilogues);
# weight-only at M = 16 (the GEMV kernel; bf16 products, see tests/test_kernel_path.py).
@pytest.mark.parametrize("recipe,shape,tolerance", [
    ("zeroquant-w8a8", (2, 160), 2e-4), ("zeroquant-w8a8-kgroup", (2, 160), 2e-4),
    ("rtn-w4-g128", (2, 8), 6e-3), ("lutgemm-uniform3-g128", (1, 8), 6e-3)])
def test_model_on_the_kernel_path_matches_the_xla_path(recipe, shape, tolerance):
  """A small random llama quantized for real: ops.qdot's pallas path (compiled kernels) gives the XLA path's logits."""
  config = LlamaConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=768)
  model = pipeline.quantize_model(random_llama(config), recipes.get_recipe(recipe), progress=False)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, shape), jnp.int32)
  xla = np.asarray(pipeline.set_backend(model, "xla")(tokens))
  kernels = np.asarray(pipeline.set_backend(model, "pallas")(tokens))
  np.testing.assert_allclose(kernels, xla, atol=tolerance * np.abs(xla).max(), rtol=0)
