"""Hugging Face folders of the Llama, Mistral, Qwen2/3 and Gemma 2/3 families: config.json
(formats/hf_config.py), model.safetensors or a sharded index, and tokenizer.model.

These families rotate q/k with rotate-half RoPE, as dpojax does, so q_proj/k_proj rows are
copied as they are (HF's own converters already permuted them from Meta's interleaved
layout). GQA is `num_key_value_heads`; query head j uses kv head j // (heads / kv_heads) in
both. Gemma names its norms by place: post_attention_layernorm is the attention output's
norm there, and the MLP's input norm in the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
import sentencepiece as spm

from dpojax.data import tokenize
from dpojax.formats import hf_config, hf_moe
from dpojax.formats.convert_common import (
    CheckpointError, Loaded, check_params, check_tensors, dtype_name, load_json, unflatten)
from dpojax.model import ModelConfig

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
# Beside a tokenizer.json, what transformers and dpojax read of it (all optional).
TOKENIZER_FILES = (TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")
# A multimodal folder's text model, by transformers version: its tensors' prefix -> ours.
_TEXT_PREFIXES = ("model.language_model.", "language_model.model.")
_MULTIMODAL_PARTS = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.",
                     "multi_modal_projector.")


def is_hf_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def _layer_names(i: int, cfg: ModelConfig) -> dict[str, str]:
  """dpojax leaf -> HF tensor name for layer i."""
  p = f"model.layers.{i}."
  names = {"attention/query": p + "self_attn.q_proj.weight",
           "attention/key": p + "self_attn.k_proj.weight",
           "attention/value": p + "self_attn.v_proj.weight",
           "attention/out": p + "self_attn.o_proj.weight",
           "mlp/gate": p + "mlp.gate_proj.weight", "mlp/up": p + "mlp.up_proj.weight",
           "mlp/fc2": p + "mlp.down_proj.weight",
           "input_norm/scale": p + "input_layernorm.weight"}
  if cfg.post_norms:  # Gemma's four norms.
    names.update({"post_attention_norm/scale": p + "post_attention_layernorm.weight",
                  "pre_mlp_norm/scale": p + "pre_feedforward_layernorm.weight",
                  "post_mlp_norm/scale": p + "post_feedforward_layernorm.weight"})
  else:
    names["pre_mlp_norm/scale"] = p + "post_attention_layernorm.weight"
  if cfg.qk_norm:
    names.update({"attention/query_norm/scale": p + "self_attn.q_norm.weight",
                  "attention/key_norm/scale": p + "self_attn.k_norm.weight"})
  if cfg.moe.enabled:  # formats/hf_moe.py names the MLP tensors.
    names = {k: v for k, v in names.items() if not k.startswith("mlp/")}
  biased = [k for k in names if "norm" not in k] if cfg.bias else (
      ["attention/query", "attention/key", "attention/value"] if cfg.qkv_bias else [])
  names.update({k + "_bias": names[k].replace(".weight", ".bias") for k in biased})
  if cfg.attention_sinks:
    names["attention/sinks"] = p + "self_attn.sinks"
  return names


def _one_layer_shapes(cfg: ModelConfig) -> dict[str, tuple]:
  d, n, g, k, f = (cfg.hidden_size, cfg.num_attention_heads, cfg.groups, cfg.head_dim,
                   cfg.ffn_hidden_size)
  one = {"attention/query": (n * k, d), "attention/key": (g * k, d),
         "attention/value": (g * k, d), "attention/out": (d, n * k),
         "mlp/gate": (f, d), "mlp/up": (f, d), "mlp/fc2": (d, f),
         "attention/query_bias": (n * k,), "attention/key_bias": (g * k,),
         "attention/value_bias": (g * k,), "attention/out_bias": (d,),
         "mlp/gate_bias": (f,), "mlp/up_bias": (f,), "mlp/fc2_bias": (d,),
         "attention/query_norm/scale": (k,), "attention/key_norm/scale": (k,)}
  one["attention/sinks"] = (n,)
  if cfg.qk_norm_all_heads:
    one.update({"attention/query_norm/scale": (n * k,), "attention/key_norm/scale": (g * k,)})
  return {leaf: one.get(leaf, (d,)) for leaf in _layer_names(0, cfg)}


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple]:
  s = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
       "model.norm.weight": (cfg.hidden_size,)}
  if not cfg.share_embeddings_and_output_weights:
    s["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
  if cfg.moe.enabled:
    s.update(hf_moe.shapes(cfg))
  one = _one_layer_shapes(cfg)
  for i in range(cfg.num_layers):
    names = _layer_names(i, cfg)
    s.update({names[leaf]: shape for leaf, shape in one.items()})
  return s


def _ignored(key: str) -> bool:
  return key.endswith("rotary_emb.inv_freq")


def _to_ours(leaf: str, x_LxR, cfg: ModelConfig):
  """A layer-stacked HF tensor [L, ...] in dpojax's layout."""
  l, d, n, g, k = (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.groups,
                   cfg.head_dim)
  heads = {"query": n, "key": g, "value": g}
  name = leaf.split("/")[-1]
  if name in heads:
    return x_LxR.reshape(l, heads[name], k, d).transpose(0, 3, 1, 2)
  if name in ("query_bias", "key_bias", "value_bias"):
    return x_LxR.reshape(l, heads[name[:-5]], k)
  if name == "out":
    return x_LxR.reshape(l, d, n, k).transpose(0, 2, 3, 1)
  if name == "fc2":
    return x_LxR.transpose(0, 2, 1)
  return x_LxR


def hf_to_params(t: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  c = np.ascontiguousarray
  stack = lambda leaf: np.stack([t[_layer_names(i, cfg)[leaf]] for i in range(cfg.num_layers)])
  flat = {}
  for leaf in _layer_names(0, cfg):
    if leaf.startswith("mlp/gate") or leaf.startswith("mlp/up"):
      continue
    flat["layers/" + leaf] = c(_to_ours(leaf, stack(leaf), cfg))
  if cfg.moe.enabled:
    flat.update(hf_moe.to_params(t, cfg))
  else:
    flat["layers/mlp/fc1"] = c(np.stack([stack("mlp/gate"), stack("mlp/up")], 1)
                               .transpose(0, 3, 1, 2))
  if cfg.bias and not cfg.moe.enabled:
    flat["layers/mlp/fc1_bias"] = np.stack([stack("mlp/gate_bias"), stack("mlp/up_bias")], 1)
  flat["embedding"] = t["model.embed_tokens.weight"]
  flat["final_norm/scale"] = t["model.norm.weight"]
  if not cfg.share_embeddings_and_output_weights:
    flat["output"] = t["lm_head.weight"]
  return unflatten(flat)


def params_to_hf(p: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  l, d, n, k = cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
  c = np.ascontiguousarray
  layers = p["layers"]
  stacked = {}
  for leaf in _layer_names(0, cfg):
    name = leaf.split("/")[-1]
    if leaf.startswith("mlp/gate") or leaf.startswith("mlp/up"):
      fc1 = _get(layers, "mlp/fc1" + ("_bias" if name.endswith("_bias") else ""))
      half = 0 if leaf.startswith("mlp/gate") else 1
      stacked[leaf] = (fc1[:, half] if name.endswith("_bias")
                       else fc1[:, :, half].transpose(0, 2, 1))
      continue
    x = _get(layers, leaf)
    if name in ("query", "key", "value"):
      x = x.transpose(0, 2, 3, 1).reshape(l, -1, d)
    elif name in ("query_bias", "key_bias", "value_bias"):
      x = x.reshape(l, -1)
    elif name == "out":
      x = x.transpose(0, 3, 1, 2).reshape(l, d, n * k)
    elif name == "fc2":
      x = x.transpose(0, 2, 1)
    stacked[leaf] = x
  t = {"model.embed_tokens.weight": c(p["embedding"]),
       "model.norm.weight": c(p["final_norm"]["scale"])}
  for i in range(l):
    names = _layer_names(i, cfg)
    t.update({names[leaf]: c(v[i]) for leaf, v in stacked.items()})
  if cfg.moe.enabled:
    t.update(hf_moe.from_params(layers, cfg))
  if not cfg.share_embeddings_and_output_weights:
    t["lm_head.weight"] = c(p["output"])
  return t


def _get(tree, leaf):
  for part in leaf.split("/"):
    tree = tree[part]
  return tree


def _read_tensors(path: str) -> tuple[dict[str, np.ndarray], str]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  def load(file):
    try:
      return load_file(file)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None

  index = os.path.join(path, INDEX)
  if os.path.isfile(os.path.join(path, SINGLE)):
    return load(os.path.join(path, SINGLE)), os.path.join(path, SINGLE)
  if not os.path.isfile(index):
    raise CheckpointError(f"{path}: neither {SINGLE} nor {INDEX}")
  with open(index) as fh:
    f = load_json(fh.read(), index)
  weight_map = f.require("weight_map", dict)
  tensors = {}
  for file in sorted(set(weight_map.values())):
    if not isinstance(file, str) or os.path.basename(file) != file:
      raise f.error("weight_map", f"shard name {file!r} must be a file in {path}")
    shard = load(os.path.join(path, file))
    listed = {k for k, v in weight_map.items() if v == file}
    if set(shard) != listed:
      raise f.error("weight_map", f"{file} holds {sorted(set(shard) - listed)} not listed and "
                    f"lacks {sorted(listed - set(shard))}")
    tensors.update(shard)
  return tensors, index


def _text_model(tensors: dict, source: str) -> dict:
  """A multimodal folder's text tensors under the text-only names (its vision parts dropped)."""
  for prefix in _TEXT_PREFIXES:
    if any(k.startswith(prefix) for k in tensors):
      out = {}
      for key, value in tensors.items():
        if key.startswith(prefix):
          out["model." + key[len(prefix):]] = value
        elif key in ("lm_head.weight", "language_model.lm_head.weight"):
          out["lm_head.weight"] = value
        elif not key.startswith(_MULTIMODAL_PARTS):
          raise CheckpointError(f"{source}: unexpected tensors: {key}")
      return out
  return tensors


def load_hf(path: str) -> Loaded:
  """(ModelConfig, params as numpy in the dpojax layout, tokenizer.model or tokenizer.json
  path or None)."""
  config_path = os.path.join(path, CONFIG)
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{path}: no {CONFIG} (not a Hugging Face model folder)")
  with open(config_path) as fh:
    f = load_json(fh.read(), config_path)
  hf_config.text_fields(f)  # The family first: a wrong folder fails before its weights load.
  tensors, source = _read_tensors(path)
  if f.get("model_type") in hf_config.MULTIMODAL:
    tensors = _text_model(tensors, source)
  emb = tensors.get("model.embed_tokens.weight")
  if emb is None or emb.ndim != 2:
    raise CheckpointError(f"{source}: missing tensors: model.embed_tokens.weight")
  cfg = hf_config.config_from_json(f, emb.shape[0], dtype_name(emb.dtype))
  if any(k.endswith("_blocks") for k in tensors):  # gpt-oss's MXFP4 experts.
    tensors = hf_moe.dequantize_tensors(tensors, emb.dtype)
  if cfg.share_embeddings_and_output_weights and "lm_head.weight" in tensors:
    if not np.array_equal(tensors["lm_head.weight"], emb):
      raise CheckpointError(f"{source}: lm_head.weight differs from model.embed_tokens.weight "
                            f"but {f.where('tie_word_embeddings')} is true")
    del tensors["lm_head.weight"]
  check_tensors(source, hf_shapes(cfg), tensors, ignored=_ignored)
  dtypes = sorted({v.dtype.name for v in tensors.values()})
  if len(dtypes) > 1:
    raise CheckpointError(f"{source}: tensors mix dtypes {dtypes}")
  params = hf_to_params(tensors, cfg)
  check_params(cfg, params, source)
  found = [os.path.join(path, n) for n in (TOKENIZER, TOKENIZER_JSON)
           if os.path.isfile(os.path.join(path, n))]
  return Loaded(cfg, params, found[0] if found else None)


SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def _special_ids(tokenizer_path: str | None) -> dict[str, int]:
  """config.json's token ids: the tokenizer's own, and where it names none (a tokenizer.json
  folder without a pad token, say) those of the model folder it came with, so an export keeps
  its source's pad_token_id and unk_token_id."""
  if tokenizer_path is None:
    return {}
  if tokenizer_path.endswith(".json"):
    tok = tokenize.load_tokenizer(tokenizer_path)
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    for name in ("pad_token", "unk_token"):
      text = tok.meta.special_tokens.get(name)
      piece = None if text is None else tok.piece_id(text)
      ids[f"{name}_id"] = -1 if piece is None else piece
  else:
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(),
           "pad_token_id": sp.pad_id(), "unk_token_id": sp.unk_id()}
  source = os.path.join(os.path.dirname(os.path.abspath(tokenizer_path)), CONFIG)
  if os.path.isfile(source):
    try:
      with open(source, encoding="utf-8") as f:
        theirs = json.load(f)
    except (OSError, ValueError):
      theirs = {}
    for key in SPECIAL_ID_KEYS:
      value = theirs.get(key) if isinstance(theirs, dict) else None
      if ids.get(key, -1) < 0 and isinstance(value, int) and not isinstance(value, bool):
        ids[key] = value
  return {k: v for k, v in ids.items() if v >= 0}


def save_hf(path: str, cfg: ModelConfig, params, tokenizer_path: str | None = None, *,
            max_shard_bytes: int = 5 * 2**30, overwrite: bool = False):
  """Writes a folder of cfg's family (hf_config.family) that transformers loads.

  The folder is built beside `path` and renamed into place, so a crash leaves no half-written
  model. An existing non-empty `path` is replaced only with overwrite=True.
  """
  flat = check_params(cfg, params, f"save_hf({path})")
  cfg = dataclasses.replace(cfg, param_dtype=dtype_name(flat["embedding"].dtype))
  config = hf_config.config_to_json(cfg, _special_ids(tokenizer_path))
  tensors = params_to_hf(unflatten(flat), cfg)
  if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
    raise CheckpointError(f"{tokenizer_path}: tokenizer file not found")
  path = os.path.abspath(path)
  if os.path.exists(path) and not (os.path.isdir(path) and (overwrite or not os.listdir(path))):
    raise CheckpointError(f"{path}: exists and is not an empty folder (pass overwrite=True, "
                          "or --overwrite, to replace it)")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  stage = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
  try:
    _write_folder(stage, config, tensors, tokenizer_path, cfg, max_shard_bytes)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes 0700 folders (and safetensors 0600 files).
    for name in os.listdir(stage):
      os.chmod(os.path.join(stage, name), 0o666 & ~umask)
    if os.path.exists(path):
      old = stage + ".old"
      os.rename(path, old)
      os.rename(stage, path)
      shutil.rmtree(old)
    else:
      os.rename(stage, path)
  finally:
    if os.path.exists(stage):
      shutil.rmtree(stage)


def _write_folder(path, config, tensors, tokenizer_path, cfg, max_shard_bytes):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  shards, size = [[]], 0
  for name, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += value.nbytes
  metadata = {"format": "pt"}  # transformers refuses safetensors files without it.
  if len(shards) == 1:
    save_file(tensors, os.path.join(path, SINGLE), metadata=metadata)
  else:
    weight_map = {}
    for i, names in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file({k: tensors[k] for k in names}, os.path.join(path, file), metadata=metadata)
      weight_map.update({k: file for k in names})
    with open(os.path.join(path, INDEX), "w") as fh:
      json.dump({"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                 "weight_map": weight_map}, fh, indent=2)
  with open(os.path.join(path, CONFIG), "w") as fh:
    json.dump(config, fh, indent=2)
  if tokenizer_path is not None and tokenizer_path.endswith(".json"):
    folder = os.path.dirname(os.path.abspath(tokenizer_path))
    shutil.copyfile(tokenizer_path, os.path.join(path, TOKENIZER_JSON))
    for name in TOKENIZER_FILES[1:]:
      if os.path.isfile(os.path.join(folder, name)):
        shutil.copyfile(os.path.join(folder, name), os.path.join(path, name))
  elif tokenizer_path is not None:
    shutil.copyfile(tokenizer_path, os.path.join(path, TOKENIZER))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
      json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                 "add_eos_token": False,
                 "model_max_length": cfg.max_position_embeddings}, fh, indent=2)
