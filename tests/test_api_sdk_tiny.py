"""The official openai SDK against a tiny random model: chat and completions, streamed and
whole, n, stop strings, logprobs, usage. Greedy decoding makes every answer reproducible,
so streamed text must equal whole text token for token."""

from __future__ import annotations

import httpx
import openai
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import Server, metric  # noqa: E402

pytest_plugins = ["server_util"]
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url("/v1"), api_key="unused", max_retries=0, timeout=60)


def greedy_chat(client: openai.OpenAI, max_tokens: int = 12, **kwargs):
    return client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                          max_tokens=max_tokens, **kwargs)


def test_chat_whole_response_shape_and_usage(client):
    out = greedy_chat(client, max_tokens=12, extra_body={"ignore_eos": True})
    assert out.object == "chat.completion" and out.model == "tiny"
    assert out.id.startswith("chatcmpl-")
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_chat_stream_equals_whole_with_usage_chunk(client):
    whole = greedy_chat(client, max_tokens=16, extra_body={"ignore_eos": True})
    stream = greedy_chat(client, max_tokens=16, stream=True, stream_options={"include_usage": True},
                         extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_repeated_prompt_reports_cached_tokens(client):
    long_messages = [{"role": "user", "content": "shared prefix " * 20}]
    first = client.chat.completions.create(model="tiny", messages=long_messages, max_tokens=2)
    second = client.chat.completions.create(model="tiny", messages=long_messages, max_tokens=2)
    assert second.usage.prompt_tokens == first.usage.prompt_tokens
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached % 16 == 0 and cached < second.usage.prompt_tokens


def test_cache_salt_isolates_and_reset_drops_the_cache(client, tiny_server: Server):
    messages = [{"role": "user", "content": "salted prefix " * 20}]
    ask = lambda **extra: client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                                         extra_body=extra)
    ask(cache_salt="tenant-a")
    assert ask(cache_salt="tenant-a").usage.prompt_tokens_details.cached_tokens >= 16
    assert ask(cache_salt="tenant-b").usage.prompt_tokens_details.cached_tokens == 0
    assert ask().usage.prompt_tokens_details.cached_tokens == 0  # unsalted is its own tenant
    reset = httpx.post(tiny_server.url("/reset_prefix_cache"))
    assert reset.status_code == 200 and reset.json()["dropped_blocks"] > 0
    assert ask(cache_salt="tenant-a").usage.prompt_tokens_details.cached_tokens == 0


def test_max_completion_tokens_alias(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=5,
                                         extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"


def test_chat_n2_seeded_choices_differ_and_reproduce(client):
    def run():
        return client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, seed=7,
                                              max_tokens=10, extra_body={"ignore_eos": True})

    first, second = run(), run()
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.message.content for c in second.choices]  # seed, seed+1: reproducible
    assert texts[0] != texts[1]  # ... and different from each other
    assert first.usage.completion_tokens == 20


def test_chat_n2_streamed_matches_whole(client):
    kwargs = dict(model="tiny", messages=MESSAGES, n=2, seed=3, max_tokens=8,
                  extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    texts = ["", ""]
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in whole.choices]


def test_stop_string_truncates_and_reports_stop(client):
    text = greedy_chat(client, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = next(ch for ch in text[3:] if ch.isascii() and ch.isprintable())
    out = greedy_chat(client, max_tokens=24, stop=[stop, "never-matches"], extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == text[:text.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = greedy_chat(client, max_tokens=24, stop=stop, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:text.index(stop)]


def test_chat_logprobs_shape_and_greedy_top1(client):
    out = greedy_chat(client, max_tokens=6, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy picks top-1
        assert entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


def test_chat_logprobs_streamed_match_whole(client):
    whole = greedy_chat(client, max_tokens=6, logprobs=True, top_logprobs=1, extra_body={"ignore_eos": True})
    streamed = [e for c in greedy_chat(client, max_tokens=6, logprobs=True, top_logprobs=1, stream=True,
                                       extra_body={"ignore_eos": True})
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == [e.logprob for e in whole.choices[0].logprobs.content]


def test_completion_whole_and_stream_agree(client):
    kwargs = dict(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=10,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10 == whole.usage.completion_tokens


def test_completion_default_max_tokens_is_16(client):
    out = client.completions.create(model="tiny", prompt="abc", extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16


def tokenize(server: Server, text: str) -> list[int]:
    return httpx.post(server.url("/tokenize"), json={"prompt": text}).json()["tokens"]


def test_completion_token_ids_and_batch_prompts(client, tiny_server: Server):
    tokens = tokenize(tiny_server, "Once upon a time")
    by_text = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=6)
    by_ids = client.completions.create(model="tiny", prompt=tokens, temperature=0, max_tokens=6)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(model="tiny", prompt=["Once upon a time", "zzz"], n=2,
                                      temperature=0, max_tokens=6)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == by_text.choices[0].text
    assert batch.usage.prompt_tokens == len(tokens) + len(tokenize(tiny_server, "zzz"))  # once each


def test_completion_logprobs_and_echo(client):
    out = client.completions.create(model="tiny", prompt="Hi", temperature=0, max_tokens=5, logprobs=2,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    echoed = client.completions.create(model="tiny", prompt="Hi", temperature=0, max_tokens=5, echo=True,
                                       extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == "Hi" + out.choices[0].text


def test_alias_is_accepted_and_echoed(client):
    out = client.chat.completions.create(model="tiny-alias", messages=MESSAGES, max_tokens=2)
    assert out.model == "tiny-alias"
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]


def test_unknown_model_is_sdk_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2)
    assert info.value.body["message"] == "The model `gpt-4` does not exist."


def test_request_id_echoed_and_used_as_prefix(tiny_server: Server):
    r = httpx.post(tiny_server.url("/v1/chat/completions"), headers={"X-Request-Id": "trace-42"},
                   json={"messages": MESSAGES, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42"
    assert r.json()["id"].startswith("chatcmpl-trace-42-")
    generated = httpx.get(tiny_server.url("/health")).headers["x-request-id"]
    assert len(generated) == 16


def test_tokenize_detokenize_roundtrip(tiny_server: Server):
    tok = httpx.post(tiny_server.url("/tokenize"), json={"prompt": "hello world", "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) == len(tok["token_strs"]) and tok["max_model_len"] == 1024
    back = httpx.post(tiny_server.url("/detokenize"), json={"tokens": tok["tokens"]}).json()
    assert back == {"prompt": "hello world"}
    chat = httpx.post(tiny_server.url("/tokenize"), json={"messages": MESSAGES}).json()
    text = httpx.post(tiny_server.url("/detokenize"), json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n") and "Tell me about the sea." in text


def test_probes_and_version(tiny_server: Server):
    assert httpx.get(tiny_server.url("/health")).status_code == 200
    assert httpx.head(tiny_server.url("/")).status_code == 200
    assert httpx.get(tiny_server.url("/")).json()["model"] == "tiny"
    assert httpx.get(tiny_server.url("/version")).json() == {"version": "0.1.0"}


def test_metrics_count_a_request(tiny_server: Server, client):
    before = tiny_server.metrics()
    out = client.completions.create(model="tiny", prompt="count me", max_tokens=7,
                                    extra_body={"ignore_eos": True})
    after = tiny_server.metrics()
    delta = {name: metric(after, name) - metric(before, name) for name in (
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
        "vllm:e2e_request_latency_seconds_count", "vllm:time_to_first_token_seconds_count",
        "vllm:request_prompt_tokens_sum", "vllm:inter_token_latency_seconds_count")}
    assert delta == {"vllm:prompt_tokens_total": out.usage.prompt_tokens,
                     "vllm:generation_tokens_total": 7,
                     "vllm:e2e_request_latency_seconds_count": 1,
                     "vllm:time_to_first_token_seconds_count": 1,
                     "vllm:request_prompt_tokens_sum": out.usage.prompt_tokens,
                     "vllm:inter_token_latency_seconds_count": 6}
    success = metric(after, "vllm:request_success_total", finished_reason="length", model_name="tiny")
    assert success - metric(before, "vllm:request_success_total", finished_reason="length") == 1
    assert metric(after, "vllm:iteration_tokens_total_count") > metric(before, "vllm:iteration_tokens_total_count")
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="2560.0",model_name="tiny"}' in after
    assert 'vllm:request_decode_time_seconds_bucket{engine="0",le="7680.0",model_name="tiny"}' in after
    assert 'vllm:request_prompt_tokens_bucket{engine="0",le="1000.0",model_name="tiny"}' in after
