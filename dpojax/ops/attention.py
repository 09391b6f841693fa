"""Softmax attention over a mask, and the masks: dense (causal AND same segment, with
shared-prompt branches or a decoding cache), `Segments` for the flash kernel
(flash_attention.py) and `TilePairs` for the block-sparse path (sparse_attention.py).

`attend` dispatches on the mask's type; dense masks run a tiled softmax attention with its
own backward pass (`_softmax_attention`), or jax.nn.dot_product_attention in half precision.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp

from dpojax.ops import context_attention, flash_attention, sparse_attention


def attention_mask(segment_ids_BxT, branch_ids_BxT=None, positions_BxT=None, window: int = 0):
  """Causal AND same-segment mask, [B, 1, T, T]. Padding (segment 0) attends to itself only.

  With `branch_ids` (shared-prompt rows: 0 = the shared prefix, 1, 2, ... = branches after
  it), a token also needs the key to be in the prefix or in its own branch: each branch sees
  the prefix and itself, never a sibling branch.
  With `window` > 0 (sliding-window attention), a query also needs the key within `window`
  positions of its own, itself included: query position - key position < window, measured
  in `positions` (which restart per packed sequence and skip sibling branches).
  """
  t = segment_ids_BxT.shape[1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  same = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  if branch_ids_BxT is not None:
    key_BxS = branch_ids_BxT[:, None, :]
    same &= (key_BxS == 0) | (key_BxS == branch_ids_BxT[:, :, None])
  if window > 0:
    same &= positions_BxT[:, :, None] - positions_BxT[:, None, :] < window
  return (causal[None] & same)[:, None]


@flax.struct.dataclass
class Segments:
  """The mask as the flash kernel takes it: causal AND same segment (AND `window`), from [B, T]
  segment ids;
  `bounds`: flash_attention.segment_bounds of the ids (None: the kernel computes them);
  `mesh` (static): the device mesh the kernel runs per shard on (None: one device or GSPMD)."""
  ids_BxT: jax.Array
  bounds: Any = None
  mesh: Any = flax.struct.field(pytree_node=False, default=None)
  window: Any = 0  # Sliding window (0: none); an array when layers pick theirs in the scan.


@flax.struct.dataclass
class TilePairs:
  """The mask as the block-sparse path takes it (ops/sparse_attention.py): the dense mask
  without padding queries, [B, T, T], and its `tile_pairs` at `block` (static)."""
  mask_BxTxT: jax.Array
  pairs: Any
  block: int = flax.struct.field(pytree_node=False)


def cached_attention_mask(segment_ids_BxT, segment_ids_BxS, index, window: int = 0):
  """[B, 1, T, S]: query t sits in slot index + t and sees slots up to its own, same segment
  (and, with `window` > 0, fewer than `window` slots back: a row's slots are consecutive
  positions of its one sequence)."""
  t, s = segment_ids_BxT.shape[1], segment_ids_BxS.shape[1]
  slot_T = index + jnp.arange(t)
  causal_TxS = jnp.arange(s)[None, :] <= slot_T[:, None]
  if window > 0:
    causal_TxS &= slot_T[:, None] - jnp.arange(s)[None, :] < window
  same = segment_ids_BxT[:, :, None] == segment_ids_BxS[:, None, :]
  return (causal_TxS[None] & same)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _softmax_attention(q_BxGxRxTxK, k_BxGxSxK, v_BxGxSxK, mask_Bx1x1xTxS, tiles, scale, cap):
  """Head-major softmax attention; the R query heads of a KV group share its keys and values.

  `tiles`: (query start, query end, key end) per query tile (see `_query_tiles`); each tile
  attends to its keys [0, key end) only. Numerics close to jax.nn.dot_product_attention's XLA
  path (fp32 or wider inputs): logits scaled after the product, masked with the same large
  negative number, max-subtracted exponentials, normalized after the product with the values.

  Scores are kept key-major, [B, G, S, R * T]: XLA's CPU dot runs a product as YNNPACK's
  native kernel only when the first operand contracts its last axis and the second its last
  or second-last (benchmarks/dot_layouts.py), and with this layout every product of the
  forward and backward passes (S^T = K Q^T, O^T = V^T P^T, dP^T = V dO^T, dK = dS^T Q,
  dV = P^T dO, dQ^T = K^T dS^T) is one; with [.., T, S] scores XLA copied a transposed [T, S]
  tile for dK and for dV (forward+backward 18-21% slower). A row of ones under V^T makes the
  softmax's sums part of the same product. The backward pass (flash-attention style:
  dS = P (dP - rowsum(dO O))) reuses the forward's exponentials and writes each tile's
  gradients in place instead of summing zero-padded copies.

  `scale`: the logits' factor (None: K^-1/2); `cap` > 0: logits become cap * tanh(l / cap)
  before the mask (Gemma 2's attn_logit_softcapping; the backward recomputes them).
  """
  return _softmax_attention_fwd(q_BxGxRxTxK, k_BxGxSxK, v_BxGxSxK, mask_Bx1x1xTxS, tiles,
                                scale, cap)[0]


def _scaled_logits(k, q_rows, shape, scale, cap):
  """One tile's logits [B, G, S, R, Tq], scaled and (cap > 0) softcapped."""
  logits = jnp.einsum("bgsk,bgxk->bgsx", k, q_rows).reshape(shape) * scale
  return cap * jnp.tanh(logits / cap) if cap else logits


def _softmax_attention_fwd(q, k, v, mask, tiles, scale, cap):
  b, g, r, _, kd = q.shape
  rows = sparse_attention.head_rows
  scale = jnp.asarray(kd ** -0.5 if scale is None else scale, q.dtype)
  mask_t = jnp.swapaxes(mask[:, :, 0], -1, -2)[:, :, :, None, :]  # [B, 1, S, 1, T]
  v_t = jnp.swapaxes(v, -1, -2)
  v_t1 = jnp.concatenate([v_t, jnp.ones_like(v_t[..., :1, :])], axis=2)  # [B, G, K + 1, S]
  outs, probs = [], []
  for q0, q1, k1 in tiles:
    logits = _scaled_logits(k[..., :k1, :], rows(q[..., q0:q1, :]), (b, g, k1, r, q1 - q0),
                            scale, cap)  # [B, G, S, R, Tq]
    logits = jnp.where(mask_t[..., :k1, :, q0:q1], logits,
                       jnp.asarray(0.7 * jnp.finfo(q.dtype).min, q.dtype))
    e = jnp.exp(logits - jnp.max(logits, 2, keepdims=True))  # Unnormalized probabilities.
    o1 = jnp.einsum("bgks,bgsx->bgkx", v_t1[..., :k1], e.reshape(b, g, k1, -1))
    o1 = o1.reshape(b, g, kd + 1, r, q1 - q0)
    inv_sum = 1.0 / o1[:, :, kd:]  # [B, G, 1, R, Tq]
    outs.append(o1[:, :, :kd] * inv_sum)
    probs.append((e, inv_sum))
  o_t = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=4)  # [B, G, K, R, T]
  return jnp.moveaxis(o_t, 2, -1), (q, k, v, o_t, probs)


def _softmax_attention_bwd(tiles, scale, cap, res, do):
  q, k, v, o_t, probs = res
  b, g, r, _, kd = q.shape
  rows = sparse_attention.head_rows
  scale = jnp.asarray(kd ** -0.5 if scale is None else scale, q.dtype)
  k_t = jnp.swapaxes(k, -1, -2)
  rowsum = jnp.sum(jnp.moveaxis(do, -1, 2) * o_t, 2, keepdims=True)  # [B, G, 1, R, T]
  dq_tiles, dk, dv = [], jnp.zeros_like(k), jnp.zeros_like(v)
  for (q0, q1, k1), (e, inv_sum) in zip(tiles, probs):
    do_x = rows(do[..., q0:q1, :] * jnp.moveaxis(inv_sum, 2, -1))  # e stands in for P.
    dp = jnp.einsum("bgsk,bgxk->bgsx", v[..., :k1, :], do_x).reshape(e.shape)
    ds = e * (dp - rowsum[..., q0:q1] * inv_sum)
    if cap:  # Through the tanh: times 1 - (capped / cap)^2, from recomputed logits.
      capped = _scaled_logits(k[..., :k1, :], rows(q[..., q0:q1, :]), e.shape, scale, cap)
      ds = ds * (1 - jnp.square(capped / cap))
    ds = (ds * scale).reshape(b, g, k1, -1)
    dq_tiles.append(jnp.einsum("bgks,bgsx->bgkx", k_t[..., :k1], ds))
    dk = dk.at[..., :k1, :].add(jnp.einsum("bgsx,bgxk->bgsk", ds, rows(q[..., q0:q1, :])))
    dv = dv.at[..., :k1, :].add(jnp.einsum("bgsx,bgxk->bgsk", e.reshape(ds.shape), do_x))
  dq_t = jnp.concatenate([x.reshape(b, g, kd, r, -1) for x in dq_tiles], axis=4)
  return jnp.moveaxis(dq_t, 2, -1), dk, dv, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _query_tiles(t: int, s: int, block: int) -> tuple[tuple[int, int, int], ...]:
  """(query start, query end, key end) per query tile: causal ends when tiling, else one
  tile over all keys."""
  if block > 0 and t == s:
    block = max(block, -(-t // 8))  # At most 8 tiles: bounded unrolling, large tiles.
  if block <= 0 or t != s or t <= block or t % block:
    return ((0, t, s),)
  return tuple((start, start + block, start + block) for start in range(0, t, block))


def attend(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS, block: int = 0,
           scale: float | None = None, softcap: float = 0.0, sinks_N=None):
  """Softmax attention (GQA when N is a multiple of G; any boolean mask, or `Segments`).

  A `Segments` mask goes to the flash kernel (ops/flash_attention.py), `TilePairs` to the
  block-sparse path (ops/sparse_attention.py).

  With `block` > 0 and S = T (causal self-attention), queries go in tiles and tile i attends
  to keys [0, end of tile i) only: the masked-out upper triangle is never computed.
  Half-precision inputs go through jax.nn.dot_product_attention (its mixed-precision matmul
  handling); fp32 and fp64 through `_softmax_attention`.
  `scale` multiplies the logits (None: K^-1/2); `softcap` > 0 caps them to
  softcap * tanh(l / softcap). The flash kernel takes both; the block-sparse path neither
  (layer_mask gives it only layers without either). `sinks_N` (gpt-oss): a learned logit per
  query head in every softmax denominator (a boolean mask only: see `sink_attention`).
  """
  if sinks_N is not None:
    return sink_attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS, scale, sinks_N)
  if isinstance(mask_Bx1xTxS, Segments):
    return flash_attention.attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS.ids_BxT,
                                     bounds=mask_Bx1xTxS.bounds, mesh=mask_Bx1xTxS.mesh,
                                     scale=scale, window=mask_Bx1xTxS.window, softcap=softcap)
  if isinstance(mask_Bx1xTxS, context_attention.ContextMask):  # A row split over `context`.
    return context_attention.attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS, scale,
                                       softcap)
  if isinstance(mask_Bx1xTxS, TilePairs):
    return sparse_attention.attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS.mask_BxTxT,
                                      mask_Bx1xTxS.pairs, mask_Bx1xTxS.block)
  b, t, n, kd = q_BxTxNxK.shape
  s, g = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
  tiles = _query_tiles(t, s, block)
  if jnp.finfo(q_BxTxNxK.dtype).bits < 32 and not softcap:
    return jnp.concatenate([jax.nn.dot_product_attention(
        q_BxTxNxK[:, q0:q1], k_BxSxGxK[:, :k1], v_BxSxGxK[:, :k1],
        mask=mask_Bx1xTxS[:, :, q0:q1, :k1], scale=scale, implementation="xla")
                            for q0, q1, k1 in tiles], axis=1)
  if jnp.finfo(q_BxTxNxK.dtype).bits < 32:  # Softcapped half precision: fp32 logits.
    return _capped_half_attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS, scale, softcap)
  q = q_BxTxNxK.reshape(b, t, g, n // g, kd).transpose(0, 2, 3, 1, 4)  # [B, G, R, T, K]
  k, v = k_BxSxGxK.transpose(0, 2, 1, 3), v_BxSxGxK.transpose(0, 2, 1, 3)  # [B, G, S, K]
  o_BxGxRxTxK = _softmax_attention(q, k, v, mask_Bx1xTxS[:, :, None], tiles, scale,
                                   softcap or None)
  return o_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(b, t, n, kd)


def sink_attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS, scale, sinks_N):
  """Softmax over [the masked logits, the head's sink logit], the sink's probability
  dropped (gpt-oss): logits and softmax in fp32 (at least), autodiff backward, [T, S] dense."""
  b, t, n, kd = q_BxTxNxK.shape
  g = k_BxSxGxK.shape[2]
  acc = jnp.promote_types(q_BxTxNxK.dtype, jnp.float32)
  q = q_BxTxNxK.reshape(b, t, g, n // g, kd)
  logits = jnp.einsum("btgrk,bsgk->bgrts", q, k_BxSxGxK, preferred_element_type=acc)
  logits = logits * (kd ** -0.5 if scale is None else scale)
  logits = jnp.where(mask_Bx1xTxS[:, :, None], logits, 0.7 * jnp.finfo(acc).min)
  sinks = jnp.broadcast_to(sinks_N.astype(acc).reshape(1, g, n // g, 1, 1), (b, g, n // g, t, 1))
  p = jax.nn.softmax(jnp.concatenate([logits, sinks], axis=-1), axis=-1)[..., :-1]
  o = jnp.einsum("bgrts,bsgk->btgrk", p.astype(q.dtype), v_BxSxGxK)
  return o.reshape(b, t, n, kd)


def _capped_half_attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS, scale, cap):
  """Softcapped attention for 16-bit inputs: fp32 logits and softmax, autodiff backward."""
  b, t, n, kd = q_BxTxNxK.shape
  g = k_BxSxGxK.shape[2]
  q = q_BxTxNxK.reshape(b, t, g, n // g, kd)
  logits = jnp.einsum("btgrk,bsgk->bgrts", q, k_BxSxGxK, preferred_element_type=jnp.float32)
  logits = logits * (kd ** -0.5 if scale is None else scale)
  logits = cap * jnp.tanh(logits / cap)
  logits = jnp.where(mask_Bx1xTxS[:, :, None], logits, 0.7 * jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  o = jnp.einsum("bgrts,bsgk->btgrk", p, v_BxSxGxK)
  return o.reshape(b, t, n, kd)
