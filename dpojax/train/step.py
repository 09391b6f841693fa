"""The pure train and eval steps.

`train_step(state, ref_params, batch)` runs A micro-batches in a `lax.scan`, summing
gradients and metric sums; each micro-batch loss is its pair-loss sum divided by the number
of pairs in the whole global batch, so accumulation equals one big batch exactly.

The frozen weights are the second argument, never trained (no optimizer, no gradient); what
they hold and where the reference log-probs come from is dpojax.train.reference's (`split`
builds the trees). With TR-DPO sync the reference lives in `state.ref` (it evolves, so it is
checkpointed with the state) and takes precedence over the copy in the second argument.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpojax import config as config_lib
from dpojax import loss as loss_lib
from dpojax import model as model_lib
from dpojax.model import lora as lora_lib
from dpojax.model import moe as moe_lib
from dpojax.train import logps as logps_lib
from dpojax.train import reference as reference_lib


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static part of a step: model architecture and loss settings.

  `StepConfig(model=..., beta=...)` (no `loss`) still works: it means plain sigmoid DPO.
  """

  model: model_lib.ModelConfig
  loss: config_lib.LossConfig | None = None
  logprob_impl: str = "auto"  # logprob.impl
  logprob_token_block: int = 0  # Tile sizes of the streaming implementations; 0 = default.
  logprob_vocab_block: int = 0
  # With a `tensor` axis > 1 that divides the vocab, chunked log-probs run vocab-parallel on it.
  mesh: Any = None
  beta: dataclasses.InitVar[float | None] = None
  lora: lora_lib.LoraConfig | None = None  # Train adapters on a frozen base.
  reference: str = "copy"  # A config.REFERENCE_MODES entry; loss.reference_free: "none".
  seed: int = 0  # LoRA dropout stream (folded with the step and micro-batch index).

  def __post_init__(self, beta):
    if self.loss is None:
      loss = config_lib.LossConfig() if beta is None else config_lib.LossConfig(beta=beta)
      object.__setattr__(self, "loss", loss)
    elif beta is not None and beta != self.loss.beta:
      raise ValueError(f"StepConfig: beta={beta} disagrees with loss.beta={self.loss.beta}")
    # reference_free and mode none are one switch; copy, the default, gives way to it.
    mode = "none" if self.loss.reference_free and self.reference == "copy" else self.reference
    mode = config_lib.reference_mode(mode, lora=self.lora is not None,
                                     reference_free=self.loss.reference_free)
    object.__setattr__(self, "reference", mode)
    if mode == "none":
      object.__setattr__(self, "loss", dataclasses.replace(self.loss, reference_free=True))


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any  # What is trained: the policy, or its LoRA adapters.
  opt_state: Any
  ref: Any = None  # TR-DPO only: the evolving reference (None otherwise: not a leaf).


LR_SCHEDULES = ("cosine", "linear", "constant")


def linear_schedule(peak: float, warmup_steps: int, max_steps: int) -> optax.Schedule:
  """TRL's default (transformers' get_linear_schedule_with_warmup): step s of the update
  (0 for the first) gets peak * s / warmup during warmup, then peak * (max_steps - s) /
  (max_steps - warmup), down to 0 at max_steps."""
  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    warm = count / max(warmup_steps, 1)
    decay = jnp.maximum(0.0, (max_steps - count) / max(max_steps - warmup_steps, 1))
    return peak * jnp.where(count < warmup_steps, warm, decay)
  return schedule


def make_schedule(train_cfg) -> optax.Schedule:
  """train.lr_schedule after train.warmup_steps of linear warmup from 0 (cosine for run
  configs written before the key existed)."""
  kind = train_cfg.get("lr_schedule", "cosine")
  peak, warmup, steps = train_cfg.learning_rate, train_cfg.warmup_steps, train_cfg.max_steps
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=peak * train_cfg.min_lr_ratio)
  if kind == "linear":
    return linear_schedule(peak, warmup, steps)
  if kind == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                 optax.constant_schedule(peak)], [warmup])
  raise ValueError(f"train.lr_schedule={kind!r} is not one of {LR_SCHEDULES}")


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with linear warmup and train.lr_schedule's decay, after global-norm clipping."""
  schedule = make_schedule(train_cfg)
  chain = []
  if train_cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  chain.append(optax.adamw(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2,
                           eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay))
  return optax.chain(*chain), schedule


def init_state(params, tx, ref=None) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ref=ref)


def micro_loss(params, ref_params, micro: dict, cfg: StepConfig, normalizers: dict,
               dropout_rng=None):
  """(loss, metric sums) of one micro-batch; `params` are trained, `ref_params` frozen."""
  loss_cfg = cfg.loss
  weights, adapters = reference_lib.policy_inputs(params, ref_params, cfg)
  policy = logps_lib.sequence_logps(weights, micro, cfg, adapters=adapters,
                                    dropout_rng=dropout_rng)
  key = reference_lib.reference_key(cfg)
  reference_Px2 = reference_lib.reference_logps(ref_params, micro, cfg)
  stats = loss_lib.PairStats(
      policy_logps=policy[key], reference_logps=reference_Px2, counts=policy["counts"],
      pair_mask=micro["pair_mask"],
      gt_rewards=jnp.stack([micro["chosen_reward"], micro["rejected_reward"]], axis=1),
      policy_plain_logps=policy["logps"], wpo_logps=policy.get("wpo_logps"),
      nll_logps=policy.get("full_logps"), nll_counts=policy.get("full_counts"))
  loss, metrics = loss_lib.dpo_loss(stats, loss_cfg, num_pairs=normalizers["pairs"],
                                    num_chosen_tokens=normalizers.get("chosen_tokens"))
  metrics["tokens"] = jnp.sum(policy["counts"] * micro["pair_mask"][:, None])
  if "moe" in policy:  # The router losses of this forward, averaged over the micro-batches.
    loss = loss + moe_lib.router_loss(policy["moe"], cfg.model) / normalizers.get("micro_batches", 1)
    metrics.update(moe_lib.metric_sums(policy["moe"], cfg.model))
  return loss, metrics


def _global_normalizer(batch, cfg: StepConfig) -> dict:
  """Counts over the whole global batch that turn micro-batch sums into global means."""
  out = {"pairs": jnp.maximum(jnp.sum(batch["pair_mask"]), 1.0),
         "micro_batches": batch["pair_mask"].shape[0]}
  if cfg.loss.uses_token_sft:  # Chosen response tokens (even sequence ids), all micro-batches
    # (ORPO: prompt and response).
    flat = {k: batch[k].reshape(-1, batch[k].shape[-1])
            for k in ("tokens", "segment_ids", "loss_mask", "sequence_ids")}
    if cfg.loss.nll_over_prompt:
      flat["loss_mask"] = jnp.ones_like(flat["loss_mask"])
    _, mask, seq = logps_lib.shift_targets(flat, cfg.mesh)
    chosen = jnp.sum(mask & (seq >= 0) & (seq % 2 == 0))
    out["chosen_tokens"] = jnp.maximum(chosen.astype(jnp.float32), 1.0)
  return out


def _dropout_rng(cfg: StepConfig, step):
  if not (cfg.lora and cfg.lora.dropout):  # Dropout is LoRA's, in training only.
    return None
  return jax.random.fold_in(jax.random.key(cfg.seed), step)


def train_step(state: TrainState, ref_params, batch: dict, *, cfg: StepConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule):
  normalizer = _global_normalizer(batch, cfg)
  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  ref_params = reference_lib.frozen_tree(state.ref, ref_params, cfg)
  rng = _dropout_rng(cfg, state.step)

  def body(carry, xs):
    micro, index = xs
    grads_acc, metrics_acc = carry
    micro_rng = None if rng is None else jax.random.fold_in(rng, index)
    (_, metrics), grads = grad_fn(state.params, ref_params, micro, cfg, normalizer, micro_rng)
    grads_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads)
    metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
    return (grads_acc, metrics_acc), None

  first = jax.tree.map(lambda x: x[0], batch)
  metric_shapes = jax.eval_shape(
      lambda: micro_loss(state.params, ref_params, first, cfg, normalizer)[1])
  zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
  # Gradients add up in float32 at least (float64 parameters: float64).
  zeros_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
                             state.params)
  num_micro = jax.tree.leaves(batch)[0].shape[0]
  (grads, metrics), _ = jax.lax.scan(body, (zeros_grads, zeros_metrics),
                                     (batch, jnp.arange(num_micro)))

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if cfg.model.moe.freeze_router:  # Not even weight decay moves the routers.
    updates = moe_lib.freeze_router(updates)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["learning_rate"] = schedule(state.step)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params, ref_params, batch: dict, *, cfg: StepConfig):
  """Metric sums over the batch; `params` may be the TrainState (TR-DPO: its `ref` is used)."""
  if isinstance(params, TrainState):
    params, ref_params = params.params, reference_lib.frozen_tree(params.ref, ref_params, cfg)
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
