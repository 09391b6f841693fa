"""Per-token log-probabilities of the targets, and the per-sequence reduction every path uses.

A batch row holds one or more sequences (segments). Token t is predicted at position t-1 of
the same segment, so `shift_targets` is the only place where the shift by one happens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpojax.ops import logprob_chunked
from dpojax.ops import logprob_pallas
from dpojax.ops import logprob_triton  # Imports jax-triton only when a kernel runs.

IMPLEMENTATIONS = ("xla", "chunked", "pallas", "triton")
# What `auto` picks per backend: chunked, measured on CPU and on an H100 (BUILD.md) to keep
# memory flat at little cost in time (GPU: 1.3x the full logits' time, 1/17 of their memory).
AUTO = {"cpu": "chunked", "gpu": "chunked", "tpu": "chunked"}


def shift_targets(tokens_BxT, segment_ids_BxT, loss_mask_BxT, sequence_ids_BxT):
  """Targets for each position: the next token, if it is a response token of the same segment.

  Returns (targets_BxT, target_mask_BxT, target_sequence_BxT): position t predicts
  tokens[t + 1]; the mask is false on the last position, across segment boundaries, on
  prompt and padding targets. `target_sequence` is the sequence the target belongs to.
  """
  pad = lambda x, v: jnp.concatenate([x[:, 1:], jnp.full_like(x[:, :1], v)], axis=1)
  targets = pad(tokens_BxT, 0)
  same_segment = pad(segment_ids_BxT, -1) == segment_ids_BxT
  mask = same_segment & (pad(loss_mask_BxT, 0) > 0) & (segment_ids_BxT > 0)
  return targets, mask, pad(sequence_ids_BxT, -1)


def take_rows(positions_BxM, *arrays):
  """Each array ([B, T] or [B, T, D]) gathered along axis 1 at `positions` ([B, M]).

  With a row's response positions (the batch's `loss_positions`), the log-prob of any
  implementation then runs on [B, M] tokens instead of [B, T]: the output layer and the
  log-softmax only where a loss reads them. The gather's transpose scatters the hidden
  states' cotangent back, so gradients are the full path's.
  """
  take = lambda x: jnp.take_along_axis(
      x, positions_BxM.reshape(positions_BxM.shape + (1,) * (x.ndim - 2)), axis=1)
  return tuple(take(x) for x in arrays)


def resolve_impl(impl: str) -> str:
  """`auto` -> the backend's default; anything else must be a known implementation."""
  if impl == "auto":
    return AUTO.get(jax.default_backend(), "chunked")
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"logprob.impl={impl!r} is not one of {('auto',) + IMPLEMENTATIONS}")
  return impl


def xla_logprob(hidden_NxD, out_weight_VxD, targets_N, mask_N, softcap=None):
  """The reference: full logits in at least fp32 (float64 stays float64), autodiff for the
  gradient."""
  logits_NxV = jnp.einsum(
      "nd,vd->nv", hidden_NxD, out_weight_VxD.astype(hidden_NxD.dtype),
      preferred_element_type=jnp.promote_types(hidden_NxD.dtype, jnp.float32))
  logits_NxV = logprob_chunked.softcap(logits_NxV, softcap)
  lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  target_logit_N = jnp.take_along_axis(logits_NxV, targets_N[:, None], -1)[:, 0]
  return jnp.where(mask_N, target_logit_N - lse_N, 0.0)


def logprob(hidden_BxTxD, out_weight_VxD, targets_BxT, mask_BxT, impl: str = "auto", *,
            token_block: int | None = None, vocab_block: int | None = None, mesh=None,
            vocab_axis: str = "tensor", token_axes=None, softcap: float | None = None):
  """log softmax(hidden @ out_weight.T)[target] per token, 0 where the mask is false (fp32).

  hidden is [..., D] (any leading token axes; targets and mask have those axes), out_weight
  [V, D]; the product runs in hidden's dtype with fp32 accumulation. Every implementation
  is differentiable in hidden and out_weight for any per-token cotangent, with exactly zero
  gradient from masked tokens:
    xla      full [tokens, V] fp32 logits (the reference; 2 x tokens x V x 4 bytes with grad);
    chunked  pure-JAX streaming over token x vocab tiles (ops/logprob_chunked.py); with
             `mesh` and out_weight rows split over `vocab_axis`, the vocab-parallel variant;
    pallas   a Pallas kernel (Triton on GPU, interpreted elsewhere: slow, for tests);
    triton   a jax-triton kernel, GPU only.
  token_block / vocab_block override the implementation's tile sizes (None or 0: its default).
  `softcap` c (Gemma 2's final_logit_softcapping; None or 0: none) caps every logit to
  c * tanh(z / c) before the softmax, inside each fused path's tiles.
  With `mesh`, chunked runs vocab-parallel: out_weight's rows split over `vocab_axis`, the
  token axis over `token_axes` (see logprob_chunked.logprob_vocab_parallel); with
  `token_axes`, it runs so even when `vocab_axis` has one device (each device's own tokens).
  """
  impl = resolve_impl(impl)
  lead = targets_BxT.shape
  if hidden_BxTxD.shape[:-1] != lead or mask_BxT.shape != lead:
    raise ValueError(f"logprob: hidden {hidden_BxTxD.shape}, targets {lead} and mask "
                     f"{mask_BxT.shape} must share their leading (token) axes")
  if out_weight_VxD.shape[-1] != hidden_BxTxD.shape[-1]:
    raise ValueError(f"logprob: out_weight {out_weight_VxD.shape} and hidden "
                     f"{hidden_BxTxD.shape} disagree on D")
  blocks = {k: v for k, v in (("token_block", token_block), ("vocab_block", vocab_block)) if v}
  # With `token_axes` (a row split over a context axis), the shard_map even on one vocab shard.
  if mesh is not None and (mesh.shape.get(vocab_axis, 1) > 1 or token_axes) and impl != "xla":
    # xla needs nothing: GSPMD partitions its full-logits einsum by itself.
    if impl != "chunked":
      raise ValueError(f"logprob.impl={impl!r}: only 'chunked' and 'xla' support a vocab "
                       f"sharded over mesh axis {vocab_axis!r}")
    return logprob_chunked.logprob_vocab_parallel(
        hidden_BxTxD, out_weight_VxD, targets_BxT, mask_BxT, mesh=mesh, vocab_axis=vocab_axis,
        token_axes=token_axes, softcap=softcap, **blocks)
  h_NxD = hidden_BxTxD.reshape(-1, hidden_BxTxD.shape[-1])
  args = (h_NxD, out_weight_VxD, targets_BxT.reshape(-1), mask_BxT.reshape(-1).astype(bool))
  if impl == "xla":
    logp_N = xla_logprob(*args, softcap)
  elif impl == "chunked":
    logp_N = logprob_chunked.chunked_logprob(*args, softcap=softcap, **blocks)
  elif impl == "pallas":
    logp_N = logprob_pallas.pallas_logprob(*args, softcap=softcap, **blocks)
  else:
    logp_N = logprob_triton.triton_logprob(*args, softcap=softcap, **blocks)
  return logp_N.reshape(lead)


def sequence_sums(values_BxT, mask_BxT, sequence_BxT, num_sequences: int):
  """Per-sequence sums of `values` and token counts over masked positions: ([S], [S])."""
  ids = jnp.where(mask_BxT, sequence_BxT, num_sequences).reshape(-1)  # Dropped bucket.
  vals = jnp.where(mask_BxT, values_BxT, 0.0).reshape(-1)
  sums = jax.ops.segment_sum(vals, ids, num_segments=num_sequences + 1)[:num_sequences]
  counts = jax.ops.segment_sum(
      mask_BxT.reshape(-1).astype(jnp.float32), ids, num_segments=num_sequences + 1)
  return sums, counts[:num_sequences]
