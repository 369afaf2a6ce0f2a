"""HTTP-side configuration: names, keys and limits. Frozen and validated once, like
`EngineConfig`; the engine's own knobs stay there."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024**2


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str | None = None  # None = the model directory's name
    aliases: tuple[str, ...] = ()  # extra names accepted in `model`
    api_keys: tuple[str, ...] = ()  # empty = no authentication
    max_request_bytes: int = 8 * MiB  # larger bodies get 413 before they are parsed
    max_n: int = 128  # most choices per request (OpenAI's own cap)
    tool_call_parser: str | None = None  # None = detect from the tokenizer; "none" = off
    reasoning_parser: str | None = None  # None = the tokenizer's think markers; "none" = off
    chat_template: str | None = None  # a Jinja template replacing the model's
    generation_config: tuple[tuple[str, float], ...] = ()  # --override-generation-config
    ping_interval: float = 5.0  # seconds of silence before an Anthropic stream sends a ping
    body_timeout: float = 30.0  # seconds from the request head to the end of its body (408)
    allowed_origins: tuple[str, ...] = ()  # CORS; ("*",) allows any
    metrics_require_key: bool = False  # vLLM leaves /metrics open even with --api-key
    log_stats: bool = True  # a one-line engine summary in the log every 10 s of traffic
    responses_store_size: int = 1000  # Responses API responses kept for previous_response_id

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be >= 1024")
        if self.max_n < 1:
            raise ValueError("max_n must be >= 1")
        if not self.body_timeout > 0:
            raise ValueError("body_timeout must be > 0")
        if self.responses_store_size < 0:
            raise ValueError("responses_store_size must be >= 0")
        if not self.ping_interval > 0:
            raise ValueError("ping_interval must be > 0")
        if any(not key for key in self.api_keys):
            raise ValueError("API keys must be non-empty")
        if any(not name for name in self.aliases) or self.served_model_name == "":
            raise ValueError("model names must be non-empty")
