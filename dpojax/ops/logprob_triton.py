"""Log-probs as hand-written Triton kernels called through jax-triton (GPU only).

Same algorithm and tiling as `logprob_pallas` (see there), written against Triton directly
so masked loads handle ragged token and D edges without padding:
  forward   grid (token blocks, vocab splits): online max / sum / target logit per split;
  backward  grid (token blocks, vocab blocks): recompute the tile, then atomically add
            dz @ w_tile into dh and dz.T @ h_tile into dw (fp32), chunk by chunk over D.
fp32 inputs use IEEE dots (no TF32) so results match `xla` to 1e-5. A final-logit softcap
(constexpr CAP, 0 = none) caps each tile as logprob_chunked does, tanh written with exp (the
CPU interpreter has no libdevice).

`triton` and `jax_triton` are imported only when a kernel is first needed, so CPU installs
never need them; `kernels()` returns the raw @triton.jit functions (tests run them under
Triton's CPU interpreter). Outputs are the kernel's last pointers (jax-triton's convention);
the backward's dh and dw are zeroed by jax-triton (`zeroed_outputs`) for the atomic adds.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

from dpojax.ops import logprob_chunked

TOKEN_BLOCK = 64
VOCAB_BLOCK = 128
K_BLOCK = 64


def _cdiv(a, b):
  return -(-a // b)


# Bound by kernels() on first use. Module globals, not closure variables: Triton resolves a
# kernel's names through its __globals__ (its CPU interpreter through nothing else).
tl = None
_tile = None
_dot = None
_cap = None


@functools.cache
def kernels():
  """(forward, backward) @triton.jit kernels; imports triton on first use.

  count_ptr: the number of masked-in tokens, sorted first (logprob_chunked.compact); programs
  past them return at once. Launch parameters (constexpr): N, V, D sizes; BN, BV, BK tile
  sizes (powers of two, BV <= V); IEEE 1 for fp32 inputs; forward also PER_SPLIT, the vocab
  tiles per program.
  """
  global tl, _tile, _dot, _cap  # pylint: disable=global-statement
  import triton  # pylint: disable=g-import-not-at-top
  import triton.language as tl  # pylint: disable=g-import-not-at-top,redefined-outer-name

  @triton.jit
  def dot(a, b, IEEE: tl.constexpr):
    if IEEE:  # fp32 in: exact fp32 products, as XLA's reference (no TF32).
      out = tl.dot(a, b, input_precision="ieee")
    else:
      out = tl.dot(a, b)
    return out

  _dot = dot

  @triton.jit
  def tile(h_ptr, w_ptr, rows, row_ok, cols, D: tl.constexpr, BN: tl.constexpr,
            BV: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    z = tl.zeros((BN, BV), tl.float32)
    for k in range(0, D, BK):
      ks = k + tl.arange(0, BK)
      h_k = tl.load(h_ptr + rows[:, None] * D + ks[None, :],
                    mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)
      w_kt = tl.load(w_ptr + cols[None, :] * D + ks[:, None], mask=ks[:, None] < D, other=0.0)
      z += _dot(h_k, w_kt.to(h_k.dtype), IEEE)
    return z

  _tile = tile

  @triton.jit
  def cap(z, CAP: tl.constexpr):
    if CAP > 0:  # CAP * tanh(z / CAP), tanh(x) = 1 - 2 / (exp(2x) + 1): +-1 at +-inf.
      z = CAP * (1.0 - 2.0 / (tl.exp(2.0 * (z / CAP)) + 1.0))
    return z

  _cap = cap

  @triton.jit
  def forward(count_ptr, h_ptr, w_ptr, t_ptr, m_ptr, s_ptr, tgt_ptr, N: tl.constexpr,
              V: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BV: tl.constexpr,
              BK: tl.constexpr, PER_SPLIT: tl.constexpr, IEEE: tl.constexpr,
              CAP: tl.constexpr):
    i = tl.program_id(0)
    split = tl.program_id(1)
    if i * BN < tl.load(count_ptr):  # Blocks of masked-out tokens do nothing.
      rows = i * BN + tl.arange(0, BN)
      row_ok = rows < N
      t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
      m = tl.full((BN,), -1e30, tl.float32)
      s = tl.zeros((BN,), tl.float32)
      tgt = tl.zeros((BN,), tl.float32)
      for jj in range(0, PER_SPLIT):
        j = split * PER_SPLIT + jj  # Past the last tile (uneven splits): fully masked.
        v0 = tl.minimum(j * BV, V - BV)
        cols = v0 + tl.arange(0, BV)
        new = cols >= j * BV
        z = _cap(_tile(h_ptr, w_ptr, rows, row_ok, cols, D, BN, BV, BK, IEEE), CAP)
        z = tl.where(new[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        hit = (cols[None, :] == t[:, None]) & new[None, :]
        tgt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        m = m_new
      out = split * N + rows
      tl.store(m_ptr + out, m, mask=row_ok)
      tl.store(s_ptr + out, s, mask=row_ok)
      tl.store(tgt_ptr + out, tgt, mask=row_ok)

  @triton.jit
  def backward(count_ptr, h_ptr, w_ptr, t_ptr, coef_ptr, lse_ptr, dh_ptr, dw_ptr,
               N: tl.constexpr, V: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
               BV: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr, CAP: tl.constexpr):
    i = tl.program_id(0)
    j = tl.program_id(1)
    if i * BN < tl.load(count_ptr):  # Blocks of masked-out tokens do nothing.
      rows = i * BN + tl.arange(0, BN)
      row_ok = rows < N
      v0 = tl.minimum(j * BV, V - BV)
      cols = v0 + tl.arange(0, BV)
      new = cols >= j * BV
      coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
      lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
      t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
      z = _cap(_tile(h_ptr, w_ptr, rows, row_ok, cols, D, BN, BV, BK, IEEE), CAP)
      p = tl.exp(z - lse[:, None])
      onehot = tl.where(cols[None, :] == t[:, None], 1.0, 0.0)
      keep = new[None, :] & (coef != 0.0)[:, None]
      dz = coef[:, None] * (onehot - p)
      if CAP > 0:  # The tanh's derivative.
        dz = dz * (1.0 - (z / CAP) * (z / CAP))
      dz = tl.where(keep, dz, 0.0).to(h_ptr.dtype.element_ty)
      for k in range(0, D, BK):
        ks = k + tl.arange(0, BK)
        k_ok = ks < D
        w_k = tl.load(w_ptr + cols[:, None] * D + ks[None, :], mask=k_ok[None, :], other=0.0)
        dh_k = _dot(dz, w_k.to(dz.dtype), IEEE)
        tl.atomic_add(dh_ptr + rows[:, None] * D + ks[None, :], dh_k,
                      mask=row_ok[:, None] & k_ok[None, :])
        h_k = tl.load(h_ptr + rows[:, None] * D + ks[None, :],
                      mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        dw_k = _dot(tl.trans(dz), h_k, IEEE)
        tl.atomic_add(dw_ptr + cols[:, None] * D + ks[None, :], dw_k,
                      mask=new[:, None] & k_ok[None, :])

  return forward, backward


def plan(n, v, d, token_block=TOKEN_BLOCK, vocab_block=VOCAB_BLOCK, dtype=jnp.float32,
         cap=None):
  """Static launch parameters (powers of two; the clamped last vocab tile must fit in V)."""
  bn = max(16, 1 << (max(token_block, 1).bit_length() - 1))
  bv = 1 << (min(vocab_block, v).bit_length() - 1)
  if bv < 16:
    raise ValueError(f"logprob.impl='triton' needs a vocabulary of at least 16, got {v}")
  bk = min(K_BLOCK, max(16, 1 << (d - 1).bit_length()))
  return dict(N=n, V=v, D=d, BN=bn, BV=bv, BK=bk, IEEE=int(jnp.dtype(dtype) == jnp.float32),
              CAP=float(cap or 0.0))


def _require_gpu():
  if jax.default_backend() != "gpu":
    raise ValueError(
        f"logprob.impl='triton' runs only on an NVIDIA GPU (jax-triton); this backend is "
        f"{jax.default_backend()!r}: set logprob.impl to 'chunked' (or 'pallas')")


def _forward(h_NxD, w_VxD, targets_N, count, token_block, vocab_block, vocab_splits, cap):
  import jax_triton as jt  # pylint: disable=g-import-not-at-top

  (n, d), v = h_NxD.shape, w_VxD.shape[0]
  meta = plan(n, v, d, token_block, vocab_block, h_NxD.dtype, cap)
  nt, nv = _cdiv(n, meta["BN"]), _cdiv(v, meta["BV"])
  if vocab_splits is None:  # Aim for >= 256 programs (two waves of an H100's 132 SMs).
    vocab_splits = min(nv, max(1, _cdiv(256, nt)))
  per_split = _cdiv(nv, vocab_splits)
  splits = _cdiv(nv, per_split)
  part = jax.ShapeDtypeStruct((splits, n), jnp.float32)
  m, s, tgt = jt.triton_call(
      count.reshape(1), h_NxD, w_VxD, targets_N.astype(jnp.int32), kernel=kernels()[0],
      grid=(nt, splits), num_warps=4, num_stages=2, PER_SPLIT=per_split,
      **_out_types(jt, [part, part, part]), **meta)
  m_all = jnp.max(m, axis=0)
  lse = m_all + jnp.log(jnp.sum(s * jnp.exp(m - m_all), axis=0))
  return lse, jnp.sum(tgt, axis=0)


def _backward(h_NxD, w_VxD, targets_N, coef_N, lse_N, count, token_block, vocab_block, cap):
  import jax_triton as jt  # pylint: disable=g-import-not-at-top

  (n, d), v = h_NxD.shape, w_VxD.shape[0]
  meta = plan(n, v, d, token_block, vocab_block, h_NxD.dtype, cap)
  grid = (_cdiv(n, meta["BN"]), _cdiv(v, meta["BV"]))
  # dh and dw are the kernel's last two pointers, zeroed for its atomic adds.
  dh, dw = jt.triton_call(
      count.reshape(1), h_NxD, w_VxD, targets_N.astype(jnp.int32), coef_N, lse_N,
      kernel=kernels()[1], zeroed_outputs=(0, 1), grid=grid, num_warps=4, num_stages=2,
      **_out_types(jt, [jax.ShapeDtypeStruct((n, d), jnp.float32),
                        jax.ShapeDtypeStruct((v, d), jnp.float32)]), **meta)
  return dh, dw


def _out_types(jt, shapes):
  """The outputs' keyword: `out_type` since jax-triton 0.4, `out_shape` before."""
  params = inspect.signature(jt.triton_call).parameters
  return {"out_type" if "out_type" in params else "out_shape": shapes}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _triton_logprob(h_NxD, w_VxD, targets_N, mask_N, token_block, vocab_block, vocab_splits,
                    cap):
  return _fwd(h_NxD, w_VxD, targets_N, mask_N, token_block, vocab_block, vocab_splits, cap)[0]


def _fwd(h_NxD, w_VxD, targets_N, mask_N, token_block, vocab_block, vocab_splits, cap):
  perm, inverse, count = logprob_chunked.compact(mask_N)
  lse_N, tgt_N = _forward(h_NxD[perm], w_VxD, targets_N[perm], count, token_block, vocab_block,
                          vocab_splits, cap)
  logp_N = jnp.where(mask_N, (tgt_N - lse_N)[inverse], 0.0)
  return logp_N, (h_NxD, w_VxD, targets_N, mask_N, lse_N)


def _bwd(token_block, vocab_block, vocab_splits, cap, res, g_N):
  del vocab_splits
  h_NxD, w_VxD, targets_N, mask_N, lse_N = res
  perm, inverse, count = logprob_chunked.compact(mask_N)
  coef_N = jnp.where(mask_N, g_N, 0.0)[perm]
  dh, dw = _backward(h_NxD[perm], w_VxD, targets_N[perm], coef_N, lse_N, count, token_block,
                     vocab_block, cap)
  return dh[inverse].astype(h_NxD.dtype), dw.astype(w_VxD.dtype), None, None


_triton_logprob.defvjp(_fwd, _bwd)


def triton_logprob(h_NxD, w_VxD, targets_N, mask_N, token_block=None, vocab_block=None,
                   vocab_splits=None, softcap=None):
  """Flat per-token log-probs [N] fp32, 0 where the (bool) mask is false. GPU only."""
  _require_gpu()
  return _triton_logprob(h_NxD, w_VxD, targets_N, mask_N, token_block or TOKEN_BLOCK,
                         vocab_block or VOCAB_BLOCK, vocab_splits, softcap or None)
