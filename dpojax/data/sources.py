"""JSONL preference pairs: a random-access source, format detection and record validation.

Three input shapes (`data.format`; `auto` detects from the first JSON object of the file):
  nemo:    {"prompt", "chosen_response", "rejected_response"[, "chosen_reward", "rejected_reward"]}
           (NeMo-Aligner); the prompt may be a list of chat messages, a response one message.
  trl:     {"prompt", "chosen", "rejected"} (TRL); each may be a list of chat messages
           ({"role": "system"|"user"|"assistant", "content": str}). Conversational with the
           prompt implicit (TRL, UltraFeedback-binarized): "chosen"/"rejected" hold whole
           conversations; the messages they share are the prompt (its last one a user turn),
           and each must go on with one assistant message (a "prompt" field beside them is
           not used).
  hh-rlhf: {"chosen", "rejected"}, whole "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogues; the
           prompt is the shared dialogue up to and including the last "\\n\\nAssistant:".
  kto:     {"prompt", "completion", "label"} (TRL's unpaired format, for KTO): a prompt (string
           or messages), one completion (string or a list holding one assistant message) and
           a boolean label (desirable or not); normalized to {prompt, completion, label, line,
           source, dialogue}. dpojax.data.unpaired turns these into the pipeline's pairs.
Every record is normalized to {prompt, chosen, rejected, chosen_reward, rejected_reward, line,
source, dialogue}: prompt is a string or a message list; chosen/rejected are response strings;
score_chosen/score_rejected (UltraFeedback) are read as chosen_reward/rejected_reward (RPO's)
when those are absent; source is the file. Parquet/Arrow files: arrow_sources.py, the same
validation, rows for lines.

Random access: the source keeps an index of line offsets (numpy arrays, 16 bytes a line), not
the file. A gzipped file (`.gz`) is decompressed once, streaming, into a cache file
(`data.cache_dir`, default ~/.cache/dpojax) keyed by the .gz path, size and mtime, and indexed
like a plain file; errors still name the .gz file and its (identical) line numbers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import tempfile
from typing import Any

import numpy as np

FORMATS = ("auto", "nemo", "trl", "hh-rlhf", "kto")
NEMO_FIELDS = ("prompt", "chosen_response", "rejected_response")
TRL_FIELDS = ("prompt", "chosen", "rejected")
HH_FIELDS = ("chosen", "rejected")
KTO_FIELDS = ("prompt", "completion", "label")
REWARD_FIELDS = ("chosen_reward", "rejected_reward")
SCORE_FIELDS = ("score_chosen", "score_rejected")  # Read as REWARD_FIELDS when those are absent.
ROLES = ("system", "user", "assistant")
HH_ASSISTANT = "\n\nAssistant:"
# How many leading records `auto` looks at for one that names its format.
DETECT_LINES = 100


class DataError(ValueError):
  """Bad input data; the message names file, line and field."""


class RecordError(DataError):
  """One bad record; `reason` groups skipped records in the on_error=skip summary."""

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


class Row(int):
  """A row of a Parquet/Arrow file (0-based, as `datasets` indexes it), for `where`."""


def where(path: str, line: int, field: str | None = None) -> str:
  """file:line: field 'f' for JSONL; file:row N: column 'f' for a Row of a Parquet/Arrow file."""
  if isinstance(line, Row):
    loc = f"{path}:row {int(line)}"
    return f"{loc}: column '{field}'" if field else loc
  loc = f"{path}:{line}"
  return f"{loc}: field '{field}'" if field else loc


def jsonl_records(f, path: str):
  """(line number, parsed value) of each non-blank line of the open text file `f`; a line that
  is not JSON raises DataError naming path:line."""
  for line_no, line in enumerate(f, 1):
    if not line.strip():
      continue
    try:
      yield line_no, json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where(path, line_no)}: not valid JSON ({e.msg})") from None


def _fail(path, line, field, problem, reason):
  raise RecordError(f"{where(path, line, field)}: {problem}", reason)


def detect_format(obj: Any) -> str | None:
  """The format whose fields a parsed record has, or None."""
  if not isinstance(obj, dict):
    return None
  if "completion" in obj and "label" in obj:
    return "kto"
  if "chosen_response" in obj or "rejected_response" in obj:
    return "nemo"
  if "prompt" in obj and ("chosen" in obj or "rejected" in obj):
    return "trl"
  if isinstance(obj.get("chosen"), list) or isinstance(obj.get("rejected"), list):
    return "trl"  # Conversational, the prompt implicit (the lists' shared prefix).
  if "chosen" in obj and "rejected" in obj:
    return "hh-rlhf"
  return None


def _check_messages(value, path, line, field, roles=ROLES) -> list[dict]:
  if not value:
    _fail(path, line, field, "empty message list", "empty field")
  out = []
  for i, m in enumerate(value):
    f = f"{field}[{i}]"
    if not isinstance(m, dict):
      _fail(path, line, f, f"expected a message object, got {type(m).__name__}", "wrong type")
    if m.get("role") not in roles:
      _fail(path, line, f"{f}.role", f"expected one of {list(roles)}, got {m.get('role')!r}",
            "wrong type")
    if not isinstance(m.get("content"), str):
      _fail(path, line, f"{f}.content",
            f"expected a string, got {type(m.get('content')).__name__}", "wrong type")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def _prompt(obj, path, line) -> str | list[dict]:
  if "prompt" not in obj:
    _fail(path, line, "prompt", "missing", "missing field")
  value = obj["prompt"]
  if isinstance(value, list):
    messages = _check_messages(value, path, line, "prompt")
    if messages[-1]["role"] != "user":
      _fail(path, line, "prompt", "the last prompt message must have role 'user'", "wrong type")
    return messages
  if not isinstance(value, str):
    _fail(path, line, "prompt", f"expected a string or a message list, got "
          f"{type(value).__name__}", "wrong type")
  if not value.strip():
    _fail(path, line, "prompt", "empty prompt", "empty field")
  return value


def _response(obj, path, line, field) -> str:
  if field not in obj:
    _fail(path, line, field, "missing", "missing field")
  value = obj[field]
  if isinstance(value, dict):  # NeMo: one message.
    value = _check_messages([value], path, line, field, roles=("assistant",))[0]["content"]
  elif isinstance(value, list):  # TRL: a list holding one assistant message.
    messages = _check_messages(value, path, line, field, roles=("assistant",))
    if len(messages) != 1:
      _fail(path, line, field, f"expected one assistant message, got {len(messages)}",
            "wrong type")
    value = messages[0]["content"]
  elif not isinstance(value, str):
    _fail(path, line, field, f"expected a string, got {type(value).__name__}", "wrong type")
  if not value.strip():
    _fail(path, line, field, "empty response", "empty field")
  return value


def _split_dialogue(obj, path, line, field) -> tuple[str, str]:
  if field not in obj:
    _fail(path, line, field, "missing", "missing field")
  value = obj[field]
  if not isinstance(value, str):
    _fail(path, line, field, f"expected a string, got {type(value).__name__}", "wrong type")
  cut = value.rfind(HH_ASSISTANT)
  if cut < 0:
    _fail(path, line, field, f"no {HH_ASSISTANT!r} turn in the dialogue", "wrong type")
  cut += len(HH_ASSISTANT)
  if not value[cut:].strip():
    _fail(path, line, field, "empty response after the last '\\n\\nAssistant:'", "empty field")
  return value[:cut], value[cut:]


def _whole_conversation(value) -> bool:
  """A TRL response that holds the whole conversation (a message other than the assistant's)."""
  return isinstance(value, list) and any(isinstance(m, dict) and m.get("role") != "assistant"
                                         for m in value)


def _split_conversations(obj, path, line) -> tuple[list, str, str]:
  """TRL's implicit prompt: chosen/rejected hold whole conversations; the prompt is the
  messages they share, each response the one assistant message after it."""
  lists = {}
  for side in ("chosen", "rejected"):
    if side not in obj:
      _fail(path, line, side, "missing", "missing field")
    if not isinstance(obj[side], list):
      _fail(path, line, side, f"expected a message list (as the other response), got "
            f"{type(obj[side]).__name__}", "wrong type")
    lists[side] = _check_messages(obj[side], path, line, side)
  chosen, rejected = lists["chosen"], lists["rejected"]
  n = 0
  while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
    n += 1
  if n == len(chosen) == len(rejected):
    _fail(path, line, "rejected", "identical to 'chosen'", "chosen equals rejected")
  if n == 0:
    _fail(path, line, "rejected", "shares no messages with 'chosen' (no prompt; give "
          "'prompt')", "prompts differ")
  prompt = chosen[:n]
  if prompt[-1]["role"] != "user":
    _fail(path, line, f"chosen[{n - 1}].role", "the last shared (prompt) message must have "
          "role 'user'", "wrong type")
  responses = []
  for side, messages in lists.items():
    rest = messages[n:]
    if len(rest) != 1 or rest[0]["role"] != "assistant":
      _fail(path, line, f"{side}[{n}]", f"expected one assistant message after the {n} shared "
            f"messages, got {[m['role'] for m in rest]}", "wrong type")
    if not rest[0]["content"].strip():
      _fail(path, line, f"{side}[{n}].content", "empty response", "empty field")
    responses.append(rest[0]["content"])
  return prompt, responses[0], responses[1]


def validate_record(obj: Any, path: str, line: int, fmt: str) -> dict:
  """Checks one parsed line of format `fmt`; returns the normalized pair."""
  if not isinstance(obj, dict):
    _fail(path, line, None, f"expected a JSON object, got {type(obj).__name__}", "not an object")
  record = {"dialogue": fmt == "hh-rlhf"}
  if fmt == "kto":  # One completion and its label: no pair.
    record["prompt"] = _prompt(obj, path, line)
    record["completion"] = _response(obj, path, line, "completion")
    if "label" not in obj:
      _fail(path, line, "label", "missing", "missing field")
    if not isinstance(obj["label"], bool):
      _fail(path, line, "label", f"expected true or false, got {obj['label']!r}", "wrong type")
    record["label"], record["line"], record["source"] = obj["label"], line, path
    return record
  if fmt == "nemo":
    record["prompt"] = _prompt(obj, path, line)
    record["chosen"] = _response(obj, path, line, "chosen_response")
    record["rejected"] = _response(obj, path, line, "rejected_response")
    sides = ("chosen_response", "rejected_response")
  elif fmt == "trl":
    c, r = obj.get("chosen"), obj.get("rejected")
    if ((_whole_conversation(c) or _whole_conversation(r))
        and (isinstance(c, list) and isinstance(r, list) or "prompt" not in obj)):
      # A `prompt` field beside whole conversations (HuggingFaceH4/ultrafeedback_binarized's
      # first user message) is not used: the conversations hold it.
      record["prompt"], record["chosen"], record["rejected"] = _split_conversations(
          obj, path, line)
    else:
      record["prompt"] = _prompt(obj, path, line)
      record["chosen"] = _response(obj, path, line, "chosen")
      record["rejected"] = _response(obj, path, line, "rejected")
    sides = ("chosen", "rejected")
  elif fmt == "hh-rlhf":
    prompt, record["chosen"] = _split_dialogue(obj, path, line, "chosen")
    rejected_prompt, record["rejected"] = _split_dialogue(obj, path, line, "rejected")
    if prompt != rejected_prompt:
      _fail(path, line, "rejected", "the dialogue before the last '\\n\\nAssistant:' differs "
            "from the chosen one (no shared prompt)", "prompts differ")
    record["prompt"] = prompt
    sides = ("chosen", "rejected")
  else:
    raise ValueError(f"data.format={fmt!r} is not one of {FORMATS[1:]}")
  if record["chosen"] == record["rejected"]:
    _fail(path, line, sides[1], f"identical to '{sides[0]}'", "chosen equals rejected")
  for field, alias in zip(REWARD_FIELDS, SCORE_FIELDS):
    if obj.get(field) is None and obj.get(alias) is not None:
      field = alias  # UltraFeedback's score_chosen/score_rejected: the same rewards.
    value = obj.get(field)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
      _fail(path, line, field, f"expected a finite number, got {value!r}", "bad reward")
    record[REWARD_FIELDS[SCORE_FIELDS.index(field)] if field in SCORE_FIELDS else field] = (
        None if value is None else float(value))
  record["line"], record["source"] = line, path
  return record


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dpojax")


def decompressed_path(path: str, cache_dir: str = "") -> str:
  """A cached, decompressed copy of a .gz file (written once, atomically)."""
  st = os.stat(path)
  key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
  cache_dir = cache_dir or default_cache_dir()
  os.makedirs(cache_dir, exist_ok=True)
  name = os.path.basename(path)[:-len(".gz")]
  out = os.path.join(cache_dir, f"{key.hexdigest()[:16]}-{name}")
  if not os.path.exists(out):
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-")
    try:
      with os.fdopen(fd, "wb") as dst, gzip.open(path, "rb") as src:
        while chunk := src.read(1 << 20):
          dst.write(chunk)
    except (OSError, EOFError) as e:
      os.unlink(tmp)
      raise DataError(f"{path}: cannot decompress ({e})") from None
    os.replace(tmp, out)  # Atomic: concurrent processes write the same bytes.
  return out


class JsonlSource:
  """Random access to the non-blank lines of a (gzipped) JSONL file, validated on read.

  `source[i]` parses and validates line i and returns the normalized record; `raw(i)` returns
  the parsed JSON value; both raise RecordError naming file, line and field.
  """

  def __init__(self, path: str, fmt: str = "auto", cache_dir: str = ""):
    if not os.path.isfile(path):
      raise DataError(f"{path}: no such data file")
    if fmt not in FORMATS:
      raise DataError(f"data.format={fmt!r} is not one of {FORMATS}")
    self.path = path
    self._file = decompressed_path(path, cache_dir) if path.endswith(".gz") else path
    starts, ends, lines = [], [], []
    with open(self._file, "rb") as f:
      pos, number = 0, 0
      for raw in f:
        number += 1
        if raw.strip():
          starts.append(pos)
          ends.append(pos + len(raw))
          lines.append(number)
        pos += len(raw)
    self._starts = np.asarray(starts, np.int64)
    self._ends = np.asarray(ends, np.int64)
    self._lines = np.asarray(lines, np.int64)
    self.format = self._detect() if fmt == "auto" else fmt

  def _detect(self) -> str:
    for i in range(min(len(self), DETECT_LINES)):
      try:
        fmt = detect_format(self.raw(i))
      except RecordError:
        continue
      if fmt:
        return fmt
    raise DataError(
        f"{self.path}: cannot detect data.format from the first {DETECT_LINES} records: none "
        f"has the fields of nemo {list(NEMO_FIELDS)}, trl {list(TRL_FIELDS)}, hh-rlhf "
        f"{list(HH_FIELDS)} or kto {list(KTO_FIELDS)}; set data.format")

  def __len__(self) -> int:
    return len(self._starts)

  def line_number(self, index: int) -> int:
    return int(self._lines[index])

  def raw(self, index: int) -> Any:
    start, end = int(self._starts[index]), int(self._ends[index])
    with open(self._file, "rb") as f:
      f.seek(start)
      data = f.read(end - start)
    try:
      return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RecordError(f"{where(self.path, self.line_number(index))}: invalid JSON ({e})",
                        "invalid JSON") from None

  def __getitem__(self, index: int) -> dict:
    return validate_record(self.raw(index), self.path, self.line_number(index), self.format)

  def __repr__(self) -> str:
    return f"JsonlSource({self.path!r}, {self.format}, {len(self)} records)"
