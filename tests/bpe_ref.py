"""A plain-Python byte-level BPE tokenizer (GPT-2's algorithm, as Hugging Face's ByteLevel + BPE run it), written for
the tests from the published definitions and independent of jaxquant.sources.tokenizer and of the `tokenizers`
library: it checks the tokenizer rebuilt from GGUF metadata, and pins token ids to a vocabulary file.

Pre-tokenization, GPT-2's pattern (the ByteLevel pre-tokenizer's), matched leftmost-first:
  's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
with letters and numbers by Unicode category (L*, N*) and whitespace by str.isspace. SmolLM2's ("smollm") first
isolates every numeric character (Hugging Face's Digits(individual_digits=True)). Each piece's UTF-8 bytes map to
GPT-2's printable byte alphabet; then the adjacent pair of lowest merge rank is merged until none is in the merges.
"""

from __future__ import annotations

import unicodedata


def byte_alphabet() -> dict[int, str]:
  """GPT-2's bytes_to_unicode: printable latin-1 bytes stand for themselves, the others shift to 256 + n."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _kind(c: str) -> str:
  category = unicodedata.category(c)
  if category.startswith("L"):
    return "L"
  if category.startswith("N"):
    return "N"
  return "s" if c.isspace() else "o"


def gpt2_pieces(text: str) -> list[str]:
  """GPT-2's pre-tokenization pattern, by hand (a scanner following the alternation order)."""
  pieces, i, n = [], 0, len(text)

  def run(start, kind):  # end of the run of `kind` characters from start
    end = start
    while end < n and _kind(text[end]) == kind:
      end += 1
    return end

  while i < n:
    c = text[i]
    if c == "'" and text[i + 1:i + 3] in ("re", "ve", "ll"):
      end = i + 3
    elif c == "'" and i + 1 < n and text[i + 1] in "stmd":
      end = i + 2
    else:
      body = i + 1 if c == " " and i + 1 < n and _kind(text[i + 1]) != "s" else i  # the optional leading space
      kind = _kind(text[body])
      if kind in ("L", "N"):
        end = run(body, kind)
      elif kind == "o":
        end = run(body, "o")
      else:  # whitespace: \s+(?!\S) leaves the last space to the next piece when a non-space follows
        end = run(i, "s")
        if end < n and end - i > 1:
          end -= 1
    pieces.append(text[i:end])
    i = end
  return pieces


def smollm_pieces(text: str) -> list[str]:
  """Every numeric character isolated first, then GPT-2's pattern inside the other runs."""
  pieces, start = [], 0
  for i, c in enumerate(text):
    if _kind(c) == "N":
      if start < i:
        pieces += gpt2_pieces(text[start:i])
      pieces.append(c)
      start = i + 1
  if start < len(text):
    pieces += gpt2_pieces(text[start:])
  return pieces


def encode(text: str, tokens: list[str], merges: list[str], pre: str = "smollm") -> list[int]:
  """Token ids of `text` under a vocabulary (tokens, in id order) and its merges ("left right", by rank)."""
  ids = {t: i for i, t in enumerate(tokens)}
  rank = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
  alphabet = byte_alphabet()
  out = []
  for piece in (smollm_pieces if pre == "smollm" else gpt2_pieces)(text):
    symbols = [alphabet[b] for b in piece.encode("utf-8")]
    while len(symbols) > 1:
      pairs = [(rank.get((a, b), len(rank)), j) for j, (a, b) in enumerate(zip(symbols, symbols[1:]))]
      best, j = min(pairs)
      if best == len(rank):
        break
      pair = (symbols[j], symbols[j + 1])
      merged, k = [], 0
      while k < len(symbols):  # every occurrence of the best pair, left to right
        if k + 1 < len(symbols) and (symbols[k], symbols[k + 1]) == pair:
          merged.append(symbols[k] + symbols[k + 1])
          k += 2
        else:
          merged.append(symbols[k])
          k += 1
      symbols = merged
    out += [ids[s] for s in symbols]
  return out
