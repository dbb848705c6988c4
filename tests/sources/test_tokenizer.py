"""Tokenizers rebuilt from GGUF metadata, on tiny hand-made GGUF files: the llama-bpe / llama3 pre-tokenizer
branch against hand-derived splits, and every error path."""

import gguf
import numpy as np
import pytest

import bpe_ref
from jaxquant.sources.tokenizer import tokenizer_from_gguf

ALPHABET = sorted(set(bpe_ref.byte_alphabet().values()))  # the 256 byte symbols: any text encodes
MERGES = ["1 2", "12 3", "Ġ H", "ĠH E", "ĠHE L", "ĠHEL L", "ĠHELL O", "' S", "Ċ Ċ"]


def _write(path, model="gpt2", pre="llama-bpe", tokens=None, merges=MERGES, scores=None, token_types=None,
           skip=()):
  """A GGUF holding only tokenizer metadata (and one tiny tensor)."""
  writer = gguf.GGUFWriter(str(path), "llama")
  if "model" not in skip:
    writer.add_tokenizer_model(model)
  if pre is not None:
    writer.add_tokenizer_pre(pre)
  if tokens is None:
    tokens = ALPHABET + ["".join(m.split(" ")) for m in merges]
  if "tokens" not in skip:
    writer.add_token_list(tokens)
  if merges is not None:
    writer.add_token_merges(merges)
  if scores is not None:
    writer.add_token_scores(scores)
  if token_types is not None:
    writer.add_token_types(token_types)
  writer.add_tensor("x", np.zeros(4, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path, tokens


# Pre-tokenization of TEXT derived by hand from llama.cpp's LLAMA3 pattern
#   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
# "I" letters; "'m" contraction; of the two spaces before a digit the first is \s+(?!\S), the second \s+; numbers
# in runs of at most three digits; " HELLO" (an optional non-letter, then letters); "'S" a contraction whatever
# its case; "\n\n" \s*[\r\n]+; then "x". Bytes shown in GPT-2's alphabet (space "Ġ", newline "Ċ").
TEXT = "I'm  12345 HELLO'S\n\nx"
LLAMA3_PIECES = ["I", "'m", "Ġ", "Ġ", "123", "45", "ĠHELLO", "'S", "ĊĊ", "x"]
# The same text with GPT-2's pattern (case-sensitive contractions, numbers in any length, "\s+(?!\S)" before "x").
GPT2_PIECES = ["I", "'m", "Ġ", "Ġ12345", "ĠHELLO", "'", "S", "Ċ", "Ċ", "x"]


@pytest.mark.parametrize("pre", ["llama-bpe", "llama3"])
def test_llama3_pre_tokenizer_splits_as_the_llama3_pattern(tmp_path, pre):
  path, tokens = _write(tmp_path / "t.gguf", pre=pre)
  tokenizer = tokenizer_from_gguf(path)
  assert [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(TEXT)] == LLAMA3_PIECES
  ids = {t: i for i, t in enumerate(tokens)}
  # Merges inside a piece only: "123" is one token (digits grouped by three), "ĠHELLO" one, "'S" one, "ĊĊ" one.
  expected = [ids[t] for t in ("I", "'", "m", "Ġ", "Ġ", "123", "4", "5", "ĠHELLO", "'S", "ĊĊ", "x")]
  assert tokenizer.encode(TEXT, add_special_tokens=False).ids == expected
  assert tokenizer.decode(expected) == TEXT


def test_gpt2_pre_tokenizer_differs_where_the_patterns_do(tmp_path):
  """The default ("gpt2") branch on the same text, also against tests/bpe_ref.py."""
  path, tokens = _write(tmp_path / "t.gguf", pre="gpt2")
  tokenizer = tokenizer_from_gguf(path)
  assert [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(TEXT)] == GPT2_PIECES
  assert tokenizer.encode(TEXT, add_special_tokens=False).ids == bpe_ref.encode(TEXT, tokens, MERGES, pre="gpt2")


def test_gguf_tokenizer_errors_name_file_and_key(tmp_path):
  with pytest.raises(ValueError, match=r"bad-pre.gguf.*pre-tokenizer 'qwen2' is not supported"):
    tokenizer_from_gguf(_write(tmp_path / "bad-pre.gguf", pre="qwen2")[0])
  with pytest.raises(ValueError, match=r"bert.gguf: GGUF tokenizer model 'bert' is not supported"):
    tokenizer_from_gguf(_write(tmp_path / "bert.gguf", model="bert")[0])
  with pytest.raises(ValueError, match=r"no-model.gguf: missing GGUF metadata key 'tokenizer.ggml.model'"):
    tokenizer_from_gguf(_write(tmp_path / "no-model.gguf", skip=("model",))[0])
  with pytest.raises(ValueError, match=r"no-tokens.gguf: missing GGUF metadata key 'tokenizer.ggml.tokens'"):
    tokenizer_from_gguf(_write(tmp_path / "no-tokens.gguf", skip=("tokens",))[0])
  with pytest.raises(ValueError, match=r"no-merges.gguf: missing GGUF metadata key 'tokenizer.ggml.merges'"):
    tokenizer_from_gguf(_write(tmp_path / "no-merges.gguf", merges=None, tokens=ALPHABET)[0])


def _spm_vocab(with_bytes=True):
  pieces = ["<unk>", "<s>", "</s>", "\u2581a", "a", "b", "\u2581"]
  pieces += [f"<0x{b:02X}>" for b in range(256)] if with_bytes else []
  types = [2, 3, 3] + [1] * 4 + [6] * (len(pieces) - 7)
  return pieces, [0.0] * len(pieces), types


def test_sentencepiece_errors_name_file_and_field(tmp_path):
  tokens, scores, types = _spm_vocab()
  path, _ = _write(tmp_path / "short-scores.gguf", model="llama", pre=None, merges=None, tokens=tokens,
                   scores=scores[:-1], token_types=types)
  with pytest.raises(ValueError, match=r"short-scores.gguf: tokenizer.ggml.scores \(262\) / token_type \(263\) do "
                                       r"not match tokenizer.ggml.tokens \(263\)"):
    tokenizer_from_gguf(path)
  tokens, scores, types = _spm_vocab(with_bytes=False)
  path, _ = _write(tmp_path / "no-bytes.gguf", model="llama", pre=None, merges=None, tokens=tokens, scores=scores,
                   token_types=types)
  with pytest.raises(ValueError, match=r"no-bytes.gguf: SentencePiece vocabulary lacks byte-fallback pieces "
                                       r"\['<0x00>'"):
    tokenizer_from_gguf(path)
  tokens, scores, types = _spm_vocab()
  path, _ = _write(tmp_path / "ok.gguf", model="llama", pre=None, merges=None, tokens=tokens, scores=scores,
                   token_types=types)
  tokenizer = tokenizer_from_gguf(path)
  # "\u2581a" is a piece; "c" is not: its UTF-8 byte falls back to <0x63>.
  assert tokenizer.encode(" ac", add_special_tokens=False).ids == [3, 7 + 0x63]
