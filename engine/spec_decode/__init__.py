"""Speculative decoding: draft proposers beside the scheduler (numpy only, no MLX)."""
