"""The pure train and eval steps.

`train_step(state, ref_params, batch)` runs A micro-batches in a `lax.scan`, summing
gradients and metric sums; each micro-batch loss is its pair-loss sum divided by the number
of pairs in the whole global batch, so accumulation equals one big batch exactly.

The frozen weights are the second argument, never trained (no optimizer, no gradient). What
it holds depends on `StepConfig.reference` and `StepConfig.lora` (`dpojax.reference.split`
builds it):
  no LoRA:  copy -> the reference params tree; precomputed / none -> {} (unused).
  LoRA:     {"base": base params} (+ "reference": a separate tree for mode copy); the trained
            `state.params` are the adapters; lora_base's reference is the base, adapters off.
precomputed reads the reference log-probs from the batch (`ref_logps_chosen`/`_rejected`
[A, P]); none uses 0.
With TR-DPO sync the reference lives in `state.ref` (it evolves, so it is checkpointed with
the state) and takes precedence over the copy in the second argument.
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
from dpojax.model import lora as lora_lib
from dpojax.ops import logprob as logprob_lib
from dpojax.train import sharding

REFERENCE_MODES = ("copy", "lora_base", "precomputed", "none")


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static part of a step: model architecture and loss settings.

  `StepConfig(model=..., beta=...)` (no `loss`) still works: it means plain sigmoid DPO.
  """

  model: model_lib.ModelConfig
  loss: loss_lib.LossConfig | None = None
  logprob_impl: str = "xla"
  logprob_token_block: int = 0  # Tile sizes of the streaming implementations; 0 = default.
  logprob_vocab_block: int = 0
  # With a `tensor` axis > 1 that divides the vocab, chunked log-probs run vocab-parallel on it.
  mesh: Any = None
  beta: dataclasses.InitVar[float | None] = None
  lora: lora_lib.LoraConfig | None = None  # Train adapters on a frozen base.
  reference: str = "copy"  # One of REFERENCE_MODES; loss.reference_free means "none".
  seed: int = 0  # LoRA dropout stream (folded with the step and micro-batch index).

  def __post_init__(self, beta):
    if self.loss is None:
      object.__setattr__(self, "loss", loss_lib.LossConfig(beta=0.1 if beta is None else beta))
    elif beta is not None and beta != self.loss.beta:
      raise ValueError(f"StepConfig: beta={beta} disagrees with loss.beta={self.loss.beta}")
    if self.reference not in REFERENCE_MODES:
      raise ValueError(f"reference.mode={self.reference!r} is not one of {REFERENCE_MODES}")
    if self.loss.reference_free:  # One switch for "no reference": mode none.
      if self.reference not in ("copy", "none"):
        raise ValueError(f"dpo.reference_free=True contradicts reference.mode="
                         f"{self.reference!r}; use reference.mode=none")
      object.__setattr__(self, "reference", "none")
    elif self.reference == "none":
      object.__setattr__(self, "loss", dataclasses.replace(self.loss, reference_free=True))
    if self.reference == "lora_base" and self.lora is None:
      raise ValueError("reference.mode=lora_base needs lora.enabled=True")


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


def _vocab_parallel(cfg: StepConfig) -> dict:
  """logprob's mesh arguments when the output layer's vocab rows are split over `tensor` (as
  sharding's rules split them when the axis divides the vocab) and the impl streams."""
  mesh, vocab = cfg.mesh, cfg.model.vocab_size
  tensor = 1 if mesh is None else mesh.shape.get("tensor", 1)
  if tensor == 1 or vocab % tensor or logprob_lib.resolve_impl(cfg.logprob_impl) != "chunked":
    return {}
  return {"mesh": mesh, "vocab_axis": "tensor", "token_axes": sharding.BATCH}


def sequence_logps(params, micro: dict, cfg: StepConfig, *, policy: bool = True,
                   adapters=None, dropout_rng=None) -> dict:
  """Per-sequence statistics of one micro-batch, each [P, 2] (chosen, rejected).

  logps: summed response log-probs; counts: response tokens; ld_logps (LD-DPO, when
  `ld_alpha` is set): the sum with tokens past the pair's shared length weighted by ld_alpha;
  wpo_logps (WPO, policy only): mean over tokens of (log p - log sum_v p_v^2), no gradient.
  With `adapters` (LoRA), `params` is the base and the model is the adapted one.
  """
  loss_cfg = cfg.loss
  hidden_BxTxD = lora_lib.apply(
      params, adapters, cfg.model, cfg.lora, micro["tokens"], micro["positions"],
      micro["segment_ids"], micro.get("branch_ids"), dropout_rng=dropout_rng, mesh=cfg.mesh)
  targets, mask, target_seq = logprob_lib.shift_targets(
      micro["tokens"], micro["segment_ids"], micro["loss_mask"], micro["sequence_ids"])
  out_weight_VxD = model_lib.output_weight(params, cfg.model)
  logp_BxT = logprob_lib.logprob(hidden_BxTxD, out_weight_VxD, targets, mask,
                                 impl=cfg.logprob_impl, token_block=cfg.logprob_token_block,
                                 vocab_block=cfg.logprob_vocab_block, **_vocab_parallel(cfg))
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


def _log_sum_sq_probs(hidden_BxTxD, out_weight_VxD):
  """log sum_v softmax(logits)_v^2 per position (WPO), without gradient.

  Materialises the logits like the XLA logprob path; a fused log-prob kernel should return
  this alongside the log-probs.
  """
  logits_BxTxV = jnp.einsum(
      "btd,vd->btv", jax.lax.stop_gradient(hidden_BxTxD),
      jax.lax.stop_gradient(out_weight_VxD).astype(hidden_BxTxD.dtype),
      preferred_element_type=jnp.promote_types(hidden_BxTxD.dtype, jnp.float32))
  lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  return jax.nn.logsumexp(2.0 * logits_BxTxV, axis=-1) - 2.0 * lse_BxT


def reference_key(cfg: StepConfig) -> str:
  """The per-sequence statistic the loss compares: LD-DPO's weighted sum or the plain sum."""
  return "ld_logps" if cfg.loss.ld_alpha is not None else "logps"


def reference_logps(ref_params, micro: dict, cfg: StepConfig):
  """[P, 2] reference statistics of one micro-batch, by `cfg.reference` (no gradient)."""
  key = reference_key(cfg)
  if cfg.reference == "none":  # No reference forward at all.
    return jnp.zeros(micro["pair_mask"].shape + (2,), jnp.float32)
  if cfg.reference == "precomputed":
    if "ref_logps_chosen" not in micro:
      raise KeyError("reference.mode=precomputed: the batch has no 'ref_logps_chosen' / "
                     "'ref_logps_rejected' (add them with dpojax.reference.add_ref_logps)")
    return jnp.stack([micro["ref_logps_chosen"], micro["ref_logps_rejected"]],
                     axis=1).astype(jnp.float32)
  if cfg.reference == "lora_base":  # The base with its adapters off.
    tree = ref_params["base"]
  else:
    tree = ref_params["reference"] if cfg.lora is not None else ref_params
  return sequence_logps(jax.lax.stop_gradient(tree), micro, cfg, policy=False)[key]


def micro_loss(params, ref_params, micro: dict, cfg: StepConfig, normalizers: dict,
               dropout_rng=None):
  """(loss, metric sums) of one micro-batch; `params` are trained, `ref_params` frozen."""
  loss_cfg = cfg.loss
  if cfg.lora is not None:
    policy = sequence_logps(jax.lax.stop_gradient(ref_params["base"]), micro, cfg,
                            adapters=params, dropout_rng=dropout_rng)
  else:
    policy = sequence_logps(params, micro, cfg)
  key = reference_key(cfg)
  reference_Px2 = reference_logps(ref_params, micro, cfg)
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


def frozen_tree(state_ref, ref_params, cfg: StepConfig):
  """The step's frozen tree with the TR-DPO reference from the state, when there is one."""
  if state_ref is None:
    return ref_params
  return state_ref if cfg.lora is None else {**ref_params, "reference": state_ref}


def _dropout_rng(cfg: StepConfig, step):
  if cfg.lora is None or cfg.lora.dropout == 0:
    return None
  return jax.random.fold_in(jax.random.key(cfg.seed), step)


def train_step(state: TrainState, ref_params, batch: dict, *, cfg: StepConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule):
  normalizer = _global_normalizer(batch, cfg)
  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
  ref_params = frozen_tree(state.ref, ref_params, cfg)
  rng = _dropout_rng(cfg, state.step)

  def body(carry, xs):
    micro, index = xs
    grads_acc, metrics_acc = carry
    micro_rng = None if rng is None else jax.random.fold_in(rng, index)
    (_, metrics), grads = grad_fn(state.params, ref_params, micro, cfg, normalizer, micro_rng)
    grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
    metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
    return (grads_acc, metrics_acc), None

  first = jax.tree.map(lambda x: x[0], batch)
  metric_shapes = jax.eval_shape(
      lambda: micro_loss(state.params, ref_params, first, cfg, normalizer)[1])
  zeros_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
  zeros_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  num_micro = jax.tree.leaves(batch)[0].shape[0]
  (grads, metrics), _ = jax.lax.scan(body, (zeros_grads, zeros_metrics),
                                     (batch, jnp.arange(num_micro)))

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["learning_rate"] = schedule(state.step)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params, ref_params, batch: dict, *, cfg: StepConfig):
  """Metric sums over the batch; `params` may be the TrainState (TR-DPO: its `ref` is used)."""
  if isinstance(params, TrainState):
    params, ref_params = params.params, frozen_tree(params.ref, ref_params, cfg)
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
