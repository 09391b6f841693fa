"""Dropless expert compute: token copies sorted by expert and a grouped matmul.

Each token's k routed copies are sorted by expert (a stable argsort of the [N k] expert ids),
so every expert's copies are one contiguous group; the group sizes are data (a bincount), never
shapes, and no copy is ever dropped. The grouped matmul multiplies group e by expert e's
weight only:

- `ragged`: `jax.lax.ragged_dot` (XLA's grouped matmul on GPU/TPU). On CPU, XLA lowers it to
  one product over a masked [rows, E * in] input: E times the work.
- `tiles`: each group padded to a multiple of `tile` rows, so that every tile of `tile` rows
  belongs to one expert; one batched product of the [tiles, tile, in] rows with their tiles'
  expert weights (gathered: a [tiles, in, out] copy, its gradient scatter-added back). At most
  E (tile - 1) padding rows, whatever the routing.
- `scan` (the CPU default): the same tiles, one product per tile in a `lax.scan` that reads
  its expert's weight in place, and a hand-written backward that adds each tile's weight
  gradient into its expert's slice: no weight copy. 1.40x a dense MLP of the same FLOPs
  against 1.88-1.91x for `tiles` in the same runs (BUILD.md, issue 33).

Neither builds a [tokens, experts, ffn] product. `combine` un-sorts the outputs and adds each
token's k weighted copies in fp32 (in routing order, k = 0 first).

`expert_parallel`: the experts split over the mesh's `expert` axis (and the tokens over the
batch axes, `expert` included). Inside a shard_map each device sorts its token copies by
destination device, sends them with one all-to-all, runs its own experts over what it
received (sorted again by local expert), and sends the outputs back with a second
all-to-all. The send buffers hold every local copy for every destination ([ep, N k, D]): no
routing can overflow them (dropless), at ep times the bytes of an exact-size exchange.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

IMPLS = ("ragged", "tiles", "scan")


def resolve_impl(impl: str) -> str:
  if impl != "auto":
    return impl
  return "scan" if jax.default_backend() == "cpu" else "ragged"


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
  dest = jnp.where(jnp.arange(rows) < jnp.sum(sizes_E), dest, num_tiles * tile)  # Past: none.
  tile_expert = jnp.searchsorted(padded_ends, jnp.arange(num_tiles) * tile, side="right")
  return dest, jnp.minimum(tile_expert, num_experts - 1), num_tiles


def grouped_matmul(x_MxI, w_ExIxO, sizes_E, impl: str = "scan", tile: int = 32):
  """Row block e of x (sizes_E[e] rows, in order) times w[e]: [M, O]. Rows past
  sum(sizes_E) give zeros."""
  impl = resolve_impl(impl)
  if impl == "ragged":
    return jax.lax.ragged_dot(x_MxI, w_ExIxO, sizes_E)
  rows = x_MxI.shape[0]
  dest, tile_expert, num_tiles = _tile_layout(sizes_E, rows, tile)
  padded = jnp.zeros((num_tiles * tile, x_MxI.shape[1]), x_MxI.dtype).at[dest].set(
      x_MxI, unique_indices=True, mode="drop")
  x_TxRxI = padded.reshape(num_tiles, tile, -1)
  if impl == "scan":
    y_TxRxO = _tile_scan(x_TxRxI, w_ExIxO, tile_expert)
  else:
    y_TxRxO = jnp.einsum("tri,tio->tro", x_TxRxI, w_ExIxO[tile_expert])
  return y_TxRxO.reshape(num_tiles * tile, -1).at[dest].get(mode="fill", fill_value=0)


@jax.custom_vjp
def _tile_scan(x_TxRxI, w_ExIxO, tile_expert_T):
  """y[t] = x[t] @ w[tile_expert[t]], one tile at a time: no [tiles, I, O] weight copy, and
  the weight gradient adds into its expert's slice in place."""
  def body(_, xs):
    x, e = xs
    return None, x @ jax.lax.dynamic_index_in_dim(w_ExIxO, e, keepdims=False)
  return jax.lax.scan(body, None, (x_TxRxI, tile_expert_T))[1]


def _tile_scan_fwd(x, w, e):
  return _tile_scan(x, w, e), (x, w, e)


def _tile_scan_bwd(res, dy_TxRxO):
  x, w, e_T = res
  acc = jnp.promote_types(w.dtype, jnp.float32)  # An expert's tiles add up in fp32 at least.

  def body(dw, xs):
    x_t, dy_t, e = xs
    w_e = jax.lax.dynamic_index_in_dim(w, e, keepdims=False)
    add = jax.lax.dynamic_index_in_dim(dw, e, keepdims=False) + jnp.matmul(
        x_t.T, dy_t, preferred_element_type=acc)
    return jax.lax.dynamic_update_index_in_dim(dw, add, e, 0), dy_t @ w_e.T

  dw, dx = jax.lax.scan(body, jnp.zeros(w.shape, acc), (x, dy_TxRxO, e_T))
  return dx, dw.astype(w.dtype), np.zeros(e_T.shape, jax.dtypes.float0)


_tile_scan.defvjp(_tile_scan_fwd, _tile_scan_bwd)


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


def expert_parallel(x_BxTxD, ids_BxTxK, weights_BxTxK, expert_params, ffn, mesh,
                    num_experts: int, batch_axes=("data", "fsdp", "expert")):
  """The routed experts' output [B, T, D] with the experts split over `mesh`'s `expert` axis.

  `expert_params`: a tuple of [E, ...] arrays (each device gets its E / ep experts);
  `ffn(xs_MxD, local_ids_M, sizes_El, *local_params)`: the experts over rows sorted by local
  expert (rows past sum(sizes) are padding; their outputs are never read).
  """
  ep = mesh.shape["expert"]
  if num_experts % ep:
    raise ValueError(f"model.moe.num_experts={num_experts} is not a multiple of "
                     f"mesh.expert={ep}")
  sizes = dict(mesh.shape)
  rows = tuple(a for a in batch_axes if sizes.get(a, 1) > 1)
  if "expert" not in rows or x_BxTxD.shape[0] % math.prod(sizes[a] for a in rows):
    raise ValueError(f"expert parallelism: {x_BxTxD.shape[0]} rows do not split over the "
                     f"mesh's batch axes {rows}")
  local_experts = num_experts // ep
  top_k = ids_BxTxK.shape[-1]

  def local(x, ids, weights, *params):
    d = x.shape[-1]
    x_NxD, flat = x.reshape(-1, d), ids.reshape(-1)
    copies = flat.shape[0]
    order = jnp.argsort(flat, stable=True)
    sorted_ids = flat[order]
    device = sorted_ids // local_experts
    counts = jnp.bincount(device, length=ep)
    slot = jnp.arange(copies) - (jnp.cumsum(counts) - counts)[device]
    send = jnp.zeros((ep, copies, d), x.dtype).at[device, slot].set(x_NxD[order // top_k])
    send_ids = jnp.full((ep, copies), local_experts, jnp.int32).at[device, slot].set(
        (sorted_ids % local_experts).astype(jnp.int32))
    recv = jax.lax.all_to_all(send, "expert", 0, 0)  # [source device, slot, D].
    recv_ids = jax.lax.all_to_all(send_ids, "expert", 0, 0).reshape(-1)
    order2 = jnp.argsort(recv_ids, stable=True)  # Padding (id local_experts) last.
    sizes2 = jnp.bincount(recv_ids, length=local_experts).astype(jnp.int32)
    y_sorted = ffn(recv.reshape(-1, d)[order2],
                   jnp.minimum(recv_ids[order2], local_experts - 1), sizes2, *params)
    y = y_sorted[jnp.argsort(order2)].reshape(ep, copies, d)
    back = jax.lax.all_to_all(y, "expert", 0, 0)  # [destination device, slot, D].
    out_sorted = back[device, slot]
    return combine(out_sorted, order, weights.reshape(-1, top_k)).astype(x.dtype).reshape(
        x.shape)

  row_spec = P(rows, None, None)
  param_specs = tuple(P("expert", *([None] * (p.ndim - 1))) for p in expert_params)
  return jax.shard_map(local, mesh=mesh, in_specs=(row_spec, row_spec, row_spec) + param_specs,
                       out_specs=row_spec, check_vma=False)(
      x_BxTxD, ids_BxTxK, weights_BxTxK, *expert_params)
