"""Prompt templates and SentencePiece tokenization of preference pairs.

The prompt and each response are tokenized separately and concatenated, so the prompt's
tokens are always a prefix of the sequence and no token straddles the prompt/response
boundary (NeMo instead tokenizes prompt+response and asserts the prefix property, which
fails for tokenizers that merge across the boundary).
"""

from __future__ import annotations

import os

import numpy as np
import sentencepiece as spm

from dpojax.data.sources import DataError

TEMPLATES = ("plain",)


class Tokenizer:
  """A thin wrapper that fixes which special ids we use."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise DataError(f"{path}: tokenizer model file not found (data.tokenizer_path)")
    self.path = path
    try:
      self.sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise DataError(f"{path}: cannot load SentencePiece model ({e})") from None
    self.vocab_size = self.sp.vocab_size()
    self.bos_id = self.sp.bos_id()
    self.eos_id = self.sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text) if text else []

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])


def tokenize_pair(record: dict, tok: Tokenizer, *, template: str = "plain",
                  add_bos: bool = True, append_eos: bool = True) -> dict:
  """Returns token ids of both sequences and the prompt length they share."""
  if template not in TEMPLATES:
    raise ValueError(f"data.template={template!r} is not one of {TEMPLATES}")
  prompt = ([tok.bos_id] if add_bos and tok.bos_id >= 0 else []) + tok.encode(record["prompt"])
  eos = [tok.eos_id] if append_eos and tok.eos_id >= 0 else []
  out = {"prompt_len": len(prompt), "line": record.get("line", -1)}
  for side in ("chosen", "rejected"):
    response = tok.encode(record[f"{side}_response"]) + eos
    out[side] = np.asarray(prompt + response, np.int32)
  out["chosen_reward"] = record.get("chosen_reward")
  out["rejected_reward"] = record.get("rejected_reward")
  return out
