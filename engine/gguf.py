"""Convert a llama-family GGUF checkpoint into an mlx-lm model directory.

The output directory holds float32 ``model.safetensors``, ``config.json``,
``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``,
so ``mlx_lm.load(out_dir)`` can serve it without any network access.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

SUPPORTED_ARCHITECTURES = ("llama",)

# ggml block quantizations (Q4_0, Q4_1, Q8_0) that mx.load keeps packed all
# use 32-element blocks.
GGML_GROUP_SIZE = 32

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)")

# llama.cpp's `tokenizer.ggml.pre` names mapped to the equivalent HF
# pre-tokenizers. The SmolLM/StarCoder family splits every digit on its own
# before the GPT-2 byte-level regex.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "command-r")
_PLAIN_GPT2 = ("gpt-2", "gpt2")

_SPECIAL_TOKEN_TYPES = (2, 3)  # llama.cpp UNKNOWN, CONTROL
_USER_DEFINED_TOKEN_TYPE = 4


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama-family GGUF file into an mlx-lm model directory.

    All weights are dequantized to float32 (on CPU only float32 matmuls use
    BLAS) and llama.cpp's rotary row permutation of the Q/K projections is
    undone, so the standard mlx-lm llama model runs it unchanged.

    Args:
        gguf_path: Path to the ``.gguf`` file.
        out_dir: Directory to write; created if missing, files overwritten.

    Returns:
        The output directory as a ``Path``.

    Raises:
        ValueError: If the architecture, tokenizer or a tensor is unsupported.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    tensors, metadata = mx.load(str(gguf_path), return_metadata=True)
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {gguf_path}; "
            f"only {', '.join(SUPPORTED_ARCHITECTURES)} models can be converted"
        )
    config = _model_config(metadata, tensors)
    tokenizer, tokenizer_config = _build_tokenizer(metadata)
    weights = _convert_weights(tensors, config)

    out_dir.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "config.json", config)
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
    )
    return out_dir


def _scalar(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    return value.item() if isinstance(value, mx.array) else value


def _f32(value: float) -> float:
    # GGUF stores float32; its shortest repr (1e-05, not 9.99999974e-06) is
    # the value the source config had.
    return float(str(np.float32(value)))


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _model_config(metadata: dict[str, Any], tensors: dict[str, mx.array]) -> dict[str, Any]:
    """Build an mlx-lm ``llama`` config.json from GGUF metadata."""
    arch = metadata["general.architecture"]

    def meta(key: str, default: Any = None) -> Any:
        value = _scalar(metadata, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata is missing {arch}.{key}")
        return value

    hidden = int(meta("embedding_length"))
    n_heads = int(meta("attention.head_count"))
    rope_scaling = _rope_scaling(metadata, arch)
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(meta("block_count")),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", n_heads)),
        "head_dim": int(meta("attention.key_length", hidden // n_heads)),
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(meta("context_length")),
        "vocab_size": int(tensors["token_embd.weight"].shape[0]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "bos_token_id": _scalar(metadata, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _scalar(metadata, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }


def _rope_scaling(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = _scalar(metadata, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(_scalar(metadata, f"{arch}.rope.scaling.factor"))}
    raise ValueError(f"unsupported GGUF rope scaling type {kind!r}")


def _mlx_name(gguf_base: str) -> str:
    """Map a GGUF tensor base name (no .weight/.bias suffix) to mlx-lm's."""
    if gguf_base in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_base]
    match = _LAYER_RE.fullmatch(gguf_base)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unsupported GGUF tensor {gguf_base!r} for a llama model")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def _to_float32(tensors: dict[str, mx.array], name: str) -> mx.array:
    """Return tensor ``name`` as float32, dequantizing mx.load's packed blocks."""
    base = name.rsplit(".", 1)[0]
    scales = tensors.get(f"{base}.scales") if name.endswith(".weight") else None
    if scales is None:
        return tensors[name].astype(mx.float32)
    packed = tensors[name]
    biases = tensors.get(f"{base}.biases")
    biases = mx.zeros_like(scales) if biases is None else biases
    # Each group of 32 values spans 32 * bits / 32 = bits uint32 words.
    bits = packed.shape[-1] // scales.shape[-1]
    # Cast the float16 block scales up front so the arithmetic runs in float32.
    return mx.dequantize(
        packed,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        group_size=GGML_GROUP_SIZE,
        bits=bits,
    )


def _unpermute_rope_rows(w: mx.array, n_heads: int) -> mx.array:
    """Invert llama.cpp's Q/K row permutation.

    llama.cpp reorders each head's rows from HF's half-split rotary layout
    (first half, second half) into interleaved pairs for its GPT-J style rope;
    mlx-lm's llama uses the half-split layout, so swap back.
    """
    head_dim = w.shape[0] // n_heads
    return (
        w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _convert_weights(tensors: dict[str, mx.array], config: dict[str, Any]) -> dict[str, mx.array]:
    names = sorted(n for n in tensors if n.endswith((".weight", ".bias")))
    n_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    print(f"converting {len(names)} tensors to float32", file=sys.stderr, flush=True)
    out: dict[str, mx.array] = {}
    for i, name in enumerate(names, start=1):
        base, suffix = name.rsplit(".", 1)
        w = _to_float32(tensors, name)
        kind = base.rsplit(".", 1)[-1]
        if kind in n_heads:
            w = _unpermute_rope_rows(w, n_heads[kind])
        mx.eval(w)
        out[f"{_mlx_name(base)}.{suffix}"] = w
        if i % 100 == 0 or i == len(names):
            print(f"converting {i}/{len(names)} tensors", file=sys.stderr, flush=True)
    return out


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _PLAIN_GPT2:
        return byte_level
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")


def _build_tokenizer(metadata: dict[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    """Build a byte-level BPE ``tokenizers.Tokenizer`` and its tokenizer_config."""
    kind = _scalar(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; only byte-level BPE ('gpt2')")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    if len(set(tokens)) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    token_types = metadata["tokenizer.ggml.token_type"].tolist()

    tokenizer = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(_scalar(metadata, "tokenizer.ggml.pre", "gpt-2"))
    tokenizer.decoder = decoders.ByteLevel()
    # llama.cpp matches control and user-defined tokens before BPE, like
    # HF added tokens; only control tokens are skipped when decoding.
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=t in _SPECIAL_TOKEN_TYPES, normalized=False)
            for i, t in enumerate(token_types)
            if t in _SPECIAL_TOKEN_TYPES or t == _USER_DEFINED_TOKEN_TYPE
        ]
    )

    def token(key: str) -> str | None:
        idx = _scalar(metadata, f"tokenizer.ggml.{key}_token_id")
        return None if idx is None else tokens[idx]

    bos = token("bos")
    context_length = _scalar(metadata, f"{metadata['general.architecture']}.context_length")
    add_bos = bool(_scalar(metadata, "tokenizer.ggml.add_bos_token", False))
    tokenizer.post_processor = _post_processor(bos if add_bos else None, tokens)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "chat_template": metadata.get("tokenizer.chat_template"),
    }
    return tokenizer, {k: v for k, v in config.items() if v is not None}


def _post_processor(bos: str | None, tokens: list[str]) -> processors.PostProcessor:
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos is None:
        return byte_level
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
    )
    return processors.Sequence([byte_level, template])
