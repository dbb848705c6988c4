"""Flax NNX models (llama-family and Gemma 3 decoders, BERT encoder) and text generation for the decoders
(`decode`: KV-cache prefill and steps; `sampling`: greedy / temperature / top-k). Checkpoint files and their
tokenizers are read by jaxquant.sources."""

from jaxquant.models.bert import Bert, BertConfig
from jaxquant.models.gemma import Gemma, GemmaConfig, random_gemma
from jaxquant.models.llama import Llama, LlamaConfig, random_llama

__all__ = ["Bert", "BertConfig", "Gemma", "GemmaConfig", "Llama", "LlamaConfig", "random_gemma", "random_llama"]
