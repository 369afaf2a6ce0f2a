"""Shoal: a vLLM-style continuous-batching LLM server on MLX."""

__version__ = "0.1.0"
