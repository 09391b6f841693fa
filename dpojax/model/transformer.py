"""A decoder-only transformer that covers NeMo Megatron GPT and Llama checkpoints.

Params in, hidden states out. Packed rows work because attention is causal AND restricted
to tokens of the same segment, and positions come from the batch (they restart per sequence).
Layers are scanned, so every per-layer parameter has a leading `layers` axis (the layout
megatron-core's distributed checkpoints use too).

Decoding (`init_cache` and `decode`) runs the same modules on the same parameter tree with a
KV cache passed in and returned explicitly: each call writes its T tokens' keys and values at
cache slots [index, index + T) and attends over every slot so far that shares its segment, so
one function does both the prompt prefill (T = prompt length) and each decode step (T = 1).
Rows of different lengths are left-padded (segment 0) with per-row positions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from dpojax.ops import flash_attention, sparse_attention
from dpojax.errors import ConfigError

ACTIVATIONS = ("gelu", "gelu_tanh", "squared_relu", "swiglu")
NORMALIZATIONS = ("layernorm", "layernorm1p", "rmsnorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "flash", "sparse")
DTYPES = ("float32", "bfloat16", "float16", "float64")  # float64: x64 reference runs.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture; field names follow NeMo's model_config.yaml where one exists."""

  vocab_size: int = 1000
  hidden_size: int = 64
  num_layers: int = 2
  num_attention_heads: int = 4
  num_query_groups: int | None = None  # None: multi-head attention (groups = heads).
  kv_channels: int | None = None  # None: hidden_size // num_attention_heads.
  ffn_hidden_size: int = 256
  activation: str = "swiglu"
  normalization: str = "rmsnorm"
  layernorm_epsilon: float = 1e-5
  position_embedding_type: str = "rope"
  rotary_percentage: float = 1.0
  rotary_base: float = 10000.0
  max_position_embeddings: int = 2048
  bias: bool = False  # Linear layers only; layernorms keep their bias (as in megatron-core).
  share_embeddings_and_output_weights: bool = True
  init_method_std: float = 0.02
  param_dtype: str = "float32"
  dtype: str = "float32"  # Compute dtype.
  remat: str = "none"
  # Query tile of causal attention: each tile skips the keys after it (1.4x faster policy
  # forward+backward at 1024 tokens on CPU); 0 = one T x T block. At most 8 tiles.
  attention_block: int = 0
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
  scan_unroll: int = 1

  def __post_init__(self):
    _check_choice("activation", self.activation, ACTIVATIONS)
    _check_choice("normalization", self.normalization, NORMALIZATIONS)
    _check_choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDINGS)
    _check_choice("remat", self.remat, REMAT_POLICIES)
    _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    _check_choice("dtype", self.dtype, DTYPES)
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
    return self.activation == "swiglu"

  @classmethod
  def from_dict(cls, d) -> ModelConfig:
    d = dict(d)
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ConfigError(f"unknown model config keys: {sorted('model.' + k for k in unknown)}")
    return cls(**d)


def _check_choice(name, value, choices):
  if value not in choices:
    raise ConfigError(f"model.{name}={value!r} is not one of {choices}")


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


def rope_table(positions_BxT, rotary_dim: int, base: float, dtype, num_positions=None):
  """(cos, sin) of each position's rotary angles, [B, T, 1, rotary_dim], in fp32 or wider.

  With `num_positions`, the cos and sin of positions 0 .. num_positions - 1 are computed at
  trace time (the same XLA ops, so the same values) and gathered: XLA on CPU fuses the
  transcendentals into every consumer of the rotated queries and keys otherwise, recomputing
  them once per head in each layer's forward and backward (7% of an issue-10 step). Every
  position must then be below num_positions (a larger one would take the last row's angle).
  A NaN fill for those costs a select in every consumer, and that changed XLA's fusions
  enough that LoRA with zero B no longer matched the base model bit for bit.
  """
  f32 = _at_least_f32(dtype)
  with jax.ensure_compile_time_eval():  # One rounding per op, as HF computes it.
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=f32) / rotary_dim))

  def cos_sin(positions):
    freqs = positions[..., None].astype(f32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], -1)
    return jnp.cos(emb), jnp.sin(emb)

  if num_positions is None:
    cos, sin = cos_sin(positions_BxT)
  else:
    with jax.ensure_compile_time_eval():
      cos_PxR, sin_PxR = cos_sin(jnp.arange(num_positions))
    cos, sin = (jnp.take(t, positions_BxT, axis=0, mode="clip") for t in (cos_PxR, sin_PxR))
  return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x_BxTxNxK, rope):
  """Rotate-half RoPE on the first rotary_dim channels of each head (NeMo/HF convention);
  `rope` is `rope_table`'s (cos, sin)."""
  cos, sin = rope
  rotary_dim = cos.shape[-1]
  x = x_BxTxNxK.astype(cos.dtype)
  x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  out = x_rot * cos + rotated * sin
  return jnp.concatenate([out, x_pass], -1).astype(x_BxTxNxK.dtype)


def attention_mask(segment_ids_BxT, branch_ids_BxT=None):
  """Causal AND same-segment mask, [B, 1, T, T]. Padding (segment 0) attends to itself only.

  With `branch_ids` (shared-prompt rows: 0 = the shared prefix, 1, 2, ... = branches after
  it), a token also needs the key to be in the prefix or in its own branch: each branch sees
  the prefix and itself, never a sibling branch.
  """
  t = segment_ids_BxT.shape[1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  same = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  if branch_ids_BxT is not None:
    key_BxS = branch_ids_BxT[:, None, :]
    same &= (key_BxS == 0) | (key_BxS == branch_ids_BxT[:, :, None])
  return (causal[None] & same)[:, None]


@flax.struct.dataclass
class Segments:
  """The mask as the flash kernel takes it: causal AND same segment, from [B, T] segment ids;
  `bounds`: flash_attention.segment_bounds of the ids (None: the kernel computes them);
  `mesh` (static): the device mesh the kernel runs per shard on (None: one device or GSPMD)."""
  ids_BxT: jax.Array
  bounds: Any = None
  mesh: Any = flax.struct.field(pytree_node=False, default=None)


@flax.struct.dataclass
class TilePairs:
  """The mask as the block-sparse path takes it (ops/sparse_attention.py): the dense mask
  without padding queries, [B, T, T], and its `tile_pairs` at `block` (static)."""
  mask_BxTxT: jax.Array
  pairs: Any
  block: int = flax.struct.field(pytree_node=False)


def layer_mask(cfg: ModelConfig, segment_ids_BxT, branch_ids_BxT=None, mesh=None):
  """What every layer's `attend` gets, computed once per forward: `Segments` for the flash
  kernel, `TilePairs` for the block-sparse path, else the dense `attention_mask`."""
  impl = cfg.attention_impl
  if impl == "auto":
    gpu = jax.default_backend() == "gpu"
    impl = "flash" if gpu and jnp.finfo(_dtype(cfg.dtype)).bits <= 32 else "xla"
  if impl == "flash" and branch_ids_BxT is None:
    return Segments(segment_ids_BxT, flash_attention.segment_bounds(segment_ids_BxT), mesh)
  mask = attention_mask(segment_ids_BxT, branch_ids_BxT)
  block, t = cfg.attention_block, segment_ids_BxT.shape[1]
  # One device only: XLA cannot split its pair list by batch shard (it would replicate it).
  one_device = mesh is None or mesh.size == 1
  if impl == "sparse" and one_device and block > 0 and t % block == 0 and t > block:
    mask_BxTxT = mask[:, 0] & (segment_ids_BxT > 0)[:, :, None]  # Padding attends nothing.
    return TilePairs(mask_BxTxT, sparse_attention.tile_pairs(mask_BxTxT, block), block)
  return mask


def cached_attention_mask(segment_ids_BxT, segment_ids_BxS, index):
  """[B, 1, T, S]: query t sits in slot index + t and sees slots up to its own, same segment."""
  t, s = segment_ids_BxT.shape[1], segment_ids_BxS.shape[1]
  causal_TxS = jnp.arange(s)[None, :] <= index + jnp.arange(t)[:, None]
  same = segment_ids_BxT[:, :, None] == segment_ids_BxS[:, None, :]
  return (causal_TxS[None] & same)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q_BxGxRxTxK, k_BxGxSxK, v_BxGxSxK, mask_Bx1x1xTxS, tiles):
  """Head-major softmax attention; the R query heads of a KV group share its keys and values.

  `tiles`: (query start, query end, key end) per query tile (see `_query_tiles`); each tile
  attends to its keys [0, key end) only. Numerics close to jax.nn.dot_product_attention's XLA
  path (fp32 or wider inputs): logits scaled after the product, masked with the same large
  negative number, max-subtracted exponentials, normalized after the product with the values.

  Scores are kept key-major, [B, G, S, R * T]: XLA's CPU dot runs a product as YNNPACK's
  native kernel only when the first operand contracts its last axis and the second its last
  or second-last (benchmarks/dot_layouts.py), and with this layout every product of the
  forward and backward passes (S^T = K Q^T, O^T = V^T P^T, dP^T = V dO^T, dK = dS^T Q,
  dV = P^T dO, dQ^T = K^T dS^T) is one; with [.., T, S] scores XLA copied a transposed [T, S]
  tile for dK and for dV (forward+backward 18-21% slower). A row of ones under V^T makes the
  softmax's sums part of the same product. The backward pass (flash-attention style:
  dS = P (dP - rowsum(dO O))) reuses the forward's exponentials and writes each tile's
  gradients in place instead of summing zero-padded copies.
  """
  return _softmax_attention_fwd(q_BxGxRxTxK, k_BxGxSxK, v_BxGxSxK, mask_Bx1x1xTxS, tiles)[0]


def _softmax_attention_fwd(q, k, v, mask, tiles):
  b, g, r, _, kd = q.shape
  rows = sparse_attention.head_rows
  scale = jnp.asarray(kd ** -0.5, q.dtype)
  mask_t = jnp.swapaxes(mask[:, :, 0], -1, -2)[:, :, :, None, :]  # [B, 1, S, 1, T]
  v_t = jnp.swapaxes(v, -1, -2)
  v_t1 = jnp.concatenate([v_t, jnp.ones_like(v_t[..., :1, :])], axis=2)  # [B, G, K + 1, S]
  outs, probs = [], []
  for q0, q1, k1 in tiles:
    logits = jnp.einsum("bgsk,bgxk->bgsx", k[..., :k1, :], rows(q[..., q0:q1, :]))
    logits = logits.reshape(b, g, k1, r, q1 - q0) * scale  # [B, G, S, R, Tq]
    logits = jnp.where(mask_t[..., :k1, :, q0:q1], logits,
                       jnp.asarray(0.7 * jnp.finfo(q.dtype).min, q.dtype))
    e = jnp.exp(logits - jnp.max(logits, 2, keepdims=True))  # Unnormalized probabilities.
    o1 = jnp.einsum("bgks,bgsx->bgkx", v_t1[..., :k1], e.reshape(b, g, k1, -1))
    o1 = o1.reshape(b, g, kd + 1, r, q1 - q0)
    inv_sum = 1.0 / o1[:, :, kd:]  # [B, G, 1, R, Tq]
    outs.append(o1[:, :, :kd] * inv_sum)
    probs.append((e, inv_sum))
  o_t = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=4)  # [B, G, K, R, T]
  return jnp.moveaxis(o_t, 2, -1), (q, k, v, o_t, probs)


def _softmax_attention_bwd(tiles, res, do):
  q, k, v, o_t, probs = res
  b, g, r, _, kd = q.shape
  rows = sparse_attention.head_rows
  scale = jnp.asarray(kd ** -0.5, q.dtype)
  k_t = jnp.swapaxes(k, -1, -2)
  rowsum = jnp.sum(jnp.moveaxis(do, -1, 2) * o_t, 2, keepdims=True)  # [B, G, 1, R, T]
  dq_tiles, dk, dv = [], jnp.zeros_like(k), jnp.zeros_like(v)
  for (q0, q1, k1), (e, inv_sum) in zip(tiles, probs):
    do_x = rows(do[..., q0:q1, :] * jnp.moveaxis(inv_sum, 2, -1))  # e stands in for P.
    dp = jnp.einsum("bgsk,bgxk->bgsx", v[..., :k1, :], do_x).reshape(e.shape)
    ds = (e * (dp - rowsum[..., q0:q1] * inv_sum) * scale).reshape(b, g, k1, -1)
    dq_tiles.append(jnp.einsum("bgks,bgsx->bgkx", k_t[..., :k1], ds))
    dk = dk.at[..., :k1, :].add(jnp.einsum("bgsx,bgxk->bgsk", ds, rows(q[..., q0:q1, :])))
    dv = dv.at[..., :k1, :].add(jnp.einsum("bgsx,bgxk->bgsk", e.reshape(ds.shape), do_x))
  dq_t = jnp.concatenate([x.reshape(b, g, kd, r, -1) for x in dq_tiles], axis=4)
  return jnp.moveaxis(dq_t, 2, -1), dk, dv, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _query_tiles(t: int, s: int, block: int) -> tuple[tuple[int, int, int], ...]:
  """(query start, query end, key end) per query tile: causal ends when tiling, else one
  tile over all keys."""
  if block > 0 and t == s:
    block = max(block, -(-t // 8))  # At most 8 tiles: bounded unrolling, large tiles.
  if block <= 0 or t != s or t <= block or t % block:
    return ((0, t, s),)
  return tuple((start, start + block, start + block) for start in range(0, t, block))


def attend(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS, block: int = 0):
  """Softmax attention (GQA when N is a multiple of G; any boolean mask, or `Segments`).

  A `Segments` mask goes to the flash kernel (ops/flash_attention.py), `TilePairs` to the
  block-sparse path (ops/sparse_attention.py).

  With `block` > 0 and S = T (causal self-attention), queries go in tiles and tile i attends
  to keys [0, end of tile i) only: the masked-out upper triangle is never computed.
  Half-precision inputs go through jax.nn.dot_product_attention (its mixed-precision matmul
  handling); fp32 and fp64 through `_softmax_attention`.
  """
  if isinstance(mask_Bx1xTxS, Segments):
    return flash_attention.attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS.ids_BxT,
                                     bounds=mask_Bx1xTxS.bounds, mesh=mask_Bx1xTxS.mesh)
  if isinstance(mask_Bx1xTxS, TilePairs):
    return sparse_attention.attention(q_BxTxNxK, k_BxSxGxK, v_BxSxGxK, mask_Bx1xTxS.mask_BxTxT,
                                      mask_Bx1xTxS.pairs, mask_Bx1xTxS.block)
  b, t, n, kd = q_BxTxNxK.shape
  s, g = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
  tiles = _query_tiles(t, s, block)
  if jnp.finfo(q_BxTxNxK.dtype).bits < 32:
    return jnp.concatenate([jax.nn.dot_product_attention(
        q_BxTxNxK[:, q0:q1], k_BxSxGxK[:, :k1], v_BxSxGxK[:, :k1],
        mask=mask_Bx1xTxS[:, :, q0:q1, :k1], implementation="xla") for q0, q1, k1 in tiles],
                           axis=1)
  q = q_BxTxNxK.reshape(b, t, g, n // g, kd).transpose(0, 2, 3, 1, 4)  # [B, G, R, T, K]
  k, v = k_BxSxGxK.transpose(0, 2, 1, 3), v_BxSxGxK.transpose(0, 2, 1, 3)  # [B, G, S, K]
  o_BxGxRxTxK = _softmax_attention(q, k, v, mask_Bx1xTxS[:, :, None], tiles)
  return o_BxGxRxTxK.transpose(0, 3, 1, 2, 4).reshape(b, t, n, kd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x_MxI, w_IxO, contract: int):
  return jnp.tensordot(x_MxI, w_IxO, axes=contract)


def _matmul_fwd(x_MxI, w_IxO, contract):
  return _matmul(x_MxI, w_IxO, contract), (x_MxI, w_IxO)


def _matmul_bwd(contract, res, dy_MxO):
  x_MxI, w_IxO = res
  out = w_IxO.ndim - contract
  dx = jnp.tensordot(dy_MxO, w_IxO, axes=(tuple(range(1, 1 + out)),
                                          tuple(range(contract, w_IxO.ndim))))
  return dx, jnp.tensordot(x_MxI, dy_MxO, axes=((0,), (0,)))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x, w, contract: int = 1):
  """x [..., *in] @ w [*in, *out], `in` being x's last `contract` axes, with x's leading
  axes merged into one.

  Its backward is written out over that merged axis (dy w^T, x^T dy): autodiff of the einsum
  over [B, T, ...] made XLA:CPU transpose the largest gradient (fc1's [B T, 2, F]) before the
  weight-gradient product (with the scan unrolled, 6% faster issue-10 steps on CPU). The
  weight keeps its axes, so a tensor-parallel shard of fc1's F stays where it is. The same
  products, so the same numerics.
  """
  lead = x.shape[:x.ndim - contract]
  y = _matmul(x.reshape(-1, *x.shape[x.ndim - contract:]), w, contract)
  return y.reshape(*lead, *y.shape[1:])


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, rope, mask_Bx1xTxS, kv=None, index=None):
    """`rope`: `rope_table` of the positions (None without RoPE). Without `kv`, S = T. With
    `kv` ({"key", "value"}: [B, S, G, K] cache of this layer), this chunk's keys and values go
    to slots [index, index + T) and attention spans all S slots."""
    cfg = self.cfg
    d, n, g, k = cfg.hidden_size, cfg.num_attention_heads, cfg.groups, cfg.head_dim
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_method_std)
    out_init = nn.initializers.normal(cfg.init_method_std / (2.0 * cfg.num_layers) ** 0.5)

    def proj(name, heads):
      w = self.param(name, init, (d, heads, k), pdt).astype(dt)
      y = dense(x_BxTxD, w)
      if cfg.bias:
        y = y + self.param(name + "_bias", nn.initializers.zeros, (heads, k), pdt).astype(dt)
      return y

    q_BxTxNxK, k_BxTxGxK, v_BxTxGxK = proj("query", n), proj("key", g), proj("value", g)
    if rope is not None:
      q_BxTxNxK, k_BxTxGxK = apply_rope(q_BxTxNxK, rope), apply_rope(k_BxTxGxK, rope)
    if kv is not None:
      write = lambda cache, new: jax.lax.dynamic_update_slice_in_dim(
          cache, new.astype(cache.dtype), index, axis=1)
      kv = {"key": write(kv["key"], k_BxTxGxK), "value": write(kv["value"], v_BxTxGxK)}
      k_BxTxGxK, v_BxTxGxK = kv["key"].astype(dt), kv["value"].astype(dt)  # Now [B, S, G, K].
    block = cfg.attention_block if kv is None else 0  # The cache path is already causal-short.
    o_BxTxNxK = attend(q_BxTxNxK, k_BxTxGxK, v_BxTxGxK, mask_Bx1xTxS, block)
    w_o = self.param("out", out_init, (n, k, d), pdt).astype(dt)
    y = dense(o_BxTxNxK, w_o, contract=2)
    if cfg.bias:
      y = y + self.param("out_bias", nn.initializers.zeros, (d,), pdt).astype(dt)
    return y, kv


@jax.custom_vjp
def swiglu(h_BxTx2xF):
  """silu(gate) * up of fc1's [gate; up] output.

  Its own backward writes d[gate; up] in one pass: autodiff of the two slices builds two
  zero-padded [B, T, 2, F] gradients and adds them (four passes over the largest activation).
  A custom VJP: reverse mode only (jax.jvp through it raises).
  """
  return jax.nn.silu(h_BxTx2xF[..., 0, :]) * h_BxTx2xF[..., 1, :]


def _swiglu_fwd(h_BxTx2xF):
  return swiglu(h_BxTx2xF), h_BxTx2xF


def _swiglu_bwd(h_BxTx2xF, dy_BxTxF):
  gate, up = h_BxTx2xF[..., 0, :], h_BxTx2xF[..., 1, :]
  sig = jax.nn.sigmoid(gate)
  d_gate = dy_BxTxF * up * sig * (1 + gate * (1 - sig))
  # A select over the pair axis, not a stack: XLA:CPU emits the concatenation slowly inside
  # the layer scan (5x the time of this loop there).
  first = (jnp.arange(2) == 0)[:, None]
  return (jnp.where(first, d_gate[..., None, :], (dy_BxTxF * gate * sig)[..., None, :]),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def activate(cfg: ModelConfig, h):
  """The MLP's activation of fc1's output ([B, T, 2, F] when gated)."""
  if cfg.activation == "swiglu":
    return swiglu(h)
  if cfg.activation == "gelu":
    return jax.nn.gelu(h, approximate=False)
  if cfg.activation == "gelu_tanh":
    return jax.nn.gelu(h, approximate=True)
  return jnp.square(jax.nn.relu(h))  # squared_relu


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD):
    cfg = self.cfg
    d, f = cfg.hidden_size, cfg.ffn_hidden_size
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_method_std)
    out_init = nn.initializers.normal(cfg.init_method_std / (2.0 * cfg.num_layers) ** 0.5)
    # Gated fc1 keeps [gate; up] on its own axis so that sharding F never splits the pair.
    fc1_shape = (d, 2, f) if cfg.gated else (d, f)
    w1 = self.param("fc1", init, fc1_shape, pdt).astype(dt)
    h = dense(x_BxTxD, w1)
    if cfg.bias:
      h = h + self.param("fc1_bias", nn.initializers.zeros, fc1_shape[1:], pdt).astype(dt)
    h = activate(cfg, h)
    w2 = self.param("fc2", out_init, (f, d), pdt).astype(dt)
    y = dense(h, w2)
    if cfg.bias:
      y = y + self.param("fc2_bias", nn.initializers.zeros, (d,), pdt).astype(dt)
    return y


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, rope, mask_Bx1xTxS, kv=None, index=None):
    y_BxTxD, kv = Attention(self.cfg, name="attention")(
        Norm(self.cfg, name="input_norm")(x_BxTxD), rope, mask_Bx1xTxS, kv, index)
    x_BxTxD = x_BxTxD + y_BxTxD
    x_BxTxD = x_BxTxD + Mlp(self.cfg, name="mlp")(Norm(self.cfg, name="pre_mlp_norm")(x_BxTxD))
    return x_BxTxD, kv  # The scan stacks each layer's updated cache (None without one).


class Transformer(nn.Module):
  """Returns final-norm hidden states [B, T, D]; the output layer lives in `output_weight`.

  With a `cache` (see `init_cache`) it returns (hidden states, updated cache) instead.
  """

  cfg: ModelConfig
  mesh: Any = None  # Device mesh for the flash kernel's per-shard calls (see `layer_mask`).

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT, cache=None, *,
               branch_ids_BxT=None):
    cfg = self.cfg
    dt, pdt = _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    init = nn.initializers.normal(cfg.init_method_std)
    embedding_VxD = self.param("embedding", init, (cfg.vocab_size, cfg.hidden_size), pdt)
    x_BxTxD = jnp.take(embedding_VxD, tokens_BxT, axis=0).astype(dt)
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
      rope = rope_table(positions_BxT, cfg.rotary_dim, cfg.rotary_base, dt, num_positions)

    block = Block
    if cfg.remat != "none":
      policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_saveable
      block = nn.remat(Block, policy=policy, prevent_cse=False)
    if cache is None:
      layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
          unroll=min(cfg.scan_unroll, cfg.num_layers))(cfg, name="layers")
      x_BxTxD, _ = layers(x_BxTxD, rope, layer_mask(cfg, segment_ids_BxT, branch_ids_BxT,
                                                            self.mesh))
      return Norm(cfg, name="final_norm")(x_BxTxD)
    # Same module names, so the same parameters; the layer caches are scanned over axis 0.
    layers = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
        length=cfg.num_layers)(cfg, name="layers")
    index = cache["index"]
    segment_ids_BxS = jax.lax.dynamic_update_slice_in_dim(
        cache["segment_ids"], segment_ids_BxT.astype(jnp.int32), index, axis=1)
    x_BxTxD, kv = layers(x_BxTxD, rope, cached_attention_mask(
        segment_ids_BxT, segment_ids_BxS, index), {"key": cache["key"], "value": cache["value"]},
        index)
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
          branch_ids_BxT=None, mesh=None):
  """Pure forward: hidden states [B, T, D]. Positions lie in [0, T), as in every row the data
  pipeline builds (see `rope_table`). `branch_ids`: see `attention_mask`; `mesh`: the device
  mesh the batch is sharded on (the flash kernel then runs per shard)."""
  return Transformer(cfg, mesh).apply({"params": params}, tokens_BxT, positions_BxT,
                                      segment_ids_BxT, branch_ids_BxT=branch_ids_BxT)


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
