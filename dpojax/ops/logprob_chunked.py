"""Streaming log-probs in pure JAX: [tokens, vocab] logits exist one [bt, bv] tile at a time.

Forward: for each vocab block (outer loop) and token block (inner loop) one tile of logits
z = h @ w.T is formed in fp32; a running max m and scaled sum s give the logsumexp online, and
the target logit is picked out of the tile that holds it. Only lse [N] is saved.
Backward: the tiles are recomputed; dz = g * (onehot(target) - exp(z - lse)) feeds
dh += dz @ w_blk (fp32 [N, D]) and dw_blk += dz.T @ h_blk (fp32 [bv, D], written once per
vocab block). Nothing of size N x V or an fp32 copy of w is ever live.

Masked-out tokens (prompt, padding) are moved behind the others by a stable sort and only the
blocks holding masked-in tokens are streamed, so they cost no logits (xla computes them all).

Ragged edges never copy or pad the inputs: the last block's start is clamped to `size - block`
and the rows/columns that an earlier block already covered are masked out of it.

`vocab_offset` is where the local rows of w sit in the global vocabulary, so the same code runs
on one shard of a vocab-sharded w (see `logprob_vocab_parallel`).

`softcap` (Gemma 2's final_logit_softcapping): every tile's logits become c * tanh(z / c)
before the softmax, and the backward multiplies dz by the tanh's derivative 1 - (z_c / c)^2,
so the capped logits never exist beyond one tile either.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

TOKEN_BLOCK = 1024  # Defaults tuned on CPU (benchmarks/logprob.py); tiles are 16 MiB in fp32.
VOCAB_BLOCK = 4096
_NEG = -1e30  # Finite start for the running max, so a fully masked tile never makes NaN.


def _cdiv(a, b):
  return -(-a // b)


def _block(i, block, size):
  """Start of block i (clamped inside the array) and which of its slots are new (not covered)."""
  start = jnp.minimum(i * block, size - block)
  return start, start + jnp.arange(block) >= i * block


def _acc(dtype):
  """The accumulation dtype: float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def _logits(h_blk, w_blk):
  """[bt, bv] tile in float32 (float64 for float64 inputs); w is cast to the compute (hidden)
  dtype per block, as `xla` does."""
  return jax.lax.dot_general(h_blk, w_blk.astype(h_blk.dtype), (((1,), (1,)), ((), ())),
                             preferred_element_type=_acc(h_blk.dtype))


def softcap(z, cap):
  """c * tanh(z / c) (None or 0: z unchanged): the logit cap, applied per tile."""
  return z if not cap else cap * jnp.tanh(z / cap)


def softcap_grad(z_capped, cap):
  """d softcap(z) / dz from the capped value: 1 - (z_c / c)^2 (1 without a cap)."""
  return 1.0 if not cap else 1.0 - jnp.square(z_capped / cap)


def _sizes(n, v, token_block, vocab_block, num_tokens=None):
  """Block sizes and counts; the token-block count is traced when num_tokens is."""
  bt, bv = min(token_block, n), min(vocab_block, v)
  nt = _cdiv(n, bt) if num_tokens is None else (num_tokens + bt - 1) // bt
  return bt, bv, nt, _cdiv(v, bv)


def forward_partials(h_NxD, w_VxD, targets_N, *, token_block, vocab_block, vocab_offset=0,
                     num_tokens=None, cap=None):
  """Per token over the local vocab: running max m, sum of exp(z - m), and the target logit.

  The target logit is 0 where the target is not in this shard's vocab rows. With
  `num_tokens` (may be traced) only the blocks holding the first num_tokens tokens are
  streamed; later rows keep m = -1e30, s = 0.
  """
  n, v = h_NxD.shape[0], w_VxD.shape[0]
  bt, bv, nt, nv = _sizes(n, v, token_block, vocab_block, num_tokens)

  def vocab_step(j, carry):
    v0, col_new = _block(j, bv, v)
    w_blk = jax.lax.dynamic_slice_in_dim(w_VxD, v0, bv)
    cols = vocab_offset + v0 + jnp.arange(bv)

    def token_step(i, carry):
      m_N, s_N, tgt_N = carry
      t0, row_new = _block(i, bt, n)
      get = lambda x: jax.lax.dynamic_slice_in_dim(x, t0, bt)
      z = softcap(_logits(get(h_NxD), w_blk), cap)
      z = jnp.where(col_new[None, :], z, -jnp.inf)
      m_old, s_old, tgt_old = get(m_N), get(s_N), get(tgt_N)
      m_new = jnp.maximum(m_old, jnp.max(z, axis=1))
      s_new = s_old * jnp.exp(m_old - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
      hit = (cols[None, :] == get(targets_N)[:, None]) & col_new[None, :]
      tgt_new = tgt_old + jnp.sum(jnp.where(hit, z, 0.0), axis=1)
      # Rows an earlier token block covered keep their values (the clamped last block).
      put = lambda x, new, old: jax.lax.dynamic_update_slice_in_dim(
          x, jnp.where(row_new, new, old), t0, 0)
      return put(m_N, m_new, m_old), put(s_N, s_new, s_old), put(tgt_N, tgt_new, tgt_old)

    return jax.lax.fori_loop(0, nt, token_step, carry)

  acc = _acc(h_NxD.dtype)
  init = (jnp.full((n,), _NEG, acc), jnp.zeros((n,), acc), jnp.zeros((n,), acc))
  return jax.lax.fori_loop(0, nv, vocab_step, init)


def backward(h_NxD, w_VxD, targets_N, coef_N, lse_N, *, token_block, vocab_block,
             vocab_offset=0, num_tokens=None, cap=None):
  """Cotangents of sum(coef * (z[target] - lse)): (dh fp32 [N, D], dw [V, D] in w's dtype).

  Rows with coef == 0 (masked tokens) contribute exactly nothing; with `num_tokens`, rows
  past the blocks holding the first num_tokens are not visited (their dh is 0).
  """
  n, v = h_NxD.shape[0], w_VxD.shape[0]
  bt, bv, nt, nv = _sizes(n, v, token_block, vocab_block, num_tokens)
  cdt = h_NxD.dtype

  def vocab_step(j, carry):
    dh_NxD, dw_VxD = carry
    v0, col_new = _block(j, bv, v)
    w_blk = jax.lax.dynamic_slice_in_dim(w_VxD, v0, bv)
    cols = vocab_offset + v0 + jnp.arange(bv)

    def token_step(i, carry):
      dh_NxD, dw_blk = carry
      t0, row_new = _block(i, bt, n)
      get = lambda x: jax.lax.dynamic_slice_in_dim(x, t0, bt)
      h_blk, coef = get(h_NxD), get(coef_N)
      z = softcap(_logits(h_blk, w_blk), cap)
      p = jnp.exp(z - get(lse_N)[:, None])
      onehot = cols[None, :] == get(targets_N)[:, None]
      keep = col_new[None, :] & (row_new & (coef != 0))[:, None]
      dz = jnp.where(keep, coef[:, None] * (onehot - p) * softcap_grad(z, cap), 0.0).astype(cdt)
      dh_blk = jax.lax.dot_general(dz, w_blk.astype(cdt), (((1,), (0,)), ((), ())),
                                   preferred_element_type=_acc(cdt))
      dh_NxD = jax.lax.dynamic_update_slice_in_dim(dh_NxD, get(dh_NxD) + dh_blk, t0, 0)
      dw_blk = dw_blk + jax.lax.dot_general(dz, h_blk, (((0,), (0,)), ((), ())),
                                            preferred_element_type=_acc(cdt))
      return dh_NxD, dw_blk

    dw_blk = jnp.zeros((bv, w_VxD.shape[1]), _acc(cdt))
    dh_NxD, dw_blk = jax.lax.fori_loop(0, nt, token_step, (dh_NxD, dw_blk))
    # Covered rows of the clamped last block hold exact zeros: adding them changes nothing.
    old = jax.lax.dynamic_slice_in_dim(dw_VxD, v0, bv)
    dw_VxD = jax.lax.dynamic_update_slice_in_dim(dw_VxD, old + dw_blk.astype(w_VxD.dtype), v0, 0)
    return dh_NxD, dw_VxD

  init = (jnp.zeros(h_NxD.shape, _acc(cdt)), jnp.zeros_like(w_VxD))
  return jax.lax.fori_loop(0, nv, vocab_step, init)


def chunked_logprob(h_NxD, w_VxD, targets_N, mask_N, token_block=None, vocab_block=None,
                    softcap=None):
  """Flat per-token log-probs [N] fp32, 0 where the (bool) mask is false.

  Block sizes default to the module's TOKEN_BLOCK / VOCAB_BLOCK, read at call time.
  """
  return _chunked_logprob(h_NxD, w_VxD, targets_N, mask_N, token_block or TOKEN_BLOCK,
                          vocab_block or VOCAB_BLOCK, None, softcap or None)


def compact(mask_N):
  """Masked-in tokens first (stable), their count, and the inverse permutation.

  Only cdiv(count, bt) token blocks are streamed: prompt and padding tokens, often most of a
  DPO batch, cost no logits at all.
  """
  perm = jnp.argsort(jnp.logical_not(mask_N).astype(jnp.int8), stable=True)
  inverse = jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))
  return perm, inverse, jnp.sum(mask_N, dtype=jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked_logprob(h_NxD, w_VxD, targets_N, mask_N, token_block, vocab_block, axis, cap):
  return _fwd(h_NxD, w_VxD, targets_N, mask_N, token_block, vocab_block, axis, cap)[0]


def _fwd(h_NxD, w_VxD, targets_N, mask_N, token_block, vocab_block, axis, cap):
  """axis: None, or the mesh axis w's rows are split over (inside shard_map)."""
  perm, inverse, count = compact(mask_N)
  offset = 0 if axis is None else jax.lax.axis_index(axis) * w_VxD.shape[0]
  m, s, tgt = forward_partials(h_NxD[perm], w_VxD, targets_N[perm], token_block=token_block,
                               vocab_block=vocab_block, vocab_offset=offset, num_tokens=count,
                               cap=cap)
  if axis is not None:  # Combine the shards' partial logsumexps and target logits.
    m_all = jax.lax.pmax(m, axis)
    s = jax.lax.psum(s * jnp.exp(m - m_all), axis)
    m = m_all
    tgt = jax.lax.psum(tgt, axis)  # The target sits in exactly one shard; the others add 0.
  lse_N = m + jnp.log(s)  # Compacted order; -inf past `count` (never read).
  logp_N = jnp.where(mask_N, (tgt - lse_N)[inverse], 0.0)
  return logp_N, (h_NxD, w_VxD, targets_N, mask_N, lse_N)


def _bwd(token_block, vocab_block, axis, cap, res, g_N):
  h_NxD, w_VxD, targets_N, mask_N, lse_N = res
  if axis is not None:
    # shard_map's transpose (check_vma=False) hands each vocab shard 1/shards of the
    # cotangent of the replicated log-probs, and psums input cotangents over the axes an
    # input is replicated on: so sum g back first, then return per-shard partials (dh over
    # the local vocab rows, dw over the local tokens).
    g_N = jax.lax.psum(g_N, axis)
  perm, inverse, count = compact(mask_N)
  offset = 0 if axis is None else jax.lax.axis_index(axis) * w_VxD.shape[0]
  coef_N = jnp.where(mask_N, g_N, 0.0)[perm]
  dh_NxD, dw_VxD = backward(h_NxD[perm], w_VxD, targets_N[perm], coef_N, lse_N,
                            token_block=token_block, vocab_block=vocab_block,
                            vocab_offset=offset, num_tokens=count, cap=cap)
  return dh_NxD[inverse].astype(h_NxD.dtype), dw_VxD, None, None


_chunked_logprob.defvjp(_fwd, _bwd)


# Vocab-parallel: w's rows are split over a mesh axis. Each shard streams its own rows; the
# per-token partials (max, sum, target logit) combine with pmax/psum, the hidden cotangent is
# summed over the vocab shards, and each shard keeps the gradient of its own rows. Only
# [N]-sized vectors and the [N, D] hidden cotangent cross devices.


def logprob_vocab_parallel(hidden, out_weight_VxD, targets, mask, *, mesh, vocab_axis="tensor",
                           token_axes=None, token_block=None, vocab_block=None, softcap=None):
  """`chunked` with out_weight's rows sharded over `vocab_axis` of `mesh` (a shard_map).

  hidden [..., D] and targets/mask [...] are split on their first axis over `token_axes`
  (None: replicated) and replicated over `vocab_axis`. V must be a multiple of the
  `vocab_axis` size (pad the vocabulary, as Megatron does). Returns [...] fp32, sharded like
  targets.
  """
  shards = mesh.shape[vocab_axis]
  if out_weight_VxD.shape[0] % shards:
    raise ValueError(
        f"logprob: vocab size {out_weight_VxD.shape[0]} is not a multiple of mesh axis "
        f"{vocab_axis!r} ({shards}); pad model.vocab_size to a multiple of it")
  token_block, vocab_block = token_block or TOKEN_BLOCK, vocab_block or VOCAB_BLOCK
  lead = targets.ndim
  tok_spec = P(token_axes, *([None] * (lead - 1)))
  h_spec = P(token_axes, *([None] * lead))

  def local(h, w, t, msk):
    logp = _chunked_logprob(h.reshape(-1, h.shape[-1]), w, t.reshape(-1), msk.reshape(-1),
                            token_block, vocab_block, vocab_axis, softcap or None)
    return logp.reshape(t.shape)

  specs = (h_spec, P(vocab_axis, None), tok_spec, tok_spec)
  args = (hidden, out_weight_VxD, targets, mask.astype(bool))
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    # Explicit meshes do not reshard into shard_map implicitly (Auto ones do).
    args = tuple(jax.reshard(x, NamedSharding(mesh, spec)) for x, spec in zip(args, specs))
  # check_vma=False: the loops' zero-initialised carries need no per-axis typing, and the
  # transpose psums input cotangents over the axes an input is replicated on (see _bwd).
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=tok_spec,
                       check_vma=False)(*args)
