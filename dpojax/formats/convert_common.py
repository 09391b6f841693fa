"""Shared pieces of the .nemo and Hugging Face converters.

Both formats are read into numpy arrays in the dpojax parameter layout (see
dpojax/model/transformer.py) and written from it. Errors name the file, the line where one
exists, and the field or tensor.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

from dpojax import model as model_lib
from dpojax.model import ModelConfig


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or written faithfully."""


class Loaded(NamedTuple):
  """What an import gives: unpacks as (config, params, tokenizer_path)."""

  config: ModelConfig
  params: dict
  tokenizer_path: str | None


# ModelConfig fields that a checkpoint fixes. The others (param_dtype, dtype, remat,
# init_method_std) are the run's choice; the stored dtype is in the loaded config's param_dtype.
# The options of the Hugging Face families (model/config.py), off in every .nemo.
FAMILY_FIELDS = (
    "qkv_bias", "qk_norm", "post_norms", "scale_embeddings", "query_pre_attn_scalar",
    "attention_softcap", "final_logit_softcap", "sliding_window", "layer_types",
    "rotary_base_local", "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
    "rope_high_freq_factor", "rope_original_max_positions", "rope_attention_factor",
    "rope_yarn_beta_fast", "rope_yarn_beta_slow", "rope_yarn_truncate", "qk_norm_all_heads",
    "attention_sinks")
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
    "kv_channels", "ffn_hidden_size", "activation", "normalization", "layernorm_epsilon",
    "position_embedding_type", "rotary_percentage", "rotary_base", "max_position_embeddings",
    "bias", "share_embeddings_and_output_weights", "moe") + FAMILY_FIELDS

DTYPE_NAMES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------------------------------
# Config files with line numbers.


class Fields:
  """A config mapping plus where each key sits, for errors like 'file:12: key: message'."""

  def __init__(self, data: dict, lines: dict[str, int], path: str, prefix: str = ""):
    self.data, self.lines, self.path, self.prefix = data, lines, path, prefix

  def where(self, key: str) -> str:
    line = self.lines.get(self.prefix + key)
    return f"{self.path}:{line}: {key}" if line else f"{self.path}: {key}"

  def error(self, key: str, message: str) -> CheckpointError:
    return CheckpointError(f"{self.where(key)}: {message}")

  def get(self, key: str, default=None):
    return self.data.get(key, default)

  def require(self, key: str, kind=None):
    if self.data.get(key) is None:
      raise CheckpointError(f"{self.where(key)}: required field is missing or null")
    value = self.data[key]
    if kind is not None and not _is_kind(value, kind):
      raise self.error(key, f"expected {kind.__name__}, got {value!r}")
    return value

  def sub(self, key: str) -> Fields:
    """The object under `key` (e.g. a multimodal folder's text_config), for its own keys."""
    value = self.require(key, dict)
    return Fields(value, self.lines, self.path, f"{self.prefix}{key}.")

  def optional(self, key: str, kind, default):
    value = self.data.get(key)
    if value is None:
      return default
    if not _is_kind(value, kind):
      raise self.error(key, f"expected {kind.__name__}, got {value!r}")
    return value


def _is_kind(value, kind) -> bool:
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, kind)


def load_yaml(text: str, path: str) -> Fields:
  """Safe YAML (no Python tags) with the line of every mapping key."""
  import yaml  # pylint: disable=g-import-not-at-top

  try:
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    data = yaml.safe_load(text)
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    raise CheckpointError(f"{path}{line}: not valid YAML ({e})") from None
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}:1: expected a mapping of model settings")
  lines = {}

  def walk(n, prefix):
    if isinstance(n, yaml.MappingNode):
      for k, v in n.value:
        lines[prefix + str(k.value)] = k.start_mark.line + 1
        walk(v, prefix + str(k.value) + ".")

  walk(node, "")
  # Some files nest the model section under `model:` (NeMo reads conf.model then).
  if isinstance(data.get("model"), dict) and "num_layers" not in data:
    return Fields(data["model"], lines, path, prefix="model.")
  return Fields(data, lines, path)


def load_json(text: str, path: str) -> Fields:
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}:1: expected a JSON object")
  lines = {}

  def walk(obj, prefix, start):  # Each key's first occurrence after its parent's.
    for key, value in obj.items():
      m = re.compile(r'"%s"\s*:' % re.escape(key)).search(text, start)
      if m:
        lines[prefix + key] = text.count("\n", 0, m.start()) + 1
        if isinstance(value, dict):
          walk(value, f"{prefix}{key}.", m.end())

  walk(data, "", 0)
  return Fields(data, lines, path)


# ---------------------------------------------------------------------------------------------
# dtypes and torch <-> numpy (torch is imported lazily: it is only needed for .nemo).


def numpy_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def dtype_name(dtype) -> str:
  name = np.dtype(dtype).name
  if name not in DTYPE_NAMES:
    raise CheckpointError(f"parameter dtype {name} is not one of {DTYPE_NAMES}")
  return name


def torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top

  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(numpy_dtype("bfloat16")).copy()
  return t.numpy().copy()


def numpy_to_torch(a: np.ndarray):
  import torch  # pylint: disable=g-import-not-at-top

  a = np.ascontiguousarray(a)
  if a.dtype == numpy_dtype("bfloat16"):
    return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(a.copy())


# ---------------------------------------------------------------------------------------------
# Tensor checks and the parameter tree.


def check_tensors(source: str, expected: dict[str, tuple], got: dict[str, Any],
                  ignored=lambda k: False):
  """Stops with one error listing every missing, unexpected and mis-shaped tensor."""
  missing = sorted(k for k in expected if k not in got)
  unexpected = sorted(k for k in got if k not in expected and not ignored(k))
  shapes = sorted(f"{k}: {tuple(got[k].shape)}, expected {tuple(expected[k])}"
                  for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k]))
  problems = []
  if missing:
    problems.append("missing tensors: " + ", ".join(missing))
  if unexpected:
    problems.append("unexpected tensors: " + ", ".join(unexpected))
  if shapes:
    problems.append("mis-shaped tensors: " + "; ".join(shapes))
  if problems:
    raise CheckpointError(f"{source}: " + " | ".join(problems))


def param_shapes(cfg: ModelConfig) -> dict[str, tuple]:
  """Flat 'a/b/c' -> shape of the model's parameter tree (from the model itself)."""
  tree = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0)))
  return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def flatten(tree, prefix="") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for k, v in flat.items():
    node = tree
    *parents, leaf = k.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def check_params(cfg: ModelConfig, params, source: str) -> dict[str, np.ndarray]:
  """Params as a flat dict of numpy arrays, checked against the model's own tree."""
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  check_tensors(source, param_shapes(cfg), flat)
  dtypes = sorted({v.dtype.name for v in flat.values()})
  if len(dtypes) != 1:
    raise CheckpointError(f"{source}: parameters mix dtypes {dtypes}")
  dtype_name(flat["embedding"].dtype)
  return flat
