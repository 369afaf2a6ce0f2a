"""Resolve a model argument to an mlx-lm directory and load it with mlx-lm."""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger("shoal")

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def resolve_model_path(model: str | None) -> Path:
    """None -> the offline default; a .gguf file -> converted once into the cache; a local
    directory -> itself; anything else -> a Hugging Face id (huggingface_hub cache,
    HF_HUB_OFFLINE honoured, progress bars while downloading)."""
    from shoal.engine import default_model

    if model is None:
        return default_model.ensure_default_model()
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return default_model.ensure_converted_gguf(path)
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise ValueError(f"model path {model!r} is not an mlx-lm directory or a .gguf file")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
    return Path(snapshot_download(model, allow_patterns=patterns))


def target_dtype(name: str) -> mx.Dtype | None:
    """The dtype to cast weights to, or None to keep the checkpoint's."""
    if name == "auto":
        return mx.float32 if mx.default_device() == mx.cpu else None
    return DTYPES[name]


def load_model(model: str | None, dtype: str = "auto"):
    """Returns (model, tokenizer, path). On CPU quantized layers are dequantized and
    everything is cast to float32: only float32 matmuls go through BLAS there."""
    from mlx_lm.utils import dequantize_model, load

    path = resolve_model_path(model)
    net, tokenizer = load(str(path))
    cast = target_dtype(dtype)
    if cast is not None:
        if any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in net.named_modules()):
            net = dequantize_model(net)
        net.set_dtype(cast)
        mx.eval(net.parameters())
    return net, tokenizer, path
