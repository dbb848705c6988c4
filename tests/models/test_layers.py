import jax.numpy as jnp
import numpy as np

from jaxquant.models.layers import LayerNorm, Linear, RMSNorm


def test_layers_match_numpy_under_strict_numerics(strict_numerics):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 8)).astype(np.float32)
  weight, bias = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
  kernel = rng.standard_normal((8, 5)).astype(np.float32)
  rms = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * weight
  np.testing.assert_allclose(np.asarray(RMSNorm(jnp.asarray(weight), 1e-6)(jnp.asarray(x))), rms, rtol=1e-5)
  centered = x - x.mean(-1, keepdims=True)
  ln = centered / np.sqrt(np.mean(centered**2, -1, keepdims=True) + 1e-5) * weight + bias
  np.testing.assert_allclose(np.asarray(LayerNorm(jnp.asarray(weight), jnp.asarray(bias), 1e-5)(jnp.asarray(x))),
                             ln, rtol=1e-5, atol=1e-5)
  linear = Linear(jnp.asarray(kernel), jnp.asarray(bias[:5]))
  np.testing.assert_allclose(np.asarray(linear(jnp.asarray(x))), x @ kernel + bias[:5], rtol=1e-5, atol=1e-5)
