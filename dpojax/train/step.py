"""The pure train and eval steps.

`train_step(state, ref_params, batch)` runs A micro-batches in a `lax.scan`, summing
gradients and metric sums; each micro-batch loss is its pair-loss sum divided by the number
of pairs in the whole global batch, so accumulation equals one big batch exactly.
The reference parameters are an argument, never part of the state: no optimizer, no gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpojax import loss as loss_lib
from dpojax import model as model_lib
from dpojax.ops import logprob as logprob_lib


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static part of a step: model architecture and loss settings.

  `StepConfig(model=..., beta=...)` (no `loss`) still works: it means plain sigmoid DPO.
  """

  model: model_lib.ModelConfig
  loss: loss_lib.LossConfig | None = None
  logprob_impl: str = "xla"
  beta: dataclasses.InitVar[float | None] = None

  def __post_init__(self, beta):
    if self.loss is None:
      object.__setattr__(self, "loss", loss_lib.LossConfig(beta=0.1 if beta is None else beta))
    elif beta is not None and beta != self.loss.beta:
      raise ValueError(f"StepConfig: beta={beta} disagrees with loss.beta={self.loss.beta}")


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup and cosine decay, after global-norm clipping."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.learning_rate,
      warmup_steps=train_cfg.warmup_steps,
      decay_steps=max(train_cfg.max_steps, train_cfg.warmup_steps + 1),
      end_value=train_cfg.learning_rate * train_cfg.min_lr_ratio)
  chain = []
  if train_cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  chain.append(optax.adamw(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2,
                           eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay))
  return optax.chain(*chain), schedule


def init_state(params, tx) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def sequence_logps(params, micro: dict, cfg: StepConfig, *, policy: bool = True) -> dict:
  """Per-sequence statistics of one micro-batch, each [P, 2] (chosen, rejected).

  logps: summed response log-probs; counts: response tokens; ld_logps (LD-DPO, when
  `ld_alpha` is set): the sum with tokens past the pair's shared length weighted by ld_alpha;
  wpo_logps (WPO, policy only): mean over tokens of (log p - log sum_v p_v^2), no gradient.
  """
  loss_cfg = cfg.loss
  hidden_BxTxD = model_lib.apply(
      params, cfg.model, micro["tokens"], micro["positions"], micro["segment_ids"])
  targets, mask, target_seq = logprob_lib.shift_targets(
      micro["tokens"], micro["segment_ids"], micro["loss_mask"], micro["sequence_ids"])
  out_weight_VxD = model_lib.output_weight(params, cfg.model)
  logp_BxT = logprob_lib.logprob(hidden_BxTxD, out_weight_VxD, targets, mask,
                                 impl=cfg.logprob_impl)
  num_pairs = micro["pair_mask"].shape[0]
  num_seqs = 2 * num_pairs
  pairs = lambda x: x.reshape(num_pairs, 2)
  sums, counts = logprob_lib.sequence_sums(logp_BxT, mask, target_seq, num_seqs)
  out = {"logps": pairs(sums), "counts": pairs(counts)}
  if loss_cfg.ld_alpha is not None:
    weight_BxT = _ld_token_weights(mask, target_seq, counts, loss_cfg.ld_alpha)
    out["ld_logps"] = pairs(
        logprob_lib.sequence_sums(logp_BxT * weight_BxT, mask, target_seq, num_seqs)[0])
  if policy and loss_cfg.use_weighting:
    aligned_BxT = jax.lax.stop_gradient(
        logp_BxT - _log_sum_sq_probs(hidden_BxTxD, out_weight_VxD))
    wpo_sums, _ = logprob_lib.sequence_sums(aligned_BxT, mask, target_seq, num_seqs)
    out["wpo_logps"] = pairs(wpo_sums / jnp.maximum(counts, 1.0))
  return out


def _ld_token_weights(mask_BxT, target_seq_BxT, counts_S, alpha: float):
  """LD-DPO: 1 on a sequence's first min(n_chosen, n_rejected) response tokens, alpha after.

  A token's rank within its sequence is the row's running count of response tokens minus
  the count before the sequence's first one (a sequence is one contiguous segment of a row),
  so this works for padded and packed rows alike.
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


def _log_sum_sq_probs(hidden_BxTxD, out_weight_VxD):
  """log sum_v softmax(logits)_v^2 per position (WPO), without gradient.

  Materialises the logits like the XLA logprob path; a fused log-prob kernel should return
  this alongside the log-probs.
  """
  logits_BxTxV = jnp.einsum(
      "btd,vd->btv", jax.lax.stop_gradient(hidden_BxTxD),
      jax.lax.stop_gradient(out_weight_VxD).astype(hidden_BxTxD.dtype),
      preferred_element_type=jnp.float32)
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  return jax.nn.logsumexp(2.0 * logits_BxTxV, axis=-1) - 2.0 * lse_BxT


def micro_loss(params, ref_params, micro: dict, cfg: StepConfig, normalizers: dict):
  loss_cfg = cfg.loss
  policy = sequence_logps(params, micro, cfg)
  key = "ld_logps" if loss_cfg.ld_alpha is not None else "logps"
  if loss_cfg.reference_free:  # No reference forward at all.
    reference_Px2 = jnp.zeros_like(policy["logps"])
  else:
    reference_Px2 = sequence_logps(
        jax.lax.stop_gradient(ref_params), micro, cfg, policy=False)[key]
  stats = loss_lib.PairStats(
      policy_logps=policy[key], reference_logps=reference_Px2, counts=policy["counts"],
      pair_mask=micro["pair_mask"],
      gt_rewards=jnp.stack([micro["chosen_reward"], micro["rejected_reward"]], axis=1),
      policy_plain_logps=policy["logps"], wpo_logps=policy.get("wpo_logps"))
  loss, metrics = loss_lib.dpo_loss(stats, loss_cfg, num_pairs=normalizers["pairs"],
                                    num_chosen_tokens=normalizers.get("chosen_tokens"))
  metrics["tokens"] = jnp.sum(policy["counts"] * micro["pair_mask"][:, None])
  return loss, metrics


def _global_normalizer(batch, cfg: StepConfig) -> dict:
  """Counts over the whole global batch that turn micro-batch sums into global means."""
  out = {"pairs": jnp.maximum(jnp.sum(batch["pair_mask"]), 1.0)}
  if cfg.loss.uses_token_sft:  # Chosen response tokens (even sequence ids), all micro-batches.
    flat = lambda k: batch[k].reshape(-1, batch[k].shape[-1])
    _, mask, seq = logprob_lib.shift_targets(
        flat("tokens"), flat("segment_ids"), flat("loss_mask"), flat("sequence_ids"))
    chosen = jnp.sum(mask & (seq >= 0) & (seq % 2 == 0))
    out["chosen_tokens"] = jnp.maximum(chosen.astype(jnp.float32), 1.0)
  return out


def train_step(state: TrainState, ref_params, batch: dict, *, cfg: StepConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule):
  normalizer = _global_normalizer(batch, cfg)
  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def body(carry, micro):
    grads_acc, metrics_acc = carry
    (_, metrics), grads = grad_fn(state.params, ref_params, micro, cfg, normalizer)
    grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
    metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
    return (grads_acc, metrics_acc), None

  first = jax.tree.map(lambda x: x[0], batch)
  metric_shapes = jax.eval_shape(
      lambda: micro_loss(state.params, ref_params, first, cfg, normalizer)[1])
  zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
  zeros_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  (grads, metrics), _ = jax.lax.scan(body, (zeros_grads, zeros_metrics), batch)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["learning_rate"] = schedule(state.step)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params, ref_params, batch: dict, *, cfg: StepConfig):
  normalizer = _global_normalizer(batch, cfg)

  def body(acc, micro):
    _, metrics = micro_loss(params, ref_params, micro, cfg, normalizer)
    return (metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)), None

  first = jax.tree.map(lambda x: x[0], batch)
  acc, _ = body(None, first)
  rest = jax.tree.map(lambda x: x[1:], batch)
  acc, _ = jax.lax.scan(body, acc, rest)
  return acc


def jit_steps(cfg: StepConfig, tx, schedule):
  """Jitted once per run; the state is donated."""
  train = jax.jit(functools.partial(train_step, cfg=cfg, tx=tx, schedule=schedule),
                  donate_argnums=(0,))
  evaluate = jax.jit(functools.partial(eval_step, cfg=cfg))
  return train, evaluate
