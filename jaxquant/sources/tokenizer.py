"""Tokenizers without a hub: rebuilt from GGUF metadata, or read from a tokenizer.json on disk.

GGUF (`tokenizer.ggml.model == "gpt2"`): a byte-level BPE from `tokenizer.ggml.tokens` and `.merges`. The
pre-tokenizer follows `tokenizer.ggml.pre`; for SmolLM2 ("smollm") it is Hugging Face's
Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)], as in its tokenizer.json.
Control tokens (token_type 3, e.g. <|im_start|>) are added as special tokens. No BOS/EOS is added by encode.

GGUF (`tokenizer.ggml.model == "llama"`, e.g. Gemma 3): a SentencePiece-style BPE over `tokenizer.ggml.tokens`
and `.scores`, as llama.cpp's SPM tokenizer runs it: no pre-splitting, spaces become "▁" (a leading one only
if `tokenizer.ggml.add_space_prefix`), then adjacent symbols are merged greedily, the pair whose merged piece
has the highest score first; a character with no piece falls back to its UTF-8 bytes <0xXX>. This is expressed
as a `tokenizers` BPE whose merges are every split (left, right) of every normal piece, ranked by the piece's
score (what Hugging Face's SentencePiece converter does). User-defined pieces (token_type 4, e.g. "\n\n",
runs of spaces, "<table>") are matched in the raw text before everything else, as llama.cpp does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from jaxquant.sources.gguf import open_gguf

_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str | None, path=""):
  """HF pre-tokenizer equivalent to llama.cpp's `tokenizer.ggml.pre` value; `path` names the file in errors."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("smollm", "starcoder", "refact"):
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in (None, "default", "gpt2", "gpt-2"):
    return byte_level
  if pre in ("llama-bpe", "llama3"):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise ValueError(f"{path}: GGUF tokenizer pre-tokenizer {pre!r} is not supported "
                   "(supported: smollm, starcoder, refact, default/gpt2, llama-bpe/llama3)")


def tokenizer_from_gguf(path) -> Tokenizer:
  """A `tokenizers.Tokenizer` from a GGUF file's metadata (path or an open gguf.GGUFReader)."""
  reader = open_gguf(path)

  def field(key, required=True):
    f = reader.fields.get(key)
    if f is None:
      if required:
        raise ValueError(f"{path}: missing GGUF metadata key {key!r}")
      return None
    return f.contents()

  kind = field("tokenizer.ggml.model")
  if kind == "llama":
    return _sentencepiece_bpe(path, field)
  if kind != "gpt2":
    raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported "
                     "('gpt2' byte-level BPE and 'llama' SentencePiece-style BPE are)")
  tokens = field("tokenizer.ggml.tokens")
  merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
  token_types = field("tokenizer.ggml.token_type", required=False)
  vocab = {token: i for i, token in enumerate(tokens)}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  tokenizer.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre", required=False), path)
  tokenizer.decoder = decoders.ByteLevel()
  if token_types is not None:
    control = [AddedToken(tokens[i], special=True, normalized=False)
               for i, kind in enumerate(token_types) if int(kind) == 3]  # 3: CONTROL
    tokenizer.add_special_tokens(control)
  return tokenizer


# llama.cpp / SentencePiece token types (tokenizer.ggml.token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def spm_merges(tokens: list[str], scores, token_types) -> list[tuple[str, str]]:
  """BPE merges equivalent to SentencePiece's score-greedy merging: for every normal piece of two or more
  characters, each split into two pieces that are both in the vocabulary, ordered by the merged piece's score
  (highest first), ties by the ids of the merged piece, then its left and right parts."""
  ids = {token: i for i, token in enumerate(tokens)}
  ranked = []
  for i, piece in enumerate(tokens):
    if int(token_types[i]) != _NORMAL or len(piece) < 2:
      continue
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in ids and right in ids:
        ranked.append((-float(scores[i]), i, ids[left], ids[right], left, right))
  ranked.sort(key=lambda r: r[:4])
  return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(path, field) -> Tokenizer:
  tokens = list(field("tokenizer.ggml.tokens"))
  scores = field("tokenizer.ggml.scores")
  token_types = field("tokenizer.ggml.token_type")
  if len(scores) != len(tokens) or len(token_types) != len(tokens):
    raise ValueError(f"{path}: tokenizer.ggml.scores ({len(scores)}) / token_type ({len(token_types)}) do not "
                     f"match tokenizer.ggml.tokens ({len(tokens)})")
  missing_bytes = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in set(tokens)]
  if missing_bytes:
    raise ValueError(f"{path}: SentencePiece vocabulary lacks byte-fallback pieces {missing_bytes[:4]}...")
  unk_id = field("tokenizer.ggml.unknown_token_id", required=False)
  unk = tokens[int(unk_id)] if unk_id is not None else None
  vocab = {token: i for i, token in enumerate(tokens)}
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, token_types), unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
  steps = [normalizers.Replace(" ", "\u2581")]
  if field("tokenizer.ggml.add_space_prefix", required=False):
    steps.insert(0, normalizers.Prepend("\u2581"))
  tokenizer.normalizer = normalizers.Sequence(steps)
  tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)]
                                           if field("tokenizer.ggml.add_space_prefix", required=False) else []))
  # User-defined pieces are cut out of the raw text first (normalized=False: before spaces become "▁");
  # control pieces (<bos>, <eos>, <unusedN>, ...) are special, matched in text and skipped when decoding.
  tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, kind in enumerate(token_types) if int(kind) == _USER_DEFINED])
  tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, kind in enumerate(token_types) if int(kind) == _CONTROL])
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
