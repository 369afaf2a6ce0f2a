"""Bad input over real HTTP: each case gets its status and an OpenAI-shaped error naming
the culprit, and the server answers a normal request right after every one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest

pytest.register_assert_rewrite("server_util")
from server_util import TINY_MAX_MODEL_LEN, TINY_MAX_REQUEST_BYTES, TINY_VOCAB, Server  # noqa: E402

pytest_plugins = ["server_util"]

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError",
               413: "RequestTooLargeError", 415: "UnsupportedMediaTypeError"}


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: Any  # a dict/list is sent as JSON; bytes are sent raw
    status: int = 400
    param: str | None = None
    message: str = ""  # a substring the message must contain
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"


def chat(**fields: Any) -> dict:
    return {"messages": MSGS, "max_tokens": 2, **fields}


def completion(**fields: Any) -> dict:
    return {"prompt": "hi", "max_tokens": 2, **fields}


CONTEXT = f"This model's maximum context length is {TINY_MAX_MODEL_LEN} tokens. However, you requested"
CASES = [
    Case("chat-missing-messages", CHAT, {"max_tokens": 2}, param="messages", message="Missing required field"),
    Case("chat-empty-messages", CHAT, chat(messages=[]), param="messages"),
    Case("chat-messages-not-list", CHAT, chat(messages="hi"), param="messages"),
    Case("chat-message-missing-role", CHAT, chat(messages=[{"content": "hi"}]), param="messages[0].role"),
    Case("chat-bad-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), param="messages[0].role"),
    Case("chat-content-wrong-type", CHAT, chat(messages=[{"role": "user", "content": 5}]),
         param="messages[0].content"),
    Case("chat-image-content", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), param="messages[0].content"),
    Case("max-tokens-negative", CHAT, chat(max_tokens=-5), param="max_tokens"),
    Case("max-tokens-zero", COMPLETIONS, completion(max_tokens=0), param="max_tokens"),
    Case("max-tokens-string", CHAT, chat(max_tokens="10"), param="max_tokens"),
    Case("max-tokens-float", CHAT, chat(max_tokens=2.5), param="max_tokens"),
    Case("max-tokens-huge", CHAT, chat(max_tokens=10**9), param="input_tokens", message=CONTEXT),
    Case("max-completion-tokens-negative", CHAT, chat(max_completion_tokens=-1), param="max_completion_tokens"),
    Case("temperature-too-high", CHAT, chat(temperature=3.5), param="temperature"),
    Case("temperature-negative", COMPLETIONS, completion(temperature=-0.1), param="temperature"),
    Case("top-p-zero", CHAT, chat(top_p=0), param="top_p"),
    Case("top-p-above-one", CHAT, chat(top_p=1.5), param="top_p"),
    Case("top-k-below-minus-one", CHAT, chat(top_k=-2), param="top_k"),
    Case("min-p-above-one", CHAT, chat(min_p=2), param="min_p"),
    Case("presence-penalty-out-of-range", CHAT, chat(presence_penalty=5), param="presence_penalty"),
    Case("repetition-penalty-zero", CHAT, chat(repetition_penalty=0), param="repetition_penalty"),
    Case("seed-negative", CHAT, chat(seed=-1), param="seed"),
    Case("n-zero", CHAT, chat(n=0), param="n"),
    Case("n-huge", CHAT, chat(n=100000), param="n"),
    Case("min-tokens-over-max", CHAT, chat(min_tokens=5, max_tokens=2), param="min_tokens"),
    Case("stop-wrong-type", CHAT, chat(stop=5), param="stop"),
    Case("stop-list-of-ints", CHAT, chat(stop=[1, 2]), param="stop"),
    Case("stop-empty-string", CHAT, chat(stop=[""]), param="stop"),
    Case("stop-token-ids-negative", CHAT, chat(stop_token_ids=[-3]), param="stop_token_ids"),
    Case("logprobs-wrong-type", CHAT, chat(logprobs="yes"), param="logprobs"),
    Case("top-logprobs-too-many", CHAT, chat(logprobs=True, top_logprobs=50), param="top_logprobs"),
    Case("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), param="top_logprobs"),
    Case("completion-logprobs-too-many", COMPLETIONS, completion(logprobs=25), param="logprobs"),
    Case("logit-bias-bad-key", CHAT, chat(logit_bias={"abc": 1}), param="logit_bias"),
    Case("logit-bias-out-of-range", CHAT, chat(logit_bias={"5": 1000}), param="logit_bias"),
    Case("stream-wrong-type", CHAT, chat(stream="yes"), param="stream"),
    Case("stream-options-wrong-type", CHAT, chat(stream=True, stream_options="usage"), param="stream_options"),
    Case("model-wrong-type", CHAT, chat(model=123), param="model"),
    Case("unknown-model", CHAT, chat(model="gpt-4o"), status=404, param="model",
         message="The model `gpt-4o` does not exist."),
    Case("unknown-model-completions", COMPLETIONS, completion(model="nope"), status=404, param="model"),
    Case("prompt-over-max-model-len", COMPLETIONS, completion(prompt="x" * (TINY_MAX_MODEL_LEN + 10)),
         param="input_tokens", message=CONTEXT),
    Case("chat-over-max-model-len", CHAT, {"messages": [{"role": "user", "content": "y" * 2000}]},
         param="input_tokens", message="you requested 0 output tokens"),
    Case("completion-missing-prompt", COMPLETIONS, {"max_tokens": 2}, param="prompt"),
    Case("completion-empty-prompt", COMPLETIONS, completion(prompt=""), param="prompt"),
    Case("completion-prompt-dict", COMPLETIONS, completion(prompt={"a": 1}), param="prompt"),
    Case("completion-ids-out-of-vocab", COMPLETIONS, completion(prompt=[1, 999999]), param="prompt"),
    Case("completion-echo-with-logprobs", COMPLETIONS, completion(echo=True, logprobs=1), param="logprobs"),
    Case("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
         message="UTF-8"),
    Case("empty-body", CHAT, b"", message="empty"),
    Case("not-json", CHAT, b"{this is not json", message="not valid JSON"),
    Case("json-array", CHAT, [1, 2, 3], message="JSON object"),
    Case("wrong-content-type", CHAT, orjson.dumps(chat()), status=415, headers={"content-type": "text/plain"}),
    Case("form-content-type", COMPLETIONS, b"prompt=hi", status=415,
         headers={"content-type": "application/x-www-form-urlencoded"}),
    Case("oversized-body", CHAT, chat(messages=[{"role": "user", "content": "z" * TINY_MAX_REQUEST_BYTES}]),
         status=413),
    Case("tokenize-neither", "/tokenize", {"add_special_tokens": True}, param="prompt"),
    Case("detokenize-out-of-vocab", "/detokenize", {"tokens": [5, 10**7]}, param="tokens"),
    Case("detokenize-missing-tokens", "/detokenize", {}, param="tokens"),
    Case("unknown-route", "/v1/nothing-here", chat(), status=404),
    # vLLM fields Shoal does not honour yet: refused by name, never dropped.
    Case("prompt-logprobs", COMPLETIONS, completion(prompt_logprobs=1), param="prompt_logprobs"),
    Case("guided-json-bad-schema", CHAT, chat(guided_json={"type": "strin"}), param="guided_json"),
    Case("response-format-unknown", CHAT, chat(response_format={"type": "xml"}), param="response_format.type"),
    Case("best-of", CHAT, chat(best_of=3), param="best_of"),
    Case("tool-choice-required", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                            tool_choice="required"), param="tool_choice"),
    Case("continue-without-assistant", CHAT, chat(continue_final_message=True),
         param="continue_final_message"),
    Case("chat-template-kwargs-wrong-type", CHAT, chat(chat_template_kwargs="x"), param="chat_template_kwargs"),
    Case("get-on-post-route", CHAT, None, status=405, method="GET"),
    # Values that once reached the engine and broke it (or leaked a 500).
    Case("top-k-past-int32", CHAT, chat(top_k=2**31), param="top_k"),
    Case("top-k-2-pow-63", COMPLETIONS, completion(top_k=2**63), param="top_k"),
    Case("seed-past-int64", CHAT, chat(seed=2**64), param="seed"),
    Case("logit-bias-superscript-digit", CHAT, chat(logit_bias={"\u00b2": 1}), param="logit_bias"),
    Case("logit-bias-100-digit-key", CHAT, chat(logit_bias={"9" * 100: 1}), param="logit_bias"),
    # Past Python's 4,300-digit limit int() raises ValueError (was a 500).
    Case("logit-bias-5000-digit-key", CHAT, chat(logit_bias={"9" * 5000: 1}), param="logit_bias"),
    Case("json-schema-without-name", CHAT, chat(response_format={"type": "json_schema", "json_schema": {}}),
         param="response_format.json_schema.name"),
    Case("min-tokens-bans-every-token", COMPLETIONS,
         completion(min_tokens=1, stop_token_ids=list(range(TINY_VOCAB))), message="ban every token"),
    Case("stop-too-many", CHAT, chat(stop=[f"s{i}" for i in range(65)]), param="stop"),
    Case("stop-too-long", COMPLETIONS, completion(stop=["x" * 1025]), param="stop"),
    Case("user-message-without-content", CHAT, chat(messages=[{"role": "user"}]), param="messages[0]",
         message="needs `content`"),
    Case("tool-message-null-content", CHAT, chat(messages=[{"role": "tool", "content": None}]),
         param="messages[0]"),
]


def test_extreme_but_valid_values_serve_with_finite_logprobs(tiny_server: Server):
    """A penalty that overflows float32 and a top_k past the vocabulary: 200, every logprob a
    finite number (NaN once leaked as null), and the server keeps serving."""
    for fields in ({"repetition_penalty": 1e-300}, {"repetition_penalty": 1e300}, {"top_k": 2**31 - 1}):
        body = chat(max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=3, temperature=1.0, **fields)
        response = httpx.post(tiny_server.url(CHAT), json=body, timeout=30)
        assert response.status_code == 200, (fields, response.text)
        content = response.json()["choices"][0]["logprobs"]["content"]
        assert len(content) == 4
        values = [t["logprob"] for t in content] + [a["logprob"] for t in content for a in t["top_logprobs"]]
        assert all(isinstance(v, float) and -9999.0 <= v <= 0.0 for v in values), (fields, values)


def send(server: Server, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    content = case.body
    if case.body is not None and not isinstance(case.body, bytes):
        content = json.dumps(case.body)  # the stdlib writes integers past 64 bits; orjson cannot
        headers.setdefault("content-type", "application/json")
    return httpx.request(case.method, server.url(case.path), content=content, headers=headers, timeout=30)


def test_there_are_at_least_30_kinds():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_openai_error_and_server_keeps_serving(tiny_server: Server, case: Case):
    response = send(tiny_server, case)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ERROR_TYPES[case.status] and error["code"] == case.status
    assert case.message in error["message"] and error["message"]
    if case.param is not None:
        assert error["param"] == case.param, error["message"]
    ok = httpx.post(tiny_server.url(CHAT), json=chat(max_tokens=3, ignore_eos=True), timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_context_error_is_vllms_exact_wording(tiny_server: Server):
    prompt = [7] * 1000
    error = send(tiny_server, Case("", COMPLETIONS, completion(prompt=prompt, max_tokens=50))).json()["error"]
    assert error["message"] == (
        "This model's maximum context length is 1024 tokens. However, you requested 50 output tokens "
        "and your prompt contains at least 1000 input tokens, for a total of at least 1050 tokens. "
        "Please reduce the length of the input prompt or the number of requested output tokens.")


def test_unknown_fields_are_ignored(tiny_server: Server):
    body = chat(max_tokens=2, frobnicate=True, user="someone", metadata={"a": 1}, service_tier="auto")
    assert httpx.post(tiny_server.url(CHAT), json=body, timeout=30).status_code == 200
