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

Loading the model such a workdir holds is `dpojax.pretrained`'s (load_policy, load_reference).
`load_config_file` reads a get_config() .py file: the one loader of configs/*.py and the tests'.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import ml_collections
from absl import logging

from dpojax import model as model_lib

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


def write_config(workdir: str, config, model_cfg=None, tokenizer_path: str | None = None,
                 template: str | None = None) -> str:
  """Writes `<workdir>/run_config.json` atomically; `model_cfg`, `tokenizer_path` and
  `template` (what the run really uses) replace the `model` section, `data.tokenizer_path`
  and `data.template`."""
  d = json.loads(config.to_json_best_effort())
  if model_cfg is not None:
    d["model"] = dataclasses.asdict(model_cfg)
  if tokenizer_path:
    d.setdefault("data", {})["tokenizer_path"] = os.path.abspath(tokenizer_path)
  if template:
    d.setdefault("data", {})["template"] = template
  path = os.path.join(workdir, RUN_CONFIG)
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(d, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(tmp, path)
  except OSError:  # A full disk: no half-written file left behind.
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
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


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """The config of a get_config() .py file (configs/*.py), run as its own module."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def read_config(path: str) -> ml_collections.ConfigDict:
  """A run config from run_config.json (or any JSON config), or a get_config() .py file."""
  if path.endswith(".py"):
    return load_config_file(path)
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
  """The run config's `model` section as a ModelConfig; a bad value is a WorkdirError."""
  try:
    return model_lib.ModelConfig.from_dict(config.model.to_dict())
  except (TypeError, ValueError) as e:
    raise WorkdirError(f"run config: {e}") from None
