"""Linear layers' matmuls and the gated activation, with backward passes written out.

Autodiff of the einsums and slices they replace gives the same values; their own VJPs keep
XLA:CPU from transposing or zero-padding the largest activations (see each docstring).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_MxI, w_IxO, contract: int):
  return jnp.tensordot(x_MxI, w_IxO, axes=contract)


def _matmul_fwd(x_MxI, w_IxO, contract):
  return _matmul(x_MxI, w_IxO, contract), (x_MxI, w_IxO)


def _matmul_bwd(contract, res, dy_MxO):
  x_MxI, w_IxO = res
  out = w_IxO.ndim - contract
  dx = jnp.tensordot(dy_MxO, w_IxO, axes=(tuple(range(1, 1 + out)),
                                          tuple(range(contract, w_IxO.ndim))))
  return dx, jnp.tensordot(x_MxI, dy_MxO, axes=((0,), (0,)))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x, w, contract: int = 1):
  """x [..., *in] @ w [*in, *out], `in` being x's last `contract` axes, with x's leading
  axes merged into one.

  Its backward is written out over that merged axis (dy w^T, x^T dy): autodiff of the einsum
  over [B, T, ...] made XLA:CPU transpose the largest gradient (fc1's [B T, 2, F]) before the
  weight-gradient product (with the scan unrolled, 6% faster issue-10 steps on CPU). The
  weight keeps its axes, so a tensor-parallel shard of fc1's F stays where it is. The same
  products, so the same numerics.
  """
  lead = x.shape[:x.ndim - contract]
  y = _matmul(x.reshape(-1, *x.shape[x.ndim - contract:]), w, contract)
  return y.reshape(*lead, *y.shape[1:])


@jax.custom_vjp
def swiglu(h_BxTx2xF):
  """silu(gate) * up of fc1's [gate; up] output.

  Its own backward writes d[gate; up] in one pass: autodiff of the two slices builds two
  zero-padded [B, T, 2, F] gradients and adds them (four passes over the largest activation).
  A custom VJP: reverse mode only (jax.jvp through it raises).
  """
  return jax.nn.silu(h_BxTx2xF[..., 0, :]) * h_BxTx2xF[..., 1, :]


def _swiglu_fwd(h_BxTx2xF):
  return swiglu(h_BxTx2xF), h_BxTx2xF


def _swiglu_bwd(h_BxTx2xF, dy_BxTxF):
  gate, up = h_BxTx2xF[..., 0, :], h_BxTx2xF[..., 1, :]
  sig = jax.nn.sigmoid(gate)
  d_gate = dy_BxTxF * up * sig * (1 + gate * (1 - sig))
  # A select over the pair axis, not a stack: XLA:CPU emits the concatenation slowly inside
  # the layer scan (5x the time of this loop there).
  first = (jnp.arange(2) == 0)[:, None]
  return (jnp.where(first, d_gate[..., None, :], (dy_BxTxF * gate * sig)[..., None, :]),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
