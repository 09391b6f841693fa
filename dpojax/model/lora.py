"""LoRA adapters on the decoder's linear layers (NeMo's `peft_scheme: lora`).

An adapted linear layer computes  y = x W + scale * (x A) B,  scale = alpha / rank, with
A [in, r] (Xavier-normal init, NeMo's column_init_method) and B [r, out] (zero init, NeMo's
row_init_method), so the adapted model equals the base at step 0 and the first DPO loss is
ln 2. The adapter path runs on activations (never a merged [in, out] weight), so training
holds no weight-sized temporaries; `merge` folds the adapters into the weights for export.

Targets (NeMo's names): attention_qkv (one adapter on the fused q/k/v projection:
B is [r, N + 2G, K]), attention_dense (out), mlp_fc1 (fc1; gated B is [r, 2, F]), mlp_fc2
(fc2); `attention`, `mlp` and `all` expand to several. Adapter leaves carry a leading layer
axis like the base, are float32 (the optimizer's master copy), and are named lora_a/lora_b
(unknown to the sharding rules, so replicated: they are small).

`apply` mirrors `transformer.Transformer` with plain functions over the layer-stacked
params (the `Block`'s linear layers are inlined here to reach their inputs); a test checks
that zero adapters give exactly the base model's hidden states.
Dropout (training only, `dropout_rng`) is applied to the adapter output, NeMo's default
`dropout_position: post`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp

from dpojax.model import transformer
from dpojax.errors import ConfigError

TARGETS = ("attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2")
ALIASES = {"attention": ("attention_qkv", "attention_dense"), "mlp": ("mlp_fc1", "mlp_fc2"),
           "all": TARGETS}
# Target -> where its adapter lives under adapters["layers"].
_PATHS = {"attention_qkv": ("attention", "qkv"), "attention_dense": ("attention", "out"),
          "mlp_fc1": ("mlp", "fc1"), "mlp_fc2": ("mlp", "fc2")}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Static adapter settings (hashable: part of the jitted step's config)."""

  targets: tuple[str, ...] = ("attention_qkv",)
  rank: int = 32
  alpha: float | None = None  # None: rank (scale 1, NeMo's default).
  dropout: float = 0.0

  def __post_init__(self):
    targets = self.targets
    if isinstance(targets, str) or not isinstance(targets, (tuple, list)) or not targets:
      raise ConfigError(f"lora.targets={targets!r} must be a non-empty list of "
                        f"{TARGETS + tuple(ALIASES)}")
    expanded = []
    for i, t in enumerate(targets):
      if t not in TARGETS and t not in ALIASES:
        raise ConfigError(f"lora.targets[{i}]={t!r} is not one of {TARGETS + tuple(ALIASES)}")
      expanded += ALIASES.get(t, (t,))
    object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in expanded))
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
      raise ConfigError(f"lora.rank={self.rank!r} must be a positive integer")
    if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
      raise ConfigError(f"lora.alpha={self.alpha} must be positive (or None for lora.rank)")
    if not 0 <= self.dropout < 1:
      raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")

  @property
  def scale(self) -> float:
    return (self.rank if self.alpha is None else self.alpha) / self.rank

  @classmethod
  def from_config(cls, lora_cfg) -> LoraConfig | None:
    """From the `lora` config section; None when lora.enabled is False."""
    d = dict(lora_cfg)
    unknown = sorted(set(d) - {"enabled", "targets", "rank", "alpha", "dropout"})
    if unknown:
      raise ConfigError(f"unknown config keys: {['lora.' + k for k in unknown]}")
    if not isinstance(d.get("enabled", False), bool):
      raise ConfigError(f"lora.enabled={d['enabled']!r} must be True or False")
    if not d.get("enabled", False):
      return None
    alpha = d.get("alpha")
    for key, value in (("alpha", alpha), ("dropout", d.get("dropout", 0.0))):
      if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"lora.{key}={value!r} must be a number")
    return cls(targets=tuple(d.get("targets", cls.targets)), rank=d.get("rank", cls.rank),
               alpha=None if alpha is None else float(alpha),
               dropout=float(d.get("dropout", 0.0)))


def adapter_shapes(model_cfg: transformer.ModelConfig, lora_cfg: LoraConfig) -> dict:
  """{target: (A shape, B shape)} without the layer axis."""
  d, f, r = model_cfg.hidden_size, model_cfg.ffn_hidden_size, lora_cfg.rank
  n, g, k = model_cfg.num_attention_heads, model_cfg.groups, model_cfg.head_dim
  shapes = {"attention_qkv": ((d, r), (r, n + 2 * g, k)),
            "attention_dense": ((n, k, r), (r, d)),
            "mlp_fc1": ((d, r), (r, 2, f) if model_cfg.gated else (r, f)),
            "mlp_fc2": ((f, r), (r, d))}
  return {t: shapes[t] for t in lora_cfg.targets}


def init(model_cfg: transformer.ModelConfig, lora_cfg: LoraConfig, rng: jax.Array) -> dict:
  """Adapters {"layers": {"attention": {"qkv": {"lora_a", "lora_b"}, ...}, ...}}: A Xavier-normal
  (fan_in = the layer's input size, fan_out = rank), B zero; float32, leading layer axis."""
  return _init(model_cfg, lora_cfg, rng)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(model_cfg, lora_cfg, rng):
  shapes = adapter_shapes(model_cfg, lora_cfg)
  num = model_cfg.num_layers
  sizes = [num * math.prod(a) for a, _ in shapes.values()]
  # One draw for all A matrices (one random op to compile), split per target.
  normal = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  offsets = [0] + list(itertools.accumulate(sizes))
  layers = {}
  for i, (target, (a_shape, b_shape)) in enumerate(shapes.items()):
    std = math.sqrt(2.0 / (math.prod(a_shape[:-1]) + lora_cfg.rank))
    a = std * normal[offsets[i]:offsets[i + 1]].reshape((num,) + a_shape)
    module, name = _PATHS[target]
    layers.setdefault(module, {})[name] = {"lora_a": a,
                                           "lora_b": jnp.zeros((num,) + b_shape, jnp.float32)}
  return {"layers": layers}


def _adapter(x, ab, scale, dt, rng, rate):
  """scale * dropout((x A) B) for one layer: x [B, T, *in], A [*in, r], B [r, *out]."""
  a, b = ab["lora_a"].astype(dt), ab["lora_b"].astype(dt)
  n_in = a.ndim - 1
  xa = jax.lax.dot_general(x, a, ((tuple(range(2, 2 + n_in)), tuple(range(n_in))), ((), ())))
  y = jnp.tensordot(xa, b, axes=1) * jnp.asarray(scale, dt)
  if rng is not None and rate > 0:
    keep = jax.random.bernoulli(rng, 1.0 - rate, y.shape)
    y = jnp.where(keep, y / jnp.asarray(1.0 - rate, dt), jnp.zeros_like(y))
  return y


def _block(cfg, lcfg, p, ad, x_BxTxD, rope, mask_Bx1xTxT, rng):
  """transformer.Block with adapters: the same ops in the same order (adapter terms added)."""
  dt = jnp.dtype(cfg.dtype)
  n, g = cfg.num_attention_heads, cfg.groups
  att, ad_att = p["attention"], ad.get("attention", {})
  mlp, ad_mlp = p["mlp"], ad.get("mlp", {})
  rngs = [None] * 4 if rng is None else list(jax.random.split(rng, 4))
  extra = lambda x, module, name, i: (
      0 if name not in module else _adapter(x, module[name], lcfg.scale, dt, rngs[i],
                                            lcfg.dropout))
  norm = lambda name, x: transformer.Norm(cfg).apply({"params": p[name]}, x)

  # Attention.
  h = norm("input_norm", x_BxTxD)

  def proj(name):
    y = transformer.dense(h, att[name].astype(dt))
    if cfg.bias:
      y = y + att[name + "_bias"].astype(dt)
    return y

  q, k, v = proj("query"), proj("key"), proj("value")
  if "qkv" in ad_att:
    qkv = extra(h, ad_att, "qkv", 0)
    q, k, v = q + qkv[:, :, :n], k + qkv[:, :, n:n + g], v + qkv[:, :, n + g:]
  if rope is not None:
    q, k = transformer.apply_rope(q, rope), transformer.apply_rope(k, rope)
  o = transformer.attend(q, k, v, mask_Bx1xTxT, cfg.attention_block)
  y = transformer.dense(o, att["out"].astype(dt), contract=2)
  if cfg.bias:
    y = y + att["out_bias"].astype(dt)
  x_BxTxD = x_BxTxD + (y + extra(o, ad_att, "out", 1))

  # MLP.
  h = norm("pre_mlp_norm", x_BxTxD)
  u = transformer.dense(h, mlp["fc1"].astype(dt))
  if cfg.bias:
    u = u + mlp["fc1_bias"].astype(dt)
  u = u + extra(h, ad_mlp, "fc1", 2)
  u = transformer.activate(cfg, u)
  y = transformer.dense(u, mlp["fc2"].astype(dt))
  if cfg.bias:
    y = y + mlp["fc2_bias"].astype(dt)
  return x_BxTxD + (y + extra(u, ad_mlp, "fc2", 3))


def apply(base: Any, adapters: Any, model_cfg: transformer.ModelConfig, lora_cfg: LoraConfig,
          tokens_BxT, positions_BxT, segment_ids_BxT, branch_ids_BxT=None, *,
          dropout_rng=None, mesh=None):
  """Hidden states [B, T, D] of the adapted model (`model.apply` when adapters is None).

  `dropout_rng`: training only; None (evaluation, reference) applies no dropout. `mesh`: as
  in `model.apply`.
  """
  if adapters is None:
    return transformer.apply(base, model_cfg, tokens_BxT, positions_BxT, segment_ids_BxT,
                             branch_ids_BxT, mesh)
  cfg = model_cfg
  dt = jnp.dtype(cfg.dtype)
  x = jnp.take(base["embedding"], tokens_BxT, axis=0).astype(dt)
  if cfg.position_embedding_type == "learned_absolute":
    x = x + jnp.take(base["position_embedding"], positions_BxT, axis=0).astype(dt)
  mask = transformer.layer_mask(cfg, segment_ids_BxT, branch_ids_BxT, mesh)
  rope = None
  if cfg.position_embedding_type == "rope":
    rope = transformer.rope_table(positions_BxT, cfg.rotary_dim, cfg.rotary_base, dt,
                                  tokens_BxT.shape[1])

  def body(x, layer):
    p, ad, i = layer
    rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
    return _block(cfg, lora_cfg, p, ad, x, rope, mask, rng), None

  if cfg.remat != "none":
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_saveable
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  layers = (base["layers"], adapters["layers"], jnp.arange(cfg.num_layers))
  x, _ = jax.lax.scan(body, x, layers, unroll=min(cfg.scan_unroll, cfg.num_layers))
  return transformer.Norm(cfg).apply({"params": base["final_norm"]}, x)


def deltas(adapters: Any, model_cfg: transformer.ModelConfig, lora_cfg: LoraConfig) -> dict:
  """{target: scale * A B} in float32, [L, *in, *out] (the weight update of each target)."""
  out = {}
  for target in lora_cfg.targets:
    module, name = _PATHS[target]
    ab = adapters["layers"][module][name]
    a, b = ab["lora_a"].astype(jnp.float32), ab["lora_b"].astype(jnp.float32)
    out[target] = lora_cfg.scale * jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(a, b)
  return out


def merge(base: Any, adapters: Any, model_cfg: transformer.ModelConfig,
          lora_cfg: LoraConfig) -> Any:
  """The base params with the adapters folded in (W + scale A B, in float32, then the base
  dtype): a plain params tree for export (.nemo / Hugging Face) or `model.apply`."""
  n, g = model_cfg.num_attention_heads, model_cfg.groups
  layers = dict(base["layers"])
  att, mlp = dict(layers["attention"]), dict(layers["mlp"])
  add = lambda w, dw: (w.astype(jnp.float32) + dw).astype(w.dtype)
  for target, dw in deltas(adapters, model_cfg, lora_cfg).items():
    if target == "attention_qkv":  # [L, D, N + 2G, K] -> query, key, value.
      for name, sl in (("query", slice(0, n)), ("key", slice(n, n + g)),
                       ("value", slice(n + g, n + 2 * g))):
        att[name] = add(att[name], dw[:, :, sl])
    elif target == "attention_dense":
      att["out"] = add(att["out"], dw)
    elif target == "mlp_fc1":
      mlp["fc1"] = add(mlp["fc1"], dw)
    else:
      mlp["fc2"] = add(mlp["fc2"], dw)
  layers["attention"], layers["mlp"] = att, mlp
  return {**base, "layers": layers}


def nbytes(tree: Any) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
