"""Block-sparse softmax attention in plain XLA ops: the CPU path for packed rows.

A packed row holds several sequences, and causal tiling still computes every key tile before
the diagonal, most of them other sequences' (about 5x the needed work for HH-RLHF pairs in rows
of 1024). Here rows are cut into tiles of `block` tokens and only the (query tile, key tile)
pairs whose mask has a True entry are computed. The pairs of the whole micro-batch are listed
once per forward (`tile_pairs`, static length B * nt^2, sorted by query tile; the mask may be
any layout: segments, shared-prompt branches, padding) and a while loop runs `chunk` of them
at a time, stopping after the last needed one, so the work follows the data while every shape
stays static. Each chunk gathers its query, key and value tiles, and an online softmax
(running max and sum per query, rescaled when the max grows) scatters into per-query
accumulators; the backward pass (flash-attention style, from the saved output and
log-sum-exp) runs the same chunks. Queries with no key to attend (padding) give 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def tile_pairs(mask_BxTxS, block: int):
  """The (query tile, key tile) pairs to compute: ([P] query tile, [P] key tile, count).

  Tiles are numbered across the batch (row b's tile i is b * nt + i); the P = B * nt^2 slots
  past `count` hold query tile B * nt (a scratch tile) and key tile 0."""
  b, t, s = mask_BxTxS.shape
  nt = t // block
  need_BxIxJ = jnp.any(mask_BxTxS.reshape(b, nt, block, nt, block), axis=(2, 4))
  count = jnp.sum(need_BxIxJ, dtype=jnp.int32)
  row, qi, kj = jnp.nonzero(need_BxIxJ, size=b * nt * nt, fill_value=-1)
  valid = row >= 0
  q_tile = jnp.where(valid, row * nt + qi, b * nt).astype(jnp.int32)
  k_tile = jnp.where(valid, row * nt + kj, 0).astype(jnp.int32)
  return q_tile, k_tile, count


def attention(q_BxTxNxK, k_BxTxGxK, v_BxTxGxK, mask_BxTxS, pairs, block: int,
              chunk: int = 32):
  """Softmax attention over the pairs of `tile_pairs(mask, block)`; T a multiple of block.

  GQA when N is a multiple of G. fp32 accumulation; the output has q's dtype."""
  b, t, n, kd = q_BxTxNxK.shape
  g = k_BxTxGxK.shape[2]
  nt = t // block
  tiles = lambda x: x.reshape(b * nt, block, *x.shape[2:])
  q = tiles(q_BxTxNxK).reshape(b * nt, block, g, n // g, kd)
  # Mask tiles [B * nt, block, nt, block]: a pair (i, j) reads [i, :, j % nt, :].
  mask = mask_BxTxS.reshape(b * nt, block, nt, block)
  q_tile, k_tile, count = pairs
  extra = -len(q_tile) % chunk  # Whole chunks: a clamped dynamic slice would repeat pairs.
  q_tile = jnp.pad(q_tile, (0, extra), constant_values=b * nt)
  k_tile = jnp.pad(k_tile, (0, extra))
  o = _attention(q, tiles(k_BxTxGxK), tiles(v_BxTxGxK), mask, q_tile, k_tile, count, chunk)
  return o.reshape(b, t, n, kd)


def _chunk(q, k, mask, q_tile, k_tile, i, chunk):
  """Chunk i's pair indices, gathered tiles and scaled, masked fp32 scores [C, Tq, G, R, Tk]."""
  qi = jax.lax.dynamic_slice_in_dim(q_tile, i * chunk, chunk)
  kj = jax.lax.dynamic_slice_in_dim(k_tile, i * chunk, chunk)
  nq = q.shape[0]
  # Query tile nq (the scratch slot) reads tile 0's values; its mask is all False.
  q_c, k_c = q[jnp.minimum(qi, nq - 1)], k[kj]
  m_c = mask[jnp.minimum(qi, nq - 1), :, kj % mask.shape[2], :] & (qi < nq)[:, None, None]
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("cqgrk,cigk->cqgri", q_c, k_c, preferred_element_type=jnp.float32) * scale
  return qi, kj, q_c, k_c, m_c[:, :, None, None, :], s


_MASKED = -1e30  # Finite: max and exp stay NaN-free for queries with nothing to attend.


def _forward(q, k, v, mask, q_tile, k_tile, count, chunk):
  nq, block, g, r, kd = q.shape
  f32 = jnp.float32
  m0 = jnp.full((nq + 1, block, g, r), _MASKED, f32)  # Row nq: the scratch tile.
  l0 = jnp.zeros((nq + 1, block, g, r), f32)
  acc0 = jnp.zeros((nq + 1, block, g, r, kd), f32)

  def body(i, carry):
    m, l, acc = carry
    qi, kj, _, _, m_c, s = _chunk(q, k, mask, q_tile, k_tile, i, chunk)
    s = jnp.where(m_c, s, _MASKED)
    m_old = m[qi]
    m = m.at[qi].max(jnp.max(s, -1))
    m_new = m[qi]
    alpha = jnp.exp(m_old - m_new)  # The same for every pair of one query tile: set is safe.
    l = l.at[qi].set(l[qi] * alpha)
    acc = acc.at[qi].set(acc[qi] * alpha[..., None])
    p = jnp.where(m_c, jnp.exp(s - m_new[..., None]), 0.0)
    l = l.at[qi].add(jnp.sum(p, -1))
    acc = acc.at[qi].add(jnp.einsum("cqgri,cigk->cqgrk", p, v[kj].astype(f32)))
    return m, l, acc

  n_chunks = (count + chunk - 1) // chunk
  m, l, acc = jax.lax.fori_loop(0, n_chunks, body, (m0, l0, acc0))
  m, l, acc = m[:nq], l[:nq], acc[:nq]
  seen = l > 0
  o = acc / jnp.where(seen, l, 1.0)[..., None]
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
  return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, mask, q_tile, k_tile, count, chunk):
  o, _ = _forward(q, k, v, mask, q_tile, k_tile, count, chunk)
  return o.astype(q.dtype)


def _attention_fwd(q, k, v, mask, q_tile, k_tile, count, chunk):
  o, lse = _forward(q, k, v, mask, q_tile, k_tile, count, chunk)
  o = o.astype(q.dtype)
  return o, (q, k, v, mask, q_tile, k_tile, count, o, lse)


def _attention_bwd(chunk, res, do):
  q, k, v, mask, q_tile, k_tile, count, o, lse = res
  f32 = jnp.float32
  nq = q.shape[0]
  pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x[:1])])  # The scratch tile's slot.
  do32, lse = pad(do.astype(f32)), pad(lse)
  delta = jnp.sum(do32 * pad(o.astype(f32)), -1)  # rowsum(dO * O): [nq + 1, Tq, G, R]
  scale = q.shape[-1] ** -0.5

  def body(i, carry):
    dq, dk, dv = carry
    qi, kj, q_c, k_c, m_c, s = _chunk(q, k, mask, q_tile, k_tile, i, chunk)
    p = jnp.where(m_c, jnp.exp(jnp.where(m_c, s, _MASKED) - lse[qi][..., None]), 0.0)
    do_c = do32[qi]
    dp = jnp.einsum("cqgrk,cigk->cqgri", do_c, v[kj].astype(f32))
    ds = p * (dp - delta[qi][..., None]) * scale
    dq = dq.at[qi].add(jnp.einsum("cqgri,cigk->cqgrk", ds, k_c.astype(f32)))
    dk = dk.at[kj].add(jnp.einsum("cqgri,cqgrk->cigk", ds, q_c.astype(f32)))
    dv = dv.at[kj].add(jnp.einsum("cqgri,cqgrk->cigk", p, do_c))
    return dq, dk, dv

  dq0 = jnp.zeros((nq + 1,) + q.shape[1:], f32)
  n_chunks = (count + chunk - 1) // chunk
  dq, dk, dv = jax.lax.fori_loop(0, n_chunks, body, (dq0, jnp.zeros(k.shape, f32),
                                                     jnp.zeros(v.shape, f32)))
  return (dq[:nq].astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None,
          None)


_attention.defvjp(_attention_fwd, _attention_bwd)
