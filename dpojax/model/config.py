"""The decoder's architecture settings (the `model` config section)."""

from __future__ import annotations

import dataclasses

from dpojax.errors import ConfigError

ACTIVATIONS = ("gelu", "gelu_tanh", "squared_relu", "swiglu", "geglu")
NORMALIZATIONS = ("layernorm", "layernorm1p", "rmsnorm", "rmsnorm1p")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's `layer_types` names.
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "flash", "sparse")
ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3", "yarn")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: x64 reference runs.
def _check_choice(name, value, choices):
  if value not in choices:
    raise ConfigError(f"model.{name}={value!r} is not one of {choices}")


MOE_ROUTERS = ("softmax_topk", "topk_softmax")
MOE_ACTIVATIONS = ("swiglu", "swiglu_clamped")
MOE_GROUPED_IMPLS = ("auto", "ragged", "tiles", "scan")
# MoeConfig fields that are the run's choice (a checkpoint's config.json does not fix them).
MOE_RUN_FIELDS = ("aux_loss_coef", "z_loss_coef", "freeze_router", "grouped_impl", "tile")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
  """Mixture-of-experts MLPs (model/moe.py); `num_experts` 0 = a dense MLP in every layer."""

  num_experts: int = 0
  top_k: int = 2
  ffn_hidden_size: int = 0  # Each expert's F; 0: the model's ffn_hidden_size.
  # softmax_topk: softmax over all experts, then the top k (Mixtral, Qwen, OLMoE);
  # topk_softmax: the top k logits, then softmax over those (gpt-oss).
  router: str = "softmax_topk"
  norm_topk_prob: bool = False  # Renormalise the k selected probabilities to sum to 1.
  router_bias: bool = False  # A bias on the router logits (gpt-oss).
  expert_bias: bool = False  # Biases on the experts' projections (gpt-oss).
  # swiglu: silu(gate) * up; swiglu_clamped (gpt-oss): gate clamped above at swiglu_limit,
  # up to [-limit, limit], then (up + 1) * gate * sigmoid(swiglu_alpha * gate).
  activation: str = "swiglu"
  swiglu_alpha: float = 1.702
  swiglu_limit: float = 7.0
  shared_expert_size: int = 0  # F of a shared expert with a sigmoid gate (Qwen2-MoE); 0: none.
  dense_layers: tuple[int, ...] = ()  # Layers with the dense MLP (Qwen2-MoE's mlp_only_layers).
  router_aux_loss_coef: float = 0.0  # The checkpoint's (config.json router_aux_loss_coef).
  # The run's choices. aux_loss_coef: the load-balancing loss's weight in the training loss;
  # None: router_aux_loss_coef; 0: none (NeMo-RL's DPO recipes).
  aux_loss_coef: float | None = None
  z_loss_coef: float = 0.0  # Router z-loss: mean over real tokens of logsumexp(logits)^2.
  freeze_router: bool = False  # No update to the routers (weights and bias).
  # Grouped matmul: ragged (jax.lax.ragged_dot), tiles (tokens sorted into `tile`-row tiles
  # of one expert each, padded per expert), auto: ragged on GPU/TPU, tiles on CPU (where
  # ragged_dot falls back to a masked product E times the work).
  grouped_impl: str = "auto"
  tile: int = 128

  def __post_init__(self):
    object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
    _check_choice("moe.router", self.router, MOE_ROUTERS)
    _check_choice("moe.activation", self.activation, MOE_ACTIVATIONS)
    _check_choice("moe.grouped_impl", self.grouped_impl, MOE_GROUPED_IMPLS)
    if self.num_experts < 0:
      raise ConfigError(f"model.moe.num_experts={self.num_experts} must be >= 0 (0 = dense)")
    if self.num_experts and not 1 <= self.top_k <= self.num_experts:
      raise ConfigError(f"model.moe.top_k={self.top_k} must be in [1, "
                        f"model.moe.num_experts={self.num_experts}]")
    for name in ("ffn_hidden_size", "shared_expert_size", "z_loss_coef",
                 "router_aux_loss_coef"):
      if getattr(self, name) < 0:
        raise ConfigError(f"model.moe.{name}={getattr(self, name)} must be >= 0")
    if self.aux_loss_coef is not None and self.aux_loss_coef < 0:
      raise ConfigError(f"model.moe.aux_loss_coef={self.aux_loss_coef} must be >= 0")
    if self.tile < 1:
      raise ConfigError(f"model.moe.tile={self.tile} must be positive")

  @property
  def enabled(self) -> bool:
    return self.num_experts > 0

  @property
  def aux_coef(self) -> float:
    return self.router_aux_loss_coef if self.aux_loss_coef is None else self.aux_loss_coef

  def with_run_fields(self, run: MoeConfig) -> MoeConfig:
    """This (a checkpoint's) architecture with `run`'s choices (MOE_RUN_FIELDS)."""
    return dataclasses.replace(self, **{k: getattr(run, k) for k in MOE_RUN_FIELDS})

  @classmethod
  def from_value(cls, value) -> MoeConfig:
    if isinstance(value, MoeConfig):
      return value
    d = dict(value or {})
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ConfigError(f"unknown model config keys: {sorted('model.moe.' + k for k in unknown)}")
    return cls(**d)



@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture; field names follow NeMo's model_config.yaml where one exists. The
  defaults are configs/dpo_gpt.py's `model` section (a test holds them equal)."""

  vocab_size: int = 384
  hidden_size: int = 64
  num_layers: int = 2
  num_attention_heads: int = 4
  num_query_groups: int | None = 2  # None: multi-head attention (groups = heads).
  kv_channels: int | None = None  # None: hidden_size // num_attention_heads.
  ffn_hidden_size: int = 192
  activation: str = "swiglu"
  normalization: str = "rmsnorm"
  layernorm_epsilon: float = 1e-5
  position_embedding_type: str = "rope"
  rotary_percentage: float = 1.0
  rotary_base: float = 10000.0
  max_position_embeddings: int = 512
  bias: bool = False  # Linear layers only; layernorms keep their bias (as in megatron-core).
  share_embeddings_and_output_weights: bool = True
  init_method_std: float = 0.02
  param_dtype: str = "float32"
  dtype: str = "float32"  # Compute dtype.
  remat: str = "none"
  # Query tile of causal attention: each tile skips the keys after it (1.4x faster policy
  # forward+backward at 1024 tokens on CPU); 0 = one T x T block. At most 8 tiles.
  attention_block: int = 32
  # xla: the dense path above. flash: a flash-attention kernel for causal + packed-segment
  # masks that skips other segments' key blocks (ops/flash_attention.py; GPU, interpreted
  # elsewhere: slow); rows with shared-prompt branches and the decoding cache keep the dense
  # path. sparse: only the (query, key) tiles of attention_block tokens that share a segment,
  # in plain XLA ops (ops/sparse_attention.py): the CPU choice for packed or padded rows on
  # one device, best with attention_block=64 there (HH-RLHF rows: 1.3x the tiles' pairs/s;
  # rows of one full sequence: the tiles' speed; xla on a multi-device mesh).
  # auto: flash on GPU for 16/32-bit compute, xla elsewhere.
  attention_impl: str = "auto"
  # Layers per step of the layer scan; num_layers unrolls it all, so that XLA can fuse and
  # schedule across layers (issue-10 benchmark on CPU: 0.67-0.69 s a step unrolled, 0.78
  # rolled) at the cost of compile time that grows with the unrolled layers.
  scan_unroll: int = 2
  # The options of the Hugging Face families (Qwen2/3, Mistral, Gemma 2/3); off by default.
  qkv_bias: bool = False  # Biases on q, k and v only (Qwen2), whatever `bias` says.
  qk_norm: bool = False  # A norm (`normalization`) over head_dim on each q and k head (Qwen3).
  post_norms: bool = False  # Norms on the attention and MLP outputs before each residual add.
  scale_embeddings: bool = False  # Embeddings times sqrt(hidden_size), in the compute dtype.
  query_pre_attn_scalar: float | None = None  # Attention scale 1/sqrt(this); None: head dim.
  attention_softcap: float = 0.0  # Attention logits -> c * tanh(l / c); 0 = none.
  final_logit_softcap: float = 0.0  # Output logits -> c * tanh(z / c) (in logprob); 0 = none.
  sliding_window: int = 0  # Sliding layers see keys fewer than this many positions back; 0 = none.
  # Per layer "full_attention" | "sliding_attention"; None: every layer slides when
  # sliding_window > 0.
  layer_types: tuple[str, ...] | None = None
  rotary_base_local: float | None = None  # RoPE theta of sliding layers; None: rotary_base.
  # RoPE frequency scaling, as Hugging Face's rope_type: none | linear | dynamic | llama3 |
  # yarn. linear divides every frequency by the factor; llama3 divides the low frequencies
  # (wavelengths over original_max / low_freq_factor) by it, keeps the high ones (under
  # original_max / high_freq_factor) and blends in between; yarn ramps between the two over
  # the dimensions its beta_fast / beta_slow rotations bound; dynamic equals none up to
  # max_position_embeddings, the only positions dpojax runs.
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  rope_attention_factor: float = 1.0  # cos and sin times this (yarn's attention_factor).
  rope_yarn_beta_fast: float = 32.0
  rope_yarn_beta_slow: float = 1.0
  rope_yarn_truncate: bool = True  # Round yarn's ramp ends to whole dimensions.
  qk_norm_all_heads: bool = False  # qk_norm over each token's whole q and k (OLMoE), not per head.
  attention_sinks: bool = False  # A learned per-head logit in the softmax denominator (gpt-oss).
  moe: MoeConfig = MoeConfig()  # Mixture-of-experts MLPs (see MoeConfig).

  def __post_init__(self):
    object.__setattr__(self, "moe", MoeConfig.from_value(self.moe))
    for i in self.moe.dense_layers:
      if not 0 <= i < self.num_layers:
        raise ConfigError(f"model.moe.dense_layers has layer {i} of {self.num_layers}")
    _check_choice("activation", self.activation, ACTIVATIONS)
    _check_choice("normalization", self.normalization, NORMALIZATIONS)
    _check_choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDINGS)
    _check_choice("remat", self.remat, REMAT_POLICIES)
    _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("rope_scaling", self.rope_scaling, ROPE_SCALINGS)
    if self.rope_scaling != "none" and not self.rope_scaling_factor > 0:
      raise ConfigError(f"model.rope_scaling_factor={self.rope_scaling_factor} must be positive")
    if self.rope_scaling == "llama3" and not (
        0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
      raise ConfigError(f"model.rope_low_freq_factor={self.rope_low_freq_factor} must be "
                        f"positive and below model.rope_high_freq_factor="
                        f"{self.rope_high_freq_factor}")
    for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                 "ffn_hidden_size"):
      if getattr(self, name) < 1:
        raise ConfigError(f"model.{name}={getattr(self, name)} must be positive")
    if self.num_attention_heads % self.groups:
      raise ConfigError(
          f"model.num_query_groups={self.groups} must divide "
          f"model.num_attention_heads={self.num_attention_heads}")
    if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
      raise ConfigError(
          f"model.hidden_size={self.hidden_size} is not a multiple of "
          f"model.num_attention_heads={self.num_attention_heads} (or set model.kv_channels)")
    if self.scan_unroll < 1:
      raise ConfigError(f"model.scan_unroll={self.scan_unroll} must be at least 1")
    if self.layer_types is not None:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
      if len(self.layer_types) != self.num_layers:
        raise ConfigError(f"model.layer_types has {len(self.layer_types)} entries for "
                          f"model.num_layers={self.num_layers}")
      for i, kind in enumerate(self.layer_types):
        if kind not in LAYER_TYPES:
          raise ConfigError(f"model.layer_types[{i}]={kind!r} is not one of {LAYER_TYPES}")
    if self.sliding_window < 0:
      raise ConfigError(f"model.sliding_window={self.sliding_window} must be >= 0")
    for name in ("attention_softcap", "final_logit_softcap"):
      if getattr(self, name) < 0:
        raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 0 (0 = none)")
    if self.query_pre_attn_scalar is not None and self.query_pre_attn_scalar <= 0:
      raise ConfigError(f"model.query_pre_attn_scalar={self.query_pre_attn_scalar} must be "
                        "positive")
    if self.position_embedding_type == "rope" and self.rotary_dim % 2:
      raise ConfigError(f"model.rotary_percentage={self.rotary_percentage} of the head dim "
                        f"{self.head_dim} gives an odd rotary dim {self.rotary_dim}")

  @property
  def groups(self) -> int:
    return self.num_query_groups or self.num_attention_heads

  @property
  def head_dim(self) -> int:
    return self.kv_channels or self.hidden_size // self.num_attention_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rotary_percentage)

  @property
  def gated(self) -> bool:
    return self.activation in ("swiglu", "geglu")

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    """Per layer: whether it attends through the sliding window."""
    if self.sliding_window <= 0:
      return (False,) * self.num_layers
    if self.layer_types is None:
      return (True,) * self.num_layers
    return tuple(kind == "sliding_attention" for kind in self.layer_types)

  @property
  def moe_layers(self) -> tuple[bool, ...]:
    """Per layer: whether its MLP is the mixture of experts."""
    return tuple(self.moe.enabled and i not in self.moe.dense_layers
                 for i in range(self.num_layers))

  @property
  def attention_scale(self) -> float | None:
    """The logits' factor; None: the default head_dim^-1/2."""
    s = self.query_pre_attn_scalar
    return None if s is None else s ** -0.5

  @classmethod
  def from_dict(cls, d) -> ModelConfig:
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ConfigError(f"unknown model config keys: {sorted('model.' + k for k in unknown)}")
    return cls(**d)

