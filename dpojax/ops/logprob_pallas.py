"""Log-probs as Pallas kernels (Triton lowering on GPU; `interpret=True` elsewhere, for tests).

The same tiling as `logprob_chunked`, shaped for a GPU:
  forward   grid (token blocks, vocab splits). A program streams its share of the vocab in
            [bn, bv] tiles (each a K-loop of [bn, bk] x [bk, bv] dots), keeps the online
            max / sum / target logit for its bn tokens and writes them out; XLA combines the
            splits (splits keep the GPU busy when there are few token blocks).
  backward  grid (token blocks, vocab blocks), one [bn, bv] tile per program: recompute the
            logits, dz = g * (onehot - exp(z - lse)), then per bk-wide column chunk
            atomically add dz @ w_tile into dh and dz.T @ h_tile into dw (fp32 buffers), as in
            Cut Cross-Entropy. Exactly the 8 N D V FLOPs of forward + backward with recompute.
Masked-out tokens are sorted behind the others (logprob_chunked.compact) and programs whose
token block holds none of the rest return at once. Ragged vocab: the last vocab tile starts
at V - bv and masks the columns earlier tiles covered, so w is never padded or copied.
Tokens are padded to a multiple of bn (masked). A final-logit `softcap` is applied per tile,
as in logprob_chunked.
Block sizes are powers of two (Triton's rule); the defaults fit an H100's shared memory with
bf16 inputs. GPU speed is unmeasured (no GPU in development so far): see BUILD.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dpojax.ops import logprob_chunked
from dpojax.ops.logprob_chunked import softcap, softcap_grad

TOKEN_BLOCK = 64
VOCAB_BLOCK = 128
_NEG = -1e30  # Finite start for the running max, so a fully masked tile never makes NaN.


def _cdiv(a, b):
  return -(-a // b)


def _k_block(d):
  """Width of the K-loop chunks: the largest of 64/32/16 dividing D (else D, interpret only)."""
  return next((k for k in (64, 32, 16) if d % k == 0), d)


def _vocab_block(vocab_block, v):
  """Powers of two no larger than V: the clamped last tile must fit inside w."""
  bv = min(vocab_block, v)
  return 1 << (bv.bit_length() - 1)


def _tile(h_ref, w_ref, v0, bv, bk):
  """fp32 logits of the kernel's bn tokens against w rows [v0, v0 + bv)."""
  bn, d = h_ref.shape

  def body(k, acc):
    h_k = h_ref[:, pl.ds(k * bk, bk)]
    w_k = w_ref[pl.ds(v0, bv), pl.ds(k * bk, bk)].astype(h_k.dtype)
    return acc + jax.lax.dot_general(h_k, w_k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  return jax.lax.fori_loop(0, d // bk, body, jnp.zeros((bn, bv), jnp.float32))


def _fwd_kernel(count_ref, h_ref, w_ref, t_ref, m_ref, s_ref, tgt_ref, *, vocab, bv, bk,
                per_split, cap):
  bn = h_ref.shape[0]
  i, split = pl.program_id(0), pl.program_id(1)  # Outside pl.when: interpret mode needs it.

  @pl.when(i * bn < count_ref[0])  # Blocks of masked-out tokens do nothing.
  def _():
    targets = t_ref[...]

    def body(jj, carry):
      m, s, tgt = carry
      j = split * per_split + jj  # Past the last tile (uneven splits): fully masked below.
      v0 = jnp.minimum(j * bv, vocab - bv)
      cols = v0 + jnp.arange(bv)
      new = cols >= j * bv
      z = jnp.where(new[None, :], softcap(_tile(h_ref, w_ref, v0, bv, bk), cap), -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(z, axis=1))
      s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
      hit = (cols[None, :] == targets[:, None]) & new[None, :]
      return m_new, s, tgt + jnp.sum(jnp.where(hit, z, 0.0), axis=1)

    init = (jnp.full((bn,), _NEG, jnp.float32), jnp.zeros((bn,), jnp.float32),
            jnp.zeros((bn,), jnp.float32))
    m, s, tgt = jax.lax.fori_loop(0, per_split, body, init)
    m_ref[...], s_ref[...], tgt_ref[...] = m, s, tgt


def _bwd_kernel(count_ref, h_ref, w_ref, t_ref, coef_ref, lse_ref, dh0_ref, dw0_ref, dh_ref,
                dw_ref, *, vocab, bv, bk, cap):
  del dh0_ref, dw0_ref  # Aliased to dh_ref / dw_ref: the zeros the atomics add into.

  i, j = pl.program_id(0), pl.program_id(1)
  bn, d = h_ref.shape

  @pl.when(i * bn < count_ref[0])  # Blocks of masked-out tokens do nothing.
  def _():
    v0 = jnp.minimum(j * bv, vocab - bv)
    cols = v0 + jnp.arange(bv)
    coef = coef_ref[...]
    z = softcap(_tile(h_ref, w_ref, v0, bv, bk), cap)
    p = jnp.exp(z - lse_ref[...][:, None])
    onehot = cols[None, :] == t_ref[...][:, None]
    keep = (cols >= j * bv)[None, :] & (coef != 0)[:, None]
    dz = jnp.where(keep, coef[:, None] * (onehot - p) * softcap_grad(z, cap),
                   0.0).astype(h_ref.dtype)

    def body(k, carry):
      h_k = h_ref[:, pl.ds(k * bk, bk)]
      w_k = w_ref[pl.ds(v0, bv), pl.ds(k * bk, bk)].astype(h_k.dtype)
      dh_k = jax.lax.dot_general(dz, w_k, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
      dw_k = jax.lax.dot_general(dz, h_k, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
      plt.atomic_add(dh_ref, (pl.ds(i * bn, bn), pl.ds(k * bk, bk)), dh_k)
      plt.atomic_add(dw_ref, (pl.ds(v0, bv), pl.ds(k * bk, bk)), dw_k)
      return carry

    jax.lax.fori_loop(0, d // bk, body, 0)


def _plan(n, v, d, token_block, vocab_block):
  bn = 1 << (max(token_block, 1).bit_length() - 1)
  bv = _vocab_block(vocab_block, v)
  return bn, bv, _cdiv(n, bn), _cdiv(v, bv), _k_block(d)


def _pad(x, rows):
  return jnp.pad(x, [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _forward(h_NxD, w_VxD, targets_N, count, token_block, vocab_block, vocab_splits,
             interpret, cap):
  """lse [N] and target logits [N] in fp32, for the first `count` tokens (and their block)."""
  (n, d), v = h_NxD.shape, w_VxD.shape[0]
  bn, bv, nt, nv, bk = _plan(n, v, d, token_block, vocab_block)
  if vocab_splits is None:  # Aim for >= 256 programs (two waves of an H100's 132 SMs).
    vocab_splits = min(nv, max(1, _cdiv(256, nt)))
  per_split = _cdiv(nv, vocab_splits)
  splits = _cdiv(nv, per_split)
  part = jax.ShapeDtypeStruct((splits, nt * bn), jnp.float32)
  part_spec = pl.BlockSpec((None, bn), lambda i, s: (s, i))
  m, s, tgt = pl.pallas_call(
      functools.partial(_fwd_kernel, vocab=v, bv=bv, bk=bk, per_split=per_split, cap=cap),
      grid=(nt, splits),
      in_specs=[pl.BlockSpec((1,), lambda i, s: (0,)),
                pl.BlockSpec((bn, d), lambda i, s: (i, 0)),
                pl.BlockSpec((v, d), lambda i, s: (0, 0)),
                pl.BlockSpec((bn,), lambda i, s: (i,))],
      out_specs=[part_spec] * 3, out_shape=[part] * 3, interpret=interpret,
      compiler_params=_compiler_params(interpret),
  )(count.reshape(1), _pad(h_NxD, nt * bn), w_VxD, _pad(targets_N, nt * bn))
  m_all = jnp.max(m, axis=0)
  lse = m_all + jnp.log(jnp.sum(s * jnp.exp(m - m_all), axis=0))
  return lse[:n], jnp.sum(tgt, axis=0)[:n]


def _backward(h_NxD, w_VxD, targets_N, coef_N, lse_N, count, token_block, vocab_block,
              interpret, cap):
  (n, d), v = h_NxD.shape, w_VxD.shape[0]
  bn, bv, nt, nv, bk = _plan(n, v, d, token_block, vocab_block)
  rows = nt * bn
  whole = lambda shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))
  tokens = lambda: pl.BlockSpec((bn,), lambda i, j: (i,))
  dh, dw = pl.pallas_call(
      functools.partial(_bwd_kernel, vocab=v, bv=bv, bk=bk, cap=cap),
      grid=(nt, nv),
      in_specs=[whole((1,)), pl.BlockSpec((bn, d), lambda i, j: (i, 0)), whole((v, d)),
                tokens(), tokens(), tokens(), whole((rows, d)), whole((v, d))],
      out_specs=[whole((rows, d)), whole((v, d))],
      out_shape=[jax.ShapeDtypeStruct((rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((v, d), jnp.float32)],
      input_output_aliases={6: 0, 7: 1}, interpret=interpret,
      compiler_params=_compiler_params(interpret),
  )(count.reshape(1), _pad(h_NxD, rows), w_VxD, _pad(targets_N, rows), _pad(coef_N, rows),
    _pad(lse_N, rows),
    jnp.zeros((rows, d), jnp.float32), jnp.zeros((v, d), jnp.float32))
  return dh[:n], dw


def _compiler_params(interpret):
  if interpret:
    return None
  return plt.CompilerParams(num_warps=4, num_stages=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _pallas_logprob(h_NxD, w_VxD, targets_N, mask_N, token_block, vocab_block, vocab_splits,
                    interpret, cap):
  return _fwd(h_NxD, w_VxD, targets_N, mask_N, token_block, vocab_block, vocab_splits,
              interpret, cap)[0]


def _fwd(h_NxD, w_VxD, targets_N, mask_N, token_block, vocab_block, vocab_splits, interpret,
         cap):
  perm, inverse, count = logprob_chunked.compact(mask_N)
  lse_N, tgt_N = _forward(h_NxD[perm], w_VxD, targets_N[perm], count, token_block, vocab_block,
                          vocab_splits, interpret, cap)
  logp_N = jnp.where(mask_N, (tgt_N - lse_N)[inverse], 0.0)
  return logp_N, (h_NxD, w_VxD, targets_N, mask_N, lse_N)


def _bwd(token_block, vocab_block, vocab_splits, interpret, cap, res, g_N):
  del vocab_splits
  h_NxD, w_VxD, targets_N, mask_N, lse_N = res
  perm, inverse, count = logprob_chunked.compact(mask_N)
  coef_N = jnp.where(mask_N, g_N, 0.0)[perm]
  dh, dw = _backward(h_NxD[perm], w_VxD, targets_N[perm], coef_N, lse_N, count, token_block,
                     vocab_block, interpret, cap)
  return dh[inverse].astype(h_NxD.dtype), dw.astype(w_VxD.dtype), None, None


_pallas_logprob.defvjp(_fwd, _bwd)


def pallas_logprob(h_NxD, w_VxD, targets_N, mask_N, token_block=None, vocab_block=None,
                   vocab_splits=None, interpret=None, softcap=None):
  """Flat per-token log-probs [N] fp32, 0 where the (bool) mask is false.

  Block sizes default to TOKEN_BLOCK / VOCAB_BLOCK (read at call time); vocab_splits=None
  picks enough forward programs to fill a GPU. interpret=None: compile (Triton) on GPU,
  interpret anywhere else (slow: tests only).
  """
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  return _pallas_logprob(h_NxD, w_VxD, targets_N, mask_N, token_block or TOKEN_BLOCK,
                         vocab_block or VOCAB_BLOCK, vocab_splits, interpret, softcap or None)
