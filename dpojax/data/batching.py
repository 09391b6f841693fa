"""Batches and the Grain datasets over them: tokenized pairs -> padded or packed micro-batches.

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
import sys
import threading

from absl import logging
import grain
import jax
import numpy as np

from dpojax.data import buckets, packing
from dpojax.data.packed_dir import packing_stats
from dpojax.data.pipeline import BATCH_KEYS, DataOptions, PreferenceData
from dpojax.data.sources import DataError

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


def describe_epochs(data: PreferenceData, global_batch_size: int, seed: int,
                    max_steps: int) -> str:
  """The start-up line's account of a step: pairs, or packed rows with their token efficiency
  and the pairs a step holds on average (epoch 0's packing), and the epochs the run covers."""
  if not data.packed:
    per_epoch = len(data) / global_batch_size
    head = f"{len(data)} pairs, {global_batch_size} pairs a step"
  else:
    row_starts, items = RowStream(data, seed).epoch(0)
    st = packing.stats(data.row_lengths[items], row_starts, data.packed_size)
    per_epoch = st["rows"] / global_batch_size
    head = (f"{len(data)} pairs packed into {st['rows']} rows of {data.packed_size} tokens "
            f"({100 * st['token_efficiency']:.1f}% real tokens, "
            f"{st['pairs_per_row_mean']:.2f} pairs a row), {global_batch_size} rows a step "
            f"(about {global_batch_size * st['pairs_per_row_mean']:.1f} pairs)")
  return (f"{head}, {per_epoch:.1f} steps an epoch: {max_steps} steps are "
          f"{max_steps / per_epoch:.2f} epochs")


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
  process's arrays. Lengths, response budgets and batch packing: data/buckets.py."""
  opts = data.opts
  if opts.packing == "batch" and not data.packed:
    packer = buckets.BatchPacker(data, micro_pairs=shard.micro,
                                 processes=shard.micro // shard.local, count=opts.length_buckets,
                                 row_multiple=jax.local_device_count())
    return lambda units: _positions(packer(units, shard.index), opts)
  if data.packed:
    kwargs = dict(micro_rows=shard.local, pack_size=data.packed_size,
                  pairs_per_row=data.pairs_per_row(), row_offset=shard.offset,
                  default_rewards=(opts.default_chosen_reward, opts.default_rejected_reward),
                  share_prompt=data.share_prompt)
    sizes = buckets.ladder(data.packed_size, opts.length_buckets)
    return lambda units: _positions(
        packing.collate_rows(shard(units), data.__getitem__, **kwargs), opts,
        lambda: buckets.rows_budget(data, units, sizes))
  sizes = buckets.ladder(opts.max_seq_length, opts.length_buckets)

  def padded(units):
    seq_len, budget = buckets.padded_sizes(data, units, sizes)
    batch = collate([None if i is None else data[int(i)] for i in shard(units)],
                    micro_batch_size=shard.local, seq_len=seq_len, opts=opts,
                    pair_offset=shard.offset)
    return _positions(batch, opts, lambda: budget)

  return padded


def _positions(batch: dict, opts: DataOptions, budget=None) -> dict:
  """The batch with its `loss_positions` (data.response_only), within `budget()` (global)."""
  if not opts.response_only:
    return {k: v for k, v in batch.items() if k != "loss_positions"}
  return batch if budget is None else buckets.add_loss_positions(batch, budget())


def describe_layout(data: PreferenceData, global_batch_size: int, micro_batch_size: int) -> str:
  """How a run lays out its batches, for the start-up line."""
  opts = data.opts
  if opts.packing == "batch" and not data.packed:
    shard = ProcessShard(global_batch_size, micro_batch_size, 0, jax.process_count(), "pairs")
    what = buckets.BatchPacker(data, micro_pairs=shard.micro,
                               processes=jax.process_count(), count=opts.length_buckets,
                               row_multiple=jax.local_device_count()).describe()
  elif data.packed:
    what = f"packed rows of {data.packed_size} tokens"
  else:
    what = (f"padded to length buckets {buckets.ladder(opts.max_seq_length, opts.length_buckets)}"
            if opts.length_buckets > 1 else f"padded to {opts.max_seq_length}")
  what += ", shared prompt" if data.share_prompt else ""
  return what + (", response-only log-probs" if opts.response_only else "")


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
