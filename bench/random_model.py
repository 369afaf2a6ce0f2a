"""Tiny random-weight models built with mlx-lm's own model classes.

Tests and benchmarks need a model directory that ``mlx_lm.load`` accepts
without downloading anything. ``make_random_model`` writes one: a
``config.json`` for the chosen family, float32 ``model.safetensors`` with
deterministic random weights, and a real byte-level BPE tokenizer (256 byte
tokens plus ChatML special tokens) with a chat template.

Token id ``b`` (b < 256) is byte ``b``; the special tokens follow. For
model_type "qwen2", transformers 5 swaps in its own Qwen2Tokenizer (NFC
normaliser and Qwen regex pre-split), as it does for real Qwen2 checkpoints;
ids only differ from the other families on text that is not NFC-normalised.
"mistral" is built by mlx-lm's llama module, so with the same seed it has
exactly the llama weights.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "gpt_oss", "qwen3_moe",
                             "qwen3_5", "qwen3_next", "lfm2", "nemotron_h")

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Which mlx_lm.models module builds each family ("mistral" is remapped to llama by mlx-lm).
_MODULES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mistral": "llama",
    "gemma3_text": "gemma3_text",
    "gpt_oss": "gpt_oss",
    "qwen3_moe": "qwen3_moe",
    "qwen3_5": "qwen3_5",
    "qwen3_next": "qwen3_next",
    "lfm2": "lfm2",
    "nemotron_h": "nemotron_h",
}
_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt_oss": "GptOssForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3_5": "Qwen3_5ForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
    "lfm2": "Lfm2ForCausalLM",
    "nemotron_h": "NemotronHForCausalLM",
}

_PARAMS_FILE = "shoal_random_model.json"
# Bump when the written files change so stale caches are rebuilt.
_FORMAT_VERSION = 3
# Embedding std: small, as in real checkpoints, so tied logits stay moderate.
_EMBED_STD = 0.02
# Linear std is _LINEAR_GAIN / sqrt(fan_in); see _random_weights for why 2.
_LINEAR_GAIN = 2.0


def gemma3_shape() -> dict[str, Any]:
    """Gemma 3 270M's layer shape (18 layers, 5 sliding of every 6), with SmolLM2's vocabulary
    size instead of 262k (the LM head would dominate a CPU run) and a 128-token window, so the
    benchmark's 256-token prompts run past it."""
    return {
        "hidden_size": 640,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "intermediate_size": 2048,
        "vocab_size": 49152,
        "head_dim": 256,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
        "sliding_window": 128,
        "sliding_window_pattern": 6,
    }


def qwen3_5_shape() -> dict[str, Any]:
    """Qwen3.5-0.8B's layer shape as we know it (24 layers: 3 Gated DeltaNet layers to 1 full
    attention, 16 key and 16 value heads of 128 in the linear layers), with SmolLM2's
    vocabulary size instead of 248k, as for `gemma3_shape`."""
    return {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "intermediate_size": 3584,
        "vocab_size": 49152,
        "head_dim": 256,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
        "extra_config": {"linear_num_key_heads": 16, "linear_num_value_heads": 16, "linear_key_head_dim": 128,
                         "linear_value_head_dim": 128},
    }


def qwen3_shape() -> dict[str, Any]:
    """Qwen3-0.6B's layer shape (28 layers, 16 query and 8 KV heads of 128: both halve for
    tensor parallel 2), with SmolLM2's vocabulary size."""
    return {
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "intermediate_size": 3072,
        "vocab_size": 49152,
        "head_dim": 128,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-6,
    }


def smollm2_shape() -> dict[str, Any]:
    """Return the SmolLM2-135M shape as keyword arguments for ``make_random_model``."""
    return {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
    }


def bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's byte -> printable unicode character map."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def tokenizer_vocab_size() -> int:
    """Number of ids the generated tokenizer knows (256 bytes + special tokens)."""
    return 256 + len(SPECIAL_TOKENS)


def special_token_id(token: str) -> int:
    """Id of one of ``SPECIAL_TOKENS`` in the generated tokenizer."""
    return 256 + SPECIAL_TOKENS.index(token)


def _build_tokenizer_json(extra_tokens: tuple[str, ...] = ()) -> str:
    """Serialise a byte-level BPE tokenizer whose id ``b`` is byte ``b``; ``extra_tokens``
    (ordinary, non-special added tokens) follow the special ones."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_map = bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    # No regex split: with no merges, pre-splitting words would change nothing.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    return tok.to_str(pretty=True)


def _tokenizer_config(chat_template: str = CHAT_TEMPLATE) -> dict[str, Any]:
    """The ``tokenizer_config.json`` contents transformers needs for our tokenizer."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": chat_template,
    }


def _model_config(family: str, params: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` that ``mlx_lm.load`` accepts for ``family``."""
    config = {
        "model_type": family,
        "architectures": [_ARCHITECTURES[family]],
        "hidden_size": params["hidden_size"],
        "num_hidden_layers": params["num_hidden_layers"],
        "num_attention_heads": params["num_attention_heads"],
        "num_key_value_heads": params["num_key_value_heads"],
        "intermediate_size": params["intermediate_size"],
        "head_dim": params["head_dim"],
        "vocab_size": params["vocab_size"],
        "tie_word_embeddings": params["tie_word_embeddings"],
        "max_position_embeddings": params["max_position_embeddings"],
        "rope_theta": params["rope_theta"],
        "rms_norm_eps": params["rms_norm_eps"],
        "hidden_act": "silu",
        "bos_token_id": None,
        "eos_token_id": special_token_id(EOS_TOKEN),
        "pad_token_id": special_token_id(PAD_TOKEN),
        "torch_dtype": "float32",
    }
    if family == "qwen2":
        config["attention_bias"] = True  # informational: mlx-lm's qwen2 always has q/k/v bias
    if family == "mistral":
        config["sliding_window"] = None
    if family == "gemma3_text":  # every `sliding_window_pattern`-th layer global, the rest sliding
        config.update(sliding_window=params["sliding_window"], sliding_window_pattern=params["sliding_window_pattern"],
                      query_pre_attn_scalar=params["head_dim"], rope_local_base_freq=10000.0)
    if family == "gpt_oss":  # sliding / full layers alternating, attention sinks, 4 experts, top-2
        config.update(sliding_window=params["sliding_window"], num_local_experts=4, num_experts_per_tok=2,
                      layer_types=["sliding_attention", "full_attention"] * (params["num_hidden_layers"] // 2))
    if family == "qwen3_moe":  # every layer a mixture of 4 experts, top-2
        config.update(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                      moe_intermediate_size=params["intermediate_size"], norm_topk_prob=True)
    if family == "qwen3_5":  # Gated DeltaNet layers, every 4th layer full attention
        config.update(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32,
                      linear_value_head_dim=32, linear_conv_kernel_dim=4, full_attention_interval=4,
                      rope_parameters={"type": "default", "rope_theta": params["rope_theta"],
                                       "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1]})
    if family == "qwen3_next":  # Gated DeltaNet as qwen3_5, every layer a mixture of 4 experts + a shared one
        config.update(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=32,
                      linear_value_head_dim=32, linear_conv_kernel_dim=4, full_attention_interval=4,
                      partial_rotary_factor=0.25, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                      mlp_only_layers=[], moe_intermediate_size=params["intermediate_size"],
                      shared_expert_intermediate_size=params["intermediate_size"], norm_topk_prob=True)
    if family == "lfm2":  # short-convolution layers, every 3rd layer (from the 2nd) attention
        config.update(norm_eps=params["rms_norm_eps"], conv_bias=False, conv_L_cache=3,
                      block_dim=params["hidden_size"], block_multiple_of=16, block_ffn_dim_multiplier=1.0,
                      block_auto_adjust_ff_dim=False, block_ff_dim=params["intermediate_size"],
                      layer_types=["full_attention" if i % 3 == 1 else "conv"
                                   for i in range(params["num_hidden_layers"])])
    if family == "nemotron_h":  # Mamba-2, attention (no RoPE) and MLP blocks; only the first two cache
        pattern = ("M", "*", "-", "M")
        config.update(attention_bias=False, mamba_num_heads=4, mamba_head_dim=16, mamba_proj_bias=False,
                      ssm_state_size=16, conv_kernel=4, n_groups=1, mlp_bias=False,
                      layer_norm_epsilon=params["rms_norm_eps"], use_bias=False, use_conv_bias=True,
                      hybrid_override_pattern=[pattern[i % 4] for i in range(params["num_hidden_layers"])])
    config.update(params.get("extra_config") or {})
    return config


def _random_weights(model: Any, seed: int, embed_std: float) -> dict[str, mx.array]:
    """Deterministic float32 weights for every parameter of ``model``.

    Linear weights get std 2/sqrt(fan_in): every block then writes a large,
    strongly nonlinear update into the residual stream. With 0.02-style init a
    tied-embedding model echoes its input token under greedy decoding, and with
    1/sqrt(fan_in) it still falls into long single-token runs.
    """
    rng = np.random.default_rng(seed)
    weights: dict[str, mx.array] = {}
    for name, param in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        shape = tuple(param.shape)
        if name.endswith("norm.weight"):
            arr = np.ones(shape, dtype=np.float32)
        elif name.endswith(".bias"):
            arr = np.float32(0.02) * rng.standard_normal(shape, dtype=np.float32)
        elif "embed_tokens" in name:
            arr = embed_std * rng.standard_normal(shape, dtype=np.float32)
        else:
            std = _LINEAR_GAIN / np.sqrt(shape[-1])
            arr = np.float32(std) * rng.standard_normal(shape, dtype=np.float32)
        weights[name] = mx.array(arr)
    return weights


def _resolve_params(family: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Validate arguments and fill the defaults that depend on others."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    params = dict(kwargs, family=family)
    natural_head_dim = params["hidden_size"] // params["num_attention_heads"]
    if params["head_dim"] is None:
        params["head_dim"] = natural_head_dim
    if family == "qwen2" and params["head_dim"] != natural_head_dim:
        # mlx-lm's qwen2 always uses hidden_size // num_attention_heads.
        raise ValueError("qwen2 requires head_dim == hidden_size // num_attention_heads")
    if params["vocab_size"] is None:
        params["vocab_size"] = tokenizer_vocab_size()
    if params["vocab_size"] < tokenizer_vocab_size():
        raise ValueError(f"vocab_size must be >= the tokenizer's {tokenizer_vocab_size()} ids")
    params["rope_theta"] = float(params["rope_theta"])
    params["rms_norm_eps"] = float(params["rms_norm_eps"])
    params["format_version"] = _FORMAT_VERSION
    return params


def _is_cached(out_dir: Path, params: dict[str, Any]) -> bool:
    """True when ``out_dir`` already holds a model built from ``params``."""
    marker = out_dir / _PARAMS_FILE
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if not marker.exists() or not all((out_dir / f).exists() for f in needed):
        return False
    try:
        return json.loads(marker.read_text()) == params
    except (OSError, json.JSONDecodeError):
        return False


def make_random_model(
    out_dir: str | Path,
    family: str = "llama",
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    head_dim: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 4096,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
    sliding_window: int = 24,
    sliding_window_pattern: int = 2,
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight ``family`` model loadable by ``mlx_lm.load`` to ``out_dir``.

    ``vocab_size`` defaults to the tokenizer's size so every id decodes; a larger
    value is allowed (extra ids have no text). ``extra_config`` overrides the family's
    ``config.json`` entries (layer counts of a hybrid, head sizes). Returns ``out_dir`` as a Path;
    when it already holds a model built with the same arguments nothing is rewritten.
    """
    out = Path(out_dir)
    params = _resolve_params(
        family,
        {
            "hidden_size": hidden_size,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "num_key_value_heads": num_key_value_heads,
            "intermediate_size": intermediate_size,
            "head_dim": head_dim,
            "vocab_size": vocab_size,
            "seed": seed,
            "tie_word_embeddings": tie_word_embeddings,
            "max_position_embeddings": max_position_embeddings,
            "rope_theta": rope_theta,
            "rms_norm_eps": rms_norm_eps,
            **({"sliding_window": sliding_window, "sliding_window_pattern": sliding_window_pattern}
               if family == "gemma3_text" else {"sliding_window": sliding_window} if family == "gpt_oss" else {}),
            **({"extra_config": extra_config} if extra_config else {}),
        },
    )
    if _is_cached(out, params):
        return out
    out.mkdir(parents=True, exist_ok=True)
    # Drop the marker first so an interrupted rebuild is never mistaken for a cache hit.
    (out / _PARAMS_FILE).unlink(missing_ok=True)

    config = _model_config(family, params)
    arch = importlib.import_module(f"mlx_lm.models.{_MODULES[family]}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    weights = _random_weights(model, seed, _EMBED_STD)
    model.load_weights(list(weights.items()), strict=True)  # checks names and shapes

    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(_build_tokenizer_json(), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}, indent=2)
    )
    (out / _PARAMS_FILE).write_text(json.dumps(params, indent=2, sort_keys=True))
    return out
