"""Per-sequence statistics of a micro-batch: the log-prob sums the loss compares.

`sequence_logps(weights, micro, cfg)` runs the model (LoRA's adapted one when `adapters` are
given) and reduces its response log-probs (only at the rows' `loss_positions` when the batch
carries them: data/buckets.py) to [P, 2] (chosen, rejected) sums, with LD-DPO's
length-weighted sums and WPO's per-token alignment when the loss asks for them. `cfg` is the
step's StepConfig (model, loss, logprob and LoRA settings).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpojax import model as model_lib
from dpojax.model import lora as lora_lib
from dpojax.ops import logprob as logprob_lib
from dpojax.ops import logprob_chunked
from dpojax.train import sharding


def _vocab_parallel(cfg) -> dict:
  """logprob's mesh arguments when the output layer's vocab rows are split over `tensor` (as
  sharding's rules split them when the axis divides the vocab) and the impl streams; with a
  context axis, always (the chunked loop then runs on each device's own tokens, and its
  vocab split over `tensor` where that axis divides the vocab)."""
  mesh, vocab = cfg.mesh, cfg.model.vocab_size
  tensor = 1 if mesh is None else mesh.shape.get("tensor", 1)
  if logprob_lib.resolve_impl(cfg.logprob_impl) != "chunked":
    return {}
  if sharding.context_size(mesh) > 1 and not vocab % tensor:
    return {"mesh": mesh, "vocab_axis": "tensor", "token_axes": sharding.BATCH + (
        sharding.CONTEXT,)}
  if tensor == 1 or vocab % tensor:
    return {}
  return {"mesh": mesh, "vocab_axis": "tensor", "token_axes": sharding.BATCH}


def _per_token_logps(hidden_BxTxD, out_weight_VxD, targets, mask, cfg):
  """logprob of every position; with a context axis over [B * T] tokens (rows and tokens
  both split, so the shard_map's token axis is data x fsdp x context)."""
  kwargs = dict(impl=cfg.logprob_impl, token_block=cfg.logprob_token_block,
                vocab_block=cfg.logprob_vocab_block, softcap=cfg.model.final_logit_softcap,
                **_vocab_parallel(cfg))
  if sharding.context_size(cfg.mesh) == 1:
    return logprob_lib.logprob(hidden_BxTxD, out_weight_VxD, targets, mask, **kwargs)
  b, t, d = hidden_BxTxD.shape
  return logprob_lib.logprob(hidden_BxTxD.reshape(b * t, d), out_weight_VxD,
                             targets.reshape(-1), mask.reshape(-1), **kwargs).reshape(b, t)


def shift_targets(rows: dict, mesh=None):
  """`logprob.shift_targets` of a batch's [..., T] row arrays, in original token order: with
  a context axis the rows arrive in its layout, so the shift by one (and LD-DPO's running
  count) reads the [..., T] integers put back in order (the callers put results back)."""
  c = sharding.context_size(mesh)
  return logprob_lib.shift_targets(*(sharding.from_context_layout(rows[k], c) for k in (
      "tokens", "segment_ids", "loss_mask", "sequence_ids")))


def sequence_logps(params, micro: dict, cfg, *, policy: bool = True,
                   adapters=None, dropout_rng=None) -> dict:
  """Per-sequence statistics of one micro-batch, each [P, 2] (chosen, rejected).

  logps: summed response log-probs; counts: response tokens; ld_logps (LD-DPO, when
  `ld_alpha` is set): the sum with tokens past the pair's shared length weighted by ld_alpha;
  wpo_logps (WPO, policy only): mean over tokens of (log p - log sum_v p_v^2), no gradient.
  With `adapters` (LoRA), `params` is the base and the model is the adapted one.
  moe (an MoE policy): its layers' router statistics (model/moe.py).
  """
  loss_cfg = cfg.loss
  moe = policy and cfg.model.moe.enabled  # The policy's router statistics (its aux loss).
  hidden_BxTxD = lora_lib.apply(
      params, adapters, cfg.model, cfg.lora, micro["tokens"], micro["positions"],
      micro["segment_ids"], micro.get("branch_ids"), dropout_rng=dropout_rng, mesh=cfg.mesh,
      return_moe=moe)
  if moe:
    hidden_BxTxD, moe_stats = hidden_BxTxD
  c = sharding.context_size(cfg.mesh)
  layout = lambda x: sharding.to_context_layout(x, c)
  targets, mask_orig, seq_orig = shift_targets(micro, cfg.mesh)
  targets, mask, target_seq = layout(targets), layout(mask_orig), layout(seq_orig)
  wide = mask
  if policy and loss_cfg.nll_over_prompt:  # ORPO's NLL: every target, the prompt's too.
    _, wide_orig, _ = shift_targets(dict(micro, loss_mask=jnp.ones_like(micro["loss_mask"])),
                                    cfg.mesh)
    wide = layout(wide_orig)
  complete = True
  if "loss_positions" in micro and c == 1 and wide is mask:
    # Response-only: [B, M] tokens from here on (ops/logprob.py); not with a context layout
    # (positions are in original order) nor ORPO's NLL over the prompt (every position).
    hidden_BxTxD, targets, kept, target_seq = logprob_lib.take_rows(
        micro["loss_positions"], hidden_BxTxD, targets, mask, target_seq)
    # Positions that miss a loss token would drop it silently: poison the sums instead.
    complete = jnp.all(jnp.sum(kept, axis=1) == jnp.sum(mask, axis=1))
    mask = wide = mask_orig = kept  # In order: LD-DPO's ranks read the gathered rows.
    seq_orig = target_seq
  out_weight_VxD = model_lib.output_weight(params, cfg.model)
  logp_BxT = _per_token_logps(hidden_BxTxD, out_weight_VxD, targets, wide, cfg)
  num_pairs = micro["pair_mask"].shape[0]
  num_seqs = 2 * num_pairs
  pairs = lambda x: x.reshape(num_pairs, 2)
  if complete is not True:
    logp_BxT = jnp.where(complete, logp_BxT, jnp.nan)
  sums, counts = logprob_lib.sequence_sums(logp_BxT, mask, target_seq, num_seqs)
  out = {"logps": pairs(sums), "counts": pairs(counts)}
  if wide is not mask:
    full_sums, full_counts = logprob_lib.sequence_sums(logp_BxT, wide, target_seq, num_seqs)
    out["full_logps"], out["full_counts"] = pairs(full_sums), pairs(full_counts)
  if moe:
    out["moe"] = moe_stats
  if loss_cfg.ld_alpha is not None:
    weight_BxT = layout(_ld_token_weights(mask_orig, seq_orig, counts, loss_cfg.ld_alpha))
    out["ld_logps"] = pairs(
        logprob_lib.sequence_sums(logp_BxT * weight_BxT, mask, target_seq, num_seqs)[0])
  if policy and loss_cfg.use_weighting:
    aligned_BxT = jax.lax.stop_gradient(
        logp_BxT - _log_sum_sq_probs(hidden_BxTxD, out_weight_VxD,
                                     cfg.model.final_logit_softcap))
    wpo_sums, _ = logprob_lib.sequence_sums(aligned_BxT, mask, target_seq, num_seqs)
    out["wpo_logps"] = pairs(wpo_sums / jnp.maximum(counts, 1.0))
  return out


def _ld_token_weights(mask_BxT, target_seq_BxT, counts_S, alpha: float):
  """LD-DPO: 1 on a sequence's first min(n_chosen, n_rejected) response tokens, alpha after.

  A token's rank within its sequence is the row's running count of response tokens minus
  the count before the sequence's first one (a sequence's response tokens are contiguous in
  its row), so this works for padded, packed and shared-prompt rows alike.
  """
  num_seqs = counts_S.shape[0]
  running_BxT = jnp.cumsum(mask_BxT.astype(jnp.int32), axis=1)
  seq_BxT = jnp.where(mask_BxT, target_seq_BxT, num_seqs)
  first_S = jax.ops.segment_min(
      jnp.where(mask_BxT, running_BxT, jnp.iinfo(jnp.int32).max).reshape(-1),
      seq_BxT.reshape(-1), num_segments=num_seqs + 1)
  rank_BxT = running_BxT - first_S[seq_BxT] + 1
  shared_S = jnp.repeat(jnp.min(counts_S.reshape(-1, 2), axis=1), 2)
  shared_BxT = jnp.append(shared_S, 0.0)[seq_BxT]
  return jnp.where(rank_BxT <= shared_BxT, 1.0, alpha)


def _log_sum_sq_probs(hidden_BxTxD, out_weight_VxD, softcap=0.0):
  """log sum_v softmax(logits)_v^2 per position (WPO), without gradient.

  Materialises the logits like the XLA logprob path; a fused log-prob kernel should return
  this alongside the log-probs.
  """
  logits_BxTxV = jnp.einsum(
      "btd,vd->btv", jax.lax.stop_gradient(hidden_BxTxD),
      jax.lax.stop_gradient(out_weight_VxD).astype(hidden_BxTxD.dtype),
      preferred_element_type=jnp.promote_types(hidden_BxTxD.dtype, jnp.float32))
  logits_BxTxV = logprob_chunked.softcap(logits_BxTxV, softcap)
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  return jax.nn.logsumexp(2.0 * logits_BxTxV, axis=-1) - 2.0 * lse_BxT
