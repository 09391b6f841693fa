"""Weights: every .nemo layout (one ckpt, per-rank files, torch_dist, zarr) to one dict of
global tensors with distributed-checkpoint names (layers stacked on axis 0, Transformer
Engine layernorm names), and the torch_dist writer. Pickles: torch's weights_only loader,
an allow-list unpickler for `.metadata`; `_extra_state` and `common.pt` are never unpickled.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import warnings

import numpy as np

from dpojax.formats.convert_common import (
    CheckpointError, Fields, numpy_dtype, numpy_to_torch, torch_to_numpy)
from dpojax.formats.nemo_archive import Archive, WEIGHTS_DIR, WEIGHTS_FILE
from dpojax.formats.nemo_mcore import EXTRA_STATE_MODULES, LAYERS

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
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "torch.distributed is not initialized": no_dist is meant.
    dcp.save(state, storage_writer=dcp.FileSystemWriter(directory),
             planner=DefaultSavePlanner(flatten_state_dict=False), no_dist=True)
  torch.save({}, os.path.join(directory, "common.pt"))
  with open(os.path.join(directory, "metadata.json"), "w") as fh:
    json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
               "common_backend": "torch", "common_backend_version": 1}, fh)
