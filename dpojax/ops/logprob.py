"""Per-token log-probabilities of the targets, and the per-sequence reduction every path uses.

A batch row holds one or more sequences (segments). Token t is predicted at position t-1 of
the same segment, so `shift_targets` is the only place where the shift by one happens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


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


def logprob(hidden_BxTxD, out_weight_VxD, targets_BxT, mask_BxT, impl: str = "xla"):
  """log softmax(hidden @ out_weight.T)[target] per token, 0 where the mask is false (fp32)."""
  if impl != "xla":
    raise ValueError(f"logprob.impl={impl!r} is not one of {IMPLEMENTATIONS}")
  logits_BxTxV = jnp.einsum(
      "btd,vd->btv", hidden_BxTxD, out_weight_VxD.astype(hidden_BxTxD.dtype),
      preferred_element_type=jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], -1)[..., 0]
  return jnp.where(mask_BxT, target_logit_BxT - lse_BxT, 0.0)


def sequence_sums(values_BxT, mask_BxT, sequence_BxT, num_sequences: int):
  """Per-sequence sums of `values` and token counts over masked positions: ([S], [S])."""
  ids = jnp.where(mask_BxT, sequence_BxT, num_sequences).reshape(-1)  # Dropped bucket.
  vals = jnp.where(mask_BxT, values_BxT, 0.0).reshape(-1)
  sums = jax.ops.segment_sum(vals, ids, num_segments=num_sequences + 1)[:num_sequences]
  counts = jax.ops.segment_sum(
      mask_BxT.reshape(-1).astype(jnp.float32), ids, num_segments=num_sequences + 1)
  return sums, counts[:num_sequences]
