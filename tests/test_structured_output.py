"""Structured output: per-request grammars (llguidance) as logits processors inside the batch.

Engine level (offline LLM on a random-weight model): every output of 22 JSON schemas parses
and validates (formats included), greedy and sampled; unconstrained rows beside constrained
ones stay token-identical to their solo runs; constrained rows stay valid across chunked
prefill, prefix hits and forced preemption; compiled grammars are cached."""

from __future__ import annotations

import json

import jsonschema
import pytest

from shoal.engine.config import EngineConfig
from shoal.engine.llm import LLM
from shoal.engine.model_runner import ModelRunner
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.structured_output import StructuredOutput

from conftest import random_prompts

# Every string is bounded: a random model's greedy choice inside an open string may never
# be the closing quote.
SCHEMAS = {
    "object-basic": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3}}, "required": ["id", "tags"], "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
    "array-bounds": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"], "additionalProperties": False},
    "optional-fields": {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"], "additionalProperties": False},
    "anyof": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 5}, {"type": "null"}]},
    "number-range": {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5}}, "required": ["x"], "additionalProperties": False},
    "string-pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}, "required": ["code"], "additionalProperties": False},
    "string-format-date": {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"], "additionalProperties": False},
    "string-format-email": {"type": "string", "format": "email", "maxLength": 30},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "const": {"type": "object", "properties": {"kind": {"const": "tool"}, "v": {"type": "integer", "minimum": 0, "maximum": 3}}, "required": ["kind", "v"], "additionalProperties": False},
    "array-of-objects": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string", "maxLength": 3}, "v": {"type": "boolean"}}, "required": ["k", "v"], "additionalProperties": False}, "minItems": 1, "maxItems": 3},
    "tuple-prefix-items": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "maxLength": 3}], "items": False},
    "defs-ref": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x", "y"], "additionalProperties": False}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}, "b": {"$ref": "#/$defs/pt"}}, "required": ["a", "b"], "additionalProperties": False},
    "oneof-objects": {"oneOf": [{"type": "object", "properties": {"t": {"const": "a"}, "n": {"type": "integer", "minimum": 0, "maximum": 5}}, "required": ["t", "n"], "additionalProperties": False}, {"type": "object", "properties": {"t": {"const": "b"}, "s": {"type": "string", "maxLength": 4}}, "required": ["t", "s"], "additionalProperties": False}]},
    "integer-exclusive": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
    "string-length-bounds": {"type": "string", "minLength": 2, "maxLength": 6},
    "tool-call": {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"], "additionalProperties": False}}, "required": ["name", "arguments"], "additionalProperties": False},
    "nullable-type-list": {"type": "object", "properties": {"v": {"type": ["integer", "null"], "minimum": 0, "maximum": 50}}, "required": ["v"], "additionalProperties": False},
    "uuid-format": {"type": "string", "format": "uuid"},
}


def make_llm(loaded, **kw) -> LLM:
    model, tokenizer = loaded["llama"]
    config = EngineConfig(**{"max_model_len": 1024, "num_blocks": 512, **kw})
    return LLM(config, ModelRunner.from_model(model, tokenizer, config))


def run(llm: LLM, prompts, params):
    requests = [llm.add(p, sp) for p, sp in zip(prompts, params)]
    while llm.scheduler.has_work():
        llm.step()
    return requests


def assert_valid(tokenizer, request, schema) -> None:
    text = tokenizer.decode(request.output_token_ids)
    assert request.finish_reason.value == "stop", (request.finish_reason, text)
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


def test_there_are_at_least_20_schemas():
    assert len(SCHEMAS) >= 20


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_output_validates_greedy_and_sampled(loaded, name):
    llm = make_llm(loaded)
    schema = SCHEMAS[name]
    spec = StructuredOutput.json_schema(schema)
    params = [SamplingParams(temperature=t, seed=i, max_tokens=400, structured_output=spec)
              for t in (0.0, 1.0) for i in range(4)]
    prompts = random_prompts(len(params), 3, 30, 256, seed=len(name))
    for request in run(llm, prompts, params):
        assert_valid(loaded["llama"][1], request, schema)


def test_unconstrained_rows_beside_constrained_rows_match_their_solo_runs(loaded):
    prompts = random_prompts(8, 5, 40, 256, seed=11)
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, seed=5, max_tokens=24, ignore_eos=True)
    solo = [run(make_llm(loaded), [p], [sp])[0].output_token_ids
            for p, sp in zip(prompts[:4], [free, free, sampled, sampled])]
    schema = SCHEMAS["tool-call"]
    spec = StructuredOutput.json_schema(schema)
    constrained = [SamplingParams(temperature=t, seed=9, max_tokens=200, structured_output=spec) for t in (0, 1, 0, 1)]
    mixed = run(make_llm(loaded), prompts, [free, free, sampled, sampled, *constrained])
    assert [r.output_token_ids for r in mixed[:4]] == solo
    for request in mixed[4:]:
        assert_valid(loaded["llama"][1], request, schema)


def test_constrained_rows_survive_chunked_prefill_prefix_hits_and_preemption(loaded):
    schema = SCHEMAS["array-of-objects"]
    spec = StructuredOutput.json_schema(schema)
    shared = random_prompts(1, 300, 300, 256, seed=3)[0]
    prompts = [shared + q for q in random_prompts(12, 4, 12, 256, seed=4)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=300, structured_output=spec) for i in range(12)]
    # 64 tokens a step: the 300-token prompts arrive in chunks; 12 x ~330 tokens need ~250
    # blocks of 16 without sharing, and the pool has 40: requests are preempted and recomputed.
    llm = make_llm(loaded, num_blocks=40, max_num_batched_tokens=64, max_model_len=600)
    requests = run(llm, prompts, params)
    assert llm.scheduler.stats.num_preemptions > 0 and llm.scheduler.kv.num_cache_hits > 0
    for request in requests:
        assert_valid(loaded["llama"][1], request, schema)


def test_compiled_grammars_are_cached_and_bad_ones_refused(loaded):
    llm = make_llm(loaded)
    spec = StructuredOutput.json_schema(SCHEMAS["enum"])
    run(llm, [[5, 6], [7, 8]], [SamplingParams(max_tokens=50, structured_output=spec)] * 2)
    run(llm, [[9, 9]], [SamplingParams(max_tokens=50, structured_output=spec)])
    assert llm.structured.num_compiled == 1
    with pytest.raises(ValueError, match="strin"):
        llm.add([5, 6], SamplingParams(structured_output=StructuredOutput.json_schema({"type": "strin"})))
    with pytest.raises(ValueError, match="regex"):
        llm.structured.compile(StructuredOutput("regex", "a(b"))
    assert not llm.scheduler.requests  # nothing was queued


def test_a_forced_call_first_closes_an_open_think_section(loaded):
    """When the prompt opened <think>, the forced call's grammar starts with </think>, so the
    parser reads a call, not reasoning."""
    from shoal.api.structured import forced_tool_call
    from shoal.api.tool_formats import load_tool_format

    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x"], "additionalProperties": False}}}
    spec = forced_tool_call([tool], None, load_tool_format("hermes"), "tool_choice", close_reasoning="</think>")
    llm = make_llm(loaded)
    (request,) = run(llm, [[5, 6, 7]], [SamplingParams(temperature=1.0, seed=1, max_tokens=100, structured_output=spec)])
    text = loaded["llama"][1].decode(request.output_token_ids)
    assert text.startswith("</think>\n\n<tool_call>\n") and text.endswith("\n</tool_call>"), text
    call = json.loads(text.split("<tool_call>")[1].split("</tool_call>")[0])
    assert call["name"] == "f" and 0 <= call["arguments"]["x"] <= 9
