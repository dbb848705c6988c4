"""Flax NNX models (llama-family and Gemma 3 decoders, BERT encoder), their checkpoint loaders (GGUF, safetensors),
and text generation for the decoders (`decode`: KV-cache prefill and steps; `sampling`: greedy / temperature /
top-k)."""

from jaxquant.models.bert import Bert, BertConfig, load_bert
from jaxquant.models.gemma import Gemma, GemmaConfig, random_gemma
from jaxquant.models.gguf_loader import load_gemma_gguf, load_llama_gguf
from jaxquant.models.llama import Llama, LlamaConfig, random_llama

__all__ = ["Bert", "BertConfig", "Gemma", "GemmaConfig", "Llama", "LlamaConfig", "load_bert", "load_gemma_gguf",
           "load_llama_gguf", "random_gemma", "random_llama"]
