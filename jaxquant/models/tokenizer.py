"""Tokenizers without a hub: rebuilt from GGUF metadata, or read from a tokenizer.json on disk.

GGUF (`tokenizer.ggml.model == "gpt2"`): a byte-level BPE from `tokenizer.ggml.tokens` and `.merges`. The
pre-tokenizer follows `tokenizer.ggml.pre`; for SmolLM2 ("smollm") it is Hugging Face's
Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)], as in its tokenizer.json.
Control tokens (token_type 3, e.g. <|im_start|>) are added as special tokens. No BOS/EOS is added by encode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str | None):
  """HF pre-tokenizer equivalent to llama.cpp's `tokenizer.ggml.pre` value."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("smollm", "starcoder", "refact"):
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in (None, "default", "gpt2", "gpt-2"):
    return byte_level
  if pre in ("llama-bpe", "llama3"):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise ValueError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported "
                   "(supported: smollm, starcoder, default/gpt2, llama-bpe)")


def tokenizer_from_gguf(path) -> Tokenizer:
  """A `tokenizers.Tokenizer` from a GGUF file's metadata (path or an open gguf.GGUFReader)."""
  from jaxquant.models.gguf_loader import open_gguf
  reader = open_gguf(path)

  def field(key, required=True):
    f = reader.fields.get(key)
    if f is None:
      if required:
        raise ValueError(f"{path}: missing GGUF metadata key {key!r}")
      return None
    return f.contents()

  kind = field("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)")
  tokens = field("tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
  token_types = field("tokenizer.ggml.token_type", required=False)
  vocab = {token: i for i, token in enumerate(tokens)}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  tokenizer.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre", required=False))
  tokenizer.decoder = decoders.ByteLevel()
  if token_types is not None:
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, kind in enumerate(token_types) if int(kind) == 3]  # 3: CONTROL
    tokenizer.add_special_tokens(control)
  return tokenizer


def tokenizer_from_json(path: str | os.PathLike, max_length: int = 512) -> Tokenizer:
  """A tokenizer.json (file or the directory holding it), with padding off and truncation at max_length."""
  path = Path(path)
  if path.is_dir():
    path = path / "tokenizer.json"
  tokenizer = Tokenizer.from_file(str(path))
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length)
  return tokenizer


def sentence_max_length(model_dir: str | os.PathLike, default: int = 512) -> int:
  """max_seq_length from a sentence-transformers sentence_bert_config.json, else `default`."""
  config = Path(model_dir) / "sentence_bert_config.json"
  if config.is_file():
    return int(json.loads(config.read_text()).get("max_seq_length", default))
  return default


def encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
  """Token ids (n,) int32 of `text`, without added special tokens."""
  return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def encode_batch(tokenizer: Tokenizer, sentences: list[str], pad_to_multiple: int = 8,
                 pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Encode sentences with special tokens ([CLS] ... [SEP] for BERT), right-padded to a common length.

  Returns token_ids (B, T) int32 and mask (B, T) int32 (1 for real tokens); T is the longest sentence rounded
  up to a multiple of pad_to_multiple (fewer distinct shapes, fewer recompilations).
  """
  encodings = tokenizer.encode_batch(list(sentences), add_special_tokens=True)
  longest = max(len(e.ids) for e in encodings)
  seq = -(-longest // pad_to_multiple) * pad_to_multiple
  token_ids = np.full((len(encodings), seq), pad_id, dtype=np.int32)
  mask = np.zeros((len(encodings), seq), dtype=np.int32)
  for row, e in enumerate(encodings):
    token_ids[row, :len(e.ids)] = e.ids
    mask[row, :len(e.ids)] = 1
  return token_ids, mask
