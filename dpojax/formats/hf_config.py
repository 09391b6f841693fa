"""config.json of the Hugging Face decoder families <-> ModelConfig.

Families (model_type: architecture): llama, mistral, qwen2, qwen3, gemma2, gemma3_text, the
text model of a multimodal gemma3 folder (its `text_config`), and the mixtures of experts
qwen3_moe, qwen2_moe, mixtral and olmoe (formats/hf_moe.py: their MoE keys). Keys absent from a file take
the defaults of transformers' own config class for that family. RoPE is read from both
spellings: the older `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`) and
transformers 5's `rope_parameters` (flat, or per layer type). Anything a family's options
cannot express in ModelConfig is refused with the file, line and key.
"""

from __future__ import annotations

import dataclasses
import math

from dpojax.formats import hf_moe
from dpojax.formats.convert_common import CheckpointError, Fields
from dpojax.model import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 **hf_moe.ARCHITECTURES}
MULTIMODAL = {"gemma3": "Gemma3ForConditionalGeneration"}  # Text model under text_config.
GEMMA = ("gemma2", "gemma3_text")
QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
# transformers' class defaults where a file leaves a key out.
_TIED = {"llama": False, "mistral": False, "qwen2": False, "qwen3": False, "gemma2": True,
         "gemma3_text": True, **{k: False for k in hf_moe.ARCHITECTURES}}
_THETA = {"gemma3_text": 1_000_000.0, "mixtral": 1_000_000.0, "gpt_oss": 150_000.0}  # Else 1e4.
_ROPE_KINDS = {"default": "none", "linear": "linear", "dynamic": "dynamic",
               "llama3": "llama3", "yarn": "yarn"}
_TORCH_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# ModelConfig fields that are run settings, not architecture (config.json does not hold them).
_RUN_FIELDS = ("param_dtype", "dtype", "remat", "attention_block", "attention_impl",
               "scan_unroll", "init_method_std")


def text_fields(f: Fields) -> tuple[Fields, str]:
  """(the text model's fields, its model_type), checking the architecture names."""
  model_type = f.optional("model_type", str, None)
  archs = f.optional("architectures", list, None)
  if model_type in MULTIMODAL:
    if archs is not None and archs != [MULTIMODAL[model_type]]:
      raise f.error("architectures", f"{archs} is not [{MULTIMODAL[model_type]!r}]")
    f = f.sub("text_config")
    return f, f.optional("model_type", str, "gemma3_text")
  if model_type not in ARCHITECTURES:
    raise f.error("model_type", f"{model_type!r} ({archs}) is not a supported family "
                  f"(supported: {', '.join(list(ARCHITECTURES) + list(MULTIMODAL))})")
  if archs is not None and archs != [ARCHITECTURES[model_type]]:
    raise f.error("architectures", f"{archs} is not [{ARCHITECTURES[model_type]!r}] "
                  f"(model_type {model_type!r})")
  return f, model_type


def _rope(f: Fields, kind: str) -> dict:
  """ModelConfig's RoPE fields from either spelling."""
  params = f.get("rope_parameters") or {}
  legacy = f.get("rope_scaling") or {}
  for key, value in (("rope_parameters", params), ("rope_scaling", legacy)):
    if not isinstance(value, dict):
      raise f.error(key, f"expected an object, got {value!r}")
  local = None
  if params and set(params) <= {"full_attention", "sliding_attention"}:
    local, params = params.get("sliding_attention"), params.get("full_attention") or {}
  rope_type = lambda d: d.get("rope_type", d.get("type", "default"))
  # transformers 5 writes rope_parameters; older files (and hub files) hold rope_scaling.
  scaling, key = (params, "rope_parameters") if rope_type(params) != "default" or not legacy \
      else (legacy, "rope_scaling")
  theta = params.get("rope_theta", f.get("rope_theta", _THETA.get(kind, 10000.0)))
  out = {"rotary_base": float(theta)}
  if kind == "gemma3_text":
    if local is not None and rope_type(local) != "default":
      raise f.error("rope_parameters", "scaled RoPE on sliding layers is not supported")
    out["rotary_base_local"] = float((local or {}).get(
        "rope_theta", f.get("rope_local_base_freq", 10000.0)))
  name = rope_type(scaling)
  if name not in _ROPE_KINDS:
    raise f.error(key, f"rope_type {name!r} is not supported (supported: "
                  f"{', '.join(_ROPE_KINDS)})")
  if scaling.get("partial_rotary_factor", f.get("partial_rotary_factor", 1.0)) != 1.0:
    raise f.error("partial_rotary_factor", "RoPE on part of each head is not supported")
  out["rope_scaling"] = _ROPE_KINDS[name]
  if name == "default":
    return out
  max_positions = f.require("max_position_embeddings", int)
  original = scaling.get("original_max_position_embeddings") or max_positions
  factor = scaling.get("factor")
  if factor is None and name == "yarn":
    factor = max_positions / original
  if not isinstance(factor, (int, float)) or factor <= 0:
    raise f.error(key, f"{name} needs a positive factor, got {factor!r}")
  out.update(rope_scaling_factor=float(factor), rope_original_max_positions=int(original))
  if name == "llama3":
    out.update(rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
               rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)))
  if name == "yarn":
    mscale = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
    attention = scaling.get("attention_factor")
    if attention is None:
      m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
      attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    out.update(rope_attention_factor=float(attention),
               rope_yarn_beta_fast=float(scaling.get("beta_fast") or 32),
               rope_yarn_beta_slow=float(scaling.get("beta_slow") or 1),
               rope_yarn_truncate=bool(scaling.get("truncate", True)))
  return out


def _sliding(f: Fields, kind: str, num_layers: int) -> dict:
  """sliding_window and layer_types from the family's keys (or its rule)."""
  # transformers' class default where the key is absent; null is no window.
  window = f.optional("sliding_window", int, None) if "sliding_window" in f.data else (
      128 if kind == "gpt_oss" else None if kind in hf_moe.ARCHITECTURES else 4096)
  if kind in QWEN and not f.optional("use_sliding_window", bool, False):
    window = None  # As Qwen2Config: the flag turns the window off whatever layer_types say.
  types = f.optional("layer_types", list, None)
  if types is None:
    if kind in ("mistral", "mixtral"):
      types = ["sliding_attention"] * num_layers
    elif kind in QWEN:
      first = f.optional("max_window_layers", int, 28)
      types = ["sliding_attention" if i >= first else "full_attention"
               for i in range(num_layers)]
    elif kind in ("gemma2", "gpt_oss"):
      types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
               for i in range(num_layers)]
    elif kind == "gemma3_text":
      every = f.optional("sliding_window_pattern", int, f.optional("_sliding_window_pattern",
                                                                     int, 6))
      types = ["sliding_attention" if (i + 1) % every else "full_attention"
               for i in range(num_layers)]
    else:
      types = ["full_attention"] * num_layers
  if len(types) != num_layers:
    raise f.error("layer_types", f"{len(types)} entries for {num_layers} layers")
  if "sliding_attention" not in types or window is None:
    return {"sliding_window": 0, "layer_types": None}
  if set(types) - {"sliding_attention", "full_attention"}:
    raise f.error("layer_types", f"{sorted(set(types))} (supported: full_attention, "
                  "sliding_attention)")
  if window < 1:
    raise f.error("sliding_window", f"{window} must be positive")
  uniform = "full_attention" not in types
  return {"sliding_window": window, "layer_types": None if uniform else tuple(types)}


def _biases(f: Fields, kind: str) -> dict:
  if kind == "qwen2":  # Always on q, k and v (the architecture, not a key, says so).
    return {"bias": False, "qkv_bias": True}
  if kind == "qwen2_moe":
    return {"bias": False, "qkv_bias": f.optional("qkv_bias", bool, True)}
  if kind in ("mistral", "mixtral"):
    return {"bias": False, "qkv_bias": False}
  if kind in hf_moe.ARCHITECTURES:  # No dense MLP: `bias` is the attention's only.
    return {"bias": f.optional("attention_bias", bool, kind == "gpt_oss"), "qkv_bias": False}
  attention = f.optional("attention_bias", bool, False)
  mlp = f.optional("mlp_bias", bool, False) if kind == "llama" else False
  if attention != mlp:
    raise f.error("attention_bias", f"{attention} with{'' if kind == 'llama' else 'out'} "
                  f"MLP biases is not supported (model.bias covers every linear layer)")
  return {"bias": attention, "qkv_bias": False}


def config_from_json(f: Fields, vocab_size: int, param_dtype: str) -> ModelConfig:
  f, kind = text_fields(f)
  gemma = kind in GEMMA
  act = f.optional("hidden_activation", str, None) if gemma else None
  act = act or f.optional("hidden_act", str, "gelu_pytorch_tanh" if gemma else "silu")
  want = "gelu_pytorch_tanh" if gemma else "silu"
  if act != want:
    raise f.error("hidden_activation" if gemma and f.get("hidden_activation") else "hidden_act",
                  f"{act!r} is not supported ({kind} uses {want})")
  n = f.require("num_attention_heads", int)
  d = f.require("hidden_size", int)
  num_layers = f.require("num_hidden_layers", int)
  head_dim = f.optional("head_dim", int, d // n)
  kv = f.optional("num_key_value_heads", int, n)
  config_vocab = f.require("vocab_size", int)
  if config_vocab != vocab_size:
    raise f.error("vocab_size", f"{config_vocab} but the embedding has {vocab_size} rows")
  softcap = lambda key: float(f.optional(key, float, 0.0)) if gemma else 0.0
  moe = hf_moe.moe_from_json(f, kind, num_layers)
  scalar = f.optional("query_pre_attn_scalar", float, 256) if gemma else None
  try:
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=d, num_layers=num_layers,
        num_attention_heads=n, num_query_groups=None if kv == n else kv,
        kv_channels=None if head_dim * n == d else head_dim,
        ffn_hidden_size=f.require("intermediate_size", int), moe=moe,
        qk_norm_all_heads=kind == "olmoe", attention_sinks=kind == "gpt_oss",
        activation="geglu" if gemma else "swiglu",
        normalization="rmsnorm1p" if gemma else "rmsnorm",
        layernorm_epsilon=float(f.optional("rms_norm_eps", float, 1e-6)),
        position_embedding_type="rope", rotary_percentage=1.0,
        max_position_embeddings=f.require("max_position_embeddings", int),
        share_embeddings_and_output_weights=f.optional("tie_word_embeddings", bool,
                                                       _TIED[kind]),
        init_method_std=float(f.optional("initializer_range", float, 0.02)),
        param_dtype=param_dtype,
        qk_norm=kind in ("qwen3", "gemma3_text", "qwen3_moe", "olmoe"), post_norms=gemma, scale_embeddings=gemma,
        query_pre_attn_scalar=None if scalar is None else float(scalar),
        attention_softcap=softcap("attn_logit_softcapping"),
        final_logit_softcap=softcap("final_logit_softcapping"),
        **_biases(f, kind), **_rope(f, kind), **_sliding(f, kind, num_layers))
  except ValueError as e:
    raise CheckpointError(f"{f.path}: {e}") from None


def family(cfg: ModelConfig) -> str:
  """The model_type an export writes: the one family whose options these are."""
  if cfg.moe.enabled:
    return hf_moe.family(cfg)
  if cfg.normalization == "rmsnorm1p":
    return "gemma3_text" if cfg.qk_norm else "gemma2"
  if cfg.qk_norm:
    return "qwen3"
  if cfg.qkv_bias:
    return "qwen2"
  return "mistral" if cfg.sliding_window and cfg.layer_types is None else "llama"


def _rope_json(cfg: ModelConfig) -> dict:
  """The scaling entries of rope_parameters (and of the older rope_scaling)."""
  if cfg.rope_scaling == "none":
    return {"rope_type": "default"}
  out = {"rope_type": cfg.rope_scaling, "factor": cfg.rope_scaling_factor}
  if cfg.rope_scaling in ("llama3", "yarn"):
    out["original_max_position_embeddings"] = cfg.rope_original_max_positions
  if cfg.rope_scaling == "llama3":
    out.update(low_freq_factor=cfg.rope_low_freq_factor,
               high_freq_factor=cfg.rope_high_freq_factor)
  if cfg.rope_scaling == "yarn":
    out.update(attention_factor=cfg.rope_attention_factor, beta_fast=cfg.rope_yarn_beta_fast,
               beta_slow=cfg.rope_yarn_beta_slow, truncate=cfg.rope_yarn_truncate)
  return out


def _canonical(cfg: ModelConfig) -> ModelConfig:
  """cfg with the fields that change nothing reset (unused RoPE factors, run settings)."""
  defaults = ModelConfig()
  reset = {k: getattr(defaults, k) for k in _RUN_FIELDS}
  reset.update(hf_moe.canonical(cfg))
  if cfg.rope_scaling == "none":
    reset.update({k.name: getattr(defaults, k.name) for k in dataclasses.fields(cfg)
                  if k.name.startswith("rope_")})
  if not any(cfg.sliding_layers):
    reset.update(sliding_window=0, layer_types=None, rotary_base_local=None)
  elif cfg.layer_types is not None and "full_attention" not in cfg.layer_types:
    reset["layer_types"] = None
  if cfg.query_pre_attn_scalar == cfg.head_dim:
    reset["query_pre_attn_scalar"] = None
  if cfg.kv_channels == cfg.hidden_size // cfg.num_attention_heads and (
      cfg.hidden_size % cfg.num_attention_heads == 0):
    reset["kv_channels"] = None
  return dataclasses.replace(cfg, **reset)


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else x  # transformers types some of these int.


def config_to_json(cfg: ModelConfig, special_ids: dict[str, int]) -> dict:
  why = []
  if cfg.activation not in ("swiglu", "geglu"):
    why.append(f"activation {cfg.activation!r} (Hugging Face families: swiglu, geglu)")
  if cfg.normalization not in ("rmsnorm", "rmsnorm1p"):
    why.append(f"normalization {cfg.normalization!r} (Hugging Face families: rmsnorm, "
               "rmsnorm1p)")
  if cfg.position_embedding_type != "rope" or cfg.rotary_percentage != 1.0:
    why.append(f"{cfg.position_embedding_type} position embeddings with rotary_percentage "
               f"{cfg.rotary_percentage} (Hugging Face families: RoPE on whole heads)")
  if why:
    raise CheckpointError("a Hugging Face folder cannot hold model." + "; ".join(why))
  kind = family(cfg)
  gemma = kind in GEMMA
  out = {
      "architectures": [ARCHITECTURES[kind]],
      "model_type": kind,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.ffn_hidden_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.groups,
      "head_dim": cfg.head_dim,
      "hidden_act": "gelu_pytorch_tanh" if gemma else "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.layernorm_epsilon,
      "rope_theta": cfg.rotary_base,
      "rope_scaling": None if cfg.rope_scaling == "none" else _rope_json(cfg),
      "rope_parameters": {**_rope_json(cfg), "rope_theta": cfg.rotary_base},
      "attention_dropout": 0.0,
      "initializer_range": cfg.init_method_std,
      "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
      "torch_dtype": _TORCH_DTYPE[cfg.param_dtype],
      "use_cache": True,
      **special_ids,
  }
  if kind == "llama":
    out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
  if kind in ("qwen3", "qwen3_moe", "olmoe", "gpt_oss") + GEMMA:
    out["attention_bias"] = cfg.bias
  if kind == "qwen2_moe":
    out["qkv_bias"] = cfg.qkv_bias
  out.update(hf_moe.moe_to_json(cfg, kind))
  sliding = cfg.sliding_layers
  types = ["sliding_attention" if s else "full_attention" for s in sliding]
  if kind not in ("llama", "olmoe"):
    out["sliding_window"] = cfg.sliding_window if any(sliding) else None
  if kind in QWEN:
    first = next((i for i, s in enumerate(sliding) if s), cfg.num_layers)
    out.update(use_sliding_window=any(sliding), max_window_layers=first, layer_types=types)
  if kind == "gpt_oss":
    out["layer_types"] = types
  if gemma:
    out.update(hidden_activation="gelu_pytorch_tanh", layer_types=types,
               query_pre_attn_scalar=_number(cfg.query_pre_attn_scalar or cfg.head_dim),
               attn_logit_softcapping=cfg.attention_softcap or None,
               final_logit_softcapping=cfg.final_logit_softcap or None)
  if kind == "gemma3_text":
    local = cfg.rotary_base if cfg.rotary_base_local is None else cfg.rotary_base_local
    out["rope_local_base_freq"] = local
    out["rope_parameters"] = {"full_attention": out["rope_parameters"],
                              "sliding_attention": {"rope_type": "default", "rope_theta": local}}
  # The file must say exactly this model: read it back, and refuse what it cannot say.
  back = config_from_json(Fields(out, {}, f"config.json for {kind}"), cfg.vocab_size,
                          cfg.param_dtype)
  ours, theirs = _canonical(cfg), _canonical(back)
  lost = [k.name for k in dataclasses.fields(cfg)
          if getattr(ours, k.name) != getattr(theirs, k.name)]
  if lost:
    raise CheckpointError(
        f"a Hugging Face {ARCHITECTURES[kind]} folder cannot hold "
        + ", ".join(f"model.{k}={getattr(ours, k)!r} (it says {getattr(theirs, k)!r})"
                    for k in lost))
  return out
