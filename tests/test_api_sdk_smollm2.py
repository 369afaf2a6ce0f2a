"""The official openai SDK against the built-in default model (SmolLM2-135M-Instruct),
served with no MODEL argument and the default (OpenBLAS) backend. Small max_tokens keep
this quick at ~20-40 tokens/s."""

from __future__ import annotations

import openai
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import Server  # noqa: E402

pytest_plugins = ["server_util"]
MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smollm2_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=smollm2_server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


def test_default_model_is_served_under_its_directory_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_capital_of_france_is_paris(client):
    out = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 10 and 0 < out.usage.completion_tokens <= 12


def test_streamed_chat_matches_whole_and_reports_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # The same prompt again: its full blocks come from the prefix cache.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 16


def test_natural_end_is_stop_without_eos_text(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                         temperature=0, max_tokens=40)
    assert out.choices[0].finish_reason == "stop"
    assert "<|im_end|>" not in out.choices[0].message.content


def test_stop_string(client):
    out = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=12,
                                         stop=["Paris"])
    assert out.choices[0].finish_reason == "stop"
    assert "Paris" not in out.choices[0].message.content and out.choices[0].message.content


def test_n2_sampled_choices(client):
    out = client.chat.completions.create(model=MODEL, messages=FRANCE, n=2, temperature=1.0, seed=1,
                                         max_tokens=6, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.message.content and c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 12


def test_logprobs_carry_token_strings(client):
    out = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=8,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    text = "".join(e.token for e in content)  # the EOS token has a logprob but no text
    assert text.removesuffix("<|im_end|>") == out.choices[0].message.content
    assert all(e.token == e.top_logprobs[0].token for e in content)  # greedy = top-1


def test_completions_whole_and_streamed(client):
    kwargs = dict(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=5)
    whole = client.completions.create(**kwargs)
    assert "Paris" in whole.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert streamed == whole.choices[0].text


def test_override_generation_config_is_the_default_temperature(client):
    # The server runs with --override-generation-config '{"temperature": 0}'.
    greedy = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=10)
    for _ in range(2):
        default = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=10)
        assert default.choices[0].message.content == greedy.choices[0].message.content
    sampled = {client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=10, temperature=2.0,
                                              seed=s).choices[0].message.content for s in range(3)}
    assert sampled != {greedy.choices[0].message.content}  # an explicit temperature still wins
