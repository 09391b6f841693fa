"""The Grain pipeline: records -> tokenized pairs -> padded micro-batches.

A global batch is a dict of arrays with a leading micro-batch axis A:
  tokens, positions, segment_ids, loss_mask, sequence_ids: [A, 2M, T] (rows interleave
    chosen and rejected: row 2p is pair p's chosen, row 2p+1 its rejected; sequence id of a
    token = its row, -1 on padding);
  pair_mask, chosen_reward, rejected_reward: [A, M].
Packing (later) fills the same keys with several sequences per row.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np
from absl import logging

from dpojax.data.sources import DataError, JsonlSource
from dpojax.data.tokenize import Tokenizer, tokenize_pair

BATCH_KEYS = ("tokens", "positions", "segment_ids", "loss_mask", "sequence_ids")
PAIR_KEYS = ("pair_mask", "chosen_reward", "rejected_reward")


@dataclasses.dataclass(frozen=True)
class DataOptions:
  max_seq_length: int
  template: str = "plain"
  add_bos: bool = True
  append_eos: bool = True
  default_chosen_reward: float = 1.0
  default_rejected_reward: float = 0.0

  @classmethod
  def from_config(cls, data_cfg) -> DataOptions:
    """From the `data` section of a run config."""
    return cls(**{f.name: data_cfg[f.name] for f in dataclasses.fields(cls)})


class PreferenceData:
  """One split: the validated, length-filtered records of a JSONL file."""

  def __init__(self, path: str, tok: Tokenizer, opts: DataOptions):
    self.source = JsonlSource(path)
    self.tok, self.opts = tok, opts
    kept, dropped = [], 0
    for i in range(len(self.source)):  # Validates every record before any training.
      pair = self.tokenize(self.source[i])
      if max(len(pair["chosen"]), len(pair["rejected"])) > opts.max_seq_length:
        dropped += 1
      else:
        kept.append(i)
    self.indices = kept
    self.dropped = dropped
    if dropped:
      logging.warning("%s: dropped %d of %d pairs longer than data.max_seq_length=%d",
                      path, dropped, len(self.source), opts.max_seq_length)

  def tokenize(self, record: dict) -> dict:
    return tokenize_pair(record, self.tok, template=self.opts.template,
                         add_bos=self.opts.add_bos, append_eos=self.opts.append_eos)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict:
    return self.tokenize(self.source[self.indices[i]])

  def require(self, num_pairs: int, what: str):
    if len(self) < num_pairs:
      raise DataError(
          f"{self.source.path}: {len(self)} usable pairs ({self.dropped} dropped as too long) "
          f"is fewer than {what}={num_pairs}")


def collate(pairs: list[dict], *, micro_batch_size: int, seq_len: int,
            opts: DataOptions) -> dict:
  """Pads a list of tokenized pairs (None = padding pair) into [A, 2M, T] micro-batches."""
  n = len(pairs)
  assert n % micro_batch_size == 0, (n, micro_batch_size)
  rows = 2 * n
  out = {k: np.zeros((rows, seq_len), np.int32) for k in BATCH_KEYS}
  out["sequence_ids"][:] = -1
  pair_mask = np.zeros(n, np.float32)
  rewards = np.zeros((n, 2), np.float32)
  for p, pair in enumerate(pairs):
    if pair is None:
      continue
    pair_mask[p] = 1.0
    for side, name in enumerate(("chosen", "rejected")):
      ids = pair[name]
      r, length = 2 * p + side, len(ids)
      out["tokens"][r, :length] = ids
      out["positions"][r, :length] = np.arange(length)
      out["segment_ids"][r, :length] = 1
      out["loss_mask"][r, pair["prompt_len"]:length] = 1
      out["sequence_ids"][r, :length] = r % (2 * micro_batch_size)
      reward = pair[f"{name}_reward"]
      default = opts.default_chosen_reward if side == 0 else opts.default_rejected_reward
      rewards[p, side] = default if reward is None else reward
  a = n // micro_batch_size
  batch = {k: v.reshape(a, 2 * micro_batch_size, seq_len) for k, v in out.items()}
  batch["pair_mask"] = pair_mask.reshape(a, micro_batch_size)
  batch["chosen_reward"] = rewards[:, 0].reshape(a, micro_batch_size)
  batch["rejected_reward"] = rewards[:, 1].reshape(a, micro_batch_size)
  return batch


def train_dataset(data: PreferenceData, *, global_batch_size: int, micro_batch_size: int,
                  seed: int) -> grain.IterDataset:
  """Shuffled (a new order each epoch), repeated forever, batched, prefetched."""
  data.require(global_batch_size, "train.global_batch_size")
  fn = functools.partial(collate, micro_batch_size=micro_batch_size,
                         seq_len=data.opts.max_seq_length, opts=data.opts)
  ds = (grain.MapDataset.source(data).shuffle(seed=seed).repeat(None)
        .batch(global_batch_size, drop_remainder=True, batch_fn=list).map(fn))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))


def eval_batches(data: PreferenceData, *, global_batch_size: int, micro_batch_size: int,
                 max_batches: int = -1) -> list[dict]:
  """Every pair once, in file order; the last batch is padded with masked pairs."""
  data.require(1, "validation pairs")
  pairs = [data[i] for i in range(len(data))]
  batches = []
  for start in range(0, len(pairs), global_batch_size):
    if 0 <= max_batches <= len(batches):
      break
    chunk = pairs[start:start + global_batch_size]
    chunk += [None] * (global_batch_size - len(chunk))
    batches.append(collate(chunk, micro_batch_size=micro_batch_size,
                           seq_len=data.opts.max_seq_length, opts=data.opts))
  return batches
