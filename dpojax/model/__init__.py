"""The decoder model: pure functions of (params, batch arrays)."""

from dpojax.model.transformer import (ModelConfig, Segments, TilePairs, Transformer, apply,
                                     attend, attention_mask, init_params, layer_mask,
                                     output_weight)

__all__ = ["ModelConfig", "Segments", "TilePairs", "Transformer", "apply", "attend",
           "attention_mask", "init_params", "layer_mask", "output_weight"]
