"""Mixture-of-experts MLPs: routers as each family computes them, dropless experts, and the
router statistics that the load-balancing loss is made of.

An MoE layer is an MLP kind inside `transformer.Block` (not a second model). Routing is in
float32 whatever the compute dtype: the router logits are x W (+ b) in the compute dtype, as
transformers computes them, then softmax over the experts and the top k (`softmax_topk`:
Mixtral, Qwen2/3-MoE, OLMoE; Mixtral renormalises the k probabilities, the others only with
norm_topk_prob) or the top k logits and softmax over those (`topk_softmax`: gpt-oss). The
experts run over the token copies sorted by expert (ops/grouped.py): no token is dropped.

Each MoE layer also returns, over the real tokens (segment id > 0; padding excluded) of its
input, per expert: how many of the top-k choices picked it (`expert_tokens`) and the sum of its
softmax probability over all experts (`router_probs`), plus the sum of logsumexp(logits)^2
(`z`). `aux_loss` turns the layers' sums into transformers' `load_balancing_loss_func`:
E * sum_e (tokens_e / R) (probs_e / R), R = real tokens x MoE layers, the counts and
probabilities summed over the layers first, as transformers concatenates them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpojax.model.config import ModelConfig
from dpojax.ops import dense as dense_ops
from dpojax.ops import grouped


def _dt(name):
  return jnp.dtype(name)


def route(cfg: ModelConfig, logits_NxE):
  """(weights [N, k] float32, expert ids [N, k], probabilities [N, E] float32)."""
  m = cfg.moe
  logits = logits_NxE.astype(jnp.promote_types(logits_NxE.dtype, jnp.float32))
  probs = jax.nn.softmax(logits, axis=-1)
  if m.router == "topk_softmax":
    top_logits, ids = jax.lax.top_k(logits, m.top_k)
    weights = jax.nn.softmax(top_logits, axis=-1)
  else:
    weights, ids = jax.lax.top_k(probs, m.top_k)
    if m.norm_topk_prob:
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, ids, probs


def activate(cfg: ModelConfig, h_Mx2xF):
  m = cfg.moe
  gate, up = h_Mx2xF[:, 0], h_Mx2xF[:, 1]
  if m.activation == "swiglu_clamped":  # gpt-oss.
    gate = jnp.minimum(gate, m.swiglu_limit)
    up = jnp.clip(up, -m.swiglu_limit, m.swiglu_limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * m.swiglu_alpha))
  return jax.nn.silu(gate) * up


class Moe(nn.Module):
  """Router + experts (+ Qwen2-MoE's sigmoid-gated shared expert). Parameters: router [D, E]
  (+ router_bias [E]), experts_fc1 [E, D, 2, F] ([gate; up]), experts_fc2 [E, F, D] (+ biases
  [E, 2, F] and [E, D]), shared_fc1 [D, 2, Fs], shared_fc2 [Fs, D], shared_gate [D]."""

  cfg: ModelConfig
  lora: Any = None
  mesh: Any = None  # With an `expert` axis > 1: expert parallelism (grouped.expert_parallel).

  @nn.compact
  def __call__(self, x_BxTxD, valid_BxT, adapters=None):
    """`adapters`: LoRA's {"fc1", "fc2"} per-expert adapters (either may be absent)."""
    cfg, m = self.cfg, self.cfg.moe
    d, e, k = cfg.hidden_size, m.num_experts, m.top_k
    f = m.ffn_hidden_size or cfg.ffn_hidden_size
    dt, pdt = _dt(cfg.dtype), _dt(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_method_std)
    out_init = nn.initializers.normal(cfg.init_method_std / (2.0 * cfg.num_layers) ** 0.5)
    x_NxD = x_BxTxD.reshape(-1, d)
    frozen = jax.lax.stop_gradient if m.freeze_router else (lambda w: w)
    router = frozen(self.param("router", init, (d, e), pdt)).astype(dt)
    logits_NxE = dense_ops.dense(x_NxD, router)
    if m.router_bias:
      logits_NxE = logits_NxE + frozen(self.param("router_bias", nn.initializers.zeros, (e,),
                                                  pdt)).astype(dt)
    weights_NxK, ids_NxK, probs_NxE = route(cfg, logits_NxE)

    params = [self.param("experts_fc1", init, (e, d, 2, f), pdt).astype(dt),
              self.param("experts_fc2", out_init, (e, f, d), pdt).astype(dt)]
    if m.expert_bias:
      params += [self.param("experts_fc1_bias", nn.initializers.zeros, (e, 2, f), pdt).astype(dt),
                 self.param("experts_fc2_bias", nn.initializers.zeros, (e, d), pdt).astype(dt)]
    names = [n for n in ("fc1", "fc2") if n in (adapters or {})]
    for n in names:  # Each adapter's A and B travel with the experts' weights.
      params += [adapters[n]["lora_a"].astype(dt), adapters[n]["lora_b"].astype(dt)]
    scale = None if self.lora is None else self.lora.scale
    biased = m.expert_bias

    def ffn(xs, ids, sizes, *p):
      bias = p[2:4] if biased else (None, None)
      rest = iter(p[4 if biased else 2:])
      lora = {n: (next(rest), next(rest)) for n in names}
      return experts(cfg, xs, ids, sizes, p[0], p[1], *bias, lora=lora, lora_scale=scale)

    mesh = self.mesh
    if mesh is not None and mesh.shape.get("expert", 1) > 1:
      shape = x_BxTxD.shape[:2] + (k,)
      y_NxD = grouped.expert_parallel(
          x_BxTxD, ids_NxK.reshape(shape), weights_NxK.astype(dt).reshape(shape), tuple(params),
          ffn, mesh, e).reshape(-1, d)
    else:
      order, sizes = grouped.sort_by_expert(ids_NxK, e)
      y_MxD = ffn(grouped.gather_sorted(x_NxD, order, k), ids_NxK.reshape(-1)[order], sizes,
                  *params)
      y_NxD = grouped.combine(y_MxD, order, weights_NxK.astype(dt)).astype(dt)

    if m.shared_expert_size:
      fs = m.shared_expert_size
      s1 = self.param("shared_fc1", init, (d, 2, fs), pdt).astype(dt)
      s2 = self.param("shared_fc2", out_init, (fs, d), pdt).astype(dt)
      gate = self.param("shared_gate", init, (d, 1), pdt).astype(dt)
      shared_NxD = dense_ops.dense(dense_ops.swiglu(dense_ops.dense(x_NxD, s1)), s2)
      y_NxD = y_NxD + jax.nn.sigmoid(dense_ops.dense(x_NxD, gate)) * shared_NxD

    valid_N = valid_BxT.reshape(-1).astype(probs_NxE.dtype)
    stats = {
        "expert_tokens": jnp.zeros((e,), probs_NxE.dtype).at[ids_NxK.reshape(-1)].add(
            jnp.repeat(valid_N, k)),
        "router_probs": jnp.sum(probs_NxE * valid_N[:, None], axis=0),
        "z": jnp.sum(valid_N * jnp.square(jax.nn.logsumexp(
            logits_NxE.astype(probs_NxE.dtype), axis=-1))),
    }
    return y_NxD.reshape(x_BxTxD.shape), stats


def experts(cfg: ModelConfig, xs_MxD, ids_M, sizes_E, w1, w2, b1=None, b2=None, *,
            lora=None, lora_scale=1.0):
  """The experts over token copies sorted by expert (`ids_M` each row's expert, `sizes_E`
  the group sizes): [M, D]. `lora`: {"fc1", "fc2"}: (A [E, in, r], B [E, r, *out]), each
  adding scale * (x A_e) B_e through the same grouped matmuls."""
  m, lora = cfg.moe, lora or {}
  e, d, _, f = w1.shape
  mm = lambda x, w: grouped.grouped_matmul(x, w, sizes_E, m.grouped_impl, m.tile)

  def low_rank(x, name):
    a, b = lora[name]
    return mm(mm(x, a), b.reshape(e, b.shape[1], -1)) * jnp.asarray(lora_scale, x.dtype)

  h_Mx2xF = mm(xs_MxD, w1.reshape(e, d, 2 * f))
  if "fc1" in lora:
    h_Mx2xF = h_Mx2xF + low_rank(xs_MxD, "fc1")
  h_Mx2xF = h_Mx2xF.reshape(-1, 2, f)
  if b1 is not None:
    h_Mx2xF = h_Mx2xF + b1[ids_M]
  a_MxF = activate(cfg, h_Mx2xF)
  y_MxD = mm(a_MxF, w2)
  if "fc2" in lora:
    y_MxD = y_MxD + low_rank(a_MxF, "fc2")
  return y_MxD if b2 is None else y_MxD + b2[ids_M]


def aux_loss(stats: dict, cfg: ModelConfig):
  """transformers' load_balancing_loss_func from the layers' sums (`stats` leaves stacked
  [L, ...], dense layers' rows zero; `tokens`: real tokens): a scalar."""
  layers = max(sum(cfg.moe_layers), 1)
  rows = jnp.maximum(stats["tokens"], 1.0) * layers
  per_expert = jnp.sum(stats["expert_tokens"], axis=0) / rows
  prob = jnp.sum(stats["router_probs"], axis=0) / rows
  return cfg.moe.num_experts * jnp.sum(per_expert * prob)


def z_loss(stats: dict, cfg: ModelConfig):
  """Mean over real tokens and MoE layers of logsumexp(router logits)^2."""
  layers = max(sum(cfg.moe_layers), 1)
  return jnp.sum(stats["z"]) / (jnp.maximum(stats["tokens"], 1.0) * layers)


def router_loss(stats: dict, cfg: ModelConfig):
  """What the step adds to the loss: aux_coef x aux + z_loss_coef x z (a float32 scalar)."""
  out = jnp.zeros((), jnp.float32)
  if cfg.moe.aux_coef:
    out = out + cfg.moe.aux_coef * aux_loss(stats, cfg)
  if cfg.moe.z_loss_coef:
    out = out + cfg.moe.z_loss_coef * z_loss(stats, cfg)
  return out


def metric_sums(stats: dict, cfg: ModelConfig) -> dict:
  """Metric sums of one forward (one micro-batch): its aux loss (and z loss), a count to mean
  them by, and each MoE layer's tokens per expert (`_moe_expert_tokens` [L, E]), from which
  `finalize` gives each layer's load imbalance (max over mean tokens per expert)."""
  out = {"moe_aux_loss": aux_loss(stats, cfg), "_moe_forwards": jnp.ones((), jnp.float32),
         "_moe_expert_tokens": stats["expert_tokens"]}
  if cfg.moe.z_loss_coef:
    out["moe_z_loss"] = z_loss(stats, cfg)
  return out


def freeze_router(tree):
  """`tree` (parameters, gradients or updates) with every router leaf zeroed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if any(
          str(getattr(p, "key", "")) in ("router", "router_bias") for p in path) else x, tree)


def active_params(cfg: ModelConfig, n_params: int) -> int:
  """The parameters one token uses (for MFU's 6N): `n_params` less, in each MoE layer, the
  E - k experts it is not routed to, and in a model with dense layers the other kind's
  parameters that every layer carries unused (a dense layer's experts, router and shared
  expert; an MoE layer's dense MLP). Routers and shared experts count as active."""
  m = cfg.moe
  if not m.enabled:
    return n_params
  d, f, fd = cfg.hidden_size, m.ffn_hidden_size or cfg.ffn_hidden_size, cfg.ffn_hidden_size
  expert = 3 * d * f + ((2 * f + d) if m.expert_bias else 0)
  moe_layers = sum(cfg.moe_layers)
  inactive = moe_layers * (m.num_experts - m.top_k) * expert
  if m.dense_layers:
    layer_moe = (m.num_experts * expert + d * m.num_experts + (m.num_experts if m.router_bias else 0)
                 + (3 * d * m.shared_expert_size + d if m.shared_expert_size else 0))
    inactive += len(m.dense_layers) * layer_moe + moe_layers * 3 * d * fd
  return n_params - inactive
