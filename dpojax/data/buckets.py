"""Batch shapes that follow the data: length buckets, response positions, per-step packing.

Three layouts trim what a step computes without changing a single per-pair log-prob (beyond
float rounding):
  length buckets   a padded global batch is padded to the smallest of `data.length_buckets`
                   lengths holding its longest sequence, not to data.max_seq_length; each
                   bucket compiles once (jit caches one program per shape).
  loss positions   every batch carries `loss_positions` [A, rows, M]: per row, the positions
                   whose target is a loss (response) token, ascending, padded with the row's
                   last position (whose target is never a loss token). The step gathers the
                   hidden states there (ops/logprob.take_rows), so the output layer and the
                   log-softmax run on M tokens per row instead of T, in every log-prob
                   implementation. M is the global batch's largest row count, bucketed.
  batch packing    data.packing=batch: each micro-batch's pairs (train.global_batch_size and
                   train.micro_batch_size still count PAIRS, as padded and as in TRL) are
                   packed first-fit-decreasing into as few rows of data.pack_size as they
                   need; the row count and the row length are bucketed. Pair p of a
                   micro-batch keeps pair slot p and sequence ids 2p + side, so the loss sees
                   the padded layout's arrays; only the rows differ.
All sizes are decided from the GLOBAL batch (every process computes the same), from the
pairs' lengths alone, before a process takes its block.
"""

from __future__ import annotations

import numpy as np

from dpojax.data import packing

ROUND = 32  # Lengths are multiples of this (attention's query tiles need a multiple).


def ladder(largest: int, count: int, round_to: int = ROUND) -> tuple[int, ...]:
  """`count` sizes up to `largest` (evenly spaced, rounded up to `round_to`, capped)."""
  count = max(int(count), 1)
  ceil = lambda a, b: -(-a // b)
  return tuple(sorted({min(largest, ceil(ceil(largest * k, count), round_to) * round_to)
                       for k in range(1, count + 1)}))


def fit(value: int, sizes: tuple[int, ...]) -> int:
  """The smallest size holding `value` (the largest if none does: callers check)."""
  return next((s for s in sizes if s >= value), sizes[-1])


def target_mask(segment_ids, loss_mask):
  """NumPy twin of ops/logprob.shift_targets' mask: position t's target is a loss token of
  its own segment."""
  seg = np.asarray(segment_ids)
  mask = np.zeros(seg.shape, bool)
  mask[..., :-1] = ((seg[..., 1:] == seg[..., :-1]) & (np.asarray(loss_mask)[..., 1:] > 0)
                    & (seg[..., :-1] > 0))
  return mask


def add_loss_positions(batch: dict, budget: int) -> dict:
  """batch + `loss_positions` [A, rows, budget] int32 (see the module docstring)."""
  mask = target_mask(batch["segment_ids"], batch["loss_mask"])
  t = mask.shape[-1]
  counts = mask.sum(-1)
  if counts.max(initial=0) > budget:
    raise ValueError(f"a row has {counts.max()} response tokens, more than the budget {budget}")
  budget = min(budget, t)
  # Stable sort of (not a target): the targets first, in order; then the rest, whose first
  # entries are replaced by the last position (never a target) so nothing counts twice.
  order = np.argsort(~mask, axis=-1, kind="stable")[..., :budget]
  slot = np.arange(budget)
  positions = np.where(slot < counts[..., None], order, t - 1).astype(np.int32)
  return dict(batch, loss_positions=positions)


def _resp(data, i) -> tuple[int, int]:
  """(chosen, rejected) response tokens of pair i."""
  p = int(data.prompt_len[i])
  return int(data.chosen_len[i]) - p, int(data.rejected_len[i]) - p


def padded_sizes(data, units, sizes) -> tuple[int, int]:
  """(row length, response budget) of a padded global batch (units: pair indices or None)."""
  idx = np.asarray([int(u) for u in units if u is not None], np.int64)
  if not idx.size:
    return sizes[0], sizes[0]
  longest = int(max(data.chosen_len[idx].max(), data.rejected_len[idx].max()))
  resp = int(max((data.chosen_len[idx] - data.prompt_len[idx]).max(),
                 (data.rejected_len[idx] - data.prompt_len[idx]).max()))
  return fit(longest, sizes), fit(resp, sizes)


def rows_budget(data, rows, sizes) -> int:
  """Response budget of packed rows (each an array of pair indices, or None)."""
  most = max((sum(sum(_resp(data, int(i))) for i in row) for row in rows if row is not None),
             default=0)
  return fit(most, sizes)


class BatchPacker:
  """data.packing=batch: a micro-batch's pairs -> bucketed rows (see the module docstring)."""

  def __init__(self, data, *, micro_pairs: int, processes: int, count: int,
               row_multiple: int = 1):
    """row_multiple: a process's rows come in multiples of this (its devices: rows are
    split over the mesh's data and fsdp axes)."""
    self.data, self.micro, self.processes = data, micro_pairs, processes
    self.local = micro_pairs // processes
    self.capacity = data.opts.resolved_pack_size
    self.lengths = data.row_lengths  # Tokens a pair takes in a row.
    self.length_sizes = ladder(self.capacity, count)
    self.row_sizes = tuple(sorted({-(-r // row_multiple) * row_multiple
                                   for r in ladder(self.local, count, round_to=1)}))

  def describe(self) -> str:
    return (f"{self.micro} pairs per micro-batch packed into rows of {self.length_sizes} "
            f"tokens, {self.row_sizes} rows per process")

  def _pack(self, block: list) -> list[list[int]]:
    """Rows of local pair positions (first fit decreasing over the block's real pairs)."""
    where = [k for k, u in enumerate(block) if u is not None]
    if not where:
      return []
    lengths = self.lengths[np.asarray([int(block[k]) for k in where])]
    row_starts, items = packing.pack(lengths, self.capacity, "first_fit_decreasing", seed=0)
    return [[where[k] for k in items[row_starts[r]:row_starts[r + 1]]]
            for r in range(len(row_starts) - 1)]

  def __call__(self, units: list, process_index: int) -> dict:
    """The global batch `units` (pair indices or None, micro-batch after micro-batch) ->
    process `process_index`'s [A, rows, T] block, its pairs as the padded layout has them."""
    blocks = [units[a + q * self.local:a + (q + 1) * self.local]
              for a in range(0, len(units), self.micro) for q in range(self.processes)]
    packed = [self._pack(b) for b in blocks]
    fills = [sum(int(self.lengths[int(b[k])]) for k in row) for b, rows in zip(blocks, packed)
             for row in rows]
    resp = [sum(sum(_resp(self.data, int(b[k]))) for k in row)
            for b, rows in zip(blocks, packed) for row in rows]
    n_rows = fit(max((len(r) for r in packed), default=1), self.row_sizes)
    t = fit(max(fills, default=1), self.length_sizes)
    mine = range(process_index, len(blocks), self.processes)
    batches = [self._collate(blocks[k], packed[k], n_rows, t, process_index) for k in mine]
    batch = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return add_loss_positions(batch, fit(max(resp, default=1), self.length_sizes))

  def _collate(self, block, rows, n_rows, t, process_index) -> dict:
    """One micro-batch's block: collate_rows' layout, then pair slots put back in pair order
    (slot p, sequence ids 2 (offset + p) + side)."""
    data = self.data
    per_row = max((len(r) for r in rows), default=1)
    out = packing.collate_rows(
        [[int(block[k]) for k in r] for r in rows] + [None] * (n_rows - len(rows)),
        data.__getitem__, micro_rows=n_rows, pack_size=t, pairs_per_row=per_row,
        default_rewards=(data.opts.default_chosen_reward, data.opts.default_rejected_reward),
        share_prompt=data.share_prompt)
    old_slot = np.full(self.local, -1, np.int64)  # Pair position -> collate_rows' slot.
    for r, row in enumerate(rows):
      old_slot[row] = r * per_row + np.arange(len(row))
    seq_map = np.full(2 * n_rows * per_row + 1, -1, np.int32)  # Old sequence id -> new.
    offset = process_index * self.local
    for p, s in enumerate(old_slot):
      if s >= 0:
        seq_map[2 * s:2 * s + 2] = 2 * (offset + p) + np.arange(2)
    out["sequence_ids"] = seq_map[out["sequence_ids"]]  # -1 (padding) maps to the last: -1.
    for k in ("pair_mask", "chosen_reward", "rejected_reward", "pair_index"):
      fill = -1 if k == "pair_index" else 0
      out[k] = np.where(old_slot >= 0, out[k][:, np.maximum(old_slot, 0)], fill).astype(
          out[k].dtype)
    return out
