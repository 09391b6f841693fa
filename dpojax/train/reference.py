"""The reference policy as the step sees it: which frozen tree holds it, its log-probs, and
the TR-DPO sync. Below the step; the precompute pass and its cache (which need the data) are
dpojax.train.precompute's, the mode rules dpojax.config's (`reference_mode`).

`reference.mode` (resolved once, never "auto" here):
  copy         an immutable copy of the initial policy (a second set of weights).
  lora_base    LoRA only: the base with the adapters off; no second copy of the weights.
  precomputed  each pair's reference log-prob sums, computed once before training, arrive
               with the batch (`ref_logps_chosen`/`_rejected` [A, P]); no reference weights
               are kept during training and the step skips the reference forward.
  none         reference-free (log-probs 0; same as dpo.reference_free=True).
TR-DPO (`reference.sync_steps` > 0, copy only): every sync_steps optimizer steps,
  ref <- alpha * policy + (1 - alpha) * ref  (alpha = reference.sync_alpha; TRL's
  SyncRefModelCallback). The reference then lives in `TrainState.ref`, so it is
  checkpointed and resumes exactly.

The frozen tree (the step's second argument, never trained; `split` builds it):
  no LoRA:  copy -> the reference params tree; otherwise {} (unused).
  LoRA:     {"base": base params} (+ "reference": a separate tree for copy); the trained
            tree is the adapters.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dpojax import config as config_lib
from dpojax.model import lora as lora_lib
from dpojax.train import logps as logps_lib
from dpojax.train import sharding


@dataclasses.dataclass(frozen=True)
class Reference:
  """What a resolved mode means for the step: the one answer to every question on the mode."""

  logps: str  # Its log-probs: "forward" (of its weights), "batch" (precomputed) or "zero".
  weights: str | None  # Where the frozen tree holds them: "" (the whole tree), a key, None.
  copied: bool  # Its weights are a copy of the initial policy (or TR-DPO's state.ref).
  base: bool = False  # LoRA: the trained tree is adapters on the frozen tree's "base".


# mode -> (its Reference without LoRA, with LoRA); config.reference_mode refuses lora_base
# without LoRA.
_REFERENCES = {
    "copy": (Reference("forward", weights="", copied=True),
             Reference("forward", weights="reference", copied=True, base=True)),
    "lora_base": (None, Reference("forward", weights="base", copied=False, base=True)),
    "precomputed": (Reference("batch", weights=None, copied=False),
                    Reference("batch", weights=None, copied=False, base=True)),
    "none": (Reference("zero", weights=None, copied=False),
             Reference("zero", weights=None, copied=False, base=True)),
}


def resolve(cfg) -> Reference:
  """The reference of a StepConfig (its mode and LoRA)."""
  return _REFERENCES[cfg.reference][cfg.lora is not None]


def _get(tree, key: str):
  return tree[key] if key else tree


def _put(tree, key: str, value):
  return {**tree, key: value} if key else value


def reference_key(cfg) -> str:
  """The per-sequence statistic the loss compares: LD-DPO's weighted sum or the plain sum."""
  return "ld_logps" if cfg.loss.ld_alpha is not None else "logps"


def reference_logps(ref_params, micro: dict, cfg):
  """[P, 2] reference statistics of one micro-batch (no gradient)."""
  ref = resolve(cfg)
  if ref.logps == "zero":  # No reference forward at all.
    return jnp.zeros(micro["pair_mask"].shape + (2,), jnp.float32)
  if ref.logps == "batch":
    if "ref_logps_chosen" not in micro:
      raise KeyError("reference.mode=precomputed: the batch has no 'ref_logps_chosen' / "
                     "'ref_logps_rejected' (add them with "
                     "dpojax.train.precompute.add_ref_logps)")
    return jnp.stack([micro["ref_logps_chosen"], micro["ref_logps_rejected"]],
                     axis=1).astype(jnp.float32)
  tree = jax.lax.stop_gradient(_get(ref_params, ref.weights))
  return logps_lib.sequence_logps(tree, micro, cfg, policy=False)[reference_key(cfg)]


def policy_inputs(trainable, frozen, cfg):
  """(weights, adapters) of the policy's forward: LoRA's adapters on the frozen base (no
  gradient into it), else the trained weights alone (adapters None)."""
  if not resolve(cfg).base:
    return trainable, None
  return jax.lax.stop_gradient(frozen["base"]), trainable


def frozen_tree(state_ref, ref_params, cfg):
  """The step's frozen tree with the TR-DPO reference from the state, when there is one."""
  if state_ref is None:
    return ref_params
  return _put(ref_params, resolve(cfg).weights, state_ref)


# --- the trained and frozen trees ---------------------------------------------------------
class Parts(NamedTuple):
  trainable: Any  # -> TrainState.params (the optimizer's and checkpoint's tree).
  frozen: Any  # -> the step's second argument.
  state_ref: Any  # -> TrainState.ref (TR-DPO), else None.


def _copy(tree):
  """New buffers with the same shardings (the train state is donated; the copy must not be)."""
  copy = lambda t: jax.tree.map(jnp.copy, t)
  if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(tree)):  # Host arrays.
    return jax.jit(copy)(tree)
  return jax.jit(copy, out_shardings=jax.tree.map(lambda x: x.sharding, tree))(tree)


def _adapters(step_cfg, init):
  """LoRA's initial adapters, `init(fn)` of their init function; None without LoRA."""
  if not resolve(step_cfg).base:
    return None
  return init(functools.partial(lora_lib.init, step_cfg.model, step_cfg.lora))


def split(step_cfg, params, *, sync: bool = False, rng=None, mesh=None) -> Parts:
  """The initial policy `params` -> (trained, frozen, state reference) for the step's mode.

  LoRA: adapters from `rng` (default: fold_in(key(step_cfg.seed), 1), apart from the model
  init's key(seed); replicated on `mesh`), the base is `params` itself (the same buffers:
  nothing is copied unless the mode is copy). Copies keep the shardings of `params`.
  """
  rng = jax.random.fold_in(jax.random.key(step_cfg.seed), 1) if rng is None else rng

  def init(fn):
    if mesh is not None:
      fn = jax.jit(fn, out_shardings=sharding.tree_shardings(jax.eval_shape(fn, rng), mesh))
    return fn(rng)

  return _assemble(step_cfg, params, _adapters(step_cfg, init), sync, _copy)


def abstract_split(step_cfg, abstract_params, *, sync: bool = False) -> Parts:
  """`split` on shapes only (jax.ShapeDtypeStruct trees), for compiling before any weights
  exist."""
  adapters = _adapters(step_cfg, lambda fn: jax.eval_shape(fn, jax.random.key(0)))
  return _assemble(step_cfg, abstract_params, adapters, sync, lambda t: t)


def _assemble(step_cfg, params, adapters, sync, copy) -> Parts:
  config_lib.check_sync(step_cfg.reference, sync)
  ref = resolve(step_cfg)
  frozen = {"base": params} if ref.base else {}
  if ref.copied and not sync:  # TR-DPO's copy lives in the state instead.
    frozen = _put(frozen, ref.weights, copy(params))
  return Parts(adapters if ref.base else params, frozen, copy(params) if sync else None)


def policy_params(step_cfg, trainable, frozen):
  """The policy as a plain params tree (LoRA: adapters merged into the base), e.g. to export."""
  weights, adapters = policy_inputs(trainable, frozen, step_cfg)
  if adapters is None:
    return weights
  return lora_lib.merge(weights, adapters, step_cfg.model, step_cfg.lora)


# --- TR-DPO --------------------------------------------------------------------------------
def sync(ref, policy, alpha: float):
  """ref <- alpha * policy + (1 - alpha) * ref, per leaf in float32, in ref's dtype."""
  def mix(r, p):
    return (alpha * p.astype(jnp.float32) + (1.0 - alpha) * r.astype(jnp.float32)).astype(
        r.dtype)
  return jax.tree.map(mix, ref, policy)


def sync_state(state, frozen, *, cfg, alpha: float):
  """The TR-DPO update of `state.ref` (a step.TrainState's) from the current policy (pure;
  jit with the state donated). The loop calls it after every `reference.sync_steps`-th
  optimizer step."""
  return state.replace(ref=sync(state.ref, policy_params(cfg, state.params, frozen), alpha))
