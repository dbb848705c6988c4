"""Text sources, tokenization, evaluation windows, calibration batches and sentences.

Texts are the Canterbury corpus files (fetched by `assets`; read as latin-1) or any file on disk (utf-8, falling
back to latin-1). alice29.txt starts from its first "CHAPTER I" (skipping the Project Gutenberg header).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from jaxquant import assets

_STARTS = {"alice29": "CHAPTER I"}  # corpus text -> marker of the first line to keep


def read_text(path: str | os.PathLike, encoding: str | None = None) -> str:
  """Contents of a text file with universal newlines (\r\n and \r become \n, as Python's text mode does).

  With encoding None try utf-8, then latin-1 (which never fails). The newline translation matters: alice29.txt
  has CRLF line ends, and the reference perplexities were measured on text-mode reads.
  """
  data = Path(path).read_bytes()
  if encoding is not None:
    text = data.decode(encoding)
  else:
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      text = data.decode("latin-1")
  return text.replace("\r\n", "\n").replace("\r", "\n")


def load_text(name_or_path: str | os.PathLike) -> tuple[str, str]:
  """(text, source) for a Canterbury name ('alice29', 'asyoulik', 'lcet10', 'plrabn12') or a file path.

  Corpus texts are read as latin-1; alice29 starts at its first "CHAPTER I". `source` names the file.
  """
  name = str(name_or_path)
  stem = name[:-4] if name.endswith(".txt") else name
  if stem in assets.TEXTS and not Path(name).is_file():
    path = assets.text_path(stem)
    text = read_text(path, "latin-1")
    marker = _STARTS.get(stem)
    if marker is not None:
      text = text[text.index(marker):]
    return text, str(path)
  path = Path(name).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"No text {name!r}: not a file, and not one of the built-in texts "
                            f"{', '.join(assets.TEXTS)}")
  return read_text(path), str(path)


def tokenize(tokenizer, text: str) -> np.ndarray:
  """Token ids (n,) int32 of the whole `text` with no special tokens added (no BOS).

  An encoder's tokenizer truncates at its maximum length (MiniLM: 512) for sentence encoding; a corpus must not
  be cut there, so truncation is switched off for this call and restored after it."""
  truncation = getattr(tokenizer, "truncation", None)
  if truncation:
    tokenizer.no_truncation()
  try:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
  finally:
    if truncation:
      tokenizer.enable_truncation(**truncation)
  return np.asarray(ids, dtype=np.int32)


def eval_windows(token_ids: np.ndarray, window: int = 512, max_tokens: int | None = None,
                 source: str = "<tokens>", bos_id: int | None = None) -> np.ndarray:
  """Non-overlapping windows (n_windows, window) int32 over token_ids[:max_tokens]; the incomplete tail is dropped.

  bos_id: if given, each window is [bos] + window-1 text tokens (for models that need BOS).
  Raises ValueError naming `source`, its token count and the window size if not even one window fits.
  """
  ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
  if max_tokens is not None:
    ids = ids[:max_tokens]
  step = window if bos_id is None else window - 1
  n_windows = len(ids) // step
  if n_windows == 0:
    raise ValueError(f"{source}: {len(ids)} tokens"
                     + (f" (max_tokens={max_tokens})" if max_tokens is not None else "")
                     + f" is too short for one window of {window} tokens")
  windows = ids[:n_windows * step].reshape(n_windows, step)
  if bos_id is not None:
    windows = np.concatenate([np.full((n_windows, 1), bos_id, np.int32), windows], axis=1)
  return windows


def text_windows(tokenizer, name_or_path: str | os.PathLike, window: int = 512,
                 max_tokens: int | None = None, bos_id: int | None = None) -> np.ndarray:
  """`eval_windows` of a corpus name or text file: (n_windows, window) int32."""
  text, source = load_text(name_or_path)
  return eval_windows(tokenize(tokenizer, text), window, max_tokens, source=source, bos_id=bos_id)


def calibration_samples(token_ids: np.ndarray, n_samples: int = 32, seq_len: int = 512, seed: int = 0,
                        source: str = "<tokens>") -> np.ndarray:
  """n_samples random contiguous slices (n_samples, seq_len) int32 of token_ids (seeded; slices may overlap)."""
  ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
  if len(ids) < seq_len:
    raise ValueError(f"{source}: {len(ids)} tokens is too short for calibration samples of {seq_len} tokens")
  starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len + 1, size=n_samples)
  return np.stack([ids[s:s + seq_len] for s in starts])


def calibration_batches(token_ids: np.ndarray, n_samples: int = 32, seq_len: int = 512, batch_size: int = 8,
                        seed: int = 0, source: str = "<tokens>") -> list[np.ndarray]:
  """`calibration_samples` split into batches: a list of (batch_size, seq_len) int32 (the last may be smaller)."""
  samples = calibration_samples(token_ids, n_samples, seq_len, seed, source)
  return [samples[i:i + batch_size] for i in range(0, n_samples, batch_size)]


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]*[A-Z])")


def split_sentences(text: str, min_words: int = 5, max_words: int = 60) -> list[str]:
  """Sentences of `text`: paragraphs (split at blank lines), then split after . ! ? before a capital, whitespace
  collapsed; keeps those with min_words..max_words words, at least one lowercase letter and a final . ! ? (or
  closing quote), which drops headings and all-caps lines."""
  sentences = []
  for paragraph in re.split(r"\n\s*\n", text):
    flat = re.sub(r"\s+", " ", paragraph).strip()
    for piece in _SENTENCE_END.split(flat):
      piece = piece.strip()
      n_words = len(piece.split())
      if (min_words <= n_words <= max_words and re.search(r"[a-z]", piece)
          and re.search(r"[.!?][\"')\]]*$", piece)):
        sentences.append(piece)
  return sentences


def corpus_sentences(name_or_path: str | os.PathLike = "alice29", n: int | None = None, seed: int | None = None,
                     **kwargs) -> list[str]:
  """Real sentences from a text: the first n (seed None) or n sampled with a seeded rng, in text order."""
  sentences = split_sentences(load_text(name_or_path)[0], **kwargs)
  if n is None or n >= len(sentences):
    return sentences
  if seed is None:
    return sentences[:n]
  picks = np.sort(np.random.default_rng(seed).choice(len(sentences), size=n, replace=False))
  return [sentences[i] for i in picks]
