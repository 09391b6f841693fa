"""The decoder model: pure functions of (params, batch arrays)."""

from dpojax.model.config import ModelConfig
from dpojax.model.transformer import (Transformer, apply, attention_path, init_params,
                                      layer_mask, output_weight)
from dpojax.ops.attention import Segments, TilePairs, attend, attention_mask

__all__ = ["ModelConfig", "Segments", "TilePairs", "Transformer", "apply", "attend",
           "attention_path",
           "attention_mask", "init_params", "layer_mask", "output_weight"]
