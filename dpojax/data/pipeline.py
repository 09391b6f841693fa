"""Preference data: records -> validated, tokenized pairs (`PreferenceData`), from a JSONL
file, Parquet/Arrow files (arrow_sources.py) or a packed directory, with the options of the
`data` config section.

Batches and the Grain datasets over them are in batching.py; packed directories in
packed_dir.py.
"""

from __future__ import annotations

import collections
import dataclasses
import os

from absl import logging
import numpy as np

from dpojax.data import packing, templates
from dpojax.data.arrow_sources import is_dataset_path, open_source
from dpojax.data.packed_dir import PACKED_ARRAYS, PACKED_FORMAT, read_packed_meta
from dpojax.data.sources import FORMATS, DataError, RecordError, where
from dpojax.data.tokenize import BOUNDARIES, TEMPLATES, TRUNCATIONS, fit_pair, tokenize_pair
from dpojax.data.tokenizer_base import TokenizerBase
from dpojax.data.unpaired import UnpairedSource

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask", "sequence_ids")
PAIR_KEYS = ("pair_mask", "chosen_reward", "rejected_reward", "pair_index")
ON_ERROR = ("raise", "skip")


ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TOY_TRAIN = os.path.join(ASSETS, "toy_prefs_train.jsonl")  # configs/dpo_gpt.py's defaults.
TOY_VAL = os.path.join(ASSETS, "toy_prefs_val.jsonl")
# A run config written before a field existed ran with this value, not today's default.
_BEFORE_FIELD = {"boundary": "apart", "length_buckets": 1, "response_only": False}


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
  unpair: bool = False  # KTO: split paired records into examples (data/unpaired.py).
  kl_chunk: int = 0  # KTO: examples with KL partners from runs of this many; 0 = pairs.
  length_buckets: int = 4  # Padded lengths (and batch-packed rows): data/buckets.py.
  response_only: bool = True  # Batches carry `loss_positions` (data/buckets.py).

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
    if self.length_buckets < 1:
      raise DataError(f"data.length_buckets={self.length_buckets} must be >= 1 (1: pad every "
                      "batch to data.max_seq_length)")
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

  def __init__(self, path: str, tok: TokenizerBase, opts: DataOptions):
    self.path, self.tok, self.opts = path, tok, opts
    self.rows = None  # (row_starts, items): a fixed packing, from a packed directory.
    self.meta = None  # A packed directory's meta.json.
    if os.path.isdir(path) and not is_dataset_path(path):
      self._load_packed(path)
    else:
      self._read_records(path)
    # A layout, not a value change: padded data (e.g. a JSONL val file next to a packed
    # train directory) simply keeps its two rows per pair.
    if self.meta is not None:  # A packed directory: as it was packed (_load_packed checks).
      self.share_prompt = bool(self.meta.get("share_prompt", False))
    else:
      self.share_prompt = opts.share_prompt and (self.packed or opts.packing == "batch")
      if opts.share_prompt and not self.share_prompt:
        logging.info("%s: read as padded rows (data.packing=none), so data.share_prompt does "
                     "not apply to it", path)
    self.pair_lengths = self.chosen_len.astype(np.int64) + self.rejected_len
    # Tokens a pair takes in a packed row (fewer with a shared prompt).
    self.row_lengths = packing.item_lengths(self.prompt_len, self.chosen_len,
                                            self.rejected_len, self.share_prompt)

  # --- records: JSONL, Parquet, Arrow ----------------------------------------------------
  def _read_records(self, path):
    opts = self.opts
    self.source = open_source(path, opts.format, opts.cache_dir)
    if opts.kl_chunk:  # KTO: examples with their KL sequences, shaped as pairs.
      self.source = UnpairedSource(self.source, opts.kl_chunk, opts.unpair)
    elif self.source.format == "kto" or opts.unpair:
      raise DataError(f"{path}: unpaired examples (format kto, or data.unpair=True) need an "
                      "unpaired loss: dpo.preference_loss=kto or apo_zero_unpaired (and pack "
                      "online: python -m dpojax.pack writes pairs only)")
    self._keep_prefix = len(self.tok.special(templates.BOS)) if opts.add_bos else 0
    indices, lens = [], []
    skipped, first_skipped = collections.Counter(), {}
    dropped, truncated, straddled, desirable = collections.Counter(), 0, 0, 0
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
      desirable += bool(opts.kl_chunk and pair["chosen_reward"] == 1.0)  # KTO's labels.
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
    if opts.kl_chunk:
      self.stats["desirable"] = desirable
    if skipped:
      details = "; ".join(f"{r}: {n} (first: {first_skipped[r]})" for r, n in skipped.items())
      logging.warning("%s: data.on_error=skip skipped %d of %d records: %s", path,
                      sum(skipped.values()), len(self.source), details)
    if straddled:
      logging.warning(
          "%s: %d of %d pairs have a token across the prompt/response boundary "
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
    line, path = record["line"], record["source"]
    for side in ("chosen", "rejected"):
      if len(pair[side]) <= pair["prompt_len"]:
        raise RecordError(f"{where(path, line, side)}: the response has no tokens",
                          "empty field")
    if not self.opts.kl_chunk and np.array_equal(pair["chosen"], pair["rejected"]):
      raise RecordError(f"{where(path, line, 'rejected')}: chosen and rejected have "
                        "identical tokens", "chosen equals rejected")
    return pair

  # --- packed directory ------------------------------------------------------------------
  def _load_packed(self, path):
    meta = read_packed_meta(path)
    if self.opts.kl_chunk:
      raise DataError(f"{path}: a packed directory holds pairs; KTO's unpaired examples pack "
                      "online (data.packing=first_fit_*) from their JSONL/Parquet file")
    opts, tok = self.opts, self.tok
    # Older files: no shared prompt, responses tokenized apart.
    packed_with = dict(meta, share_prompt=meta.get("share_prompt", False),
                       boundary=meta.get("boundary", "apart"))
    for key in ("template", "add_bos", "append_eos", "share_prompt", "boundary"):
      if key == "share_prompt" and opts.share_prompt and not packed_with[key]:
        continue  # True shares the prompt where the rows allow it; these rows do not.
      if packed_with[key] != getattr(opts, key):
        raise DataError(f"{path}: packed with {key}={packed_with[key]!r}, but data.{key}="
                        f"{getattr(opts, key)!r}; repack or change data.{key}")
    if meta["tokenizer_sha256"] != tok.sha256:
      raise DataError(f"{path}: packed with tokenizer {meta['tokenizer_path']} (sha256 "
                      f"{meta['tokenizer_sha256'][:12]}...), which differs from "
                      f"data.tokenizer_path={tok.path}")
    if opts.packing in packing.STRATEGIES and opts.resolved_pack_size != meta["pack_size"]:
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
    """Rows of packed pairs are the batch unit (data.packing=batch packs pairs per step)."""
    return self.rows is not None or self.opts.packing not in ("none", "batch")

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
