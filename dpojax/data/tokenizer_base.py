"""What both tokenizer backends share: the checkpoint folder's metadata (special tokens, chat
template, generation stop ids), template markers -> ids, and the identity of a tokenizer.

A Hugging Face folder describes its tokenizer beside the vocabulary file:
  tokenizer_config.json   bos/eos/pad/unk tokens (a string or {"content": ...}), `chat_template`
                          (a string, or a list of {"name", "template"}: "default" is used);
  special_tokens_map.json the same tokens, older layout (tokenizer_config.json wins);
  chat_template.jinja     the template as a file (newer transformers; wins over the config's);
  generation_config.json  eos_token_id, an int or a list: where generation stops.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

from dpojax.data import templates
from dpojax.data.sources import DataError

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")  # transformers' SPECIAL_TOKENS_ATTRIBUTES: template variables.


@dataclasses.dataclass(frozen=True)
class FolderMeta:
  special_tokens: dict  # name (bos_token, ...) -> token text, for those the folder sets.
  chat_template: str | None
  generation_eos_ids: tuple  # generation_config.json's eos_token_id(s).


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: invalid JSON ({e})") from None
  if not isinstance(value, dict):
    raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


def _token_text(value) -> str | None:
  if isinstance(value, dict):  # An AddedToken as transformers saves it.
    value = value.get("content")
  return value if isinstance(value, str) else None


def read_folder_meta(folder: str) -> FolderMeta:
  """The tokenizer metadata of a checkpoint folder (all of it optional)."""
  config = _read_json(os.path.join(folder, "tokenizer_config.json"))
  legacy = _read_json(os.path.join(folder, "special_tokens_map.json"))
  special = {}
  for name in SPECIAL_NAMES:
    text = _token_text(config.get(name, legacy.get(name)))
    if text is not None:
      special[name] = text
  template = config.get("chat_template")
  if isinstance(template, list):  # Named templates: transformers uses "default".
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  jinja_path = os.path.join(folder, "chat_template.jinja")
  if os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      template = f.read()
  if template is not None and not isinstance(template, str):
    raise DataError(f"{folder}/tokenizer_config.json: field 'chat_template': expected a string")
  eos = _read_json(os.path.join(folder, "generation_config.json")).get("eos_token_id")
  eos = eos if isinstance(eos, list) else ([] if eos is None else [eos])
  if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
    raise DataError(f"{folder}/generation_config.json: field 'eos_token_id': expected an int "
                    f"or a list of ints, got {eos!r}")
  return FolderMeta(special, template or None, tuple(eos))


class TokenizerBase:
  """A backend sets path, vocab_size, bos_id, eos_id (-1: none), dummy_prefix, meta and
  implements encode (no special tokens added), decode and piece_id."""

  path: str
  vocab_size: int
  bos_id: int
  eos_id: int
  dummy_prefix: bool
  meta: FolderMeta

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def piece_id(self, text: str) -> int | None:
    """The id of `text` as one whole vocabulary entry, else None."""
    raise NotImplementedError

  def id_to_text(self, i: int) -> str:
    raise NotImplementedError

  def encode_rendered(self, text: str) -> list[int]:
    """Ids of a rendered chat template: its special-token texts (bos_token, ...) as their
    ids, the text between them encoded (a tokenizer.json matches added tokens itself)."""
    if "_special_re" not in self.__dict__:
      names = sorted({t for t in self.template_variables().values()
                      if self.piece_id(t) is not None}, key=len, reverse=True)
      self._special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
    if self._special_re is None:
      return self.encode(text)
    ids = []
    for i, piece in enumerate(self._special_re.split(text)):
      if i % 2:
        ids.append(self.piece_id(piece))
      else:
        ids.extend(self.encode_continued(piece) if i else self.encode(piece))
    return ids

  def encode_continued(self, text: str) -> list[int]:
    """Ids of text that continues a sequence (after a special token): no word-start prefix."""
    return self.encode(text)

  @property
  def chat_template(self) -> str | None:
    return self.meta.chat_template

  @property
  def sha256(self) -> str:
    """The vocabulary file's hash; with a chat template, of the file and the template (both
    decide the tokens under data.template=auto)."""
    with open(self.path, "rb") as f:
      h = hashlib.sha256(f.read())
    if self.chat_template is not None:
      h.update(b"\0chat_template\0" + self.chat_template.encode())
    return h.hexdigest()

  @property
  def stop_ids(self) -> list[int]:
    """Where generation stops and a response has ended: generation_config.json's eos ids,
    else EOS."""
    ids = list(self.meta.generation_eos_ids)
    if self.eos_id >= 0 and self.eos_id not in ids:
      ids.append(self.eos_id)
    return ids

  def template_variables(self) -> dict:
    """bos_token, eos_token, ... as a chat template sees them (transformers passes the
    tokenizer's special_tokens_map); from the folder, else the backend's own BOS/EOS."""
    out = dict(self.meta.special_tokens)
    for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
      if name not in out and i >= 0:
        out[name] = self.id_to_text(i)
    return out

  def special(self, marker: templates.Special) -> list[int]:
    """BOS/EOS ids, a marker's own id if the vocabulary has it whole, else its text's ids."""
    specials = self.__dict__.setdefault("_specials", {})
    if marker not in specials:
      if marker == templates.BOS:
        ids = [self.bos_id] if self.bos_id >= 0 else []
      elif marker == templates.EOS:
        ids = [self.eos_id] if self.eos_id >= 0 else []
      else:
        i = self.piece_id(marker.name)
        ids = [i] if i is not None else self.encode(marker.name)
      specials[marker] = ids
    return specials[marker]

  def encode_parts(self, parts: list, response: bool = False) -> list[int]:
    """Ids of template parts: runs of text are encoded together, markers by `special`."""
    ids, text, first = [], "", True

    def flush():
      nonlocal text, first
      if text:
        if response and first and self.dummy_prefix and text.startswith(" "):
          text = text[1:]
        ids.extend(self.encode(text))
      first, text = False, ""

    for part in parts:
      if isinstance(part, str):
        text += part
      else:
        flush()
        ids.extend(self.special(part))
        first = False
    flush()
    return ids
