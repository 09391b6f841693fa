"""The mixture-of-experts families' config.json keys and expert tensors (formats/hf.py and
hf_config.py call these for qwen3_moe, qwen2_moe, mixtral, olmoe and gpt_oss).

config.json: num_experts (or num_local_experts, as transformers 5 writes it), the routed k
(num_experts_per_tok), the experts' F (moe_intermediate_size for Qwen; intermediate_size for
Mixtral and OLMoE, which have no dense MLP), norm_topk_prob (Mixtral always renormalises),
router_aux_loss_coef, and Qwen2-MoE's shared expert (shared_expert_intermediate_size) and
dense layers (Qwen's mlp_only_layers and decoder_sparse_step). Keys absent from a file take
transformers' class defaults.

Tensors: per expert, as the families store them (transformers 5 fuses them in memory and
writes them back per expert): `mlp.experts.{j}.{gate,up,down}_proj.weight` (Qwen, OLMoE) or
`block_sparse_moe.experts.{j}.{w1,w3,w2}.weight` (Mixtral), the router `mlp.gate.weight`
[E, D]. dpojax holds them layer-stacked: moe/router [L, D, E], moe/experts_fc1
[L, E, D, 2, F] ([gate; up]), moe/experts_fc2 [L, E, F, D]; a model with dense layers holds
both kinds in every layer (the other kind zero), and a folder only the layer's own kind.

gpt-oss stores its experts fused: `mlp.experts.gate_up_proj` [E, D, 2F] with gate and up
interleaved (gate = [..., ::2]), `down_proj` [E, F, D], their biases, the router
`mlp.router.weight` and `.bias`; its hub checkpoints hold the two projections as MXFP4
(`*_blocks` [E, R, C/32, 16] uint8, two 4-bit values a byte, low nibble first, and `*_scales`
[E, R, C/32] uint8 exponents biased by 127): `dequantize_mxfp4` expands them on import as
transformers' convert_moe_packed_tensors does (bitwise); exports write the plain tensors.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dpojax.formats.convert_common import CheckpointError, Fields
from dpojax.model import ModelConfig
from dpojax.model.config import MOE_RUN_FIELDS, MoeConfig

ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "gpt_oss": "GptOssForCausalLM"}
QWEN_MOE = ("qwen3_moe", "qwen2_moe")
# transformers' class defaults.
_TOP_K = {"qwen3_moe": 8, "qwen2_moe": 4, "mixtral": 2, "olmoe": 8, "gpt_oss": 4}
_EXPERTS = {"qwen3_moe": 128, "qwen2_moe": 60, "mixtral": 8, "olmoe": 64, "gpt_oss": 128}
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0,
              -6.0)
_AUX = {"olmoe": 0.01}  # Else 0.001.
_MOE_F = {"qwen3_moe": 768, "qwen2_moe": 1408}
_SHARED_F = 5632  # Qwen2-MoE.


def moe_from_json(f: Fields, kind: str, num_layers: int) -> MoeConfig:
  if kind not in ARCHITECTURES:
    return MoeConfig()
  key = "num_experts" if f.get("num_experts") is not None else "num_local_experts"
  experts = f.optional(key, int, _EXPERTS[kind])
  if experts < 1:
    raise f.error(key, f"{experts}: a mixture of experts needs at least one expert")
  if kind in QWEN_MOE and f.optional("use_sliding_window", bool, False):
    raise f.error("use_sliding_window", "sliding windows in Qwen MoE models are not supported")
  if kind == "mixtral" and f.optional("router_jitter_noise", float, 0.0):
    raise f.error("router_jitter_noise", "router jitter is not supported (set it to 0)")
  if kind == "olmoe" and f.get("clip_qkv") is not None:
    raise f.error("clip_qkv", "clipping q, k and v is not supported")
  dense = ()
  if kind in QWEN_MOE:
    only = f.optional("mlp_only_layers", list, [])
    step = f.optional("decoder_sparse_step", int, 1)
    if step < 1:
      raise f.error("decoder_sparse_step", f"{step} must be positive")
    dense = tuple(i for i in range(num_layers) if i in only or (i + 1) % step)
  ffn = (f.optional("moe_intermediate_size", int, _MOE_F[kind]) if kind in QWEN_MOE
         else f.require("intermediate_size", int))
  oss = kind == "gpt_oss"
  if oss:
    gpt = dict(router="topk_softmax", router_bias=True, expert_bias=True,
               activation="swiglu_clamped",
               swiglu_alpha=float(f.optional("swiglu_alpha", float, 1.702)),
               swiglu_limit=float(f.optional("swiglu_limit", float, 7.0)))
  try:
    return MoeConfig(
        **(gpt if oss else {}),
        num_experts=experts, top_k=f.optional("num_experts_per_tok", int, _TOP_K[kind]),
        ffn_hidden_size=ffn,
        norm_topk_prob=True if kind == "mixtral" else f.optional("norm_topk_prob", bool, False),
        shared_expert_size=(f.optional("shared_expert_intermediate_size", int, _SHARED_F)
                            if kind == "qwen2_moe" else 0),
        dense_layers=dense,
        router_aux_loss_coef=float(f.optional("router_aux_loss_coef", float,
                                              _AUX.get(kind, 0.001))))
  except ValueError as e:
    raise CheckpointError(f"{f.path}: {e}") from None


def family(cfg: ModelConfig) -> str:
  m = cfg.moe
  if m.router == "topk_softmax":
    return "gpt_oss"
  if cfg.qk_norm_all_heads:
    return "olmoe"
  if m.shared_expert_size or cfg.qkv_bias:
    return "qwen2_moe"
  if cfg.qk_norm:
    return "qwen3_moe"
  return "mixtral"


def moe_to_json(cfg: ModelConfig, kind: str) -> dict:
  m = cfg.moe
  if kind not in ARCHITECTURES:
    return {}
  m = dataclasses.replace(m, ffn_hidden_size=m.ffn_hidden_size or cfg.ffn_hidden_size)
  out = {"num_experts_per_tok": m.top_k, "router_aux_loss_coef": m.router_aux_loss_coef,
         "output_router_logits": False}
  out["num_local_experts" if kind == "mixtral" else "num_experts"] = m.num_experts
  if kind in QWEN_MOE:
    out.update(moe_intermediate_size=m.ffn_hidden_size, norm_topk_prob=m.norm_topk_prob,
               decoder_sparse_step=1, mlp_only_layers=list(m.dense_layers))
  else:
    out["intermediate_size"] = m.ffn_hidden_size
  if kind == "olmoe":
    out.update(norm_topk_prob=m.norm_topk_prob, clip_qkv=None)
  if kind == "mixtral":
    out["router_jitter_noise"] = 0.0
  if kind == "qwen2_moe":
    out["shared_expert_intermediate_size"] = m.shared_expert_size
  if kind == "gpt_oss":
    out.update(swiglu_alpha=m.swiglu_alpha, swiglu_limit=m.swiglu_limit,
               num_local_experts=m.num_experts, attention_bias=cfg.bias)
    del out["num_experts"]
  return out


def canonical(cfg: ModelConfig) -> dict:
  """ModelConfig fields to reset before comparing what a config.json says (run settings)."""
  m = cfg.moe
  if not m.enabled:
    return {"moe": MoeConfig()}
  f = m.ffn_hidden_size or cfg.ffn_hidden_size
  reset = {k: getattr(MoeConfig(), k) for k in MOE_RUN_FIELDS}
  out = {"moe": dataclasses.replace(m, ffn_hidden_size=f, **reset)}
  if not m.dense_layers:  # The dense MLP's F means nothing then.
    out["ffn_hidden_size"] = f
  return out


# ---------------------------------------------------------------------------------------------
# Tensors.


def _names(cfg: ModelConfig, i: int, j: int) -> dict[str, str]:
  """Expert j's (gate, up, down) tensor names in layer i."""
  p = f"model.layers.{i}."
  if family(cfg) == "mixtral":
    e = f"{p}block_sparse_moe.experts.{j}."
    return {"gate": e + "w1.weight", "up": e + "w3.weight", "down": e + "w2.weight"}
  e = f"{p}mlp.experts.{j}."
  return {"gate": e + "gate_proj.weight", "up": e + "up_proj.weight",
          "down": e + "down_proj.weight"}


def _router(cfg: ModelConfig, i: int) -> str:
  kind = family(cfg)
  if kind == "gpt_oss":
    return f"model.layers.{i}.mlp.router.weight"
  part = "block_sparse_moe" if kind == "mixtral" else "mlp"
  return f"model.layers.{i}.{part}.gate.weight"


def _fused(i: int) -> dict[str, str]:
  p = f"model.layers.{i}.mlp."
  return {"router_bias": p + "router.bias", "gate_up": p + "experts.gate_up_proj",
          "gate_up_bias": p + "experts.gate_up_proj_bias", "down": p + "experts.down_proj",
          "down_bias": p + "experts.down_proj_bias"}


def _dense_names(i: int) -> dict[str, str]:
  p = f"model.layers.{i}.mlp."
  return {"gate": p + "gate_proj.weight", "up": p + "up_proj.weight",
          "down": p + "down_proj.weight"}


def _shared_names(i: int) -> dict[str, str]:
  p = f"model.layers.{i}.mlp.shared_expert."
  return {"gate": p + "gate_proj.weight", "up": p + "up_proj.weight",
          "down": p + "down_proj.weight", "shared_gate": f"model.layers.{i}.mlp.shared_expert_gate.weight"}


def shapes(cfg: ModelConfig) -> dict[str, tuple]:
  """HF name -> shape of every MLP tensor of an MoE model."""
  m, d = cfg.moe, cfg.hidden_size
  f, fs = m.ffn_hidden_size or cfg.ffn_hidden_size, m.shared_expert_size
  out = {}
  for i, is_moe in enumerate(cfg.moe_layers):
    if not is_moe:
      n = _dense_names(i)
      f_dense = cfg.ffn_hidden_size
      out.update({n["gate"]: (f_dense, d), n["up"]: (f_dense, d), n["down"]: (d, f_dense)})
      continue
    out[_router(cfg, i)] = (m.num_experts, d)
    if family(cfg) == "gpt_oss":
      n, e = _fused(i), m.num_experts
      out.update({n["router_bias"]: (e,), n["gate_up"]: (e, d, 2 * f),
                  n["gate_up_bias"]: (e, 2 * f), n["down"]: (e, f, d), n["down_bias"]: (e, d)})
      continue
    for j in range(m.num_experts):
      n = _names(cfg, i, j)
      out.update({n["gate"]: (f, d), n["up"]: (f, d), n["down"]: (d, f)})
    if fs:
      n = _shared_names(i)
      out.update({n["gate"]: (fs, d), n["up"]: (fs, d), n["down"]: (d, fs),
                  n["shared_gate"]: (1, d)})
  return out


def _gated(t, n):
  """[gate; up] as [D, 2, F] and down as [F, D] from torch-layout [out, in] tensors."""
  return np.stack([t[n["gate"]], t[n["up"]]], 0).transpose(2, 0, 1), t[n["down"]].T


def to_params(t: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Flat 'layers/moe/...' (and 'layers/mlp/...' with dense layers) layer-stacked leaves."""
  m, d = cfg.moe, cfg.hidden_size
  f, fs, e = m.ffn_hidden_size or cfg.ffn_hidden_size, m.shared_expert_size, m.num_experts
  dtype = t["model.embed_tokens.weight"].dtype
  zeros = lambda *s: np.zeros(s, dtype)
  layers = {"router": [], "experts_fc1": [], "experts_fc2": []}
  if fs:
    layers.update(shared_fc1=[], shared_fc2=[], shared_gate=[])
  dense = {"fc1": [], "fc2": []}
  if family(cfg) == "gpt_oss":
    return _fused_to_params(t, cfg)
  for i, is_moe in enumerate(cfg.moe_layers):
    if not is_moe:
      fc1, fc2 = _gated(t, _dense_names(i))
      dense["fc1"].append(fc1)
      dense["fc2"].append(fc2)
      layers["router"].append(zeros(d, e))
      layers["experts_fc1"].append(zeros(e, d, 2, f))
      layers["experts_fc2"].append(zeros(e, f, d))
      if fs:
        layers["shared_fc1"].append(zeros(d, 2, fs))
        layers["shared_fc2"].append(zeros(fs, d))
        layers["shared_gate"].append(zeros(d, 1))
      continue
    if m.dense_layers:
      dense["fc1"].append(zeros(d, 2, cfg.ffn_hidden_size))
      dense["fc2"].append(zeros(cfg.ffn_hidden_size, d))
    layers["router"].append(t[_router(cfg, i)].T)
    experts = [_gated(t, _names(cfg, i, j)) for j in range(e)]
    layers["experts_fc1"].append(np.stack([x[0] for x in experts]))
    layers["experts_fc2"].append(np.stack([x[1] for x in experts]))
    if fs:
      n = _shared_names(i)
      fc1, fc2 = _gated(t, n)
      layers["shared_fc1"].append(fc1)
      layers["shared_fc2"].append(fc2)
      layers["shared_gate"].append(t[n["shared_gate"]].T)
  c = np.ascontiguousarray
  out = {f"layers/moe/{k}": c(np.stack(v)) for k, v in layers.items()}
  if m.dense_layers:
    out.update({f"layers/mlp/{k}": c(np.stack(v)) for k, v in dense.items()})
  return out


def from_params(layers: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """HF tensors of the MLPs from the layer-stacked tree (each layer's own kind only)."""
  m = cfg.moe
  c = np.ascontiguousarray
  moe, out = layers["moe"], {}
  if family(cfg) == "gpt_oss":
    return _fused_from_params(moe, cfg)

  def put(n, fc1, fc2):
    out.update({n["gate"]: c(fc1[:, 0].T), n["up"]: c(fc1[:, 1].T), n["down"]: c(fc2.T)})

  for i, is_moe in enumerate(cfg.moe_layers):
    if not is_moe:
      put(_dense_names(i), np.asarray(layers["mlp"]["fc1"][i]),
          np.asarray(layers["mlp"]["fc2"][i]))
      continue
    out[_router(cfg, i)] = c(np.asarray(moe["router"][i]).T)
    fc1, fc2 = np.asarray(moe["experts_fc1"][i]), np.asarray(moe["experts_fc2"][i])
    for j in range(m.num_experts):
      put(_names(cfg, i, j), fc1[j], fc2[j])
    if m.shared_expert_size:
      n = _shared_names(i)
      put(n, np.asarray(moe["shared_fc1"][i]), np.asarray(moe["shared_fc2"][i]))
      out[n["shared_gate"]] = c(np.asarray(moe["shared_gate"][i]).T)
  return out


def _fused_to_params(t, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """gpt-oss: [E, D, 2F] interleaved [gate, up] -> [E, D, 2, F]."""
  e, d = cfg.moe.num_experts, cfg.hidden_size
  layers = {k: [] for k in ("router", "router_bias", "experts_fc1", "experts_fc1_bias",
                            "experts_fc2", "experts_fc2_bias")}
  for i in range(cfg.num_layers):
    n = _fused(i)
    layers["router"].append(t[_router(cfg, i)].T)
    layers["router_bias"].append(t[n["router_bias"]])
    layers["experts_fc1"].append(t[n["gate_up"]].reshape(e, d, -1, 2).transpose(0, 1, 3, 2))
    layers["experts_fc1_bias"].append(t[n["gate_up_bias"]].reshape(e, -1, 2).transpose(0, 2, 1))
    layers["experts_fc2"].append(t[n["down"]])
    layers["experts_fc2_bias"].append(t[n["down_bias"]])
  return {f"layers/moe/{k}": np.ascontiguousarray(np.stack(v)) for k, v in layers.items()}


def _fused_from_params(moe: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  e, d = cfg.moe.num_experts, cfg.hidden_size
  c = np.ascontiguousarray
  out = {}
  for i in range(cfg.num_layers):
    n = _fused(i)
    leaf = lambda k: np.asarray(moe[k][i])
    out[_router(cfg, i)] = c(leaf("router").T)
    out[n["router_bias"]] = c(leaf("router_bias"))
    out[n["gate_up"]] = c(leaf("experts_fc1").transpose(0, 1, 3, 2).reshape(e, d, -1))
    out[n["gate_up_bias"]] = c(leaf("experts_fc1_bias").transpose(0, 2, 1).reshape(e, -1))
    out[n["down"]] = c(leaf("experts_fc2"))
    out[n["down_bias"]] = c(leaf("experts_fc2_bias"))
  return out


def dequantize_mxfp4(blocks, scales, dtype) -> np.ndarray:
  """MXFP4 `*_blocks` [E, R, G, B] and `*_scales` [E, R, G] -> [E, G * 2B, R] in `dtype`, as
  transformers' convert_moe_packed_tensors: each value ldexp(lut[nibble], scale - 127) in
  float32 (exact), then rounded to `dtype`."""
  blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
  if blocks.shape[:-1] != scales.shape:
    raise CheckpointError(f"MXFP4 blocks {blocks.shape} do not match scales {scales.shape}")
  lut = np.asarray(FP4_VALUES, np.float32)
  values = np.empty(blocks.shape[:-1] + (2 * blocks.shape[-1],), np.float32)
  values[..., 0::2] = lut[blocks & 0x0F]
  values[..., 1::2] = lut[blocks >> 4]
  with np.errstate(over="ignore"):  # ldexp, as torch's: 0.5 x 2^128 is 2^127, not inf.
    values = np.ldexp(values, (scales.astype(np.int32) - 127)[..., None]).astype(np.float32)
  e, r = blocks.shape[:2]
  return np.ascontiguousarray(values.reshape(e, r, -1).transpose(0, 2, 1)).astype(dtype)


def dequantize_tensors(tensors: dict, dtype) -> dict:
  """`tensors` with every `X_blocks` + `X_scales` pair replaced by the dequantized X."""
  out = dict(tensors)
  for key in [k for k in tensors if k.endswith("_blocks")]:
    name = key[:-len("_blocks")]
    if name + "_scales" not in tensors:
      raise CheckpointError(f"{key} has no {name}_scales beside it")
    out[name] = dequantize_mxfp4(out.pop(key), out.pop(name + "_scales"), dtype)
  return out
