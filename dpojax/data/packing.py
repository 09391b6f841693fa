"""Bin-packing preference pairs into fixed-length rows, and the packed micro-batch layout.

A pair (chosen + rejected, both with the prompt) is one item of length len_c + len_r; both
sequences of a pair always share a row. Rows are `pack_size` tokens. Within a row, sequence
k (k = 0, 1, ...) has segment id k + 1 and positions restarting at 0; every row has
`pairs_per_row` pair slots, so a micro-batch of M rows has P = M * pairs_per_row pairs
(unused slots masked) and the sequence ids 2p + side (p = the pair's slot) give the loss its
per-sequence sums exactly as for padded rows.

Shared prompt (`share_prompt`): a pair is one segment [prompt[:-1] | prompt[-1], chosen
response | prompt[-1], rejected response] with `branch_ids` 0 | 1 | 2 (the model's attention
mask lets each branch see the prefix and itself only) and positions restarting at P - 1 in
each branch. The last prompt token is repeated at the head of each branch, so every response
token is still predicted by the position before it (the shift by one is unchanged) from
exactly the context of its own sequence; the prompt's other P - 1 tokens are computed once,
and the pair takes len_c + len_r - P + 1 tokens instead of len_c + len_r.

Strategies (NeMo's names):
  first_fit_decreasing: first fit over the pairs sorted by decreasing length (ties in seeded
    random order). Exact, vectorized over runs of equal length: identical items go to the
    first bins with room, each bin taking as many as fit, so one numpy pass per distinct
    length (<= pack_size) instead of one Python step per pair.
  first_fit_shuffle: first fit over the pairs in seeded random order; a max segment tree over
    bins finds the first bin with room in O(log bins) steps, in one jitted loop on the CPU.
A packing is CSR: `items[row_starts[r]:row_starts[r + 1]]` are the pairs of row r.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("first_fit_decreasing", "first_fit_shuffle")
PACKINGS = ("none",) + STRATEGIES + ("batch",)  # batch: data/buckets.py.


def _first_fit_runs(sizes: np.ndarray, capacity: int) -> np.ndarray:
  """First fit of items whose sizes come in runs of equal values; returns the bin per item."""
  n = len(sizes)
  bins = np.empty(n, np.int64)
  room = np.empty(max(n, 1), np.int64)  # Remaining room per opened bin.
  opened = 0
  run_starts = np.concatenate([[0], np.flatnonzero(np.diff(sizes)) + 1, [n]])
  for a, b in zip(run_starts[:-1].tolist(), run_starts[1:].tolist()):
    size, k, pos = int(sizes[a]), b - a, a
    fits = np.flatnonzero(room[:opened] >= size)  # Bins with room, in first-fit order.
    if fits.size:
      take = room[fits] // size
      total = np.cumsum(take)
      last = int(np.searchsorted(total, k))  # The bin where this run ends, if any.
      if last < fits.size:
        take = take[:last + 1]
        take[last] = k - (total[last - 1] if last else 0)
      used = fits[:take.size]
      placed = int(take.sum())
      bins[pos:pos + placed] = np.repeat(used, take)
      room[used] -= take * size
      pos += placed
    left = b - pos
    if left:  # New bins, each taking as many as fit.
      per_bin = capacity // size
      new = -(-left // per_bin)
      bins[pos:b] = opened + np.arange(left) // per_bin
      counts = np.full(new, per_bin)
      counts[-1] = left - per_bin * (new - 1)
      room[opened:opened + new] = capacity - counts * size
      opened += new
  return bins


def _first_fit(sizes: np.ndarray, capacity: int) -> np.ndarray:
  """First fit in the given order; returns the bin per item.

  A max segment tree over bins (room left; unopened bins have 0) finds the leftmost bin with
  room in log2(bins) steps. The loop is sequential, so it runs as one jitted XLA loop on the
  host CPU (about 1 s for 1M items; plain Python takes about 6 s).
  """
  n = len(sizes)
  if n == 0:
    return np.zeros(0, np.int64)
  leaves = 1 << (n - 1).bit_length()
  sizes = jax.device_put(np.asarray(sizes, np.int32), jax.devices("cpu")[0])
  return np.asarray(_first_fit_xla(sizes, capacity, leaves), np.int64)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _first_fit_xla(sizes_N, capacity: int, leaves: int):
  depth = leaves.bit_length() - 1

  def place(j, carry):
    tree, bins, opened = carry
    size = sizes_N[j]
    descend = lambda _, i: jnp.where(tree[2 * i] < size, 2 * i + 1, 2 * i)
    fits = tree[1] >= size
    i = jnp.where(fits, jax.lax.fori_loop(0, depth, descend, 1), opened + leaves)
    tree = tree.at[i].set(jnp.where(fits, tree[i], capacity) - size)

    def up(_, c):
      tree, i = c
      i = i // 2
      return tree.at[i].set(jnp.maximum(tree[2 * i], tree[2 * i + 1])), i

    tree, _ = jax.lax.fori_loop(0, depth, up, (tree, i))
    return tree, bins.at[j].set(i - leaves), opened + jnp.where(fits, 0, 1)

  init = (jnp.zeros(2 * leaves, jnp.int32), jnp.zeros(sizes_N.shape[0], jnp.int32),
          jnp.int32(0))
  return jax.lax.fori_loop(0, sizes_N.shape[0], place, init)[1]


def pack(lengths, pack_size: int, strategy: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Packs items of the given lengths into rows of `pack_size`; returns (row_starts, items).

  Rows come in first-fit order (bin creation order); items within a row in placement order.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"data.packing={strategy!r} is not one of {STRATEGIES}")
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and (lengths.max() > pack_size or lengths.min() <= 0):
    raise ValueError(f"item lengths must be in [1, {pack_size}], got "
                     f"[{lengths.min()}, {lengths.max()}]")
  if not lengths.size:
    return np.zeros(1, np.int64), np.zeros(0, np.int64)
  perm = np.random.default_rng(seed).permutation(len(lengths))
  if strategy == "first_fit_decreasing":
    order = perm[np.argsort(-lengths[perm], kind="stable")]
    bins = _first_fit_runs(lengths[order], pack_size)
  else:
    order = perm
    bins = _first_fit(lengths[order], pack_size)
  by_row = np.argsort(bins, kind="stable")  # Keeps placement order within a row.
  items = order[by_row]
  counts = np.bincount(bins, minlength=int(bins.max()) + 1 if bins.size else 0)
  row_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return row_starts, items


def stats(lengths, row_starts, pack_size: int) -> dict:
  """Token efficiency (real tokens / row slots) and pairs per row of a packing."""
  lengths = np.asarray(lengths, np.int64)
  rows = len(row_starts) - 1
  per_row = np.diff(row_starts)
  return {
      "rows": int(rows),
      "pairs": int(len(lengths)),
      "tokens": int(lengths.sum()),
      "token_efficiency": float(lengths.sum() / max(rows * pack_size, 1)),
      "pairs_per_row_mean": float(per_row.mean()) if rows else 0.0,
      "pairs_per_row_max": int(per_row.max()) if rows else 0,
  }


def item_lengths(prompt_len, chosen_len, rejected_len, share_prompt: bool) -> np.ndarray:
  """Row tokens a pair takes: both sequences, or with a shared prompt its P - 1 tokens once."""
  lengths = np.asarray(chosen_len, np.int64) + np.asarray(rejected_len, np.int64)
  if share_prompt:
    lengths -= np.maximum(np.asarray(prompt_len, np.int64) - 1, 0)
  return lengths


def collate_rows(rows: list, fetch, *, micro_rows: int, pack_size: int, pairs_per_row: int,
                 default_rewards: tuple[float, float], row_offset: int = 0,
                 share_prompt: bool = False) -> dict:
  """Packed rows (each a sequence of pair indices; None = an empty row) -> a global batch.

  `fetch(i)` returns the tokenized pair i. Returns [A, micro_rows, pack_size] token arrays and
  [A, micro_rows * pairs_per_row] pair arrays: the j-th pair of row r of a micro-batch takes
  pair slot r * pairs_per_row + j (unused slots have pair_mask 0), and sequence ids
  2 * ((row_offset + r) * pairs_per_row + j) + side, so a process's rows (offset row_offset)
  are exactly its block of a larger micro-batch. With `share_prompt`, the rows also carry
  `branch_ids` (the layout in the module docstring).
  """
  n = len(rows)
  assert n % micro_rows == 0, (n, micro_rows)
  a_count, num_pairs = n // micro_rows, micro_rows * pairs_per_row
  tokens, positions, segment_ids, loss_mask = (
      np.zeros((n, pack_size), np.int32) for _ in range(4))
  sequence_ids = np.full((n, pack_size), -1, np.int32)
  branch_ids = np.zeros((n, pack_size), np.int32)
  pair_mask = np.zeros((a_count, num_pairs), np.float32)
  pair_index = np.full((a_count, num_pairs), -1, np.int32)
  rewards = np.zeros((a_count, num_pairs, 2), np.float32)
  for r, row in enumerate(rows):
    a, r_in = divmod(r, micro_rows)
    row = [] if row is None else row
    if len(row) > pairs_per_row:
      raise ValueError(f"row {r} holds {len(row)} pairs, more than {pairs_per_row}")
    offset = 0
    for j, index in enumerate(row):
      pair = fetch(int(index))
      slot = r_in * pairs_per_row + j
      prompt, seq0 = pair["prompt_len"], 2 * ((row_offset + r_in) * pairs_per_row + j)
      sides = ("chosen", "rejected")
      # Pieces (ids, first position, segment, branch, sequence id, first target or None).
      if share_prompt:
        if not np.array_equal(pair["chosen"][:prompt], pair["rejected"][:prompt]):
          raise ValueError(f"line {pair.get('line')}: chosen and rejected do not start with "
                           f"the same {prompt} prompt tokens; data.share_prompt needs them")
        shared = max(prompt - 1, 0)
        # The prefix once (chosen's sequence id; no targets), then a branch per side whose
        # first token is never a target (with an empty prompt, the rejected one would
        # otherwise follow the chosen response in its segment).
        pieces = [(pair["chosen"][:shared], 0, j + 1, 0, seq0, None)] + [
            (pair[name][shared:], shared, j + 1, side + 1, seq0 + side, max(prompt - shared, 1))
            for side, name in enumerate(sides)]
      else:
        pieces = [(pair[name], 0, 2 * j + side + 1, 0, seq0 + side, prompt)
                  for side, name in enumerate(sides)]
      for ids, first_position, segment, branch, sequence, first_target in pieces:
        end = offset + len(ids)
        if end > pack_size:
          raise ValueError(f"row {r} overflows pack_size={pack_size}")
        tokens[r, offset:end] = ids
        positions[r, offset:end] = first_position + np.arange(len(ids))
        segment_ids[r, offset:end] = segment
        branch_ids[r, offset:end] = branch
        sequence_ids[r, offset:end] = sequence
        if first_target is not None:
          loss_mask[r, offset + first_target:end] = 1
        offset = end
      for side, name in enumerate(sides):
        reward = pair[f"{name}_reward"]
        rewards[a, slot, side] = default_rewards[side] if reward is None else reward
      pair_mask[a, slot] = 1.0
      pair_index[a, slot] = pair.get("index", -1)
  shape = (a_count, micro_rows, pack_size)
  batch = {"tokens": tokens.reshape(shape), "positions": positions.reshape(shape),
           "segment_ids": segment_ids.reshape(shape), "loss_mask": loss_mask.reshape(shape),
           "sequence_ids": sequence_ids.reshape(shape)}
  if share_prompt:
    batch["branch_ids"] = branch_ids.reshape(shape)
  batch["pair_mask"] = pair_mask
  batch["chosen_reward"] = rewards[..., 0]
  batch["rejected_reward"] = rewards[..., 1]
  batch["pair_index"] = pair_index
  return batch
