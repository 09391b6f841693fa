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
  """The static part of a step: model architecture and loss settings."""

  model: model_lib.ModelConfig
  beta: float
  logprob_impl: str = "xla"


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


def sequence_logps(params, micro: dict, cfg: StepConfig):
  """Per-sequence response log-prob sums and token counts, as [P, 2] (chosen, rejected)."""
  hidden_BxTxD = model_lib.apply(
      params, cfg.model, micro["tokens"], micro["positions"], micro["segment_ids"])
  targets, mask, target_seq = logprob_lib.shift_targets(
      micro["tokens"], micro["segment_ids"], micro["loss_mask"], micro["sequence_ids"])
  logp_BxT = logprob_lib.logprob(
      hidden_BxTxD, model_lib.output_weight(params, cfg.model), targets, mask,
      impl=cfg.logprob_impl)
  num_pairs = micro["pair_mask"].shape[0]
  sums, counts = logprob_lib.sequence_sums(logp_BxT, mask, target_seq, 2 * num_pairs)
  return sums.reshape(num_pairs, 2), counts.reshape(num_pairs, 2)


def micro_loss(params, ref_params, micro: dict, cfg: StepConfig, normalizer):
  policy_Px2, counts_Px2 = sequence_logps(params, micro, cfg)
  reference_Px2, _ = sequence_logps(jax.lax.stop_gradient(ref_params), micro, cfg)
  loss, metrics = loss_lib.dpo_loss(policy_Px2, reference_Px2, micro["pair_mask"],
                                    beta=cfg.beta, normalizer=normalizer)
  metrics["tokens"] = jnp.sum(counts_Px2 * micro["pair_mask"][:, None])
  return loss, metrics


def _global_normalizer(batch):
  return jnp.maximum(jnp.sum(batch["pair_mask"]), 1.0)


def train_step(state: TrainState, ref_params, batch: dict, *, cfg: StepConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule):
  normalizer = _global_normalizer(batch)
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
  normalizer = _global_normalizer(batch)

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
