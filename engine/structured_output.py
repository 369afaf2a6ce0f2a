"""Grammar-constrained decoding with llguidance, as per-request logits processors.

    API: StructuredOutput(kind, spec) --compile() off the event loop (400 on a bad one)-->
    cached template matcher --deep_copy at admission--> GrammarProcessor (engine/logits_process)

Kinds: `json` (a JSON schema), `regex`, `choice` (one of some strings), `grammar` (Lark, as
llguidance reads it; GBNF is converted). A compiled grammar is cached per spec, so the second
request with a schema pays only a copy. JSON is generated compact (no free whitespace): a
schema-valid document, never an endless run of spaces from a model that likes them.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.engine.logits_process import ConstraintError

log = logging.getLogger("shoal")
KINDS = ("json", "regex", "choice", "grammar")
CACHE_SIZE = 256
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match. `spec` is text (a schema as compact JSON, a
    regex, a JSON list of choices, a Lark grammar), so the whole thing is hashable."""

    kind: str
    spec: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown structured output kind {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> StructuredOutput:
        # Key order kept: properties are generated in the order the schema lists them.
        return cls("json", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def choice(cls, options: list[str]) -> StructuredOutput:
        return cls("choice", json.dumps(list(options)))

    def grammar_text(self) -> str:
        """The llguidance grammar for this spec (ValueError on a malformed spec)."""
        import llguidance

        Matcher = llguidance.LLMatcher
        if self.kind == "json":
            return Matcher.grammar_from_json_schema(self.spec, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return Matcher.grammar_from_regex(self.spec)
        if self.kind == "choice":
            options = json.loads(self.spec)
            return Matcher.grammar_from_regex("|".join(f"({re.escape(o)})" for o in options))
        text = self.spec
        if "::=" in text:  # GBNF (llama.cpp, vLLM's xgrammar examples)
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                text = gbnf_to_lark(text)
            except Exception as exc:  # noqa: BLE001 - GbnfToLarkError is no ValueError
                raise ValueError(f"not valid GBNF: {exc}") from None
        return Matcher.grammar_from_lark(text)


class StructuredOutputManager:
    """One per engine: the llguidance tokenizer and the compiled-grammar cache. `compile` is
    thread-safe and may be slow (run it off the event loop); `processor` is cheap."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]):
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._lltokenizer = None
        self._cache: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self.num_compiled = 0  # cache misses, for tests and the benchmark

    def _tokenizer(self):
        if self._lltokenizer is None:
            import llguidance.hf

            try:
                self._lltokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None)
            except Exception as exc:  # noqa: BLE001 - slow or foreign tokenizers: no grammars
                raise ValueError(f"structured output needs a fast Hugging Face tokenizer: {exc}") from None
        return self._lltokenizer

    def warm(self) -> None:
        """Build the llguidance tokenizer now (a second for a large vocabulary); a tokenizer
        it cannot read only means structured-output requests get a 400."""
        with self._lock:
            try:
                self._tokenizer()
            except ValueError as exc:
                log.warning("%s", exc)

    def lark_literal(self, text: str) -> str:
        """`text` as a Lark terminal: a special-token reference (`<[id]>`) when the vocabulary
        has it as one special token (Qwen's `<tool_call>`, Llama's `<|python_tag|>`), which
        no byte string matches; else a quoted string."""
        ids = self._hf_tokenizer.encode(text, add_special_tokens=False) if text else []
        if len(ids) == 1 and self._lltokenizer is not None and self._lltokenizer.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json.dumps(text)

    def compile(self, spec: StructuredOutput) -> None:
        """Compile and cache `spec`; ValueError with llguidance's message if it is invalid
        or uses what llguidance does not support."""
        self._template(spec)

    def _template(self, spec: StructuredOutput):
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                return cached
            tokenizer = self._tokenizer()
        import llguidance

        try:
            grammar = spec.grammar_text()
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"invalid {spec.kind}: {exc}") from None
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {spec.kind}: {matcher.get_error()}")
        with self._lock:
            self._cache[spec] = matcher
            self.num_compiled += 1
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return matcher

    def processor(self, spec: StructuredOutput, generated: list[int]) -> GrammarProcessor:
        """A fresh matcher for one request, advanced past the tokens it already generated."""
        processor = GrammarProcessor(self._template(spec).deep_copy(), self.vocab_size)
        for token in generated:
            processor.accept(token)
        return processor


class GrammarProcessor:
    """A logits processor over one llguidance matcher."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)

    def fill(self, bias: np.ndarray) -> None:
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self.matcher.is_error():
            raise ConstraintError(f"the output grammar failed: {self.matcher.get_error()}")
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: bias.shape[0]]
        if not allowed.any():
            raise ConstraintError("the output grammar allows no next token")
        bias[allowed == 0] = -np.inf

    def accept(self, token_id: int) -> bool:
        if not self.matcher.consume_token(token_id):
            raise ConstraintError(f"the output grammar refused token {token_id}: {self.matcher.get_error()}")
        return self.matcher.is_stopped()
