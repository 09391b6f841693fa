"""Checkpoint formats at the edges: Hugging Face folders and NeMo .nemo files <-> dpojax params."""
