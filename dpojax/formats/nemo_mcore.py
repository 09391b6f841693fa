"""Distributed-checkpoint (megatron-core) tensors <-> dpojax params, and the keys each
megatron-core version asks for."""

from __future__ import annotations

import numpy as np

from dpojax.model import ModelConfig

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
