"""Numerical kernels: per-token log-probabilities."""
