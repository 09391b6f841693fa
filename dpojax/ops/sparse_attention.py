"""Block-sparse softmax attention in plain XLA ops: the CPU path for packed rows.

A packed row holds several sequences, and causal tiling still computes every key tile before
the diagonal, most of them other sequences' (several times the needed work for HH-RLHF pairs
in rows of 1024). Here rows are cut into tiles of `block` tokens and only the (query tile, key tile)
pairs whose mask has a True entry are computed. The pairs of the whole micro-batch are listed
once per forward (`tile_pairs`, static length B * nt^2 in whole chunks, sorted by query tile;
the mask may be any layout: segments, shared-prompt branches, padding) and a while loop runs
`chunk` of them at a time, stopping after the last needed one, so the work follows the data
while every shape stays static. Each chunk gathers its query, key and value tiles, and an
online softmax (running max and sum per query, rescaled when the max grows) scatters into
per-query accumulators; the backward pass (flash-attention style, from the saved output and
log-sum-exp) runs the same chunks. Queries with no key to attend (padding) give 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


CHUNK = 32  # Pairs per loop iteration (16 to 128 time the same on CPU).


def tile_pairs(mask_BxTxS, block: int, chunk: int = CHUNK):
  """The (query tile, key tile) pairs to compute: ([P] query tile, [P] key tile, count).

  Tiles are numbered across the batch (row b's tile i is b * nt + i); P is B * nt^2 rounded
  up to whole chunks (a clamped dynamic slice would repeat pairs), and the slots past `count`
  hold tile B * nt on both sides: a scratch tile that is never read."""
  b, t, s = mask_BxTxS.shape
  nt = t // block
  need_BxIxJ = jnp.any(mask_BxTxS.reshape(b, nt, block, nt, block), axis=(2, 4))
  count = jnp.sum(need_BxIxJ, dtype=jnp.int32)
  row, qi, kj = jnp.nonzero(need_BxIxJ, size=-(-b * nt * nt // chunk) * chunk, fill_value=-1)
  valid = row >= 0
  q_tile = jnp.where(valid, row * nt + qi, b * nt).astype(jnp.int32)
  k_tile = jnp.where(valid, row * nt + kj, b * nt).astype(jnp.int32)
  return q_tile, k_tile, count


def attention(q_BxTxNxK, k_BxTxGxK, v_BxTxGxK, mask_BxTxS, pairs, block: int,
              chunk: int = CHUNK):
  """Softmax attention over the pairs of `tile_pairs(mask, block, chunk)`; T a multiple of
  block.

  GQA when N is a multiple of G. Accumulates in fp32 or q's dtype if wider; the output has
  q's dtype."""
  b, t, n, kd = q_BxTxNxK.shape
  g = k_BxTxGxK.shape[2]
  nt = t // block
  tiles = lambda x: x.reshape(b * nt, block, *x.shape[2:])
  q = tiles(q_BxTxNxK).reshape(b * nt, block, g, n // g, kd)
  # Mask tiles [B * nt, block, nt, block]: a pair (i, j) reads [i, :, j % nt, :].
  mask = mask_BxTxS.reshape(b * nt, block, nt, block)
  q_tile, k_tile, count = pairs
  assert len(q_tile) % chunk == 0, (len(q_tile), chunk)  # tile_pairs with the same chunk.
  o = _attention(q, tiles(k_BxTxGxK), tiles(v_BxTxGxK), mask, q_tile, k_tile, count, chunk)
  return o.reshape(b, t, n, kd)


def _acc_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


def _chunk(q, k, v, mask, q_tile, k_tile, i, chunk):
  """Chunk i's pair indices, its query, key and value tiles (zeros for scratch pairs, so
  their products are exact zeros whatever the inputs hold), mask [C, Tq, 1, 1, Tk] and
  scaled scores [C, Tq, G, R, Tk] in the accumulation dtype."""
  qi = jax.lax.dynamic_slice_in_dim(q_tile, i * chunk, chunk)
  kj = jax.lax.dynamic_slice_in_dim(k_tile, i * chunk, chunk)
  nq, acc = q.shape[0], _acc_dtype(q)
  real = qi < nq
  take = lambda x, idx: jnp.where(real.reshape((-1,) + (1,) * (x.ndim - 1)),
                                  x[jnp.minimum(idx, nq - 1)], 0)
  q_c, k_c, v_c = (take(x, idx).astype(acc) for x, idx in ((q, qi), (k, kj), (v, kj)))
  m_c = (mask[jnp.minimum(qi, nq - 1), :, jnp.minimum(kj, nq - 1) % mask.shape[2], :]
         & real[:, None, None])
  scale = q.shape[-1] ** -0.5
  s = jnp.einsum("cqgrk,cigk->cqgri", q_c, k_c) * jnp.asarray(scale, acc)
  return qi, kj, q_c, k_c, v_c, m_c[:, :, None, None, :], s


_MASKED = -1e30  # Finite: max and exp stay NaN-free for queries with nothing to attend.


def _forward(q, k, v, mask, q_tile, k_tile, count, chunk):
  nq, block, g, r, kd = q.shape
  dt = _acc_dtype(q)
  m0 = jnp.full((nq + 1, block, g, r), _MASKED, dt)  # Row nq: the scratch tile.
  l0 = jnp.zeros((nq + 1, block, g, r), dt)
  acc0 = jnp.zeros((nq + 1, block, g, r, kd), dt)

  def body(i, carry):
    m, l, acc = carry
    qi, _, _, _, v_c, m_c, s = _chunk(q, k, v, mask, q_tile, k_tile, i, chunk)
    s = jnp.where(m_c, s, _MASKED)
    m_old = m[qi]
    m = m.at[qi].max(jnp.max(s, -1))
    m_new = m[qi]
    alpha = jnp.exp(m_old - m_new)  # The same for every pair of one query tile: set is safe.
    l = l.at[qi].set(l[qi] * alpha)
    acc = acc.at[qi].set(acc[qi] * alpha[..., None])
    p = jnp.where(m_c, jnp.exp(s - m_new[..., None]), 0.0)
    l = l.at[qi].add(jnp.sum(p, -1))
    acc = acc.at[qi].add(jnp.einsum("cqgri,cigk->cqgrk", p, v_c))
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
  dt = _acc_dtype(q)
  nq = q.shape[0]
  pad = lambda x: jnp.concatenate([x, jnp.zeros_like(x[:1])])  # The scratch tile's slot.
  do_, lse = pad(do.astype(dt)), pad(lse)
  delta = jnp.sum(do_ * pad(o.astype(dt)), -1)  # rowsum(dO * O): [nq + 1, Tq, G, R]
  scale = jnp.asarray(q.shape[-1] ** -0.5, dt)

  def body(i, carry):
    dq, dk, dv = carry
    qi, kj, q_c, k_c, v_c, m_c, s = _chunk(q, k, v, mask, q_tile, k_tile, i, chunk)
    p = jnp.where(m_c, jnp.exp(jnp.where(m_c, s, _MASKED) - lse[qi][..., None]), 0.0)
    do_c = do_[qi]
    dp = jnp.einsum("cqgrk,cigk->cqgri", do_c, v_c)
    ds = p * (dp - delta[qi][..., None]) * scale
    dq = dq.at[qi].add(jnp.einsum("cqgri,cigk->cqgrk", ds, k_c))
    dk = dk.at[kj].add(jnp.einsum("cqgri,cqgrk->cigk", ds, q_c))
    dv = dv.at[kj].add(jnp.einsum("cqgri,cqgrk->cigk", p, do_c))
    return dq, dk, dv

  zeros = lambda x: jnp.zeros((nq + 1,) + x.shape[1:], dt)  # Scratch pairs write row nq.
  n_chunks = (count + chunk - 1) // chunk
  dq, dk, dv = jax.lax.fori_loop(0, n_chunks, body, (zeros(q), zeros(k), zeros(v)))
  return (dq[:nq].astype(q.dtype), dk[:nq].astype(k.dtype), dv[:nq].astype(v.dtype), None,
          None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)
