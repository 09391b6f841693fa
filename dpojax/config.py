"""The run config's sections as frozen dataclasses, checked once, with the one error type.

Every message names the key and the rule it breaks (`dpo.beta=0.0 must be positive`), as a
`dpojax.errors.ConfigError`. configs/dpo_gpt.py is the one source of defaults: the dataclass
defaults here equal its values (tests/test_config.py holds them to it).

  dpo        -> LossConfig (`LossConfig.from_config`; direct construction is checked too).
  reference  -> ReferenceConfig, the mode resolved (never "auto"); `reference_mode` holds
                every rule that ties reference.mode to lora.enabled, dpo.reference_free and
                reference.sync_steps, for the config and for the step alike.
  lora       -> lora.LoraConfig or None (`lora_config`), into the step config with the
                resolved reference mode (`step_config`).
  the rest   -> `check_config` (train, eval, checkpoint, model, logprob) before anything heavy;
                `check_workdir` before any compilation.

The arrows: this module builds on dpojax.model (LoraConfig, ModelConfig's checks) and
dpojax.ops; the loss and the step build on it. lora.* parsing lives here as a function of its
section that returns the model's dataclass (model.* is ModelConfig.from_dict's), so nothing
below imports this module.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

from dpojax import methods
from dpojax import model as model_lib
from dpojax.errors import ConfigError
from dpojax.model import lora as lora_lib
from dpojax.ops import logprob as logprob_lib

# --- dpo: the loss ---------------------------------------------------------------------------
NEMO_LOSSES = ("dpo", "ipo", "rpo_sq", "rpo_bwd_kl", "rpo_fwd_kl")
TRL_LOSSES = ("sigmoid", "hinge", "ipo_normalized", "robust", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "apo_zero", "apo_down", "aot", "aot_unpaired", "discopop",
              "sigmoid_norm", "sft")
LOSSES = NEMO_LOSSES + TRL_LOSSES
DEFAULT_LOSS = "dpo"  # dpo.preference_loss's default: NeMo's sigmoid DPO.
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# As in TRL 1.16: the f-DPO score only makes sense where the loss sees the chosen-rejected
# difference (other losses would keep the beta * log Z(x) term).
F_DIVERGENCE_LOSSES = ("dpo", "sigmoid", "sigmoid_norm", "hinge", "ipo", "ipo_normalized",
                       "exo_pair", "robust", "discopop", "sft")
LABEL_SMOOTHING_LOSSES = ("dpo", "sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo",
                          "cpo")
ALL_LOSSES = LOSSES + methods.METHOD_LOSSES  # With SimPO/CPO/ORPO/KTO (dpojax.methods).
# Losses that normalise by token counts themselves: averaging log-probs first would do it twice.
NORMALIZED_LOSSES = ("ipo_normalized", "sigmoid_norm")
SORTING_LOSSES = ("aot", "aot_unpaired")
BCO_BASELINES = ("none", "micro_batch_mean")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static loss settings (hashable: part of the jitted step's static config).

  `losses`/`weights` is the weighted list (one entry for a single loss); see docs/losses.md.
  """

  losses: tuple[str, ...] = (DEFAULT_LOSS,)
  weights: tuple[float, ...] = (1.0,)
  beta: float = 0.1
  preference_average_log_probs: bool = False
  sft_average_log_probs: bool = False
  gt_reward_scale: float = 1.0
  preference_loss_weight: float = 1.0
  sft_loss_weight: float = 0.0
  label_smoothing: float = 0.0
  f_divergence_type: str = "reverse_kl"
  f_alpha_divergence_coef: float = 0.5
  use_weighting: bool = False
  ld_alpha: float | None = None
  discopop_tau: float = 0.05
  reference_free: bool = False
  bco_baseline: str = "none"
  simpo_gamma: float = 0.5  # TRL CPOConfig defaults (dpojax.methods).
  cpo_alpha: float = 1.0
  alphapo_alpha: float = 0.0
  desirable_weight: float = 1.0  # TRL KTOConfig defaults.
  undesirable_weight: float = 1.0

  def __post_init__(self):
    if all(n in methods.REFERENCE_FREE_LOSSES for n in self.losses):  # No reference at all.
      object.__setattr__(self, "reference_free", True)
    self.validate()

  @property
  def method(self) -> str | None:
    """SimPO/CPO/ORPO/KTO's loss name (dpojax.methods), None for the DPO family."""
    return methods.method(self.losses)

  @property
  def uses_token_sft(self) -> bool:
    """TRL's `sft` entry or CPO/ORPO's NLL term: a token mean over the global batch, so it
    needs a token count."""
    return ("sft" in self.losses or "orpo" in self.losses
            or (self.cpo_alpha != 0 and bool(set(self.losses) & {"simpo", "cpo", "cpo_hinge",
                                                                  "cpo_ipo"})))

  @property
  def nll_over_prompt(self) -> bool:
    """ORPO: the NLL term counts the prompt's tokens too."""
    return bool(set(self.losses) & set(methods.PROMPT_NLL_LOSSES))

  def validate(self):
    """Raises ConfigError naming the `dpo.*` key for every invalid value or combination."""
    if not self.losses:
      raise ConfigError("dpo.losses is empty: name at least one loss")
    for i, name in enumerate(self.losses):
      if name not in ALL_LOSSES:
        key = "dpo.preference_loss" if len(self.losses) == 1 else f"dpo.losses[{i}]"
        raise ConfigError(f"{key}={name!r} is not one of {ALL_LOSSES}")
    if len(self.weights) != len(self.losses):
      raise ConfigError(f"dpo.loss_weights has {len(self.weights)} entries but dpo.losses has "
                        f"{len(self.losses)}")
    for i, w in enumerate(self.weights):
      if not (math.isfinite(w) and w >= 0):
        raise ConfigError(f"dpo.loss_weights[{i}]={w} must be finite and >= 0")
    if not any(self.weights):
      raise ConfigError("dpo.loss_weights are all zero")
    if not (math.isfinite(self.beta) and self.beta > 0):
      raise ConfigError(f"dpo.beta={self.beta} must be positive"
                        + (" (ipo uses 1/(2 beta))" if "ipo" in self.losses else ""))
    for key in ("preference_loss_weight", "sft_loss_weight"):
      v = getattr(self, key)
      if not (math.isfinite(v) and v >= 0):
        raise ConfigError(f"dpo.{key}={v} must be finite and >= 0")
    if self.preference_loss_weight == 0 and self.sft_loss_weight == 0:
      raise ConfigError("dpo.preference_loss_weight and dpo.sft_loss_weight are both 0")
    if not math.isfinite(self.gt_reward_scale):
      raise ConfigError(f"dpo.gt_reward_scale={self.gt_reward_scale} must be finite")
    eps = self.label_smoothing
    if not 0 <= eps < 1:
      raise ConfigError(f"dpo.label_smoothing={eps} must be in [0, 1)")
    if eps > 0 and not set(self.losses) & set(LABEL_SMOOTHING_LOSSES):
      raise ConfigError(f"dpo.label_smoothing={eps} has no effect on {self.losses}; it is used "
                        f"by {LABEL_SMOOTHING_LOSSES}")
    if "exo_pair" in self.losses and eps == 0:
      raise ConfigError("dpo.label_smoothing must be > 0 for exo_pair (it uses log eps)")
    if "robust" in self.losses and eps >= 0.5:
      raise ConfigError(f"dpo.label_smoothing={eps} must be < 0.5 for robust "
                        "(it divides by 1 - 2 eps)")
    if self.f_divergence_type not in F_DIVERGENCES:
      raise ConfigError(f"dpo.f_divergence_type={self.f_divergence_type!r} is not one of "
                        f"{F_DIVERGENCES}")
    if self.f_divergence_type != "reverse_kl":
      bad = sorted(set(self.losses) - set(F_DIVERGENCE_LOSSES))
      if bad:
        raise ConfigError(f"dpo.f_divergence_type={self.f_divergence_type!r} only works with "
                          f"{F_DIVERGENCE_LOSSES}, not {bad}")
    if not math.isfinite(self.f_alpha_divergence_coef):
      raise ConfigError(f"dpo.f_alpha_divergence_coef={self.f_alpha_divergence_coef} "
                        "must be finite")
    if self.use_weighting and set(self.losses) & set(SORTING_LOSSES):
      raise ConfigError("dpo.use_weighting cannot be combined with aot/aot_unpaired: they sort "
                        "pairs, so per-pair weights would not line up")
    if self.use_weighting and self.uses_token_sft:
      raise ConfigError("dpo.use_weighting cannot be combined with 'sft' in dpo.losses (a "
                        "batch-mean NLL times per-pair weights is not a sum over pairs); use "
                        "dpo.sft_loss_weight for the SFT term instead")
    if self.ld_alpha is not None:
      if not 0 <= self.ld_alpha <= 1:
        raise ConfigError(f"dpo.ld_alpha={self.ld_alpha} must be in [0, 1]")
      if self.preference_average_log_probs:
        raise ConfigError("dpo.ld_alpha (LD-DPO down-weights summed log-probs) cannot be "
                          "combined with dpo.preference_average_log_probs=True")
    if self.preference_average_log_probs:
      bad = sorted(set(self.losses) & set(NORMALIZED_LOSSES))
      if bad:
        raise ConfigError(f"dpo.preference_average_log_probs=True with {bad}, which already "
                          "divide by token counts; use ipo / dpo instead")
    if not (math.isfinite(self.discopop_tau) and self.discopop_tau > 0):
      raise ConfigError(f"dpo.discopop_tau={self.discopop_tau} must be positive")
    if self.bco_baseline not in BCO_BASELINES:
      raise ConfigError(f"dpo.bco_baseline={self.bco_baseline!r} is not one of {BCO_BASELINES}")
    methods.validate(self)

  @classmethod
  def from_config(cls, dpo_cfg) -> LossConfig:
    """From the `dpo` section of a run config (a ConfigDict or a mapping)."""
    d = dict(dpo_cfg)
    known = {f.name for f in dataclasses.fields(cls)} - {"losses", "weights"}
    known |= {"preference_loss", "losses", "loss_weights", "ref_policy_kl_penalty"}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"unknown config keys: {['dpo.' + k for k in unknown]}")

    def get(key, types, default=dataclasses.MISSING):
      """dpo.<key> of one of `types`; absent: `default`, else the field's default."""
      default = getattr(cls, key) if default is dataclasses.MISSING else default
      v = d.get(key, default)
      if v is None and default is None:
        return None
      if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        raise ConfigError(f"dpo.{key}={v!r} must be of type {'/'.join(t.__name__ for t in types)}")
      return v

    num = (int, float)
    preference_loss = get("preference_loss", (str,), DEFAULT_LOSS)
    losses = get("losses", (tuple, list), ())
    if losses:
      if preference_loss != DEFAULT_LOSS:
        raise ConfigError(f"set dpo.preference_loss={preference_loss!r} or "
                          f"dpo.losses={tuple(losses)}, not both")
      for i, name in enumerate(losses):
        if not isinstance(name, str):
          raise ConfigError(f"dpo.losses[{i}]={name!r} must be a loss name")
      losses = tuple(losses)
    else:
      losses = (preference_loss,)
    weights = get("loss_weights", (tuple, list), ())
    for i, w in enumerate(weights):
      if isinstance(w, bool) or not isinstance(w, num):
        raise ConfigError(f"dpo.loss_weights[{i}]={w!r} must be a number")
    weights = tuple(float(w) for w in weights) if weights else (1.0,) * len(losses)

    beta = float(get("beta", num))
    alias = get("ref_policy_kl_penalty", num, None)
    if alias is not None:
      if not (math.isfinite(alias) and alias > 0):
        raise ConfigError(f"dpo.ref_policy_kl_penalty={alias} must be positive")
      if beta not in (cls.beta, float(alias)):
        raise ConfigError(f"set dpo.beta={beta} or its NeMo name dpo.ref_policy_kl_penalty="
                          f"{alias}, not both")
      beta = float(alias)
    average = get("preference_average_log_probs", (bool,))
    sft_average = get("sft_average_log_probs", (bool,), None)  # None: follows `average`.
    ld_alpha = get("ld_alpha", num)
    return cls(
        losses=losses, weights=weights, beta=beta,
        preference_average_log_probs=average,
        sft_average_log_probs=average if sft_average is None else sft_average,
        gt_reward_scale=float(get("gt_reward_scale", num)),
        preference_loss_weight=float(get("preference_loss_weight", num)),
        sft_loss_weight=float(get("sft_loss_weight", num)),
        label_smoothing=float(get("label_smoothing", num)),
        f_divergence_type=get("f_divergence_type", (str,)),
        f_alpha_divergence_coef=float(get("f_alpha_divergence_coef", num)),
        use_weighting=get("use_weighting", (bool,)),
        ld_alpha=None if ld_alpha is None else float(ld_alpha),
        discopop_tau=float(get("discopop_tau", num)),
        reference_free=get("reference_free", (bool,)),
        bco_baseline=get("bco_baseline", (str,)),
        **{k: float(get(k, num)) for k in ("simpo_gamma", "cpo_alpha", "alphapo_alpha",
                                           "desirable_weight", "undesirable_weight")})


# --- reference -------------------------------------------------------------------------------
REFERENCE_MODES = ("copy", "lora_base", "precomputed", "none")  # What "auto" resolves to.
MODES = ("auto",) + REFERENCE_MODES


def reference_mode(mode: str, *, lora: bool, reference_free: bool) -> str:
  """The mode `mode` resolves to ("auto": lora_base with LoRA, none with dpo.reference_free,
  else copy); raises ConfigError for a mode these settings contradict. With `check_sync`, the
  one place of the mode rules: the config, the step config and the split of the weights all
  ask here."""
  if mode not in MODES:
    raise ConfigError(f"reference.mode={mode!r} is not one of {MODES}")
  if mode == "auto":
    mode = "none" if reference_free else "lora_base" if lora else "copy"
  if reference_free and mode != "none":
    raise ConfigError(f"dpo.reference_free=True contradicts reference.mode={mode!r} (the "
                      f"losses {methods.REFERENCE_FREE_LOSSES} imply it: they have no reference)")
  if mode == "lora_base" and not lora:
    raise ConfigError("reference.mode=lora_base needs lora.enabled=True")
  return mode


def check_sync(mode: str, sync_steps):
  """TR-DPO mixes the policy into the reference: a resolved `mode` of its own weights."""
  if sync_steps and mode != "copy":
    raise ConfigError(f"reference.sync_steps={sync_steps} (TR-DPO) needs reference.mode="
                      f"copy, not {mode!r}: the reference must be its own weights")


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
  """The `reference` section (docs: dpojax.train.reference)."""

  mode: str = "copy"  # Resolved: never "auto".
  sync_steps: int = 0
  sync_alpha: float = 0.6
  cache_dir: str = ""

  @property
  def resolved_cache_dir(self) -> str:
    return self.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "dpojax",
                                          "reference")

  @classmethod
  def from_config(cls, config) -> ReferenceConfig:
    """From the run config's `reference` section (with `lora.enabled` and
    `dpo.reference_free`, which `auto` and the checks need)."""
    d = dict(config.get("reference", {}))
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ConfigError(f"unknown config keys: {['reference.' + k for k in unknown]}")
    lora_on = bool(config.get("lora", {}).get("enabled", False))
    reference_free = methods.section_is_reference_free(config.get("dpo", {}))
    mode = reference_mode(d.get("mode", "auto"), lora=lora_on, reference_free=reference_free)
    sync_steps, alpha = d.get("sync_steps", cls.sync_steps), d.get("sync_alpha", cls.sync_alpha)
    if isinstance(sync_steps, bool) or not isinstance(sync_steps, int) or sync_steps < 0:
      raise ConfigError(f"reference.sync_steps={sync_steps!r} must be an integer >= 0")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
      raise ConfigError(f"reference.sync_alpha={alpha!r} must be in (0, 1]")
    check_sync(mode, sync_steps)
    cache_dir = d.get("cache_dir", cls.cache_dir)
    if not isinstance(cache_dir, str):
      raise ConfigError(f"reference.cache_dir={cache_dir!r} must be a path")
    return cls(mode=mode, sync_steps=sync_steps, sync_alpha=float(alpha), cache_dir=cache_dir)


# --- lora: the adapters ----------------------------------------------------------------------
def lora_config(section) -> lora_lib.LoraConfig | None:
  """From the `lora` config section; None when lora.enabled is False."""
  d = dict(section)
  cls = lora_lib.LoraConfig
  unknown = sorted(set(d) - {"enabled", "targets", "rank", "alpha", "dropout"})
  if unknown:
    raise ConfigError(f"unknown config keys: {['lora.' + k for k in unknown]}")
  if not isinstance(d.get("enabled", False), bool):
    raise ConfigError(f"lora.enabled={d['enabled']!r} must be True or False")
  if not d.get("enabled", False):
    return None
  alpha = d.get("alpha")
  for key, value in (("alpha", alpha), ("dropout", d.get("dropout", 0.0))):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
      raise ConfigError(f"lora.{key}={value!r} must be a number")
  return cls(targets=tuple(d.get("targets", cls.targets)), rank=d.get("rank", cls.rank),
             alpha=None if alpha is None else float(alpha),
             dropout=float(d.get("dropout", 0.0)))


def step_config(config, step_cfg):
  """`step_cfg` (a train.step.StepConfig) with the run config's LoRA and reference settings."""
  ref_cfg = ReferenceConfig.from_config(config)
  return dataclasses.replace(step_cfg, lora=lora_config(config.lora),
                             reference=ref_cfg.mode, seed=int(config.train.seed))


# --- the rest of the run --------------------------------------------------------------------
CHECKPOINT_ON_ERROR = ("stop", "continue")


def check_config(config):
  """Every section a run reads before its first step, before anything heavy is loaded."""
  t = config.train
  if t.global_batch_size <= 0 or t.micro_batch_size <= 0:
    raise ConfigError("train.global_batch_size and train.micro_batch_size must be positive")
  if t.global_batch_size % t.micro_batch_size:
    raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                      f"train.micro_batch_size={t.micro_batch_size}")
  if t.max_steps <= 0:
    raise ConfigError(f"train.max_steps={t.max_steps} must be positive")
  for key in ("eval.interval", "checkpoint.interval", "train.log_interval"):
    section, name = key.split(".")
    if config[section][name] <= 0:
      raise ConfigError(f"{key}={config[section][name]} must be positive")
  if config.eval.get("interval_epochs", 0.0) < 0:
    raise ConfigError(f"eval.interval_epochs={config.eval.interval_epochs} must be >= 0")
  for key, ok, rule in (
      ("train.learning_rate", lambda v: v > 0, "must be positive"),
      ("train.warmup_steps", lambda v: v >= 0, "must be >= 0"),
      ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
      ("train.weight_decay", lambda v: v >= 0, "must be >= 0"),
      ("train.adam_b1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
      ("train.adam_b2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
      ("train.adam_eps", lambda v: v > 0, "must be positive"),
      ("train.grad_clip", lambda v: v >= 0, "must be >= 0 (0 disables it)"),
      ("train.max_consecutive_nonfinite", lambda v: v >= 1, "must be at least 1"),
      ("checkpoint.max_to_keep", lambda v: v >= 1, "must be at least 1")):
    section, name = key.split(".")
    value = config[section][name]
    if not ok(value):  # NaN fails every rule.
      raise ConfigError(f"{key}={value} {rule}")
  if config.checkpoint.on_error not in CHECKPOINT_ON_ERROR:
    raise ConfigError(f"checkpoint.on_error={config.checkpoint.on_error!r} is not one of "
                      f"{CHECKPOINT_ON_ERROR}")
  model_lib.ModelConfig.from_dict(config.model)  # Names the model.* key (dtypes, shapes).
  loss_cfg = LossConfig.from_config(config.dpo)  # Checks every dpo.* key; names the key.
  methods.check_data(loss_cfg, config.data, config.train)
  logprob_lib.resolve_impl(config.logprob.impl)  # Names logprob.impl if it is unknown.


def check_workdir(workdir: str):
  """Fails before any compilation if the workdir cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    # A probe of this process's own: the processes of a run share the workdir, and one
    # removing a common probe under another's feet would fail that one.
    fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror})") from None

