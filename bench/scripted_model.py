"""Tiny models that say exactly what a test scripted, through the real engine.

A random-weight model will not write a tool call or a think section by chance. This one is
an ordinary mlx-lm llama checkpoint whose weights make it a bigram machine: every
attention and MLP output projection is zero, so the last position's logits depend only on
the last token, and the LM head maps each script token to the next one.

    trigger token --> piece 1 --> piece 2 --> ... --> piece n --> EOS

Each piece is one added token of the tokenizer (so a piece may hold several characters and
a script is split across tokens exactly where the test wants). A trigger is the last token
of the prompt (for chat, the end of the generation prompt), so a template whose generation
prompt differs (say with thinking off) starts another script. Everything else runs as in
any model: paging, batching, sampling, detokenizing.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from shoal.bench.random_model import (EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS, _build_tokenizer_json,
                                      _model_config, _resolve_params, _tokenizer_config)

STEP_LOGIT = 400.0  # a script's next token wins by this much (more than any logit_bias)

# A Qwen3-style template (hermes tool calls in <tool_call> tags, tool results in
# <tool_response> inside a user turn, <think> sections, `enable_thinking`). mlx-lm detects
# its tool parser from "<tool_call>" and "tool_call.name".
TOOLS_CHAT_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions. Their signatures, within <tools></tools>:
<tools>{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}{{ '\n' }}</tools>

Return each call as <tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.reasoning_content %}<think>
{{ message.reasoning_content }}
</think>

{% endif %}{{ message.content }}
{%- for tool_call in message.tool_calls or [] %}
{%- if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments if tool_call.arguments is string else tool_call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}{{ '\n' }}<tool_response>
{{ message.content }}
</tool_response>
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>
{% endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{% endif %}"""
THINK_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>")


def make_scripted_model(out_dir: str | Path, scripts: dict[str, list[str]],
                        chat_template: str = TOOLS_CHAT_TEMPLATE, hidden_size: int = 64,
                        seed: int = 0) -> Path:
    """Write a model that answers a prompt ending in trigger token `t` with `scripts[t]`
    (piece by piece), then EOS. Triggers are single bytes or pieces of another script
    ("\\n\\n" and the like become added tokens too). Pieces must be distinct."""
    pieces = [p for script in scripts.values() for p in script]
    if len(set(pieces)) != len(pieces) or any(not p for p in pieces):
        raise ValueError("script pieces must be distinct and non-empty")
    extra = tuple(dict.fromkeys([*THINK_TOKENS, *(t for t in scripts if len(t.encode()) > 1), *pieces]))
    extra = tuple(t for t in extra if len(t.encode()) > 1 and t not in SPECIAL_TOKENS)
    vocab = {**{bytes([b]).decode("latin-1"): b for b in range(128)},
             **{t: 256 + i for i, t in enumerate((*SPECIAL_TOKENS, *extra))}}
    transitions = {}
    for trigger, script in scripts.items():
        chain = [trigger, *script, EOS_TOKEN]
        transitions.update({vocab[a]: vocab[b] for a, b in zip(chain, chain[1:])})
    if len(transitions) > hidden_size:
        raise ValueError(f"at most {hidden_size} transitions, got {len(transitions)}")

    vocab_size = 256 + len(SPECIAL_TOKENS) + len(extra)
    params = _resolve_params("llama", {
        "hidden_size": hidden_size, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 2 * hidden_size, "head_dim": None,
        "vocab_size": vocab_size, "seed": seed, "tie_word_embeddings": False,
        "max_position_embeddings": 131072, "rope_theta": 10000.0, "rms_norm_eps": 1e-5})
    config = _model_config("llama", params)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"),
                        _bigram_weights(config, transitions, seed), metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.json").write_text(_build_tokenizer_json(extra), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(chat_template), indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}, indent=2))
    return out


def _bigram_weights(config: dict, transitions: dict[int, int], seed: int) -> dict[str, mx.array]:
    """Token a's embedding is the unit vector of its own slot; the head row of its successor
    reads that slot. Other tokens get small random rows, so they never win against a step."""
    rng = np.random.default_rng(seed)
    d, vocab = config["hidden_size"], config["vocab_size"]
    inter, heads, kv_heads = config["intermediate_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = d // heads
    embed = 0.02 * rng.standard_normal((vocab, d), dtype=np.float32)
    head = 0.02 * rng.standard_normal((vocab, d), dtype=np.float32)
    for slot, (a, b) in enumerate(sorted(transitions.items())):
        embed[a] = 0.0
        embed[a, slot] = 1.0
        head[:, slot] = 0.0
        # RMSNorm scales a unit vector by sqrt(d): the successor's logit is STEP_LOGIT.
        head[b, slot] = STEP_LOGIT / np.sqrt(d)

    def rand(*shape: int) -> mx.array:
        return mx.array(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[-1]))

    layer = "model.layers.0."
    return {
        "model.embed_tokens.weight": mx.array(embed), "lm_head.weight": mx.array(head),
        "model.norm.weight": mx.ones((d,)),
        layer + "input_layernorm.weight": mx.ones((d,)),
        layer + "post_attention_layernorm.weight": mx.ones((d,)),
        layer + "self_attn.q_proj.weight": rand(heads * head_dim, d),
        layer + "self_attn.k_proj.weight": rand(kv_heads * head_dim, d),
        layer + "self_attn.v_proj.weight": rand(kv_heads * head_dim, d),
        layer + "self_attn.o_proj.weight": mx.zeros((d, heads * head_dim)),
        layer + "mlp.gate_proj.weight": rand(inter, d),
        layer + "mlp.up_proj.weight": rand(inter, d),
        layer + "mlp.down_proj.weight": mx.zeros((d, inter)),
    }
