"""NeMo 1.x Megatron GPT `.nemo` files: import (every weight layout) and export (torch_dist).

A .nemo is a tar (plain, or gzip before NeMo 1.7) holding `model_config.yaml`, the weights and
artifacts such as the SentencePiece tokenizer (`tokenizer.model: nemo:<hex>_<name>`). Weights
come as one `model_weights.ckpt`, as per-rank `mp_rank_XX/` or `tp_rank_XX_pp_rank_YYY/` files
(merged here), or as a megatron-core distributed checkpoint `model_weights/` (torch_dist or zarr)
whose per-layer tensors are stacked on a leading layer axis, the dpojax layout too.

Safety: tar members are read in place (never extracted), and a file with an absolute, `..`,
link or special member is refused whole. Tensors are unpickled with torch's weights_only loader;
the distributed checkpoint's `.metadata` pickle goes through an allow-list unpickler;
`_extra_state` payloads and `common.pt` are never unpickled.

Layouts (torch Linear weights are [out, in]; dpojax kernels are [in, ...out]):
  linear_qkv  [L, G*(N/G+2)*K, D]: per query group, N/G query heads then k then v.
  linear_fc1  [L, 2F, D] = [gate; up] when gated.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import uuid

import numpy as np

from dpojax.checkpoint.convert_common import (
    CheckpointError, Fields, Loaded, check_params, check_tensors, dtype_name, load_yaml,
    numpy_dtype, numpy_to_torch, torch_to_numpy, unflatten)
from dpojax.model import ModelConfig

CONFIG_NAME = "model_config.yaml"
WEIGHTS_FILE = "model_weights.ckpt"
WEIGHTS_DIR = "model_weights"
LAYERS = "model.decoder.layers."
# The layer modules whose `_extra_state` object GPTModel.sharded_state_dict asks for, by the
# megatron-core an export targets; a key no model asks for fails a strict (RAISE_ALL) load.
# The linear layers always (TE's FP8 metadata; the local spec's Column/RowParallelLinear add an
# empty one to match). Core attention only up to 0.14 with Transformer Engine (0.10.0, 0.14.0:
# TEDotProductAttention has no sharded_state_dict of its own). From 0.15.0 it and the local
# DotProductAttention return nothing unless softmax_type == "learnable" (0.16.1:
# megatron/core/extensions/transformer_engine.py:1436-1456,
# megatron/core/transformer/dot_product_attention.py:253-271).
_LINEAR_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj",
                   "mlp.linear_fc1", "mlp.linear_fc2")
EXTRA_STATE_MODULES = {"0.15": _LINEAR_MODULES,  # 0.15.0 and later (checked: 0.16.1).
                       "0.14": _LINEAR_MODULES + ("self_attention.core_attention",)}
MEGATRON_CORE = "0.15"  # The default target.
MEGATRON_GPT = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"


# ---------------------------------------------------------------------------------------------
# The container.


class Archive:
  """Read-only view of a .nemo tar (members read in place) or of an extracted .nemo folder."""

  def __init__(self, path: str):
    self.path = path
    self._tar = None
    self._files: dict[str, object] = {}
    if os.path.isdir(path):
      for root, dirs, files in os.walk(path):
        for name in dirs + files:
          full = os.path.join(root, name)
          rel = os.path.relpath(full, path).replace(os.sep, "/")
          if os.path.islink(full):
            raise CheckpointError(f"{path}: refusing link {rel!r}")
          if name in files:
            self._files[rel] = full
      return
    if not os.path.isfile(path):
      raise CheckpointError(f"{path}: no such .nemo file or folder")
    try:
      self._tar = tarfile.open(path, "r:*")  # Plain tar, or gzip for files before NeMo 1.7.
    except (tarfile.TarError, OSError) as e:
      why = "not a plain or gzip tar" if isinstance(e, tarfile.ReadError) else str(e)
      raise CheckpointError(f"{path}: not a .nemo tar file ({why})") from None
    try:
      members = self._tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:  # A .nemo cut short: a partial copy.
      raise CheckpointError(f"{path}: truncated or corrupt .nemo tar file ({e})") from None
    for member in members:
      name = _safe_member_name(path, member)
      if name is None or member.isdir():
        continue
      if name in self._files:
        raise CheckpointError(f"{path}: duplicate tar member {member.name!r}")
      self._files[name] = member

  def names(self) -> list[str]:
    return sorted(self._files)

  def has(self, name: str) -> bool:
    return name in self._files

  def open(self, name: str):
    if name not in self._files:
      raise CheckpointError(f"{self.path}: no member {name!r}")
    if self._tar is None:
      return open(self._files[name], "rb")
    return self._tar.extractfile(self._files[name])

  def read(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
    with self.open(name) as f:
      f.seek(offset)
      return f.read() if length is None else f.read(length)

  def where(self, name: str) -> str:
    return f"{self.path}/{name}" if self._tar is None else f"{self.path}!{name}"

  def close(self):
    if self._tar is not None:
      self._tar.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _safe_member_name(path: str, member: tarfile.TarInfo) -> str | None:
  """The member's name without './', or an error for anything that could escape the target."""
  raw = member.name
  if raw.startswith("/") or raw.startswith("\\") or re.match(r"^[A-Za-z]:", raw):
    raise CheckpointError(f"{path}: refusing tar member {raw!r} (absolute path)")
  parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
  if ".." in parts:
    raise CheckpointError(f"{path}: refusing tar member {raw!r} ('..' component)")
  if member.issym() or member.islnk():
    raise CheckpointError(
        f"{path}: refusing tar member {raw!r} (link to {member.linkname!r})")
  if not (member.isfile() or member.isdir()):
    raise CheckpointError(f"{path}: refusing tar member {raw!r} (not a regular file)")
  return "/".join(parts) or None


# ---------------------------------------------------------------------------------------------
# model_config.yaml <-> ModelConfig.


def read_config(archive: Archive) -> Fields:
  if not archive.has(CONFIG_NAME):
    raise CheckpointError(f"{archive.path}: no {CONFIG_NAME} inside")
  return load_yaml(archive.read(CONFIG_NAME).decode("utf-8"), archive.where(CONFIG_NAME))


def _false(f: Fields, key: str, why: str):
  if f.get(key):
    raise f.error(key, f"{f.get(key)!r} is not supported ({why})")


def config_from_yaml(f: Fields, vocab_size: int, param_dtype: str) -> ModelConfig:
  """ModelConfig from model_config.yaml; anything dpojax's model cannot reproduce stops here."""
  bias = f.optional("bias", bool, True)  # megatron_gpt_config.yaml's default.
  if f.optional("qkv_bias", bool, False) and not bias:
    raise f.error("qkv_bias", "a QKV-only bias is not supported (model.bias covers every "
                  "linear layer)")
  openai_gelu = f.optional("openai_gelu", bool, False)
  activation = f.optional("activation", str, "gelu")
  if activation in ("swiglu", "fast-swiglu"):
    act = "swiglu"
  elif activation == "gelu":
    # megatron-core's fused bias-gelu (bias + bias_activation_fusion) is the tanh form.
    fused = bias and f.optional("bias_activation_fusion", bool, True)
    act = "gelu_tanh" if openai_gelu or fused else "gelu"
  elif activation == "squared-relu":
    act = "squared_relu"
  else:
    raise f.error("activation", f"{activation!r} is not supported (supported: gelu, swiglu, "
                  "fast-swiglu, squared-relu)")
  if openai_gelu and activation != "gelu":
    raise f.error("openai_gelu", f"true with activation {activation!r} is not supported")
  norm = f.optional("normalization", str, "layernorm")
  if norm not in ("layernorm", "layernorm1p", "rmsnorm"):
    raise f.error("normalization", f"{norm!r} is not one of layernorm, layernorm1p, rmsnorm")
  if f.optional("layernorm_zero_centered_gamma", bool, False):
    if norm == "rmsnorm":
      raise f.error("layernorm_zero_centered_gamma", "is not supported with rmsnorm")
    norm = "layernorm1p"
  pos = f.optional("position_embedding_type", str, "learned_absolute")
  if pos not in ("rope", "learned_absolute"):
    raise f.error("position_embedding_type", f"{pos!r} is not one of rope, learned_absolute")
  for key, why in (("rotary_interleaved", "only rotate-half RoPE"),
                   ("seq_len_interpolation_factor", "no RoPE scaling"),
                   ("scale_positional_embedding", "no Llama-3.1 RoPE scaling"),
                   ("apply_embedding_scaling", "no embedding scaling"),
                   ("qk_layernorm", "no q/k layernorm"),
                   ("headscale", "legacy option"),
                   ("apply_residual_connection_post_layernorm", "pre-LN only"),
                   ("num_moe_experts", "no mixture of experts"),
                   ("mcore_customization_config", "no customised layers")):
    _false(f, key, why)
  if f.optional("transformer_block_type", str, "pre_ln") != "pre_ln":
    raise f.error("transformer_block_type", "only pre_ln is supported")
  if not f.optional("normalize_attention_scores", bool, True):
    raise f.error("normalize_attention_scores", "false is not supported")
  if f.optional("name", str, "") not in ("", "te_gpt", "megatron_gpt"):
    raise f.error("name", f"layer spec {f.get('name')!r} is not supported")
  max_pos = f.optional("max_position_embeddings", int, None)
  if max_pos is None:
    max_pos = f.require("encoder_seq_length", int)
  kwargs = dict(
      vocab_size=vocab_size,
      hidden_size=f.require("hidden_size", int),
      num_layers=f.require("num_layers", int),
      num_attention_heads=f.require("num_attention_heads", int),
      num_query_groups=f.optional("num_query_groups", int, None),
      kv_channels=f.optional("kv_channels", int, None),
      ffn_hidden_size=f.require("ffn_hidden_size", int),
      activation=act, normalization=norm,
      layernorm_epsilon=float(f.optional("layernorm_epsilon", float, 1e-5)),
      position_embedding_type=pos,
      rotary_percentage=float(f.optional("rotary_percentage", float, 1.0)),
      rotary_base=float(f.optional("rotary_base", float, 10000.0)),
      max_position_embeddings=max_pos, bias=bias,
      share_embeddings_and_output_weights=f.optional(
          "share_embeddings_and_output_weights", bool, True),
      init_method_std=float(f.optional("init_method_std", float, 0.02)),
      param_dtype=param_dtype)
  try:
    return ModelConfig(**kwargs)
  except ValueError as e:
    raise CheckpointError(f"{f.path}: {e}") from None


_ACTIVATION_OUT = {"swiglu": "fast-swiglu", "gelu": "gelu", "gelu_tanh": "gelu",
                   "squared_relu": "squared-relu"}
_PRECISION = {"float32": 32, "bfloat16": "bf16", "float16": 16}


def config_to_yaml(cfg: ModelConfig, tokenizer_member: str | None, vocab_divisor: int,
                   base: dict | None = None) -> dict:
  """model_config.yaml for megatron-core GPT: `base` (e.g. the imported file) + architecture."""
  # Training-side keys NeMo reads when it restores a model; a `base` file keeps its own.
  out = {"micro_batch_size": 1, "global_batch_size": 1, "hidden_dropout": 0.0,
         "attention_dropout": 0.0, "ffn_dropout": 0.0, "apply_query_key_layer_scaling": False,
         "masked_softmax_fusion": True, "bias_dropout_add_fusion": False,
         "apply_rope_fusion": False}
  out.update(base or {})
  for key in ("dist_ckpt_format", "layernorm_zero_centered_gamma", "openai_gelu",
              "bias_activation_fusion", "qkv_bias", "rotary_interleaved"):
    out.pop(key, None)
  out.update({
      "mcore_gpt": True,
      "transformer_engine": True,
      "tensor_model_parallel_size": out.get("tensor_model_parallel_size", 1),
      "pipeline_model_parallel_size": out.get("pipeline_model_parallel_size", 1),
      "encoder_seq_length": cfg.max_position_embeddings,
      "max_position_embeddings": cfg.max_position_embeddings,
      "num_layers": cfg.num_layers,
      "hidden_size": cfg.hidden_size,
      "ffn_hidden_size": cfg.ffn_hidden_size,
      "num_attention_heads": cfg.num_attention_heads,
      "num_query_groups": cfg.num_query_groups,
      "kv_channels": cfg.kv_channels,
      "init_method_std": cfg.init_method_std,
      "normalization": cfg.normalization,
      "layernorm_zero_centered_gamma": cfg.normalization == "layernorm1p",
      "layernorm_epsilon": cfg.layernorm_epsilon,
      "make_vocab_size_divisible_by": vocab_divisor,
      "bias": cfg.bias,
      "activation": _ACTIVATION_OUT[cfg.activation],
      "openai_gelu": cfg.activation == "gelu_tanh",
      "bias_activation_fusion": False,
      "position_embedding_type": cfg.position_embedding_type,
      "rotary_percentage": cfg.rotary_percentage,
      "rotary_base": cfg.rotary_base,
      "rotary_interleaved": False,
      "share_embeddings_and_output_weights": cfg.share_embeddings_and_output_weights,
      "precision": _PRECISION[cfg.param_dtype],
      "megatron_amp_O2": False,
      "dist_ckpt_format": "torch_dist",
      "target": MEGATRON_GPT,
      "nemo_version": out.get("nemo_version", "1.23.0"),
  })
  tok = dict(out.get("tokenizer") or {})
  if tokenizer_member is not None:
    tok.update({"library": "sentencepiece", "type": None,
                "model": "nemo:" + tokenizer_member, "vocab_file": None, "merge_file": None,
                "delimiter": None, "sentencepiece_legacy": False})
  elif str(tok.get("model", "")).startswith("nemo:"):
    tok["model"] = None  # The base file's artifact is not in this export.
  if tok:
    out["tokenizer"] = tok
  return out


# ---------------------------------------------------------------------------------------------
# Weights: every layout to one dict of global tensors with distributed-checkpoint names
# (layers stacked on axis 0, Transformer Engine layernorm names).


class _Stub:
  """Stand-in for the megatron classes that megatron-core 0.11-0.15 pickled into .metadata."""

  def __setstate__(self, state):
    self.__dict__.update(state if isinstance(state, dict) else {})


_ALLOWED_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "MetadataIndex",
        "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.planner": {
        "WriteItem", "WriteItemType", "TensorWriteData", "SavePlan", "BytesIOWriteData"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
_MEGATRON_STUBS = {("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
                   ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata")}


class _MetadataUnpickler(pickle.Unpickler):
  """Unpickles DCP `.metadata`; any global outside the allow-list stops the load."""

  where = ""

  def find_class(self, module, name):
    if (module, name) in _MEGATRON_STUBS:
      return type(name, (_Stub,), {"__module__": module})
    if module == "torch" and name == "Size":
      import torch  # pylint: disable=g-import-not-at-top
      return torch.Size
    if module == "torch":
      import torch  # pylint: disable=g-import-not-at-top
      value = getattr(torch, name, None)
      if isinstance(value, torch.dtype):
        return value
    elif name in _ALLOWED_GLOBALS.get(module, ()):
      return super().find_class(module, name)
    raise CheckpointError(f"{self.where}: refusing to unpickle {module}.{name} (not a "
                          "distributed-checkpoint metadata class)")


def _torch_load(data, where: str, allow_bytesio: bool = False):
  """torch.load with weights_only=True (tensors and plain containers only)."""
  import torch  # pylint: disable=g-import-not-at-top

  import warnings  # pylint: disable=g-import-not-at-top

  try:
    with warnings.catch_warnings():  # A plain pickle's protocol: the refusal below says enough.
      warnings.filterwarnings("ignore", message="Detected pickle protocol")
      if allow_bytesio:  # TE 1.x `_extra_state` values are io.BytesIO (dropped unread).
        with torch.serialization.safe_globals([io.BytesIO]):
          return torch.load(data, map_location="cpu", weights_only=True)
      return torch.load(data, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(
        f"{where}: refused to unpickle: {_torch_refusal(e)} (only tensors and plain containers "
        "are loaded; anything else could run code)") from None
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{where}: not a readable torch file ({_torch_refusal(e)})") from None


# torch's advice around the refusal: retry with weights_only=False, or allow-list the global.
_TORCH_ADVICE = re.compile(r"weights.only|re-running|still be loaded|safe_globals|trusted source|"
                           r"file an issue|documentation|pytorch\.org", re.IGNORECASE)


def _torch_refusal(e: Exception) -> str:
  """What torch.load refused (e.g. "Trying to load unsupported GLOBAL posix.system ..."),
  without torch's advice: that invites the unsafe retry."""
  text = str(e).replace("WeightsUnpickler error:", "\n")
  parts = [p.strip() for line in text.splitlines() for p in re.split(r"(?<=\.)\s+", line)]
  kept = [p for p in parts if p and not _TORCH_ADVICE.search(p)]
  return " ".join(kept).rstrip(".") or type(e).__name__


def _read_torch_dist(archive: Archive, prefix: str) -> dict[str, np.ndarray]:
  where = archive.where(prefix + ".metadata")
  if not archive.has(prefix + ".metadata"):
    raise CheckpointError(f"{where}: missing (torch_dist checkpoint)")
  unpickler = _MetadataUnpickler(io.BytesIO(archive.read(prefix + ".metadata")))
  unpickler.where = where
  try:
    md = unpickler.load()
  except CheckpointError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{where}: unreadable metadata ({e})") from None
  state = getattr(md, "state_dict_metadata", None)
  storage = getattr(md, "storage_data", None)
  if not isinstance(state, dict) or not isinstance(storage, dict):
    raise CheckpointError(f"{where}: not a torch.distributed.checkpoint Metadata")
  by_chunk = {(idx.fqn, tuple(idx.offset or ())): info for idx, info in storage.items()}
  out = {}
  for key, meta in state.items():
    if not hasattr(meta, "chunks"):  # BytesStorageMetadata: `_extra_state`, never unpickled.
      continue
    shape = tuple(meta.size)
    dtype = _numpy_dtype_of(meta.properties.dtype, where, key)
    array = np.zeros(shape, dtype)
    boxes = []
    for chunk in meta.chunks:
      offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
      info = by_chunk.get((key, offsets))
      if info is None:
        raise CheckpointError(f"{where}: {key}: no storage for chunk at {offsets}")
      if getattr(info, "transform_descriptors", None):
        raise CheckpointError(f"{where}: {key}: stream transforms "
                              f"{info.transform_descriptors} are not supported")
      file = prefix + info.relative_path
      raw = archive.read(file, info.offset, info.length)
      tensor = _torch_load(io.BytesIO(raw), f"{archive.where(file)}@{info.offset} ({key})")
      chunk_array = torch_to_numpy(tensor)
      if chunk_array.shape != sizes or chunk_array.dtype != dtype:
        raise CheckpointError(f"{archive.where(file)}: {key} chunk at {offsets}: got "
                              f"{chunk_array.shape} {chunk_array.dtype}, metadata says "
                              f"{sizes} {dtype}")
      box = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
      if any(o + s > n for o, s, n in zip(offsets, sizes, shape)):
        raise CheckpointError(f"{where}: {key}: chunk {offsets}+{sizes} outside {shape}")
      array[box] = chunk_array
      boxes.append((offsets, sizes))
    _check_cover(where, key, shape, boxes)
    out[key] = array
  return out


def _check_cover(where: str, key: str, shape: tuple, boxes: list):
  """Chunks must tile the tensor: no gaps (volumes add up) and no overlaps."""
  volume = sum(int(np.prod(s)) for _, s in boxes)
  overlap = any(
      all(max(oa, ob) < min(oa + sa, ob + sb) for oa, sa, ob, sb in zip(a[0], a[1], b[0], b[1]))
      for i, a in enumerate(boxes) for b in boxes[i + 1:]) if len(boxes) < 4096 else False
  if overlap or volume != int(np.prod(shape)):
    raise CheckpointError(f"{where}: {key}: chunks do not tile the global shape {shape}")


def _numpy_dtype_of(torch_dtype, where, key) -> np.dtype:
  name = str(torch_dtype).replace("torch.", "")
  if name not in ("float32", "bfloat16", "float16"):
    raise CheckpointError(f"{where}: {key}: dtype {name} is not supported")
  return numpy_dtype(name)


_ZARR_DTYPES = {"<f4": "float32", "<f2": "float16", "bfloat16": "bfloat16", "<V2": "bfloat16"}


def _read_zarr(archive: Archive, prefix: str) -> dict[str, np.ndarray]:
  """zarr v2 arrays written by megatron-core: uncompressed C-order chunks, read by hand."""
  keys = sorted({n[len(prefix):].split("/")[0] for n in archive.names()
                 if n.startswith(prefix) and n.endswith("/.zarray")})
  out = {}
  for key in keys:
    where = archive.where(f"{prefix}{key}/.zarray")
    try:
      meta = json.loads(archive.read(f"{prefix}{key}/.zarray"))
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None
    for field, allowed in (("zarr_format", (2,)), ("compressor", (None,)),
                           ("filters", (None, [])), ("order", ("C",))):
      if meta.get(field) not in allowed:
        raise CheckpointError(f"{where}: {field}: {meta.get(field)!r} is not supported "
                              f"(expected {allowed[0]!r}: uncompressed megatron-core zarr)")
    if meta.get("dtype") not in _ZARR_DTYPES:
      raise CheckpointError(f"{where}: dtype: {meta.get('dtype')!r} is not supported")
    dtype = numpy_dtype(_ZARR_DTYPES[meta["dtype"]])
    shape, chunks = tuple(meta["shape"]), tuple(meta["chunks"])
    sep = meta.get("dimension_separator", ".")
    array = np.zeros(shape, dtype)
    grid = [range(-(-n // c)) for n, c in zip(shape, chunks)]
    for index in np.ndindex(*[len(g) for g in grid]) if shape else [()]:
      name = f"{prefix}{key}/" + (sep.join(map(str, index)) if shape else "0")
      if not archive.has(name):
        raise CheckpointError(f"{archive.where(name)}: missing zarr chunk of {key}")
      raw = archive.read(name)
      if len(raw) != int(np.prod(chunks)) * dtype.itemsize:
        raise CheckpointError(f"{archive.where(name)}: {len(raw)} bytes, expected "
                              f"{int(np.prod(chunks)) * dtype.itemsize} for chunk {chunks}")
      block = np.frombuffer(raw, dtype).reshape(chunks)
      box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, shape))
      array[box] = block[tuple(slice(0, b.stop - b.start) for b in box)]
    out[key] = array
  return out


_LEGACY_RENAMES = (  # Non-mcore NeMo GPT and mcore local-spec names -> TE-spec mcore names.
    (r"^model\.language_model\.embedding\.", "model.embedding."),
    (r"^model\.language_model\.encoder\.final_layernorm\.", "model.decoder.final_layernorm."),
    (r"^model\.language_model\.output_layer\.", "model.output_layer."),
    (r"^model\.language_model\.encoder\.layers\.", "model.decoder.layers."),
    (r"(layers\.\d+\.)input_layernorm\.", r"\1self_attention.linear_qkv.layer_norm_"),
    (r"(layers\.\d+\.)post_attention_layernorm\.", r"\1mlp.linear_fc1.layer_norm_"),
    (r"(layers\.\d+\.)pre_mlp_layernorm\.", r"\1mlp.linear_fc1.layer_norm_"),
    (r"(layers\.\d+\.)self_attention\.query_key_value\.", r"\1self_attention.linear_qkv."),
    (r"(layers\.\d+\.)self_attention\.dense\.", r"\1self_attention.linear_proj."),
    (r"(layers\.\d+\.)mlp\.dense_h_to_4h_2\.", r"\1mlp.linear_fc1_up."),
    (r"(layers\.\d+\.)mlp\.dense_h_to_4h\.", r"\1mlp.linear_fc1."),
    (r"(layers\.\d+\.)mlp\.dense_4h_to_h\.", r"\1mlp.linear_fc2."),
)


def _ignored(key: str) -> bool:
  return (key.endswith("._extra_state") or "._extra_state/" in key
          or key.endswith("rotary_pos_emb.inv_freq"))


def _rename_legacy(state: dict, where: str) -> dict:
  out = {}
  for key, value in state.items():
    if key.startswith("model.module."):  # megatron_amp_O2 wrappers.
      key = "model." + key[len("model.module."):]
    if not key.startswith("model."):
      key = "model." + key
    if _ignored(key):
      continue
    for pattern, repl in _LEGACY_RENAMES:
      key = re.sub(pattern, repl, key)
    if not hasattr(value, "shape"):
      raise CheckpointError(f"{where}: {key}: expected a tensor, got {type(value).__name__}")
    out[key] = torch_to_numpy(value)
  # Non-fast GLU kept the up projection apart (dense_h_to_4h_2): fc1 = [gate; up].
  for key in [k for k in out if ".mlp.linear_fc1_up." in k]:
    up = out.pop(key)
    gate_key = key.replace(".linear_fc1_up.", ".linear_fc1.")
    if gate_key not in out:
      raise CheckpointError(f"{where}: {key} without {gate_key}")
    out[gate_key] = np.concatenate([out[gate_key], up], 0)
  return out


def _load_state_file(archive: Archive, name: str) -> dict:
  with archive.open(name) as f:
    obj = _torch_load(f, archive.where(name), allow_bytesio=True)
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]  # A Lightning checkpoint rather than a bare state dict.
  if not isinstance(obj, dict):
    raise CheckpointError(f"{archive.where(name)}: expected a state dict, got "
                          f"{type(obj).__name__}")
  return obj


_LAYER_RE = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.+)$")


def _stack_layers(state: dict, where: str) -> dict[str, np.ndarray]:
  """`layers.{i}.x` keys -> one `layers.x` tensor with a leading layer axis."""
  out, per_layer = {}, {}
  for key, value in state.items():
    m = _LAYER_RE.match(key)
    if m:
      per_layer.setdefault(m.group(2), {})[int(m.group(1))] = value
    else:
      out[key] = value
  if not per_layer:
    return out
  num_layers = 1 + max(max(d) for d in per_layer.values())
  for rest, layers in sorted(per_layer.items()):
    missing = [i for i in range(num_layers) if i not in layers]
    if missing:
      raise CheckpointError(f"{where}: missing tensors: " +
                            ", ".join(f"model.decoder.layers.{i}.{rest}" for i in missing))
    shapes = {layers[i].shape for i in range(num_layers)}
    if len(shapes) > 1:
      raise CheckpointError(f"{where}: model.decoder.layers.*.{rest}: shapes differ across "
                            f"layers {sorted(shapes)}")
    out[LAYERS + rest] = np.stack([layers[i] for i in range(num_layers)])
  return out


_RANK_RE = re.compile(r"^(?:mp_rank_(\d+)|tp_rank_(\d+)_pp_rank_(\d+))/" + WEIGHTS_FILE + "$")
_COLUMN_PARALLEL = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
                    "embedding.word_embeddings.weight", "output_layer.weight")
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def _merge_ranks(archive: Archive, files: dict, gated: bool, f: Fields) -> dict:
  """Per-rank legacy files -> one TP=PP=1 state dict (megatron_change_num_partitions rules)."""
  tp = 1 + max(t for t, _ in files)
  pp = 1 + max(p for _, p in files)
  missing = [f"({t}, {p})" for t in range(tp) for p in range(pp) if (t, p) not in files]
  if missing:
    raise CheckpointError(f"{archive.path}: missing (tp, pp) rank files {', '.join(missing)}")
  for key, n in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp)):
    if f.optional(key, int, n) != n:
      raise f.error(key, f"{f.get(key)} but the file holds {n} rank(s)")
  merged, offset = {}, 0
  for p in range(pp):
    ranks = [_rename_legacy(_load_state_file(archive, files[t, p]), archive.where(files[t, p]))
             for t in range(tp)]
    local = [int(m.group(1)) for k in ranks[0] if (m := _LAYER_RE.match(k))]
    stage_layers = 1 + max(local) if local else 0
    for key in ranks[0]:
      where = archive.where(files[0, p])
      parts = [r.get(key) for r in ranks]
      if any(x is None for x in parts):
        raise CheckpointError(f"{where}: {key} is missing from some tensor-parallel ranks")
      m = _LAYER_RE.match(key)
      name = f"{LAYERS}{int(m.group(1)) + offset}.{m.group(2)}" if m else key
      if any(key.endswith(s) for s in _COLUMN_PARALLEL):
        if gated and ".mlp.linear_fc1." in key:  # Each rank holds [gate_r; up_r].
          halves = [np.split(x, 2, 0) for x in parts]
          value = np.concatenate([h[0] for h in halves] + [h[1] for h in halves], 0)
        else:
          value = np.concatenate(parts, 0)
      elif any(key.endswith(s) for s in _ROW_PARALLEL):
        value = np.concatenate(parts, 1)
      else:
        if any(not np.array_equal(parts[0], x) for x in parts[1:]):
          raise CheckpointError(f"{where}: {key} should be replicated but differs across "
                                "tensor-parallel ranks")
        value = parts[0]
      if name in merged:  # E.g. a tied embedding repeated on the last pipeline stage.
        if not np.array_equal(merged[name], value):
          raise CheckpointError(f"{where}: {name} appears in several pipeline stages with "
                                "different values")
        continue
      merged[name] = value
    offset += stage_layers
  return merged


def read_weights(archive: Archive, f: Fields, gated: bool) -> tuple[dict, str]:
  """All weights as global tensors under distributed-checkpoint names; and the layout name."""
  rank_files = {}
  for name in archive.names():
    m = _RANK_RE.match(name)
    if m:
      t = int(m.group(1) if m.group(1) is not None else m.group(2))
      rank_files[t, int(m.group(3) or 0)] = name
  dist = archive.has(f"{WEIGHTS_DIR}/metadata.json")
  layouts = [n for n, present in (("model_weights.ckpt", archive.has(WEIGHTS_FILE)),
                                  ("rank files", bool(rank_files)),
                                  ("model_weights/", dist)) if present]
  if not layouts:
    raise CheckpointError(f"{archive.path}: no weights (expected {WEIGHTS_FILE}, "
                          f"mp_rank_XX/{WEIGHTS_FILE} or {WEIGHTS_DIR}/metadata.json)")
  if len(layouts) > 1:
    raise CheckpointError(f"{archive.path}: several weight layouts at once: {layouts}")
  if archive.has(WEIGHTS_FILE):
    where = archive.where(WEIGHTS_FILE)
    state = _rename_legacy(_load_state_file(archive, WEIGHTS_FILE), where)
    return _stack_layers(state, where), "ckpt"
  if rank_files:
    return _stack_layers(_merge_ranks(archive, rank_files, gated, f), archive.path), "ranks"
  where = archive.where(f"{WEIGHTS_DIR}/metadata.json")
  try:
    meta = json.loads(archive.read(f"{WEIGHTS_DIR}/metadata.json"))
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None
  backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
  if backend == "torch_dist":
    state = _read_torch_dist(archive, WEIGHTS_DIR + "/")
  elif backend == "zarr":
    state = _read_zarr(archive, WEIGHTS_DIR + "/")
  else:
    raise CheckpointError(f"{where}: sharded_backend: {backend!r} is not torch_dist or zarr")
  # Non-homogeneous models keep `layers.{i}.` keys even in distributed checkpoints.
  return _stack_layers({k: v for k, v in state.items() if not _ignored(k)}, where), backend


# ---------------------------------------------------------------------------------------------
# Distributed-checkpoint tensors <-> dpojax params.


def mcore_shapes(cfg: ModelConfig) -> dict[str, tuple]:
  v, d, l = cfg.vocab_size, cfg.hidden_size, cfg.num_layers
  n, g, k, f = cfg.num_attention_heads, cfg.groups, cfg.head_dim, cfg.ffn_hidden_size
  ln = cfg.normalization != "rmsnorm"  # megatron layernorms keep a bias even with bias=false.
  fc1 = 2 * f if cfg.gated else f
  s = {"model.embedding.word_embeddings.weight": (v, d),
       "model.decoder.final_layernorm.weight": (d,)}
  if cfg.position_embedding_type == "learned_absolute":
    s["model.embedding.position_embeddings.weight"] = (cfg.max_position_embeddings, d)
  if not cfg.share_embeddings_and_output_weights:
    s["model.output_layer.weight"] = (v, d)
  layer = {"self_attention.linear_qkv.layer_norm_weight": (d,),
           "self_attention.linear_qkv.weight": ((n + 2 * g) * k, d),
           "self_attention.linear_proj.weight": (d, n * k),
           "mlp.linear_fc1.layer_norm_weight": (d,),
           "mlp.linear_fc1.weight": (fc1, d),
           "mlp.linear_fc2.weight": (d, f)}
  if ln:
    s["model.decoder.final_layernorm.bias"] = (d,)
    layer["self_attention.linear_qkv.layer_norm_bias"] = (d,)
    layer["mlp.linear_fc1.layer_norm_bias"] = (d,)
  if cfg.bias:
    layer.update({"self_attention.linear_qkv.bias": ((n + 2 * g) * k,),
                  "self_attention.linear_proj.bias": (d,),
                  "mlp.linear_fc1.bias": (fc1,), "mlp.linear_fc2.bias": (d,)})
  s.update({LAYERS + key: (l,) + shape for key, shape in layer.items()})
  return s


def _norm(t: dict, prefix: str, ln: bool) -> dict:
  out = {"scale": t[prefix + "weight"]}
  if ln:
    out["bias"] = t[prefix + "bias"]
  return out


def mcore_to_params(t: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  l, d, n, g, k = (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.groups,
                   cfg.head_dim)
  f, hpg = cfg.ffn_hidden_size, n // g
  ln = cfg.normalization != "rmsnorm"
  c = np.ascontiguousarray
  P = LAYERS  # pylint: disable=invalid-name
  qkv = t[P + "self_attention.linear_qkv.weight"].reshape(l, g, hpg + 2, k, d)
  attention = {
      "query": c(qkv[:, :, :hpg].reshape(l, n, k, d).transpose(0, 3, 1, 2)),
      "key": c(qkv[:, :, hpg].transpose(0, 3, 1, 2)),
      "value": c(qkv[:, :, hpg + 1].transpose(0, 3, 1, 2)),
      "out": c(t[P + "self_attention.linear_proj.weight"].reshape(l, d, n, k)
               .transpose(0, 2, 3, 1)),
  }
  fc1 = t[P + "mlp.linear_fc1.weight"]
  mlp = {"fc1": c(fc1.reshape(l, 2, f, d).transpose(0, 3, 1, 2) if cfg.gated
                  else fc1.transpose(0, 2, 1)),
         "fc2": c(t[P + "mlp.linear_fc2.weight"].transpose(0, 2, 1))}
  if cfg.bias:
    qkv_b = t[P + "self_attention.linear_qkv.bias"].reshape(l, g, hpg + 2, k)
    attention["query_bias"] = c(qkv_b[:, :, :hpg].reshape(l, n, k))
    attention["key_bias"] = c(qkv_b[:, :, hpg])
    attention["value_bias"] = c(qkv_b[:, :, hpg + 1])
    attention["out_bias"] = t[P + "self_attention.linear_proj.bias"]
    fc1_b = t[P + "mlp.linear_fc1.bias"]
    mlp["fc1_bias"] = c(fc1_b.reshape(l, 2, f)) if cfg.gated else fc1_b
    mlp["fc2_bias"] = t[P + "mlp.linear_fc2.bias"]
  params = {
      "embedding": t["model.embedding.word_embeddings.weight"],
      "final_norm": _norm(t, "model.decoder.final_layernorm.", ln),
      "layers": {"attention": attention, "mlp": mlp,
                 "input_norm": _norm(t, P + "self_attention.linear_qkv.layer_norm_", ln),
                 "pre_mlp_norm": _norm(t, P + "mlp.linear_fc1.layer_norm_", ln)},
  }
  if cfg.position_embedding_type == "learned_absolute":
    params["position_embedding"] = t["model.embedding.position_embeddings.weight"]
  if not cfg.share_embeddings_and_output_weights:
    params["output"] = t["model.output_layer.weight"]
  return params


def params_to_mcore(p: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  l, d, n, g, k = (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.groups,
                   cfg.head_dim)
  f, hpg = cfg.ffn_hidden_size, n // g
  c = np.ascontiguousarray
  P = LAYERS  # pylint: disable=invalid-name
  a, m = p["layers"]["attention"], p["layers"]["mlp"]
  q = a["query"].transpose(0, 2, 3, 1).reshape(l, g, hpg, k, d)
  kv = [a[x].transpose(0, 2, 3, 1)[:, :, None] for x in ("key", "value")]
  t = {"model.embedding.word_embeddings.weight": p["embedding"],
       P + "self_attention.linear_qkv.weight":
           c(np.concatenate([q] + kv, 2).reshape(l, (n + 2 * g) * k, d)),
       P + "self_attention.linear_proj.weight": c(a["out"].transpose(0, 3, 1, 2)
                                                  .reshape(l, d, n * k)),
       P + "mlp.linear_fc1.weight": c(m["fc1"].transpose(0, 2, 3, 1).reshape(l, 2 * f, d)
                                      if cfg.gated else m["fc1"].transpose(0, 2, 1)),
       P + "mlp.linear_fc2.weight": c(m["fc2"].transpose(0, 2, 1))}
  for prefix, norm in (("model.decoder.final_layernorm.", p["final_norm"]),
                       (P + "self_attention.linear_qkv.layer_norm_", p["layers"]["input_norm"]),
                       (P + "mlp.linear_fc1.layer_norm_", p["layers"]["pre_mlp_norm"])):
    t[prefix + "weight"] = norm["scale"]
    if "bias" in norm:
      t[prefix + "bias"] = norm["bias"]
  if cfg.bias:
    qb = a["query_bias"].reshape(l, g, hpg, k)
    t[P + "self_attention.linear_qkv.bias"] = c(np.concatenate(
        [qb, a["key_bias"][:, :, None], a["value_bias"][:, :, None]], 2).reshape(l, -1))
    t[P + "self_attention.linear_proj.bias"] = a["out_bias"]
    t[P + "mlp.linear_fc1.bias"] = m["fc1_bias"].reshape(l, -1)
    t[P + "mlp.linear_fc2.bias"] = m["fc2_bias"]
  if "position_embedding" in p:
    t["model.embedding.position_embeddings.weight"] = p["position_embedding"]
  if "output" in p:
    t["model.output_layer.weight"] = p["output"]
  return {key: c(v) for key, v in t.items()}


# ---------------------------------------------------------------------------------------------
# Public API.


def load_nemo(path: str, extract_dir: str | None = None) -> Loaded:
  """(ModelConfig, params as numpy in the dpojax layout, tokenizer path or None).

  The tokenizer stored in the file is written to `extract_dir` (default: a new temporary
  folder); nothing else is written anywhere.
  """
  with Archive(path) as archive:
    f = read_config(archive)
    act = f.get("activation")
    state, layout = read_weights(archive, f, gated=isinstance(act, str) and act.endswith("glu"))
    source = f"{path} ({layout} weights)"
    emb = state.get("model.embedding.word_embeddings.weight")
    if emb is None or emb.ndim != 2:
      raise CheckpointError(f"{source}: missing tensors: model.embedding.word_embeddings.weight")
    # The vocab is the (possibly padded) table's size; padding rows are kept.
    cfg = config_from_yaml(f, emb.shape[0], dtype_name(emb.dtype))
    if cfg.share_embeddings_and_output_weights and "model.output_layer.weight" in state:
      if not np.array_equal(state["model.output_layer.weight"], emb):
        raise CheckpointError(f"{source}: model.output_layer.weight differs from the "
                              f"embedding but {f.where('share_embeddings_and_output_weights')} "
                              "is true")
      del state["model.output_layer.weight"]
    check_tensors(source, mcore_shapes(cfg), state, ignored=_ignored)
    dtypes = sorted({v.dtype.name for v in state.values()})
    if len(dtypes) > 1:
      raise CheckpointError(f"{source}: tensors mix dtypes {dtypes}")
    params = mcore_to_params(state, cfg)
    check_params(cfg, params, source)
    tokenizer = _extract_tokenizer(archive, f, extract_dir)
  return Loaded(cfg, params, tokenizer)


def read_nemo_config(path: str) -> dict:
  """The raw model_config.yaml of a .nemo (to carry its non-architecture keys to an export)."""
  with Archive(path) as archive:
    return dict(read_config(archive).data)


def _extract_tokenizer(archive: Archive, f: Fields, extract_dir: str | None) -> str | None:
  tok = f.get("tokenizer")
  if not isinstance(tok, dict) or not isinstance(tok.get("model"), str):
    return None  # E.g. a Hugging Face tokenizer named by hub id: not packaged in the file.
  ref = tok["model"]
  member = ref[len("nemo:"):] if ref.startswith("nemo:") else os.path.basename(ref)
  if "/" in member or member in ("", ".", ".."):
    raise f.error("tokenizer.model", f"{ref!r} is not a file inside the .nemo")
  if not archive.has(member):
    if ref.startswith("nemo:"):
      raise f.error("tokenizer.model", f"{ref!r}: no such member in {archive.path}")
    return ref if os.path.isfile(ref) else None
  extract_dir = extract_dir or tempfile.mkdtemp(prefix="dpojax-nemo-")
  os.makedirs(extract_dir, exist_ok=True)
  out = os.path.join(extract_dir, member)
  with archive.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
  return out


def _vocab_divisor(vocab_size: int, tokenizer_path: str | None) -> int:
  """make_vocab_size_divisible_by that makes NeMo pad the tokenizer's vocab to our table."""
  if tokenizer_path is None:
    return 1
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  n = spm.SentencePieceProcessor(model_file=tokenizer_path).vocab_size()
  if n > vocab_size:
    raise CheckpointError(f"{tokenizer_path}: tokenizer has {n} pieces but the model's "
                          f"vocab_size is {vocab_size}")
  for d in (128, 64, 32, 16, 8, 4, 2, 1):
    if -(-n // d) * d == vocab_size:
      return d
  return vocab_size


def _write_torch_dist(directory: str, tensors: dict[str, np.ndarray], num_layers: int,
                      megatron_core: str):
  """A megatron-core torch_dist checkpoint written with plain torch DCP."""
  import torch.distributed.checkpoint as dcp  # pylint: disable=g-import-not-at-top
  from torch.distributed.checkpoint.default_planner import DefaultSavePlanner  # pylint: disable=g-import-not-at-top

  import torch  # pylint: disable=g-import-not-at-top

  state = {k: numpy_to_torch(v) for k, v in tensors.items()}
  # One `_extra_state` object per module and layer, stored as the list of the objects a rank
  # holds; None is accepted by every Transformer Engine version.
  for module in EXTRA_STATE_MODULES[megatron_core]:
    for i in range(num_layers):
      state[f"{LAYERS}{module}._extra_state/shard_{i}_{num_layers}"] = [None]
  os.makedirs(directory)
  import warnings  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "torch.distributed is not initialized": no_dist is meant.
    dcp.save(state, storage_writer=dcp.FileSystemWriter(directory),
             planner=DefaultSavePlanner(flatten_state_dict=False), no_dist=True)
  torch.save({}, os.path.join(directory, "common.pt"))
  with open(os.path.join(directory, "metadata.json"), "w") as fh:
    json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
               "common_backend": "torch", "common_backend_version": 1}, fh)


def save_nemo(path: str, cfg: ModelConfig, params, tokenizer_path: str | None = None, *,
              base_config: dict | None = None, megatron_core: str = MEGATRON_CORE):
  """Writes a .nemo (megatron-core torch_dist weights) that NeMo and megatron-core load.

  `base_config`: a model_config.yaml mapping (e.g. `read_nemo_config(source)`) whose
  non-architecture keys (data, optim, precision plugins, ...) are kept. `megatron_core`: the
  version whose keys the checkpoint holds, exactly (a strict load refuses any other set):
  "0.15" for 0.15.0 and later, "0.14" for 0.14 and earlier with Transformer Engine.
  """
  import yaml  # pylint: disable=g-import-not-at-top

  if megatron_core not in EXTRA_STATE_MODULES:
    raise CheckpointError(f"save_nemo({path}): megatron_core={megatron_core!r} is not one of "
                          f"{sorted(EXTRA_STATE_MODULES)}")

  flat = check_params(cfg, params, f"save_nemo({path})")
  cfg = dataclasses.replace(cfg, param_dtype=dtype_name(flat["embedding"].dtype))
  tensors = params_to_mcore(unflatten(flat), cfg)
  if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
    raise CheckpointError(f"{tokenizer_path}: tokenizer file not found")
  out_dir = os.path.dirname(os.path.abspath(path))
  os.makedirs(out_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".dpojax-nemo-", dir=out_dir) as stage:
    member = None
    if tokenizer_path is not None:
      # NeMo names artifacts <uuid4 hex>_<basename>; drop the prefix of an imported one.
      base = re.sub(r"^[0-9a-f]{32}_", "", os.path.basename(tokenizer_path))
      member = f"{uuid.uuid4().hex}_{base}"
      shutil.copyfile(tokenizer_path, os.path.join(stage, member))
    doc = config_to_yaml(cfg, member, _vocab_divisor(cfg.vocab_size, tokenizer_path),
                         base_config)
    with open(os.path.join(stage, CONFIG_NAME), "w") as fh:
      yaml.safe_dump(doc, fh, sort_keys=False)
    _write_torch_dist(os.path.join(stage, WEIGHTS_DIR), tensors, cfg.num_layers, megatron_core)
    partial = os.path.join(stage, "out.nemo")
    with tarfile.open(partial, "w:") as tar:  # Uncompressed, members '.', './...' as NeMo's.
      tar.add(stage, arcname=".", filter=_clean_tarinfo)
    os.replace(partial, path)  # Atomic: a crash never leaves a half-written .nemo.


def _clean_tarinfo(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
  if info.name == "./out.nemo":
    return None
  info.uid = info.gid = 0
  info.uname = info.gname = ""
  return info
