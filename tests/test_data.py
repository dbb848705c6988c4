"""data: text reading, evaluation windows, calibration batches, sentences."""

import numpy as np
import pytest

from jaxquant import data


def test_eval_windows_are_non_overlapping_and_drop_the_tail():
  ids = np.arange(1100)
  windows = data.eval_windows(ids, window=512)
  assert windows.shape == (2, 512) and windows.dtype == np.int32
  np.testing.assert_array_equal(windows.reshape(-1), ids[:1024])
  assert data.eval_windows(ids, window=100, max_tokens=350).shape == (3, 100)
  with_bos = data.eval_windows(ids, window=100, max_tokens=300, bos_id=7)
  assert with_bos.shape == (3, 100) and (with_bos[:, 0] == 7).all()
  np.testing.assert_array_equal(with_bos[1, 1:], ids[99:198])


def test_too_short_text_names_file_tokens_and_window():
  with pytest.raises(ValueError, match=r"notes\.txt: 300 tokens .*one window of 512"):
    data.eval_windows(np.arange(300), window=512, source="notes.txt")


def test_read_text_utf8_latin1_and_newlines(tmp_path):
  (tmp_path / "u.txt").write_bytes("caf\u00e9\r\nline\rend".encode("utf-8"))
  (tmp_path / "l.txt").write_bytes("caf\u00e9\r\n".encode("latin-1"))
  assert data.read_text(tmp_path / "u.txt") == "caf\u00e9\nline\nend"
  assert data.read_text(tmp_path / "l.txt") == "caf\u00e9\n"
  text, source = data.load_text(tmp_path / "l.txt")
  assert text == "caf\u00e9\n" and source.endswith("l.txt")
  with pytest.raises(FileNotFoundError, match="alice29"):
    data.load_text(tmp_path / "missing.txt")


def test_alice_starts_at_chapter_one_and_has_no_carriage_returns():
  text, source = data.load_text("alice29")
  assert text.startswith("CHAPTER I") and "\r" not in text and source.endswith("alice29.txt")
  assert "Alice was beginning to get very tired" in text[:400]


def test_calibration_batches_shapes_and_determinism():
  ids = np.arange(5000)
  batches = data.calibration_batches(ids, n_samples=10, seq_len=64, batch_size=4, seed=3)
  assert [b.shape for b in batches] == [(4, 64), (4, 64), (2, 64)]
  assert all(b.dtype == np.int32 for b in batches)
  for row in np.concatenate(batches):  # contiguous slices of the text
    np.testing.assert_array_equal(np.diff(row), 1)
  again = data.calibration_batches(ids, n_samples=10, seq_len=64, batch_size=4, seed=3)
  np.testing.assert_array_equal(np.concatenate(batches), np.concatenate(again))
  with pytest.raises(ValueError, match="too short"):
    data.calibration_samples(np.arange(10), seq_len=64)


def test_split_sentences_keeps_real_sentences():
  text = "CHAPTER I\n\nDown the Rabbit-Hole\n\nAlice was beginning to get\nvery tired. Oh dear! Oh dear! " \
         "She said, \"It is a very fine day for it.\" Then she ran on across the field."
  sentences = data.split_sentences(text, min_words=4)
  assert sentences[0] == "Alice was beginning to get very tired."
  assert sentences[-1] == "Then she ran on across the field."
  assert not any(s.startswith("Oh dear") for s in sentences)
  corpus = data.corpus_sentences("alice29", n=20, seed=0)
  assert len(corpus) == 20 and all(5 <= len(s.split()) <= 60 for s in corpus)
  assert corpus == data.corpus_sentences("alice29", n=20, seed=0)


def test_tokenize_reads_a_whole_corpus_through_a_truncating_encoder_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers
  tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.enable_truncation(4)
  ids = data.tokenize(tokenizer, "a b " * 10)
  assert len(ids) == 20
  assert tokenizer.truncation["max_length"] == 4  # restored for sentence encoding
  assert len(tokenizer.encode("a b " * 10).ids) == 4
