"""Rotary position embeddings: the scaled frequencies, their cos/sin table, the rotation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dpojax.model.config import ModelConfig


def _at_least_f32(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def scale_frequencies(inv_freq, cfg: ModelConfig, base: float):
  """RoPE inverse frequencies after `cfg.rope_scaling` (Hugging Face's linear, dynamic, llama3
  and yarn; `base` is the theta that gave `inv_freq`)."""
  if cfg.rope_scaling in ("none", "dynamic"):
    # dynamic changes the frequencies only past max_position_embeddings, where dpojax never
    # runs (generate refuses longer outputs; training rows are shorter).
    return inv_freq
  factor = cfg.rope_scaling_factor
  if cfg.rope_scaling == "linear":
    return inv_freq / factor
  if cfg.rope_scaling == "yarn":  # Interpolate the low frequencies, keep the high ones.
    dim = 2 * inv_freq.shape[0]
    correction = lambda rotations: (dim * math.log(
        cfg.rope_original_max_positions / (rotations * 2 * math.pi))) / (2 * math.log(base))
    low, high = correction(cfg.rope_yarn_beta_fast), correction(cfg.rope_yarn_beta_slow)
    if cfg.rope_yarn_truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=inv_freq.dtype) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    return inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
  low_wavelen = cfg.rope_original_max_positions / cfg.rope_low_freq_factor
  high_wavelen = cfg.rope_original_max_positions / cfg.rope_high_freq_factor
  wavelen = 2 * jnp.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = ((cfg.rope_original_max_positions / wavelen - cfg.rope_low_freq_factor)
            / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor))
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rope_table(positions_BxT, rotary_dim: int, base: float, dtype, num_positions=None,
               cfg: ModelConfig | None = None):
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
    if cfg is not None:
      inv_freq = scale_frequencies(inv_freq, cfg, base).astype(f32)
  # yarn scales cos and sin (so each attention logit by its square), as HF's attention_scaling.
  factor = 1.0 if cfg is None else cfg.rope_attention_factor

  def cos_sin(positions):
    freqs = positions[..., None].astype(f32) * inv_freq
    emb = jnp.concatenate([freqs, freqs], -1)
    if factor == 1.0:
      return jnp.cos(emb), jnp.sin(emb)
    return jnp.cos(emb) * factor, jnp.sin(emb) * factor

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
