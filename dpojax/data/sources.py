"""JSONL preference pairs: a random-access source and record validation.

The source keeps an index of line offsets, not the file, so Grain can read any record by
index. Every error names the file, the 1-based line and the field.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

# NeMo-Aligner's format: the prompt and the two responses, without the prompt.
NEMO_FIELDS = ("prompt", "chosen_response", "rejected_response")
REWARD_FIELDS = ("chosen_reward", "rejected_reward")


class DataError(ValueError):
  """Bad input data; the message names file, line and field."""


def where(path: str, line: int, field: str | None = None) -> str:
  loc = f"{path}:{line}"
  return f"{loc}: field '{field}'" if field else loc


def validate_record(obj: Any, path: str, line: int) -> dict:
  """Checks one parsed line; returns the pair with rewards as floats or None."""
  if not isinstance(obj, dict):
    raise DataError(f"{where(path, line)}: expected a JSON object, got {type(obj).__name__}")
  for field in NEMO_FIELDS:
    if field not in obj:
      raise DataError(f"{where(path, line, field)}: missing (expected fields {list(NEMO_FIELDS)})")
    value = obj[field]
    if not isinstance(value, str):
      raise DataError(
          f"{where(path, line, field)}: expected a string, got {type(value).__name__}")
    if field != "prompt" and not value.strip():
      raise DataError(f"{where(path, line, field)}: empty response")
  record = {f: obj[f] for f in NEMO_FIELDS}
  for field in REWARD_FIELDS:
    value = obj.get(field)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value)):
      raise DataError(f"{where(path, line, field)}: expected a finite number, got {value!r}")
    record[field] = None if value is None else float(value)
  return record


class JsonlSource:
  """Random access to the non-blank lines of a JSONL file (Grain's RandomAccessDataSource)."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise DataError(f"{path}: no such data file")
    self.path = path
    offsets, lines = [], []
    with open(path, "rb") as f:
      pos, number = 0, 0
      for raw in f:
        number += 1
        if raw.strip():
          offsets.append(pos)
          lines.append(number)
        pos += len(raw)
    self._offsets = offsets
    self._lines = lines

  def __len__(self) -> int:
    return len(self._offsets)

  def line_number(self, index: int) -> int:
    return self._lines[index]

  def __getitem__(self, index: int) -> dict:
    with open(self.path, "rb") as f:
      f.seek(self._offsets[index])
      raw = f.readline()
    line = self._lines[index]
    try:
      obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError(f"{where(self.path, line)}: invalid JSON ({e})") from None
    record = validate_record(obj, self.path, line)
    record["line"] = line
    return record

  def __repr__(self) -> str:
    return f"JsonlSource({self.path!r}, {len(self)} records)"
