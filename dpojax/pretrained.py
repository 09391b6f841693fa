"""Models on disk: the policy a run starts from (`init.path`), the policy and reference of a
trained run (for generate and evaluate), and the aligned policy a run ends with (`export.to`).

`load_pretrained(config)` reads init.path: a .nemo file, a Hugging Face folder, or a dpojax
workdir/checkpoint folder. `load_policy(path)` gives the policy of a dpojax workdir (its latest
checkpoint, or one `checkpoints/<step>` / `best/<step>` folder), a .nemo file or a Hugging Face
folder, with the run config resolved; `load_reference(...)` the reference that run trained
against. A run initialized from another run recurses through the two.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tarfile
import tempfile
from typing import Any, NamedTuple

import jax
import ml_collections

from dpojax import config as config_lib
from dpojax.formats import checkpoints
from dpojax import model as model_lib
from dpojax import workdir as workdir_lib
from dpojax.formats import nemo as nemo_ckpt
from dpojax.checkpoint import orbax as orbax_ckpt
from dpojax.errors import ConfigError
from dpojax.model import lora as lora_lib
from dpojax.workdir import WorkdirError


class Model(NamedTuple):
  """A model to run: architecture, host params, tokenizer and (for a workdir) its run config
  with `model` and `data.tokenizer_path` resolved; `init` holds init.from's params when they
  had to be loaded to resolve it (they are the reference)."""

  config: Any  # model.ModelConfig
  params: dict
  tokenizer_path: str | None
  run_config: ml_collections.ConfigDict | None  # None for a .nemo or Hugging Face checkpoint.
  init: dict | None = None


def _extract_dir(workdir: str) -> str:
  """Where init.path's tokenizer is unpacked: one folder per process (they share the workdir)."""
  index = jax.process_index()
  return os.path.join(workdir, "init_tokenizer" if index == 0 else f"init_tokenizer.{index}")


def load_pretrained(config, workdir: str):
  """`init.path`: a .nemo file, a Hugging Face folder, or a dpojax workdir/checkpoint folder.

  Returns None (random init) or a `checkpoints.Loaded` (ModelConfig, host params, tokenizer).
  """
  path = workdir_lib.init_path(config)  # Or init.from, its old name.
  if not path:
    return None
  if not os.path.exists(path):
    raise ConfigError(f"init.path={path}: no such file or folder")
  if checkpoints.is_checkpoint(path):
    try:
      loaded = checkpoints.load(path, extract_dir=_extract_dir(workdir))
    except (tarfile.TarError, EOFError) as e:  # A member cut short (the header scan passed).
      raise ConfigError(f"init.path={path}: truncated or corrupt archive ({e})") from None
    arch = {k: getattr(loaded.config, k) for k in checkpoints.ARCHITECTURE_FIELDS}
    model_cfg = _with_arch(model_lib.ModelConfig.from_dict(config.model), arch)
    return checkpoints.Loaded(model_cfg, loaded.params, loaded.tokenizer_path)
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  if workdir_lib.find_config(path):
    # A dpojax run: its architecture and tokenizer from its run config, as for a .nemo; a
    # LoRA run's policy is its adapters merged into its base.
    policy = load_policy(path, extract_dir=_extract_dir(workdir))
    arch = {k: getattr(policy.config, k) for k in checkpoints.ARCHITECTURE_FIELDS}
    return checkpoints.Loaded(_with_arch(model_cfg, arch), policy.params,
                          policy.tokenizer_path)
  try:
    params = orbax_ckpt.load_params(path, functools.partial(model_lib.init_params, model_cfg))
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from None
  return checkpoints.Loaded(model_cfg, params, None)


def _with_arch(model_cfg, arch: dict):
  """The run's model config with a checkpoint's architecture; the run keeps its MoE choices
  (model.moe.aux_loss_coef, z_loss_coef, freeze_router, grouped_impl, tile)."""
  moe = arch["moe"].with_run_fields(model_cfg.moe)
  return dataclasses.replace(model_cfg, **{**arch, "moe": moe})


def export(config, model_cfg, params, tokenizer_path, init_from):
  """`export.to`: the aligned policy as a .nemo file or a Hugging Face folder."""
  base = None
  if init_from and checkpoints.detect_format(init_from) == "nemo":
    base = nemo_ckpt.read_nemo_config(init_from)
  checkpoints.save(config.export.to, model_cfg, params, tokenizer_path, base_config=base,
               overwrite=True)


def resolve(config, resolved: bool, extract_dir: str | None):
  """(run config with the architecture and tokenizer the run used, init.path params or None).

  An unresolved config is resolved as `loop.run` does it: init.path's architecture, and its
  tokenizer when `init.checkpoint_tokenizer`.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # A private, unlocked copy.
  if resolved or not workdir_lib.init_path(config):
    return config, None
  pretrained = load_pretrained(config, extract_dir)
  config.model = dataclasses.asdict(pretrained.config)
  if pretrained.tokenizer_path and config.init.get("checkpoint_tokenizer", True):
    config.data.tokenizer_path = pretrained.tokenizer_path
  return config, pretrained.params


def load_policy(path: str, *, config_path: str | None = None,
                extract_dir: str | None = None) -> Model:
  """The policy at `path`: a dpojax workdir (or one of its step folders), a .nemo file or a
  Hugging Face folder."""
  if not os.path.exists(path):
    raise WorkdirError(f"--checkpoint={path}: no such file or folder")
  if (config_path is None and workdir_lib.find_config(path) is None
      and checkpoints.is_checkpoint(path)):
    cfg, params, tokenizer = checkpoints.load(path, extract_dir=extract_dir)
    return Model(cfg, params, tokenizer, None)
  config, init = resolve(*workdir_lib.workdir_config(path, config_path), extract_dir)
  cfg = workdir_lib.model_config(config)
  lora_cfg = None
  if config.get("lora", {}).get("enabled", False):  # The checkpoint holds adapters only.
    lora_cfg = config_lib.lora_config(config.lora)
    init_fn = functools.partial(lora_lib.init, cfg, lora_cfg)
  else:
    init_fn = functools.partial(model_lib.init_params, cfg)
  try:
    params = orbax_ckpt.load_params(path, init_fn)
  except FileNotFoundError as e:
    raise WorkdirError(str(e).replace("init.path=", "--checkpoint=")) from None
  model = Model(cfg, params, config.data.get("tokenizer_path"), config, init)
  if lora_cfg is not None:  # Adapters merged into the base they were trained on.
    base = load_reference(model, extract_dir=os.path.join(extract_dir, "base") if extract_dir
                          else tempfile.mkdtemp(prefix="dpojax-base-"))
    model = model._replace(params=jax.device_get(lora_lib.merge(base, params, cfg, lora_cfg)))
  return model


def load_reference(policy: Model, *, extract_dir: str) -> dict:
  """The reference `policy`'s run trained against: `init.path` (loaded as the loop loads it),
  or the random init from `train.seed` (the loop's own key, so the same numbers)."""
  if policy.run_config is None:
    raise WorkdirError("a .nemo or Hugging Face checkpoint records no reference")
  if policy.init is not None:
    return policy.init
  config, model_cfg = policy.run_config, policy.config
  pretrained = load_pretrained(config, extract_dir)
  if pretrained is not None:
    return pretrained.params
  return jax.device_get(model_lib.init_params(model_cfg, jax.random.key(config.train.seed)))
