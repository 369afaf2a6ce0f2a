"""API keys (`--api-key` twice): 401 in OpenAI's shape without or with a wrong key; both
header styles accepted; /health, / and /metrics (as in vLLM) stay open."""

from __future__ import annotations

import httpx
import openai
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import API_KEYS, Server  # noqa: E402

pytest_plugins = ["server_util"]
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def chat(server: Server, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(server.url("/v1/chat/completions"), json=BODY, headers=headers, timeout=30)


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"Authorization": "Bearer"},
    {"Authorization": "Basic a2V5LW9uZQ=="}, {"Authorization": f"Bearer {API_KEYS[0]}x"},
], ids=["none", "wrong-bearer", "wrong-x-api-key", "empty-bearer", "basic-scheme", "key-prefix"])
def test_missing_or_wrong_key_is_401(auth_server: Server, headers):
    response = chat(auth_server, headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["type"] == "AuthenticationError" and error["code"] == 401
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("headers", [
    {"Authorization": f"Bearer {API_KEYS[0]}"}, {"authorization": f"bearer {API_KEYS[1]}"},
    {"x-api-key": API_KEYS[0]}, {"X-Api-Key": API_KEYS[1]},
], ids=["bearer-1", "bearer-2-lowercase", "x-api-key-1", "x-api-key-2"])
def test_valid_key_in_either_header_is_accepted(auth_server: Server, headers):
    response = chat(auth_server, headers)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1


def test_sdk_with_key_and_without(auth_server: Server):
    good = openai.OpenAI(base_url=auth_server.url("/v1"), api_key=API_KEYS[1], max_retries=0, timeout=60)
    assert [m.id for m in good.models.list().data] == ["tiny", "tiny-alias"]
    bad = openai.OpenAI(base_url=auth_server.url("/v1"), api_key="nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(**BODY)


def test_probes_open_metrics_and_tools_protected(auth_server: Server):
    assert httpx.get(auth_server.url("/health")).status_code == 200
    assert httpx.head(auth_server.url("/")).status_code == 200
    for path in ("/v1/models", "/version"):
        assert httpx.get(auth_server.url(path)).status_code == 401, path
    open_metrics = httpx.get(auth_server.url("/metrics"))  # a scrape config copied from vLLM works
    assert open_metrics.status_code == 200 and "vllm:num_requests_running" in open_metrics.text
    assert httpx.post(auth_server.url("/tokenize"), json={"prompt": "a"}).status_code == 401
    denied = httpx.post(auth_server.url("/reset_prefix_cache"))
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "AuthenticationError"
    allowed = httpx.post(auth_server.url("/reset_prefix_cache"), headers={"Authorization": f"Bearer {API_KEYS[0]}"})
    assert allowed.status_code == 200 and "dropped_blocks" in allowed.json()
    metrics = httpx.get(auth_server.url("/metrics"), headers={"x-api-key": API_KEYS[0]})
    assert metrics.status_code == 200 and "vllm:num_requests_running" in metrics.text
