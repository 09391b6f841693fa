"""configs/dpo_gpt.py is the one source of defaults: the section dataclasses agree with it."""

import dataclasses

import pytest

from dpojax import config as config_lib
from dpojax import loss as loss_lib

from conftest import load_default_config

# dpo.* keys that are not LossConfig fields, and what their default values mean for it.
DPO_ALIASES = {
    "preference_loss": lambda v, d: d.losses == (v,),  # One loss: dpo.losses is empty.
    "losses": lambda v, d: v == (),
    "loss_weights": lambda v, d: v == () and d.weights == (1.0,) * len(d.losses),
    "ref_policy_kl_penalty": lambda v, d: v is None,  # NeMo's name for beta: unset.
    "sft_average_log_probs": lambda v, d: (v is None and d.sft_average_log_probs
                                           == d.preference_average_log_probs),
}


def test_every_dpo_key_is_the_loss_config_default():
  dpo, default = load_default_config().dpo, config_lib.LossConfig()
  for key, value in dpo.items():
    if key in DPO_ALIASES:
      assert DPO_ALIASES[key](value, default), (key, value)
    else:
      assert getattr(default, key) == value, (key, value, getattr(default, key))
  fields = {f.name for f in dataclasses.fields(config_lib.LossConfig)}
  assert fields - set(dpo) == {"losses", "weights"} - set(dpo)  # Every field has its key.
  assert config_lib.LossConfig.from_config(dpo) == default


def test_every_reference_key_is_the_reference_config_default():
  config = load_default_config()
  default = config_lib.ReferenceConfig()
  assert config.reference.mode == "auto"  # Resolves to the default's copy (no LoRA, a reference).
  for key, value in config.reference.items():
    if key != "mode":
      assert getattr(default, key) == value, (key, value)
  assert {f.name for f in dataclasses.fields(default)} == set(config.reference)
  assert config_lib.ReferenceConfig.from_config(config) == default


def test_every_loss_name_has_its_function():
  assert set(loss_lib.PAIR_LOSSES) | {"sft"} == set(config_lib.LOSSES)


@pytest.mark.parametrize("mode,lora,free,expect", [
    ("auto", False, False, "copy"), ("auto", True, False, "lora_base"),
    ("auto", True, True, "none"), ("precomputed", True, False, "precomputed"),
])
def test_reference_mode_resolves_auto(mode, lora, free, expect):
  assert config_lib.reference_mode(mode, lora=lora, reference_free=free) == expect
