"""Flax NNX models (llama-family decoder, BERT encoder) and their checkpoint loaders (GGUF, safetensors)."""

from jaxquant.models.bert import Bert, BertConfig, load_bert
from jaxquant.models.gguf_loader import load_llama_gguf
from jaxquant.models.llama import Llama, LlamaConfig, random_llama

__all__ = ["Bert", "BertConfig", "Llama", "LlamaConfig", "load_bert", "load_llama_gguf", "random_llama"]
