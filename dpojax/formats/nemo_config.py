"""model_config.yaml <-> ModelConfig: what a NeMo GPT config can say, and what dpojax writes."""

from __future__ import annotations

from dpojax.formats.convert_common import FAMILY_FIELDS, CheckpointError, Fields, load_yaml
from dpojax.formats.nemo_archive import Archive, CONFIG_NAME
from dpojax.model import ModelConfig

MEGATRON_GPT = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"


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


def refuse_moe(cfg: ModelConfig):
  if cfg.moe.enabled:
    raise CheckpointError(
        f"a .nemo (megatron-core GPT as dpojax writes it) cannot hold a mixture-of-experts "
        f"model (model.moe.num_experts={cfg.moe.num_experts}); export to a Hugging Face "
        "folder instead")


def config_to_yaml(cfg: ModelConfig, tokenizer_member: str | None, vocab_divisor: int,
                   base: dict | None = None) -> dict:
  """model_config.yaml for megatron-core GPT: `base` (e.g. the imported file) + architecture."""
  default = ModelConfig()
  refuse_moe(cfg)
  held = [f"model.{k}={getattr(cfg, k)!r}" for k in FAMILY_FIELDS
          if getattr(cfg, k) != getattr(default, k)
          and not (k.startswith("rope_") and k != "rope_scaling" and cfg.rope_scaling == "none")]
  held += [f"model.{k}={getattr(cfg, k)!r}" for k, bad in (("activation", "geglu"),
                                                           ("normalization", "rmsnorm1p"))
           if getattr(cfg, k) == bad]
  if held:  # NeMo 1.x GPT has none of the Hugging Face families' options (dpojax's import).
    raise CheckpointError("a .nemo (megatron-core GPT as dpojax writes it) cannot hold "
                          + ", ".join(held) + "; export to a Hugging Face folder instead")
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
