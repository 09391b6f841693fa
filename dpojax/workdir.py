"""What a run leaves in its workdir for later commands (generate, evaluate, plot).

The run's config, as JSON, in the workdir:
  run_config.json  (`write_config`, preferred): the whole config with the *resolved* model
                   architecture (the one `init.path` imposed) and tokenizer path.
  config.json      (the plain `config.to_json_best_effort()`): read too; when `init.path` is
                   a .nemo/Hugging Face checkpoint its architecture and tokenizer are resolved
                   by loading it as the training loop does.
Caution: a folder holding config.json also looks like a Hugging Face checkpoint to
`convert.detect_format`; here a JSON with dpojax's sections (model, data, train, init) marks a
dpojax workdir and is checked first.

`load_policy(path)` gives the policy of a dpojax workdir (its latest checkpoint, or one
`checkpoints/<step>` / `best/<step>` folder), a .nemo file or a Hugging Face folder, with the
run config resolved; `load_reference(...)` the reference that run trained against.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, NamedTuple

import ml_collections
from absl import logging

RUN_CONFIG = "run_config.json"
PLAIN_CONFIG = "config.json"
_SECTIONS = ("model", "data", "train", "init")


class WorkdirError(ValueError):
  """A workdir (or checkpoint path) that later commands cannot use; the message says why."""


_warned_init_from = []


def init_path(config) -> str:
  """`init.path`, or `init.from`, its name in run configs and .py files before it was renamed
  (`from` is a Python keyword: ml_collections cannot parse --config.init.from=...)."""
  init = config.get("init") or {}
  path, old = init.get("path") or "", init.get("from") or ""
  if not old:
    return path
  if path and path != old:
    raise ValueError(f"init.path={path} and init.from={old} (its old name) disagree; "
                     "set init.path only")
  if old not in _warned_init_from:  # One line per path, however often the config is read.
    _warned_init_from.append(old)
    logging.warning("init.from is now init.path: reading init.from=%s as init.path", old)
  return old


class Model(NamedTuple):
  """A model to run: architecture, host params, tokenizer and (for a workdir) its run config
  with `model` and `data.tokenizer_path` resolved; `init` holds init.from's params when they
  had to be loaded to resolve it (they are the reference)."""

  config: Any  # model.ModelConfig
  params: dict
  tokenizer_path: str | None
  run_config: ml_collections.ConfigDict | None  # None for a .nemo or Hugging Face checkpoint.
  init: dict | None = None


def write_config(workdir: str, config, model_cfg=None, tokenizer_path: str | None = None) -> str:
  """Writes `<workdir>/run_config.json` atomically; `model_cfg` and `tokenizer_path` (what the
  run really uses) replace the `model` section and `data.tokenizer_path`."""
  d = json.loads(config.to_json_best_effort())
  if model_cfg is not None:
    d["model"] = dataclasses.asdict(model_cfg)
  if tokenizer_path:
    d.setdefault("data", {})["tokenizer_path"] = os.path.abspath(tokenizer_path)
  path = os.path.join(workdir, RUN_CONFIG)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(d, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
  return path


def _is_run_config(path: str) -> bool:
  try:
    with open(path) as f:
      d = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(d, dict) and all(isinstance(d.get(k), dict) for k in _SECTIONS)


def find_config(path: str) -> str | None:
  """The run config of the workdir that `path` is, or holds (checkpoints/<step>, best/<step>):
  run_config.json, else a config.json with dpojax's sections; None if neither."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    return None
  folders = [path]  # Parents only for the workdir's own folders (not, say, an export in it).
  parent = os.path.dirname(path)
  if os.path.basename(path) in ("checkpoints", "best"):
    folders.append(parent)
  elif os.path.basename(path).isdigit() and os.path.basename(parent) in ("checkpoints", "best"):
    folders.append(os.path.dirname(parent))
  for folder in folders:
    if os.path.isfile(os.path.join(folder, RUN_CONFIG)):
      return os.path.join(folder, RUN_CONFIG)
    plain = os.path.join(folder, PLAIN_CONFIG)
    if os.path.isfile(plain) and _is_run_config(plain):
      return plain
  return None


def read_config(path: str) -> ml_collections.ConfigDict:
  """A run config from run_config.json (or any JSON config), or a get_config() .py file."""
  if path.endswith(".py"):
    import importlib.util  # pylint: disable=g-import-not-at-top

    spec = importlib.util.spec_from_file_location("run_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
  try:
    with open(path) as f:
      d = json.load(f)
  except OSError as e:
    raise WorkdirError(f"{path}: cannot read ({e.strerror})") from None
  except json.JSONDecodeError as e:
    raise WorkdirError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
  for key in _SECTIONS:
    if not isinstance(d.get(key), dict):
      raise WorkdirError(f"{path}: no '{key}' section (not a dpojax run config)")
  return ml_collections.ConfigDict(d)


def workdir_config(path: str, config_path: str | None = None) -> tuple[Any, bool]:
  """(run config, whether it is resolved) for a workdir `path` or an explicit `config_path`."""
  found = config_path or find_config(path)
  if found is None:
    raise WorkdirError(
        f"{path}: no {RUN_CONFIG} (or dpojax {PLAIN_CONFIG}) in this workdir; training writes "
        "it at the start of a run. For an older workdir pass --config=<the run's config .py "
        "or .json>.")
  return read_config(found), os.path.basename(found) == RUN_CONFIG


def model_config(config):
  from dpojax import model as model_lib  # pylint: disable=g-import-not-at-top

  try:
    return model_lib.ModelConfig.from_dict(config.model.to_dict())
  except (TypeError, ValueError) as e:
    raise WorkdirError(f"run config: {e}") from None


def resolve(config, resolved: bool, extract_dir: str | None):
  """(run config with the architecture and tokenizer the run used, init.path params or None).

  An unresolved config is resolved as `loop.run` does it: init.path's architecture, and its
  tokenizer when `init.checkpoint_tokenizer`.
  """
  from dpojax.train import loop  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(config.to_dict())  # A private, unlocked copy.
  if resolved or not init_path(config):
    return config, None
  pretrained = loop.load_pretrained(config, extract_dir)
  config.model = dataclasses.asdict(pretrained.config)
  if pretrained.tokenizer_path and config.init.get("checkpoint_tokenizer", True):
    config.data.tokenizer_path = pretrained.tokenizer_path
  return config, pretrained.params


def load_policy(path: str, *, config_path: str | None = None,
                extract_dir: str | None = None) -> Model:
  """The policy at `path`: a dpojax workdir (or one of its step folders), a .nemo file or a
  Hugging Face folder."""
  from dpojax import convert  # pylint: disable=g-import-not-at-top
  from dpojax.checkpoint import orbax as orbax_ckpt  # pylint: disable=g-import-not-at-top
  from dpojax import model as model_lib  # pylint: disable=g-import-not-at-top

  if not os.path.exists(path):
    raise WorkdirError(f"--checkpoint={path}: no such file or folder")
  if config_path is None and find_config(path) is None and convert.is_checkpoint(path):
    cfg, params, tokenizer = convert.load(path, extract_dir=extract_dir)
    return Model(cfg, params, tokenizer, None)
  config, init = resolve(*workdir_config(path, config_path), extract_dir)
  cfg = model_config(config)
  lora_cfg = None
  if config.get("lora", {}).get("enabled", False):  # The checkpoint holds adapters only.
    from dpojax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
    lora_cfg = lora_lib.LoraConfig.from_config(config.lora)
    init_fn = functools.partial(lora_lib.init, cfg, lora_cfg)
  else:
    init_fn = functools.partial(model_lib.init_params, cfg)
  try:
    params = orbax_ckpt.load_params(path, init_fn)
  except FileNotFoundError as e:
    raise WorkdirError(str(e).replace("init.path=", "--checkpoint=")) from None
  model = Model(cfg, params, config.data.get("tokenizer_path"), config, init)
  if lora_cfg is not None:  # Adapters merged into the base they were trained on.
    import tempfile  # pylint: disable=g-import-not-at-top
    base = load_reference(model, extract_dir=os.path.join(extract_dir, "base") if extract_dir
                          else tempfile.mkdtemp(prefix="dpojax-base-"))
    import jax  # pylint: disable=g-import-not-at-top
    model = model._replace(params=jax.device_get(lora_lib.merge(base, params, cfg, lora_cfg)))
  return model


def load_reference(policy: Model, *, extract_dir: str) -> dict:
  """The reference `policy`'s run trained against: `init.path` (loaded as the loop loads it),
  or the random init from `train.seed` (the loop's own key, so the same numbers)."""
  import jax  # pylint: disable=g-import-not-at-top

  from dpojax import model as model_lib  # pylint: disable=g-import-not-at-top
  from dpojax.train import loop  # pylint: disable=g-import-not-at-top

  if policy.run_config is None:
    raise WorkdirError("a .nemo or Hugging Face checkpoint records no reference")
  if policy.init is not None:
    return policy.init
  config, model_cfg = policy.run_config, policy.config
  pretrained = loop.load_pretrained(config, extract_dir)
  if pretrained is not None:
    return pretrained.params
  return jax.device_get(model_lib.init_params(model_cfg, jax.random.key(config.train.seed)))
