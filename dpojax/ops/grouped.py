"""Dropless expert compute: token copies sorted by expert and a grouped matmul.

Each token's k routed copies are sorted by expert (a stable argsort of the [N k] expert ids),
so every expert's copies are one contiguous group; the group sizes are data (a bincount), never
shapes, and no copy is ever dropped. The grouped matmul multiplies group e by expert e's
weight only:

- `ragged`: `jax.lax.ragged_dot` (XLA's grouped matmul on GPU/TPU). On CPU, XLA lowers it to
  one product over a masked [rows, E * in] input: E times the work.
- `tiles`: each group padded to a multiple of `tile` rows, so that every tile of `tile` rows
  belongs to one expert; one batched product of the [tiles, tile, in] rows with their tiles'
  expert weights. At most E (tile - 1) padding rows, whatever the routing.

Neither builds a [tokens, experts, ffn] product. `combine` un-sorts the outputs and adds each
token's k weighted copies in fp32 (in routing order, k = 0 first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("ragged", "tiles")


def resolve_impl(impl: str) -> str:
  if impl != "auto":
    return impl
  return "tiles" if jax.default_backend() == "cpu" else "ragged"


def sort_by_expert(expert_ids_NxK, num_experts: int):
  """(order [N k]: the copies sorted by expert, stable; group sizes [E] int32)."""
  flat = expert_ids_NxK.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return order, sizes


def _tile_layout(sizes_E, rows: int, tile: int):
  """Where each sorted row goes in the padded buffer, and each tile's expert."""
  num_experts = sizes_E.shape[0]
  padded = (sizes_E + tile - 1) // tile * tile
  starts = jnp.cumsum(sizes_E) - sizes_E
  padded_ends = jnp.cumsum(padded)
  padded_starts = padded_ends - padded
  num_tiles = -(-(rows + num_experts * (tile - 1)) // tile)
  expert_of_row = jnp.repeat(jnp.arange(num_experts), sizes_E, total_repeat_length=rows)
  dest = padded_starts[expert_of_row] + jnp.arange(rows) - starts[expert_of_row]
  tile_expert = jnp.searchsorted(padded_ends, jnp.arange(num_tiles) * tile, side="right")
  return dest, jnp.minimum(tile_expert, num_experts - 1), num_tiles


def grouped_matmul(x_MxI, w_ExIxO, sizes_E, impl: str = "tiles", tile: int = 32):
  """Row block e of x (sizes_E[e] rows, in order) times w[e]: [M, O]. Rows past
  sum(sizes_E) give zeros."""
  impl = resolve_impl(impl)
  if impl == "ragged":
    return jax.lax.ragged_dot(x_MxI, w_ExIxO, sizes_E)
  rows = x_MxI.shape[0]
  dest, tile_expert, num_tiles = _tile_layout(sizes_E, rows, tile)
  padded = jnp.zeros((num_tiles * tile, x_MxI.shape[1]), x_MxI.dtype).at[dest].set(
      x_MxI, unique_indices=True, mode="drop")
  y_TxRxO = jnp.einsum("tri,tio->tro", padded.reshape(num_tiles, tile, -1),
                       w_ExIxO[tile_expert])
  return y_TxRxO.reshape(num_tiles * tile, -1)[dest]


def expert_rows(w_ExO, order, expert_ids_NxK):
  """Per sorted row, its expert's row of a per-expert vector (biases): [N k, O]."""
  return w_ExO[expert_ids_NxK.reshape(-1)[order]]


def gather_sorted(x_NxD, order, top_k: int):
  """The token copies in sorted order: [N k, D]."""
  return x_NxD[order // top_k]


def combine(y_MxD, order, weights_NxK):
  """Un-sorts the [N k, D] expert outputs and adds each token's k copies, weighted: [N, D]
  in float32 (at least)."""
  n, k = weights_NxK.shape
  inverse = jnp.argsort(order)
  acc = jnp.promote_types(y_MxD.dtype, jnp.float32)
  y_NxKxD = y_MxD[inverse].reshape(n, k, -1).astype(acc)
  return jnp.einsum("nkd,nk->nd", y_NxKxD, weights_NxK.astype(acc))
