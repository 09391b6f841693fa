"""Hugging Face dataset files as random-access sources, read with pyarrow (as `datasets` is):
  a Parquet file (`.parquet`);
  a folder of Parquet shards (the hub's data/train-00000-of-0000N.parquet layout: every
    `*.parquet` under the folder, in name order; point at one split's shards);
  a `datasets.save_to_disk` folder (state.json naming its Arrow stream files), or one `.arrow`
    file.
Rows go through sources.validate_record exactly as JSONL lines do (columns are the fields; a
null is a missing field; list<struct<role, content>> columns are message lists); errors name
the file, the row (0-based, as `datasets` indexes it) and the column. Parquet is decoded into
memory once; Arrow files are memory-mapped. `open_source` picks JSONL or these by the path.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dpojax.data.sources import (DETECT_LINES, FORMATS, DataError, JsonlSource, Row,
                                 detect_format, validate_record)

STATE_JSON = "state.json"  # What save_to_disk writes beside its Arrow files.


def _parquet_files(folder: str) -> list[str]:
  return sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))


def is_dataset_path(path: str) -> bool:
  """A Parquet/Arrow file or a folder of them (not JSONL, not a packed directory)."""
  if os.path.isdir(path):
    return os.path.isfile(os.path.join(path, STATE_JSON)) or bool(_parquet_files(path))
  return path.endswith((".parquet", ".arrow"))


def _arrow_files(folder: str) -> list[str]:
  with open(os.path.join(folder, STATE_JSON)) as f:
    try:
      state = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{folder}/{STATE_JSON}: invalid JSON ({e})") from None
  names = [d.get("filename") for d in state.get("_data_files", [])]
  if not names or not all(isinstance(n, str) for n in names):
    raise DataError(f"{folder}/{STATE_JSON}: field '_data_files': expected a list of "
                    "{'filename': ...}")
  return [os.path.join(folder, n) for n in names]


def _read_table(path: str) -> pa.Table:
  try:
    if path.endswith(".parquet"):
      return pq.read_table(path)
    source = pa.memory_map(path)
    try:
      return pa.ipc.open_stream(source).read_all()  # save_to_disk writes the stream format.
    except pa.ArrowInvalid:
      return pa.ipc.open_file(source).read_all()
  except (OSError, pa.ArrowException) as e:
    raise DataError(f"{path}: cannot read ({e})") from None


class ArrowSource:
  """Random access to the rows of Parquet/Arrow files, validated on read (as JsonlSource).

  `source[i]` validates row i and returns the normalized record; `raw(i)` returns the row as
  a dict without its null columns; both raise RecordError naming file, row and column.
  """

  def __init__(self, path: str, fmt: str = "auto"):
    if not os.path.exists(path):
      raise DataError(f"{path}: no such data file or folder")
    if fmt not in FORMATS:
      raise DataError(f"data.format={fmt!r} is not one of {FORMATS}")
    self.path = path
    if os.path.isdir(path):
      if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        raise DataError(f"{path}: a DatasetDict (save_to_disk of several splits); point "
                        f"data.*_path at one split's folder, e.g. {path}/train")
      files = (_arrow_files(path) if os.path.isfile(os.path.join(path, STATE_JSON))
               else _parquet_files(path))
    else:
      files = [path]
    self.files = files
    self.tables = [_read_table(f) for f in files]
    self._starts = [0]
    for t in self.tables:
      self._starts.append(self._starts[-1] + t.num_rows)
    self.format = self._detect() if fmt == "auto" else fmt

  def _detect(self) -> str:
    for i in range(min(len(self), DETECT_LINES)):
      fmt = detect_format(self.raw(i))
      if fmt:
        return fmt
    columns = self.tables[0].column_names if self.tables else []
    raise DataError(f"{self.path}: cannot detect data.format from the columns {columns}; "
                    "expected those of nemo, trl, hh-rlhf or kto (see dpojax.data.sources); set "
                    "data.format")

  def __len__(self) -> int:
    return self._starts[-1]

  def _locate(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(index)
    k = bisect.bisect_right(self._starts, index) - 1
    return k, index - self._starts[k]

  def line_number(self, index: int) -> Row:
    return Row(self._locate(index)[1])

  def file_of(self, index: int) -> str:
    return self.files[self._locate(index)[0]]

  def raw(self, index: int) -> Any:
    k, row = self._locate(index)
    values = self.tables[k].slice(row, 1).to_pylist()[0]
    return {key: v for key, v in values.items() if v is not None}

  def __getitem__(self, index: int) -> dict:
    k, row = self._locate(index)
    return validate_record(self.raw(index), self.files[k], Row(row), self.format)

  def __repr__(self) -> str:
    return f"ArrowSource({self.path!r}, {self.format}, {len(self.files)} files, {len(self)} rows)"


def open_source(path: str, fmt: str = "auto", cache_dir: str = ""):
  """A JsonlSource or an ArrowSource for `path` (file type from the name or folder)."""
  if is_dataset_path(path):
    return ArrowSource(path, fmt)
  return JsonlSource(path, fmt, cache_dir)

