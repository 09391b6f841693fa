"""A decoder-only transformer that covers NeMo Megatron GPT and Llama checkpoints.

Params in, hidden states out. Packed rows work because attention is causal AND restricted
to tokens of the same segment, and positions come from the batch (they restart per sequence).
Layers are scanned, so every per-layer parameter has a leading `layers` axis (the layout
megatron-core's distributed checkpoints use too).

LoRA adapters (model/lora.py) enter this same forward pass: with `adapters`, each adapted
projection adds its low-rank term  scale * dropout((x A) B)  to its output, so every
architecture option is written once, for the base and the adapted model alike.

Decoding (`init_cache` and `decode`) runs the same modules on the same parameter tree with a
KV cache passed in and returned explicitly: each call writes its T tokens' keys and values at
cache slots [index, index + T) and attends over every slot so far that shares its segment, so
one function does both the prompt prefill (T = prompt length) and each decode step (T = 1).
Rows of different lengths are left-padded (segment 0) with per-row positions.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpojax.model import moe as moe_lib
from dpojax.model import rope as rope_lib
from dpojax.model.config import ModelConfig
from dpojax.ops import attention as attention_ops
from dpojax.ops import dense as dense_ops
from dpojax.ops import context_attention, flash_attention, sparse_attention


def _dtype(name: str):
  return jnp.dtype(name)


def _at_least_f32(dtype):
  return jnp.promote_types(dtype, jnp.float32)


class Norm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    d = x.shape[-1]
    f32 = _at_least_f32(x.dtype)  # Statistics in fp32 (fp64 in x64 reference runs).
    x32 = x.astype(f32)
    pdt = _dtype(cfg.param_dtype)
    if cfg.normalization == "rmsnorm":
      scale = self.param("scale", nn.initializers.ones, (d,), pdt)
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + cfg.layernorm_epsilon)
      y = y * scale.astype(f32)
    elif cfg.normalization == "rmsnorm1p":  # Gemma's: x * (1 + w), w stored as zeros.
      scale = self.param("scale", nn.initializers.zeros, (d,), pdt)
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + cfg.layernorm_epsilon)
      y = y * (1.0 + scale.astype(f32))
    else:
      one_plus = cfg.normalization == "layernorm1p"
      init = nn.initializers.zeros if one_plus else nn.initializers.ones
      scale = self.param("scale", init, (d,), pdt).astype(f32)
      bias = self.param("bias", nn.initializers.zeros, (d,), pdt).astype(f32)
      mean = jnp.mean(x32, -1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(var + cfg.layernorm_epsilon)
      y = y * (1.0 + scale if one_plus else scale) + bias
    return y.astype(_dtype(cfg.dtype))


def _impl(cfg: ModelConfig, requested: bool = False) -> str:
  """The attention path; `requested`: before the fallback of models with sinks to xla."""
  if cfg.attention_impl != "auto":
    impl = cfg.attention_impl
  else:
    gpu = jax.default_backend() == "gpu"
    impl = "flash" if gpu and jnp.finfo(_dtype(cfg.dtype)).bits <= 32 else "xla"
  return impl if requested or not cfg.attention_sinks else "xla"


def attention_path(cfg: ModelConfig, mesh=None) -> str:
  """The attention path training rows take, for the run's start-up line: the kernel, the
  options it applies, and why a requested path falls back to the dense one."""
  impl, sliding = _impl(cfg, requested=True), cfg.sliding_layers
  if cfg.attention_sinks and impl != "xla":  # Only the dense path has them.
    return f"{impl} -> xla ({impl} has no attention sinks)"
  has = ["attention sinks"] if cfg.attention_sinks else []
  if any(sliding):
    has.append(f"window {cfg.sliding_window} on {sum(sliding)}/{cfg.num_layers} layers")
  if cfg.attention_softcap:
    has.append(f"logit softcap {cfg.attention_softcap:g}")
  if cfg.attention_scale is not None:
    has.append(f"scale {cfg.query_pre_attn_scalar:g}^-1/2")
  lacks = [x for x in has if not x.startswith("window")]
  if impl == "sparse" and any(sliding) and not all(sliding):
    lacks.append("per-layer windows")
  if impl == "sparse" and not (mesh is None or mesh.size == 1):
    lacks.append("multi-device meshes")
  path = f"{impl} -> xla (sparse has no {', '.join(lacks)})" if impl == "sparse" and lacks \
      else impl
  if context_attention.context_size(mesh) > 1:
    path = f"context over {context_attention.context_size(mesh)} devices (all-gathered K/V)"
  return path + (f" ({', '.join(has)})" if has else "")


def layer_mask(cfg: ModelConfig, segment_ids_BxT, branch_ids_BxT=None, mesh=None,
               positions_BxT=None):
  """What every layer's `attend` gets, computed once per forward: `Segments` for the flash
  kernel, `TilePairs` for the block-sparse path, else the dense `attention_mask`.

  Sliding windows: when every layer slides, the one mask holds the window (the flash and
  block-sparse paths then skip the tiles outside it); when only some do, {"full", "sliding"}
  masks that each layer picks from (flash: two `Segments` that differ in their window only).
  The flash kernel has the custom attention scale and logit softcap too; the block-sparse
  path has neither, and such models take the dense path there (see `attention_path`).
  """
  impl = _impl(cfg)
  sliding = cfg.sliding_layers
  if context_attention.context_size(mesh) > 1:  # Rows split over `context`: its own path.
    ctx = lambda w: context_attention.ContextMask(segment_ids_BxT, positions_BxT,
                                                  branch_ids_BxT, w, mesh)
    if any(sliding) and not all(sliding):
      return {"full": ctx(jnp.int32(0)), "sliding": ctx(jnp.int32(cfg.sliding_window))}
    return ctx(cfg.sliding_window if all(sliding) else 0)
  plain = cfg.attention_scale is None and not cfg.attention_softcap
  mixed = any(sliding) and not all(sliding)
  window = cfg.sliding_window if all(sliding) else 0
  if impl == "flash" and branch_ids_BxT is None:
    bounds = flash_attention.segment_bounds(segment_ids_BxT)
    segments = lambda w: attention_ops.Segments(segment_ids_BxT, bounds, mesh, w)
    if mixed:
      return {"full": segments(jnp.int32(0)), "sliding": segments(jnp.int32(cfg.sliding_window))}
    return segments(window)
  if mixed:
    return {"full": attention_ops.attention_mask(segment_ids_BxT, branch_ids_BxT),
            "sliding": attention_ops.attention_mask(segment_ids_BxT, branch_ids_BxT,
                                                    positions_BxT, cfg.sliding_window)}
  mask = attention_ops.attention_mask(segment_ids_BxT, branch_ids_BxT, positions_BxT, window)
  block, t = cfg.attention_block, segment_ids_BxT.shape[1]
  # One device only: XLA cannot split its pair list by batch shard (it would replicate it).
  one_device = mesh is None or mesh.size == 1
  if impl == "sparse" and plain and one_device and block > 0 and t % block == 0 and t > block:
    mask_BxTxT = mask[:, 0] & (segment_ids_BxT > 0)[:, :, None]  # Padding attends nothing.
    pairs = sparse_attention.tile_pairs(mask_BxTxT, block)
    return attention_ops.TilePairs(mask_BxTxT, pairs, block)
  return mask


def low_rank(x, ab, lora_cfg, dt, rng):
  """One layer's adapter term scale * dropout((x A) B): x [B, T, *in], A [*in, r],
  B [r, *out]; dropout (NeMo's `dropout_position: post`) only with an `rng` (training)."""
  a, b = ab["lora_a"].astype(dt), ab["lora_b"].astype(dt)
  n_in = a.ndim - 1
  xa = jax.lax.dot_general(x, a, ((tuple(range(2, 2 + n_in)), tuple(range(n_in))), ((), ())))
  y = jnp.tensordot(xa, b, axes=1) * jnp.asarray(lora_cfg.scale, dt)
  rate = lora_cfg.dropout
  if rng is not None and rate > 0:
    keep = jax.random.bernoulli(rng, 1.0 - rate, y.shape)
    y = jnp.where(keep, y / jnp.asarray(1.0 - rate, dt), jnp.zeros_like(y))
  return y


class Attention(nn.Module):
  cfg: ModelConfig
  lora: Any = None  # LoraConfig of `adapters` (scale, dropout).

  @nn.compact
  def __call__(self, x_BxTxD, rope, mask_Bx1xTxS, kv=None, index=None, adapters=None,
               rngs=(None, None)):
    """`rope`: `rope_table` of the positions (None without RoPE). Without `kv`, S = T. With
    `kv` ({"key", "value"}: [B, S, G, K] cache of this layer), this chunk's keys and values go
    to slots [index, index + T) and attention spans all S slots. `adapters`: this layer's
    {"qkv", "out"} LoRA adapters (either may be absent), `rngs` their dropout keys."""
    cfg = self.cfg
    d, n, g, k = cfg.hidden_size, cfg.num_attention_heads, cfg.groups, cfg.head_dim
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_method_std)
    out_init = nn.initializers.normal(cfg.init_method_std / (2.0 * cfg.num_layers) ** 0.5)
    adapters = adapters or {}

    def proj(name, heads):
      w = self.param(name, init, (d, heads, k), pdt).astype(dt)
      y = dense_ops.dense(x_BxTxD, w)
      if cfg.bias or cfg.qkv_bias:
        y = y + self.param(name + "_bias", nn.initializers.zeros, (heads, k), pdt).astype(dt)
      return y

    q_BxTxNxK, k_BxTxGxK, v_BxTxGxK = proj("query", n), proj("key", g), proj("value", g)
    if "qkv" in adapters:  # One adapter on the fused projection: B is [r, N + 2G, K].
      qkv = low_rank(x_BxTxD, adapters["qkv"], self.lora, dt, rngs[0])
      q_BxTxNxK = q_BxTxNxK + qkv[:, :, :n]
      k_BxTxGxK, v_BxTxGxK = k_BxTxGxK + qkv[:, :, n:n + g], v_BxTxGxK + qkv[:, :, n + g:]
    if cfg.qk_norm and cfg.qk_norm_all_heads:  # Over each token's whole q and k (OLMoE).
      whole = lambda y, name: Norm(cfg, name=name)(y.reshape(*y.shape[:2], -1)).reshape(y.shape)
      q_BxTxNxK, k_BxTxGxK = whole(q_BxTxNxK, "query_norm"), whole(k_BxTxGxK, "key_norm")
    elif cfg.qk_norm:  # Per head, over head_dim, before RoPE (Qwen3, Gemma 3).
      q_BxTxNxK = Norm(cfg, name="query_norm")(q_BxTxNxK)
      k_BxTxGxK = Norm(cfg, name="key_norm")(k_BxTxGxK)
    if rope is not None:
      q_BxTxNxK, k_BxTxGxK = rope_lib.apply_rope(q_BxTxNxK, rope), rope_lib.apply_rope(k_BxTxGxK, rope)
    if kv is not None:
      write = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(
          cache, new.astype(cache.dtype), index, axis=1)
      kv = {"key": write(kv["key"], k_BxTxGxK), "value": write(kv["value"], v_BxTxGxK)}
      k_BxTxGxK, v_BxTxGxK = kv["key"].astype(dt), kv["value"].astype(dt)  # Now [B, S, G, K].
    block = cfg.attention_block if kv is None else 0  # The cache path is already causal-short.
    sinks = self.param("sinks", init, (n,), pdt) if cfg.attention_sinks else None
    o_BxTxNxK = attention_ops.attend(q_BxTxNxK, k_BxTxGxK, v_BxTxGxK, mask_Bx1xTxS, block,
                                     cfg.attention_scale, cfg.attention_softcap, sinks)
    w_o = self.param("out", out_init, (n, k, d), pdt).astype(dt)
    y = dense_ops.dense(o_BxTxNxK, w_o, contract=2)
    if cfg.bias:
      y = y + self.param("out_bias", nn.initializers.zeros, (d,), pdt).astype(dt)
    if "out" in adapters:
      y = y + low_rank(o_BxTxNxK, adapters["out"], self.lora, dt, rngs[1])
    return y, kv


def activate(cfg: ModelConfig, h):
  """The MLP's activation of fc1's output ([B, T, 2, F] when gated)."""
  if cfg.activation == "swiglu":
    return dense_ops.swiglu(h)
  if cfg.activation == "geglu":  # Gemma's gelu_pytorch_tanh gate.
    return jax.nn.gelu(h[..., 0, :], approximate=True) * h[..., 1, :]
  if cfg.activation == "gelu":
    return jax.nn.gelu(h, approximate=False)
  if cfg.activation == "gelu_tanh":
    return jax.nn.gelu(h, approximate=True)
  return jnp.square(jax.nn.relu(h))  # squared_relu


class Mlp(nn.Module):
  cfg: ModelConfig
  lora: Any = None  # LoraConfig of `adapters`.

  @nn.compact
  def __call__(self, x_BxTxD, adapters=None, rngs=(None, None)):
    """`adapters`: this layer's {"fc1", "fc2"} LoRA adapters (either may be absent)."""
    cfg = self.cfg
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_method_std)
    out_init = nn.initializers.normal(cfg.init_method_std / (2.0 * cfg.num_layers) ** 0.5)
    adapters = adapters or {}
    # Gated fc1 keeps [gate; up] on its own axis so that sharding F never splits the pair.
    fc1_shape = (d, 2, f) if cfg.gated else (d, f)
    w1 = self.param("fc1", init, fc1_shape, pdt).astype(dt)
    h = dense_ops.dense(x_BxTxD, w1)
    if cfg.bias:
      h = h + self.param("fc1_bias", nn.initializers.zeros, fc1_shape[1:], pdt).astype(dt)
    if "fc1" in adapters:
      h = h + low_rank(x_BxTxD, adapters["fc1"], self.lora, dt, rngs[0])
    h = activate(cfg, h)
    w2 = self.param("fc2", out_init, (f, d), pdt).astype(dt)
    y = dense_ops.dense(h, w2)
    if cfg.bias:
      y = y + self.param("fc2_bias", nn.initializers.zeros, (d,), pdt).astype(dt)
    if "fc2" in adapters:
      y = y + low_rank(h, adapters["fc2"], self.lora, dt, rngs[1])
    return y


class Block(nn.Module):
  cfg: ModelConfig
  lora: Any = None  # LoraConfig of `adapters`.
  mesh: Any = None  # MoE layers' expert parallelism (a mesh `expert` axis > 1).

  @nn.compact
  def __call__(self, x_BxTxD, rope, mask_Bx1xTxS, kv=None, index=None, adapters=None,
               layer=None, dropout_rng=None, valid_BxT=None):
    """`adapters`: this layer's LoRA adapters ({"attention": .., "mlp": ..}); `dropout_rng`
    (training) is folded with the `layer` index into one key per adapted projection.
    A {"full", "sliding"} `rope` or mask: this `layer` picks its kind's. MoE models
    (`valid_BxT`: the real tokens their router statistics count) return (kv, statistics)."""
    cfg = self.cfg
    adapters = adapters or {}
    rngs = [None] * 4
    if dropout_rng is not None:
      rngs = list(jax.random.split(jax.random.fold_in(dropout_rng, layer), 4))
    if isinstance(rope, dict) or isinstance(mask_Bx1xTxS, dict):
      sliding = jnp.asarray(cfg.sliding_layers)[layer]
      pick = lambda x: x if not isinstance(x, dict) else jax.tree.map(
          lambda s, f: jnp.where(sliding, s, f), x["sliding"], x["full"])
      rope, mask_Bx1xTxS = pick(rope), pick(mask_Bx1xTxS)
    y_BxTxD, kv = Attention(cfg, self.lora, name="attention")(
        Norm(cfg, name="input_norm")(x_BxTxD), rope, mask_Bx1xTxS, kv, index,
        adapters.get("attention"), rngs[:2])
    if cfg.post_norms:
      y_BxTxD = Norm(cfg, name="post_attention_norm")(y_BxTxD)
    x_BxTxD = x_BxTxD + y_BxTxD
    h_BxTxD = Norm(cfg, name="pre_mlp_norm")(x_BxTxD)
    if cfg.moe.enabled:
      y_BxTxD, stats = moe_lib.Moe(cfg, self.lora, self.mesh, name="moe")(
          h_BxTxD, valid_BxT, adapters.get("moe"))
      if cfg.moe.dense_layers:  # Both kinds' parameters in every layer; each picks its own.
        is_moe = jnp.asarray(cfg.moe_layers)[layer]
        dense_BxTxD = Mlp(cfg, self.lora, name="mlp")(h_BxTxD, adapters.get("mlp"), rngs[2:])
        y_BxTxD = jnp.where(is_moe, y_BxTxD, dense_BxTxD)
        stats = jax.tree.map(lambda s: jnp.where(is_moe, s, 0), stats)
      kv = (kv, stats)
    else:
      y_BxTxD = Mlp(cfg, self.lora, name="mlp")(h_BxTxD, adapters.get("mlp"), rngs[2:])
    if cfg.post_norms:
      y_BxTxD = Norm(cfg, name="post_mlp_norm")(y_BxTxD)
    x_BxTxD = x_BxTxD + y_BxTxD
    return x_BxTxD, kv  # The scan stacks each layer's updated cache (None without one).


class Transformer(nn.Module):
  """Returns final-norm hidden states [B, T, D]; the output layer lives in `output_weight`.

  With a `cache` (see `init_cache`) it returns (hidden states, updated cache) instead. With
  `adapters` (model/lora.py's tree, layer-stacked like the params), the adapted model's.
  """

  cfg: ModelConfig
  mesh: Any = None  # Device mesh for the flash kernel's per-shard calls (see `layer_mask`).
  lora: Any = None  # LoraConfig of `adapters`.

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT, cache=None, *,
               branch_ids_BxT=None, adapters=None, dropout_rng=None, return_moe=False):
    """`return_moe` (no cache): (hidden states, the MoE layers' router statistics stacked
    [L, ...] with the real-token count, or None for a dense model)."""
    cfg = self.cfg
    moe = cfg.moe.enabled
    valid_BxT = segment_ids_BxT > 0
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_method_std)
    embedding_VxD = self.param("embedding", init, (cfg.vocab_size, cfg.hidden_size), pdt)
    x_BxTxD = jnp.take(embedding_VxD, tokens_BxT, axis=0).astype(dt)
    if cfg.scale_embeddings:  # Gemma: the factor rounded to the compute dtype first.
      x_BxTxD = x_BxTxD * jnp.asarray(cfg.hidden_size ** 0.5, dt)
    if cfg.position_embedding_type == "learned_absolute":
      pos_table = self.param(
          "position_embedding", init, (cfg.max_position_embeddings, cfg.hidden_size), pdt)
      x_BxTxD = x_BxTxD + jnp.take(pos_table, positions_BxT, axis=0).astype(dt)
    if not cfg.share_embeddings_and_output_weights:
      self.param("output", init, (cfg.vocab_size, cfg.hidden_size), pdt)
    rope = None
    if cfg.position_embedding_type == "rope":
      # Training rows hold positions below their length; decoding's positions reach further.
      num_positions = tokens_BxT.shape[1] if cache is None else None
      # rope_scaling applies to rotary_base's layers; rotary_base_local's stay unscaled (Gemma 3).
      table = lambda base, scaled: rope_lib.rope_table(positions_BxT, cfg.rotary_dim, base, dt,
                                              num_positions, cfg if scaled else None)
      sliding, local = cfg.sliding_layers, cfg.rotary_base_local
      if local is None or not any(sliding):
        rope = table(cfg.rotary_base, True)
      elif all(sliding):
        rope = table(local, False)
      else:
        rope = {"full": table(cfg.rotary_base, True), "sliding": table(local, False)}

    block = Block
    if cfg.remat != "none":
      policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_saveable
      block = nn.remat(Block, policy=policy, prevent_cse=False)
    scan = lambda in_axes, unroll=1: nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
        length=cfg.num_layers, unroll=unroll)(cfg, self.lora, self.mesh if cfg.moe.enabled
                                              else None, name="layers")
    unroll = min(cfg.scan_unroll, cfg.num_layers)
    layer_ids = jnp.arange(cfg.num_layers)
    if cache is None:
      mask = layer_mask(cfg, segment_ids_BxT, branch_ids_BxT, self.mesh, positions_BxT)
      out = None
      if adapters is None and not moe and not (isinstance(rope, dict) or isinstance(mask, dict)):
        x_BxTxD, _ = scan((nn.broadcast, nn.broadcast), unroll)(x_BxTxD, rope, mask)
      else:  # Each layer's adapters and index are scanned with its params.
        ad = None if adapters is None else adapters["layers"]
        x_BxTxD, out = scan((nn.broadcast,) * 4 + (nn.broadcast if ad is None else 0, 0,
                                                    nn.broadcast, nn.broadcast), unroll)(
            x_BxTxD, rope, mask, None, None, ad, layer_ids, dropout_rng,
            valid_BxT if moe else None)
      h_BxTxD = Norm(cfg, name="final_norm")(x_BxTxD)
      if not return_moe:
        return h_BxTxD
      stats = None if not moe else {**out[1], "tokens": jnp.sum(valid_BxT, dtype=jnp.float32)}
      return h_BxTxD, stats
    # Same module names, so the same parameters; the layer caches are scanned over axis 0.
    layers = scan((nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast, 0, nn.broadcast,
                   nn.broadcast))
    index = cache["index"]
    segment_ids_BxS = jax.lax.dynamic_update_slice_in_dim(
        cache["segment_ids"], segment_ids_BxT.astype(jnp.int32), index, axis=1)
    cached = lambda window: attention_ops.cached_attention_mask(
        segment_ids_BxT, segment_ids_BxS, index, window)
    sliding = cfg.sliding_layers
    if any(sliding) and not all(sliding):
      mask = {"full": cached(0), "sliding": cached(cfg.sliding_window)}
    else:
      mask = cached(cfg.sliding_window if any(sliding) else 0)
    x_BxTxD, kv = layers(x_BxTxD, rope, mask, {"key": cache["key"], "value": cache["value"]},
                         index, None, layer_ids, None, valid_BxT if moe else None)
    kv = kv[0] if moe else kv
    new_cache = {"key": kv["key"], "value": kv["value"], "segment_ids": segment_ids_BxS,
                 "index": index + tokens_BxT.shape[1]}
    return Norm(cfg, name="final_norm")(x_BxTxD), new_cache


def output_weight(params: Any, cfg: ModelConfig):
  """The [V, D] output projection (the embedding when tied)."""
  return params["embedding"] if cfg.share_embeddings_and_output_weights else params["output"]


def init_params(cfg: ModelConfig, rng: jax.Array):
  """Random init (jitted: eager Flax init dispatches op by op and is slow)."""
  return _init(cfg, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: ModelConfig, rng: jax.Array):
  tokens = jnp.zeros((1, 8), jnp.int32)
  return Transformer(cfg).init(rng, tokens, tokens, jnp.ones_like(tokens))["params"]


def apply(params: Any, cfg: ModelConfig, tokens_BxT, positions_BxT, segment_ids_BxT,
          branch_ids_BxT=None, mesh=None, return_moe=False):
  """Pure forward: hidden states [B, T, D]. Positions lie in [0, T), as in every row the data
  pipeline builds (see `rope_table`). `branch_ids`: see `ops.attention.attention_mask`;
  `mesh`: the device mesh the batch is sharded on (the flash kernel then runs per shard).
  `return_moe`: (hidden states, router statistics or None), see `Transformer`."""
  return Transformer(cfg, mesh).apply({"params": params}, tokens_BxT, positions_BxT,
                                      segment_ids_BxT, branch_ids_BxT=branch_ids_BxT,
                                      return_moe=return_moe)


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int) -> dict:
  """An empty KV cache of `max_length` slots: key/value [L, B, S, G, K] in the compute dtype,
  the segment id of each written slot [B, S] (0 = empty or padding), and the next slot."""
  shape = (cfg.num_layers, batch_size, max_length, cfg.groups, cfg.head_dim)
  return {"key": jnp.zeros(shape, _dtype(cfg.dtype)), "value": jnp.zeros(shape, _dtype(cfg.dtype)),
          "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


def decode(params: Any, cfg: ModelConfig, cache: dict, tokens_BxT, positions_BxT,
           segment_ids_BxT):
  """Pure cached forward: (hidden states [B, T, D], cache advanced by T slots).

  The T tokens take slots [cache["index"], cache["index"] + T), which must fit the cache.
  Feeding a sequence in pieces gives the hidden states `apply` gives for the whole of it.
  """
  return Transformer(cfg).apply({"params": params}, tokens_BxT, positions_BxT, segment_ids_BxT,
                                cache)
