"""Checkpoint sources: float weights read from files, keyed by state path (the paths of nnx.state(model), e.g.
`layers.3.attn.q_proj.kernel`), a part ("embed", "layers.<i>", "head") at a time or all at once.

  base.py         Source (a name table over a file reader), SourceError, FileTensor
  safetensors.py  the safetensors reader (explicit reads) and Hugging Face directories (config.json, shards)
  gguf.py         the GGUF reader (dequantized tensor by tensor) and its metadata
  llama.py, gemma.py, bert.py   one per model family: its config from a file's metadata, and its name table
                  (state path -> file tensor, with the transpose / RoPE un-permutation each needs)
  loading.py      open_source / read_config / load_model: any supported file, its family found from the file
  tokenizer.py    tokenizers rebuilt from GGUF metadata or read from a tokenizer.json

Another file format is one more reader module (an ONNX reader would be `onnx.py`, with a `read(name, shape)`,
`release()`, `close()` as the two here) plus a name table in each family module it carries.
"""
