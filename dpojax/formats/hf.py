"""Hugging Face Llama folders: config.json, model.safetensors (or a sharded index), tokenizer.model.

HF Llama rotates q/k with rotate-half RoPE, as dpojax does, so q_proj/k_proj rows are copied as
they are (HF's own converter already permuted them from Meta's interleaved layout). GQA is
`num_key_value_heads`; query head j uses kv head j // (heads / kv_heads) in both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np
import sentencepiece as spm

from dpojax.formats.convert_common import (
    CheckpointError, Fields, Loaded, check_params, check_tensors, dtype_name, load_json,
    unflatten)
from dpojax.model import ModelConfig

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.model"
_TORCH_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def is_hf_dir(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def config_from_json(f: Fields, vocab_size: int, param_dtype: str) -> ModelConfig:
  model_type = f.optional("model_type", str, None)
  archs = f.optional("architectures", list, ["LlamaForCausalLM"])
  if model_type != "llama" or archs != ["LlamaForCausalLM"]:
    raise f.error("model_type", f"{model_type!r} ({archs}) is not a Llama model "
                  "(expected model_type 'llama', architectures ['LlamaForCausalLM'])")
  if f.optional("hidden_act", str, "silu") != "silu":
    raise f.error("hidden_act", f"{f.get('hidden_act')!r} is not supported (Llama uses silu)")
  rope_theta = f.get("rope_theta")
  rope = f.get("rope_parameters") or {}
  scaling = f.get("rope_scaling") or {}
  for key, value in (("rope_scaling", scaling), ("rope_parameters", rope)):
    if not isinstance(value, dict):
      raise f.error(key, f"expected an object, got {value!r}")
    kind = value.get("rope_type", value.get("type", "default"))
    if kind != "default":
      raise f.error(key, f"rope_type {kind!r} is not supported (only default RoPE)")
  if rope_theta is None:
    rope_theta = rope.get("rope_theta", 10000.0)
  if f.optional("partial_rotary_factor", float, 1.0) != 1.0:
    raise f.error("partial_rotary_factor", "Llama applies RoPE to whole heads")
  attention_bias = f.optional("attention_bias", bool, False)
  mlp_bias = f.optional("mlp_bias", bool, False)
  if attention_bias != mlp_bias:
    raise f.error("attention_bias", f"{attention_bias} with mlp_bias {mlp_bias} is not "
                  "supported (model.bias covers every linear layer)")
  n = f.require("num_attention_heads", int)
  d = f.require("hidden_size", int)
  head_dim = f.optional("head_dim", int, d // n)
  kv = f.optional("num_key_value_heads", int, n)
  config_vocab = f.require("vocab_size", int)
  if config_vocab != vocab_size:
    raise f.error("vocab_size", f"{config_vocab} but model.embed_tokens.weight has "
                  f"{vocab_size} rows")
  try:
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=d,
        num_layers=f.require("num_hidden_layers", int),
        num_attention_heads=n, num_query_groups=None if kv == n else kv,
        kv_channels=None if head_dim == d // n else head_dim,
        ffn_hidden_size=f.require("intermediate_size", int),
        activation="swiglu", normalization="rmsnorm",
        layernorm_epsilon=float(f.optional("rms_norm_eps", float, 1e-6)),
        position_embedding_type="rope", rotary_percentage=1.0,
        rotary_base=float(rope_theta),
        max_position_embeddings=f.require("max_position_embeddings", int),
        bias=attention_bias,
        # LlamaConfig's default is untied.
        share_embeddings_and_output_weights=f.optional("tie_word_embeddings", bool, False),
        init_method_std=float(f.optional("initializer_range", float, 0.02)),
        param_dtype=param_dtype)
  except ValueError as e:
    raise CheckpointError(f"{f.path}: {e}") from None


def config_to_json(cfg: ModelConfig, tokenizer_path: str | None) -> dict:
  why = []
  if cfg.activation != "swiglu":
    why.append(f"activation {cfg.activation!r} (Llama: swiglu)")
  if cfg.normalization != "rmsnorm":
    why.append(f"normalization {cfg.normalization!r} (Llama: rmsnorm)")
  if cfg.position_embedding_type != "rope" or cfg.rotary_percentage != 1.0:
    why.append(f"{cfg.position_embedding_type} position embeddings with rotary_percentage "
               f"{cfg.rotary_percentage} (Llama: RoPE on whole heads)")
  if why:
    raise CheckpointError("a Hugging Face Llama folder cannot hold model." + "; ".join(why))
  out = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.ffn_hidden_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.groups,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.layernorm_epsilon,
      "rope_theta": cfg.rotary_base,
      "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
      "attention_bias": cfg.bias,
      "mlp_bias": cfg.bias,
      "attention_dropout": 0.0,
      "initializer_range": cfg.init_method_std,
      "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
      "torch_dtype": _TORCH_DTYPE[cfg.param_dtype],
      "use_cache": True,
  }
  if tokenizer_path is not None:

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    for key, value in (("bos_token_id", sp.bos_id()), ("eos_token_id", sp.eos_id()),
                       ("pad_token_id", sp.pad_id())):
      if value >= 0:
        out[key] = value
  return out


def _layer_names(i: int, bias: bool) -> dict[str, str]:
  """dpojax leaf -> HF tensor name for layer i."""
  p = f"model.layers.{i}."
  names = {"attention/query": p + "self_attn.q_proj.weight",
           "attention/key": p + "self_attn.k_proj.weight",
           "attention/value": p + "self_attn.v_proj.weight",
           "attention/out": p + "self_attn.o_proj.weight",
           "mlp/gate": p + "mlp.gate_proj.weight", "mlp/up": p + "mlp.up_proj.weight",
           "mlp/fc2": p + "mlp.down_proj.weight",
           "input_norm/scale": p + "input_layernorm.weight",
           "pre_mlp_norm/scale": p + "post_attention_layernorm.weight"}
  if bias:
    names.update({k + "_bias": v.replace(".weight", ".bias") for k, v in names.items()
                  if "norm" not in k})
  return names


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple]:
  d, n, g, k, f = (cfg.hidden_size, cfg.num_attention_heads, cfg.groups, cfg.head_dim,
                   cfg.ffn_hidden_size)
  one = {"attention/query": (n * k, d), "attention/key": (g * k, d),
         "attention/value": (g * k, d), "attention/out": (d, n * k),
         "mlp/gate": (f, d), "mlp/up": (f, d), "mlp/fc2": (d, f),
         "input_norm/scale": (d,), "pre_mlp_norm/scale": (d,)}
  if cfg.bias:
    one.update({"attention/query_bias": (n * k,), "attention/key_bias": (g * k,),
                "attention/value_bias": (g * k,), "attention/out_bias": (d,),
                "mlp/gate_bias": (f,), "mlp/up_bias": (f,), "mlp/fc2_bias": (d,)})
  s = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
  if not cfg.share_embeddings_and_output_weights:
    s["lm_head.weight"] = (cfg.vocab_size, d)
  for i in range(cfg.num_layers):
    names = _layer_names(i, cfg.bias)
    s.update({names[leaf]: shape for leaf, shape in one.items()})
  return s


def _ignored(key: str) -> bool:
  return key.endswith("rotary_emb.inv_freq")


def hf_to_params(t: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  l, d, n, g, k = (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.groups,
                   cfg.head_dim)
  c = np.ascontiguousarray

  def stack(leaf):
    return np.stack([t[_layer_names(i, cfg.bias)[leaf]] for i in range(l)])

  a = {"query": c(stack("attention/query").reshape(l, n, k, d).transpose(0, 3, 1, 2)),
       "key": c(stack("attention/key").reshape(l, g, k, d).transpose(0, 3, 1, 2)),
       "value": c(stack("attention/value").reshape(l, g, k, d).transpose(0, 3, 1, 2)),
       "out": c(stack("attention/out").reshape(l, d, n, k).transpose(0, 2, 3, 1))}
  m = {"fc1": c(np.stack([stack("mlp/gate"), stack("mlp/up")], 1).transpose(0, 3, 1, 2)),
       "fc2": c(stack("mlp/fc2").transpose(0, 2, 1))}
  if cfg.bias:
    a["query_bias"] = stack("attention/query_bias").reshape(l, n, k)
    a["key_bias"] = stack("attention/key_bias").reshape(l, g, k)
    a["value_bias"] = stack("attention/value_bias").reshape(l, g, k)
    a["out_bias"] = stack("attention/out_bias")
    m["fc1_bias"] = np.stack([stack("mlp/gate_bias"), stack("mlp/up_bias")], 1)
    m["fc2_bias"] = stack("mlp/fc2_bias")
  params = {"embedding": t["model.embed_tokens.weight"],
            "final_norm": {"scale": t["model.norm.weight"]},
            "layers": {"attention": a, "mlp": m,
                       "input_norm": {"scale": stack("input_norm/scale")},
                       "pre_mlp_norm": {"scale": stack("pre_mlp_norm/scale")}}}
  if not cfg.share_embeddings_and_output_weights:
    params["output"] = t["lm_head.weight"]
  return params


def params_to_hf(p: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  l, d, n, g, k = (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.groups,
                   cfg.head_dim)
  c = np.ascontiguousarray
  a, m = p["layers"]["attention"], p["layers"]["mlp"]
  stacked = {"attention/query": a["query"].transpose(0, 2, 3, 1).reshape(l, n * k, d),
             "attention/key": a["key"].transpose(0, 2, 3, 1).reshape(l, g * k, d),
             "attention/value": a["value"].transpose(0, 2, 3, 1).reshape(l, g * k, d),
             "attention/out": a["out"].transpose(0, 3, 1, 2).reshape(l, d, n * k),
             "mlp/gate": m["fc1"][:, :, 0].transpose(0, 2, 1),
             "mlp/up": m["fc1"][:, :, 1].transpose(0, 2, 1),
             "mlp/fc2": m["fc2"].transpose(0, 2, 1),
             "input_norm/scale": p["layers"]["input_norm"]["scale"],
             "pre_mlp_norm/scale": p["layers"]["pre_mlp_norm"]["scale"]}
  if cfg.bias:
    stacked.update({"attention/query_bias": a["query_bias"].reshape(l, n * k),
                    "attention/key_bias": a["key_bias"].reshape(l, g * k),
                    "attention/value_bias": a["value_bias"].reshape(l, g * k),
                    "attention/out_bias": a["out_bias"],
                    "mlp/gate_bias": m["fc1_bias"][:, 0], "mlp/up_bias": m["fc1_bias"][:, 1],
                    "mlp/fc2_bias": m["fc2_bias"]})
  t = {"model.embed_tokens.weight": c(p["embedding"]),
       "model.norm.weight": c(p["final_norm"]["scale"])}
  for i in range(l):
    names = _layer_names(i, cfg.bias)
    t.update({names[leaf]: c(v[i]) for leaf, v in stacked.items()})
  if not cfg.share_embeddings_and_output_weights:
    t["lm_head.weight"] = c(p["output"])
  return t


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


def load_hf(path: str) -> Loaded:
  """(ModelConfig, params as numpy in the dpojax layout, tokenizer.model path or None)."""
  config_path = os.path.join(path, CONFIG)
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{path}: no {CONFIG} (not a Hugging Face model folder)")
  with open(config_path) as fh:
    f = load_json(fh.read(), config_path)
  tensors, source = _read_tensors(path)
  emb = tensors.get("model.embed_tokens.weight")
  if emb is None or emb.ndim != 2:
    raise CheckpointError(f"{source}: missing tensors: model.embed_tokens.weight")
  cfg = config_from_json(f, emb.shape[0], dtype_name(emb.dtype))
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
  tokenizer = os.path.join(path, TOKENIZER)
  return Loaded(cfg, params, tokenizer if os.path.isfile(tokenizer) else None)


def save_hf(path: str, cfg: ModelConfig, params, tokenizer_path: str | None = None, *,
            max_shard_bytes: int = 5 * 2**30, overwrite: bool = False):
  """Writes a Llama folder that LlamaForCausalLM.from_pretrained loads.

  The folder is built beside `path` and renamed into place, so a crash leaves no half-written
  model. An existing non-empty `path` is replaced only with overwrite=True.
  """
  flat = check_params(cfg, params, f"save_hf({path})")
  cfg = dataclasses.replace(cfg, param_dtype=dtype_name(flat["embedding"].dtype))
  config = config_to_json(cfg, tokenizer_path)
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
  if tokenizer_path is not None:
    shutil.copyfile(tokenizer_path, os.path.join(path, TOKENIZER))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
      json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                 "add_eos_token": False,
                 "model_max_length": cfg.max_position_embeddings}, fh, indent=2)
