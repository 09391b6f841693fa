"""The whole methods next to DPO: SimPO and CPO (TRL's CPOTrainer, with AlphaPO's reward
shaping), ORPO (ORPOTrainer), all three reference-free, and KTO (KTOTrainer, unpaired data).

Each is one `dpo.preference_loss` name with its own parameters (TRL's defaults, in
configs/dpo_gpt.py); this module holds their names and the checks that tie them to the rest
of the `dpo` section (dpojax.config calls `validate`). Their losses are dpojax.loss_ref_free's
and dpojax.loss_kto's; docs/losses.md has every formula and its source.
"""

from __future__ import annotations

import math

from dpojax.errors import ConfigError

# TRL CPOConfig.loss_type sigmoid | hinge | ipo | simpo, and ORPO: no reference at all.
REFERENCE_FREE_LOSSES = ("simpo", "cpo", "cpo_hinge", "cpo_ipo", "orpo")
# TRL KTOConfig.loss_type: one completion and a desirable/undesirable label per example.
UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired")
METHOD_LOSSES = REFERENCE_FREE_LOSSES + UNPAIRED_LOSSES
# TRL compares mean (not summed) response log-probs for these (average_log_prob=True).
AVERAGED_LOSSES = ("simpo", "cpo_ipo", "orpo")
# TRL's NLL term of ORPO runs over prompt and response (CPO's over the response only).
PROMPT_NLL_LOSSES = ("orpo",)
# Losses whose KL estimate needs the mismatched (prompt, other completion) sequences.
KL_LOSSES = ("kto",)


def method(losses) -> str | None:
  """The method a `dpo.losses` tuple names, or None for the pairwise DPO family."""
  found = [n for n in losses if n in METHOD_LOSSES]
  return found[0] if found else None


def section_is_reference_free(dpo) -> bool:
  """`dpo.reference_free`, or a loss that has no reference (from the raw `dpo` section)."""
  if dpo.get("reference_free", False):
    return True
  losses = tuple(dpo.get("losses", ()) or (dpo.get("preference_loss", "dpo"),))
  return all(n in REFERENCE_FREE_LOSSES for n in losses)


def check_data(cfg, data, train):
  """The data and batch settings a method cannot work with (`data`, `train` sections)."""
  if (cfg.method in KL_LOSSES and train.micro_batch_size < 2
      and data.get("packing", "none") in ("none", "batch")):  # Both count pairs.
    raise ConfigError(f"train.micro_batch_size={train.micro_batch_size} with dpo.preference_loss="
                      f"{cfg.method!r}: its KL sequences pair each prompt with another "
                      "example's completion of the micro-batch, so it needs at least 2 (as TRL)")


def validate(cfg):
  """ConfigError naming the `dpo.*` key for the methods' parameters and combinations."""
  for key in ("simpo_gamma", "alphapo_alpha"):
    if not math.isfinite(getattr(cfg, key)):
      raise ConfigError(f"dpo.{key}={getattr(cfg, key)} must be finite")
  for key in ("cpo_alpha", "desirable_weight", "undesirable_weight"):
    v = getattr(cfg, key)
    if not (math.isfinite(v) and v >= 0):
      raise ConfigError(f"dpo.{key}={v} must be finite and >= 0")
  name = method(cfg.losses)
  if name is None:
    return
  if len(cfg.losses) > 1:
    raise ConfigError(f"dpo.losses={cfg.losses}: {name!r} is a whole method with its own "
                      "terms; set it alone as dpo.preference_loss")
  for key, bad in (("preference_average_log_probs", cfg.preference_average_log_probs),
                   ("use_weighting", cfg.use_weighting), ("ld_alpha", cfg.ld_alpha is not None),
                   ("f_divergence_type", cfg.f_divergence_type != "reverse_kl"),
                   ("sft_loss_weight", cfg.sft_loss_weight != 0),
                   ("preference_loss_weight", cfg.preference_loss_weight != 1)):
    if bad:
      raise ConfigError(f"dpo.{key}={getattr(cfg, key)!r} does not apply to "
                        f"dpo.preference_loss={name!r} (docs/losses.md)")
  if name in UNPAIRED_LOSSES and cfg.reference_free:
    raise ConfigError(f"dpo.preference_loss={name!r} needs a reference: dpo.reference_free "
                      "must be False")
  if name in UNPAIRED_LOSSES and not (cfg.desirable_weight or cfg.undesirable_weight):
    raise ConfigError("dpo.desirable_weight and dpo.undesirable_weight are both 0")


def weight_warning(num_desirable: int, num_undesirable: int, desirable_weight: float,
                   undesirable_weight: float) -> str | None:
  """TRL's KTOTrainer start-up advice (Eq. 8 of the KTO paper) when the labels are unbalanced
  and neither weight is in the range that balances them; None when all is well."""
  nd, nu = max(num_desirable, 1), max(num_undesirable, 1)
  if nd == nu:
    return None
  des = (round(nu * undesirable_weight / nd, 2), round(nu * undesirable_weight / nd * 1.33, 2))
  und = (round(nd * desirable_weight / nu / 1.33, 2), round(nd * desirable_weight / nu, 2))
  if des[0] <= desirable_weight <= des[1] or und[0] <= undesirable_weight <= und[1]:
    return None
  return (f"KTO: {nd} desirable and {nu} undesirable examples, but dpo.desirable_weight="
          f"{desirable_weight} and dpo.undesirable_weight={undesirable_weight} do not balance "
          f"them; set EITHER dpo.desirable_weight in [{des[0]}, {des[1]}] OR "
          f"dpo.undesirable_weight in [{und[0]}, {und[1]}] (not both; TRL's advice)")
