"""The Grain pipeline: records -> tokenized pairs -> padded or packed micro-batches.

A global batch is a dict of arrays with a leading micro-batch axis A:
  tokens, positions, segment_ids, loss_mask, sequence_ids: [A, rows, T] (and branch_ids with
    data.share_prompt: see packing.py);
  pair_mask, chosen_reward, rejected_reward, pair_index: [A, P].
Padded (data.packing=none): a micro-batch is M = train.micro_batch_size pairs, rows = 2M,
  T = data.max_seq_length; row 2p is pair p's chosen, row 2p+1 its rejected; P = M.
Packed (data.packing=first_fit_*, or a directory written by `python -m dpojax.pack`): a
  micro-batch is M rows ("packs") of T = data.pack_size tokens, train.micro_batch_size and
  train.global_batch_size count ROWS, and the pairs per step vary (the loss normalizes by the
  real pairs); P = M * the most pairs a row can hold (fixed, so shapes never change).
  Online packing packs the whole epoch from (seed, epoch) when its first batch is read (about
  1 s per million pairs; resuming in epoch e recounts the rows of epochs before e). A packed
  directory keeps its file's packing and pack size (data.packing may stay none) and only
  reorders its rows each epoch.
Both: a new order every epoch from the seed (data.shuffle=False: the file's order, or the
packing's, every epoch, as TRL's and NeMo's sequential samplers), epochs run into each other,
each JAX process reads only its slice of every global batch (the global batches do not depend
on the number of processes), prefetched in a thread; the iterator state ({"next_index"})
resumes exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import threading

import grain
import jax
import numpy as np
from absl import logging

from dpojax.data import packing, templates
from dpojax.data.sources import FORMATS, DataError, JsonlSource, RecordError, where
from dpojax.data.tokenize import (BOUNDARIES, TEMPLATES, TRUNCATIONS, Tokenizer, fit_pair,
                                   tokenize_pair)

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask", "sequence_ids")
PAIR_KEYS = ("pair_mask", "chosen_reward", "rejected_reward", "pair_index")
ON_ERROR = ("raise", "skip")
PACKED_FORMAT = "dpojax-packed-v1"
ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TOY_TRAIN = os.path.join(ASSETS, "toy_prefs_train.jsonl")  # configs/dpo_gpt.py's defaults.
TOY_VAL = os.path.join(ASSETS, "toy_prefs_val.jsonl")
# A run config written before a field existed ran with this value, not today's default.
_BEFORE_FIELD = {"boundary": "apart"}


@dataclasses.dataclass(frozen=True)
class DataOptions:
  max_seq_length: int
  format: str = "auto"
  template: str = "plain"
  add_bos: bool = True
  append_eos: bool = True
  truncation: str = "drop"
  on_error: str = "raise"
  packing: str = "none"
  pack_size: int = 0  # 0: 2 * max_seq_length.
  cache_dir: str = ""
  read_threads: int = 1
  prefetch: int = 2
  default_chosen_reward: float = 1.0
  default_rejected_reward: float = 0.0
  share_prompt: bool = False
  shuffle: bool = True  # False: every epoch in the file's (or the packing's) order.
  boundary: str = "joint"  # tokenize.BOUNDARIES.

  def __post_init__(self):
    for key, value, allowed in (("format", self.format, FORMATS),
                                ("boundary", self.boundary, BOUNDARIES),
                                ("template", self.template, TEMPLATES),
                                ("truncation", self.truncation, TRUNCATIONS),
                                ("on_error", self.on_error, ON_ERROR),
                                ("packing", self.packing, packing.PACKINGS)):
      if value not in allowed:
        raise DataError(f"data.{key}={value!r} is not one of {allowed}")
    if self.max_seq_length < 2:
      raise DataError(f"data.max_seq_length={self.max_seq_length} must be at least 2")
    if self.packing != "none" and self.resolved_pack_size < 2 * self.max_seq_length:
      raise DataError(
          f"data.pack_size={self.pack_size} is smaller than 2 x data.max_seq_length="
          f"{self.max_seq_length}: a pair (chosen + rejected) must fit one row")
    if not self.shuffle and self.packing == "first_fit_shuffle":
      raise DataError("data.packing=first_fit_shuffle re-packs every epoch in a random order, "
                      "but data.shuffle=False; use first_fit_decreasing (or shuffle)")
    if self.read_threads < 1 or self.prefetch < 0:
      raise DataError(f"data.read_threads={self.read_threads} must be >= 1 and "
                      f"data.prefetch={self.prefetch} >= 0")

  @property
  def resolved_pack_size(self) -> int:
    return self.pack_size or 2 * self.max_seq_length

  @classmethod
  def from_config(cls, data_cfg) -> DataOptions:
    """From the `data` section of a run config (a field it lacks, as in a run config written
    before the field existed, takes the value runs had then: its default, or _BEFORE_FIELD's)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: data_cfg[n] if n in data_cfg else _BEFORE_FIELD[n] for n in names
                  if n in data_cfg or n in _BEFORE_FIELD})


def toy_val_warning(train_path: str, val_path: str) -> str | None:
  """A start-up warning when a user's train file is validated on the shipped toy set (the
  default data.val_path, kept so that old commands run), else None."""
  same = lambda a, b: os.path.realpath(a) == os.path.realpath(b)
  if not same(val_path, TOY_VAL) or same(train_path, TOY_TRAIN):
    return None
  return (f"WARNING: data.train_path={train_path} but data.val_path is still the shipped toy "
          f"set ({val_path}): validation metrics and best/ are about the toy data; set "
          "--config.data.val_path")


class PreferenceData:
  """One split: the validated, length-fitted pairs of a JSONL file or a packed directory.

  JSONL: every record is read, validated and tokenized once here (bad records raise, or are
  skipped and counted with data.on_error=skip; over-long pairs are dropped or truncated per
  data.truncation, and counted); only the index and the lengths are kept: `data[i]` reads
  and tokenizes again. A directory written by `python -m dpojax.pack` holds the tokens and
  the packing, memory-mapped.
  `stats` holds the counts (and, once a dataset is built, the packing statistics).
  """

  def __init__(self, path: str, tok: Tokenizer, opts: DataOptions):
    self.path, self.tok, self.opts = path, tok, opts
    self.rows = None  # (row_starts, items): a fixed packing, from a packed directory.
    if os.path.isdir(path):
      self._load_packed(path)
    else:
      self._read_jsonl(path)
    # A layout, not a value change: padded data (e.g. a JSONL val file next to a packed
    # train directory) simply keeps its two rows per pair.
    self.share_prompt = opts.share_prompt and self.packed
    if opts.share_prompt and not self.packed:
      logging.info("%s: read as padded rows (data.packing=none), so data.share_prompt does "
                   "not apply to it", path)
    self.pair_lengths = self.chosen_len.astype(np.int64) + self.rejected_len
    # Tokens a pair takes in a packed row (fewer with a shared prompt).
    self.row_lengths = packing.item_lengths(self.prompt_len, self.chosen_len,
                                            self.rejected_len, self.share_prompt)

  # --- JSONL -----------------------------------------------------------------------------
  def _read_jsonl(self, path):
    opts = self.opts
    self.source = JsonlSource(path, opts.format, opts.cache_dir)
    self._keep_prefix = len(self.tok.special(templates.BOS)) if opts.add_bos else 0
    indices, lens = [], []
    skipped, first_skipped = collections.Counter(), {}
    dropped, truncated, straddled = collections.Counter(), 0, 0
    for i in range(len(self.source)):
      try:
        pair = self._tokenize(i)
      except RecordError as e:
        if opts.on_error == "raise":
          raise
        skipped[e.reason] += 1
        first_skipped.setdefault(e.reason, str(e))
        continue
      pair, status = fit_pair(pair, opts.max_seq_length, opts.truncation, self._keep_prefix)
      if pair is None:
        dropped[status] += 1
        continue
      truncated += status == "truncated"
      straddled += pair["straddled"] > 0
      indices.append(i)
      lens.append((pair["prompt_len"], len(pair["chosen"]), len(pair["rejected"])))
    self.indices = np.asarray(indices, np.int64)
    lens = np.asarray(lens, np.int32).reshape(-1, 3)
    self.prompt_len, self.chosen_len, self.rejected_len = lens.T.copy()
    self.stats = {"records": len(self.source), "pairs": len(indices),
                  "skipped": sum(skipped.values()), "dropped": sum(dropped.values()),
                  "truncated": truncated, "skipped_by_reason": dict(skipped),
                  "dropped_by_reason": dict(dropped), "format": self.source.format,
                  "straddled": straddled}
    if skipped:
      details = "; ".join(f"{r}: {n} (first: {first_skipped[r]})" for r, n in skipped.items())
      logging.warning("%s: data.on_error=skip skipped %d of %d records: %s", path,
                      sum(skipped.values()), len(self.source), details)
    if straddled:
      logging.warning(
          "%s: %d of %d pairs have a SentencePiece piece across the prompt/response boundary "
          "when tokenized jointly (data.boundary=joint); their responses are tokenized apart",
          path, straddled, len(indices))
    if dropped or truncated:
      logging.warning(
          "%s: data.max_seq_length=%d, data.truncation=%s: %d pairs truncated, %d dropped %s",
          path, opts.max_seq_length, opts.truncation, truncated, sum(dropped.values()),
          dict(dropped))

  @property
  def dropped(self) -> int:
    return self.stats["dropped"]

  def tokenize(self, record: dict) -> dict:
    return tokenize_pair(record, self.tok, template=self.opts.template,
                         add_bos=self.opts.add_bos, append_eos=self.opts.append_eos,
                         boundary=self.opts.boundary)

  def _tokenize(self, source_index: int) -> dict:
    record = self.source[source_index]
    pair = self.tokenize(record)
    line = record["line"]
    for side in ("chosen", "rejected"):
      if len(pair[side]) <= pair["prompt_len"]:
        raise RecordError(f"{where(self.path, line, side)}: the response has no tokens",
                          "empty field")
    if np.array_equal(pair["chosen"], pair["rejected"]):
      raise RecordError(f"{where(self.path, line, 'rejected')}: chosen and rejected have "
                        "identical tokens", "chosen equals rejected")
    return pair

  # --- packed directory ------------------------------------------------------------------
  def _load_packed(self, path):
    meta = read_packed_meta(path)
    opts, tok = self.opts, self.tok
    # Older files: no shared prompt, responses tokenized apart.
    packed_with = dict(meta, share_prompt=meta.get("share_prompt", False),
                       boundary=meta.get("boundary", "apart"))
    for key in ("template", "add_bos", "append_eos", "share_prompt", "boundary"):
      if packed_with[key] != getattr(opts, key):
        raise DataError(f"{path}: packed with {key}={packed_with[key]!r}, but data.{key}="
                        f"{getattr(opts, key)!r}; repack or change data.{key}")
    if meta["tokenizer_sha256"] != tok.sha256:
      raise DataError(f"{path}: packed with tokenizer {meta['tokenizer_path']} (sha256 "
                      f"{meta['tokenizer_sha256'][:12]}...), which differs from "
                      f"data.tokenizer_path={tok.path}")
    if opts.packing != "none" and opts.resolved_pack_size != meta["pack_size"]:
      raise DataError(f"{path}: packed with pack_size={meta['pack_size']}, but "
                      f"data.pack_size={opts.resolved_pack_size}")
    arrays = {name: np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r",
                            allow_pickle=False) for name in PACKED_ARRAYS}
    self.meta, self.arrays = meta, arrays
    self.pack_size = meta["pack_size"]
    n = len(arrays["prompt_len"])
    self.indices = np.arange(n)
    self.prompt_len = np.asarray(arrays["prompt_len"], np.int32)
    self.chosen_len = np.asarray(arrays["chosen_len"], np.int32)
    self.rejected_len = np.asarray(arrays["rejected_len"], np.int32)
    row_starts = np.asarray(arrays["row_starts"], np.int64)
    if row_starts[-1] != n or int(self.chosen_len.astype(np.int64).sum() +
                                  self.rejected_len.sum()) != len(arrays["tokens"]):
      raise DataError(f"{path}: inconsistent packed arrays (row_starts, lengths, tokens)")
    self.rows = (row_starts, np.arange(n))
    self.stats = dict(meta["stats"])
    self.stats["format"] = PACKED_FORMAT

  # --- access ----------------------------------------------------------------------------
  @property
  def packed(self) -> bool:
    return self.rows is not None or self.opts.packing != "none"

  @property
  def packed_size(self) -> int:
    return self.pack_size if self.rows is not None else self.opts.resolved_pack_size

  def pairs_per_row(self) -> int:
    """The most pairs one row can hold: exact for a fixed packing, else a bound from lengths."""
    if self.rows is not None:
      return int(np.diff(self.rows[0]).max()) if len(self) else 1
    return int(min(self.packed_size // max(int(self.row_lengths.min()), 1), len(self)))

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    if self.rows is not None:
      a = self.arrays
      start = int(a["pair_offsets"][i])
      n_c, n_r = int(self.chosen_len[i]), int(self.rejected_len[i])
      rewards = [float(a["chosen_reward"][i]), float(a["rejected_reward"][i])]
      return {"chosen": np.asarray(a["tokens"][start:start + n_c]),
              "rejected": np.asarray(a["tokens"][start + n_c:start + n_c + n_r]),
              "prompt_len": int(self.prompt_len[i]), "line": int(a["line"][i]),
              "chosen_reward": None if np.isnan(rewards[0]) else rewards[0],
              "rejected_reward": None if np.isnan(rewards[1]) else rewards[1], "index": i}
    pair, _ = fit_pair(self._tokenize(int(self.indices[i])), self.opts.max_seq_length,
                       self.opts.truncation, self._keep_prefix)
    return dict(pair, index=i)  # Its place in this split: the key of per-pair tables.

  @property
  def source_path(self) -> str:
    """The JSONL file the pairs came from (a packed directory's source)."""
    return self.meta.get("source", self.path) if self.rows is not None else self.path

  def line(self, i: int) -> int:
    """The line of pair `i` in `source_path` (1-based)."""
    if self.rows is not None:
      return int(self.arrays["line"][i])
    return self.source.line_number(int(self.indices[i]))

  def require(self, num_pairs: int, what: str):
    if len(self) < num_pairs:
      raise DataError(
          f"{self.path}: {len(self)} usable pairs ({self.stats.get('dropped', 0)} dropped as "
          f"too long, {self.stats.get('skipped', 0)} skipped) is fewer than {what}={num_pairs}")


# --- padded batches ------------------------------------------------------------------------
def collate(pairs: list[dict], *, micro_batch_size: int, seq_len: int, opts: DataOptions,
            pair_offset: int = 0) -> dict:
  """Pads a list of tokenized pairs (None = padding pair) into [A, 2M, T] micro-batches.

  Pair p of a micro-batch has sequence ids 2 (pair_offset + p) + side (an offset for a
  process's block of a larger micro-batch).
  """
  n = len(pairs)
  assert n % micro_batch_size == 0, (n, micro_batch_size)
  rows = 2 * n
  out = {k: np.zeros((rows, seq_len), np.int32) for k in BATCH_KEYS}
  out["sequence_ids"][:] = -1
  pair_mask = np.zeros(n, np.float32)
  pair_index = np.full(n, -1, np.int32)
  rewards = np.zeros((n, 2), np.float32)
  for p, pair in enumerate(pairs):
    if pair is None:
      continue
    pair_mask[p] = 1.0
    pair_index[p] = pair.get("index", -1)
    for side, name in enumerate(("chosen", "rejected")):
      ids = pair[name]
      r, length = 2 * p + side, len(ids)
      if length > seq_len:
        raise ValueError(f"line {pair.get('line')}: {length} tokens > {seq_len}")
      out["tokens"][r, :length] = ids
      out["positions"][r, :length] = np.arange(length)
      out["segment_ids"][r, :length] = 1
      out["loss_mask"][r, pair["prompt_len"]:length] = 1
      out["sequence_ids"][r, :length] = 2 * (pair_offset + p % micro_batch_size) + side
      reward = pair[f"{name}_reward"]
      default = opts.default_chosen_reward if side == 0 else opts.default_rejected_reward
      rewards[p, side] = default if reward is None else reward
  a = n // micro_batch_size
  batch = {k: v.reshape(a, 2 * micro_batch_size, seq_len) for k, v in out.items()}
  batch["pair_mask"] = pair_mask.reshape(a, micro_batch_size)
  batch["chosen_reward"] = rewards[:, 0].reshape(a, micro_batch_size)
  batch["rejected_reward"] = rewards[:, 1].reshape(a, micro_batch_size)
  batch["pair_index"] = pair_index.reshape(a, micro_batch_size)
  return batch


def steps_per_epoch(data: PreferenceData, global_batch_size: int, seed: int) -> float:
  """Optimizer steps in one pass over `data` (epochs run into each other, so a fraction):
  pairs / batch padded, rows of the first epoch's packing / batch packed."""
  units = RowStream(data, seed).rows_in_epoch(0) if data.packed else len(data)
  return units / global_batch_size


# --- packed batches ------------------------------------------------------------------------
class RowStream:
  """The endless stream of packed rows: epoch e is packed (or, for a fixed packing, its rows
  are permuted) from (seed, e); epochs follow each other. Thread-safe; caches two epochs."""

  def __init__(self, data: PreferenceData, seed: int, shuffle: bool = True):
    self.data, self.seed, self.shuffle = data, seed, shuffle
    self._counts = []  # Rows per epoch, for the epochs seen so far.
    self._cache = collections.OrderedDict()
    self._lock = threading.RLock()

  def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(row_starts, items) of epoch e, rows in this epoch's order."""
    with self._lock:
      if e not in self._cache:
        data, rng = self.data, np.random.default_rng([self.seed, e, 1])
        if data.rows is not None:
          row_starts, items = data.rows
        else:
          row_starts, items = packing.pack(data.row_lengths, data.packed_size,
                                           data.opts.packing, seed=[self.seed, e])
        n_rows = len(row_starts) - 1
        order = rng.permutation(n_rows) if self.shuffle else np.arange(n_rows)
        sizes = np.diff(row_starts)[order]
        new_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        # Item k of new row j comes from old row order[j]: shift each run of positions.
        gather = np.arange(new_starts[-1]) + np.repeat(row_starts[order] - new_starts[:-1], sizes)
        self._cache[e] = (new_starts, items[gather])
        while len(self._cache) > 2:
          self._cache.popitem(last=False)
      return self._cache[e]

  def rows_in_epoch(self, e: int) -> int:
    with self._lock:
      while len(self._counts) <= e:
        self._counts.append(len(self.epoch(len(self._counts))[0]) - 1)
      return self._counts[e]

  def rows(self, start: int, stop: int) -> list[np.ndarray]:
    """Rows [start, stop) of the stream, each an array of pair indices."""
    out, e, first = [], 0, 0
    while first + self.rows_in_epoch(e) <= start:
      first += self.rows_in_epoch(e)
      e += 1
    r = start - first
    while len(out) < stop - start:
      row_starts, items = self.epoch(e)
      while r < len(row_starts) - 1 and len(out) < stop - start:
        out.append(items[row_starts[r]:row_starts[r + 1]])
        r += 1
      e, r = e + 1, 0
    return out


class _GlobalBatches:
  """Global batch i = rows [i*G, (i+1)*G) of the stream: an endless random-access sequence."""

  def __init__(self, stream: RowStream, global_rows: int):
    self.stream, self.global_rows = stream, global_rows

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, i):
    return self.stream.rows(i * self.global_rows, (i + 1) * self.global_rows)


def packing_stats(data: PreferenceData, row_starts: np.ndarray, items: np.ndarray) -> dict:
  """Packing statistics plus the padded layout's efficiency, for logs."""
  out = packing.stats(data.row_lengths[items], row_starts, data.packed_size)
  out["pack_size"] = data.packed_size
  out["padded_efficiency"] = float(data.pair_lengths.sum() / max(
      2 * len(data) * data.opts.max_seq_length, 1))
  return out


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


class ProcessShard:
  """Process `index` of `count` takes block `index` of every micro-batch (axis 1).

  So a global batch is the concatenation of the processes' batches along axis 1 (rows and
  pairs alike); sequence ids are global within the micro-batch.
  """

  def __init__(self, global_batch_size, micro_batch_size, process_index, process_count, unit):
    if global_batch_size % micro_batch_size or micro_batch_size % process_count:
      raise DataError(
          f"train.global_batch_size={global_batch_size} must be a multiple of "
          f"train.micro_batch_size={micro_batch_size}, itself a multiple of the "
          f"{process_count} processes (both count {unit})")
    self.micro, self.index = micro_batch_size, process_index
    self.local = micro_batch_size // process_count  # Units per micro-batch per process.

  @property
  def offset(self) -> int:
    return self.index * self.local

  def __call__(self, units: list) -> list:
    start = self.offset
    return [u for a in range(0, len(units), self.micro)
            for u in units[a + start:a + start + self.local]]


def _collate_fn(data: PreferenceData, shard: ProcessShard):
  """Global batch units (pair indices, or rows of pair indices; None = padding) -> this
  process's arrays."""
  opts = data.opts
  if data.packed:
    kwargs = dict(micro_rows=shard.local, pack_size=data.packed_size,
                  pairs_per_row=data.pairs_per_row(), row_offset=shard.offset,
                  default_rewards=(opts.default_chosen_reward, opts.default_rejected_reward),
                  share_prompt=data.share_prompt)
    return lambda units: packing.collate_rows(shard(units), data.__getitem__, **kwargs)
  return lambda units: collate(
      [None if i is None else data[int(i)] for i in shard(units)],
      micro_batch_size=shard.local, seq_len=opts.max_seq_length, opts=opts,
      pair_offset=shard.offset)


def train_dataset(data: PreferenceData, *, global_batch_size: int, micro_batch_size: int,
                  seed: int, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """Shuffled (a new order each epoch; data.shuffle=False: the file's order), repeated
  forever, batched, sharded, prefetched.

  Padded: batch sizes count pairs. Packed: they count rows of data.pack_size tokens.
  Each process (default: this JAX process of all of them) gets block process_index of every
  micro-batch: [A, rows / process_count, T] and [A, P / process_count].
  """
  index, count = _process(process_index, process_count)
  unit = "rows when packing" if data.packed else "pairs"
  shard = ProcessShard(global_batch_size, micro_batch_size, index, count, unit)
  fn = _collate_fn(data, shard)
  if data.packed:
    data.require(1, "pairs")
    stream = RowStream(data, seed, data.opts.shuffle)
    row_starts, items = stream.epoch(0)
    data.stats["packing"] = packing_stats(data, row_starts, items)
    logging.info("%s: packing %s", data.path, data.stats["packing"])
    if stream.rows_in_epoch(0) < global_batch_size:
      raise DataError(
          f"{data.path}: {len(data)} pairs pack into {stream.rows_in_epoch(0)} rows of "
          f"{data.packed_size} tokens, fewer than train.global_batch_size={global_batch_size} "
          "(rows per step when packing)")
    ds = grain.MapDataset.source(_GlobalBatches(stream, global_batch_size)).map(fn)
  else:
    data.require(global_batch_size, "train.global_batch_size")
    ds = grain.MapDataset.range(len(data))
    ds = ds.shuffle(seed=seed) if data.opts.shuffle else ds
    ds = ds.repeat(None).batch(global_batch_size, drop_remainder=True, batch_fn=list).map(fn)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=data.opts.read_threads,
                                              prefetch_buffer_size=data.opts.prefetch))


def eval_batches(data: PreferenceData, *, global_batch_size: int, micro_batch_size: int,
                 max_batches: int = -1, process_index: int | None = None,
                 process_count: int | None = None) -> list[dict]:
  """Every pair once, in a fixed order; the last batch is padded with masked pairs/rows.

  Packed data is packed first_fit_decreasing with seed 0 (or keeps its file's packing).
  Sharded across processes like `train_dataset`.
  """
  data.require(1, "validation pairs")
  index, count = _process(process_index, process_count)
  unit = "rows when packing" if data.packed else "pairs"
  fn = _collate_fn(data, ProcessShard(global_batch_size, micro_batch_size, index, count, unit))
  if data.packed:
    if data.rows is not None:
      row_starts, items = data.rows
    else:
      row_starts, items = packing.pack(data.row_lengths, data.packed_size,
                                       "first_fit_decreasing", seed=0)
    data.stats["packing"] = packing_stats(data, row_starts, items)
    units = [items[row_starts[r]:row_starts[r + 1]] for r in range(len(row_starts) - 1)]
  else:
    units = list(range(len(data)))
  batches = []
  for start in range(0, len(units), global_batch_size):
    if 0 <= max_batches <= len(batches):
      break
    chunk = units[start:start + global_batch_size]
    batches.append(fn(chunk + [None] * (global_batch_size - len(chunk))))
  return batches


# --- packed directories (written by `python -m dpojax.pack`) --------------------------------
# Pairs are stored in row order; row r holds pairs row_starts[r]:row_starts[r+1], and pair i's
# chosen then rejected tokens start at tokens[pair_offsets[i]].
PACKED_ARRAYS = ("tokens", "row_starts", "pair_offsets", "prompt_len", "chosen_len",
                 "rejected_len", "chosen_reward", "rejected_reward", "line")


def read_packed_meta(path: str) -> dict:
  meta_path = os.path.join(path, "meta.json")
  if not os.path.isfile(meta_path):
    raise DataError(f"{path}: a directory without meta.json is not a packed dataset "
                    "(python -m dpojax.pack writes one)")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{meta_path}: invalid JSON ({e})") from None
  if meta.get("format") != PACKED_FORMAT:
    raise DataError(f"{meta_path}: field 'format': expected {PACKED_FORMAT!r}, got "
                    f"{meta.get('format')!r}")
  for name in PACKED_ARRAYS:
    if not os.path.isfile(os.path.join(path, f"{name}.npy")):
      raise DataError(f"{path}: missing {name}.npy")
  return meta


def write_packed(data: PreferenceData, out_dir: str, *, strategy: str, seed: int,
                 extra_meta: dict | None = None) -> dict:
  """Packs `data` (a JSONL split) and writes it under `out_dir` (.npy arrays + meta.json,
  no pickles); returns the statistics. Written to a temporary directory, then renamed."""
  pack_size = data.opts.resolved_pack_size
  row_starts, items = packing.pack(data.row_lengths, pack_size, strategy, seed=seed)
  n, total = len(items), int(data.pair_lengths.sum())
  tokens = np.zeros(total, np.int32)
  pair_offsets = np.zeros(n, np.int64)
  rewards = np.full((n, 2), np.nan, np.float32)
  lines = np.zeros(n, np.int64)
  pos = 0
  for j, i in enumerate(items.tolist()):
    pair = data[i]
    pair_offsets[j] = pos
    for side, name in enumerate(("chosen", "rejected")):
      tokens[pos:pos + len(pair[name])] = pair[name]
      pos += len(pair[name])
      if pair[f"{name}_reward"] is not None:
        rewards[j, side] = pair[f"{name}_reward"]
    lines[j] = pair["line"]
  assert pos == total
  stats = dict(data.stats)
  stats.update(packing_stats(data, row_starts, items))
  opts = data.opts
  meta = {"format": PACKED_FORMAT, "pack_size": pack_size, "strategy": strategy, "seed": seed,
          "max_seq_length": opts.max_seq_length, "template": opts.template,
          "add_bos": opts.add_bos, "append_eos": opts.append_eos, "boundary": opts.boundary,
          "share_prompt": data.share_prompt, "truncation": opts.truncation, "source": data.path,
          "tokenizer_path": data.tok.path, "tokenizer_sha256": data.tok.sha256,
          "stats": stats, **(extra_meta or {})}
  arrays = {"tokens": tokens, "row_starts": row_starts, "pair_offsets": pair_offsets,
            "prompt_len": data.prompt_len[items], "chosen_len": data.chosen_len[items],
            "rejected_len": data.rejected_len[items], "chosen_reward": rewards[:, 0],
            "rejected_reward": rewards[:, 1], "line": lines}
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
  os.makedirs(tmp, exist_ok=False)
  for name, value in arrays.items():
    np.save(os.path.join(tmp, f"{name}.npy"), np.ascontiguousarray(value), allow_pickle=False)
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(tmp, out_dir)
  return stats
