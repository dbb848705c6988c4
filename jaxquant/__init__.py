"""jaxquant: post-training quantization of Flax models with really packed weights and integer matmuls."""

__version__ = "0.1.0"
