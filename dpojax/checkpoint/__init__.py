"""Checkpoints: Orbax training state; .nemo and Hugging Face conversion."""
