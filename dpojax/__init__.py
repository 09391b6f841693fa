"""dpojax: Direct Preference Optimization for GPT-style language models in JAX."""

__version__ = "0.1.0"
