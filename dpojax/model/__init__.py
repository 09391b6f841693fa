"""The decoder model: pure functions of (params, batch arrays)."""

from dpojax.model.transformer import (ModelConfig, Transformer, apply, attend, attention_mask,
                                     init_params, output_weight)

__all__ = ["ModelConfig", "Transformer", "apply", "attend", "attention_mask", "init_params",
           "output_weight"]
