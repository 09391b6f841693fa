"""Attention over a row whose tokens are split over the mesh's `context` axis.

The layout (`mirrored_order`): a row of T tokens is cut into 2C chunks of S = T / 2C tokens;
device d of the C on the axis holds chunks d and 2C-1-d, in that order. A causal row's work
then evens out: chunk d's queries see d + 1 key chunks, chunk 2C-1-d's see 2C - d, so every
device computes the work of 2C + 1 (query chunk, key chunk) pairs (`block_work` counts it).
train/sharding.py applies the layout where the batch is placed; positions travel with the
tokens, so RoPE, segments, windows and branches need nothing else.

The exchange is an all-gather of K/V over the axis (not a ring): inside a `shard_map`, each
device gathers the T keys and values of its rows and heads ([B, T, G, K] per layer, transient:
the custom backward gathers them again instead of saving them) and runs a flash-style loop
over blocks of at most BLOCK queries by as many keys (blocks never straddle two chunks), with
an online softmax. A block whose mask has no True entry (causal order, same segment,
shared-prompt branch, sliding window) is skipped by a `lax.cond`, so packed rows skip the
blocks with no shared segment. The backward recomputes each block's probabilities from the saved
log-sum-exp, accumulates dK/dV for all T keys and reduce-scatters them to their owners.
Saved per layer: q, k, v, out (the device's own T / C tokens) and the [B, N, T / C] lse.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "context"


def context_size(mesh) -> int:
  """The size of `mesh`'s context axis (1 without a mesh or without the axis)."""
  return 1 if mesh is None else dict(mesh.shape).get(AXIS, 1)


def mirrored_order(t: int, c: int) -> np.ndarray:
  """[T]: the original token index at each slot of the load-balanced layout (device d's
  T / C slots hold chunks d and 2C-1-d). T must be a multiple of 2C."""
  if t % (2 * c):
    raise ValueError(f"a row of {t} tokens does not split into 2 x {c} context chunks")
  s = t // (2 * c)
  chunks = [i for d in range(c) for i in (d, 2 * c - 1 - d)]
  return np.concatenate([np.arange(i * s, (i + 1) * s) for i in chunks]).astype(np.int32)


@flax.struct.dataclass
class ContextMask:
  """The mask as the context path takes it: causal (in original token order) AND same
  segment AND (with branches) prefix-or-own-branch AND (window > 0) within `window`
  positions, from [B, T] arrays in the layout's order. `mesh` (static): the step's mesh."""
  ids_BxT: jax.Array
  positions_BxT: jax.Array
  branch_ids_BxT: Any = None
  window: Any = 0  # An int, or an int32 array when the layers pick theirs in the scan.
  mesh: Any = flax.struct.field(pytree_node=False, default=None)


def _block_mask(q_meta, k_meta, window):
  """[B, Sq, Sk]: the dense `attention_mask`'s entries for one block (see ContextMask)."""
  (qi, qp, qb, qo), (ki, kp, kb, ko) = q_meta, k_meta
  mask = (qo[:, None] >= ko[None, :])[None] & (qi[:, :, None] == ki[:, None, :])
  if qb is not None:
    mask &= (kb[:, None, :] == 0) | (kb[:, None, :] == qb[:, :, None])
  return mask & ((window <= 0) | (qp[:, :, None] - kp[:, None, :] < window))


def _slice(x, j, s, axis=1):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, j * s, s, axis)


def _keys(meta_all, j, s):
  ids, pos, br, order = meta_all
  return _slice(ids, j, s), _slice(pos, j, s), _slice(br, j, s), _slice(order, j, s, 0)


BLOCK = 512  # Largest (query block, key block) side: scores are [B, N, BLOCK, BLOCK] at most.


def block_size(s: int) -> int:
  """The block side for chunks of S tokens: the largest divisor of S up to BLOCK, so that
  blocks never straddle two chunks (the mirror's balance holds block by block)."""
  return max(d for d in range(1, min(s, BLOCK) + 1) if s % d == 0)


def _logits(q_h, k_j, scale, cap):
  """[B, G, R, Sq, Sk] scaled (and softcapped) logits in at least fp32."""
  f32 = jnp.promote_types(q_h.dtype, jnp.float32)
  z = jnp.einsum("bqgrk,bsgk->bgrqs", q_h, k_j, preferred_element_type=f32) * scale
  return cap * jnp.tanh(z / cap) if cap else z


def _gather(x, axis):
  return None if x is None else jax.lax.all_gather(x, AXIS, axis=axis, tiled=True)


def _gather_meta(meta):
  ids, pos, br, order = meta
  return _gather(ids, 1), _gather(pos, 1), _gather(br, 1), _gather(order, 0)


def _sizes(q, k, c):
  """(B, 2S, N, K, G, R, block, query blocks, key blocks) of one device's operands."""
  b, tc, n, kd = q.shape
  g = k.shape[2]
  bs = block_size(tc // 2)
  return b, tc, n, kd, g, n // g, bs, tc // bs, c * tc // bs


def _local_fwd(q, k, v, meta, window, c, scale, cap):
  """One device's queries [B, 2S, N, K] over the gathered keys of its rows (see module doc):
  (out [B, 2S, N, K], lse [B, 2S, N] in at least fp32). Blocks of `block_size` queries by
  as many keys, the empty ones skipped."""
  b, tc, n, kd, g, r, bs, nq, nk = _sizes(q, k, c)
  f32 = jnp.promote_types(q.dtype, jnp.float32)
  neg = jnp.asarray(0.7 * jnp.finfo(f32).min, f32)
  k_all, v_all, meta_all = _gather(k, 1), _gather(v, 1), _gather_meta(meta)
  q5 = q.reshape(b, tc, g, r, kd)

  def query_block(i, carry):
    out, lse = carry
    q_i, q_meta = _slice(q5, i, bs), _keys(meta, i, bs)

    def key_block(j, carry):
      mask = _block_mask(q_meta, _keys(meta_all, j, bs), window)[:, None, None]

      def compute(carry):
        m, l, acc = carry
        z = jnp.where(mask, _logits(q_i, _slice(k_all, j, bs), scale, cap), neg)
        m_new = jnp.maximum(m, jnp.max(z, -1))
        p = jnp.where(mask, jnp.exp(z - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[..., None] + jnp.einsum(
            "bgrqs,bsgk->bgrqk", p, _slice(v_all, j, bs).astype(f32))
        return m_new, l * alpha + jnp.sum(p, -1), acc

      return jax.lax.cond(jnp.any(mask), compute, lambda carry: carry, carry)

    shape = (b, g, r, bs)
    m, l, acc = jax.lax.fori_loop(0, nk, key_block, (
        jnp.full(shape, neg), jnp.zeros(shape, f32), jnp.zeros(shape + (kd,), f32)))
    o_i = (acc / l[..., None]).transpose(0, 3, 1, 2, 4)  # Every query sees itself: l > 0.
    put = lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, i * bs, 1)
    return put(out, o_i), put(lse, (m + jnp.log(l)).transpose(0, 3, 1, 2))

  out, lse = jax.lax.fori_loop(0, nq, query_block, (jnp.zeros(q5.shape, f32),
                                                    jnp.zeros((b, tc, g, r), f32)))
  return out.reshape(b, tc, n, kd).astype(q.dtype), lse.reshape(b, tc, n)


def _local_bwd(q, k, v, meta, window, out, lse, d_out, c, scale, cap):
  """dq, dk, dv of one device's rows: dK/dV of all T keys, reduce-scattered to their owners."""
  b, tc, n, kd, g, r, bs, nq, nk = _sizes(q, k, c)
  f32 = lse.dtype
  k_all, v_all, meta_all = _gather(k, 1), _gather(v, 1), _gather_meta(meta)
  q5, do5 = q.reshape(b, tc, g, r, kd), d_out.reshape(b, tc, g, r, kd).astype(f32)
  delta = jnp.sum(do5 * out.reshape(do5.shape).astype(f32), -1)  # rowsum(dO * O), [B, 2S, G, R]
  lse4 = lse.reshape(b, tc, g, r)

  def query_block(i, carry):
    dq, dk_all, dv_all = carry
    q_i, do_i, q_meta = _slice(q5, i, bs), _slice(do5, i, bs), _keys(meta, i, bs)
    lse_i, delta_i = (_slice(x, i, bs).transpose(0, 2, 3, 1) for x in (lse4, delta))

    def key_block(j, carry):
      mask = _block_mask(q_meta, _keys(meta_all, j, bs), window)[:, None, None]

      def compute(carry):
        dq_i, dk_all, dv_all = carry
        k_j, v_j = _slice(k_all, j, bs), _slice(v_all, j, bs).astype(f32)
        z = _logits(q_i, k_j, scale, cap)
        p = jnp.where(mask, jnp.exp(z - lse_i[..., None]), 0.0)
        ds = p * (jnp.einsum("bqgrk,bsgk->bgrqs", do_i, v_j) - delta_i[..., None])
        if cap:  # Through the tanh: times 1 - (capped / cap)^2.
          ds = ds * (1 - jnp.square(z / cap))
        ds = ds * scale
        dq_i = dq_i + jnp.einsum("bgrqs,bsgk->bqgrk", ds, k_j.astype(f32))
        add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(
            acc, _slice(acc, j, bs) + x, j * bs, 1)
        dk_all = add(dk_all, jnp.einsum("bgrqs,bqgrk->bsgk", ds, q_i.astype(f32)))
        dv_all = add(dv_all, jnp.einsum("bgrqs,bqgrk->bsgk", p, do_i))
        return dq_i, dk_all, dv_all

      return jax.lax.cond(jnp.any(mask), compute, lambda carry: carry, carry)

    dq_i, dk_all, dv_all = jax.lax.fori_loop(0, nk, key_block,
                                             (jnp.zeros(q_i.shape, f32), dk_all, dv_all))
    return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bs, 1), dk_all, dv_all

  dq, dk_all, dv_all = jax.lax.fori_loop(0, nq, query_block, (
      jnp.zeros(q5.shape, f32), jnp.zeros(k_all.shape, f32), jnp.zeros(v_all.shape, f32)))
  scatter = lambda x: jax.lax.psum_scatter(x, AXIS, scatter_dimension=1, tiled=True)
  return (dq.reshape(b, tc, n, kd).astype(q.dtype), scatter(dk_all).astype(k.dtype),
          scatter(dv_all).astype(v.dtype))


def attention(q_BxTxNxK, k_BxTxGxK, v_BxTxGxK, mask: ContextMask, scale: float | None = None,
              softcap: float = 0.0, batch_axes=("data", "fsdp"), head_axis="tensor"):
  """Softmax attention of a row split over the context axis (layout: `mirrored_order`): [B,
  T, N, K] in the layout's order. A shard_map, manual over the context axis, the `batch_axes`
  that divide B and `head_axis` where it divides N and G. `scale`: None = K^-1/2; `softcap`
  > 0: logits become softcap * tanh(l / softcap)."""
  mesh = mask.mesh
  sizes = dict(mesh.shape)
  c = sizes[AXIS]
  b, t, n, kd = q_BxTxNxK.shape
  rows = tuple(a for a in batch_axes if sizes.get(a, 1) > 1)
  if b % math.prod(sizes[a] for a in rows):
    rows = ()
  heads = sizes.get(head_axis, 1)
  head = head_axis if heads > 1 and not (n % heads or k_BxTxGxK.shape[2] % heads) else None
  manual = set(rows) | {AXIS} | ({head} if head else set())
  qkv, row = P(rows or None, AXIS, head, None), P(rows or None, AXIS)
  order = jnp.asarray(mirrored_order(t, c))
  branch = mask.branch_ids_BxT
  meta = (mask.ids_BxT.astype(jnp.int32), mask.positions_BxT.astype(jnp.int32),
          None if branch is None else branch.astype(jnp.int32), order)
  meta_specs = (row, row, None if branch is None else row, P(AXIS))
  window = jnp.asarray(mask.window, jnp.int32).reshape(1)
  specs = (qkv, qkv, qkv, meta_specs, P())
  args = (q_BxTxNxK, k_BxTxGxK, v_BxTxGxK, meta, window)
  if any(x == jax.sharding.AxisType.Explicit for x in mesh.axis_types):
    # Explicit meshes do not reshard into shard_map implicitly (Auto ones do).
    args = jax.tree.map(lambda x, spec: jax.reshard(x, NamedSharding(mesh, spec)), args, specs)
  scale, cap = float(kd ** -0.5 if scale is None else scale), float(softcap or 0.0)
  # The custom gradient wraps the two shard_maps, and each body is opaque to partial
  # evaluation (a checkpoint that saves nothing): under the layer scan's autodiff, JAX hoists
  # what depends only on loop-invariant operands (the masks of the ids, positions and
  # window, the same in every layer) out of the scan, and without the checkpoint it stacked
  # every block's [B, N, S, S] mask and select constants in front of the loop (5x the memory
  # at T = 8192, C = 8).
  lse_spec = P(rows or None, AXIS, head)
  sharded = lambda fn, in_specs, out_specs: jax.shard_map(
      fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=manual, check_vma=False)
  opaque = lambda fn: jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
  fwd_local = sharded(opaque(lambda q, k, v, meta, win: _local_fwd(q, k, v, meta, win[0], c,
                                                                   scale, cap)),
                      specs, (qkv, lse_spec))
  bwd_local = sharded(
      opaque(lambda q, k, v, meta, win, out, lse, do: _local_bwd(q, k, v, meta, win[0], out, lse,
                                                                 do, c, scale, cap)),
      specs + (qkv, lse_spec, qkv), (qkv, qkv, qkv))

  @jax.custom_vjp
  def run(q, k, v, meta, win):
    return fwd_local(q, k, v, meta, win)[0]

  def run_fwd(q, k, v, meta, win):
    out, lse = fwd_local(q, k, v, meta, win)
    return out, (q, k, v, meta, win, out, lse)

  def run_bwd(res, d_out):
    return bwd_local(*res, d_out) + (None, None)

  run.defvjp(run_fwd, run_bwd)
  return run(*args)


def block_work(segment_ids_BxT, positions_BxT, c: int, branch_ids_BxT=None, window: int = 0):
  """What each device of the axis computes for these rows (already in the layout's order),
  as the kernel decides it: ([C] computed (query block, key block) pairs, [C] True mask
  entries, i.e. query-key products that count). NumPy, for measuring the load balance."""
  ids, pos = np.asarray(segment_ids_BxT), np.asarray(positions_BxT)
  br = None if branch_ids_BxT is None else np.asarray(branch_ids_BxT)
  t = ids.shape[1]
  bs, order = block_size(t // (2 * c)), mirrored_order(t, c)
  meta = lambda i: (ids[:, i * bs:(i + 1) * bs], pos[:, i * bs:(i + 1) * bs],
                    None if br is None else br[:, i * bs:(i + 1) * bs],
                    order[i * bs:(i + 1) * bs])
  per_device = t // c // bs
  blocks, entries = np.zeros(c, np.int64), np.zeros(c, np.int64)
  for d in range(c):
    for i in range(d * per_device, (d + 1) * per_device):
      for j in range(t // bs):
        mask = np.asarray(_block_mask(meta(i), meta(j), window))
        blocks[d] += bool(mask.any())
        entries[d] += int(mask.sum())
  return blocks, entries
