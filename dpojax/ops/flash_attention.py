"""Causal attention within packed segments as a flash-attention kernel that skips other segments.

Packed DPO rows hold several sequences (segments) each; a token attends to the earlier tokens
of its own segment only. A plain causal flash kernel with a segment mask still computes every
key block up to the diagonal (T^2 / 2 scores per row): with 4096-token rows of ~700-token
sequences, about 3x more than the segments need. These Pallas kernels (Triton lowering on GPU,
interpreted elsewhere: tests only) visit only the key blocks that can hold a query block's own
segment:
  segment bounds  first[t], last[t]: the first and last index of token t's segment id in its
                  row (any layout: ids need not be contiguous or sorted);
  forward         grid (query blocks, B, N): keys from min(first) of the block's queries up to
                  its causal end; online softmax; writes o and the log-sum-exp;
  backward        dq: the forward's key range per query block; dk/dv: grid (key blocks, B, N),
                  queries from the key block's start up to max(last) of its keys.
Inside the visited blocks the mask is exact (causal AND same id). Grouped-query heads read
their KV group through the BlockSpec (head h uses group h // R); dk and dv come out per query
head and are summed over each group's R heads. Head dims are zero-padded to a power of two
(>= 16, Triton's dot minimum). `jax_kernel=True` (or JAX_KERNEL) calls the causal segment-masked kernel that
ships with JAX instead (jax.experimental.pallas.ops.gpu.attention.mha), for comparison.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jax.experimental.pallas.ops.gpu import attention as mha_lib
from jax.sharding import NamedSharding, PartitionSpec as P

BLOCK_Q = 64  # Query tile (all kernels).
BLOCK_K = 64  # Key tile (all kernels).
NUM_WARPS = 4
NUM_STAGES = 2
JAX_KERNEL = False  # True: JAX's own kernel instead (benchmarks/gpu_check.py compares them).
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # Finite: exp(_MASKED - m) == 0.


def segment_bounds(segment_ids_BxT):
  """(first, last) [B, T] int32: the first and last index in the row of each token's id."""
  t = segment_ids_BxT.shape[1]
  index = jnp.arange(t, dtype=jnp.int32)

  def row(seg_T):
    _, ids = jnp.unique(seg_T, size=t, fill_value=seg_T[0], return_inverse=True)
    ids = ids.reshape(-1)
    first = jax.ops.segment_min(index, ids, num_segments=t)
    last = jax.ops.segment_max(index, ids, num_segments=t)
    return first[ids], last[ids]

  return jax.vmap(row)(segment_ids_BxT)


def _dot(a, b, trans_a=False, trans_b=False):
  """fp32 accumulation; fp32 operands stay fp32 (no TF32), as the dense path computes them."""
  return plt.dot(a, b, trans_a=trans_a, trans_b=trans_b,
                 allow_tf32=a.dtype != jnp.float32).astype(jnp.float32)


def _div(x, d):
  return lax.div(x, jnp.int32(d))


def _scores(q, k, seg_q, seg_k, q0, k0, scale, window, softcap):
  """(masked, scaled, softcapped fp32 scores [bq, bk] of a query block at q0 against keys at
  k0; d(capped)/d(score), 1 - tanh^2, for the backward (None without a cap)).

  The window (a traced scalar: layers of one scan differ) keeps keys fewer than `window` slots
  back; within one segment slots and positions advance together, so this is the dense path's
  position rule. No window is one longer than the row."""
  s = _dot(q, k, trans_b=True) * scale
  dcap = None
  if softcap:
    t = jnp.tanh(s / softcap)
    s, dcap = softcap * t, 1.0 - t * t
  back = (q0 + jnp.arange(q.shape[0]))[:, None] - (k0 + jnp.arange(k.shape[0]))[None, :]
  keep = (back >= 0) & (back < window) & (seg_q[:, None] == seg_k[None, :])
  return jnp.where(keep, s, _MASKED), dcap


def _key_blocks(first_ref, q0, bq, bk, window):
  """[start, end) key blocks a query block at q0 needs: from its queries' earliest segment
  start (and, with a window, its first query's earliest key) to its causal end."""
  start = _div(jnp.min(first_ref[pl.ds(q0, bq)]), bk)
  start = jnp.maximum(start, _div(jnp.maximum(q0 - window + 1, 0), bk))
  return start, _div(q0 + bq + bk - 1, bk)


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, first_ref, win_ref, o_ref, lse_ref, *, scale,
                softcap, bq, bk):
  q0 = pl.program_id(0) * bq
  window = win_ref[0]
  q = q_ref[...]
  seg_q = seg_ref[pl.ds(q0, bq)]
  start, end = _key_blocks(first_ref, q0, bq, bk, window)

  def body(j, carry):
    m, l, acc = carry
    k0 = j * bk
    s, _ = _scores(q, k_ref[pl.ds(k0, bk), :], seg_q, seg_ref[pl.ds(k0, bk)], q0, k0, scale,
                   window, softcap)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    v = v_ref[pl.ds(k0, bk), :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
    return m_new, l * alpha + jnp.sum(p, axis=1), acc

  init = (jnp.full((bq,), _MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = lax.fori_loop(start, end, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _score_grad(p, dp, delta, dcap, scale):
  """d(loss)/d(q k^T) from the softmax's p and dp = do v^T, through the cap and the scale."""
  ds = p * (dp - delta[:, None])
  return (ds if dcap is None else ds * dcap) * scale


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, first_ref, win_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, scale, softcap, bq, bk):
  q0 = pl.program_id(0) * bq
  window = win_ref[0]
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  seg_q = seg_ref[pl.ds(q0, bq)]
  start, end = _key_blocks(first_ref, q0, bq, bk, window)

  def body(j, dq):
    k0 = j * bk
    k, v = k_ref[pl.ds(k0, bk), :], v_ref[pl.ds(k0, bk), :]
    s, dcap = _scores(q, k, seg_q, seg_ref[pl.ds(k0, bk)], q0, k0, scale, window, softcap)
    p = jnp.exp(s - lse[:, None])
    dp = _dot(do, v, trans_b=True)
    ds = _score_grad(p, dp, delta, dcap, scale).astype(k.dtype)
    return dq + _dot(ds, k)

  dq = lax.fori_loop(start, end, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, last_ref, win_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, scale, softcap, bq, bk):
  j = pl.program_id(0)
  window = win_ref[0]
  k0 = j * bk
  k, v = k_ref[...], v_ref[...]
  seg_k = seg_ref[pl.ds(k0, bk)]
  start = _div(k0, bq)
  end = _div(jnp.max(last_ref[pl.ds(k0, bk)]), bq) + 1
  end = jnp.minimum(end, _div(k0 + bk - 1 + window - 1, bq) + 1)  # Queries the window reaches.

  def body(i, carry):
    dk, dv = carry
    q0 = i * bq
    q, do = q_ref[pl.ds(q0, bq), :], do_ref[pl.ds(q0, bq), :]
    lse, delta = lse_ref[pl.ds(q0, bq)], delta_ref[pl.ds(q0, bq)]
    s, dcap = _scores(q, k, seg_ref[pl.ds(q0, bq)], seg_k, q0, k0, scale, window, softcap)
    p = jnp.exp(s - lse[:, None])
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
    dp = _dot(do, v, trans_b=True)
    ds = _score_grad(p, dp, delta, dcap, scale).astype(q.dtype)
    return dk + _dot(ds, q, trans_a=True), dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(start, end, body, (zeros, zeros))
  dk_ref[...], dv_ref[...] = dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype)


def _compiler_params(interpret):
  if interpret:
    return None
  return plt.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _specs(t, r, kd, bq, bk):
  """BlockSpecs on grids (blocks, B, N): a tile of rows, a whole row (for the kernel's own
  slicing), per query head or per KV group, and [B, N, T] / [B, T] vectors."""
  tile = lambda rows: pl.BlockSpec((None, rows, None, kd), lambda i, b_, h: (b_, i, h, 0))
  row_q = pl.BlockSpec((None, t, None, kd), lambda i, b_, h: (b_, 0, h, 0))
  row_kv = pl.BlockSpec((None, t, None, kd), lambda i, b_, h: (b_, 0, lax.div(h, r), 0))
  tile_kv = pl.BlockSpec((None, bk, None, kd), lambda i, b_, h: (b_, i, lax.div(h, r), 0))
  vec_tile = pl.BlockSpec((None, None, bq), lambda i, b_, h: (b_, h, i))
  vec_row = pl.BlockSpec((None, None, t), lambda i, b_, h: (b_, h, 0))
  seg_row = pl.BlockSpec((None, t), lambda i, b_, h: (b_, 0))
  scalar = pl.BlockSpec((1,), lambda i, b_, h: (0,))
  return dict(tile=tile, row_q=row_q, row_kv=row_kv, tile_kv=tile_kv, vec_tile=vec_tile,
              vec_row=vec_row, seg_row=seg_row, scalar=scalar)


def _forward(q, k, v, seg, first, window, scale, softcap, interpret):
  b, t, n, kd = q.shape
  bq, bk = min(BLOCK_Q, t), min(BLOCK_K, t)
  sp = _specs(t, n // k.shape[2], kd, bq, bk)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, softcap=softcap, bq=bq, bk=bk),
      grid=(t // bq, b, n),
      in_specs=[sp["tile"](bq), sp["row_kv"], sp["row_kv"], sp["seg_row"], sp["seg_row"],
                sp["scalar"]],
      out_specs=[sp["tile"](bq), sp["vec_tile"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
      interpret=interpret, compiler_params=_compiler_params(interpret), name="segment_flash_fwd",
  )(q, k, v, seg, first, window)


def _backward(q, k, v, seg, first, last, window, o, lse, do, scale, softcap, interpret):
  b, t, n, kd = q.shape
  r = n // k.shape[2]
  bq, bk = min(BLOCK_Q, t), min(BLOCK_K, t)
  sp = _specs(t, r, kd, bq, bk)
  delta = jnp.einsum("btnk,btnk->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, softcap=softcap, bq=bq, bk=bk),
      grid=(t // bq, b, n),
      in_specs=[sp["tile"](bq), sp["row_kv"], sp["row_kv"], sp["seg_row"], sp["seg_row"],
                sp["scalar"], sp["tile"](bq), sp["vec_tile"], sp["vec_tile"]],
      out_specs=sp["tile"](bq), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret, compiler_params=_compiler_params(interpret), name="segment_flash_dq",
  )(q, k, v, seg, first, window, do, lse, delta)
  per_head = jax.ShapeDtypeStruct(q.shape, jnp.float32)  # [B, T, N, K]: summed per group.
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, softcap=softcap, bq=bq, bk=bk),
      grid=(t // bk, b, n),
      in_specs=[sp["row_q"], sp["tile_kv"], sp["tile_kv"], sp["seg_row"], sp["seg_row"],
                sp["scalar"], sp["row_q"], sp["vec_row"], sp["vec_row"]],
      out_specs=[sp["tile"](bk), sp["tile"](bk)], out_shape=[per_head, per_head],
      interpret=interpret, compiler_params=_compiler_params(interpret),
      name="segment_flash_dkv",
  )(q, k, v, seg, last, window, do, lse, delta)
  group = lambda x: x.reshape(b, t, k.shape[2], r, kd).sum(3).astype(k.dtype)
  return dq, group(dk), group(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, seg, bounds, window, scale, softcap, interpret):
  return _forward(q, k, v, seg, bounds[0], window, scale, softcap, interpret)[0]


def _attention_fwd(q, k, v, seg, bounds, window, scale, softcap, interpret):
  o, lse = _forward(q, k, v, seg, bounds[0], window, scale, softcap, interpret)
  return o, (q, k, v, seg, bounds, window, o, lse)


def _attention_bwd(scale, softcap, interpret, res, do):
  q, k, v, seg, bounds, window, o, lse = res
  dq, dk, dv = _backward(q, k, v, seg, bounds[0], bounds[1], window, o, lse, do, scale,
                         softcap, interpret)
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q_BxTxNxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, interpret: bool | None = None,
              jax_kernel: bool | None = None, *, bounds=None, mesh=None,
              batch_axes=("data", "fsdp", "expert"), head_axis="tensor", scale: float | None = None,
              window: int = 0, softcap: float = 0.0):
  """softmax(q k^T / sqrt(K)) v over keys at or before each query in its segment: [B, T, N, K].

  `scale` replaces 1/sqrt(K); `softcap` > 0 caps the scaled scores to softcap * tanh(s /
  softcap); `window` > 0 (an int, or a traced int32 scalar: one scan's layers differ) keeps
  keys fewer than `window` tokens back, and the kernels skip the key (backward: query) blocks
  outside it. JAX's kernel (jax_kernel) has none of these.

  Same mask as `ops.attention.attention_mask` without branches (padding, segment 0, attends to
  earlier padding; its outputs are never read). T is padded (`_padded_length`) with an id
  (-1) no real token has, after every real token, so causality hides it. `bounds`:
  `segment_bounds(segment_ids)` when the caller has them (the model computes them once per
  forward, not per layer); None computes them here.
  With a multi-device `mesh` (axes as in train/sharding.py), each device runs the kernel on
  its own rows and heads (a shard_map, manual over the `batch_axes` that divide B and over
  `head_axis` where it divides N and G): XLA cannot partition a kernel call, and would
  otherwise gather every row to every device.
  """
  if mesh is not None and mesh.size > 1:
    return _sharded(q_BxTxNxK, k_BxTxGxK, v_BxTxGxK, segment_ids_BxT, bounds, interpret,
                    jax_kernel, mesh, batch_axes, head_axis, (scale, window, softcap))
  b, t, n, kd = q_BxTxNxK.shape
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  t_pad = _padded_length(t)
  k_pad = max(16, 1 << (kd - 1).bit_length())
  seg = segment_ids_BxT.astype(jnp.int32)
  if bounds is None:
    bounds = segment_bounds(seg)
  q, k, v = q_BxTxNxK, k_BxTxGxK, v_BxTxGxK
  if t_pad != t or k_pad != kd:
    pad = lambda x: jnp.pad(x, [(0, 0), (0, t_pad - t), (0, 0), (0, k_pad - kd)])
    q, k, v = pad(q), pad(k), pad(v)
    tail = lambda x, value: jnp.pad(x, [(0, 0), (0, t_pad - t)], constant_values=value)
    # The padding is one more segment, [t, t_pad).
    seg, bounds = tail(seg, -1), (tail(bounds[0], t), tail(bounds[1], t_pad - 1))
  scale = kd ** -0.5 if scale is None else scale
  plain = isinstance(window, int) and not window and not softcap
  if (JAX_KERNEL if jax_kernel is None else jax_kernel) and plain:
    out = _jax_mha(q, k, v, seg, scale, interpret)
  else:
    # 0 (no window) is one past the row; the kernels read it as a [1] int32 operand.
    window_1 = jnp.where(window > 0, window, t_pad + 1).astype(jnp.int32).reshape(1)
    out = _attention(q, k, v, seg, bounds, window_1, float(scale), float(softcap), interpret)
  return out[:, :t, :, :kd]


def _sharded(q, k, v, seg, bounds, interpret, jax_kernel, mesh, batch_axes, head_axis, opts):
  scale, window, softcap = opts
  sizes = dict(mesh.shape)
  rows = tuple(a for a in batch_axes if sizes.get(a, 1) > 1)
  if q.shape[0] % math.prod(sizes[a] for a in rows):
    rows = ()
  heads = sizes.get(head_axis, 1)
  head = head_axis if heads > 1 and not (q.shape[2] % heads or k.shape[2] % heads) else None
  manual = set(rows) | ({head} if head else set())
  if not manual:
    return attention(q, k, v, seg, interpret, jax_kernel, bounds=bounds, scale=scale,
                     window=window, softcap=softcap)
  if bounds is None:
    bounds = segment_bounds(seg.astype(jnp.int32))
  qkv, row = P(rows or None, None, head, None), P(rows or None, None)
  specs = (qkv, qkv, qkv, row, row, row)
  args = (q, k, v, seg, *bounds)
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    # Explicit meshes do not reshard into shard_map implicitly (Auto ones do).
    args = tuple(jax.reshard(x, NamedSharding(mesh, spec)) for x, spec in zip(args, specs))
  if not isinstance(window, int):  # A traced window enters as a replicated int operand.
    specs, args = specs + (P(),), args + (jnp.asarray(window, jnp.int32).reshape(1),)
  local = lambda q, k, v, seg, first, last, *win: attention(
      q, k, v, seg, interpret, jax_kernel, bounds=(first, last), scale=scale,
      window=win[0][0] if win else window, softcap=softcap)
  # Manual only over the axes every operand is split on: no replicated float operand whose
  # cotangent the transpose would have to sum.
  return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=qkv, axis_names=manual,
                       check_vma=False)(*args)


def _padded_length(t: int) -> int:
  """A multiple of both (power-of-two) tiles, or for short rows the next power of two (>= 16):
  Triton's blocks must be powers of two, and each kernel's grid must cover the row."""
  big = max(BLOCK_Q, BLOCK_K)
  t_pad = -(-t // big) * big if t > big else max(16, 1 << (t - 1).bit_length())
  assert t_pad % min(BLOCK_Q, t_pad) == 0 and t_pad % min(BLOCK_K, t_pad) == 0, (t, t_pad)
  return t_pad


def _jax_mha(q, k, v, seg, scale, interpret):
  """JAX's own causal segment-masked kernel (no block skipping), GQA by repeating groups."""
  n, t = q.shape[2], q.shape[1]
  r = n // k.shape[2]
  fwd = next(x for x in (128, 64, 32, 16) if t % x == 0)
  bwd = next(x for x in (64, 32, 16) if t % x == 0)
  blocks = mha_lib.BlockSizes(block_q=fwd, block_k=fwd, block_q_dkv=bwd, block_kv_dkv=bwd,
                              block_q_dq=bwd, block_kv_dq=bwd)
  return mha_lib.mha(q, jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2), seg, sm_scale=scale,
                     causal=True, block_sizes=blocks, interpret=interpret)
