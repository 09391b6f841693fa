"""What a run needs before its first step, in pieces: the tokenizer and model architecture,
the preference data, the step config. Training takes them all (`build`); evaluating a trained
run on a file takes no optimizer and no training split (`build_eval`)."""

from __future__ import annotations

import dataclasses
import os

from absl import logging

from dpojax import config as config_lib
from dpojax import methods
from dpojax import model as model_lib
from dpojax import workdir as workdir_lib
from dpojax.data import pipeline
from dpojax.data.hf_tokenizer import TOKENIZER_JSON
from dpojax.data.tokenize import load_tokenizer, resolve_template
from dpojax.errors import ConfigError
from dpojax.train import step as step_lib


def tokenizer_and_model(config, pretrained=None):
  """(Tokenizer, ModelConfig): the config's, or `pretrained`'s (init.path) architecture and,
  with init.checkpoint_tokenizer, its tokenizer."""
  tokenizer_path = config.data.tokenizer_path
  if pretrained is not None and config.init.checkpoint_tokenizer:
    # The checkpoint's tokenizer; a Hugging Face folder with only a tokenizer.json (Llama 3,
    # Qwen) gives none from the converter, so its folder is read here.
    init_dir = workdir_lib.init_path(config)
    if pretrained.tokenizer_path:
      tokenizer_path = pretrained.tokenizer_path
    elif os.path.isfile(os.path.join(init_dir, TOKENIZER_JSON)):
      tokenizer_path = os.path.join(init_dir, TOKENIZER_JSON)
  tok = load_tokenizer(tokenizer_path)
  model_cfg = (model_lib.ModelConfig.from_dict(config.model) if pretrained is None
               else pretrained.config)
  if pretrained is None and model_cfg.vocab_size < tok.vocab_size:
    # A model trained from scratch is sized by its tokenizer (the start-up line says so).
    model_cfg = dataclasses.replace(model_cfg, vocab_size=tok.vocab_size)
  if model_cfg.vocab_size < tok.vocab_size:
    raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                      f"tokenizer's {tok.vocab_size} ({tok.path})")
  return tok, model_cfg


def step_config(config, model_cfg) -> step_lib.StepConfig:
  """The step's config: model, loss (dpo.*), log-probs (logprob.*), lora.* and reference.*."""
  step_cfg = step_lib.StepConfig(model=model_cfg,
                                 loss=config_lib.LossConfig.from_config(config.dpo),
                                 logprob_impl=config.logprob.impl,
                                 logprob_token_block=config.logprob.token_block,
                                 logprob_vocab_block=config.logprob.vocab_block)
  return config_lib.step_config(config, step_cfg)  # lora.* and reference.* (checked).


def data_options(config, tok) -> pipeline.DataOptions:
  """data.* with the template resolved (auto: the tokenizer folder's chat template, else
  plain), and for KTO's unpaired losses the run of examples their KL partners rotate in: the
  micro-batch, TRL's per_device_train_batch_size (dpojax.data.unpaired)."""
  opts = pipeline.DataOptions.from_config(config.data)
  template, _ = resolve_template(opts.template, tok)
  opts = dataclasses.replace(opts, template=template)
  method = config_lib.LossConfig.from_config(config.dpo).method
  if method in methods.UNPAIRED_LOSSES:
    opts = dataclasses.replace(opts, kl_chunk=int(config.train.micro_batch_size))
  if method in methods.PROMPT_NLL_LOSSES:  # Its NLL counts the prompt's tokens on each side.
    opts = dataclasses.replace(opts, share_prompt=False)
  return opts


def build(config, pretrained=None):
  """Everything a run needs before the first step; fails early on bad config or data."""
  config_lib.check_config(config)
  tok, model_cfg = tokenizer_and_model(config, pretrained)
  opts = data_options(config, tok)
  train_data = pipeline.PreferenceData(config.data.train_path, tok, opts)
  val_data = pipeline.PreferenceData(config.data.val_path, tok, opts)
  train_data.require(config.train.global_batch_size, "train.global_batch_size")
  if "desirable" in train_data.stats:  # KTO: TRL's advice on unbalanced labels.
    loss_cfg = config_lib.LossConfig.from_config(config.dpo)
    warning = methods.weight_warning(
        train_data.stats["desirable"], len(train_data) - train_data.stats["desirable"],
        loss_cfg.desirable_weight, loss_cfg.undesirable_weight)
    if warning:
      logging.warning("%s", warning)
  val_data.require(1, "validation pairs")
  return tok, train_data, val_data, step_config(config, model_cfg)


def build_eval(config, data_path: str):
  """(pairs of `data_path`, step config) for evaluating a run: its config as training checked
  it, its data settings and loss. `config` is resolved (init.path's architecture in place)."""
  config_lib.check_config(config)
  tok, model_cfg = tokenizer_and_model(config)
  data = pipeline.PreferenceData(data_path, tok, data_options(config, tok))
  data.require(1, "pairs to evaluate")
  return data, step_config(config, model_cfg)
