"""The Hugging Face `tokenizers` backend: a `tokenizer.json` (byte-level BPE as Llama 3, Qwen,
Mistral and Gemma ship, or any other model the library reads), no torch, no transformers.

encode() adds no special tokens (the template or data.add_bos does), as
`AutoTokenizer.encode(text, add_special_tokens=False)`; added tokens such as <|im_start|> in
the text become their ids, as in transformers. decode() keeps special tokens, as
`AutoTokenizer.decode(ids)` does by default. BOS/EOS are the folder's tokenizer_config.json /
special_tokens_map.json tokens: a model with no BOS (Qwen) has bos_id -1.
"""

from __future__ import annotations

import os

import tokenizers

from dpojax.data.sources import DataError
from dpojax.data.tokenizer_base import TokenizerBase, read_folder_meta

TOKENIZER_JSON = "tokenizer.json"


class HFTokenizer(TokenizerBase):
  """A `tokenizer.json` with its folder's special tokens and chat template."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise DataError(f"{path}: tokenizer file not found (data.tokenizer_path)")
    self.path = path
    try:
      self.tk = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # The Rust library raises a bare Exception on a bad file.
      raise DataError(f"{path}: cannot load a Hugging Face tokenizer ({e})") from None
    self.meta = read_folder_meta(os.path.dirname(os.path.abspath(path)))
    self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id = (self._id_of(self.meta.special_tokens.get(name), name)
                                for name in ("bos_token", "eos_token"))
    first = self.tk.encode("a", add_special_tokens=False).tokens
    self.dummy_prefix = bool(first) and first[0].startswith("\u2581")

  def _id_of(self, text: str | None, name: str) -> int:
    if text is None:
      return -1
    i = self.tk.token_to_id(text)
    if i is None:
      raise DataError(f"{self.path}: the {name} {text!r} of tokenizer_config.json is not in "
                      "the vocabulary")
    return i

  def encode(self, text: str) -> list[int]:
    return self.tk.encode(text, add_special_tokens=False).ids if text else []

  def encode_rendered(self, text: str) -> list[int]:
    return self.encode(text)  # Added tokens are matched in the text.

  def decode(self, ids) -> str:
    return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

  def piece_id(self, text: str) -> int | None:
    return self.tk.token_to_id(text)

  def id_to_text(self, i: int) -> str:
    return self.tk.id_to_token(int(i))
