"""Preference data: JSONL sources, tokenization, and the Grain pipeline."""
