"""Tokenization of preference pairs, and fitting them to data.max_seq_length.

Tokenizers (`load_tokenizer`): SentencePiece (`Tokenizer`, a .model) or Hugging Face
`tokenizers` (hf_tokenizer.HFTokenizer, a tokenizer.json), with the folder's special tokens,
chat template and generation stop ids (tokenizer_base.py). data.template=auto renders the
folder's Jinja chat template (chat_template.py; `_tokenize_chat`), else plain.

Choice (data.boundary=joint, the default): the prompt and the response are tokenized as one
text and split where the prompt's own tokens end, as TRL and NeMo-Aligner do (TRL tokenizes
prompt + completion; NeMo asserts the prompt is a prefix). So a response that starts without
a space (", sure" after "Hi") gets no extra word-start piece "\u2581" that it would get
tokenized alone, and the sequence equals `encode(prompt + response)`. Text between template
markers is its own SentencePiece call (as NeMo's tokenizer does around special tokens), so
"jointly" means the prompt's last text run with the response's first one. The prompt's
tokens stay an exact prefix of both sequences (the loss mask is exact): where the joint
tokens do not start with the prompt's own (a piece straddles the boundary, e.g. "4." + "1"
with a piece ".1"), that response is tokenized apart, and the pairs are counted
(`straddled`; PreferenceData logs the count at start-up).
data.boundary=apart (dpojax before this option): each part alone; a response that starts
with one space loses it when the tokenizer adds SentencePiece's dummy-prefix space, which
stands for it ("Assistant:" + " Sure" -> "\u2581Sure", as joint tokenization gives).
"""

from __future__ import annotations

import os

import numpy as np
import sentencepiece as spm

from dpojax.data import chat_template, templates
from dpojax.data.hf_tokenizer import TOKENIZER_JSON, HFTokenizer
from dpojax.data.sources import DataError, RecordError, where
from dpojax.data.tokenizer_base import TokenizerBase, read_folder_meta

# auto: the tokenizer folder's own Jinja chat template (chat_template.py), else plain.
TEMPLATES = templates.TEMPLATES + ("auto",)
SP_MODEL = "tokenizer.model"
TRUNCATIONS = ("drop", "truncate_prompt_left", "truncate_response_right")
BOUNDARIES = ("joint", "apart")


def resolve_template(template: str, tok, key: str = "data.template") -> tuple[str, str | None]:
  """(the template a run renders with, a WARNING line or None).

  `auto` (the default) is the tokenizer folder's own chat template where it has one (kept as
  "auto": the same folder gives the same template to generate and evaluate), else `plain`.
  Any other template over a folder that has its own is used as asked, with a warning: a model
  aligned on a format it was never tuned on is a wasted run that looks fine in the metrics.
  """
  own = tok.chat_template
  if template == "auto":
    return ("auto" if own is not None else "plain"), None
  if own is None:
    return template, None
  folder = os.path.dirname(os.path.abspath(tok.path))
  return template, (f"WARNING: {key}={template} is used, but the tokenizer folder "
                    f"{folder} has its own chat template, which this model was tuned on; "
                    f"leave {key} at auto to use it")


def describe_template(template: str, tok) -> str:
  """The start-up line's words for a resolved template."""
  if template == "auto":
    return f"template: the chat template of {os.path.dirname(os.path.abspath(tok.path))}"
  return f"template: {template}"


class Tokenizer(TokenizerBase):
  """The SentencePiece backend (a `.model` file); its folder's metadata as for a
  tokenizer.json (tokenizer_base.read_folder_meta)."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise DataError(f"{path}: tokenizer model file not found (data.tokenizer_path)")
    self.path = path
    try:
      self.sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise DataError(f"{path}: cannot load SentencePiece model ({e})") from None
    self.meta = read_folder_meta(os.path.dirname(os.path.abspath(path)))
    self.vocab_size = self.sp.vocab_size()
    self.bos_id = self.sp.bos_id()
    self.eos_id = self.sp.eos_id()
    # SentencePiece prepends "▁" to every encoded text unless the model turns it off.
    self.dummy_prefix = self.sp.encode("a", out_type=str)[0].startswith("\u2581")

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text) if text else []

  def decode(self, ids) -> str:
    return self.sp.decode([int(i) for i in ids])

  def encode_continued(self, text: str) -> list[int]:
    # transformers' LlamaTokenizer (legacy=False) and a tokenizer.json's Metaspace
    # (prepend_scheme=first) add no dummy-prefix space after a special token: encode after
    # "<unk>"'s own text and drop its pieces, as transformers does.
    if not (text and self.dummy_prefix):
      return self.encode(text)
    unk = self.sp.id_to_piece(self.sp.unk_id())
    return self.sp.encode(unk + text)[len(self.sp.encode(unk)):]

  def piece_id(self, text: str) -> int | None:
    i = self.sp.piece_to_id(text)
    return i if i != self.sp.unk_id() and self.sp.id_to_piece(i) == text else None

  def id_to_text(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))


def load_tokenizer(path: str) -> TokenizerBase:
  """data.tokenizer_path: a SentencePiece `.model`, a `tokenizer.json`, or a folder holding
  either (tokenizer.json first: it carries the added tokens)."""
  if os.path.isdir(path):
    for name in (TOKENIZER_JSON, SP_MODEL):
      if os.path.isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    raise DataError(f"{path}: a folder without {TOKENIZER_JSON} or {SP_MODEL} "
                    "(data.tokenizer_path)")
  if path.endswith(".json"):
    return HFTokenizer(path)
  return Tokenizer(path)


def _trailing_text(parts: list) -> str:
  """The run of text that ends `parts` ("" when a marker ends them)."""
  text = ""
  for part in reversed(parts):
    if not isinstance(part, str):
      break
    text = part + text
  return text


def _leading_text(parts: list) -> tuple[str, list]:
  """(the run of text that starts `parts`, the parts after it)."""
  n = next((i for i, part in enumerate(parts) if not isinstance(part, str)), len(parts))
  return "".join(parts[:n]), parts[n:]


def tokenize_pair(record: dict, tok: Tokenizer, *, template: str = "plain",
                  add_bos: bool = True, append_eos: bool = True,
                  boundary: str = "joint") -> dict:
  """Token ids of both sequences and the prompt length they share.

  Returns {"chosen", "rejected": int32 arrays (prompt + response [+ EOS]), "prompt_len",
  "line", "chosen_reward", "rejected_reward", "straddled": sides (0-2) whose joint tokens
  did not keep the prompt's as a prefix and were tokenized apart}.
  """
  if boundary not in BOUNDARIES:
    raise ValueError(f"data.boundary={boundary!r} is not one of {BOUNDARIES}")
  if template == "auto":
    if tok.chat_template is not None:
      return _tokenize_chat(record, tok, add_bos, append_eos, boundary)
    template = "plain"
  prompt_parts, response_parts = templates.render(record, template)
  prompt = tok.special(templates.BOS) if add_bos else []
  prompt = prompt + tok.encode_parts(prompt_parts)
  last = _trailing_text(prompt_parts)
  last_ids = tok.encode(last)  # The end of `prompt`: encode_parts encodes each run whole.
  eos = tok.special(templates.EOS) if append_eos else []
  out = {"prompt_len": len(prompt), "line": record.get("line", -1), "straddled": 0}
  for side in ("chosen", "rejected"):
    first, rest = _leading_text(response_parts[side])
    response = None
    if boundary == "joint" and last and first:
      joint = tok.encode(last + first)
      if joint[:len(last_ids)] == last_ids:
        response = joint[len(last_ids):] + tok.encode_parts(rest)
      else:
        out["straddled"] += 1
    if response is None:
      response = tok.encode_parts(response_parts[side], response=True)
    out[side] = np.asarray(prompt + response + eos, np.int32)
  out["chosen_reward"] = record.get("chosen_reward")
  out["rejected_reward"] = record.get("rejected_reward")
  return out


def _tokenize_chat(record, tok, add_bos, append_eos, boundary) -> dict:
  """tokenize_pair under the tokenizer's chat template: the rendered text holds the special
  tokens, so nothing is added to it except BOS where it lacks one (data.add_bos, as TRL) and
  EOS after a response holding no stop token (data.append_eos); each response is what follows
  the rendered prompt, its end-of-turn token included."""
  try:
    prompt_text, responses = chat_template.render_pair(record, tok.chat_template,
                                                       tok.template_variables())
  except chat_template.NotPrefixError as e:
    raise RecordError(f"{where(record.get('source', '?'), record.get('line', -1), e.side)}: "
                      f"{e}", "template not prefix-stable") from None
  prompt_ids = tok.encode_rendered(prompt_text)
  bos = tok.special(templates.BOS) if add_bos else []
  prefix = bos if bos and prompt_ids[:len(bos)] != bos else []
  stops = set(tok.stop_ids)
  eos = tok.special(templates.EOS) if append_eos else []
  out = {"prompt_len": len(prefix) + len(prompt_ids), "line": record.get("line", -1),
         "straddled": 0}
  for side in ("chosen", "rejected"):
    response = None
    if boundary == "joint":
      joint = tok.encode_rendered(prompt_text + responses[side])
      if joint[:len(prompt_ids)] == prompt_ids:
        response = joint[len(prompt_ids):]
      else:
        out["straddled"] += 1
    if response is None:
      response = tok.encode_rendered(responses[side])
    tail = eos if eos and not stops.intersection(response) else []
    out[side] = np.asarray(prefix + prompt_ids + response + tail, np.int32)
  out["chosen_reward"] = record.get("chosen_reward")
  out["rejected_reward"] = record.get("rejected_reward")
  return out


def fit_pair(pair: dict, max_len: int, truncation: str, keep_prefix: int = 0):
  """Fits a tokenized pair to `max_len` tokens per sequence.

  Returns (pair or None, status) with status "ok", "truncated", or why it was dropped:
  "too long" (truncation=drop, or nothing left to cut), "identical after truncation".
  truncate_prompt_left cuts prompt tokens after the first `keep_prefix` (BOS) and keeps at
  least one prompt token; truncate_response_right cuts each response's end (EOS included)
  and keeps at least one response token.
  """
  if truncation not in TRUNCATIONS:
    raise ValueError(f"data.truncation={truncation!r} is not one of {TRUNCATIONS}")
  p = pair["prompt_len"]
  longest = max(len(pair["chosen"]), len(pair["rejected"]))
  if longest <= max_len:
    return pair, "ok"
  if truncation == "drop":
    return None, "too long"
  out = dict(pair)
  if truncation == "truncate_prompt_left":
    cut = longest - max_len
    keep = min(keep_prefix, p - 1)
    if p - cut < max(keep, 0) + 1:
      return None, "too long"
    for side in ("chosen", "rejected"):
      ids = pair[side]
      out[side] = np.concatenate([ids[:keep], ids[keep + cut:]])
    out["prompt_len"] = p - cut
  else:
    if p >= max_len:
      return None, "too long"
    for side in ("chosen", "rejected"):
      out[side] = pair[side][:max_len]
    if np.array_equal(out["chosen"], out["rejected"]):
      return None, "identical after truncation"
  return out, "truncated"
