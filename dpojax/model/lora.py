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

`apply` is the one model (`transformer.Transformer`) with the adapters passed in: each
adapted projection adds its term there, so an architecture option is written once; a test
checks that zero adapters give exactly the base model's hidden states.
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

TARGETS = ("attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2", "experts_fc1",
           "experts_fc2")
# `all`: the dense model's targets; MoE layers' experts are `experts` (per-expert adapters).
ALIASES = {"attention": ("attention_qkv", "attention_dense"), "mlp": ("mlp_fc1", "mlp_fc2"),
           "experts": ("experts_fc1", "experts_fc2"), "all": TARGETS[:4]}
EXPERT_TARGETS = ("experts_fc1", "experts_fc2")
# Target -> where its adapter lives under adapters["layers"].
_PATHS = {"attention_qkv": ("attention", "qkv"), "attention_dense": ("attention", "out"),
          "mlp_fc1": ("mlp", "fc1"), "mlp_fc2": ("mlp", "fc2"),
          "experts_fc1": ("moe", "fc1"), "experts_fc2": ("moe", "fc2")}


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
    if self.dropout and set(self.targets) & set(EXPERT_TARGETS):
      raise ConfigError(f"lora.dropout={self.dropout} is not supported with the experts "
                        "targets (set it to 0)")

  @property
  def scale(self) -> float:
    return (self.rank if self.alpha is None else self.alpha) / self.rank


def adapter_shapes(model_cfg: transformer.ModelConfig, lora_cfg: LoraConfig) -> dict:
  """{target: (A shape, B shape)} without the layer axis."""
  d, f, r = model_cfg.hidden_size, model_cfg.ffn_hidden_size, lora_cfg.rank
  n, g, k = model_cfg.num_attention_heads, model_cfg.groups, model_cfg.head_dim
  e, fe = model_cfg.moe.num_experts, model_cfg.moe.ffn_hidden_size or f
  shapes = {"attention_qkv": ((d, r), (r, n + 2 * g, k)),
            "attention_dense": ((n, k, r), (r, d)),
            "mlp_fc1": ((d, r), (r, 2, f) if model_cfg.gated else (r, f)),
            "mlp_fc2": ((f, r), (r, d)),
            "experts_fc1": ((e, d, r), (e, r, 2, fe)), "experts_fc2": ((e, fe, r), (e, r, d))}
  if set(lora_cfg.targets) & set(EXPERT_TARGETS) and not model_cfg.moe.enabled:
    raise ConfigError("lora.targets has experts_fc1/experts_fc2 but the model has no experts")
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
    fan_in = a_shape[1:-1] if target in EXPERT_TARGETS else a_shape[:-1]  # Per expert.
    std = math.sqrt(2.0 / (math.prod(fan_in) + lora_cfg.rank))
    a = std * normal[offsets[i]:offsets[i + 1]].reshape((num,) + a_shape)
    module, name = _PATHS[target]
    layers.setdefault(module, {})[name] = {"lora_a": a,
                                           "lora_b": jnp.zeros((num,) + b_shape, jnp.float32)}
  return {"layers": layers}


def apply(base: Any, adapters: Any, model_cfg: transformer.ModelConfig, lora_cfg: LoraConfig,
          tokens_BxT, positions_BxT, segment_ids_BxT, branch_ids_BxT=None, *,
          dropout_rng=None, mesh=None, return_moe=False):
  """Hidden states [B, T, D] of the adapted model (`model.apply` when adapters is None).

  `dropout_rng`: training only; None (evaluation, reference) applies no dropout. `mesh`: as
  in `model.apply`.
  """
  if adapters is None:
    return transformer.apply(base, model_cfg, tokens_BxT, positions_BxT, segment_ids_BxT,
                             branch_ids_BxT, mesh, return_moe)
  return transformer.Transformer(model_cfg, mesh, lora_cfg).apply(
      {"params": base}, tokens_BxT, positions_BxT, segment_ids_BxT,
      branch_ids_BxT=branch_ids_BxT, adapters=adapters, dropout_rng=dropout_rng,
      return_moe=return_moe)


def deltas(adapters: Any, model_cfg: transformer.ModelConfig, lora_cfg: LoraConfig) -> dict:
  """{target: scale * A B} in float32, [L, *in, *out] (the weight update of each target)."""
  out = {}
  for target in lora_cfg.targets:
    module, name = _PATHS[target]
    ab = adapters["layers"][module][name]
    a, b = ab["lora_a"].astype(jnp.float32), ab["lora_b"].astype(jnp.float32)
    product = lambda a, b: jnp.tensordot(a, b, axes=1)
    if target in EXPERT_TARGETS:  # [L, E, in, r] x [L, E, r, *out]: per expert.
      product = jax.vmap(product)
    out[target] = lora_cfg.scale * jax.vmap(product)(a, b)
  return out


def merge(base: Any, adapters: Any, model_cfg: transformer.ModelConfig,
          lora_cfg: LoraConfig) -> Any:
  """The base params with the adapters folded in (W + scale A B, in float32, then the base
  dtype): a plain params tree for export (.nemo / Hugging Face) or `model.apply`."""
  n, g = model_cfg.num_attention_heads, model_cfg.groups
  layers = dict(base["layers"])
  att, mlp = dict(layers["attention"]), dict(layers.get("mlp", {}))
  moe = dict(layers.get("moe", {}))
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
    elif target == "mlp_fc2":
      mlp["fc2"] = add(mlp["fc2"], dw)
    else:
      name = "experts_" + target[-3:]
      moe[name] = add(moe[name], dw)
  layers["attention"] = att
  layers.update({k: v for k, v in (("mlp", mlp), ("moe", moe)) if v})
  return {**base, "layers": layers}


def nbytes(tree: Any) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
